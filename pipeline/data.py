"""Data sets: ImageFolder folders, CSV manifests and the built-in ``digits`` and ``photos``.

Loading a data set *scans* it once: every file is read, hashed (sha256) and its header
probed. The scan gives the cache its content fingerprint (so moving the folder or
touching a file changes nothing, editing one byte changes the key) and finds bad
files before any forward pass. Labels are attached to items here, so leaving a bad
file out never shifts another image's label.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np

from .errors import ImageDecodeError, TlpInputError
from .images import DEFAULT_MAX_PIXELS, probe_image

__all__ = ["Item", "Skipped", "Dataset", "load_dataset", "labels_by_class_name", "stratified_split", "test_split",
           "BUILTIN_DATASETS", "IMAGE_EXTENSIONS"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif",
)
BUILTIN_DATASETS = ("digits", "photos")
ON_ERROR_CHOICES = ("fail", "skip")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class Item:
    """One image of a data set."""

    path: str  # POSIX path relative to the data root ("3/img_01.png"); the name users see
    label: int  # index into Dataset.classes
    digest: str  # sha256 of the file's bytes: what identifies its features in the cache


@dataclass(frozen=True)
class Skipped:
    """A file left out under ``--on-error skip``, with the reason."""

    path: str
    reason: str

    def to_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason}


@dataclass
class Dataset:
    """A scanned data set: classes, good items in a fixed order, files left out."""

    name: str  # "digits", or the folder / CSV path as given
    kind: str  # "folder", "csv" or "builtin"
    classes: list[str]
    items: list[Item]
    skipped: list[Skipped] = field(default_factory=list)
    root: Path | None = None  # folder that relative item paths are under
    _reader: Callable[[str], bytes] | None = field(default=None, repr=False)

    def read_bytes(self, item: Item) -> bytes:
        """The encoded bytes of one item (what ``digest`` was computed from)."""
        return self._reader(item.path)

    def subset(self, positions, name: str) -> "Dataset":
        """The items at ``positions`` (in that order) as a data set of their own, for
        samples and training parts; files skipped by the scan stay with the whole."""
        return dataclasses.replace(self, name=name, items=[self.items[i] for i in positions], skipped=[])

    def identity(self) -> dict:
        """What decides the cached index: classes and (path, label, digest) per item."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(f"{item.path}\x00{item.label}\x00{item.digest}\n".encode())
        return {"classes": list(self.classes), "n_items": len(self.items), "items_sha256": digest.hexdigest()}


def stratified_split(labels, fraction: float, seed: int, what: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Positions (kept, held out), both sorted: ``fraction`` of the rows held out,
    stratified by label and seeded, and at least as many rows as there are classes (what
    a stratified split needs; scikit-learn's allocation may still leave a small class
    out), so that tiny data sets still split. Wherever ``ceil(fraction x n)`` reaches the
    number of classes this is ``train_test_split(test_size=fraction, stratify=labels)``.
    The sweep, fine-tuning and ``tlp run``'s advice all hold out their test part with it,
    so they agree by construction; ``what`` names the option in the error (``test`` or
    ``val``)."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    size = max(int(math.ceil(fraction * len(labels))), len(np.unique(labels)))
    try:
        kept, held = train_test_split(np.arange(len(labels)), test_size=size, stratify=labels, random_state=seed)
    except ValueError as error:
        raise TlpInputError(f"cannot hold out {fraction} of the data as {what} stratified by class ({error}); "
                            f"use a smaller --{what} or add images to small classes") from None
    return np.sort(kept), np.sort(held)


def test_split(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (training, test) positions for ``--test FRACTION``."""
    if not 0.0 < fraction < 1.0:
        raise TlpInputError(f"--test must be a fraction between 0 and 1 or a data set, got {fraction}")
    return stratified_split(labels, fraction, seed, "test")


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


def load_dataset(
    data: str | os.PathLike,
    *,
    on_error: str = "fail",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int = 8,
) -> Dataset:
    """Scan a data set.

    Parameters
    ----------
    data : str or path
        A folder with one sub-folder per class, a CSV manifest (``path,label``; paths
        relative to the CSV), or a built-in name (``digits``, or ``photos`` with scikit-image).
    on_error : {"fail", "skip"}
        ``fail`` raises :class:`~pipeline.errors.ImageDecodeError` on the first bad file;
        ``skip`` leaves bad files out and lists them in ``Dataset.skipped``.
    max_pixels : int
        Images with more pixels are refused (decompression-bomb guard).
    """
    if on_error not in ON_ERROR_CHOICES:
        raise TlpInputError(f"--on-error must be fail or skip, got {on_error!r}")
    text = str(data)
    if text in BUILTIN_DATASETS and not Path(text).exists():
        if text == "photos":
            from .photos import load_photos  # lazy: photos imports this module

            return load_photos()
        return load_digits()
    path = Path(text).expanduser()
    if path.is_dir():
        root, entries, classes = _folder_entries(path)
        kind = "folder"
    elif path.is_file() and path.suffix.lower() == ".csv":
        root, entries, classes = _csv_entries(path)
        kind = "csv"
    else:
        raise TlpInputError(
            f"data {text!r} is not a folder, a .csv manifest or a built-in data set "
            f"({', '.join(BUILTIN_DATASETS)}); pass a folder with one sub-folder per class"
        )
    dataset = _scan(text, kind, root, entries, classes, on_error, max_pixels, threads)
    if not dataset.items:
        raise TlpInputError(f"data {text!r} holds no readable images; add image files ({', '.join(IMAGE_EXTENSIONS)})")
    return dataset


# ----------------------------------------------------------------------------- folders
def _folder_entries(root: Path) -> tuple[Path, list[tuple[str, int]], list[str]]:
    root = root.resolve()
    classes = sorted(
        entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith(".")
    )
    if not classes:
        raise TlpInputError(
            f"folder {str(root)!r} has no class sub-folders; put each class's images in "
            "its own sub-folder (ImageFolder layout: ROOT/CLASS/IMAGE.jpg)"
        )
    entries = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                if filename.startswith(".") or not filename.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                relative = Path(dirpath, filename).relative_to(root).as_posix()
                entries.append((relative, label))
    return root, entries, classes


# ----------------------------------------------------------------------------- CSV
def _csv_entries(manifest: Path) -> tuple[Path, list[tuple[str, int]], list[str]]:
    root = manifest.resolve().parent
    rows = []
    with open(manifest, newline="", encoding="utf-8-sig") as handle:
        for line_number, row in enumerate(csv.reader(handle), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            if line_number == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
                continue
            if len(row) != 2:
                raise TlpInputError(
                    f"{manifest}:{line_number}: expected 2 columns (path,label), got {len(row)}; "
                    "quote paths that contain commas"
                )
            relative = _safe_relative_path(row[0].strip(), manifest, line_number)
            rows.append((relative, row[1].strip()))
    if not rows:
        raise TlpInputError(f"manifest {str(manifest)!r} has no rows; add lines of the form path,label")
    classes = _sorted_labels({label for _, label in rows})
    index = {name: i for i, name in enumerate(classes)}
    return root, [(path, index[label]) for path, label in rows], classes


def _sorted_labels(labels: set[str]) -> list[str]:
    """Numeric labels sort as numbers (2 before 10), others as text."""
    if all(re.fullmatch(r"-?\d+", label) for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _safe_relative_path(raw: str, manifest: Path, line_number: int) -> str:
    """Reject paths that could leave the manifest's folder."""
    where = f"{manifest}:{line_number}"
    fix = "use a path relative to the CSV's folder, without '..'"
    if not raw:
        raise TlpInputError(f"{where}: empty path; {fix}")
    if _SCHEME.match(raw) or raw.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", raw):
        raise TlpInputError(f"{where}: absolute path {raw!r} is not allowed; {fix}")
    if "\\" in raw:
        raise TlpInputError(f"{where}: backslash in path {raw!r}; use '/' as separator")
    parts = PurePosixPath(raw).parts
    if ".." in parts:
        raise TlpInputError(f"{where}: path {raw!r} escapes the manifest folder; {fix}")
    return PurePosixPath(*[p for p in parts if p != "."]).as_posix()


# ----------------------------------------------------------------------------- scanning
class _FileReader:
    """Reads a file under the data root; a class (not a closure) so workers can pickle it."""

    def __init__(self, root: Path):
        self.root = os.path.realpath(root)

    def __call__(self, relative: str) -> bytes:
        full = os.path.realpath(os.path.join(self.root, relative))
        if os.path.commonpath([full, self.root]) != self.root:
            raise ImageDecodeError(relative, "path resolves outside the data folder (symlink?)")
        try:
            with open(full, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise ImageDecodeError(relative, "file not found") from None
        except OSError as error:
            raise ImageDecodeError(relative, f"cannot read file ({error.strerror or error})") from None


def _scan(name, kind, root, entries, classes, on_error, max_pixels, threads) -> Dataset:
    read = _FileReader(root)

    def read_and_hash(entry):
        # Threads overlap file I/O and hashing (both release the GIL); header probing
        # stays on this thread because Pillow's warning filters are not thread-safe.
        try:
            data = read(entry[0])
        except ImageDecodeError as error:
            return None, error.reason
        return data, hashlib.sha256(data).hexdigest()

    items, skipped = [], []
    block = 256  # bounds the bytes held in memory at once
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for start in range(0, len(entries), block):
            chunk = entries[start:start + block]
            for (relative, label), (data, digest) in zip(chunk, pool.map(read_and_hash, chunk)):
                reason = digest if data is None else _probe_reason(data, relative, max_pixels)
                if reason is None:
                    items.append(Item(relative, label, digest))
                elif on_error == "fail":
                    raise ImageDecodeError(relative, reason)
                else:
                    logger.warning("skipping %s: %s", relative, reason)
                    skipped.append(Skipped(relative, reason))
    return Dataset(name=name, kind=kind, classes=classes, items=items, skipped=skipped, root=root, _reader=read)


def _probe_reason(data: bytes, relative: str, max_pixels: int) -> str | None:
    try:
        probe_image(data, relative, max_pixels=max_pixels)
    except ImageDecodeError as error:
        return error.reason
    return None


# ----------------------------------------------------------------------------- digits
def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as uint8 RGB images (N, 8, 8, 3) and labels (N,).

    Value v in 0..16 becomes gray level round(v * 255 / 16): bright ink on black.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    gray = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1), bunch.target.astype(np.int64)


def load_digits() -> Dataset:
    """The built-in ``digits`` data set: classes ``"0"`` to ``"9"``, items ``digits/NNNN.png``."""
    images, labels = digits_images()
    names = [f"digits/{i:04d}.png" for i in range(len(images))]
    items = [
        Item(name, int(label), hashlib.sha256(b"digits-rgb8x8\x00" + image.tobytes()).hexdigest())
        for name, image, label in zip(names, images, labels)
    ]
    return Dataset(
        name="digits", kind="builtin", classes=[str(d) for d in range(10)], items=items,
        _reader=_DigitsReader(names, images),
    )


class _DigitsReader:
    """Encodes one digit as PNG bytes, so built-in data takes the same decode path as files."""

    def __init__(self, names: list[str], images: np.ndarray):
        self.position = {name: i for i, name in enumerate(names)}
        self.images = images

    def __call__(self, relative: str) -> bytes:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(self.images[self.position[relative]]).save(buffer, format="PNG")
        return buffer.getvalue()
