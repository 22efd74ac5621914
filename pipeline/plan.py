"""The planner: measure size and similarity to the source domain, pick one of the four cases.

Size is counted (images per class, against a documented threshold). Similarity is
measured on features the cache already holds (or extracts once for the sweep anyway),
by three independent signals; each casts one vote and the majority decides:

``pretrained_classifier``
    What the network's own (ImageNet) classifier makes of the target images: its mean
    top-1 probability, and how much of the target labels its top-1 class explains,
    ``1 - H(Y|Z) / H(Y)`` (the NCE of Tran et al., ICCV 2019, normalised to 0..1).
    Both must be high: low-resolution digits can get confident predictions (0.83 at
    64 px) that say little about the digit (0.23), while photos of ImageNet objects get
    predictions that determine the class (1.0).
``depth_trend``
    How a quick probe (cosine k-NN, cross-validated) changes from early/mid to late
    features. On similar data the late, most source-specific features are the best;
    on different data they fall behind the mid-level ones.
``logme``
    The LogME transferability score (You et al. 2021) of the late layer against the
    best earlier layer: the same comparison without any probe training.

The report holds every number behind the decision, so a user who disagrees can see
which signal to overrule (``tlp sweep``/``tlp finetune`` take the recipe's options).
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from dataclasses import dataclass, field

import numpy as np

from .data import as_dataset, require_classes
from .dataset import Dataset
from .errors import TlpInputError
from .settings import DEFAULT_MODEL, ExtractSettings, ModelOptions, PlanSettings, resolve_cache_dir, route_options

__all__ = ["Advice", "advise", "measure_similarity", "next_command", "finetune_candidate", "RECIPES",
           "SIMILAR_LAYERS", "DIFFERENT_LAYERS", "FINETUNE_FREEZE", "PARTNERS", "LARGE_PER_CLASS", "ADVISE_MAX_IMAGES"]

# A data set is "large" when its median class holds at least PlanSettings.large_per_class
# (500) images: from there on, fine-tuning millions of weights stops overfitting and beats
# a frozen network plus a head (the usual rule of thumb is "hundreds to thousands per
# class"). Similarity is measured on at most PlanSettings.max_images (2,000) images (a
# stratified, seeded sample): the signals are averages that settle long before, and
# advising stays cheap.
ADVISE_MAX_IMAGES = PlanSettings.max_images
LARGE_PER_CLASS = PlanSettings.large_per_class
# The pretrained classifier's thresholds. Measured with efficientnet_lite0: mean top-1
# probability 0.11 on digits at 224 px, 0.83 at 64 px, 0.48 on the `photos` set; label
# information 0.13 and 0.23 on digits, 1.0 on photos (tests/test_plan.py).
CONFIDENCE_SIMILAR = 0.35
LABEL_INFORMATION_SIMILAR = 0.5
# The late layer counts as transferring well if its probe accuracy is within this
# distance of the best earlier layer (probe accuracy on small data is noisy).
DEPTH_TOLERANCE = 0.01
PROBE_LAYERS = ("early", "mid", "late")
PROBE_K = 10

# The frozen candidates of each similarity: the case's depths, plus their fusions (free:
# the parts come from the same forward pass). On EuroSAT (5 classes, 1,600 training
# tiles; CV of a softmax head) early+mid+late reached 0.984 against mid's 0.981 and late's
# 0.966; on the built-in digits mid alone stays best (0.989 against mid+late's 0.982).
SIMILAR_LAYERS = ["mid", "late", "penultimate", "mid+late"]
DIFFERENT_LAYERS = ["early", "mid", "late", "mid+late", "early+mid+late"]
RECIPES = {
    1: {"summary": "small data, similar to the source: frozen network, late-layer features, new head",
        "command": "tlp sweep DATA --layers " + ",".join(SIMILAR_LAYERS), "stage": "sweep",
        "layers": SIMILAR_LAYERS, "arguments": ["--layers", ",".join(SIMILAR_LAYERS)]},
    2: {"summary": "small data, different from the source: frozen network, early/mid-layer features, new head",
        "command": "tlp sweep DATA --layers " + ",".join(DIFFERENT_LAYERS), "stage": "sweep",
        "layers": DIFFERENT_LAYERS, "arguments": ["--layers", ",".join(DIFFERENT_LAYERS)]},
    3: {"summary": "large data, similar: new classifier layer, pretrained start, first 70% frozen, "
                   "pretrained layers at 0.1x the learning rate",
        "command": "tlp finetune DATA --case 3", "stage": "finetune", "arguments": ["--case", "3"]},
    4: {"summary": "large data, different: new classifier layer, fine-tune the whole network "
                   "(or --from-scratch when pretrained starts do not help)",
        "command": "tlp finetune DATA --case 4", "stage": "finetune", "arguments": ["--case", "4"]},
}


# What `tlp run` fine-tunes when it measures fine-tuning against the frozen heads (the
# fraction of parameterised layers frozen): large data trains the whole network; small,
# similar data trains the last stages only (as case 3's default); small, different data
# trains the whole network too when its epochs fit the budget, and otherwise starts from
# earlier activations with the first third frozen (DESIGN.md's case-2 rule). Measured with
# `benchmarks/quality.py --oracle` (lite0, 224 px, 10 epochs): the whole network reached
# validation 0.988 on the sign digits and 0.981 on EuroSAT, the first third frozen 0.982
# and 0.975; it costs about 1.6x the time per epoch.
FINETUNE_FREEZE = {"large": 0.0, "different": 0.0, "different, budget short": 1 / 3, "similar": 0.7}


# The second network `tlp run` fuses with the first when it is installed: a larger
# sibling sees other details at its own resolution. On EuroSAT, lite0 early+mid+late
# alone reached CV 0.984 (test 0.968), with lite2's early+mid+late beside it 0.989 (0.980).
PARTNERS = {"efficientnet_lite0": "efficientnet_lite2", "efficientnet_lite1": "efficientnet_lite2",
            "efficientnet_lite2": "efficientnet_lite0"}


def finetune_candidate(advice: "Advice", whole_network_fits: bool | None = True) -> dict:
    """The fine-tuning recipe `tlp run` measures for the advised case: freeze and why.
    ``whole_network_fits`` says whether the whole network's epochs fit the budget (None:
    nothing was timed to say); it decides small, different data's recipe."""
    if advice.evidence["size"]["large"]:
        kind, why = "large", "large data: the whole network trains, pretrained layers at the smaller rate"
    elif advice.evidence["similarity"]["similar"]:
        kind, why = "similar", "small, similar data: the last stages train, the first 70% stay frozen"
    elif whole_network_fits is None:
        kind, why = "different", ("small, different data: every layer trains, pretrained layers at the smaller "
                                  "rate (nothing was timed to estimate an epoch; the budget still stops the run)")
    elif whole_network_fits:
        kind, why = "different", ("small, different data, and the whole network's epochs fit --budget: every "
                                  "layer trains, pretrained layers at the smaller rate")
    else:
        kind, why = "different, budget short", (
            "small, different data: the whole network's epochs do not fit --budget, so fine-tune from earlier "
            "activations, the first third frozen, pretrained layers at the smaller rate")
    return {"freeze": round(FINETUNE_FREEZE[kind], 4), "kind": kind, "why": why}


def next_command(case: int, data: str, options: ModelOptions) -> str:
    """The command that carries out the case's recipe on ``data`` with the user's model
    options and error policy (those that differ from the defaults), ready to paste."""
    recipe = RECIPES[case]
    words = ["tlp", "sweep" if recipe["stage"] == "sweep" else "finetune", data, *recipe["arguments"]]
    default_cache = str(resolve_cache_dir(None))
    for item in dataclasses.fields(ModelOptions):
        value = getattr(options, item.name)
        if value == item.default or item.name == "cache_dir" and value in (None, default_cache):
            continue
        flag = "--" + item.name.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    if getattr(options, "on_error", "fail") != "fail":
        words += ["--on-error", options.on_error]
    return " ".join(shlex.quote(word) for word in words)


@dataclass
class Advice:
    """The case, its recipe, and the measurements behind them."""

    case: int
    recipe: dict
    evidence: dict = field(default_factory=dict)
    model: str = DEFAULT_MODEL
    command: str = ""  # the recipe as a command on the user's data, with their options

    def to_report(self) -> dict:
        return {"case": self.case, "recipe": self.recipe, "evidence": self.evidence, "model": self.model,
                "command": self.command}

    def summary(self) -> str:
        size, similarity = self.evidence["size"], self.evidence["similarity"]
        lines = [
            f"case {self.case}: {self.recipe['summary']}",
            f"  size: {size['n_images']} images in {size['n_classes']} classes, median {size['median_per_class']:g} "
            f"per class -> {'large' if size['large'] else 'small'} (large from {size['large_per_class']} per class)",
            f"  similarity ({similarity['n_images']} images): {'similar' if similarity['similar'] else 'different'} "
            f"({similarity['votes_similar']} of {len(similarity['votes'])} signals say similar)",
        ]
        signals = similarity["signals"]
        if "pretrained_classifier" in signals:
            c = signals["pretrained_classifier"]
            lines.append(f"    pretrained classifier: mean top-1 probability {c['mean_top1_probability']:.3f} "
                         f"(similar from {CONFIDENCE_SIMILAR}), its classes explain {c['label_information']:.2f} "
                         f"of the labels (similar from {LABEL_INFORMATION_SIMILAR}) -> {_word(c['similar'])}")
        d = signals["depth_trend"]
        accs = ", ".join(f"{layer} {acc:.3f}" for layer, acc in d["probe_accuracy"].items())
        lines.append(f"    k-NN probe accuracy by depth: {accs} -> {_word(d['similar'])}")
        lm = signals["logme"]
        scores = ", ".join(f"{layer} {score:.3f}" for layer, score in lm["scores"].items())
        lines.append(f"    LogME by depth: {scores} -> {_word(lm['similar'])}")
        lines.append(f"  next: {self.command or self.recipe['command']}")
        return "\n".join(lines)


def _word(similar: bool) -> str:
    return "similar" if similar else "different"


def _size_evidence(dataset: Dataset, large_per_class: int) -> dict:
    counts = np.bincount([item.label for item in dataset.items], minlength=len(dataset.classes))
    median = float(np.median(counts))
    return {"n_images": int(counts.sum()), "n_classes": len(dataset.classes), "min_per_class": int(counts.min()),
            "median_per_class": median, "large_per_class": large_per_class, "large": bool(median >= large_per_class)}


def _sample(dataset: Dataset, limit: int, seed: int) -> Dataset:
    """A stratified, seeded subset of at most ``limit`` items (the data set itself if smaller)."""
    if len(dataset.items) <= limit:
        return dataset
    from sklearn.model_selection import train_test_split

    labels = [item.label for item in dataset.items]
    keep, _ = train_test_split(np.arange(len(labels)), train_size=limit, stratify=labels, random_state=seed)
    return dataset.subset(sorted(keep), f"{dataset.name} (sample of {limit})")


def _probe_accuracy(X: np.ndarray, y: np.ndarray, seed: int) -> float:
    """Cross-validated accuracy of cosine k-NN: cheap, and a strong transferability
    signal in large studies (arXiv 2503.18528)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    from .heads import make_head

    smallest = int(np.bincount(y)[np.unique(y)].min())
    folds = max(2, min(5, smallest))
    if smallest < 2:
        raise TlpInputError("a class has fewer than 2 images; similarity probes need at least 2 per class")
    k = max(1, min(PROBE_K, smallest - 1))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(make_head("knn", {"k": k}), X, y, cv=splitter).mean())


def _settings(options, plan, overrides, where: str) -> tuple[ExtractSettings, PlanSettings]:
    """How the planner extracts (the model options of ``options``, and its extraction
    options if it is an ExtractSettings) and measures, with keyword overrides routed by name."""
    routed = route_options(overrides, (ExtractSettings, PlanSettings), where)
    if not isinstance(options, ExtractSettings):
        base = options if options is not None else ModelOptions()
        options = ExtractSettings(**{f.name: getattr(base, f.name) for f in dataclasses.fields(ModelOptions)})
    plan = dataclasses.replace(plan or PlanSettings(), **routed[PlanSettings]).validated()
    # The planner's own taps; penultimate rides along (same forward pass) so that case 1's
    # sweep finds it cached. Every registered family names its logits node, so the
    # classifier's output is always there.
    fixed = {"layers": PROBE_LAYERS + ("penultimate", "logits"), "pool": "auto", "progress": plan.progress}
    return dataclasses.replace(options, **{**routed[ExtractSettings], **fixed}).validated(), plan


def measure_similarity(data, options: ModelOptions | None = None, plan: PlanSettings | None = None,
                       **overrides) -> dict:
    """The three similarity signals on (a sample of) ``data`` and their majority vote.

    ``options`` holds the model options (any ModelOptions: a FinetuneSettings too; an
    ExtractSettings also gives its batch size, workers and error policy); keyword
    ``overrides`` set single fields of ExtractSettings or PlanSettings.
    """
    from tqdm.auto import tqdm

    from ._extract import extract
    from .featurefile import FeatureFile
    from .transferability import logme

    extraction, plan = _settings(options, plan, overrides, "measure_similarity()")
    dataset = require_classes(as_dataset(data, on_error=extraction.on_error, max_pixels=extraction.max_pixels))
    sample = _sample(dataset, plan.max_images, plan.seed)
    result = extract(sample, dataclasses.replace(extraction, shard=None))  # every row: a shard's part is not enough
    with FeatureFile(result.path) as features:
        y = features.labels
        X = {name: features.load(name) for name in features.layers}
        crop = features.attrs["preprocessing"]["crop_size"]
    signals = {}
    if X["logits"].shape[1] >= 2:
        signals["pretrained_classifier"] = _classifier_signal(X["logits"], y)
    probes = tqdm(total=2 * len(PROBE_LAYERS), desc="similarity probes", unit="probe", file=sys.stderr,
                  disable=not plan.progress, leave=False)
    with probes:
        accuracy, evidence = {}, {}
        for layer in PROBE_LAYERS:
            accuracy[layer] = _probe_accuracy(X[layer], y, plan.seed)
            probes.update()
            evidence[layer] = logme(X[layer], y)
            probes.update()
    signals["depth_trend"] = _depth_signal(accuracy)
    signals["logme"] = _logme_signal(evidence)
    votes = {name: bool(signal["similar"]) for name, signal in signals.items()}
    votes_similar = int(sum(votes.values()))
    timed = {"images_per_second": round(result.images_per_second, 2), "crop_size": int(crop)} \
        if result.n_extracted else {}
    return {"n_images": len(sample.items), "signals": signals, "votes": votes, "votes_similar": votes_similar,
            "similar": bool(votes_similar * 2 > len(votes)), "cache_key": result.key, "extraction": timed}


def _entropy(labels: np.ndarray) -> float:
    shares = np.bincount(labels) / len(labels)
    shares = shares[shares > 0]
    return float(-(shares * np.log(shares)).sum())


def _classifier_signal(logits: np.ndarray, labels: np.ndarray) -> dict:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    top1 = probabilities.max(axis=1)
    source_class = probabilities.argmax(axis=1)
    # H(Y | Z): the label entropy left once the network's top-1 class Z is known.
    conditional = sum((source_class == z).mean() * _entropy(labels[source_class == z])
                      for z in np.unique(source_class))
    information = 1.0 - conditional / max(_entropy(labels), 1e-12)
    mean = float(top1.mean())
    return {"mean_top1_probability": round(mean, 4), "median_top1_probability": round(float(np.median(top1)), 4),
            "label_information": round(float(information), 4),
            "n_distinct_source_classes": int(len(np.unique(source_class))),
            "thresholds": {"mean_top1_probability": CONFIDENCE_SIMILAR, "label_information": LABEL_INFORMATION_SIMILAR},
            "similar": bool(mean >= CONFIDENCE_SIMILAR and information >= LABEL_INFORMATION_SIMILAR)}


def _depth_signal(accuracy: dict[str, float]) -> dict:
    best_earlier = max(accuracy["early"], accuracy["mid"])
    gap = accuracy["late"] - best_earlier
    return {"probe": f"cosine {PROBE_K}-NN, cross-validated",
            "probe_accuracy": {k: round(v, 4) for k, v in accuracy.items()},
            "late_minus_best_earlier": round(gap, 4), "tolerance": DEPTH_TOLERANCE,
            "similar": bool(gap >= -DEPTH_TOLERANCE)}


def _logme_signal(scores: dict[str, float]) -> dict:
    gap = scores["late"] - max(scores["early"], scores["mid"])
    return {"scores": {k: round(float(v), 4) for k, v in scores.items()},
            "late_minus_best_earlier": round(float(gap), 4), "similar": bool(gap >= 0.0)}


def advise(data, options: ModelOptions | None = None, plan: PlanSettings | None = None, *,
           data_name: str | None = None, **overrides) -> Advice:
    """Decide the case for ``data`` (a Dataset, folder, CSV or built-in name).

    ``options`` (model, weights, image size, ...) and ``plan`` (size threshold, sample
    size, seed) may be given as objects or as keyword ``overrides``. ``data_name`` is how
    the printed next command names the data (default: the data set's own name).
    """
    extraction, plan = _settings(options, plan, overrides, "advise()")
    dataset = require_classes(as_dataset(data, on_error=extraction.on_error, max_pixels=extraction.max_pixels))
    size = _size_evidence(dataset, plan.large_per_class)
    similarity = measure_similarity(dataset, extraction, plan)
    case = (3 if similarity["similar"] else 4) if size["large"] else (1 if similarity["similar"] else 2)
    recipe = {"case": case, **{k: v for k, v in RECIPES[case].items() if k != "arguments"}}
    return Advice(case=case, recipe=recipe, evidence={"size": size, "similarity": similarity},
                  model=extraction.model, command=next_command(case, data_name or dataset.name, extraction))
