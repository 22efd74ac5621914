"""Pooling of tapped feature maps to fixed-length vectors (only pooled features are stored).

``avg`` and ``max`` give C values per image, ``avgmax`` their concatenation (2C), and
``gridK`` an adaptive average over a K x K grid (C*K*K), which keeps coarse spatial
layout: early layers carry most of their information in *where* an edge is.
Tensors that are already vectors (penultimate features, logits) pass through.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from .errors import TlpInputError

__all__ = ["check_pooling", "check_grid_fits", "parse_pooling", "pooling_for_taps", "pool", "pooled_dim"]

# ``auto`` keeps a 2 x 2 layout where spatial information is still local (early and mid
# depths) and averages late maps. On the built-in digits at 96 px (test accuracy of a
# softmax head): mid avg 0.972, avgmax 0.981, grid2 0.991; late avg 0.941, grid2 0.956
# at 4x the width.
AUTO_POOLING = {"early": "grid2", "mid": "grid2"}

_GRID = re.compile(r"^grid([1-9][0-9]?)$")


def check_pooling(name: str) -> str:
    """Return ``name`` if it is a pooling we know, else raise a one-line error."""
    if name in ("avg", "max", "avgmax") or _GRID.match(name or ""):
        return name
    raise TlpInputError(
        f"--pool must be avg, max, avgmax, gridK (K=1..99), auto, or LAYER=POOL pairs, got {name!r}"
    )


def parse_pooling(text: str) -> tuple[str, dict[str, str]]:
    """``avg`` | ``auto`` | ``LAYER=POOL,...[,POOL]`` -> (default, per-layer overrides).

    A bare name among per-layer entries sets the default for layers not named.
    """
    default, overrides = "avg", {}
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        if "=" in part:
            layer, _, name = part.partition("=")
            if not layer.strip():
                raise TlpInputError(f"--pool entry {part!r} names no layer; write LAYER=POOL, e.g. early=grid2")
            overrides[layer.strip()] = check_pooling(name.strip())
        else:
            default = part if part == "auto" else check_pooling(part)
    return default, overrides


def pooling_for_taps(text: str, tap_names: list[str]) -> dict[str, str]:
    """The pooling of every tap, by tap name (see :func:`parse_pooling`)."""
    default, overrides = parse_pooling(text)
    unknown = sorted(set(overrides) - set(tap_names))
    if unknown:
        raise TlpInputError(
            f"--pool names layer {unknown[0]!r}, which is not among --layers ({', '.join(tap_names)})"
        )
    chosen = {}
    for name in tap_names:
        if name in overrides:
            chosen[name] = overrides[name]
        elif default == "auto":
            chosen[name] = AUTO_POOLING.get(name, "avg")
        else:
            chosen[name] = default
    return chosen


def check_grid_fits(layer: str, node: str, shape: tuple[int, ...], name: str, image_size: int) -> None:
    """Refuse ``gridK`` on a tap whose (C, H, W) map is smaller than K x K.

    An adaptive K x K average over a smaller map only repeats its values: no information,
    C*K*K floats per image (grid99 on a 2x2 map wrote 1.2 GB for 48 images). Called on the
    first batch, the first time a tap's shape is known, before anything is written.
    """
    match = _GRID.match(name or "")
    if len(shape) != 3 or match is None:
        return
    grid, height, width = int(match.group(1)), shape[1], shape[2]
    if grid > min(height, width):
        raise TlpInputError(
            f"--pool {name} for layer {layer!r} (node {node}) needs a feature map of at least {grid}x{grid}, but "
            f"at --image-size {image_size} it is {height}x{width}: use grid{min(height, width)} or smaller (the "
            f"largest that fits), avg, or a larger --image-size"
        )


def pool(features: torch.Tensor, name: str) -> torch.Tensor:
    """Pool a (B, C, H, W) map to (B, D) in float32; (B, D) inputs are only upcast.

    Upcasting before pooling keeps bf16/fp16 rounding out of the average.
    """
    features = features.float()
    if features.ndim == 2:
        return features
    if features.ndim != 4:
        raise TlpInputError(
            f"cannot pool a tap of shape {tuple(features.shape)}: tap a node that outputs "
            "(B, C, H, W) feature maps or (B, D) vectors (see `tlp layers MODEL`)"
        )
    if name == "avg":
        return features.mean(dim=(2, 3))
    if name == "max":
        return features.amax(dim=(2, 3))
    if name == "avgmax":
        return torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
    grid = int(_GRID.match(name).group(1))
    return F.adaptive_avg_pool2d(features, grid).flatten(1)


def pooled_dim(shape: tuple[int, ...], name: str) -> int:
    """Length of the pooled vector for one image whose tap has ``shape`` (no batch axis)."""
    if len(shape) == 1:
        return shape[0]
    channels = shape[0]
    if name in ("avg", "max"):
        return channels
    if name == "avgmax":
        return 2 * channels
    grid = int(_GRID.match(name).group(1))
    return channels * grid * grid
