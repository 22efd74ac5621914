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

from .cache import FeatureFile
from .data import load_dataset
from .errors import ImageDecodeError, TlpInputError
from .extract import ExtractResult, ExtractSettings, extract
from .features import CachedFeatures
from .models import resolve_model
from .sweep import SweepResult, sweep  # the function shadows the submodule's name, as intended
from .finetune import FinetuneResult, FinetuneSettings, finetune  # likewise
from .plan import Advice, advise
from .run import RunOutcome, run  # likewise

__all__ = [
    "extract",
    "ExtractSettings",
    "ExtractResult",
    "FeatureFile",
    "CachedFeatures",
    "load_dataset",
    "resolve_model",
    "sweep",
    "SweepResult",
    "finetune",
    "FinetuneSettings",
    "FinetuneResult",
    "advise",
    "Advice",
    "run",
    "RunOutcome",
    "TlpInputError",
    "ImageDecodeError",
]

__version__ = "0.1.0"
