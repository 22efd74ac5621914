"""Scanning folders and CSV manifests: every file read once, hashed and its header probed.

The scan gives the cache its content fingerprint (moving the folder or touching a file
changes nothing, editing one byte changes the key) and finds bad files before any
forward pass. Paths that could leave the data folder are refused here.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from .dataset import Dataset, Item, Skipped
from .errors import ImageDecodeError, ImageReadError, TlpInputError
from .images import probe_image

__all__ = ["IMAGE_EXTENSIONS", "folder_entries", "csv_entries", "read_image_file", "FileReader", "scan",
           "image_files"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif",
)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_BLOCK = 256  # files held in memory at once while scanning


def _is_image_name(filename: str) -> bool:
    return not filename.startswith(".") and filename.lower().endswith(IMAGE_EXTENSIONS)


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, sorted; hidden files and folders left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, name) for name in sorted(filenames) if _is_image_name(name)]
    return found


# ----------------------------------------------------------------------------- folders
def folder_entries(root: Path) -> tuple[Path, list[tuple[str, int]], list[str]]:
    """(root, [(relative path, label)], classes) of an ImageFolder layout, classes sorted by name."""
    root = root.resolve()
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise TlpInputError(
            f"folder {str(root)!r} has no class sub-folders; put each class's images in "
            "its own sub-folder (ImageFolder layout: ROOT/CLASS/IMAGE.jpg)"
        )
    entries = [(path.relative_to(root).as_posix(), label)
               for label, name in enumerate(classes) for path in image_files(root / name)]
    return root, entries, classes


# ----------------------------------------------------------------------------- CSV
def csv_entries(manifest: Path) -> tuple[Path, list[tuple[str, int]], list[str]]:
    """(root, [(relative path, label)], classes) of a ``path,label`` manifest; paths are
    relative to the CSV's folder, numeric labels sort as numbers."""
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
            rows.append((_safe_relative_path(row[0].strip(), manifest, line_number), row[1].strip()))
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
def read_image_file(path: str | os.PathLike, name: str) -> bytes:
    """The bytes of an image file; a missing or unreadable one is an ImageReadError naming ``name``."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise ImageReadError(name, "file not found") from None
    except OSError as error:
        raise ImageReadError(name, f"cannot read file ({error.strerror or error})") from None


class FileReader:
    """Reads a file under the data root (a class, not a closure, so workers can pickle it);
    a path that resolves outside the root (a symlink) is refused."""

    def __init__(self, root: Path):
        self.root = os.path.realpath(root)

    def __call__(self, relative: str) -> bytes:
        full = os.path.realpath(os.path.join(self.root, relative))
        if os.path.commonpath([full, self.root]) != self.root:
            raise ImageReadError(relative, "path resolves outside the data folder (symlink?)")
        return read_image_file(full, relative)


def scan(name: str, kind: str, root: Path, entries, classes, *, on_error: str, max_pixels: int,
         threads: int = 8) -> Dataset:
    """Read, hash and probe every entry; bad files raise (``fail``) or are listed (``skip``)."""
    read = FileReader(root)

    def read_and_hash(entry):
        # Threads overlap file I/O and hashing (both release the GIL); header probing
        # stays on this thread because Pillow's warning filters are not thread-safe.
        try:
            data = read(entry[0])
        except ImageReadError as error:
            return None, error
        return data, hashlib.sha256(data).hexdigest()

    items, skipped = [], []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for start in range(0, len(entries), _BLOCK):
            chunk = entries[start:start + _BLOCK]
            for (relative, label), (data, digest) in zip(chunk, pool.map(read_and_hash, chunk)):
                error = digest if data is None else _probe_error(data, relative, max_pixels)
                if error is None:
                    items.append(Item(relative, label, digest))
                elif on_error == "fail":
                    raise error
                else:
                    logger.warning("skipping %s: %s", relative, error.reason)
                    skipped.append(Skipped(relative, error.reason))
    return Dataset(name=name, kind=kind, classes=classes, items=items, skipped=skipped, root=root, reader=read)


def _probe_error(data: bytes, relative: str, max_pixels: int) -> ImageDecodeError | None:
    try:
        probe_image(data, relative, max_pixels=max_pixels)
    except ImageDecodeError as error:
        return error
    return None
