"""Prediction: image files -> the same forward path -> a saved head, or the network's own labels.

A saved head (``tlp sweep --out``) gets exactly the features it was trained on: the same
weights (checked by sha256), decoding, preprocessing, tap, pooling and precision, the
features rounded to the stored dtype. A fine-tuned network (``tlp finetune --out``)
gives its own class scores on extraction's crops; an ensemble (``tlp run --out``) the
weighted mean of its members' class probabilities. ``predict_imagenet`` is the
zero-training approach: the pretrained classifier's ImageNet labels.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .device import resolve_device, resolve_precision
from .errors import ImageDecodeError, TlpInputError
from .files import write_text
from .forward import FileBytes, Forward, PreparedImages
from .layers import Tap
from .models import imagenet_categories, resolve_model
from .ensemble import Scored, average, head_probabilities, softmax
from .saved import SavedEnsemble, SavedFinetuned, head_parts, load_model
from .scan import image_files
from .settings import DEFAULT_MODEL

__all__ = ["Predictions", "predict", "predict_imagenet", "image_paths"]


@dataclass
class Predictions:
    """Top-k labels per image: ``rows`` of ``{"path", "labels", "probabilities"}``, most
    probable first, and the files left out under ``on_error="skip"``."""

    rows: list[dict]
    skipped: list[dict]
    top_k: int

    def header(self) -> list[str]:
        return ["path", "label", "probability"] + [f"{name}_{i}" for i in range(2, self.top_k + 1)
                                                   for name in ("label", "probability")]

    def table(self) -> list[list]:
        """One list per image: path, then (label, probability) for each of the top k."""
        return [[row["path"]] + [v for pair in zip(row["labels"], row["probabilities"]) for v in pair]
                for row in self.rows]

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """The CSV text (``path,label,probability[,label_2,probability_2,...]``); with
        ``path``, also written there."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.header())
        writer.writerows(self.table())
        text = buffer.getvalue()
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write_text(path, text)
        return text


def image_paths(inputs) -> list[str]:
    """Image files named by ``inputs``: files as given, folders expanded to the image files
    under them (recursively, sorted; hidden files left out). A path that does not exist is
    kept, so that prediction reports it ("cannot read")."""
    paths = []
    for entry in [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs:
        entry = Path(entry)
        paths += [str(p) for p in image_files(entry)] if entry.is_dir() else [str(entry)]
    return paths


def _top_k_rows(paths: list[str], probabilities: np.ndarray, names, top_k: int) -> list[dict]:
    rows = []
    for path, row in zip(paths, probabilities):
        order = np.argsort(-row, kind="stable")[:top_k]
        rows.append({"path": path, "labels": [names[i] for i in order], "probabilities": [float(row[i]) for i in order]})
    return rows


def _run(forward: Forward, paths: list[str], prep, batch_size: int, on_error: str):
    """(kept paths, outputs, skipped) of every file through ``forward``."""
    skipped: list[dict] = []

    def failed(failures: list[tuple[int, ImageDecodeError]]) -> None:
        if on_error == "fail":
            raise failures[0][1]
        skipped.extend({"path": error.path, "reason": error.reason} for _, error in failures)

    kept, outputs = forward.rows(PreparedImages(FileBytes(paths), prep), len(paths), batch_size=batch_size,
                                 on_failure=failed)
    return [paths[i] for i in kept], outputs, skipped


def _check_preprocessing(model_spec, spec: dict, directory) -> None:
    """The network resolved from model.json must prepare pixels as the saved model's
    training did; a name that resolves to other preprocessing would predict silently wrong."""
    import json

    expected = spec.get("preprocessing")
    if expected is not None and json.loads(json.dumps(model_spec.preprocessing.to_dict())) != expected:
        raise TlpInputError(
            f"{spec['model']} now resolves to preprocessing {model_spec.preprocessing.to_dict()}, but the model in "
            f"{str(directory)!r} was trained with {expected}; re-run the command that wrote it with --model "
            "naming the weights (e.g. resnet50:IMAGENET1K_V1)")


def _load_weights(network, saved: SavedFinetuned) -> None:
    """The saved state dict into the network built from its spec; one that does not fit
    (other keys or shapes) is bad input, not a crash."""
    try:
        network.load_state_dict(saved.state_dict)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TlpInputError(f"the weights in {str(saved.directory)!r} do not fit {saved.spec['model']} ({first}); "
                            "re-run `tlp finetune --out` to write the folder again") from None


def predict(model_dir: str | os.PathLike, images, *, top_k: int = 1, batch_size: int = 32, device: str = "auto",
            on_error: str = "fail", trust_pickle: bool = False) -> Predictions:
    """Labels of a saved model (a ``tlp sweep --out``, ``tlp finetune --out`` or ``tlp run
    --out`` folder) for image files or folders of them. The folder is checked and loaded
    before any image is read, and nothing in it runs code; ``trust_pickle=True`` also loads
    an old pickle head (``tlp-head-v1``), which can, so only for files you wrote yourself."""
    if on_error not in ("fail", "skip"):
        raise TlpInputError(f"--on-error must be fail or skip, got {on_error!r}")
    saved = load_model(model_dir, trust_pickle=trust_pickle)
    paths = image_paths(images)
    torch_device = resolve_device(device)
    if isinstance(saved, SavedEnsemble):
        kept, probabilities, skipped = _ensemble_probabilities(saved, paths, batch_size, torch_device, on_error)
        names = saved.classes
    else:
        kept, probabilities, names, skipped = _model_probabilities(saved, paths, batch_size, torch_device, on_error)
    return Predictions(_top_k_rows(kept, probabilities, names, top_k), skipped, top_k)


def _model_probabilities(saved, paths: list[str], batch_size: int, device, on_error: str):
    """(kept paths, (N, C) class probabilities, their class names, skipped) of a head or a
    fine-tuned network."""
    spec = saved.spec
    if isinstance(saved, SavedFinetuned):
        from .finetuning.surgery import build_finetune_model

        model_spec = resolve_model(spec["model"], weights=spec.get("weights"), image_size=spec.get("image_size"))
        _check_preprocessing(model_spec, spec, saved.directory)
        network = build_finetune_model(model_spec, len(saved.classes), from_scratch=bool(spec.get("from_scratch")))
        _load_weights(network, saved)
        forward = Forward(network, model_spec.preprocessing, device=device, precision=spec["precision"])
        kept, logits, skipped = _run(forward, paths, model_spec.preprocessing, batch_size, on_error)
        probabilities = softmax(logits) if kept else np.zeros((0, len(saved.classes)))
        return kept, probabilities, saved.classes, skipped
    kept, X, skipped = _head_features(saved, paths, batch_size, device, on_error)
    model_classes = [saved.classes[int(c)] for c in saved.estimator.classes_]
    probabilities = head_probabilities(saved.estimator, X) if kept else np.zeros((0, len(model_classes)))
    return kept, probabilities, model_classes, skipped


def _ensemble_probabilities(saved: SavedEnsemble, paths: list[str], batch_size: int, device, on_error: str):
    """(kept paths, (N, C) weighted mean of the members' probabilities in the ensemble's
    class order, skipped): an image is kept when every member could read it."""
    scored, skipped = [], []
    for member in saved.members:
        kept, probabilities, names, failed = _model_probabilities(member, paths, batch_size, device, on_error)
        scored.append(Scored(kept, None, probabilities, names))
        skipped += [entry for entry in failed if entry not in skipped]
    mean = average([scored[0].on(scored[0].paths, saved.classes), *scored[1:]], saved.weights)
    return mean.paths, mean.probabilities, skipped


def _network_of(part: dict) -> tuple:
    """What decides one forward pass: parts sharing it come from the same pass."""
    return (part["model"], part.get("weights"), part.get("image_size"), part["precision"], part.get("tta", "none"),
            part.get("fold_bn", False))


def _head_features(saved, paths: list[str], batch_size: int, device, on_error: str):
    """(kept paths, (N, D) features, skipped) exactly as the head's training rows were made:
    per part the same weights (checked by sha256), preprocessing, tap, pooling, precision
    and flip averaging, rounded to the stored dtype; a fused head's parts side by side, one
    forward pass per network."""
    parts = head_parts(saved.spec)
    groups: dict[tuple, list[int]] = {}
    for index, part in enumerate(parts):
        groups.setdefault(_network_of(part), []).append(index)
    columns: dict[int, dict[str, np.ndarray]] = {}
    skipped: list[dict] = []
    for indices in groups.values():
        first = parts[indices[0]]
        model_spec = resolve_model(first["model"], weights=first.get("weights"), image_size=first.get("image_size"))
        _check_preprocessing(model_spec, first, saved.directory)
        if model_spec.weights_sha256 != first["weights_sha256"]:
            raise TlpInputError(
                f"the weights of {first['model']} differ from those the head in {saved.directory} was trained on "
                "(sha256 mismatch); use the same weights file or re-run the sweep")
        taps = [Tap(name=f"part{i}", node=parts[i]["node"]) for i in indices]
        pools = {f"part{i}": parts[i]["pooling"] if parts[i]["pooling"] != "none" else "avg" for i in indices}
        forward = Forward.for_taps(model_spec, taps, pools, device=device, precision=first["precision"],
                                   tta=first.get("tta", "none"), fold_bn=first.get("fold_bn", False))
        kept, features, failed = _run(forward, paths, model_spec.preprocessing, batch_size, on_error)
        skipped += [entry for entry in failed if entry not in skipped]
        for i in indices:
            columns[i] = dict(zip(kept, features[f"part{i}"])) if kept else {}
    # A file one network could not use is left out of all (decoding is the same for each).
    kept = [path for path in paths if all(path in columns[i] for i in range(len(parts)))]
    if not kept:
        return [], None, skipped
    X = np.hstack([np.stack([columns[i][path] for path in kept]).astype(parts[i].get("storage_dtype", "float32"))
                   .astype(np.float32) for i in range(len(parts))])
    return kept, X, skipped


def predict_imagenet(images, *, model: str = DEFAULT_MODEL, weights=None, top_k: int = 5, batch_size: int = 32,
                     precision: str = "auto", device: str = "auto", on_error: str = "fail") -> Predictions:
    """The pretrained network's own ImageNet labels for image files (the zero-training approach)."""
    model_spec = resolve_model(model, weights=weights)
    if not model_spec.categories:
        raise TlpInputError(f"model {model!r} has no ImageNet class names; use a model with ImageNet weights")
    torch_device = resolve_device(device)
    forward = Forward(model_spec.build(), model_spec.preprocessing, device=torch_device,
                      precision=resolve_precision(precision, torch_device))
    kept, logits, skipped = _run(forward, image_paths(images), model_spec.preprocessing, batch_size, on_error)
    probabilities = softmax(logits) if kept else np.zeros((0, 1000))
    categories = imagenet_categories() if len(model_spec.categories) == 1000 else model_spec.categories
    return Predictions(_top_k_rows(kept, probabilities, categories, top_k), skipped, top_k)
