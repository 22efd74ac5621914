"""Saved models: one folder format for both kinds, written, verified and loaded here.

A saved model is a folder with a JSON spec (``model.json``) and one weights file:

- a *head* on cached features (``tlp sweep --out``): ``head.joblib``, the refit winner,
  and a spec naming everything that made its features (model and weights sha256, layer,
  node, pooling, preprocessing, precision, storage dtype), so prediction recomputes
  exactly those features;
- a *fine-tuned network* (``tlp finetune --out``): ``model.pt``, a state dict, and a spec
  naming the model, preprocessing, precision, classifier module and recipe.

``format`` (``tlp-head-v1`` or ``tlp-finetuned-v1``) names the kind and its version. Both
specs record the sha256 of their weights file and the library versions; loading checks
the sha256 before reading the file, and a head saved by another major scikit-learn
version is refused before it is unpickled, because unpickling executes code and a
version change can silently change results.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import TlpInputError
from .featurefile import FeatureFile
from .files import atomic_file, file_sha256, library_versions, torch_save, write_json

__all__ = ["SPEC_NAME", "HEAD_NAME", "WEIGHTS_NAME", "HEAD_FORMAT", "FINETUNED_FORMAT", "SavedModel", "SavedHead",
           "SavedFinetuned",
           "save_head", "save_finetuned", "load_model"]

SPEC_NAME = "model.json"
HEAD_NAME = "head.joblib"
WEIGHTS_NAME = "model.pt"
HEAD_FORMAT = "tlp-head-v1"
FINETUNED_FORMAT = "tlp-finetuned-v1"


def _versions() -> dict:
    from . import __version__

    return {**library_versions("sklearn", "torch", "torchvision"), "tlp": __version__}


@dataclass
class SavedModel:
    """A loaded, verified saved model folder and its spec."""

    directory: Path
    spec: dict

    @property
    def classes(self) -> list[str]:
        return list(self.spec["classes"])


@dataclass
class SavedHead(SavedModel):
    """A head on cached features (``tlp sweep --out``)."""

    estimator: object = None


@dataclass
class SavedFinetuned(SavedModel):
    """A fine-tuned network (``tlp finetune --out``)."""

    state_dict: dict | None = None


# ----------------------------------------------------------------------------- writing
def save_head(directory: str | os.PathLike, estimator, *, head: str, params: dict, layer: str,
              features: FeatureFile, model: str, weights: str | None) -> Path:
    """Write ``head.joblib`` and ``model.json`` into ``directory``; returns the spec path.

    Everything about the features comes from the cache file they were read from;
    ``model`` and ``weights`` are the ``--model`` and ``--weights`` values the extraction
    used (``resnet50:IMAGENET1K_V1``, a weights file, ``"none"`` or None), which
    prediction needs to build the same network with the same preprocessing.
    """
    import joblib

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    head_path = directory / HEAD_NAME
    with atomic_file(head_path) as temp:
        joblib.dump(estimator, temp)
    meta, attrs = features.layer_meta(layer), features.attrs
    return write_json(directory / SPEC_NAME, {
        "format": HEAD_FORMAT, "model": model, "weights": weights, "weights_id": attrs["weights_id"],
        "weights_sha256": attrs["weights_sha256"], "image_size": attrs["preprocessing"]["crop_size"],
        "preprocessing": attrs["preprocessing"], "precision": attrs["precision"], "layer": layer, "node": meta.node,
        "pooling": meta.pooling, "storage_dtype": str(features.stored_dtype(layer)), "classes": features.classes,
        "head": {"name": head, "params": params, "file": HEAD_NAME, "sha256": file_sha256(head_path)},
        "cache_key": features.key, "versions": _versions(),
    })


def save_finetuned(directory: str | os.PathLike, state_dict: dict, *, spec: dict) -> Path:
    """Write ``model.pt`` (a state dict that loads with ``weights_only=True``) and
    ``model.json`` (``spec`` plus format, file checksum and versions) into ``directory``."""
    directory = Path(directory)
    weights = torch_save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, directory / WEIGHTS_NAME)
    return write_json(directory / SPEC_NAME, {
        "format": FINETUNED_FORMAT, **spec, "finetuned": {"file": WEIGHTS_NAME, "sha256": file_sha256(weights)},
        "versions": _versions(),
    })


# ----------------------------------------------------------------------------- loading
def _read_spec(directory: Path) -> dict:
    import json

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
    if file_sha256(path) != entry["sha256"]:
        raise TlpInputError(
            f"file {str(path)!r} does not match the sha256 in {SPEC_NAME}: it was modified "
            f"or corrupted, so it is not loaded; re-run `{command} --out` to write it again"
        )
    return path


def load_model(directory: str | os.PathLike) -> SavedHead | SavedFinetuned:
    """Load a saved model folder after checking it: a head (sha256 and scikit-learn major
    version, before anything is unpickled) or a fine-tuned network (sha256, then a
    ``weights_only`` load that runs no code)."""
    directory = Path(directory)
    spec = _read_spec(directory)
    if spec.get("format") == FINETUNED_FORMAT:
        import torch

        weights = _verified_file(directory, spec["finetuned"], "tlp finetune")
        return SavedFinetuned(directory, spec, torch.load(weights, map_location="cpu", weights_only=True))
    if spec.get("format") != HEAD_FORMAT:
        raise TlpInputError(f"{directory / SPEC_NAME} has format {spec.get('format')!r}, expected "
                            f"{HEAD_FORMAT!r} or {FINETUNED_FORMAT!r}")
    import joblib
    import sklearn

    head_path = _verified_file(directory, spec["head"], "tlp sweep")
    saved_major = str(spec["versions"]["sklearn"]).split(".")[0]
    if saved_major != sklearn.__version__.split(".")[0]:
        raise TlpInputError(
            f"head file {str(head_path)!r} was saved by scikit-learn {spec['versions']['sklearn']}, this is "
            f"{sklearn.__version__}; it is not loaded: re-run `tlp sweep --out` with this version"
        )
    return SavedHead(directory, spec, joblib.load(head_path))
