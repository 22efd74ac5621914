"""Saved heads and prediction: image files -> the same extractor -> the saved head.

A saved model is a folder with the refit winner of a sweep (``head.joblib``) and a JSON
spec (``model.json``) naming everything that made its features: model and weights
sha256, layer, pooling, preprocessing, precision, storage dtype, classes and library
versions, plus the sha256 of the head file. Loading checks before unpickling: a head
file whose bytes do not match, or one saved by another major scikit-learn version, is
refused, because unpickling executes code and a version change can silently change
results.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .device import autocast, resolve_device, resolve_precision, tune_cpu_allocator
from .errors import ImageDecodeError, TlpInputError
from .extract import stack_channels_last
from .images import DEFAULT_MAX_PIXELS, decode_image
from .layers import Tap, build_tap_extractor
from .models import imagenet_categories, resolve_model
from .pooling import pool
from .preprocess import normalize, resize_and_crop

__all__ = ["save_head", "load_head", "load_saved", "SavedHead", "SavedFinetuned", "predict_files", "imagenet_top_k", "SPEC_NAME", "HEAD_NAME"]

SPEC_NAME = "model.json"
HEAD_NAME = "head.joblib"
SPEC_FORMAT = "tlp-head-v1"
FINETUNED_FORMAT = "tlp-finetuned-v1"  # pipeline.finetune.SPEC_FORMAT


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict:
    import sklearn
    import torchvision

    from . import __version__

    return {"sklearn": sklearn.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "tlp": __version__}


def save_head(directory: str | os.PathLike, estimator, *, head: str, params: dict, layer: str,
              extract_result, settings, features_file) -> Path:
    """Write ``head.joblib`` and ``model.json`` into ``directory``; returns the spec path."""
    import joblib

    from .report import write_report

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    head_path = directory / HEAD_NAME
    joblib.dump(estimator, head_path)
    meta = features_file.layer_meta(layer)
    attrs = features_file.attrs
    spec = {
        "format": SPEC_FORMAT,
        "model": settings.model,
        "weights": settings.weights,
        "weights_id": attrs["weights_id"],
        "weights_sha256": attrs["weights_sha256"],
        "image_size": settings.image_size,
        "preprocessing": attrs["preprocessing"],
        "precision": extract_result.precision,
        "layer": layer,
        "node": meta.node,
        "pooling": meta.pooling,
        "storage_dtype": str(features_file.stored_dtype(layer)),
        "classes": features_file.classes,
        "head": {"name": head, "params": params, "file": HEAD_NAME, "sha256": _sha256(head_path)},
        "cache_key": extract_result.key,
        "versions": _versions(),
    }
    return write_report(directory / SPEC_NAME, spec)


@dataclass
class SavedHead:
    """A loaded, verified saved model."""

    directory: Path
    spec: dict
    estimator: object

    @property
    def classes(self) -> list[str]:
        return list(self.spec["classes"])


@dataclass
class SavedFinetuned:
    """A loaded, verified fine-tuned network (``tlp finetune --out``)."""

    directory: Path
    spec: dict
    state_dict: dict

    @property
    def classes(self) -> list[str]:
        return list(self.spec["classes"])


def _read_spec(directory: Path) -> dict:
    spec_path = directory / SPEC_NAME
    if not spec_path.is_file():
        raise TlpInputError(f"{str(directory)!r} holds no {SPEC_NAME}; pass a folder written by "
                            "`tlp sweep --out` or `tlp finetune --out`")
    try:
        return json.loads(spec_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise TlpInputError(f"{spec_path} is not valid JSON ({error}); re-run the `tlp sweep --out` or "
                            "`tlp finetune --out` that wrote this folder") from None


def _verified_file(directory: Path, entry: dict, command: str) -> Path:
    """The file an entry of model.json names, if its bytes still match the recorded sha256."""
    path = directory / entry["file"]
    if not path.is_file():
        raise TlpInputError(f"file {str(path)!r} is missing; re-run `{command} --out`")
    if _sha256(path) != entry["sha256"]:
        raise TlpInputError(
            f"file {str(path)!r} does not match the sha256 in {SPEC_NAME}: it was modified "
            f"or corrupted, so it is not loaded; re-run `{command} --out` to write it again"
        )
    return path


def load_head(directory: str | os.PathLike):
    """Load a saved model folder after checking it: a head (``tlp sweep --out``: sha256 and
    scikit-learn major version, before anything is unpickled) or a fine-tuned network
    (``tlp finetune --out``: sha256, then a ``weights_only`` load that runs no code)."""
    import joblib
    import sklearn

    directory = Path(directory)
    spec = _read_spec(directory)
    if spec.get("format") == FINETUNED_FORMAT:
        weights = _verified_file(directory, spec["finetuned"], "tlp finetune")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        return SavedFinetuned(directory, spec, state)
    if spec.get("format") != SPEC_FORMAT:
        raise TlpInputError(f"{directory / SPEC_NAME} has format {spec.get('format')!r}, expected "
                            f"{SPEC_FORMAT!r} or {FINETUNED_FORMAT!r}")
    head_path = _verified_file(directory, spec["head"], "tlp sweep")
    saved_major = str(spec["versions"]["sklearn"]).split(".")[0]
    if saved_major != sklearn.__version__.split(".")[0]:
        raise TlpInputError(
            f"head file {str(head_path)!r} was saved by scikit-learn {spec['versions']['sklearn']}, this is "
            f"{sklearn.__version__}; it is not loaded: re-run `tlp sweep --out` with this version"
        )
    return SavedHead(directory, spec, joblib.load(head_path))


load_saved = load_head  # the name says what it does now that it loads both kinds


# ----------------------------------------------------------------------------- features for files
def _file_features(paths: list[str], model_spec, taps: list[Tap], pools: dict[str, str], precision: str,
                   device, batch_size: int, on_error: str, model=None) -> tuple[dict[str, np.ndarray], list[str], list[dict]]:
    """Features of image files, computed exactly as extraction computes them
    (by ``model``, default the spec's own network)."""
    tune_cpu_allocator()
    extractor = build_tap_extractor(model_spec, model if model is not None else model_spec.build(), taps).to(device=device, memory_format=torch.channels_last)
    prep = model_spec.preprocessing
    rows: dict[str, list[np.ndarray]] = {tap.name: [] for tap in taps}
    kept, skipped = [], []
    for start in range(0, len(paths), batch_size):
        pixels = []
        for path in paths[start:start + batch_size]:
            try:
                data = Path(path).read_bytes()
            except OSError as error:
                failure = ImageDecodeError(path, f"cannot read file ({error.strerror or error})")
            else:
                try:
                    pixels.append(resize_and_crop(decode_image(data, path, max_pixels=DEFAULT_MAX_PIXELS), prep))
                    kept.append(path)
                    continue
                except ImageDecodeError as error:
                    failure = error
            if on_error == "fail":
                raise failure
            skipped.append({"path": path, "reason": failure.reason})
        if not pixels:
            continue
        batch = stack_channels_last(pixels)
        with torch.inference_mode(), autocast(device, precision):
            outputs = extractor(normalize(batch.to(device), prep))
        for tap in taps:
            rows[tap.name].append(pool(outputs[tap.node], pools[tap.name]).cpu().numpy())
    features = {name: np.concatenate(parts) if parts else np.zeros((0, 0), np.float32) for name, parts in rows.items()}
    return features, kept, skipped


def predict_files(saved: SavedHead, paths: list[str], *, top_k: int = 1, batch_size: int = 32,
                  device: str = "auto", on_error: str = "fail") -> tuple[list[dict], list[dict]]:
    """Top-k labels and probabilities of a saved head for image files.

    Returns (rows, skipped); each row is ``{"path", "labels": [...], "probabilities": [...]}``.
    Features are rounded to the storage dtype the head was trained on (float16 by default).
    """
    spec = saved.spec
    model_spec = resolve_model(spec["model"], weights=spec.get("weights"), image_size=spec.get("image_size"))
    if isinstance(saved, SavedFinetuned):
        return _predict_finetuned(saved, model_spec, paths, top_k, batch_size, device, on_error)
    if model_spec.weights_sha256 != spec["weights_sha256"]:
        raise TlpInputError(
            f"the weights of {spec['model']} differ from those the head in {saved.directory} was trained on "
            "(sha256 mismatch); use the same weights file or re-run the sweep"
        )
    torch_device = resolve_device(device)
    tap = Tap(name=spec["layer"], node=spec["node"])
    pooling = spec["pooling"] if spec["pooling"] != "none" else "avg"
    features, kept, skipped = _file_features(paths, model_spec, [tap], {tap.name: pooling}, spec["precision"],
                                             torch_device, batch_size, on_error)
    X = features[tap.name].astype(spec.get("storage_dtype", "float32")).astype(np.float32)
    probabilities = _probabilities(saved.estimator, X) if len(kept) else np.zeros((0, len(saved.classes)))
    model_classes = [saved.classes[int(c)] for c in saved.estimator.classes_]
    return _top_k_rows(kept, probabilities, model_classes, top_k), skipped


def _predict_finetuned(saved: SavedFinetuned, model_spec, paths, top_k, batch_size, device, on_error):
    """The fine-tuned network's own class scores, through the same decode path."""
    from .finetune import build_finetune_model

    spec = saved.spec
    model = build_finetune_model(model_spec, len(saved.classes), from_scratch=bool(spec.get("from_scratch")))
    model.load_state_dict(saved.state_dict)
    torch_device = resolve_device(device)
    tap = Tap(name="logits", node=spec["classifier"])
    features, kept, skipped = _file_features(paths, model_spec, [tap], {tap.name: "avg"}, spec["precision"],
                                             torch_device, batch_size, on_error, model=model.eval())
    logits = torch.from_numpy(features[tap.name].astype(np.float32))
    probabilities = logits.softmax(dim=1).numpy() if len(kept) else np.zeros((0, len(saved.classes)))
    return _top_k_rows(kept, probabilities, saved.classes, top_k), skipped


def _top_k_rows(paths: list[str], probabilities: np.ndarray, names, top_k: int) -> list[dict]:
    """``{"path", "labels", "probabilities"}`` per image, most probable first."""
    rows = []
    for path, row in zip(paths, probabilities):
        order = np.argsort(-row, kind="stable")[:top_k]
        rows.append({"path": path, "labels": [names[i] for i in order], "probabilities": [float(row[i]) for i in order]})
    return rows


def _probabilities(estimator, X: np.ndarray) -> np.ndarray:
    """``predict_proba`` where the head has it; else a softmax of decision values (SVMs)."""
    if hasattr(estimator, "predict_proba"):
        try:
            return estimator.predict_proba(X)
        except AttributeError:
            pass
    scores = estimator.decision_function(X)
    if scores.ndim == 1:  # binary: one margin
        scores = np.stack([-scores, scores], axis=1)
    scores = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(scores)
    return exp / exp.sum(axis=1, keepdims=True)


def imagenet_top_k(model: str, paths: list[str], *, top_k: int = 5, weights=None, batch_size: int = 32,
                   precision: str = "auto", device: str = "auto", on_error: str = "fail") -> tuple[list[dict], list[dict]]:
    """The network's own ImageNet labels for image files (zero-training approach)."""
    model_spec = resolve_model(model, weights=weights)
    if not model_spec.categories:
        raise TlpInputError(f"model {model!r} has no ImageNet class names; use a model with ImageNet weights")
    torch_device = resolve_device(device)
    from .layers import resolve_taps

    tap = resolve_taps(model_spec, ["logits"])[0]
    features, kept, skipped = _file_features(paths, model_spec, [tap], {tap.name: "avg"},
                                             resolve_precision(precision, torch_device), torch_device, batch_size, on_error)
    logits = torch.from_numpy(features[tap.name])
    probabilities = logits.softmax(dim=1).numpy() if len(kept) else np.zeros((0, 1000))
    categories = imagenet_categories() if len(model_spec.categories) == 1000 else model_spec.categories
    return _top_k_rows(kept, probabilities, categories, top_k), skipped
