"""Data sets as stages see them: loaded once, split once.

:func:`load_dataset` scans a folder (ImageFolder layout), a CSV manifest or a built-in
name into a :class:`~tlp.dataset.Dataset`; every stage also accepts that value, so
``tlp run`` scans and hashes once and hands the parts on. :func:`split` is the one
interpretation of ``--test``: a fraction, a count, or a separate data set whose classes
are checked against the training data's before any forward pass, and
:func:`require_classes` refuses training data with fewer than two classes just as early.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .builtin import BUILTIN_DATASETS, load_builtin
from .dataset import Dataset, Item, Skipped
from .errors import TlpInputError
from .images import DEFAULT_MAX_PIXELS
from .scan import IMAGE_EXTENSIONS, csv_entries, folder_entries, scan

__all__ = ["Item", "Skipped", "Dataset", "load_dataset", "as_dataset", "split", "parse_test", "stratified_split",
           "labels_by_class_name", "require_classes", "require_labels", "BUILTIN_DATASETS", "IMAGE_EXTENSIONS"]

ON_ERROR_CHOICES = ("fail", "skip")


def load_dataset(data: str | os.PathLike, *, on_error: str = "fail", max_pixels: int = DEFAULT_MAX_PIXELS,
                 threads: int = 8) -> Dataset:
    """Scan a data set.

    Parameters
    ----------
    data : str or path
        A folder with one sub-folder per class, a CSV manifest (``path,label``; paths
        relative to the CSV), or a built-in name (``digits``, or ``photos`` with scikit-image).
    on_error : {"fail", "skip"}
        ``fail`` raises :class:`~tlp.errors.ImageDecodeError` on the first bad file;
        ``skip`` leaves bad files out and lists them in ``Dataset.skipped``.
    max_pixels : int
        Images with more pixels are refused (decompression-bomb guard).
    """
    if on_error not in ON_ERROR_CHOICES:
        raise TlpInputError(f"--on-error must be fail or skip, got {on_error!r}")
    text = str(data)
    if text in BUILTIN_DATASETS and not Path(text).exists():
        return load_builtin(text)
    path = Path(text).expanduser()
    if path.is_dir():
        root, entries, classes = folder_entries(path)
        kind = "folder"
    elif path.is_file() and path.suffix.lower() == ".csv":
        root, entries, classes = csv_entries(path)
        kind = "csv"
    else:
        raise TlpInputError(
            f"data {text!r} is not a folder, a .csv manifest or a built-in data set "
            f"({', '.join(BUILTIN_DATASETS)}); pass a folder with one sub-folder per class"
        )
    dataset = scan(text, kind, root, entries, classes, on_error=on_error, max_pixels=max_pixels, threads=threads)
    if not dataset.items:
        raise TlpInputError(f"data {text!r} holds no readable images; add image files ({', '.join(IMAGE_EXTENSIONS)})")
    return dataset


def as_dataset(data, *, on_error: str = "fail", max_pixels: int = DEFAULT_MAX_PIXELS) -> Dataset:
    """``data`` itself if it is a Dataset, else :func:`load_dataset` of it (the API's edge)."""
    return data if isinstance(data, Dataset) else load_dataset(data, on_error=on_error, max_pixels=max_pixels)


def require_classes(dataset: Dataset) -> Dataset:
    """``dataset`` itself if its images hold at least two classes, else an input error.

    Every stage that trains (sweep, fine-tuning, the planner's probes) calls this on its
    training data right after scanning and splitting, before any forward pass: with one
    class there is nothing to tell apart, and the failure would otherwise surface deep
    inside scikit-learn or the training loop after the expensive part has run. Classes
    are counted among the items, so a class whose every file ``--on-error skip`` left
    out does not count.
    """
    skipped = (dataset.source or dataset).skipped
    left_out = f" ({len(skipped)} unreadable files were left out)" if skipped else ""
    require_labels(dataset.labels, dataset.classes, f"data {dataset.name!r} has images", left_out)
    return dataset


def require_labels(labels, classes: list[str], what: str, note: str = "") -> None:
    """Refuse training rows (``labels``: indices into ``classes``) of fewer than two
    classes; ``what`` names them in the message (``"cache file 'x.h5' has rows"``)."""
    present = sorted({int(label) for label in labels})
    if len(present) >= 2:
        return
    only = f"only class {classes[present[0]]!r}" if present else "no class"
    raise TlpInputError(f"{what} of {only}{note}; training needs at least 2 classes: add a sub-folder "
                        "(or manifest label) per class")


def parse_test(text: str | None):
    """``--test`` as typed: an existing path, else an integer count (``10``), else a
    fraction (``0.25``), else a path (so a missing folder is reported as one)."""
    if text is None or Path(text).exists():
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def split(dataset: Dataset, test, seed: int = 0, *, on_error: str = "fail",
          max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Dataset, Dataset | None]:
    """(training part, test part or None): the only interpretation of ``--test``.

    ``test`` is None (no test part), a fraction in (0, 1) or an integer count of images
    (as scikit-learn's ``test_size``), held out stratified by class and seeded, or a
    separate data set (a Dataset, folder, CSV or built-in name). A separate test set's
    labels are mapped to the training classes by name, so both parts share ``classes``;
    a class the training data lacks is an input error, raised before any forward pass.
    """
    if test is None:
        return dataset, None
    if isinstance(test, bool):
        raise TlpInputError(f"--test must be a fraction, a count or a data set, got {test!r}")
    if isinstance(test, (int, float, np.integer, np.floating)):
        kept, held = stratified_split(dataset.labels, test, seed, "test")
        return (dataset.subset(kept, f"{dataset.name} (training part)"),
                dataset.subset(held, f"{dataset.name} (test part)"))
    separate = as_dataset(test, on_error=on_error, max_pixels=max_pixels)
    labels = labels_by_class_name(separate.labels, separate.classes, dataset.classes, separate.name)
    if separate.classes == dataset.classes:  # already the training classes (a part handed on by `run`)
        return dataset, separate
    items = [Item(item.path, int(label), item.digest) for item, label in zip(separate.items, labels)]
    return dataset, Dataset(name=separate.name, kind=separate.kind, classes=list(dataset.classes), items=items,
                            skipped=separate.skipped, root=separate.root, reader=separate.reader)


def stratified_split(labels, size, seed: int, what: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Positions (kept, held out), both sorted, stratified by label and seeded.

    ``size`` is a fraction in (0, 1) or an integer count. A fraction holds out at least
    as many rows as there are classes (what a stratified split needs; scikit-learn's
    allocation may still leave a small class out), so tiny data sets still split;
    wherever ``ceil(fraction x n)`` reaches the number of classes this is
    ``train_test_split(test_size=fraction, stratify=labels)``. ``what`` names the option
    in the error (``test`` or ``val``).
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    if isinstance(size, (int, np.integer)):
        if not 1 <= size < len(labels):
            raise TlpInputError(f"--{what} {size} must hold out between 1 and {len(labels) - 1} of the "
                                f"{len(labels)} images, or be a fraction between 0 and 1")
        count, asked = int(size), f"{int(size)} images"
    else:
        if not 0.0 < float(size) < 1.0:
            raise TlpInputError(f"--{what} must be a fraction between 0 and 1, a count of images, or a data set, "
                                f"got {size}")
        count = max(int(math.ceil(float(size) * len(labels))), len(np.unique(labels)))
        asked = f"{float(size)} of the data"
    try:
        kept, held = train_test_split(np.arange(len(labels)), test_size=count, stratify=labels, random_state=seed)
    except ValueError as error:
        raise TlpInputError(f"cannot hold out {asked} as {what} stratified by class ({error}); "
                            f"use a smaller --{what} or add images to small classes") from None
    return np.sort(kept), np.sort(held)


def labels_by_class_name(labels, classes: list[str], into: list[str], source) -> np.ndarray:
    """Labels of a separate data set (indices into its own ``classes``) as indices into
    the training data's classes ``into``, matched by name: two folders list their classes
    independently, so the same index can mean different classes. A class the training
    data lacks is an input error naming ``source``."""
    unknown = sorted(set(classes) - set(into))
    if unknown:
        raise TlpInputError(f"test data {str(source)!r} has classes not in the training data: "
                            f"{', '.join(unknown[:5])}; use the same class names")
    position = {name: index for index, name in enumerate(into)}
    return np.asarray([position[classes[label]] for label in labels], dtype=np.int64)
