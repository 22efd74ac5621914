"""PNG plots for people: accuracy versus depth per head, a confusion matrix, and
fine-tuning curves.

matplotlib is imported lazily with the non-interactive Agg backend, so plotting works
on machines without a display and costs nothing when no plot is asked for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .files import atomic_file

__all__ = ["plot_accuracy_by_depth", "plot_confusion_matrix", "plot_history"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, figure, path: str | Path) -> Path:
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(path) as temp:  # a full disk leaves the previous plot, not half a file
            figure.savefig(temp, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(figure)
    return path


def plot_accuracy_by_depth(results: list[dict], path: str | Path, title: str = "") -> Path:
    """One line per head: CV accuracy (mean ± std) at each layer, in sweep order."""
    plt = _pyplot()
    layers = list(dict.fromkeys(row["layer"] for row in results))
    heads = list(dict.fromkeys(row["head"] for row in results))
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for head in heads:
        rows = {row["layer"]: row for row in results if row["head"] == head}
        means = np.array([rows[layer]["cv_accuracy"] for layer in layers])
        stds = np.array([rows[layer].get("cv_std") or 0.0 for layer in layers])  # None: one fold
        axes.errorbar(range(len(layers)), means, yerr=stds, marker="o", capsize=3, label=head)
    axes.set_xticks(range(len(layers)), layers)
    axes.set_xlabel("layer (shallow to deep)")
    axes.set_ylabel("cross-validated accuracy")
    axes.set_title(title or "accuracy versus depth")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(plt, figure, path)


def plot_confusion_matrix(y_true, y_pred, classes: list[str], path: str | Path, title: str = "") -> Path:
    """Counts of true (rows) versus predicted (columns) classes."""
    from sklearn.metrics import confusion_matrix

    plt = _pyplot()
    matrix = confusion_matrix(y_true, y_pred, labels=range(len(classes)))
    size = max(4.0, 0.45 * len(classes) + 2)
    figure, axes = plt.subplots(figsize=(size, size), dpi=120)
    axes.imshow(matrix, cmap="Blues")
    if len(classes) <= 30:
        for (row, column), count in np.ndenumerate(matrix):
            if count:
                color = "white" if count > matrix.max() / 2 else "black"
                axes.text(column, row, str(count), ha="center", va="center", fontsize=8, color=color)
        axes.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 10 else 0)
        axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    accuracy = float(np.trace(matrix) / max(1, matrix.sum()))
    axes.set_title(f"{title} (accuracy {accuracy:.3f})" if title else f"accuracy {accuracy:.3f}")
    return _save(plt, figure, path)


def plot_history(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Fine-tuning curves per epoch: training loss (left), training and validation accuracy (right)."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    loss_axes.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train loss")
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("loss")
    accuracy_axes.plot(epochs, [row["train_accuracy"] for row in history], marker="o", label="train (augmented)")
    if any("val_accuracy" in row for row in history):
        accuracy_axes.plot(epochs, [row.get("val_accuracy", np.nan) for row in history], marker="o", label="validation")
    accuracy_axes.set_xlabel("epoch")
    accuracy_axes.set_ylabel("accuracy")
    accuracy_axes.legend()
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
    figure.suptitle(title or "fine-tuning")
    return _save(plt, figure, path)
