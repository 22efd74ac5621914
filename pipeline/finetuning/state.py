"""Training state and checkpoints: what a killed run needs to resume bit-identically.

After every epoch ``OUT/checkpoints/epoch-NNN.pt`` is written atomically (temporary
name, fsync, rename) with the model, optimiser, scheduler, gradient scaler, the
:class:`TrainingState` and every RNG state, all in a form ``torch.load(...,
weights_only=True)`` reads without running code. A rerun resumes from the newest
checkpoint that loads; one made by a run with other data or settings is refused.
"""

from __future__ import annotations

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


def _latest_checkpoint(directory: Path) -> dict | None:
    """The newest checkpoint that loads (with ``weights_only=True``: no code runs)."""
    for path in sorted(directory.glob("epoch-*.pt"), reverse=True):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a damaged file: fall back to the one before
            logger.warning("checkpoint %s is unreadable (%s); trying an older one", path, error)
            continue
        if saved.get("format") == CHECKPOINT_FORMAT:
            return saved
    return None


def resume(directory: Path | None, *, restart: bool, run_fingerprint: str, model, optimizer, scheduler,
           scaler) -> tuple[TrainingState, int | None]:
    """(training state, epoch resumed from or None): a fresh state, or the newest
    checkpoint's, loaded into the model, optimiser, scheduler, scaler and RNGs."""
    if directory is None or not directory.exists():
        return TrainingState(), None
    if restart:
        for old in directory.glob("epoch-*.pt"):
            old.unlink()
        return TrainingState(), None
    saved = _latest_checkpoint(directory)
    if saved is None:
        return TrainingState(), None
    if saved["run_fingerprint"] != run_fingerprint:
        raise TlpInputError(f"checkpoints in {directory} belong to a run with different data or settings; "
                            "rerun with --restart to discard them, or pass another --out")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    _restore_rng(saved["rng"])
    logger.info("resuming from the checkpoint after epoch %d in %s", saved["epoch"], directory)
    state = TrainingState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainingState)})
    return state, int(saved["epoch"])
