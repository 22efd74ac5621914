"""Sweep candidates: plain cached layers, and fusions of them with ``+``.

A candidate is what one row of a sweep fits its heads on. ``--layers`` names them:

- ``late``: one layer of the sweep's network (a preset or a graph node);
- ``mid+late``: the concatenation of two or more layers of that network, one forward pass;
- ``efficientnet_lite0:late+efficientnet_lite2:late``: parts of several networks (``MODEL:LAYER``,
  the layer after the last colon, so ``resnet50:IMAGENET1K_V2:layer4`` works), each
  extracted and cached on its own with that network's own preprocessing.

Fusion happens after the cache: each part is a cached layer, so a fused candidate whose
parts are cached costs no forward pass. Heads standardise every column, so parts of
different scales need no weighting.

Two candidates whose features are the same up to rounding (EfficientNet's ``late``, the
average-pooled last feature map, is its ``penultimate`` vector) are swept once; :func:`distinct` says
which names each kept one stands for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from .errors import TlpInputError

__all__ = ["Part", "Candidate", "parse_candidates", "layers_by_model", "fuse", "distinct", "plain_layers"]


@dataclass(frozen=True)
class Part:
    """One cached layer a candidate reads: of the sweep's own network (``model=None``) or another."""

    model: str | None
    layer: str

    @property
    def key(self) -> str:
        """How the part is filed among the loaded arrays: ``late`` or ``efficientnet_lite2:late``."""
        return self.layer if self.model is None else f"{self.model}:{self.layer}"


@dataclass(frozen=True)
class Candidate:
    """A named candidate and the parts it concatenates, in order."""

    name: str
    parts: tuple[Part, ...]

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1


def _part(text: str, model: str, entry: str) -> Part:
    text = text.strip()
    if not text:
        raise TlpInputError(f"--layers entry {entry!r} has an empty part; write LAYER+LAYER, e.g. mid+late")
    if ":" not in text:
        return Part(None, text)
    network, _, layer = text.rpartition(":")
    if not network or not layer:
        raise TlpInputError(f"--layers part {text!r} must be LAYER or MODEL:LAYER, e.g. efficientnet_lite2:late")
    return Part(None if network == model else network, layer)


def parse_candidates(layers: Iterable[str], model: str) -> list[Candidate]:
    """``("mid", "mid+late", "efficientnet_lite2:late")`` -> candidates, in order, without repeats.

    ``model`` is the sweep's own network: parts naming it are its own layers.
    """
    candidates: dict[str, Candidate] = {}
    for entry in layers:
        entry = entry.strip()
        if not entry:
            continue
        parts = tuple(_part(text, model, entry) for text in entry.split("+"))
        if len(set(parts)) != len(parts):
            raise TlpInputError(f"--layers entry {entry!r} names a part twice")
        candidates.setdefault(entry, Candidate(entry, parts))
    if not candidates:
        raise TlpInputError("--layers is empty; pass presets such as early,mid,late, node names, or mid+late")
    return list(candidates.values())


def layers_by_model(candidates: Iterable[Candidate]) -> dict[str | None, list[str]]:
    """The layers to extract per network (None: the sweep's own), in first-use order."""
    needed: dict[str | None, list[str]] = {}
    for candidate in candidates:
        for part in candidate.parts:
            layers = needed.setdefault(part.model, [])
            if part.layer not in layers:
                layers.append(part.layer)
    return needed


def plain_layers(layers: Iterable[str], model: str) -> tuple[str, ...]:
    """The own-network layers that ``layers`` (which may hold fused entries) need:
    what ``tlp extract --layers mid+late`` extracts. Parts of other networks are refused."""
    needed = layers_by_model(parse_candidates(layers, model))
    others = sorted(name for name in needed if name is not None)
    if others:
        raise TlpInputError(f"--layers names parts of other networks ({', '.join(others)}); extract each with its "
                            "own --model, or let `tlp sweep` do it")
    return tuple(needed.get(None, ()))


def fuse(candidates: Iterable[Candidate], arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each candidate's (N, D) features: a part's array as loaded, or the parts side by side."""
    fused = {}
    for candidate in candidates:
        parts = [arrays[part.key] for part in candidate.parts]
        fused[candidate.name] = parts[0] if len(parts) == 1 else np.hstack(parts)
    return fused


def distinct(*tables: Mapping[str, np.ndarray]) -> dict[str, list[str]]:
    """Kept name -> the names whose features equal its in every table (training and test
    rows), first name kept; each kept name stands for itself and those."""
    names = list(tables[0])
    kept: dict[str, list[str]] = {}
    for name in names:
        for first in kept:
            if all(_same(table[first], table[name]) for table in tables):
                kept[first].append(name)
                break
        else:
            kept[name] = []
    return kept


# Two taps count as the same features when they differ by rounding only: EfficientNet's
# late and penultimate rows differ by 0.0015 (relative L2) under bf16 autocast, where the
# network pools in bf16 and tlp pools in float32, and by 0 in fp32.
SAME_FEATURES_RTOL = 0.01


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a is b:
        return True
    if a.shape != b.shape:
        return False
    scale = float(np.linalg.norm(a))
    return float(np.linalg.norm(a - b)) <= SAME_FEATURES_RTOL * max(scale, 1e-12)
