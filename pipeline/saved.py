"""Saved models: one folder format for both kinds, written, checked and loaded here.

A saved model is a folder with a JSON spec (``model.json``) and the one weights file it
names, beside it:

- a *head* on cached features (``tlp sweep --out``): ``head-<sha12>.skops``, the refit
  winner in skops format, and a spec naming everything that made its features (model
  and weights sha256, layer, node, pooling, preprocessing, precision, storage dtype), so
  prediction recomputes exactly those features;
- a *fine-tuned network* (``tlp finetune --out``): ``model-<sha12>.pt``, a state dict,
  and a spec naming the model, preprocessing, precision, classifier module and recipe;
  ``model.pt``, the name tlp 0.2 used, is a link to it for scripts that load that name;
- an *ensemble* (``tlp run --out`` when the average of the frozen winner and the
  fine-tuned network won): no weights of its own, a spec naming member sub-folders,
  each a saved model of the two kinds above, and their weights; prediction averages the
  members' class probabilities by class name.

A model folder is data, never code: whoever can write it must not get code run by the
person who predicts with it. So the spec is validated before anything else is read;
every file it names is a plain name that resolves inside the folder; a head loads with
``skops.io`` and only the types tlp's heads contain (:data:`HEAD_TYPES`); a state dict
loads with ``torch.load(weights_only=True)``. The sha256 recorded in the spec catches
corruption, not attacks (an attacker rewrites both). The pickle heads of ``tlp-head-v1``
(``head.joblib``) load only when the caller says it trusts them (``--trust-pickle``).

Replacement is atomic: the weights go to a new, content-addressed name, then the spec
that names them replaces the old spec in one rename, and only then are the old weights
removed. A reader, a failed write (disk full) or a kill sees the old model or the new
one, never a spec naming missing or mismatched weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import TlpInputError
from .featurefile import FeatureFile
from .files import atomic_file, library_versions, remove_orphans, temp_name, write_json
from .savedspec import (ENSEMBLE_FORMAT, ENTRY_KEYS, FINETUNED_FORMAT, HEAD_FORMAT, PICKLE_HEAD_FORMAT, SPEC_NAME,
                        MissingFile, member_folder, read_spec, short, verified_bytes)

__all__ = ["SPEC_NAME", "HEAD_FORMAT", "PICKLE_HEAD_FORMAT", "FINETUNED_FORMAT", "ENSEMBLE_FORMAT", "HEAD_TYPES",
           "SavedModel", "SavedHead", "SavedFinetuned", "SavedEnsemble", "HeadPart", "save_head", "head_parts",
           "save_finetuned", "save_ensemble", "load_model"]

LEGACY_WEIGHTS_NAME = "model.pt"  # now a link to model-<sha12>.pt
# The types beyond skops's defaults that tlp's heads hold (``skops.io.get_untrusted_types``
# of every head in heads.HEADS, fitted on 3 to 1,280 dimensions in float32 and float64).
# A head file holding any other type is refused.
HEAD_TYPES = (
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",  # MLPClassifier(solver="adam")
    "sklearn.neighbors._kd_tree.KDTree",  # KNeighborsClassifier(algorithm="auto"), few dimensions
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",  # the trees' metric
    "sklearn.metrics._dist_metrics.EuclideanDistance32",
)
# Names of weights files tlp writes: the only files a new save removes (those the
# replaced spec named), so a crafted spec cannot make a save delete plots or reports.
_WEIGHTS_FILE = re.compile(r"head-[0-9a-f]{12}\.skops|model-[0-9a-f]{12}\.pt|head\.joblib|model\.pt")
logger = logging.getLogger(__name__)


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


@dataclass
class SavedEnsemble(SavedModel):
    """Saved models whose class probabilities are averaged (``tlp run --out``)."""

    members: list[SavedModel] | None = None  # the loaded member models, in the spec's order
    weights: list[float] | None = None  # their weights, as the spec gives them


# ----------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class HeadPart:
    """One cached layer a head reads: the layer's name in ``features`` (its cache file) and
    the ``--model`` and ``--weights`` values that extraction used."""

    layer: str
    features: FeatureFile
    model: str
    weights: str | None


def _part_spec(part: HeadPart) -> dict:
    """What prediction needs to recompute one part's features exactly, from its cache file."""
    features, meta = part.features, part.features.layer_meta(part.layer)
    attrs = features.attrs
    return {"model": part.model, "weights": part.weights, "weights_id": attrs["weights_id"],
            "weights_sha256": attrs["weights_sha256"], "image_size": attrs["preprocessing"]["crop_size"],
            "preprocessing": attrs["preprocessing"], "precision": attrs["precision"],
            "tta": attrs.get("tta", "none"), "fold_bn": bool(attrs.get("fold_bn", False)), "layer": part.layer,
            "node": meta.node, "pooling": meta.pooling,
            "storage_dtype": str(features.stored_dtype(part.layer)), "cache_key": features.key}


def save_head(directory: str | os.PathLike, estimator, *, head: str, params: dict, layer: str,
              features: FeatureFile | None = None, model: str | None = None, weights: str | None = None,
              parts: list[HeadPart] | None = None) -> Path:
    """Write the head (``head-<sha12>.skops``) and ``model.json`` into ``directory``,
    replacing the model there atomically; returns the spec path.

    Everything about the features comes from the cache file they were read from;
    ``model`` and ``weights`` are the ``--model`` and ``--weights`` values the extraction
    used (``resnet50:IMAGENET1K_V1``, a weights file, ``"none"`` or None), which
    prediction needs to build the same network with the same preprocessing. A head on
    fused features (``layer="mid+late"``) names its ``parts`` instead, in column order;
    the spec lists them under ``parts``.
    """
    import zipfile

    import skops.io

    parts = parts if parts is not None else [HeadPart(layer, features, model, weights)]
    buffer = io.BytesIO()
    skops.io.dump(estimator, buffer, compression=zipfile.ZIP_DEFLATED)  # kNN heads hold their rows: 3x smaller
    described = [_part_spec(part) for part in parts]
    spec = {"format": HEAD_FORMAT, **described[0], "layer": layer, "classes": parts[0].features.classes,
            "versions": _versions()}
    if len(described) > 1:
        spec.update({"node": "+".join(p["node"] for p in described), "pooling": "+".join(p["pooling"] for p in described),
                     "storage_dtype": "+".join(p["storage_dtype"] for p in described), "parts": described})
    return _commit(Path(directory), buffer.getvalue(), "head", ".skops",
                   lambda entry: {**spec, "head": {"name": head, "params": params, **entry}})


def head_parts(spec: dict) -> list[dict]:
    """The parts a head's features are made of, in column order: the spec's ``parts``, or
    the spec itself for a head on one layer."""
    return spec["parts"] if "parts" in spec else [spec]


def save_finetuned(directory: str | os.PathLike, state_dict: dict, *, spec: dict) -> Path:
    """Write ``model-<sha12>.pt`` (a state dict that loads with ``weights_only=True``) and
    ``model.json`` (``spec`` plus format, file checksum and versions) into ``directory``,
    replacing the model there atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, buffer)
    return _commit(Path(directory), buffer.getvalue(), "model", ".pt", lambda entry: {
        "format": FINETUNED_FORMAT, **spec, "finetuned": entry, "versions": _versions()})


def save_ensemble(directory: str | os.PathLike, members: list[tuple[str, float]]) -> Path:
    """Write ``model.json`` naming ``members`` (``(sub-folder name, weight)``, each folder a
    saved model already written inside ``directory``) and replace the folder's model with
    it in one rename; the weights the replaced spec named are removed after it."""
    directory = Path(directory)
    classes = read_spec(member_folder(directory, members[0][0]))["classes"]
    spec = {"format": ENSEMBLE_FORMAT, "classes": classes,
            "members": [{"folder": name, "weight": float(weight)} for name, weight in members], "versions": _versions()}
    _load_ensemble(directory, spec, trust_pickle=False)  # what loading will check, checked before writing
    replaced = _weights_named(directory)
    spec_path = write_json(directory / SPEC_NAME, spec)
    alias = directory / LEGACY_WEIGHTS_NAME
    if alias.is_symlink():
        replaced.add(LEGACY_WEIGHTS_NAME)
    for name in replaced:
        (directory / name).unlink(missing_ok=True)
    return spec_path


def _commit(directory: Path, data: bytes, stem: str, suffix: str, spec_with: Callable[[dict], dict]) -> Path:
    """Replace the folder's model with ``data`` and the spec ``spec_with({"file", "sha256"})``.

    The weights are written (atomically) under a name no live spec uses unless it holds
    the same bytes; the spec rename is the one moment the model changes; the weights the
    replaced spec named are removed after it. Temporary files of dead writers (a killed
    save or checkpoint) go first. A failed spec write removes the new weights again.
    """
    directory.mkdir(parents=True, exist_ok=True)
    remove_orphans(directory, ".*.tmp.*")
    replaced = _weights_named(directory)
    sha = hashlib.sha256(data).hexdigest()
    entry = {"file": f"{stem}-{sha[:12]}{suffix}", "sha256": sha}
    weights = directory / entry["file"]
    with atomic_file(weights) as temp:
        temp.write_bytes(data)
    try:
        spec_path = write_json(directory / SPEC_NAME, spec_with(entry))
    except BaseException:
        if entry["file"] not in _weights_named(directory):
            weights.unlink(missing_ok=True)
        raise
    alias = directory / LEGACY_WEIGHTS_NAME
    stale = replaced - {entry["file"]}
    if stem == "model":
        _point_alias(alias, entry["file"])  # replaces a 0.2 model.pt file too
        stale.discard(LEGACY_WEIGHTS_NAME)
    elif alias.is_symlink():  # the folder held a fine-tuned model; now it holds a head
        stale.add(LEGACY_WEIGHTS_NAME)
    for name in stale:
        (directory / name).unlink(missing_ok=True)
    return spec_path


def _point_alias(alias: Path, target: str) -> None:
    """Make ``alias`` (``model.pt``, the name tlp 0.2 wrote and scripts may load) a
    relative link to ``target``, replacing it in one rename: it never names a missing
    or half-written file."""
    temp = temp_name(alias)
    try:
        os.symlink(target, temp)
        os.replace(temp, alias)
    except OSError as error:  # a file system without links: the spec still names the weights
        temp.unlink(missing_ok=True)
        logger.info("could not link %s to %s (%s)", alias.name, target, error)


def _weights_named(directory: Path) -> set[str]:
    """The weights files (tlp's own names only) that the folder's current spec names."""
    try:
        spec = json.loads((directory / SPEC_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    entries = [spec.get(key) for key in ENTRY_KEYS] if isinstance(spec, dict) else []
    return {e["file"] for e in entries if isinstance(e, dict) and isinstance(e.get("file"), str)
            and _WEIGHTS_FILE.fullmatch(e["file"])}


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]


# ----------------------------------------------------------------------------- loading
def load_model(directory: str | os.PathLike, *,
               trust_pickle: bool = False) -> SavedHead | SavedFinetuned | SavedEnsemble:
    """Load a saved model folder after checking it (see the module docstring); nothing it
    holds can run code. ``trust_pickle=True`` also loads a ``tlp-head-v1`` pickle head,
    which can: only for files you wrote yourself."""
    directory = Path(directory)
    spec = read_spec(directory)
    try:
        return _load(directory, spec, trust_pickle)
    except MissingFile:
        again = read_spec(directory)  # a save replaced the model between our two reads
        if again == spec:
            raise
        return _load(directory, again, trust_pickle)


def _load(directory: Path, spec: dict, trust_pickle: bool) -> SavedHead | SavedFinetuned | SavedEnsemble:
    if spec["format"] == ENSEMBLE_FORMAT:
        return _load_ensemble(directory, spec, trust_pickle)
    if spec["format"] == FINETUNED_FORMAT:
        return SavedFinetuned(directory, spec, _load_state_dict(directory, spec))
    if spec["format"] == PICKLE_HEAD_FORMAT and not trust_pickle:
        raise TlpInputError(
            f"{directory / SPEC_NAME} names a pickle head ({spec['head']['file']!r}, format {PICKLE_HEAD_FORMAT}), "
            f"and loading a pickle can run any code, so it is not loaded; re-save the model by running "
            f"`tlp sweep ... --out {directory}` again, or pass --trust-pickle if you wrote this file yourself")
    import sklearn

    saved_version = str(spec["versions"].get("sklearn"))
    if saved_version.split(".")[0] != sklearn.__version__.split(".")[0]:
        raise TlpInputError(
            f"head file {str(directory / spec['head']['file'])!r} was saved by scikit-learn {saved_version}, this is "
            f"{sklearn.__version__}; it is not loaded: re-run `tlp sweep --out` with this version"
        )
    path, data = verified_bytes(directory, spec, "head")
    estimator = _unpickle(path, data) if spec["format"] == PICKLE_HEAD_FORMAT else _skops_head(path, data)
    _check_head_classes(directory, spec, estimator)
    return SavedHead(directory, spec, estimator)


def _load_ensemble(directory: Path, spec: dict, trust_pickle: bool) -> SavedEnsemble:
    """Every member folder (inside this one, checked and loaded as any saved model; an
    ensemble of ensembles is refused), predicting the ensemble's classes."""
    members = []
    for entry in spec["members"]:
        folder = member_folder(directory, entry["folder"])
        member_spec = read_spec(folder)
        if member_spec["format"] == ENSEMBLE_FORMAT:
            raise TlpInputError(f"{directory / SPEC_NAME}: member folder {entry['folder']!r} holds an ensemble; "
                                "members are heads or fine-tuned networks; re-run `tlp run --out` to write the "
                                "folder again")
        members.append(_load(folder, member_spec, trust_pickle))
    if any(set(m.classes) != set(spec["classes"]) for m in members):
        raise TlpInputError(f"the members of {str(directory)!r} do not predict the classes its {SPEC_NAME} lists "
                            f"({short(spec['classes'])}); re-run `tlp run --out` to write the folder again")
    return SavedEnsemble(directory, spec, members, [m["weight"] for m in spec["members"]])


def _skops_head(path: Path, data: bytes):
    """The head in a skops file, if it holds no type outside :data:`HEAD_TYPES`."""
    import skops.io

    try:
        untrusted = sorted(set(skops.io.get_untrusted_types(data=data)) - set(HEAD_TYPES))
        if not untrusted:
            return skops.io.load(io.BytesIO(data), trusted=list(HEAD_TYPES))
    except Exception as error:  # noqa: BLE001 - whatever a hostile file makes skops raise
        raise TlpInputError(f"head file {str(path)!r} is not a readable skops file ({_one_line(error)}); re-run "
                            "`tlp sweep --out` to write it again") from None
    raise TlpInputError(f"head file {str(path)!r} holds types no tlp head contains ({', '.join(untrusted)}); it is "
                        "not loaded, because loading them could run code; re-run `tlp sweep --out` to write it again")


def _unpickle(path: Path, data: bytes):
    """A ``tlp-head-v1`` pickle, which the caller trusts (``--trust-pickle``)."""
    import joblib

    try:
        return joblib.load(io.BytesIO(data))
    except Exception as error:  # noqa: BLE001 - one line for any broken pickle
        raise TlpInputError(f"head file {str(path)!r} does not unpickle ({_one_line(error)}); re-run "
                            "`tlp sweep --out` to write it again") from None


def _check_head_classes(directory: Path, spec: dict, estimator) -> None:
    """The head must predict exactly the spec's classes (label i is ``classes[i]``)."""
    labels = getattr(estimator, "classes_", None)
    n = len(spec["classes"])
    try:
        fits = hasattr(estimator, "predict") and sorted(int(c) for c in labels) == list(range(n))
    except (TypeError, ValueError):
        fits = False
    if not fits:
        shown = short(labels.tolist() if hasattr(labels, "tolist") else labels)
        raise TlpInputError(f"the head in {str(directory)!r} predicts the labels {shown}, not the {n} classes its "
                            f"{SPEC_NAME} lists; re-run `tlp sweep --out` to write the folder again")


def _load_state_dict(directory: Path, spec: dict) -> dict:
    """The fine-tuned state dict (``weights_only=True``: no code runs), whose classifier
    has one output per class of the spec."""
    import torch

    path, data = verified_bytes(directory, spec, "finetuned")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a corrupt or hostile file, on one line
        raise TlpInputError(f"weights file {str(path)!r} does not load as a state dict ({_one_line(error)}); "
                            "re-run `tlp finetune --out` to write it again") from None
    key, n = f"{spec['classifier']}.weight", len(spec["classes"])
    weight = state.get(key) if isinstance(state, dict) else None
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[0] != n:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        raise TlpInputError(f"weights file {str(path)!r}: {key} has shape {shape}, expected {n} outputs (one per "
                            f"class in {SPEC_NAME}); re-run `tlp finetune --out` to write the folder again")
    return state
