"""BatchNorm folded into the convolution before it, for frozen (inference-only) passes.

In eval mode a BatchNorm is a per-channel affine map, ``y = (x - mean) * g / sqrt(var +
eps) + b``, so after a convolution it can be merged into that convolution's weights and
bias: the same function, but one pass fewer over every activation of the network. On a
CPU, where those passes are memory-bound, efficientnet_lite0's frozen forward runs about
20% faster (benchmarks/extract.py: 165 -> 204 images/s in bf16, 126 -> 155 in fp32, on 2
cores); the features agree to float rounding (max abs difference ~7e-5 on activations up
to 35 in fp32), which is why the cache key names it (``ExtractSettings.fold_bn``).

Only a convolution immediately followed by a BatchNorm among the same parent's children
(the layout of torchvision's ``Conv2dNormActivation``, its ResNet blocks and timm's
``ConvBnAct`` / ``BatchNormAct2d`` blocks) is folded. Registration order is not always
execution order, so the folded network is checked on a probe image against the network
before folding; if they differ, nothing stays folded (:func:`fold_batchnorm` says so).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

__all__ = ["fold_batchnorm", "FoldedNorm", "FOLD_ID"]

logger = logging.getLogger(__name__)

FOLD_ID = "conv-bn-fold-v1"  # names the folding rule in the cache key
_SMALL_PROBE = 64
_PROBE_TOLERANCE = 1e-3  # relative to the output's largest magnitude; folding differs by ~1e-6


def _pairs(network: nn.Module):
    """(parent, BatchNorm child name, convolution, BatchNorm) for each foldable pair."""
    for parent in network.modules():
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = parent._modules[first], parent._modules[second]
            if (isinstance(conv, nn.Conv2d) and type(norm).__name__ != "FrozenBatchNorm2d"
                    and isinstance(norm, nn.BatchNorm2d) and norm.running_mean is not None
                    and norm.running_var is not None and conv.out_channels == norm.num_features):
                yield parent, second, conv, norm


class FoldedNorm(nn.Module):
    """What stays of timm's ``BatchNormAct2d`` once its BatchNorm is folded: its dropout
    and activation, under the same child names, so every graph node name inside it (and
    the block's own name, which the layer presets tap) is still there."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _after_norm(norm: nn.BatchNorm2d) -> nn.Module:
    """The module that replaces a folded BatchNorm: its activation part, or the identity."""
    if isinstance(getattr(norm, "act", None), nn.Module):
        return FoldedNorm(getattr(norm, "drop", None) or nn.Identity(), norm.act)
    return nn.Identity()


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    shift = (bias - norm.running_mean) * scale + (norm.bias if norm.bias is not None else 0.0)
    conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.dim() - 1))))
    conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)


def _output(network: nn.Module, probe: torch.Tensor) -> torch.Tensor:
    out = network(probe)
    if isinstance(out, dict):
        out = torch.cat([value.flatten(1) for value in out.values()], dim=1)
    return out.float()


@torch.no_grad()
def fold_batchnorm(network: nn.Module, probe_size: int = 224) -> tuple[nn.Module, int]:
    """(a copy of the network with every foldable BatchNorm folded, how many were folded).

    The network must be in eval mode (its BatchNorms use their running statistics). It is
    never changed: when nothing is foldable, or the folded copy's output differs from its
    own on a probe image, it is returned itself, with 0. The probe is 64 pixels (a
    fraction of a forward pass at full size: 60 against 105 ms with lite0 on 2 cores,
    copy included), or ``probe_size`` for a network that refuses 64.
    """
    if network.training:
        raise ValueError("fold_batchnorm needs a network in eval mode (folding uses the running statistics)")
    if not any(True for _ in _pairs(network)):
        return network, 0
    probe, expected = _probe(network, probe_size)
    folded = copy.deepcopy(network)
    pairs = list(_pairs(folded))
    for parent, name, conv, norm in pairs:
        _fold_pair(conv, norm)
        parent._modules[name] = _after_norm(norm)
    got = _output(folded, probe)
    scale = float(expected.abs().max()) or 1.0
    if got.shape != expected.shape or float((got - expected).abs().max()) > _PROBE_TOLERANCE * scale:
        logger.warning("BatchNorm folding changed this network's outputs (its modules do not run in the order "
                       "they are registered); running it unfolded")
        return network, 0
    return folded, len(pairs)


def _probe(network: nn.Module, probe_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a seeded probe image, the network's output on it): 64 pixels, else ``probe_size``."""
    size = min(_SMALL_PROBE, probe_size)
    try:
        return _probe_at(network, size)
    except (RuntimeError, ValueError, AssertionError):
        if size == probe_size:
            raise
    return _probe_at(network, probe_size)


def _probe_at(network: nn.Module, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    parameter = next(network.parameters())
    probe = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    probe = probe.to(device=parameter.device, dtype=parameter.dtype)
    return probe, _output(network, probe)
