"""``tlp.finetune``: the fine-tuning stage as users call it.

Cases 3 and 4 of the design: a new classifier layer sized to the classes, the rest from
the pretrained weights, the first part frozen (case 3: 70%; case 4: nothing), pretrained
layers at a smaller learning rate. This module decides the recipe (an explicit
``freeze`` wins; ``case="auto"`` asks the planner on the training part), holds out the
validation split, calls the training loop and writes the outputs.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from pathlib import Path

from ..data import as_dataset, require_classes, split, stratified_split
from ..dataset import Dataset
from ..files import write_text
from ..saved import save_finetuned
from ..settings import ExtractSettings, FinetuneSettings, PlanSettings, with_overrides
from .loop import FinetuneResult, Parts, Recipe, train
from .parallel import Ranks, data_parallel
from .surgery import CASE_FREEZE

__all__ = ["finetune", "decide_recipe", "validation_split", "write_outputs", "FinetuneResult"]


def decide_recipe(settings: FinetuneSettings, training_part: Dataset) -> Recipe:
    """The case and freeze: an explicit ``--freeze`` wins; else the case's default, where
    ``auto`` asks the planner whether the training part is similar to the source domain."""
    case = settings.case
    if case == "auto" and settings.freeze is None and not settings.from_scratch:
        from ..plan import measure_similarity

        # The planner extracts with its own (default) precision and batch size, as `tlp
        # advise` does, so both share one cache; the data and model options are the run's.
        shared = ("model", "weights", "image_size", "device", "cache_dir", "download", "on_error", "workers")
        extraction = ExtractSettings(**{name: getattr(settings, name) for name in shared})
        plan = PlanSettings(seed=settings.seed, progress=settings.progress)
        case = "3" if measure_similarity(training_part, extraction, plan)["similar"] else "4"
    if settings.from_scratch:
        return Recipe(4 if case == "auto" else int(case), 0.0)
    if settings.freeze is not None:
        return Recipe(None if case == "auto" else int(case), settings.freeze)
    return Recipe(int(case), CASE_FREEZE[case])


def _agreed_recipe(settings: FinetuneSettings, training_part: Dataset, ranks: Ranks) -> Recipe:
    """The recipe, the same on every rank: where the case is measured, rank 0 measures it
    and tells the others."""
    if ranks.world == 1 or settings.case != "auto" or settings.freeze is not None or settings.from_scratch:
        return decide_recipe(settings, training_part)
    case = ranks.broadcast(decide_recipe(settings, training_part).case if ranks.is_main else 0)
    return decide_recipe(dataclasses.replace(settings, case=str(case)), training_part)


def validation_split(training: Dataset, settings: FinetuneSettings) -> tuple[list[int], list[int]]:
    """The training part's train and validation positions: a stratified, seeded ``val``
    fraction held out (``tlp run`` scores its frozen candidates on the same positions)."""
    if settings.val <= 0:
        return list(range(len(training.items))), []
    kept, held = stratified_split(training.labels, settings.val, settings.seed, "val")
    return kept.tolist(), held.tolist()


def _parts(training: Dataset, test: Dataset | None, settings: FinetuneSettings) -> Parts:
    """The training part's train/validation positions with the test part beside them."""
    return Parts(training, *validation_split(training, settings), test)


def finetune(data, settings: FinetuneSettings | None = None, *, test=None, out: str | os.PathLike | None = None,
             deadline: float | None = None, **overrides) -> FinetuneResult:
    """Fine-tune ``settings.model`` on ``data``.

    Parameters
    ----------
    data : Dataset, str or path
        Training data (a folder, CSV, built-in name or scanned Dataset); a validation
        split (``settings.val``) is held out of it for early stopping and best-epoch selection.
    settings : FinetuneSettings, optional
        All options; keyword ``overrides`` replace single fields (``epochs=3``).
    test : float, int, Dataset, str or path, optional
        A fraction or count of ``data`` (stratified, seeded) or a separate data set,
        scored once with the best weights; never used for any choice.
    out : path, optional
        Folder for the weights (``model-<sha12>.pt``) and ``model.json`` that names them
        (which ``tlp predict`` reads; both replaced atomically, see :mod:`tlp.saved`),
        ``history.csv``/``history.png`` and ``checkpoints/``. With ``out``, a rerun of
        the same command resumes from the newest checkpoint (``restart=True`` discards them).
    deadline : float, optional
        A ``time.monotonic()`` value: after the first epoch, only the epochs that fit
        before it are run (see :func:`tlp.finetuning.loop.train`).

    Under ``torchrun`` (or in an ``srun`` step) each process is one rank of a
    data-parallel run (:mod:`tlp.finetuning.parallel`): ``batch_size`` is per rank, and
    rank 0 alone writes ``out``; every rank returns the result.
    """
    settings = with_overrides(settings or FinetuneSettings(), overrides, "finetune()").validated()
    dataset = as_dataset(data, on_error=settings.on_error)
    training, test_part = split(dataset, test, settings.seed, on_error=settings.on_error)
    require_classes(training)
    parts = _parts(training, test_part, settings)
    out = Path(out) if out is not None else None
    with data_parallel(settings.device) as ranks:
        recipe = _agreed_recipe(settings, training, ranks)
        result = train(parts, settings, recipe, out=out, deadline=deadline, ranks=ranks)
        if out is not None:
            result.out = out
            if ranks.is_main:
                write_outputs(out, result, settings)
            ranks.barrier()  # the outputs are there when any rank returns
    return result


def write_outputs(out: Path, result: FinetuneResult, settings: FinetuneSettings) -> None:
    """The saved model (weights and model.json, see :mod:`tlp.saved`), history.csv and history.png."""
    from ..models import resolve_model
    from ..plots import plot_history

    out.mkdir(parents=True, exist_ok=True)
    spec = resolve_model(settings.model, weights=settings.weights, image_size=settings.image_size,
                         download=settings.download)
    save_finetuned(out, result.network.state_dict(), spec={
        "model": settings.model, "weights": settings.weights, "weights_id": spec.weights_id,
        "weights_sha256": spec.weights_sha256, "image_size": settings.image_size,
        "preprocessing": spec.preprocessing.to_dict(), "precision": result.recipe["precision"],
        "classes": result.classes, "classifier": result.recipe["classifier"], "from_scratch": settings.from_scratch,
        "recipe": result.recipe,
    })
    columns = ["epoch", "train_loss", "train_accuracy", "val_accuracy", "seconds", "images_per_second", "lr"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in result.history:
        writer.writerow({c: row.get(c) for c in columns})
    write_text(out / "history.csv", buffer.getvalue())
    plot_history(result.history, out / "history.png", title=f"{spec.name}: fine-tuning")
