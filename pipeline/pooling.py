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

__all__ = ["check_pooling", "pool", "pooled_dim"]

_GRID = re.compile(r"^grid([1-9][0-9]?)$")


def check_pooling(name: str) -> str:
    """Return ``name`` if it is a pooling we know, else raise a one-line error."""
    if name in ("avg", "max", "avgmax") or _GRID.match(name or ""):
        return name
    raise TlpInputError(f"--pool must be avg, max, avgmax or gridK (K=1..99), got {name!r}")


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
