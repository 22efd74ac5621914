"""``tlp run``: advise, then run the recipe of the measured case, end to end.

Cases 1-2 extract (reusing what advising cached) and sweep heads over three depths
chosen by the case (late-leaning for similar data, early/mid-leaning for different
data, always spanning enough depths to check the choice); cases 3-4 fine-tune. The
test part is held out before advising, so nothing a choice is based on ever saw it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .data import load_dataset
from .models import DEFAULT_MODEL
from .plan import LARGE_PER_CLASS, Advice, advise

__all__ = ["RunOutcome", "run"]


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


def _training_part(dataset, test, seed: int):
    """The data set without its test fraction (the same split the sweep and fine-tuning make)."""
    if not isinstance(test, (int, float)) or isinstance(test, bool):
        return dataset
    from .data import test_split

    labels = np.asarray([item.label for item in dataset.items])
    train, _ = test_split(labels, float(test), seed)
    return dataset.subset(train, f"{dataset.name} (training part)")


def run(data, *, test=None, model: str = DEFAULT_MODEL, weights=None, image_size: int | None = None,
        cache_dir: str = "cache", large_per_class: int = LARGE_PER_CLASS, precision: str = "auto", seed: int = 0,
        out: str | Path | None = None, n_jobs: int | None = None, epochs: int = 10, progress: bool = True,
        say: Callable[[str], None] | None = None) -> RunOutcome:
    """Advise on the training part of ``data``, then sweep (cases 1-2) or fine-tune (cases 3-4)."""
    started = time.perf_counter()
    dataset = load_dataset(data)
    advice = advise(_training_part(dataset, test, seed), model=model, weights=weights, image_size=image_size,
                    cache_dir=cache_dir, large_per_class=large_per_class, seed=seed, precision=precision,
                    progress=progress)
    timings = {"advise_seconds": time.perf_counter() - started}
    if say is not None:
        say(advice.summary())
    mark = time.perf_counter()
    if advice.recipe["stage"] == "sweep":
        from .sweep import sweep

        if say is not None:
            say(f"sweeping softmax, SVM, MLP and k-NN heads over {', '.join(advice.recipe['layers'])} ...")
        result = sweep(data, test=test, n_jobs=n_jobs, seed=seed, out=out, model=model, weights=weights,
                       layers=tuple(advice.recipe["layers"]), image_size=image_size, precision=precision,
                       cache_dir=cache_dir, progress=progress)
        stage = "sweep"
    else:
        from .finetune import FinetuneSettings, finetune

        settings = FinetuneSettings(model=model, weights=weights, image_size=image_size, case=str(advice.case),
                                    epochs=epochs, precision=precision, seed=seed, cache_dir=cache_dir,
                                    progress=progress)
        result = finetune(data, settings, test=test, out=out)
        stage = "finetune"
    timings[f"{stage}_stage_seconds"] = time.perf_counter() - mark
    timings["run_seconds"] = time.perf_counter() - started
    return RunOutcome(advice=advice, stage=stage, result=result, out=Path(out) if out is not None else None,
                      timings=timings)
