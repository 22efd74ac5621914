"""``tlp run``'s frozen recipes: the sweep over the case's depths, then the winning row on
flip-averaged features, on features averaged over quarter turns and flips (where the data
has no up), and beside a second network. Each variant is kept when its cross-validated
accuracy (the same folds) is higher, and is skipped when its extraction, estimated from
the run's measured speed, does not fit the rest of the budget."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import time

from .dataset import Dataset
from .plan import DIFFERENT_LAYERS, PARTNERS, SIMILAR_LAYERS, Advice
from .settings import TTA_PASSES, ExtractSettings

__all__ = ["frozen_sweep", "try_flip", "try_turns", "try_partner", "extraction_estimate", "TURNS_RECIPE",
           "PARTNER_COST"]

logger = logging.getLogger(__name__)

# The candidate averaging the winning row's features over quarter turns and mirror images.
TURNS_RECIPE = "frozen, features averaged over quarter turns and flips (d4)"
# The second network's extraction costs about this many of the first's per image
# (efficientnet_lite2 at 260 px against lite0 at 224: 2.3x the multiply-adds).
PARTNER_COST = 2.5


def frozen_sweep(training, test_part, advice: Advice, extraction, sweeping, routed, tell):
    """The frozen sweep over the measured similarity's depths and their fusions."""
    from ._sweep import sweep

    similar = advice.evidence["similarity"]["similar"]
    layers = extraction.layers if "layers" in routed[ExtractSettings] else \
        tuple(SIMILAR_LAYERS if similar else DIFFERENT_LAYERS)
    logger.info("sweeping %s heads over %s", ", ".join(sweeping.heads), ", ".join(layers))
    mark = time.monotonic()
    result = sweep(training, sweeping, test=test_part, extraction=dataclasses.replace(extraction, layers=layers))
    best = result.best
    candidates = [{"recipe": "frozen", "layer": best["layer"], "head": best["head"], "params": best["params"],
                   "cv_accuracy": best["cv_accuracy"], "seconds": round(time.monotonic() - mark, 2)}]
    tell(f"  frozen: {best['head']} on {best['layer']}, CV {best['cv_accuracy']:.4f}")
    return result, candidates


def try_flip(frozen, training, test_part, advice: Advice, extraction, sweeping, candidates, deadline, tell):
    """The winning row again on flip-averaged features (one more forward pass of twice the
    images); the better cross-validated accuracy is kept: (result, its candidate entry)."""
    entry = {"recipe": "frozen, flip-averaged features"}
    estimate = extraction_estimate(advice, training, test_part, "flip")
    return _try_variant(frozen, candidates[0], training, test_part, extraction, sweeping, candidates, tell,
                        entry=entry, label="flip-averaged", layer=frozen.best["layer"], tta="flip",
                        estimate=estimate, deadline=deadline)


def try_turns(frozen, kept, training, test_part, advice: Advice, extraction, sweeping, tuning, routed, candidates,
              deadline, tell, *, finetune_follows: bool):
    """Whether the data has an up (:func:`tlp.orientation.measure_orientation`: one forward
    pass over at most 400 held-out images, turned). Where it has none and no fine-tuning
    follows, the winning row again on features averaged over the square's eight symmetries
    (eight forward passes per image), kept when its cross-validated accuracy is higher.
    Where fine-tuning follows, the budget goes to training on turned crops instead (on
    EuroSAT, the fused flip row already matched the d4 row, while turned crops lifted the
    fine-tuned network). Returns (the measurement or None, result, its candidate entry)."""
    from .orientation import measure_orientation

    entry = {"recipe": TURNS_RECIPE, "layer": frozen.best["layer"], "head": frozen.best["head"], "tta": "d4"}
    reason = "--no-hflip: the data has a handedness" if not tuning.hflip else \
        "--tta given" if "tta" in routed[ExtractSettings] else None
    if reason is None and time.monotonic() >= deadline:
        reason = "--budget is spent"
    if reason is not None:
        candidates.append({**entry, "skipped": reason})
        return None, frozen, kept
    orientation = measure_orientation(training, extraction, seed=sweeping.seed)
    tell(f"  orientation: {orientation['why']}")
    if orientation["has_up"] is not False or finetune_follows:
        reason = orientation["why"] if orientation["has_up"] is not False else \
            "fine-tuning follows: it trains on quarter-turned crops instead (--rotate)"
        candidates.append({**entry, "orientation": orientation, "skipped": reason})
        return orientation, frozen, kept
    estimate = extraction_estimate(advice, training, test_part, "d4")
    frozen, kept = _try_variant(frozen, kept, training, test_part, extraction, sweeping, candidates, tell,
                                entry={"recipe": TURNS_RECIPE, "orientation": orientation},
                                label="turn- and flip-averaged", layer=frozen.best["layer"], tta="d4",
                                estimate=estimate, deadline=deadline)
    return orientation, frozen, kept


def try_partner(frozen, kept, training, test_part, advice: Advice, extraction, sweeping, candidates, deadline,
                 tell):
    """The winning row with the same depths of a second network beside it
    (:data:`tlp.plan.PARTNERS`, when installed and the row is made of presets): kept when
    its cross-validated accuracy is higher. Returns (result, its candidate entry)."""
    from .layers import PRESETS
    from .models import EMBEDDED

    partner = PARTNERS.get(extraction.model) if extraction.weights is None else None
    parts = frozen.best["layer"].split("+")
    entry = {"recipe": "frozen, fused with a second network", "network": partner}
    if partner is None or importlib.util.find_spec(EMBEDDED[partner].module) is None:
        candidates.append({**entry, "skipped": f"no second network for {extraction.model} is installed "
                                               "(pip install tlp[models])"})
        return frozen, kept
    if not all(part in PRESETS for part in parts):
        candidates.append({**entry, "skipped": f"{frozen.best['layer']} names graph nodes of {extraction.model}"})
        return frozen, kept
    tta, estimate = _partner_tta(frozen.inputs.tta, advice, training, test_part, deadline)
    return _try_variant(frozen, kept, training, test_part, extraction, sweeping, candidates, tell, entry=entry,
                        label=f"with {partner}", layer="+".join(parts + [f"{partner}:{part}" for part in parts]),
                        tta=tta, estimate=estimate, deadline=deadline)


def _partner_tta(tta: str, advice: Advice, training, test_part, deadline: float) -> tuple[str, float | None]:
    """(TTA, estimated seconds) of the second network's extraction: the winner's, or flip
    when the winner's d4 (eight passes of the bigger network) would not fit the budget
    while flip would: a fused row on flip features beat the d4 row on EuroSAT."""
    estimate = extraction_estimate(advice, training, test_part, tta, PARTNER_COST)
    if tta == "d4" and time.monotonic() + (estimate or 0.0) > deadline:
        return "flip", extraction_estimate(advice, training, test_part, "flip", PARTNER_COST)
    return tta, estimate


def _try_variant(frozen, kept, training, test_part, extraction, sweeping, candidates, tell, *, entry: dict,
                 label: str, layer: str, tta: str, estimate: float | None, deadline: float):
    """The frozen winner's head swept again on other features (``layer`` with ``tta``),
    if their extraction (``estimate`` seconds) fits before ``deadline``; kept when its
    cross-validated accuracy is higher (the same folds). Returns (result, its entry)."""
    from ._sweep import sweep

    head = frozen.best["head"]
    entry = {**entry, "layer": layer, "head": head, "tta": tta}
    if time.monotonic() + (estimate or 0.0) > deadline:
        candidates.append({**entry, "skipped": f"its extraction (about {estimate or 0:.0f} s) does not fit the rest "
                                               "of --budget"})
        tell(f"  {label}: skipped ({candidates[-1]['skipped']})")
        return frozen, kept
    mark = time.monotonic()
    result = sweep(training, dataclasses.replace(sweeping, heads=(head,)), test=test_part,
                   extraction=dataclasses.replace(extraction, layers=(layer,), tta=tta))
    won = result.best["cv_accuracy"] > frozen.best["cv_accuracy"]
    candidates.append({**entry, "params": result.best["params"], "cv_accuracy": result.best["cv_accuracy"],
                       "seconds": round(time.monotonic() - mark, 2), "kept": won})
    tell(f"  {label}: {head} on {layer}, CV {result.best['cv_accuracy']:.4f} -> {'kept' if won else 'not kept'}")
    return (result, candidates[-1]) if won else (frozen, kept)


def extraction_estimate(advice: Advice, training: Dataset, test_part, tta: str,
                        network_cost: float = 1.0) -> float | None:
    """Seconds to extract both parts with ``tta`` (:data:`tlp.settings.TTA_PASSES` forward
    passes per image) on a network ``network_cost`` times the planner's, at the planner's
    measured speed (None when its rows all came from the cache and nothing was timed)."""
    speed = advice.evidence["similarity"].get("extraction", {}).get("images_per_second")
    n_images = len(training.items) + (len(test_part.items) if test_part is not None else 0)
    return network_cost * TTA_PASSES[tta] * n_images / speed if speed else None
