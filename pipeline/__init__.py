"""tlp: transfer learning for image classification.

Extract pooled activations from several depths of a frozen pretrained CNN once, cache
them in HDF5 keyed by a fingerprint of everything that changes the numbers, and reuse
them across experiments: sweep classical heads over them, fine-tune where data is large,
and let the planner measure which of the four transfer-learning cases a data set is in.

Public API
----------
load_dataset(data) -> Dataset ; split(dataset, test, seed) -> (train, test)
    Scan a folder, CSV manifest or built-in data set once; hold out a test part.
extract(data, **settings) -> ExtractResult ; assemble(data, **settings)
    Run (or reuse) an extraction (``shard="RANK/WORLD"``: one part of it); ``result.path``
    is the HDF5 cache file. ``assemble`` joins finished parts without a forward pass.
FeatureFile(path) ; CachedFeatures(cache_file, layer)
    Read a cache file; a scikit-learn transformer serving cached features by image path.
sweep(data, test=..., heads=...) -> SweepResult
    Fit softmax/SVM/MLP/kNN heads on cached layers (or on your own ``(X, y)``); select by CV.
finetune(data, test=..., case=..., freeze=..., out=...) -> FinetuneResult
    Fine-tune the network with a new classifier layer; resumable from checkpoints.
advise(data) -> Advice ; run(data, test=...) -> RunOutcome
    Measure size and similarity (the case, 1-4, and its recipe); advise, then do it.
predict(model_dir, images) -> Predictions ; predict_imagenet(images)
    Label images with a saved model, or with the network's own ImageNet classes.
ModelOptions, ExtractSettings, SweepSettings, PlanSettings, FinetuneSettings
    Every option of every stage, with defaults and what each changes (tlp.settings).

Importing the package is light: names load their modules on first use (PEP 562), so
joblib's sweep workers, which import only the sweep's modules, never import torch.
"""

import importlib
import logging
import sys

__version__ = "0.6.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "load_dataset": "data", "split": "data", "Dataset": "dataset",
    "extract": "_extract", "assemble": "_extract", "ExtractResult": "extractresult",
    "FeatureFile": "featurefile", "CachedFeatures": "features",
    "resolve_model": "models",
    "sweep": "_sweep", "SweepResult": "_sweep",
    "finetune": "finetuning.stage", "FinetuneResult": "finetuning.loop",
    "advise": "plan", "Advice": "plan",
    "run": "_run", "RunOutcome": "_run", "EnsembleResult": "ensemble",
    "predict": "_predict", "predict_imagenet": "_predict", "Predictions": "_predict",
    "load_model": "saved",
    "ModelOptions": "settings", "ExtractSettings": "settings", "SweepSettings": "settings",
    "PlanSettings": "settings", "FinetuneSettings": "settings",
    "TlpInputError": "errors", "ImageDecodeError": "errors",
}

__all__ = list(_EXPORTS)

# A library stays quiet unless its user configures logging (the command line does).
logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _LegacyName:
    """Serves ``pipeline.X`` as the already-imported ``tlp.X`` (same module objects), for
    code written before the import name became ``tlp``."""

    def __init__(self, legacy: str):
        self.legacy = legacy
        self._specs: dict[str, object] = {}

    def find_spec(self, fullname, path=None, target=None):
        import importlib.util

        if not fullname.startswith(self.legacy + "."):
            return None
        real = "tlp" + fullname[len(self.legacy):]
        if fullname.endswith(".__main__"):  # runpy (`python -m pipeline`) needs code to run as __main__
            return importlib.util.spec_from_file_location(fullname, importlib.util.find_spec(real).origin)
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module("tlp" + spec.name[len(self.legacy):])
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # The import system stamped the legacy spec on the module: give it back its own.
        module.__spec__ = self._specs.pop(self.legacy + module.__name__[len("tlp"):], module.__spec__)


def _serve_under_legacy_name(legacy: str, init_file: str, package_path: list) -> None:
    """This folder imported as ``legacy`` (``pipeline``, its name in a checkout): load it as
    ``tlp`` if it is not loaded yet, and make ``legacy`` and its submodules the same modules."""
    import importlib.util

    if "tlp" not in sys.modules:
        spec = importlib.util.spec_from_file_location("tlp", init_file, submodule_search_locations=package_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["tlp"] = module
        spec.loader.exec_module(module)
    sys.meta_path.insert(0, _LegacyName(legacy))
    sys.modules[legacy] = sys.modules["tlp"]


if __name__ != "tlp":
    _serve_under_legacy_name(__name__, __file__, __path__)
