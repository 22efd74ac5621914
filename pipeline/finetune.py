"""The large-data stage: fine-tune a pretrained network with a new classifier layer.

Cases 3 and 4 of the design: the classifier layer is replaced by a new, randomly
initialised linear layer sized to the target classes; the rest starts from the
pretrained weights (or from random initialisation with ``from_scratch``). The first
part of the network can be frozen (by fraction of its parameterised layers, or up to a
named module): frozen BatchNorm layers stay in eval mode, so their running statistics
do not move. Pretrained layers that do train get a smaller learning rate than the new
layer (``backbone_lr_mult``, default 0.1), with a linear warm-up and a cosine decay.

Every epoch ends with an atomically written checkpoint under ``OUT/checkpoints/``
holding the model, optimiser, scheduler, early-stopping state and every RNG state.
Augmentation draws from a generator seeded by (seed, epoch, image), not from a global
stream, so rerunning the same command after a kill resumes from the last checkpoint
and, in fp32 on a CPU, ends with weights bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cache import canonical_json, temp_name, _fsync_dir
from .data import DEFAULT_MAX_PIXELS, Dataset, labels_by_class_name, load_dataset, stratified_split, test_split
from .device import autocast, resolve_device, resolve_precision, tune_cpu_allocator
from .errors import ImageDecodeError, TlpInputError
from .extract import stack_channels_last
from .images import decode_image
from .models import DEFAULT_MODEL, ModelSpec, Preprocessing, family_for, resolve_model
from .preprocess import normalize, resize_and_crop

__all__ = ["FinetuneSettings", "FinetuneResult", "finetune", "build_finetune_model", "parameterised_layers",
           "freeze_layers", "CHECKPOINT_DIR", "WEIGHTS_NAME", "SPEC_FORMAT"]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
WEIGHTS_NAME = "model.pt"
SPEC_FORMAT = "tlp-finetuned-v1"
CHECKPOINT_FORMAT = "tlp-finetune-checkpoint-v1"
CASES = ("auto", "3", "4")
# Case 3 (large, similar): freeze the first 70% of the layers, the middle of the usual
# "freeze 60-80%" starting point; case 4 (large, different): train through the whole network.
CASE_FREEZE = {"3": 0.7, "4": 0.0}
KEEP_CHECKPOINTS = 2  # the newest and the one before it, in case the newest is damaged
DECODED_MEMORY_BUDGET = 2 << 30  # bytes of decoded training images kept between epochs


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything that decides a fine-tuning run (and, bar ``progress``/``workers``, its numbers)."""

    model: str = DEFAULT_MODEL
    weights: str | None = None
    image_size: int | None = None
    case: str = "auto"  # auto (measured by the planner), 3 or 4: chooses the default freeze
    freeze: float | str | None = None  # fraction of parameterised layers, or a module name
    from_scratch: bool = False
    epochs: int = 10
    lr: float = 1e-3  # the new classifier layer's learning rate (AdamW)
    backbone_lr_mult: float = 0.1  # pretrained layers train at lr x this
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    batch_size: int = 32
    val: float = 0.1  # stratified validation fraction of the training part; 0 = none
    patience: int = 3  # stop after this many epochs without a better validation accuracy
    label_smoothing: float = 0.1
    min_scale: float = 0.35  # smallest random-resized-crop area, as a fraction of the image
    hflip: bool = True
    precision: str = "auto"
    device: str = "auto"
    workers: int | None = None  # 0: decode in threads between steps (CPU default)
    seed: int = 0
    on_error: str = "fail"
    cache_dir: str = "cache"  # where `case auto` finds (or puts) the planner's features
    progress: bool = True

    def validated(self) -> "FinetuneSettings":
        if str(self.case) not in CASES:
            raise TlpInputError(f"--case must be auto, 3 or 4, got {self.case!r}")
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.backbone_lr_mult >= 0, f"--backbone-lr-mult must be >= 0, got {self.backbone_lr_mult}"),
            (self.batch_size >= 2, f"--batch-size must be at least 2 for BatchNorm, got {self.batch_size}"),
            (0 <= self.val < 1, f"--val must be in [0, 1), got {self.val}"),
            (0 < self.min_scale <= 1, f"--min-scale must be in (0, 1], got {self.min_scale}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TlpInputError(message)
        freeze = parse_freeze(self.freeze)
        if self.from_scratch and freeze not in (None, 0.0):
            raise TlpInputError("--from-scratch trains every layer from random weights; drop --freeze")
        return dataclasses.replace(self, case=str(self.case), freeze=freeze)


def parse_freeze(value) -> float | str | None:
    """``0.7`` -> fraction, ``blocks.3`` -> module name, None -> from the case."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        fraction = float(value)
    else:
        try:
            fraction = float(value)
        except ValueError:
            return str(value)
    if not 0.0 <= fraction < 1.0:
        raise TlpInputError(f"--freeze must be a fraction in [0, 1) or a module name, got {value!r}")
    return fraction


# ----------------------------------------------------------------------------- the network
def classifier_name(spec: ModelSpec, model: nn.Module) -> str:
    """Qualified name of the module that outputs the class scores."""
    return family_for(spec.arch).logits(model)


def build_finetune_model(spec: ModelSpec, n_classes: int, *, from_scratch: bool = False, seed: int = 0) -> nn.Module:
    """The network with its classifier replaced by a new linear layer of ``n_classes`` outputs.

    Pretrained weights everywhere else (random ones with ``from_scratch``); the new
    layer's initialisation is seeded, so the same command starts from the same weights.
    """
    if from_scratch:
        model = dataclasses.replace(spec, weights_path=None, _state_mapper=None).build()
    else:
        model = spec.build()
    name = classifier_name(spec, model)
    old = model.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise TlpInputError(f"{spec.name}'s classifier {name!r} is a {type(old).__name__}, not a linear layer; "
                            "fine-tuning supports models whose last layer is nn.Linear")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = nn.Linear(old.in_features, n_classes)
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attribute, new)
    return model


def parameterised_layers(model: nn.Module, exclude: str) -> list[tuple[str, nn.Module]]:
    """Modules that hold parameters themselves (conv, norm, linear), in definition order,
    without the classifier: the units ``--freeze FRACTION`` counts."""
    return [
        (name, module) for name, module in model.named_modules()
        if any(True for _ in module.parameters(recurse=False))
        and name != exclude and not name.startswith(exclude + ".")
    ]


def freeze_layers(model: nn.Module, layers: list[tuple[str, nn.Module]], freeze) -> list[str]:
    """Set ``requires_grad=False`` on the first layers; returns their names.

    ``freeze`` is a fraction of ``layers`` (rounded down) or a module name: everything
    up to and including that module is frozen.
    """
    if isinstance(freeze, str):
        inside = [i for i, (name, _) in enumerate(layers) if name == freeze or name.startswith(freeze + ".")]
        if not inside:
            examples = ", ".join(sorted({name.split(".")[0] for name, _ in layers})[:8])
            raise TlpInputError(f"--freeze {freeze!r} names no module with parameters; use a fraction such as 0.7 "
                                f"or a module name (top-level: {examples}; see `tlp layers MODEL`)")
        count = inside[-1] + 1
    else:
        count = int(math.floor(float(freeze or 0.0) * len(layers) + 1e-9))
    for _, module in layers[:count]:
        for parameter in module.parameters(recurse=False):
            parameter.requires_grad_(False)
    return [name for name, _ in layers[:count]]


def _frozen_norms(model: nn.Module, frozen: list[str]) -> list[nn.Module]:
    names = set(frozen)
    return [module for name, module in model.named_modules()
            if name in names and isinstance(module, nn.modules.batchnorm._NormBase)]


def _train_mode(model: nn.Module, frozen_norms: list[nn.Module]) -> None:
    """Training mode, except frozen BatchNorm layers: eval mode keeps their running
    statistics fixed (``requires_grad=False`` alone does not)."""
    model.train()
    for module in frozen_norms:
        module.eval()


# ----------------------------------------------------------------------------- data
@dataclass
class _Split:
    train: list[int]
    val: list[int]
    test: list[int]


class _Images:
    """Decoded images of one data set: the training base (resize + central square) and
    the evaluation crop (exactly the extraction preprocessing). Kept in memory up to a
    budget, so later epochs skip decoding."""

    def __init__(self, dataset: Dataset, prep: Preprocessing, budget: int = DECODED_MEMORY_BUDGET):
        self.dataset, self.prep = dataset, prep
        self.base_prep = dataclasses.replace(prep, crop_size=prep.resize_size)
        self._memo: dict[tuple[str, int], torch.Tensor] = {}
        self._budget = budget

    def _decode(self, position: int):
        item = self.dataset.items[position]
        try:
            return decode_image(self.dataset.read_bytes(item), item.path, max_pixels=DEFAULT_MAX_PIXELS)
        except OSError as error:  # the file went away or became unreadable after the scan
            raise ImageDecodeError(item.path, f"cannot read file ({error})") from None

    def _get(self, kind: str, position: int) -> torch.Tensor:
        key = (kind, position)
        pixels = self._memo.get(key)
        if pixels is None:
            pixels = resize_and_crop(self._decode(position), self.base_prep if kind == "base" else self.prep)
            pixels = pixels.contiguous()
            if self._budget >= pixels.numel():
                self._budget -= pixels.numel()
                self._memo[key] = pixels
        return pixels

    def base(self, position: int) -> torch.Tensor:
        return self._get("base", position)

    def eval_crop(self, position: int) -> torch.Tensor:
        return self._get("eval", position)


def _sample_seed(seed: int, epoch: int, position: int) -> int:
    digest = hashlib.sha256(f"{seed}/{epoch}/{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def augment(base: torch.Tensor, crop_size: int, generator: torch.Generator, min_scale: float, hflip: bool) -> torch.Tensor:
    """Random resized crop (area ``min_scale``..1, aspect 3/4..4/3) and optional flip of
    a uint8 (3, R, R) image, resized to ``crop_size`` with the antialiased uint8 kernels."""
    _, height, width = base.shape
    box = (0, 0, height, width)
    for _ in range(10):
        area = height * width * (min_scale + (1 - min_scale) * torch.rand(1, generator=generator).item())
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(1, generator=generator).item()
        w = int(round(math.sqrt(area * math.exp(log_ratio))))
        h = int(round(math.sqrt(area / math.exp(log_ratio))))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            box = (top, left, h, w)
            break
    flip = hflip and torch.rand(1, generator=generator).item() < 0.5
    top, left, h, w = box
    pixels = base[:, top:top + h, left:left + w].unsqueeze(0).contiguous(memory_format=torch.channels_last)
    if (h, w) != (crop_size, crop_size):
        pixels = F.interpolate(pixels, size=(crop_size, crop_size), mode="bilinear", antialias=True, align_corners=False)
    pixels = pixels[0]
    return pixels.flip(-1) if flip else pixels


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(_sample_seed(seed, epoch, -1))
    return torch.randperm(n, generator=generator).tolist()


def _augmented(images: _Images, position: int, settings: FinetuneSettings, epoch: int) -> torch.Tensor:
    """One training image of one epoch: the same pixels in any process, in any order."""
    generator = torch.Generator().manual_seed(_sample_seed(settings.seed, epoch, position))
    return augment(images.base(position), images.prep.crop_size, generator, settings.min_scale, settings.hflip)


class _AugmentedSet(torch.utils.data.Dataset):
    """Training images of one epoch for DataLoader workers (``--workers N``)."""

    def __init__(self, images: _Images, labels: np.ndarray, settings: FinetuneSettings, epoch: int):
        self.images, self.labels, self.settings, self.epoch = images, labels, settings, epoch

    def __len__(self) -> int:
        return len(self.images.dataset.items)

    def __getitem__(self, position: int):
        return _augmented(self.images, position, self.settings, self.epoch), int(self.labels[position])


def _collate(samples):
    return stack_channels_last([s[0] for s in samples]), torch.as_tensor([s[1] for s in samples], dtype=torch.long)


def _train_batches(images: _Images, positions: list[int], labels: np.ndarray, settings: FinetuneSettings,
                   epoch: int, pool, device: torch.device):
    """(uint8 batch, labels) in a seeded shuffled order; a last batch of one is dropped
    (BatchNorm cannot train on it). Decoded in threads between steps (``workers=0``, the
    CPU default: the training step already uses every core) or by DataLoader workers."""
    order = [positions[i] for i in _epoch_order(len(positions), settings.seed, epoch)]
    workers = settings.workers
    if workers is None:
        workers = 0 if device.type == "cpu" else max(1, min(8, os.cpu_count() or 1))
    if workers:
        batches = torch.utils.data.DataLoader(
            _AugmentedSet(images, labels, settings, epoch), batch_size=settings.batch_size, sampler=order,
            num_workers=workers, collate_fn=_collate, pin_memory=device.type == "cuda")
    else:
        def sample(position: int):
            return _augmented(images, position, settings, epoch), int(labels[position])

        batches = (_collate(list(pool.map(sample, order[start:start + settings.batch_size])))
                   for start in range(0, len(order), settings.batch_size))
    for pixels, targets in batches:
        if len(targets) < 2:
            break
        yield pixels, targets


def _eval_batches(images: _Images, positions: list[int], batch_size: int, pool):
    for start in range(0, len(positions), batch_size):
        chunk = positions[start:start + batch_size]
        yield chunk, stack_channels_last(list(pool.map(images.eval_crop, chunk)))


# ----------------------------------------------------------------------------- optimisation
def _optimizer(model: nn.Module, classifier: str, settings: FinetuneSettings, pretrained: bool) -> torch.optim.Optimizer:
    """AdamW with two groups: the new classifier at ``lr``, trainable pretrained layers
    at ``lr * backbone_lr_mult`` (from scratch, every layer is new: one rate)."""
    head, body = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (head if name.startswith(classifier + ".") else body).append(parameter)
    mult = settings.backbone_lr_mult if pretrained else 1.0
    groups = [{"params": head, "lr": settings.lr, "name": "classifier"}]
    if body:
        groups.append({"params": body, "lr": settings.lr * mult, "name": "backbone"})
    return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)


def _schedule(total_steps: int, warmup_steps: int):
    """Linear warm-up from 1% to the full rate, then cosine decay to zero, per step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return 0.01 + 0.99 * step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ----------------------------------------------------------------------------- checkpoints
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


def _checkpoint_path(directory: Path, epoch: int) -> Path:
    return directory / f"epoch-{epoch:03d}.pt"


def _atomic_torch_save(obj, final: Path) -> Path:
    """Write to a temporary file, fsync, rename: a reader (or a resume) never sees half a file."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_name(final)
    try:
        with open(temp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, final)
        _fsync_dir(final.parent)
    finally:
        temp.unlink(missing_ok=True)
    return final


def _save_checkpoint(directory: Path, epoch: int, state: dict) -> Path:
    """The epoch's checkpoint, atomically; only the newest KEEP_CHECKPOINTS stay."""
    final = _atomic_torch_save(state, _checkpoint_path(directory, epoch))
    for old in sorted(directory.glob("epoch-*.pt"))[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    return final


def _latest_checkpoint(directory: Path) -> dict | None:
    """The newest checkpoint that loads (with ``weights_only=True``: no code runs)."""
    for path in sorted(directory.glob("epoch-*.pt"), reverse=True):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a damaged file: fall back to the one before
            logger.warning("checkpoint %s is unreadable (%s); trying an older one", path, error)
            continue
        if state.get("format") == CHECKPOINT_FORMAT:
            return state
    return None


# ----------------------------------------------------------------------------- result
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


# ----------------------------------------------------------------------------- the run
def _resolve_recipe(settings: FinetuneSettings, training_part: Dataset) -> tuple[int | None, float | str]:
    """(case, freeze): an explicit ``--freeze`` wins; else the case's default, where
    ``auto`` asks the planner whether the training part is similar to the source domain."""
    case = settings.case
    if case == "auto" and settings.freeze is None and not settings.from_scratch:
        from .plan import measure_similarity

        similar = measure_similarity(training_part, model=settings.model, weights=settings.weights,
                                     image_size=settings.image_size, cache_dir=settings.cache_dir,
                                     progress=settings.progress)
        case = "3" if similar["similar"] else "4"
    if settings.from_scratch:
        return (4 if case == "auto" else int(case)), 0.0
    if settings.freeze is not None:
        return (None if case == "auto" else int(case)), settings.freeze
    return int(case), CASE_FREEZE[case]


def _run_identity(settings: FinetuneSettings, spec: ModelSpec, train_ds: Dataset, split: _Split, freeze) -> dict:
    """What a checkpoint must match to be resumed: data, split, model and every setting
    that changes the numbers."""
    numeric = {k: v for k, v in dataclasses.asdict(settings).items()
               if k not in ("progress", "workers", "device", "on_error", "cache_dir", "case", "freeze")}
    return {"settings": numeric, "freeze": freeze, "model": spec.identity(), "data": train_ds.identity(),
            "train": split.train, "val": split.val}


def _training_precision(name: str, device: torch.device) -> str:
    """``auto`` is fp32 on a CPU even where inference runs bf16: measured here (2 cores with
    AMX, efficientnet_lite0 at 128 px, batch 16), a bf16-autocast training step ran at
    22-30 img/s against 37-46 in fp32 (channels_last), as the backward pass gains nothing
    and pays for the casts. On CUDA ``auto`` is bf16 or fp16 as for inference."""
    if name == "auto" and device.type == "cpu":
        return "fp32"
    return resolve_precision(name, device)


def _resume(checkpoint_dir: Path | None, restart: bool, run_fp: str, model, optimizer, scheduler, scaler):
    """(training state, epoch resumed from or None): a fresh state, or the newest
    checkpoint's, loaded into the model, optimiser, scheduler and RNGs."""
    state = {"epoch": 0, "history": [], "best_epoch": 0, "best_val": float("-inf"), "best_state": None,
             "stale_epochs": 0, "finished": False}
    if checkpoint_dir is None or not checkpoint_dir.exists():
        return state, None
    if restart:
        for old in checkpoint_dir.glob("epoch-*.pt"):
            old.unlink()
        return state, None
    saved = _latest_checkpoint(checkpoint_dir)
    if saved is None:
        return state, None
    if saved["run_fingerprint"] != run_fp:
        raise TlpInputError(f"checkpoints in {checkpoint_dir} belong to a run with different data or settings; "
                            "rerun with --restart to discard them, or pass another --out")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    _restore_rng(saved["rng"])
    logger.info("resuming from the checkpoint after epoch %d in %s", saved["epoch"], checkpoint_dir)
    return {k: saved[k] for k in state}, int(saved["epoch"])


def finetune(data, settings: FinetuneSettings | None = None, *, test=None, out: str | os.PathLike | None = None,
             restart: bool = False, **overrides) -> FinetuneResult:
    """Fine-tune ``settings.model`` on ``data`` (folder, CSV or built-in name).

    Parameters
    ----------
    data : str or path
        Training data; a validation split (``settings.val``) is held out of it for
        early stopping and best-epoch selection.
    test : float, str or path, optional
        A fraction of ``data`` (stratified, seeded) or a separate data set, scored once
        with the best weights; never used for any choice.
    out : path, optional
        Folder for ``model.pt``, ``model.json`` (which ``tlp predict`` reads),
        ``history.csv``/``history.png`` and ``checkpoints/``. With ``out``, a rerun of
        the same command resumes from the newest checkpoint.
    restart : bool
        Discard existing checkpoints in ``out`` instead of resuming.
    """
    settings = dataclasses.replace(settings or FinetuneSettings(), **overrides).validated()
    started = time.perf_counter()
    device = resolve_device(settings.device)
    precision = _training_precision(settings.precision, device)
    if precision == "fp16" and device.type == "cpu":
        raise TlpInputError("--precision fp16 is not supported for training on a CPU; use bf16 or fp32")
    spec = resolve_model(settings.model, weights=settings.weights, image_size=settings.image_size)
    dataset = load_dataset(data, on_error=settings.on_error)
    test_dataset, split = _split(dataset, test, settings)
    training_part = dataset.subset(sorted(split.train + split.val), f"{dataset.name} (training part)")
    case, freeze = _resolve_recipe(settings, training_part)
    timings = {"setup_seconds": time.perf_counter() - started}

    model = build_finetune_model(spec, len(dataset.classes), from_scratch=settings.from_scratch, seed=settings.seed)
    classifier = classifier_name(spec, model)
    layers = parameterised_layers(model, classifier)
    frozen = freeze_layers(model, layers, freeze)
    frozen_norms = _frozen_norms(model, frozen)
    tune_cpu_allocator()
    model = model.to(device=device, memory_format=torch.channels_last)
    optimizer = _optimizer(model, classifier, settings, pretrained=not settings.from_scratch)
    steps_per_epoch = max(1, len(split.train) // settings.batch_size + (len(split.train) % settings.batch_size >= 2))
    total_steps = steps_per_epoch * settings.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(total_steps, int(round(settings.warmup_epochs * steps_per_epoch))))
    recipe = {"freeze": freeze, "n_frozen_layers": len(frozen), "n_layers": len(layers),
              "from_scratch": settings.from_scratch, "lr": settings.lr,
              "backbone_lr_mult": settings.backbone_lr_mult if not settings.from_scratch else 1.0,
              "epochs": settings.epochs, "batch_size": settings.batch_size, "precision": precision,
              "classifier": classifier, "optimizer": "AdamW", "schedule": "linear warm-up + cosine",
              "label_smoothing": settings.label_smoothing}
    identity = _run_identity(settings, spec, dataset, split, freeze)
    run_fp = hashlib.sha256(canonical_json(identity).encode()).hexdigest()

    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    checkpoint_dir = Path(out) / CHECKPOINT_DIR if out is not None else None
    state, resumed_from = _resume(checkpoint_dir, restart, run_fp, model, optimizer, scheduler, scaler)

    images = _Images(dataset, spec.preprocessing)
    labels = np.asarray([item.label for item in dataset.items])
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    train_started = time.perf_counter()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        while not state["finished"] and state["epoch"] < settings.epochs:
            epoch = state["epoch"] + 1
            row = _train_epoch(model, frozen_norms, optimizer, scheduler, scaler, criterion, images, split.train, labels,
                               settings, epoch, device, precision, pool)
            if split.val:
                row["val_accuracy"] = _accuracy(model, images, split.val, labels, settings, device, precision, pool)
            _end_epoch(state, row, model, settings, early_stopping=bool(split.val))
            if checkpoint_dir is not None:
                _save_checkpoint(checkpoint_dir, epoch, {
                    "format": CHECKPOINT_FORMAT, "run_fingerprint": run_fp, **state,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": _rng_states(),
                    "scaler": scaler.state_dict() if scaler is not None else None})
        timings["train_seconds"] = time.perf_counter() - train_started

        model.load_state_dict(state["best_state"])
        test_accuracy = None
        if split.test or test_dataset is not None:
            mark = time.perf_counter()
            test_accuracy = _test_accuracy(model, images, dataset, test_dataset, split, spec, settings, device,
                                           precision, pool)
            timings["test_seconds"] = time.perf_counter() - mark
    timings["total_seconds"] = time.perf_counter() - started
    result = FinetuneResult(
        model=spec.name, case=case, classes=list(dataset.classes), n_train=len(split.train), n_val=len(split.val),
        n_test=len(split.test) if test_dataset is None else len(test_dataset.items), recipe=recipe,
        history=state["history"], best_epoch=state["best_epoch"],
        val_accuracy=state["best_val"] if split.val else None, test_accuracy=test_accuracy,
        resumed_from_epoch=resumed_from, timings=timings, out=Path(out) if out is not None else None,
        network=model.eval(),
    )
    if out is not None:
        _write_outputs(Path(out), model, spec, settings, result, precision)
    return result


def _split(dataset: Dataset, test, settings: FinetuneSettings) -> tuple[Dataset | None, _Split]:
    labels = np.asarray([item.label for item in dataset.items])
    indices = np.arange(len(labels))
    test_dataset, test_idx = None, np.arange(0)
    if isinstance(test, (int, float)) and not isinstance(test, bool):
        indices, test_idx = test_split(labels, float(test), settings.seed)
    elif test is not None:
        test_dataset = load_dataset(test, on_error=settings.on_error)
        _test_labels(dataset, test_dataset)  # an unknown class fails now, before any training
    val_idx = np.arange(0)
    if settings.val > 0:
        kept, held = stratified_split(labels[indices], settings.val, settings.seed, "val")
        indices, val_idx = indices[kept], indices[held]
    return test_dataset, _Split(train=indices.tolist(), val=val_idx.tolist(), test=test_idx.tolist())


def _train_epoch(model, frozen_norms, optimizer, scheduler, scaler, criterion, images, positions, labels, settings, epoch,
                 device, precision, pool) -> dict:
    from tqdm import tqdm

    _train_mode(model, frozen_norms)
    prep = images.prep
    seen, correct, loss_sum = 0, 0, 0.0
    started = time.perf_counter()
    bar = tqdm(total=len(positions), desc=f"epoch {epoch}/{settings.epochs}", unit="img", leave=False,
               disable=not settings.progress, dynamic_ncols=True)
    with bar:
        for pixels, targets in _train_batches(images, positions, labels, settings, epoch, pool, device):
            inputs = normalize(pixels.to(device), prep)
            targets = targets.to(device)
            with autocast(device, precision):
                logits = model(inputs)
            loss = criterion(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:  # fp16 on CUDA: scale the loss so small gradients do not underflow
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            scheduler.step()
            batch = len(targets)
            seen += batch
            loss_sum += float(loss.detach()) * batch
            correct += int((logits.argmax(1) == targets).sum())
            bar.update(batch)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                            img_s=f"{seen / (time.perf_counter() - started):.1f}")
    seconds = time.perf_counter() - started
    return {"epoch": epoch, "train_loss": round(loss_sum / max(1, seen), 6),
            "train_accuracy": round(correct / max(1, seen), 6), "seconds": round(seconds, 3),
            "images_per_second": round(seen / seconds, 2) if seconds else None,
            "lr": scheduler.get_last_lr()[0]}


def _end_epoch(state: dict, row: dict, model: nn.Module, settings: FinetuneSettings, early_stopping: bool) -> None:
    """Record the epoch; keep the best weights (by validation accuracy, or training loss
    without a validation split); decide whether training is finished."""
    state["history"].append(row)
    score = row.get("val_accuracy", -row["train_loss"])
    if score > state["best_val"]:
        state.update(best_val=score, best_epoch=row["epoch"], stale_epochs=0,
                     best_state={k: v.detach().clone() for k, v in model.state_dict().items()})
    else:
        state["stale_epochs"] += 1
    state["epoch"] = row["epoch"]
    if early_stopping and state["stale_epochs"] >= settings.patience:
        logger.info("validation accuracy has not improved for %d epochs: stopping", settings.patience)
        state["finished"] = True
    if row["epoch"] == settings.epochs:
        state["finished"] = True
    _log_epoch(row, settings.epochs)


def _predict_positions(model, images, positions, settings, device, precision, pool) -> np.ndarray:
    model.eval()
    predictions = []
    with torch.inference_mode(), autocast(device, precision):
        for _, pixels in _eval_batches(images, positions, settings.batch_size, pool):
            predictions.append(model(normalize(pixels.to(device), images.prep)).argmax(1).cpu())
    return torch.cat(predictions).numpy() if predictions else np.zeros(0, dtype=np.int64)


def _accuracy(model, images, positions, labels, settings, device, precision, pool) -> float:
    predicted = _predict_positions(model, images, positions, settings, device, precision, pool)
    return round(float((predicted == labels[positions]).mean()), 6)


def _test_accuracy(model, images, dataset, test_dataset, split, spec, settings, device, precision, pool) -> float:
    if test_dataset is None:
        labels = np.asarray([item.label for item in dataset.items])
        return _accuracy(model, images, split.test, labels, settings, device, precision, pool)
    test_labels = _test_labels(dataset, test_dataset)
    test_images = _Images(test_dataset, spec.preprocessing)
    return _accuracy(model, test_images, list(range(len(test_dataset.items))), test_labels, settings, device,
                     precision, pool)


def _test_labels(dataset: Dataset, test_dataset: Dataset) -> np.ndarray:
    """A separate test set's labels as the training data's class indices (by class name)."""
    return labels_by_class_name([item.label for item in test_dataset.items], test_dataset.classes, dataset.classes,
                                test_dataset.name)


def _log_epoch(row: dict, epochs: int) -> None:
    val = f", val accuracy {row['val_accuracy']:.4f}" if "val_accuracy" in row else ""
    logger.info("epoch %d/%d: train loss %.4f, train accuracy %.4f%s, %.1f img/s", row["epoch"], epochs,
                row["train_loss"], row["train_accuracy"], val, row["images_per_second"] or 0.0)


# ----------------------------------------------------------------------------- outputs
def _write_outputs(out: Path, model: nn.Module, spec: ModelSpec, settings: FinetuneSettings, result: FinetuneResult,
                   precision: str) -> None:
    """model.pt (state dict, ``weights_only`` loadable), model.json for ``tlp predict``,
    history.csv and history.png."""
    from .plots import plot_history
    from .predict import _sha256, _versions
    from .report import write_report

    out.mkdir(parents=True, exist_ok=True)
    weights = _atomic_torch_save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                                 out / WEIGHTS_NAME)
    write_report(out / "model.json", {
        "format": SPEC_FORMAT, "model": settings.model, "weights": settings.weights,
        "weights_id": spec.weights_id, "weights_sha256": spec.weights_sha256, "image_size": settings.image_size,
        "preprocessing": spec.preprocessing.to_dict(), "precision": precision, "classes": result.classes,
        "classifier": result.recipe["classifier"], "from_scratch": settings.from_scratch,
        "finetuned": {"file": WEIGHTS_NAME, "sha256": _sha256(weights)}, "recipe": result.recipe,
        "versions": _versions(),
    })
    with open(out / "history.csv", "w", newline="", encoding="utf-8") as handle:
        columns = ["epoch", "train_loss", "train_accuracy", "val_accuracy", "seconds", "images_per_second", "lr"]
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in result.history:
            writer.writerow({c: row.get(c) for c in columns})
    plot_history(result.history, out / "history.png", title=f"{spec.name}: fine-tuning")

