"""Averaging the frozen winner with the fine-tuned network: the scores, the rule, the result.

The frozen winner (a head on cached features of one or two networks) and the fine-tuned
network make different mistakes. Measured on the test parts of the two *different* real
sets (sign-language digits, EuroSAT; four fine-tuned networks each), the mean of their
class probabilities was at least as accurate as the better of the two in 8 of 8 pairs
(+0.2 to +1.0 points on digits, 0 to +0.5 on EuroSAT; see the README's quality section).

Choosing it needs care: ``tlp run`` compares recipes on the fine-tuning run's validation
images, and those same images picked the fine-tuned network's best epoch, which flatters
it. On them the average beat the fine-tuned network in 1 of the 8 pairs, tied 4 and
trailed by one image 3, while on the test parts it won or tied all 8. So "keep the
average when it scores highest on validation" would throw the gain away. The rule
(:func:`compare`) is the other way round: the average is kept unless the validation
images show it *clearly behind* the better member (McNemar's paired test, one-sided at
:data:`BEHIND_P`, and at least :data:`tlp.racing.RACE_MIN_GAP` behind); and it is not
formed when one member is clearly behind the other or more than :data:`MAX_MEMBER_GAP`
behind it, where averaging has little to gain and something to lose.

Probabilities are aligned by image path and class name, never by position alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from .racing import RACE_MIN_GAP, paired_z

__all__ = ["Scored", "Comparison", "EnsembleResult", "BEHIND_P", "MAX_MEMBER_GAP", "softmax", "head_probabilities", "average",
           "behind", "compare"]

# One-sided level at which the validation images count as showing one model behind another.
BEHIND_P = 0.05
_BEHIND_Z = NormalDist().inv_cdf(1.0 - BEHIND_P)
# The average is formed only of members this close on validation. The measured pairs were
# within 0.6 points there (1.0 on test); a member far behind gives an average between the
# two (on generated digits, 36 validation images, a network 8 points behind pulled the
# average 0.8 points below the frozen winner on test), and a small validation part cannot
# show such a gap as significant, so the cap does.
MAX_MEMBER_GAP = 0.03


def softmax(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    exp = np.exp(scores - scores.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def head_probabilities(estimator, X: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """Class probabilities of a fitted head: ``predict_proba`` where it has one, else a
    softmax of its decision values (SVMs). With ``n_classes``, column ``i`` is label ``i``
    (a class the head never saw gets 0); without, the head's own ``classes_`` order."""
    probabilities = None
    if hasattr(estimator, "predict_proba"):
        try:
            probabilities = estimator.predict_proba(X)
        except AttributeError:  # an SVC without probability=True
            pass
    if probabilities is None:
        scores = estimator.decision_function(X)
        if scores.ndim == 1:  # binary: one margin
            scores = np.stack([-scores, scores], axis=1)
        probabilities = softmax(scores)
    if n_classes is None:
        return probabilities
    full = np.zeros((len(probabilities), n_classes))
    full[:, np.asarray(estimator.classes_, dtype=np.int64)] = probabilities
    return full


@dataclass
class Scored:
    """One model's class probabilities on named images: ``probabilities[i, j]`` is image
    ``paths[i]``'s probability of ``classes[j]``; ``labels`` are the true class indices
    (None for images whose class is not known, as in prediction)."""

    paths: list[str]
    labels: np.ndarray | None
    probabilities: np.ndarray
    classes: list[str]

    def correct(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1) == self.labels

    @property
    def accuracy(self) -> float:
        return round(float(self.correct().mean()), 6) if len(self.paths) else float("nan")

    def on(self, paths: list[str], classes: list[str]) -> "Scored":
        """The same scores on ``paths`` (all of which it holds), columns in ``classes`` order."""
        row = {path: i for i, path in enumerate(self.paths)}
        rows = np.asarray([row[p] for p in paths], dtype=np.int64)
        column = {name: j for j, name in enumerate(self.classes)}
        columns = np.asarray([column[name] for name in classes], dtype=np.int64)
        names = {name: j for j, name in enumerate(classes)}
        labels = None if self.labels is None else \
            np.asarray([names[self.classes[k]] for k in self.labels[rows]], dtype=np.int64)
        return Scored(list(paths), labels, self.probabilities[rows][:, columns], list(classes))


def average(members: list[Scored], weights: list[float] | None = None) -> Scored:
    """The weighted mean of the members' probabilities on the images all of them scored,
    by path and class name (the first member's class order and image order)."""
    first = members[0]
    if any(set(m.classes) != set(first.classes) for m in members):
        raise ValueError("the members predict different classes: "
                         + "; ".join(", ".join(m.classes) for m in members))
    common = set(first.paths).intersection(*(m.paths for m in members[1:]))
    paths = [p for p in first.paths if p in common]
    aligned = [m.on(paths, first.classes) for m in members]
    weights = np.asarray(weights if weights is not None else [1.0] * len(members), dtype=np.float64)
    mean = sum(w * m.probabilities for w, m in zip(weights / weights.sum(), aligned)) if paths else \
        np.zeros((0, len(first.classes)))
    return Scored(paths, aligned[0].labels, mean, list(first.classes))


def behind(leading: np.ndarray, other: np.ndarray) -> tuple[bool, float]:
    """Whether ``other`` is clearly behind ``leading`` on the same images, and the z."""
    z = paired_z(leading, other)
    gap = float(leading.mean() - other.mean()) if len(leading) else 0.0
    return bool(z >= _BEHIND_Z and gap >= RACE_MIN_GAP), round(float(z), 4)


@dataclass
class Comparison:
    """The frozen winner, the fine-tuned network and their average on the same validation
    images, and which one :func:`compare` keeps (``"sweep"``, ``"finetune"`` or ``"ensemble"``)."""

    n_images: int
    frozen_accuracy: float
    finetune_accuracy: float
    average_accuracy: float
    z: dict  # paired z of each "X behind Y" that the rule asked
    winner: str
    why: str

    def to_report(self) -> dict:
        return {"validation_accuracy": self.average_accuracy, "frozen_validation_accuracy": self.frozen_accuracy,
                "finetune_validation_accuracy": self.finetune_accuracy, "n_validation": self.n_images,
                "paired_z": self.z, "behind_p": BEHIND_P, "min_gap": RACE_MIN_GAP, "max_member_gap": MAX_MEMBER_GAP,
                "kept": self.winner == "ensemble", "why": self.why}


def compare(frozen: Scored, tuned: Scored) -> Comparison:
    """Keep the average unless the validation images show a member clearly ahead of the
    other (then that member: averaging has nothing to gain) or the average clearly behind
    the better member (see the module docstring for why ties and one-image trails keep it)."""
    mean = average([frozen, tuned])
    if not mean.paths:
        raise ValueError("the frozen winner and the fine-tuned network scored no validation image in common")
    f, t = frozen.on(mean.paths, mean.classes), tuned.on(mean.paths, mean.classes)
    right = {"sweep": f.correct(), "finetune": t.correct(), "ensemble": mean.correct()}
    accuracy = {name: round(float(c.mean()), 6) if len(c) else float("nan") for name, c in right.items()}
    better = "finetune" if accuracy["finetune"] > accuracy["sweep"] else "sweep"
    worse = "sweep" if better == "finetune" else "finetune"
    names = {"sweep": "the frozen winner", "finetune": "the fine-tuned network", "ensemble": "their average"}
    member_behind, z_members = behind(right[better], right[worse])
    average_behind, z_average = behind(right[better], right["ensemble"])
    z = {f"{worse} behind {better}": z_members, f"ensemble behind {better}": z_average}
    scores = (f"validation accuracy: frozen {accuracy['sweep']:.4f}, fine-tuned {accuracy['finetune']:.4f}, "
              f"average {accuracy['ensemble']:.4f} on the same {len(mean.paths)} images")
    gap = accuracy[better] - accuracy[worse]
    if member_behind or gap > MAX_MEMBER_GAP:
        winner, why = better, (f"{names[worse]} is clearly behind {names[better]} (paired z {z_members:.2f})"
                               if member_behind else f"{names[worse]} is {100 * gap:.1f} points behind "
                               f"{names[better]} (the average is formed within {100 * MAX_MEMBER_GAP:g})")
    elif average_behind:
        winner, why = better, f"the average is clearly behind {names[better]} (paired z {z_average:.2f})"
    else:
        winner, why = "ensemble", ("the average of the frozen winner's and the fine-tuned network's probabilities: "
                                   f"not clearly behind either member (paired z {z_average:.2f})")
    return Comparison(len(mean.paths), accuracy["sweep"], accuracy["finetune"], accuracy["ensemble"], z, winner,
                      f"{why}; {scores}")


@dataclass
class EnsembleResult:
    """``tlp run``'s average of the frozen winner (a SweepResult, refit on the whole
    training part) and the fine-tuned network (a FinetuneResult), with its scores."""

    frozen: object
    finetuned: object
    comparison: Comparison
    test_accuracy: float | None
    n_test: int
    weights: tuple[float, float] = (0.5, 0.5)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> dict:
        frozen = self.frozen.best
        return {"layer": f"{frozen['layer']} | fine-tuned network", "head": "ensemble",
                "params": {"frozen": {"layer": frozen["layer"], "head": frozen["head"], "params": frozen["params"]},
                           "finetune": {k: self.finetuned.recipe[k] for k in ("freeze", "image_size", "train_size")},
                           "weights": list(self.weights)},
                "cv_accuracy": self.comparison.average_accuracy, "test_accuracy": self.test_accuracy,
                "fit_seconds": None}

    def to_report(self) -> dict:
        frozen, tuned = self.frozen.best, self.finetuned.to_report()["best"]
        members = [{**{k: frozen.get(k) for k in ("layer", "head", "params", "test_accuracy")},
                    "cv_accuracy": self.comparison.frozen_accuracy, "member": "frozen", "fit_seconds": None},
                   {**{k: tuned.get(k) for k in ("layer", "head", "params", "test_accuracy", "fit_seconds")},
                    "cv_accuracy": self.comparison.finetune_accuracy, "member": "finetune"}]
        return {"case": None, "model": self.frozen.model, "n_train": self.frozen.n_train, "n_test": self.n_test,
                "best": self.best, "results": [self.best, *members], "classes": self.frozen.classes,
                "recipe": {"members": ["frozen", "finetune"], "weights": list(self.weights),
                           "finetune": self.finetuned.recipe},
                "history": self.finetuned.history, "resumed_from_epoch": self.finetuned.resumed_from_epoch,
                "timings": {**{k: round(v, 4) for k, v in self.frozen.timings.items()},
                            **{f"finetune_{k}": round(v, 4) for k, v in self.finetuned.timings.items()},
                            **self.timings}}
