"""The training loop: AdamW with a smaller rate for pretrained layers, warm-up + cosine,
label smoothing, evaluation through the one forward path, checkpoints after every epoch.

:func:`train` is the training code proper: it gets the data parts and a decided recipe
(the case is the caller's business: ``tlp.finetune``, ``tlp run`` or the command line)
and returns a :class:`FinetuneResult`.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..dataset import Dataset
from ..device import autocast, default_workers, image_threads, resolve_device, resolve_precision, tune_cpu_allocator
from ..errors import TlpInputError
from ..files import fingerprint, remove_orphans
from ..forward import Forward
from ..models import resolve_model
from ..preprocess import normalize
from ..settings import FinetuneSettings, key_entries
from .augment import DecodedImages, dropout_seed, global_batches, training_batches, training_crop
from .parallel import Ranks, synced_norms, wrap_data_parallel
from .state import CHECKPOINT_DIR, resume, save_checkpoint
from .surgery import Network, prepare_network

__all__ = ["Parts", "Recipe", "FinetuneResult", "train", "training_precision"]

logger = logging.getLogger(__name__)


@dataclass
class Parts:
    """The data of one run: the training part, its train/validation positions, the test part."""

    dataset: Dataset  # the training part; ``train`` and ``val`` index its items
    train: list[int]
    val: list[int]
    test: Dataset | None = None  # scored once with the best weights, never used for a choice


@dataclass(frozen=True)
class Recipe:
    """What the caller decided: the case (None when ``--freeze`` overrides it) and the freeze."""

    case: int | None
    freeze: float | str


@dataclass
class FinetuneResult:
    model: str
    case: int | None
    classes: list[str]
    n_train: int
    n_val: int
    n_test: int
    recipe: dict  # freeze, frozen layer count, from_scratch, learning rates, ...
    history: list[dict]
    best_epoch: int
    val_accuracy: float | None
    test_accuracy: float | None
    resumed_from_epoch: int | None
    timings: dict[str, float] = field(default_factory=dict)
    out: Path | None = None
    network: nn.Module | None = field(default=None, repr=False)  # the best weights, in eval mode
    rank: int = 0  # this process's rank in a data-parallel run (rank 0 writes the outputs)
    # Class probabilities of the best weights (rows: the validation positions, the test
    # part's items, in order), for averaging with other models; None in a data-parallel run.
    val_probabilities: np.ndarray | None = field(default=None, repr=False)
    test_probabilities: np.ndarray | None = field(default=None, repr=False)

    def to_report(self) -> dict:
        params = {k: self.recipe[k] for k in ("freeze", "from_scratch", "lr", "backbone_lr_mult", "epochs")}
        row = {"layer": "all" if not self.recipe["n_frozen_layers"] else f"after {self.recipe['freeze']}",
               "head": "finetune", "params": params, "cv_accuracy": self.val_accuracy,
               "test_accuracy": self.test_accuracy, "fit_seconds": round(self.timings.get("train_seconds", 0.0), 3)}
        return {
            "case": self.case, "model": self.model, "n_train": self.n_train, "n_val": self.n_val,
            "n_test": self.n_test, "best": {**row, "epoch": self.best_epoch}, "results": [row],
            "recipe": self.recipe, "history": self.history, "resumed_from_epoch": self.resumed_from_epoch,
            "timings": {k: round(v, 4) for k, v in self.timings.items()}, "classes": self.classes,
        }


def training_precision(name: str, device: torch.device) -> str:
    """``auto`` is fp32 on a CPU even where inference runs bf16: measured here (2 cores with
    AMX, efficientnet_lite0 at 128 px, batch 16), a bf16-autocast training step ran at
    22-30 img/s against 37-46 in fp32 (channels_last), as the backward pass gains nothing
    and pays for the casts. On CUDA ``auto`` is bf16 or fp16 as for inference."""
    precision = "fp32" if name == "auto" and device.type == "cpu" else resolve_precision(name, device)
    if precision == "fp16" and device.type == "cpu":
        raise TlpInputError("--precision fp16 is not supported for training on a CPU; use bf16 or fp32")
    return precision


def _optimizer(network: Network, settings: FinetuneSettings) -> torch.optim.Optimizer:
    """AdamW with two groups: the new classifier at ``lr``, trainable pretrained layers
    at ``lr * backbone_lr_mult`` (from scratch, every layer is new: one rate)."""
    head, body = [], []
    for name, parameter in network.model.named_parameters():
        if parameter.requires_grad:
            (head if name.startswith(network.classifier + ".") else body).append(parameter)
    mult = 1.0 if settings.from_scratch else settings.backbone_lr_mult
    groups = [{"params": head, "lr": settings.lr, "name": "classifier"}]
    if body:
        groups.append({"params": body, "lr": settings.lr * mult, "name": "backbone"})
    return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)


class _Schedule:
    """Linear warm-up from 1% to the full rate, then cosine decay to zero, per step.
    ``total_steps`` may be shortened after the first epoch (a time budget), and the decay
    then ends where the run will."""

    def __init__(self, total_steps: int, warmup_steps: int):
        self.total_steps, self.warmup_steps = total_steps, warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return 0.01 + 0.99 * step / max(1, self.warmup_steps)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _epochs_that_fit(deadline: float | None, epoch_seconds: float, done: int, planned: int) -> int:
    """How many epochs the run can have in all: ``planned``, or fewer when the ones left
    would end after ``deadline`` (a ``time.monotonic`` value) at the pace of the last epoch.
    Asked after every epoch, so that a first epoch slowed by one-off work (decoding the
    images it keeps) does not cut the run for good: the count may grow back."""
    if deadline is None:
        return planned
    left = int((deadline - time.monotonic()) // max(epoch_seconds, 1e-9))
    return max(done, min(planned, done + left))


# Seconds to score a test image (decoded first) as a multiple of a validation image's
# (decoded once for all epochs): measured 0.8-0.95 on the sign digits and EuroSAT
# (timings' test_seconds and val_seconds); twice that leaves room for a slower minute.
TEST_SCORING_FACTOR = 2.0


def _test_scoring_seconds(parts: Parts, validation_seconds: float) -> float:
    """Seconds the test part's scoring after the last epoch should take, at the pace the
    validation images were just scored (0 without a test part or validation images)."""
    if parts.test is None or not parts.val:
        return 0.0
    return TEST_SCORING_FACTOR * len(parts.test.items) * validation_seconds / len(parts.val)


@dataclass
class _Run:
    """Everything one epoch needs, in one place."""

    network: Network
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    images: DecodedImages
    labels: np.ndarray
    settings: FinetuneSettings
    device: torch.device
    precision: str
    pool: ThreadPoolExecutor
    ranks: Ranks
    step_model: nn.Module  # what the training step calls: the model, or DDP around it


def _step_schedule(scheduler, *, skipped_steps_expected: bool) -> None:
    """One step of the per-batch schedule, also after a step the gradient scaler skipped
    (its first steps find inf gradients while it lowers its scale): the schedule stays in
    lockstep with the batches, and torch's warning that the optimizer did not step is
    expected there, so it is not shown."""
    if not skipped_steps_expected:
        scheduler.step()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before", category=UserWarning)
        scheduler.step()


def _train_epoch(run: _Run, positions: list[int], epoch: int) -> dict:
    from tqdm.auto import tqdm

    settings, ranks = run.settings, run.ranks
    run.network.train_mode()
    # Dropout and drop-path draw from a stream of this epoch and rank: a resumed run, and
    # every rank of a parallel one, draws what an uninterrupted run would.
    torch.manual_seed(dropout_seed(settings.seed, epoch, ranks.rank))
    seen, correct, loss_sum = 0, 0, 0.0
    started = time.perf_counter()
    bar = tqdm(total=len(positions), desc=f"epoch {epoch}/{settings.epochs}", unit="img", leave=False,
               disable=not (settings.progress and ranks.is_main), dynamic_ncols=True)
    with bar:
        for pixels, targets, batch_size in training_batches(
                run.images, run.labels, positions, settings, epoch, pool=run.pool, ranks=ranks,
                workers=default_workers(settings.workers, run.device), pin_memory=run.device.type == "cuda"):
            inputs = normalize(pixels.to(run.device), run.images.prep)
            targets = targets.to(run.device)
            with autocast(run.device, run.precision):
                logits = run.step_model(inputs)
            loss = run.criterion(logits.float(), targets)
            weighted = loss * ranks.share(len(targets), batch_size)  # 1.0 in one process
            run.optimizer.zero_grad(set_to_none=True)
            if run.scaler is None:
                weighted.backward()
                run.optimizer.step()
            else:  # fp16 on CUDA: scale the loss so small gradients do not underflow
                run.scaler.scale(weighted).backward()
                run.scaler.step(run.optimizer)
                run.scaler.update()
            _step_schedule(run.scheduler, skipped_steps_expected=run.scaler is not None)
            seen += len(targets)
            loss_sum += float(loss.detach()) * len(targets)
            correct += int((logits.argmax(1) == targets).sum())
            bar.update(batch_size)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                            img_s=f"{seen * ranks.world / (time.perf_counter() - started):.1f}")
    seconds = time.perf_counter() - started
    seen, correct, loss_sum = ranks.sum([seen, correct, loss_sum])  # the whole global batch's figures
    return {"epoch": epoch, "train_loss": round(loss_sum / max(1, seen), 6),
            "train_accuracy": round(correct / max(1, seen), 6), "seconds": round(seconds, 3),
            "images_per_second": round(seen / seconds, 2) if seconds else None,
            "lr": run.scheduler.get_last_lr()[0]}


def _evaluate(run: _Run, images: DecodedImages, positions: list[int],
              labels: np.ndarray) -> tuple[float, np.ndarray | None]:
    """(accuracy, class probabilities) of the network on extraction's crops of these
    images. Each rank scores every ``world``-th image (padded batches make an image's
    scores independent of its batch-mates, so the accuracy is the one process's); the
    probabilities (rows in ``positions`` order) come back from a single process only."""
    mine = positions[run.ranks.rank::run.ranks.world]
    forward = Forward(run.network.model, images.prep, device=run.device, precision=run.precision)
    _, scores = forward.rows(lambda i: images.eval_crop(mine[i]), len(mine), batch_size=run.settings.batch_size)
    predicted = scores.argmax(1) if scores is not None else np.zeros(0, dtype=np.int64)
    correct, total = run.ranks.sum([int((predicted == labels[mine]).sum()), len(mine)])
    probabilities = None
    if run.ranks.world == 1 and scores is not None:
        probabilities = torch.softmax(torch.from_numpy(np.asarray(scores, dtype=np.float32)), dim=1).numpy()
    return (round(correct / total, 6) if total else float("nan")), probabilities


def _log_epoch(row: dict, epochs: int) -> None:
    val = f", val accuracy {row['val_accuracy']:.4f}" if "val_accuracy" in row else ""
    logger.info("epoch %d/%d: train loss %.4f, train accuracy %.4f%s, %.1f img/s", row["epoch"], epochs,
                row["train_loss"], row["train_accuracy"], val, row["images_per_second"] or 0.0)


def _steps_per_epoch(n_train: int, batch_size: int, ranks: Ranks) -> int:
    """Optimiser steps in an epoch: one per global batch that training_batches yields."""
    return max(1, sum(1 for _ in global_batches(range(n_train), batch_size, ranks)))


def _resume(ranks: Ranks, out: Path | None, settings: FinetuneSettings, run_fp: str, **trained) -> tuple:
    """(training state, epoch resumed from or None), the same on every rank: rank 0 alone
    tidies the folder (and with ``--restart`` empties it), then every rank reads the newest
    usable checkpoint; ranks that find different ones (``--out`` not on a filesystem they
    all see) are refused."""
    checkpoints = out / CHECKPOINT_DIR if out is not None else None
    if ranks.is_main:
        if out is not None:  # what killed runs left mid-write (their pid is dead)
            remove_orphans(out, ".*.tmp.*", f"{CHECKPOINT_DIR}/.*.tmp.*")
        state, resumed_from = resume(checkpoints, restart=settings.restart, run_fingerprint=run_fp, **trained)
    ranks.barrier()
    if not ranks.is_main:
        state, resumed_from = resume(checkpoints, restart=False, run_fingerprint=run_fp, **trained)
    epoch = resumed_from or 0
    if ranks.min(epoch) != ranks.max(epoch):
        raise TlpInputError(f"the ranks found different checkpoints in {checkpoints}: --out must be a folder on a "
                            "filesystem every rank sees")
    return state, resumed_from


def train(parts: Parts, settings: FinetuneSettings, recipe: Recipe, *, out: Path | None = None,
          deadline: float | None = None, ranks: Ranks | None = None) -> FinetuneResult:
    """Fine-tune on ``parts`` as ``recipe`` says, resuming from ``out/checkpoints`` when it
    holds this run's checkpoints (``settings.restart`` discards them).

    ``deadline`` (a ``time.monotonic()`` value) caps the time, the test part's scoring
    included: after each epoch, the run keeps only the epochs that still fit at that
    epoch's pace (at most ``settings.epochs``), and the learning-rate decay ends with them
    (the checkpoints keep that schedule, and a resumed run goes on with it).
    ``ranks`` (from :func:`tlp.finetuning.parallel.data_parallel`) makes this process one
    of several training together; rank 0 alone writes checkpoints and logs epochs."""
    started = time.perf_counter()
    ranks = ranks or Ranks(device=resolve_device(settings.device))
    device = ranks.device
    precision = training_precision(settings.precision, device)
    spec = resolve_model(settings.model, weights=settings.weights, image_size=settings.image_size,
                         download=settings.download)
    dataset = parts.dataset
    network = prepare_network(spec, len(dataset.classes), freeze=recipe.freeze, from_scratch=settings.from_scratch,
                              seed=settings.seed)
    tune_cpu_allocator()
    network.model.to(device=device, memory_format=torch.channels_last)
    optimizer = _optimizer(network, settings)
    steps_per_epoch = _steps_per_epoch(len(parts.train), settings.batch_size, ranks)
    schedule = _Schedule(steps_per_epoch * settings.epochs, int(round(settings.warmup_epochs * steps_per_epoch)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    # What a checkpoint must match: the key fields of the settings, resolved, and the data.
    # (and, for several ranks, their number: it sets the global batch).
    train_crop = training_crop(settings, spec.preprocessing)
    entries = key_entries(settings, {"model": spec.identity(), "precision": precision, "device": device.type,
                                     "freeze": recipe.freeze, "train_size": train_crop,
                                     **({"world": ranks.world} if ranks.world > 1 else {})})
    if train_crop == spec.preprocessing.crop_size:
        del entries["train_size"]  # training at the evaluation crop: the key of runs from before --train-size
    if not entries["rotate"]:
        del entries["rotate"]  # no quarter turns: the key of runs from before --rotate
    run_fp = fingerprint({"settings": entries, "data": dataset.identity(), "train": parts.train, "val": parts.val})
    checkpoints = out / CHECKPOINT_DIR if out is not None else None
    state, resumed_from = _resume(ranks, out, settings, run_fp, model=network.model, optimizer=optimizer,
                                  scheduler=scheduler, scaler=scaler)
    timings = {"setup_seconds": time.perf_counter() - started}

    train_started = time.perf_counter()
    with image_threads() as pool, \
            synced_norms(network.model, network.frozen_norms, ranks):
        run = _Run(network=network, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                   criterion=nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing),
                   images=DecodedImages(dataset, spec.preprocessing), labels=dataset.labels, settings=settings,
                   device=device, precision=precision, pool=pool, ranks=ranks,
                   step_model=wrap_data_parallel(network.model, ranks))
        # The epochs the schedule decays over: all of them, or those a resumed run's deadline left.
        epochs = min(settings.epochs, max(1, schedule.total_steps // steps_per_epoch))
        best_val_probabilities = None  # the best epoch's, for tlp run's average with the frozen winner
        while not state.finished and state.epoch < epochs:
            epoch_started = time.monotonic()
            row = _train_epoch(run, parts.train, state.epoch + 1)
            scoring_started = time.monotonic()
            if parts.val:
                row["val_accuracy"], val_probabilities = _evaluate(run, run.images, parts.val, run.labels)
                timings["val_seconds"] = timings.get("val_seconds", 0.0) + time.monotonic() - scoring_started
            if deadline is not None:
                # The slowest rank's pace decides, for every rank alike; the test part's
                # scoring after the last epoch is reserved at the validation's pace.
                reserve = _test_scoring_seconds(parts, time.monotonic() - scoring_started)
                fit = ranks.min(_epochs_that_fit(deadline - reserve, time.monotonic() - epoch_started,
                                                 state.epoch + 1, settings.epochs))
                if fit != epochs:
                    if ranks.is_main:
                        logger.info("time budget: %d of %d epochs fit (%.0f s per epoch)", fit, settings.epochs,
                                    time.monotonic() - epoch_started)
                    epochs = fit
                    schedule.total_steps = steps_per_epoch * epochs  # the decay ends where the run will
            state.end_epoch(row, network.model, epochs=epochs, patience=settings.patience if parts.val else None)
            if parts.val and state.best_epoch == row["epoch"]:
                best_val_probabilities = val_probabilities
            if ranks.is_main:
                _log_epoch(row, epochs)
            if checkpoints is not None and ranks.is_main:
                save_checkpoint(checkpoints, state, run_fingerprint=run_fp, model=network.model, optimizer=optimizer,
                                scheduler=scheduler, scaler=scaler)
        timings["train_seconds"] = time.perf_counter() - train_started
        network.model.load_state_dict(state.best_state)
        if parts.val and best_val_probabilities is None and ranks.world == 1:  # the best epoch ran before a resume
            _, best_val_probabilities = _evaluate(run, run.images, parts.val, run.labels)
        test_accuracy = test_probabilities = None
        if parts.test is not None:
            mark = time.perf_counter()
            test_accuracy, test_probabilities = _evaluate(run, DecodedImages(parts.test, spec.preprocessing),
                                                          list(range(len(parts.test.items))), parts.test.labels)
            timings["test_seconds"] = time.perf_counter() - mark
    timings["total_seconds"] = time.perf_counter() - started
    recipe_report = {
        "freeze": recipe.freeze, "n_frozen_layers": len(network.frozen), "n_layers": network.n_layers,
        "from_scratch": settings.from_scratch, "lr": settings.lr,
        "backbone_lr_mult": 1.0 if settings.from_scratch else settings.backbone_lr_mult, "epochs": settings.epochs,
        "batch_size": settings.batch_size, "precision": precision, "classifier": network.classifier,
        "optimizer": "AdamW", "schedule": "linear warm-up + cosine", "label_smoothing": settings.label_smoothing,
        "hflip": settings.hflip, "rotate": settings.rotate, "epochs_run": len(state.history),
        "image_size": spec.preprocessing.crop_size, "train_size": train_crop, "ranks": ranks.world,
    }
    return FinetuneResult(
        model=spec.name, case=recipe.case, classes=list(dataset.classes), n_train=len(parts.train),
        n_val=len(parts.val), n_test=len(parts.test.items) if parts.test is not None else 0, recipe=recipe_report,
        history=state.history, best_epoch=state.best_epoch, val_accuracy=state.best_val if parts.val else None,
        test_accuracy=test_accuracy, resumed_from_epoch=resumed_from, timings=timings, network=network.model.eval(),
        rank=ranks.rank, val_probabilities=best_val_probabilities, test_probabilities=test_probabilities,
    )
