"""Taps: which graph nodes to read, and a module that returns them all from one forward pass.

Presets are resolved per family (see :mod:`tlp.families`): ``early`` is the last stage
output at stride 8, ``mid`` the last at stride 16, ``late`` the last feature map before
global pooling, ``penultimate`` the vector the classifier layer sees, ``logits`` the
class scores. Explicit torch.fx node names (``layer3.5.relu_2``) are accepted as well.

Every requested tap comes from the *same* forward pass, which stops after the deepest
tap. Where every tap names a module (the presets do), the network runs as it is, forward
hooks keep the tapped modules' outputs, and the pass ends when the last of them has run:
no graph to trace (tracing efficientnet_lite0 took 0.15 s a process, as long as building
and folding it). Any other node (a function's output such as
``layer3.5.add``) goes through torchvision's ``create_feature_extractor``, which rewrites
the graph so that the tapped nodes are outputs and prunes what runs after the deepest.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import TlpInputError
from .families import family_for
from .files import write_json
from .models import ModelSpec

__all__ = ["PRESETS", "Tap", "NodeInfo", "resolve_taps", "preset_nodes", "forget_presets", "list_nodes", "build_tap_extractor"]

PRESETS = ("early", "mid", "late", "penultimate", "logits")
_PROBE_SIZE = 128  # input side used to measure strides; any multiple of 32 >= 75 works


@dataclass(frozen=True)
class Tap:
    """One requested layer: the name the user gave and the graph node it resolved to."""

    name: str  # "early", ..., or the node name itself
    node: str  # torch.fx node (a module path such as "layer3", or "flatten")


@dataclass(frozen=True)
class NodeInfo:
    """Shape facts about one graph node, measured on a probe input."""

    node: str
    shape: tuple[int, ...]  # output shape for one image (no batch axis)
    channels: int  # C for feature maps, D for vectors
    stride: int | None  # input side / map side; None for vectors


def _family_key(spec: ModelSpec) -> str:
    return spec.name if spec.source == "timm" else spec.arch


def _fx_helpers(spec: ModelSpec):
    """(get_graph_node_names, create_feature_extractor) that suit the model's source."""
    if spec.source in ("timm", "embedded"):
        from timm.models import _features_fx as timm_fx

        return timm_fx.get_graph_node_names, timm_fx.create_feature_extractor
    from torchvision.models.feature_extraction import (
        create_feature_extractor,
        get_graph_node_names,
    )

    return get_graph_node_names, create_feature_extractor


def stride_of(input_side: int, map_side: int) -> int:
    """Stride of a feature map, as the nearest power of two (unpadded nets round down)."""
    return 2 ** round(math.log2(input_side / map_side))


def _module_output_shapes(model: nn.Module, modules: list[str]) -> dict[str, tuple[int, ...]]:
    """Run one probe image and record the output shape of each named module (hooks)."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in modules:
        def record(_module, _inputs, output, _name=name):
            if isinstance(output, torch.Tensor):
                shapes[_name] = tuple(output.shape[1:])

        handles.append(model.get_submodule(name).register_forward_hook(record))
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


@functools.lru_cache(maxsize=16)
def _preset_nodes(spec_key: str, spec: ModelSpec) -> dict[str, str]:
    model = spec.build()
    family = family_for(_family_key(spec))
    stages = family.stage_modules(model)
    shapes = _module_output_shapes(model, stages)
    strides = {n: stride_of(_PROBE_SIZE, s[-1]) for n, s in shapes.items() if len(s) == 3}
    ordered = [n for n in stages if n in strides]

    def last_at_most(limit: int) -> str:
        candidates = [n for n in ordered if strides[n] <= limit]
        return candidates[-1] if candidates else ordered[0]

    return {
        "early": last_at_most(8),
        "mid": last_at_most(16),
        "late": family.late(model) if family.late else ordered[-1],
        "penultimate": family.penultimate(model),
        "logits": family.logits(model),
    }


def forget_presets() -> None:
    """Forget the presets this process resolved (not the ``presets.json`` memo on disk), so
    the next resolution pays what a fresh process pays (the benchmarks time cold runs)."""
    _preset_nodes.cache_clear()


PRESET_RULES_VERSION = 1  # bump when the rules above change: invalidates presets.json memos


def _memo_key(spec: ModelSpec) -> str:
    from importlib.metadata import version

    libraries = f"torch={torch.__version__}"
    if spec.source in ("timm", "embedded"):
        libraries += f",timm={version('timm')}"
    return f"v{PRESET_RULES_VERSION}|{spec.source}|{_family_key(spec)}|{libraries}"


def preset_nodes(spec: ModelSpec, memo_dir: Path | None = None) -> dict[str, str]:
    """Preset name -> graph node for this model (memoised per architecture).

    Resolving presets means building the network and probing strides. With
    ``memo_dir`` the answer is also kept in ``memo_dir/presets.json``, so a later
    process (typically a warm cache hit) needs no network at all.
    """
    memo_file = Path(memo_dir) / "presets.json" if memo_dir is not None else None
    key = _memo_key(spec)
    memo = _read_memo(memo_file)
    if key in memo:
        return dict(memo[key])
    nodes = _preset_nodes(_family_key(spec), spec)
    if memo_file is not None:
        _write_memo(memo_file, {**_read_memo(memo_file), key: nodes})
    return nodes


def _read_memo(memo_file: Path | None) -> dict:
    if memo_file is None or not memo_file.is_file():
        return {}
    try:
        memo = json.loads(memo_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a damaged memo is only a lost shortcut
    return memo if isinstance(memo, dict) else {}


def _write_memo(memo_file: Path, memo: dict) -> None:
    try:
        write_json(memo_file, memo)
    except OSError:
        pass  # read-only cache folder: presets are simply resolved again next time


def resolve_taps(
    spec: ModelSpec, layers: list[str] | tuple[str, ...] | str, *, memo_dir: Path | None = None
) -> list[Tap]:
    """Resolve ``early,mid,late`` or node names to :class:`Tap` objects, in order.

    Duplicate nodes are dropped (``late`` and ``layer4`` are the same tap).
    """
    if isinstance(layers, str):
        layers = [part.strip() for part in layers.split(",")]
    layers = [layer for layer in layers if layer]
    if not layers:
        raise TlpInputError("--layers is empty; pass presets such as early,mid,late or node names")
    presets = preset_nodes(spec, memo_dir) if any(layer in PRESETS for layer in layers) else {}
    taps: list[Tap] = []
    for layer in layers:
        node = presets.get(layer, layer)
        if all(tap.node != node for tap in taps):
            taps.append(Tap(name=layer, node=node))
    return taps


def list_nodes(spec: ModelSpec, model: nn.Module | None = None) -> list[NodeInfo]:
    """All tensor-valued graph nodes of the eval graph with shape, channels and stride."""
    model = model if model is not None else spec.build()
    get_names, create = _fx_helpers(spec)
    _, eval_nodes = get_names(model)
    extractor = create(model, return_nodes={n: n for n in eval_nodes if n != "x"})
    with torch.inference_mode():
        outputs = extractor(torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE))
    infos = []
    for node in eval_nodes:
        value = outputs.get(node)
        if not isinstance(value, torch.Tensor) or value.ndim not in (2, 4):
            continue
        shape = tuple(value.shape[1:])
        stride = stride_of(_PROBE_SIZE, shape[-1]) if len(shape) == 3 else None
        infos.append(NodeInfo(node=node, shape=shape, channels=shape[0], stride=stride))
    return infos


class _AllTapped(Exception):
    """Raised by the last tapped module's hook: the rest of the network is not needed."""


class ModuleTaps(nn.Module):
    """``network`` run eagerly, returning ``{module path: output}`` for ``nodes``, each a
    submodule's path. The outputs are those torch.fx would name by the same paths (the
    last node inside a module is its output); the pass stops once every tapped module has
    run. Hooks live only during a call, so the network itself is left unchanged."""

    def __init__(self, network: nn.Module, nodes: list[str]):
        super().__init__()
        self.network = network
        self.nodes = list(dict.fromkeys(nodes))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}

        def keep(node: str):
            def hook(_module, _inputs, output):
                outputs.setdefault(node, output)  # a module run twice: its first output, as fx names it
                if len(outputs) == len(self.nodes):
                    raise _AllTapped
            return hook

        handles = [self.network.get_submodule(node).register_forward_hook(keep(node)) for node in self.nodes]
        try:
            self.network(x)
        except _AllTapped:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [node for node in self.nodes if node not in outputs]
        if missing:
            raise RuntimeError(f"the forward pass did not run the tapped modules {missing}")
        return outputs


def build_tap_extractor(spec: ModelSpec, model: nn.Module, taps: list[Tap]) -> nn.Module:
    """A module whose forward returns ``{node: tensor}`` for every tap, from one pass:
    :class:`ModuleTaps` where every tap is a module, else a torch.fx feature extractor."""
    modules = {name for name, _ in model.named_modules() if name}
    if taps and all(tap.node in modules for tap in taps):
        return ModuleTaps(model, [tap.node for tap in taps]).eval()
    get_names, create = _fx_helpers(spec)
    try:
        extractor = create(model, return_nodes={tap.node: tap.node for tap in taps})
    except ValueError as error:
        # torchvision says: "node: 'xyz' is not present in model. Hint: ..."
        missing = re.search(r"node: '([^']*)' is not present", str(error))
        if missing is None:
            raise
        raise TlpInputError(
            f"layer {missing.group(1)!r} is not a node of {spec.name}; use a preset "
            f"({', '.join(PRESETS)}) or a node listed by `tlp layers {spec.name}`"
        ) from None
    return extractor.eval()
