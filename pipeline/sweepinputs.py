"""What a sweep fits on: feature rows of the training and test parts, from images, a
cache file or arrays.

Images are split once (:func:`tlp.data.split`) and extracted (or read from the cache)
per network their candidates name (:mod:`tlp.candidates`); rows of several networks are
matched by image and fused. A cache file's layers, or arrays ``(X, y)``, are taken as
they are. Nothing here imports torch at module level.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .candidates import Candidate, Part, fuse, layers_by_model, parse_candidates
from .data import as_dataset, require_classes, require_labels, split, stratified_split
from .dataset import Dataset
from .errors import TlpInputError
from .featurefile import FeatureFile
from .settings import ExtractSettings, SweepSettings

if TYPE_CHECKING:
    from ._extract import ExtractResult

__all__ = ["Features", "Inputs", "Source", "sweep_inputs"]


@dataclass
class Features:
    layers: dict[str, np.ndarray]  # layer -> (N, D) float32
    labels: np.ndarray  # (N,) class indices
    classes: list[str]
    paths: list[str] | None = None  # the image of each row, for features read from a cache file

    def rows(self, positions) -> "Features":
        paths = None if self.paths is None else [self.paths[i] for i in positions]
        return Features({k: v[positions] for k, v in self.layers.items()}, self.labels[positions], self.classes,
                         paths)

    def part(self, dataset: Dataset) -> "Features":
        """The rows of ``dataset``'s images, in its order (an image that could not be
        decoded has no row and is left out)."""
        row = {path: i for i, path in enumerate(self.paths)}
        return self.rows(np.asarray([row[item.path] for item in dataset.items if item.path in row], dtype=np.int64))


@dataclass
class Inputs:
    train: Features
    test: Features  # empty (0 rows) without a test part
    model: str  # the network's name, as the cache file records it
    cache_file: Path | None = None  # the training features' cache file: what a saved winner names
    model_option: str | None = None  # the --model that made them (None: as recorded)
    weights: str | None = None  # the --weights that made them
    extract: ExtractResult | None = None
    extract_seconds: float = 0.0
    candidates: list[Candidate] | None = None  # what each layer entry is made of (None: one cached layer each)
    sources: dict[str | None, Source] = field(default_factory=dict)  # network (None: own) -> where its rows are
    other_extracts: list[ExtractResult] = field(default_factory=list)  # the other networks' extractions
    tta: str = "none"  # the features' test-time augmentation (ExtractSettings.tta)


@dataclass
class Source:
    """One network's cache file and the --model/--weights values that made it."""

    cache_file: Path
    model: str
    weights: str | None


def _from_file(path) -> tuple[Features, dict]:
    """A cache file's layers, labels and classes, and its root attributes."""
    with FeatureFile(path) as features:
        loaded = Features({name: features.load(name) for name in features.layers}, features.labels,
                           features.classes, features.paths)
        return loaded, features.attrs


def _from_arrays(pair, classes=None) -> Features:
    try:
        X, y = pair
    except (TypeError, ValueError):
        raise TlpInputError("feature data must be a pair (X, y): X (N, D) or {layer: (N, D)}, y (N,)") from None
    layers = {k: np.asarray(v, dtype=np.float32) for k, v in (X.items() if isinstance(X, dict) else {"features": X}.items())}
    y = np.asarray(y)
    if any(v.ndim != 2 or len(v) != len(y) for v in layers.values()):
        raise TlpInputError(f"X must be (N, D) with N = len(y) = {len(y)}, got shapes "
                            f"{', '.join(str(v.shape) for v in layers.values())}")
    names = [str(c) for c in np.unique(y)] if classes is None else classes
    position = {name: i for i, name in enumerate(names)}
    unknown = sorted({str(v) for v in y} - set(position))
    if unknown:
        raise TlpInputError(f"test labels {', '.join(unknown[:5])} are not among the training labels")
    return Features(layers, np.asarray([position[str(v)] for v in y], dtype=np.int64), names)


def _is_cache_file(data) -> bool:
    return isinstance(data, (str, Path)) and str(data).endswith(".h5") and Path(data).is_file()


def _held_out(train: Features, test, seed: int) -> tuple[Features, Features]:
    """A fraction or count of feature rows held out (the stratified split images get)."""
    if test is None:
        return train, train.rows(np.arange(0))
    if isinstance(test, bool) or not isinstance(test, (int, float, np.integer, np.floating)):
        raise TlpInputError(f"with features as data, test must be a fraction, a count, (X_test, y_test) or a "
                            f"cache file, got {test!r}")
    kept, held = stratified_split(train.labels, test, seed, "test")
    return train.rows(kept), train.rows(held)


def sweep_inputs(data, test, settings: SweepSettings, extraction: ExtractSettings) -> Inputs:
    """The training and test rows of ``data`` and ``test`` (see :func:`tlp.sweep`)."""
    if not (isinstance(data, tuple) or _is_cache_file(data)):
        return _extracted(data, test, settings, extraction)
    if isinstance(data, tuple):
        whole, model, weights, cache_file = _from_arrays(data), "features", None, None
    else:
        whole, attrs = _from_file(data)
        model, cache_file = attrs["model"], Path(data)
        weights = "none" if attrs["weights_id"] == "none" else None  # a weights file's path is not recorded
    if isinstance(test, tuple):
        train, held = whole, _from_arrays(test, whole.classes)
    elif _is_cache_file(test):
        other, _ = _from_file(test)
        train, held = whole, Features(other.layers, _by_name(other, whole.classes, test), whole.classes)
    else:
        train, held = _held_out(whole, test, settings.seed)
    require_labels(train.labels, train.classes,
                   "the feature rows have labels" if cache_file is None else f"cache file {str(cache_file)!r} has rows")
    sources = {} if cache_file is None else {None: Source(cache_file, model, weights)}
    return Inputs(train, held, model, cache_file, weights, sources=sources,
                  tta="none" if cache_file is None else attrs.get("tta", "none"))


def _by_name(features: Features, classes: list[str], source) -> np.ndarray:
    from .data import labels_by_class_name

    return labels_by_class_name(features.labels, features.classes, classes, source)


def _extracted(data, test, settings: SweepSettings, extraction: ExtractSettings) -> Inputs:
    """Images: split once (see tlp.data.split), then extract (or reuse) what the parts need.

    When the two parts are the whole of one scanned data set (``--test FRACTION``, or the
    parts ``run`` hands on), that data set is extracted as one cache file and each part
    takes its rows from it; otherwise each part is extracted on its own. Each network a
    candidate names (``efficientnet_lite2:late``) is extracted on its own, with its own
    preprocessing; the rows of all networks are matched by image.
    """
    extraction = dataclasses.replace(extraction.validated(), shard=None)  # a sweep needs every row, not a part
    candidates = parse_candidates(extraction.layers, extraction.model)
    dataset = as_dataset(data, on_error=extraction.on_error, max_pixels=extraction.max_pixels)
    training, test_part = split(dataset, test, settings.seed, on_error=extraction.on_error,
                                max_pixels=extraction.max_pixels)
    require_classes(training)
    whole = _whole_of(training, test_part)
    trains, tests, results, seconds = [], [], {}, 0.0
    for network, layers in layers_by_model(candidates).items():
        settings_of = dataclasses.replace(extraction, layers=tuple(layers))
        if network is not None:  # another network: its own weights and preprocessing, at --image-size if given
            settings_of = dataclasses.replace(settings_of, model=network, weights=None)
        train, held, result, spent = _extract_parts(training, test_part, whole, settings_of, network)
        trains.append(train)
        tests.append(held)
        results[network] = result
        seconds += spent
    own = results.get(None) or next(iter(results.values()))
    sources = {network: Source(result.path, extraction.model if network is None else network,
                                extraction.weights if network is None else None)
               for network, result in results.items()}
    train, held = _joined(trains), _joined(tests)
    train.layers, held.layers = fuse(candidates, train.layers), fuse(candidates, held.layers)
    return Inputs(train, held, own.model, cache_file=own.path, model_option=extraction.model,
                   weights=extraction.weights, extract=own, extract_seconds=seconds, candidates=candidates,
                   sources=sources, other_extracts=[r for network, r in results.items() if r is not own],
                   tta=extraction.tta)


def _extract_parts(training: Dataset, test_part: Dataset | None, whole: Dataset | None, extraction: ExtractSettings,
                   network: str | None) -> tuple[Features, Features, ExtractResult, float]:
    """One network's features of both parts (layers keyed as candidates' parts name them)."""
    from ._extract import extract

    result = extract(whole if whole is not None else training, extraction)
    features, _ = _from_file(result.path)
    seconds = result.seconds
    if whole is not None:
        train, held = features.part(training), features.part(test_part)
    else:
        train, held = features, features.rows(np.arange(0))
        if test_part is not None:
            held_result = extract(test_part, extraction)
            held, _ = _from_file(held_result.path)
            seconds += held_result.seconds
    for part in (train, held):
        part.layers = {Part(network, name).key: values for name, values in part.layers.items()}
    return train, held, result, seconds


def _joined(parts: list[Features]) -> Features:
    """The features of several networks on the same images as one set of rows, in the
    first's order; an image that one network has no row for (it could not be decoded) is
    left out of all."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    common = set(first.paths).intersection(*(part.paths for part in parts[1:]))
    order = [path for path in first.paths if path in common]
    layers = {}
    for part in parts:
        row = {path: i for i, path in enumerate(part.paths)}
        layers.update(part.rows(np.asarray([row[path] for path in order], dtype=np.int64)).layers)
    kept = np.asarray([i for i, path in enumerate(first.paths) if path in common], dtype=np.int64)
    return Features(layers, first.labels[kept], first.classes, order)


def _whole_of(training: Dataset, test_part: Dataset | None) -> Dataset | None:
    """The scanned data set that the two parts together make up, if they do."""
    source = training.source
    if test_part is None or source is None or test_part.source is not source:
        return None
    return source if sorted(training.origin + test_part.origin) == list(range(len(source.items))) else None
