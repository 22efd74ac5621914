"""Network surgery: a new classifier layer sized to the classes, and freezing.

The classifier layer is replaced by a new, randomly initialised (seeded) linear layer;
the rest starts from the pretrained weights (or from random ones with ``from_scratch``).
The first part of the network can be frozen, by a fraction of its parameterised layers
or up to a named module: frozen BatchNorm layers stay in eval mode, so their running
statistics do not move (``requires_grad=False`` alone would not keep them).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import TlpInputError
from ..families import family_for
from ..models import ModelSpec

__all__ = ["CASE_FREEZE", "Network", "classifier_name", "build_finetune_model", "parameterised_layers",
           "freeze_layers", "prepare_network"]

# Case 3 (large, similar): freeze the first 70% of the layers, the middle of the usual
# "freeze 60-80%" starting point; case 4 (large, different): train through the whole network.
CASE_FREEZE = {"3": 0.7, "4": 0.0}


def classifier_name(spec: ModelSpec, model: nn.Module) -> str:
    """Qualified name of the module that outputs the class scores."""
    return family_for(spec.arch).logits(model)


def build_finetune_model(spec: ModelSpec, n_classes: int, *, from_scratch: bool = False, seed: int = 0) -> nn.Module:
    """The network with its classifier replaced by a new linear layer of ``n_classes`` outputs.

    Pretrained weights everywhere else (random ones with ``from_scratch``); the new
    layer's initialisation is seeded, so the same command starts from the same weights.
    """
    if from_scratch:
        model = dataclasses.replace(spec, weights_path=None, _state_mapper=None).build()
    else:
        model = spec.build()
    name = classifier_name(spec, model)
    old = model.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise TlpInputError(f"{spec.name}'s classifier {name!r} is a {type(old).__name__}, not a linear layer; "
                            "fine-tuning supports models whose last layer is nn.Linear")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = nn.Linear(old.in_features, n_classes)
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attribute, new)
    return model


def parameterised_layers(model: nn.Module, exclude: str) -> list[tuple[str, nn.Module]]:
    """Modules that hold parameters themselves (conv, norm, linear), in definition order,
    without the classifier: the units ``--freeze FRACTION`` counts."""
    return [
        (name, module) for name, module in model.named_modules()
        if any(True for _ in module.parameters(recurse=False))
        and name != exclude and not name.startswith(exclude + ".")
    ]


def freeze_layers(model: nn.Module, layers: list[tuple[str, nn.Module]], freeze) -> list[str]:
    """Set ``requires_grad=False`` on the first layers; returns their names.

    ``freeze`` is a fraction of ``layers`` (rounded down) or a module name: everything
    up to and including that module is frozen.
    """
    if isinstance(freeze, str):
        inside = [i for i, (name, _) in enumerate(layers) if name == freeze or name.startswith(freeze + ".")]
        if not inside:
            examples = ", ".join(sorted({name.split(".")[0] for name, _ in layers})[:8])
            raise TlpInputError(f"--freeze {freeze!r} names no module with parameters; use a fraction such as 0.7 "
                                f"or a module name (top-level: {examples}; see `tlp layers MODEL`)")
        count = inside[-1] + 1
    else:
        count = int(math.floor(float(freeze or 0.0) * len(layers) + 1e-9))
    for _, module in layers[:count]:
        for parameter in module.parameters(recurse=False):
            parameter.requires_grad_(False)
    return [name for name, _ in layers[:count]]


@dataclass
class Network:
    """A network ready to fine-tune: which module is the new classifier, what is frozen."""

    model: nn.Module
    classifier: str  # qualified name of the new classifier layer
    n_layers: int  # parameterised layers, classifier excluded
    frozen: list[str]  # names of the frozen layers
    frozen_norms: list[nn.Module]  # frozen BatchNorm layers, kept in eval mode while training

    def train_mode(self) -> None:
        """Training mode, except frozen BatchNorm layers: eval mode keeps their running
        statistics fixed."""
        self.model.train()
        for module in self.frozen_norms:
            module.eval()


def prepare_network(spec: ModelSpec, n_classes: int, *, freeze, from_scratch: bool, seed: int) -> Network:
    """The new classifier, then the first layers frozen as ``freeze`` says."""
    model = build_finetune_model(spec, n_classes, from_scratch=from_scratch, seed=seed)
    classifier = classifier_name(spec, model)
    layers = parameterised_layers(model, classifier)
    frozen = freeze_layers(model, layers, freeze)
    names = set(frozen)
    norms = [module for name, module in model.named_modules()
             if name in names and isinstance(module, nn.modules.batchnorm._NormBase)]
    return Network(model, classifier, len(layers), frozen, norms)
