"""Training state and checkpoints: what a killed run needs to resume bit-identically.

After every epoch ``OUT/checkpoints/epoch-NNN.pt`` is written atomically (temporary
name, fsync, rename) with the model, optimiser, scheduler, gradient scaler, the
:class:`TrainingState` and every RNG state, all in a form ``torch.load(...,
weights_only=True)`` reads without running code. A rerun resumes from the newest
checkpoint that loads and fits the network (a truncated one, or one that lacks a part or
holds weights of another shape, is skipped for the one before it); one made by a run
with other data or settings is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import TlpInputError
from ..files import torch_save

__all__ = ["TrainingState", "CHECKPOINT_DIR", "CHECKPOINT_FORMAT", "save_checkpoint", "resume"]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = "tlp-finetune-checkpoint-v1"
KEEP_CHECKPOINTS = 2  # the newest and the one before it, in case the newest is damaged


@dataclass
class TrainingState:
    """Where training stands after an epoch; saved in every checkpoint."""

    epoch: int = 0  # epochs finished
    history: list[dict] = field(default_factory=list)  # one row per epoch (loss, accuracies, seconds, ...)
    best_epoch: int = 0
    best_val: float = float("-inf")  # validation accuracy of the best epoch (-training loss without one)
    best_state: dict | None = None  # the best epoch's weights
    stale_epochs: int = 0  # epochs since the best one
    finished: bool = False  # the last epoch ran, or early stopping ended the run

    def end_epoch(self, row: dict, model: torch.nn.Module, *, epochs: int, patience: int | None) -> None:
        """Record an epoch; keep the best weights (by validation accuracy, or training loss
        without a validation split); decide whether training is finished. ``patience``
        None means no early stopping."""
        self.history.append(row)
        score = row.get("val_accuracy", -row["train_loss"])
        if score > self.best_val:
            self.best_val, self.best_epoch, self.stale_epochs = score, row["epoch"], 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.stale_epochs += 1
        self.epoch = row["epoch"]
        if patience is not None and self.stale_epochs >= patience:
            logger.info("validation accuracy has not improved for %d epochs: stopping", patience)
            self.finished = True
        if self.epoch == epochs:
            self.finished = True


def _rng_states() -> dict:
    numpy_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "python": list(random.getstate()),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(directory: Path, state: TrainingState, *, run_fingerprint: str, model, optimizer, scheduler,
                    scaler) -> Path:
    """The epoch's checkpoint, atomically; only the newest KEEP_CHECKPOINTS stay."""
    final = torch_save({
        "format": CHECKPOINT_FORMAT, "run_fingerprint": run_fingerprint,
        **{f.name: getattr(state, f.name) for f in dataclasses.fields(state)},
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": _rng_states(), "scaler": scaler.state_dict() if scaler is not None else None,
    }, directory / f"epoch-{state.epoch:03d}.pt")
    for old in sorted(directory.glob("epoch-*.pt"))[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    return final


# What every checkpoint holds besides the TrainingState fields (the scaler may be None).
_PARTS = ("format", "run_fingerprint", "model", "optimizer", "scheduler", "rng", "scaler")


def _loaded_checkpoints(directory: Path):
    """(path, contents) of each checkpoint that loads, newest first (``weights_only=True``:
    no code runs); a damaged file is skipped with a warning."""
    for path in sorted(directory.glob("epoch-*.pt"), reverse=True):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a damaged file: fall back to the one before
            logger.warning("checkpoint %s is unreadable (%s); trying an older one", path, error)
            continue
        if isinstance(saved, dict) and saved.get("format") == CHECKPOINT_FORMAT:
            yield path, saved


def _problem(saved: dict, model) -> str | None:
    """Why ``saved`` cannot be resumed into ``model`` (a missing part, a weight of another
    name or shape), or None; checked before anything is loaded, so a bad checkpoint
    leaves the model as it was."""
    missing = [name for name in (*_PARTS, *(f.name for f in dataclasses.fields(TrainingState))) if name not in saved]
    if missing:
        return f"it lacks {', '.join(missing)}"
    weights, expected = saved["model"], model.state_dict()
    if not isinstance(weights, dict) or weights.keys() != expected.keys():
        return "its weights name other layers than this network's"
    wrong = [k for k, v in expected.items() if not isinstance(weights[k], torch.Tensor) or weights[k].shape != v.shape]
    if wrong:
        return f"weight {wrong[0]} has shape {tuple(getattr(weights[wrong[0]], 'shape', ()))}, not {tuple(expected[wrong[0]].shape)}"
    return None


def _snapshot(model, optimizer, scheduler, scaler) -> dict:
    """Copies of everything :func:`_load` changes, to undo a load that fails half-way."""
    return copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "rng": _rng_states(),
                          "scaler": scaler.state_dict() if scaler is not None else None})


def _load(saved: dict, model, optimizer, scheduler, scaler) -> None:
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    _restore_rng(saved["rng"])


def resume(directory: Path | None, *, restart: bool, run_fingerprint: str, model, optimizer, scheduler,
           scaler) -> tuple[TrainingState, int | None]:
    """(training state, epoch resumed from or None): a fresh state, or the newest usable
    checkpoint's, loaded into the model, optimiser, scheduler, scaler and RNGs. A
    checkpoint that is truncated, lacks a part or holds weights of another shape is
    skipped with a warning, and the one before it is used."""
    if directory is None or not directory.exists():
        return TrainingState(), None
    if restart:
        for old in directory.glob("epoch-*.pt"):
            old.unlink()
        return TrainingState(), None
    for path, saved in _loaded_checkpoints(directory):
        problem = _problem(saved, model)
        if problem is None and saved["run_fingerprint"] != run_fingerprint:
            raise TlpInputError(f"checkpoints in {directory} belong to a run with different data or settings; "
                                "rerun with --restart to discard them, or pass another --out")
        if problem is None:
            before = _snapshot(model, optimizer, scheduler, scaler)
            try:
                _load(saved, model, optimizer, scheduler, scaler)
                state = TrainingState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainingState)})
            except Exception as error:  # noqa: BLE001 - e.g. optimiser state of other parameter groups
                _load(before, model, optimizer, scheduler, scaler)
                problem = " ".join(str(error).split())[:300]
        if problem is not None:
            logger.warning("checkpoint %s cannot be resumed (%s); trying an older one", path, problem)
            continue
        logger.info("resuming from the checkpoint after epoch %d in %s", saved["epoch"], directory)
        return state, int(saved["epoch"])
    return TrainingState(), None
