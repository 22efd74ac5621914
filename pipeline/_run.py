"""``tlp run``: advise, then measure which recipe pays on the training part, within a budget.

The data set is scanned once and split once (:func:`tlp.data.split`); nothing a choice is
based on ever sees the test part. The steps:

1. **advise** on the training part: size and similarity, hence the case (:mod:`tlp.plan`);
2. **frozen sweep**, always: heads over the case's depths and their fusions
   (``mid+late``...), selected by cross-validation. It is cheap, and it is the evidence
   every other recipe must beat;
3. **flip-averaged features** for the winning row, unless the user said the data has a
   handedness (``--no-hflip``): kept when their cross-validated accuracy is higher;
4. **orientation** (:mod:`tlp.orientation`): held-out images scored upright and a quarter
   turn away; where the turn costs nothing (no up: satellite tiles, microscopy), the
   winning row on features averaged over quarter turns and flips (``--tta d4``), kept when
   its cross-validated accuracy is higher, and fine-tuning trains on turned crops too
   (``--rotate``, unless the user set it);
5. **a second network** (:data:`tlp.plan.PARTNERS`, if installed): the winning row's
   depths of both networks side by side, kept when its cross-validated accuracy is higher;
6. **fine-tuning**, when the data is not small (median >= ``--finetune-per-class``, 100),
   the frozen winner leaves room (CV below :data:`ROOM`) and a first estimate says at
   least :data:`MIN_EPOCHS` epochs fit the rest of ``--budget``: the recipe of the
   measured case (:func:`tlp.plan.finetune_candidate`; small, different data trains the
   whole network when all its epochs are estimated to fit, else the first third stays
   frozen), stopped at the epoch that would end past the budget. The frozen winner is
   refit on the same training positions and scored on the same validation images as the
   fine-tuned network;
7. **the average** of the two's class probabilities (:mod:`tlp.ensemble`), kept unless
   the validation images show a member clearly ahead of the other or of the average
   (those images chose the fine-tuned epoch, which flatters it: see
   :func:`tlp.ensemble.compare`); with ``--no-ensemble`` the higher validation accuracy
   wins (the frozen winner on a tie).

The report's ``evidence.candidates`` lists every recipe tried or skipped, with its
validation score and seconds; ``recipe.why`` says why the winner won.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ._frozen import TURNS_RECIPE, frozen_sweep, try_flip, try_partner, try_turns
from .data import as_dataset, require_classes, split
from .dataset import Dataset
from .plan import Advice, advise, finetune_candidate
from .settings import ExtractSettings, FinetuneSettings, PlanSettings, SweepSettings, route_options

__all__ = ["RunOutcome", "run", "RUN_SETTINGS", "ROOM", "MIN_EPOCHS", "TRAIN_STEP_COST", "WHOLE_NETWORK_COST"]

logger = logging.getLogger(__name__)

# The stages `run` may call, whose options it accepts.
RUN_SETTINGS = (ExtractSettings, SweepSettings, PlanSettings, FinetuneSettings)
# A frozen winner at or above this CV accuracy leaves no room worth a fine-tuning run.
ROOM = 0.995
# Fine-tuning is started only if this many epochs are estimated to fit the budget.
MIN_EPOCHS = 3
# A training step (forward, backward, update) costs about this many forward passes per
# image with the first third or more frozen (the rule of thumb for CNNs; measured
# 2.5-3.5x with efficientnet_lite0 on 2 cores) ...
TRAIN_STEP_COST = 3.0
# ... and training the whole network this many times that: the backward pass then runs
# through the early, high-resolution layers too (sign digits, lite0 at 224 px: about 53
# against 34 s per epoch).
WHOLE_NETWORK_COST = 1.6
# What follows the last fine-tuning epoch, reserved from its deadline: the network scores
# the test part (fp32 on a CPU: about this many extraction passes per image) ...
TEST_SCORING_COST = 2.0
# ... and the frozen winner is refit and scored, the outputs saved (EuroSAT: 2.6 s).
SETTLE_SECONDS = 5.0
# The candidate averaging the frozen winner's and the fine-tuned network's probabilities.
ENSEMBLE_RECIPE = "average of the frozen winner and the fine-tuned network"


@dataclass
class RunOutcome:
    """The advice, which stage's result won, that result, and every candidate measured."""

    advice: Advice
    stage: str  # "sweep", "finetune" or "ensemble": the winner's
    result: object  # SweepResult, FinetuneResult or EnsembleResult
    out: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    candidates: list[dict] = field(default_factory=list)  # every recipe tried or skipped
    why: str = ""
    frozen: object = None  # the frozen sweep's result (also when fine-tuning won)

    def to_report(self) -> dict:
        report = self.result.to_report()
        report["case"] = self.advice.case
        report["stage"] = self.stage
        report["recipe"] = {**self.advice.recipe, **report.get("recipe", {}), "stage": self.stage, "why": self.why}
        report["evidence"] = {**self.advice.evidence, "candidates": self.candidates}
        if self.stage != "sweep" and self.frozen is not None:
            report["evidence"]["frozen_sweep"] = {k: v for k, v in self.frozen.to_report().items()
                                                  if k in ("best", "results", "cv_folds", "timings")}
        report["timings"] = {**report.get("timings", {}), **{k: round(v, 4) for k, v in self.timings.items()}}
        return report


def run(data, *, test=None, out: str | Path | None = None, say: Callable[[str], None] | None = None,
        **options) -> RunOutcome:
    """Advise on the training part of ``data``, then measure the recipes that may pay.

    Parameters
    ----------
    data : Dataset, str or path
        A folder, CSV manifest, built-in name or scanned Dataset.
    test : float, int, Dataset, str or path, optional
        The test part (see :func:`tlp.data.split`), held out before anything is measured.
    out : path, optional
        Folder for the outputs (plots, results, the winner's saved model; the fine-tuning
        run's own folder under ``finetune/``).
    say : callable, optional
        Called with the advice's summary, and a line per candidate as it is measured.
    **options
        Any field of ExtractSettings, SweepSettings, PlanSettings or FinetuneSettings
        (``image_size=64``, ``heads=["softmax"]``, ``hflip=False``, ``budget=5``, ...).
        ``layers`` defaults to the measured similarity's, ``freeze`` to the case's.
    """
    started = time.monotonic()
    routed = route_options(options, RUN_SETTINGS, "run()")
    extraction = ExtractSettings(**{"pool": "auto", **routed[ExtractSettings]}).validated()
    sweeping = SweepSettings(**routed[SweepSettings]).validated()
    planning = PlanSettings(**routed[PlanSettings]).validated()
    tuning = FinetuneSettings(**routed[FinetuneSettings])
    deadline = started + planning.budget * 60
    seed = sweeping.seed  # one seed for every stage: route_options gave each the same value
    dataset = as_dataset(data, on_error=extraction.on_error, max_pixels=extraction.max_pixels)
    training, test_part = split(dataset, test, seed, on_error=extraction.on_error, max_pixels=extraction.max_pixels)
    require_classes(training)
    advice = advise(training, extraction, planning, data_name=None if isinstance(data, Dataset) else str(data))
    timings = {"advise_seconds": time.monotonic() - started}
    tell = say or (lambda _line: None)
    tell(advice.summary())

    mark = time.monotonic()
    plain, candidates = frozen_sweep(training, test_part, advice, extraction, sweeping, routed, tell)
    timings["sweep_stage_seconds"] = time.monotonic() - mark
    frozen, kept = plain, candidates[0]  # the frozen winner and its entry among the candidates
    perfect = plain.best["cv_accuracy"] >= 1.0
    if perfect:  # nothing can beat it on the training part: no more recipes are measured
        reason = "the frozen winner's CV accuracy is 1.0"
        candidates += [{"recipe": "frozen, flip-averaged features", "skipped": reason},
                       {"recipe": TURNS_RECIPE, "skipped": reason},
                       {"recipe": "frozen, fused with a second network", "skipped": reason}]
    elif tuning.hflip and "tta" not in routed[ExtractSettings]:
        why_not_flip = _why_not_flip(plain, training, test_part, advice, tuning, routed, planning, deadline)
        if why_not_flip is not None:
            candidates.append({"recipe": "frozen, flip-averaged features", "skipped": why_not_flip})
        else:
            mark = time.monotonic()
            frozen, kept = try_flip(plain, training, test_part, advice, extraction, sweeping, candidates, deadline,
                                    tell)
            timings["flip_seconds"] = time.monotonic() - mark
    else:
        candidates.append({"recipe": "frozen, flip-averaged features", "skipped":
                           "--no-hflip: the data has a handedness" if not tuning.hflip else "--tta given"})
    orientation = None
    if not perfect:
        mark = time.monotonic()
        finetune_follows = _why_not_finetune(frozen, advice, planning, tuning) is None
        orientation, frozen, kept = try_turns(frozen, kept, training, test_part, advice, extraction, sweeping,
                                              tuning, routed, candidates, deadline, tell,
                                              finetune_follows=finetune_follows)
        timings["turns_seconds"] = time.monotonic() - mark
        mark = time.monotonic()
        frozen, kept = try_partner(frozen, kept, training, test_part, advice, extraction, sweeping, candidates,
                                   deadline, tell)
        timings["second_network_seconds"] = time.monotonic() - mark
    if out is not None:
        plain.save(out)  # the whole table and its plots
        if frozen is not plain:
            frozen.save(out, tables=False)  # the flip-averaged or fused winner's saved model

    averaged = {"flip": " (flip-averaged features)", "d4": " (features averaged over quarter turns and flips)"}
    chosen_tta = averaged.get(frozen.inputs.tta, "") if "tta" not in routed[ExtractSettings] else ""
    stage, result, why = "sweep", frozen, (f"frozen {frozen.best['head']} on {frozen.best['layer']}{chosen_tta}: best "
                                           f"cross-validated accuracy {frozen.best['cv_accuracy']:.4f}")
    mark = time.monotonic()
    if orientation is not None and orientation["has_up"] is False and "rotate" not in routed[FinetuneSettings]:
        tuning = dataclasses.replace(tuning, rotate=True)  # measured: the labels survive a quarter turn
    tuned = _try_finetune(frozen, training, test_part, advice, tuning, routed, planning, candidates, deadline,
                          out, tell)
    if tuned is None:
        candidates.append({"recipe": ENSEMBLE_RECIPE, "skipped": "no fine-tuned network to average with"})
    else:
        timings["finetune_stage_seconds"] = time.monotonic() - mark
        stage, result, why = _settle(frozen, kept, tuned, training, test_part, planning, candidates, out, tell,
                                     frozen_why=why)
    timings["run_seconds"] = time.monotonic() - started
    return RunOutcome(advice=advice, stage=stage, result=result, out=Path(out) if out is not None else None,
                      timings=timings, candidates=candidates, why=why, frozen=plain)


# ----------------------------------------------------------------------------- fine-tuning
def _tuning_settings(tuning: FinetuneSettings, routed, candidate: dict, advice: Advice) -> FinetuneSettings:
    """The fine-tuning settings of the measured case and ``candidate`` recipe (the
    user's own --freeze wins)."""
    fields = dict(routed[FinetuneSettings])
    if fields.get("freeze") is None and not fields.get("from_scratch"):
        fields["freeze"] = candidate["freeze"]
    if str(fields.get("case", "auto")) == "auto" and advice.case in (3, 4):
        fields["case"] = str(advice.case)
    return dataclasses.replace(tuning, **fields).validated()


def _choose_recipe(frozen, advice: Advice, tuning, routed, n_images: int, left: float):
    """The recipe to fine-tune with, its settings and its estimated seconds per epoch:
    small, different data trains the whole network when its epochs are estimated to
    fit the ``left`` seconds, otherwise the first third stays frozen."""
    candidate = finetune_candidate(advice)
    settings = _tuning_settings(tuning, routed, candidate, advice)
    estimate = _epoch_estimate(frozen, advice, settings, n_images)
    user_choice = routed[FinetuneSettings].get("freeze") is not None or settings.from_scratch
    if candidate["kind"] != "different" or user_choice:
        return candidate, settings, estimate  # the budget decides nothing here
    fits = None if estimate is None else settings.epochs * estimate <= left
    candidate = finetune_candidate(advice, whole_network_fits=fits)
    if fits is False:
        settings = _tuning_settings(tuning, routed, candidate, advice)
        estimate = _epoch_estimate(frozen, advice, settings, n_images)
    return candidate, settings, estimate


def _why_not_finetune(frozen, advice: Advice, planning: PlanSettings, tuning: FinetuneSettings) -> str | None:
    """Why fine-tuning is not measured whatever the budget (small data, no room, no
    validation images), or None when it is, if its epochs fit."""
    median = advice.evidence["size"]["median_per_class"]
    if median < planning.finetune_per_class:
        return (f"small data: median {median:g} images per class, fine-tuning is measured from "
                f"{planning.finetune_per_class} (--finetune-per-class)")
    if frozen.best["cv_accuracy"] >= ROOM:
        return f"the frozen winner's CV accuracy {frozen.best['cv_accuracy']:.4f} leaves no room (>= {ROOM})"
    if tuning.val <= 0:
        return "--val 0: no validation images to compare the recipes on"
    return None


def _why_not_flip(frozen, training: Dataset, test_part, advice: Advice, tuning, routed, planning: PlanSettings,
                  deadline: float) -> str | None:
    """Why flip-averaged features are not measured, or None: fine-tuning follows and its
    epochs already do not all fit the budget, so the extraction passes flip would cost
    (twice the images) go to its epochs instead."""
    if _why_not_finetune(frozen, advice, planning, tuning) is not None:
        return None
    left, _, settings, estimate = _finetune_outlook(frozen, training, test_part, advice, tuning, routed, deadline)
    if estimate is None or settings.epochs * estimate <= left or MIN_EPOCHS * estimate > left:
        return None  # all its epochs fit anyway, or fine-tuning will not run: flip is measured
    return (f"fine-tuning follows, and its {settings.epochs} epochs (about {estimate:.0f} s each) already do not "
            f"all fit the {max(left, 0):.0f} s left: the budget goes to its epochs")


def _try_finetune(frozen, training: Dataset, test_part, advice: Advice, tuning, routed, planning: PlanSettings,
                  candidates, deadline, out, tell):
    """Fine-tune where it may pay and fits; (result, the frozen winner's scores on the same
    validation images, the settings it trained with, the validation positions), or None
    when skipped (the reason is in ``candidates``)."""
    from .finetuning.stage import finetune, validation_split

    left, candidate, settings, estimate = _finetune_outlook(frozen, training, test_part, advice, tuning, routed,
                                                            deadline)
    # The epochs themselves reserve the test part's scoring at their measured pace, so
    # they are given the settling time's deadline.
    deadline -= SETTLE_SECONDS
    entry = {"recipe": "fine-tune", "freeze": settings.freeze, "rotate": settings.rotate, "why": candidate["why"]}
    reason = _why_not_finetune(frozen, advice, planning, settings)
    if reason is None:
        if left <= 0:
            reason = "--budget is spent"
        elif estimate is not None and MIN_EPOCHS * estimate > left:
            reason = (f"about {estimate:.0f} s per epoch: {MIN_EPOCHS} epochs do not fit the {max(left, 0):.0f} s "
                      "left of --budget")
        entry["estimated_epoch_seconds"] = None if estimate is None else round(estimate, 1)
    if reason is not None:
        candidates.append({**entry, "skipped": reason})
        tell(f"  fine-tune: skipped ({reason})")
        return None
    mark = time.monotonic()
    result = finetune(training, settings, test=test_part, out=Path(out) / "finetune" if out is not None else None,
                      deadline=deadline)
    train_positions, val_positions = validation_split(training, settings)
    holdout = frozen.holdout_scores([training.items[i].path for i in train_positions],
                                    [training.items[i].path for i in val_positions], seed=settings.seed)
    candidates.append({**entry, "validation_accuracy": result.val_accuracy, "best_epoch": result.best_epoch,
                       "epochs_run": len(result.history), "image_size": result.recipe.get("image_size"),
                       "train_size": result.recipe.get("train_size"),
                       "seconds": round(time.monotonic() - mark, 2)})
    tell(f"  fine-tune (freeze {settings.freeze:g}): validation {result.val_accuracy:.4f}, frozen winner "
         f"{holdout.accuracy:.4f} on the same {result.n_val} images")
    return result, holdout, settings, val_positions


def _finetune_outlook(frozen, training: Dataset, test_part, advice: Advice, tuning, routed, deadline: float):
    """Fine-tuning as seen before any epoch ran: (seconds left for its epochs, the budget
    less the test part's estimated scoring and the settling; the recipe; its settings; its
    estimated seconds per epoch, or None)."""
    left = deadline - _after_training_seconds(advice, test_part) - time.monotonic()
    candidate, settings, estimate = _choose_recipe(frozen, advice, tuning, routed, len(training.items), left)
    return left, candidate, settings, estimate


def _after_training_seconds(advice: Advice, test_part) -> float:
    """Seconds reserved after the last fine-tuning epoch, so that the run ends within its
    budget: the test part's scoring (at the planner's measured speed) and the settling."""
    speed = advice.evidence["similarity"].get("extraction", {}).get("images_per_second")
    n_test = len(test_part.items) if test_part is not None else 0
    return SETTLE_SECONDS + (TEST_SCORING_COST * n_test / speed if speed else 0.0)


def _settle(frozen, kept: dict, tuned, training: Dataset, test_part, planning: PlanSettings, candidates, out,
            tell, *, frozen_why: str) -> tuple[str, object, str]:
    """(stage, result, why) once fine-tuning ran: the average of the frozen winner and the
    fine-tuned network unless a member is clearly better on the validation images (see
    :func:`tlp.ensemble.compare`); with ``--no-ensemble`` the higher validation accuracy
    (the frozen winner on a tie). The winner's saved model goes to ``out``."""
    from .ensemble import EnsembleResult, Scored, average, compare
    from .finetuning.stage import write_outputs

    tuned_result, holdout, settings, val_positions = tuned
    kept["validation_accuracy"] = holdout.accuracy
    names = {"sweep": frozen_why, "finetune": f"fine-tuning (freeze {tuned_result.recipe['freeze']:g})"}
    scores = (f"validation accuracy {tuned_result.val_accuracy:.4f} (fine-tuned) against {holdout.accuracy:.4f} "
              f"(frozen winner) on the same {tuned_result.n_val} images")
    if not planning.ensemble or tuned_result.val_probabilities is None:
        candidates.append({"recipe": ENSEMBLE_RECIPE, "skipped": "--no-ensemble" if not planning.ensemble else
                           "the fine-tuned network's validation probabilities are not known"})
        winner = "finetune" if tuned_result.val_accuracy > holdout.accuracy else "sweep"
        why = f"{names[winner]}: {scores}"
    else:
        tuned_val = Scored([training.items[i].path for i in val_positions], training.labels[val_positions],
                           tuned_result.val_probabilities, tuned_result.classes)
        comparison = compare(holdout, tuned_val)
        candidates.append({"recipe": ENSEMBLE_RECIPE, **comparison.to_report()})
        tell(f"  average of both: validation {comparison.average_accuracy:.4f} -> "
             f"{'kept' if comparison.winner == 'ensemble' else 'not kept'}")
        winner, why = comparison.winner, f"{names.get(comparison.winner, 'the average')}: {comparison.why}"
    if winner == "sweep":
        return "sweep", frozen, why
    if winner == "finetune":
        if out is not None:
            write_outputs(Path(out), tuned_result, settings)
        return "finetune", tuned_result, why
    test_accuracy, frozen_test = None, frozen.test_scores()
    if frozen_test is not None and tuned_result.test_probabilities is not None:
        tuned_test = Scored([item.path for item in test_part.items], test_part.labels,
                            tuned_result.test_probabilities, tuned_result.classes)
        test_accuracy = average([frozen_test, tuned_test]).accuracy
    result = EnsembleResult(frozen=frozen, finetuned=tuned_result, comparison=comparison, test_accuracy=test_accuracy,
                            n_test=frozen.n_test)
    if out is not None:
        _save_ensemble(Path(out), frozen, result.weights)
    return "ensemble", result, why


def _save_ensemble(out: Path, frozen, weights) -> None:
    """``out/model.json`` naming ``frozen/`` (the frozen winner, saved here) and
    ``finetune/`` (the fine-tuning run's own folder, saved by it)."""
    from .saved import save_ensemble

    frozen.save(out / "frozen", tables=False)
    save_ensemble(out, [("frozen", weights[0]), ("finetune", weights[1])])


def _epoch_estimate(frozen, advice: Advice, settings: FinetuneSettings, n_images: int) -> float | None:
    """Seconds per fine-tuning epoch, from this run's extraction speed (the planner's or
    the sweep's; None when every row came from the cache and nothing was timed):
    :data:`TRAIN_STEP_COST` forward passes per training image (times
    :data:`WHOLE_NETWORK_COST` when nothing is frozen), scaled by the pixel ratio of the
    training crop (``--train-size``, else the evaluation crop) to the extraction crop
    (measured: 34 s per epoch at 160 against 68 s at 224)."""
    measured = advice.evidence["similarity"].get("extraction", {})
    speed, crop = measured.get("images_per_second"), measured.get("crop_size")
    extracted = frozen.extract
    if extracted is not None and extracted.n_extracted and extracted.images_per_second > 0:
        speed, crop = extracted.images_per_second, _crop_of(extracted)
    if not speed:
        return None
    ratio = ((settings.train_size or settings.image_size or crop) / crop) ** 2
    whole = settings.freeze == 0 or settings.from_scratch
    cost = TRAIN_STEP_COST * (WHOLE_NETWORK_COST if whole else 1.0)
    return n_images * (1 - settings.val) * cost * ratio / speed


def _crop_of(extracted) -> int:
    from .featurefile import FeatureFile

    with FeatureFile(extracted.path) as features:
        return int(features.attrs["preprocessing"]["crop_size"])
