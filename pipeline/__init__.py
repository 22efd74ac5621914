"""tlp: transfer learning for image classification.

Extract pooled activations from several depths of a frozen pretrained CNN once, cache
them in HDF5 keyed by a fingerprint of everything that changes the numbers, and reuse
them across experiments.

Public API
----------
extract(data, **settings) -> ExtractResult
    Run (or reuse) an extraction; ``result.path`` is the HDF5 cache file.
FeatureFile(path)
    Read a cache file: ``.load(layer)``, ``.labels``, ``.paths``, ``.classes``.
load_dataset(data) -> Dataset
    Scan a folder, CSV manifest or built-in data set.
resolve_model(name) -> ModelSpec
    Model, weights and preprocessing without building the network.
CachedFeatures(cache_file, layer)
    scikit-learn transformer: image paths -> cached features (for your own Pipeline).
sweep(data, test=..., heads=...) -> SweepResult
    Fit softmax/SVM/MLP/kNN heads on cached layers; select by cross-validation.
finetune(data, test=..., case=..., freeze=..., out=...) -> FinetuneResult
    Fine-tune the network with a new classifier layer; resumable from checkpoints.
advise(data) -> Advice
    Measure size and similarity to the source domain; the case (1-4) and its recipe.
run(data, test=...) -> RunOutcome
    Advise, then sweep (cases 1-2) or fine-tune (cases 3-4).
"""

import importlib
import sys
import types

# Public name -> the submodule that defines it, imported on first use (PEP 562). Importing
# the package stays light: joblib's workers import pipeline.sweep for the sweep's fold
# tasks, and with every submodule imported up front each worker imported torch first
# (about 4 s of a fresh `tlp sweep`, against about 1.5 s for what the tasks need).
_EXPORTS = {
    "extract": "extract",
    "ExtractSettings": "extract",
    "ExtractResult": "extract",
    "FeatureFile": "cache",
    "CachedFeatures": "features",
    "load_dataset": "data",
    "resolve_model": "models",
    "sweep": "sweep",
    "SweepResult": "sweep",
    "finetune": "finetune",
    "FinetuneSettings": "finetune",
    "FinetuneResult": "finetune",
    "advise": "plan",
    "Advice": "plan",
    "run": "run",
    "RunOutcome": "run",
    "TlpInputError": "errors",
    "ImageDecodeError": "errors",
}

__all__ = list(_EXPORTS)

__version__ = "0.1.0"


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """The package module, keeping ``pipeline.extract``, ``.sweep``, ``.finetune`` and
    ``.run`` the functions: importing a submodule of the same name would otherwise
    replace the function with the module (the import system sets the submodule as an
    attribute of its package). ``from pipeline.sweep import SweepResult`` still works."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
