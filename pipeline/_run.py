"""``tlp run``: advise, then run the recipe of the measured case, end to end.

The data set is scanned once and split once (:func:`tlp.data.split`); the planner
measures the training part only, so nothing a choice is based on ever saw the test part,
and the same parts go to the sweep (cases 1-2: three depths chosen by the case,
late-leaning for similar data, early/mid-leaning for different data) or to fine-tuning
(cases 3-4, with the case's freezing). Every option of those stages is accepted, by
name, and goes to each stage that has it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .data import as_dataset, require_classes, split
from .dataset import Dataset
from .plan import Advice, advise
from .settings import ExtractSettings, FinetuneSettings, PlanSettings, SweepSettings, route_options

__all__ = ["RunOutcome", "run", "RUN_SETTINGS"]

logger = logging.getLogger(__name__)

# The stages `run` may call, whose options it accepts.
RUN_SETTINGS = (ExtractSettings, SweepSettings, PlanSettings, FinetuneSettings)


@dataclass
class RunOutcome:
    """The advice, which stage ran, and that stage's result (SweepResult or FinetuneResult)."""

    advice: Advice
    stage: str  # "sweep" or "finetune"
    result: object
    out: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_report(self) -> dict:
        report = self.result.to_report()
        report["case"] = self.advice.case
        report["stage"] = self.stage
        report["recipe"] = {**self.advice.recipe, **report.get("recipe", {})}  # fine-tuning adds its details
        report["evidence"] = self.advice.evidence
        report["timings"] = {**report.get("timings", {}), **{k: round(v, 4) for k, v in self.timings.items()}}
        return report


def run(data, *, test=None, out: str | Path | None = None, say: Callable[[str], None] | None = None,
        **options) -> RunOutcome:
    """Advise on the training part of ``data``, then sweep (cases 1-2) or fine-tune (cases 3-4).

    Parameters
    ----------
    data : Dataset, str or path
        A folder, CSV manifest, built-in name or scanned Dataset.
    test : float, int, Dataset, str or path, optional
        The test part (see :func:`tlp.data.split`), held out before anything is measured.
    out : path, optional
        Folder for the stage's outputs (plots, results, the saved model; checkpoints).
    say : callable, optional
        Called with the advice's summary before the stage runs (the CLI prints it).
    **options
        Any field of ExtractSettings, SweepSettings, PlanSettings or FinetuneSettings
        (``image_size=64``, ``heads=["softmax"]``, ``hflip=False``, ``epochs=3``, ...).
        ``layers`` and ``case`` default to the measured case's.
    """
    started = time.perf_counter()
    routed = route_options(options, RUN_SETTINGS, "run()")
    extraction = ExtractSettings(**{"pool": "auto", **routed[ExtractSettings]}).validated()
    sweeping = SweepSettings(**routed[SweepSettings]).validated()
    planning = PlanSettings(**routed[PlanSettings])
    seed = sweeping.seed  # one seed for every stage: route_options gave each the same value
    dataset = as_dataset(data, on_error=extraction.on_error, max_pixels=extraction.max_pixels)
    training, test_part = split(dataset, test, seed, on_error=extraction.on_error, max_pixels=extraction.max_pixels)
    require_classes(training)
    advice = advise(training, extraction, planning, data_name=None if isinstance(data, Dataset) else str(data))
    timings = {"advise_seconds": time.perf_counter() - started}
    if say is not None:
        say(advice.summary())
    mark = time.perf_counter()
    if advice.recipe["stage"] == "sweep":
        from ._sweep import sweep

        layers = extraction.layers if "layers" in routed[ExtractSettings] else tuple(advice.recipe["layers"])
        logger.info("sweeping %s heads over %s", ", ".join(sweeping.heads), ", ".join(layers))
        result = sweep(training, sweeping, test=test_part, out=out,
                       extraction=dataclasses.replace(extraction, layers=layers))
        stage = "sweep"
    else:
        from .finetuning.stage import finetune

        fields = {"case": str(advice.case), **routed[FinetuneSettings]}
        if fields["case"] == "auto":
            fields["case"] = str(advice.case)
        result = finetune(training, FinetuneSettings(**fields), test=test_part, out=out)
        stage = "finetune"
    timings[f"{stage}_stage_seconds"] = time.perf_counter() - mark
    timings["run_seconds"] = time.perf_counter() - started
    return RunOutcome(advice=advice, stage=stage, result=result, out=Path(out) if out is not None else None,
                      timings=timings)
