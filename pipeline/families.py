"""Model families: where to tap each kind of network.

Families (ResNet, VGG, EfficientNet, ...) are registered with :func:`register_family`: a
family names the modules whose outputs are candidate taps and the nodes that give the
penultimate features and the logits. The presets ``early``, ``mid`` and ``late`` are
derived from those candidates by stride (see :mod:`tlp.layers`).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable

from torch import nn

from .errors import TlpInputError

__all__ = ["Family", "register_family", "list_families", "family_for"]


@dataclass(frozen=True)
class Family:
    """Where to tap one kind of network.

    ``stage_modules(model)`` lists, in forward order, the modules whose outputs are
    sensible feature maps (stage or block outputs); presets pick among them by stride.
    """

    name: str  # e.g. "resnet"
    patterns: tuple[str, ...]  # fnmatch patterns on the architecture name
    stage_modules: Callable[[nn.Module], list[str]]  # candidate feature-map modules
    penultimate: Callable[[nn.Module], str]  # node whose output feeds the classifier layer
    logits: Callable[[nn.Module], str]  # node that outputs the class scores
    late: Callable[[nn.Module], str] | None = None  # override: last feature map, if not a stage


_FAMILIES: dict[str, Family] = {}


def register_family(
    name: str,
    patterns: Iterable[str],
    *,
    penultimate: str | Callable[[nn.Module], str],
    logits: str | Callable[[nn.Module], str],
    late: str | Callable[[nn.Module], str] | None = None,
):
    """Register a family; decorates ``stage_modules(model) -> list[str]``."""

    def as_callable(value):
        if value is None or callable(value):
            return value
        return lambda model, _v=value: _v

    def decorator(stage_modules):
        if name in _FAMILIES:
            raise ValueError(f"model family {name!r} is already registered")
        _FAMILIES[name] = Family(
            name=name,
            patterns=tuple(patterns),
            stage_modules=stage_modules,
            penultimate=as_callable(penultimate),
            logits=as_callable(logits),
            late=as_callable(late),
        )
        return stage_modules

    return decorator


def list_families(pattern: str = "*") -> list[str]:
    """Names of registered families matching a wildcard pattern."""
    return sorted(n for n in _FAMILIES if fnmatch.fnmatch(n, pattern))


def family_for(arch: str) -> Family:
    for family in _FAMILIES.values():
        if any(fnmatch.fnmatch(arch, p) for p in family.patterns):
            return family
    raise TlpInputError(
        f"no layer presets for architecture {arch!r}; pass explicit node names to --layers "
        f"(list them with `tlp layers {arch}`)"
    )


def _children(model: nn.Module, prefix: str) -> list[str]:
    module = model.get_submodule(prefix)
    return [f"{prefix}.{name}" for name, _ in module.named_children()]


@register_family(
    "resnet",
    ["resnet*", "resnext*", "wide_resnet*"],
    penultimate="flatten",
    logits="fc",
)
def _resnet_stages(model):
    return ["maxpool", "layer1", "layer2", "layer3", "layer4"]


@register_family("regnet", ["regnet_*"], penultimate="flatten", logits="fc")
def _regnet_stages(model):
    return ["stem"] + _children(model, "trunk_output")


@register_family(
    "vgg", ["vgg*"], penultimate="classifier.4", logits="classifier.6"
)
def _vgg_stages(model):
    return [f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]


@register_family("alexnet", ["alexnet"], penultimate="classifier.5", logits="classifier.6")
def _alexnet_stages(model):
    return [f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]


@register_family(
    "googlenet",
    ["googlenet", "inception_v3"],
    penultimate="flatten",
    logits="fc",
)
def _googlenet_stages(model):
    skip = ("aux", "avgpool", "dropout", "fc", "transform")
    return [n for n, _ in model.named_children() if not n.startswith(skip)]


@register_family(
    "mobilenet",
    ["mobilenet_v2", "mobilenet_v3_*", "mnasnet*"],
    penultimate=lambda m: "classifier.1" if _is_mobilenet_v3(m) else "flatten",
    logits=lambda m: f"classifier.{len(m.classifier) - 1}",
)
def _mobilenet_stages(model):
    trunk = "layers" if hasattr(model, "layers") else "features"
    return _children(model, trunk)


def _is_mobilenet_v3(model) -> bool:
    return len(getattr(model, "classifier", [])) == 4


@register_family(
    "efficientnet",
    ["efficientnet_b*", "efficientnet_v2_*"],
    penultimate="flatten",
    logits="classifier.1",
)
def _efficientnet_stages(model):
    return _children(model, "features")


@register_family(
    "convnext",
    ["convnext_*"],
    penultimate="classifier.1",
    logits="classifier.2",
)
def _convnext_stages(model):
    return _children(model, "features")


@register_family(
    "densenet",
    ["densenet*"],
    penultimate="flatten",
    logits="classifier",
    late="relu",
)
def _densenet_stages(model):
    return [n for n in _children(model, "features") if "block" in n or "transition" in n]


@register_family(
    "timm_efficientnet",
    ["tf_efficientnet*", "efficientnet_lite*", "timm:*efficientnet*", "timm:mobilenet*"],
    penultimate="global_pool",
    logits="classifier",
    late="bn2",
)
def _timm_efficientnet_stages(model):
    return ["bn1"] + _children(model, "blocks")


@register_family(
    "timm_resnet",
    ["timm:resnet*", "timm:resnext*"],
    penultimate="global_pool",
    logits="fc",
)
def _timm_resnet_stages(model):
    return ["maxpool", "layer1", "layer2", "layer3", "layer4"]
