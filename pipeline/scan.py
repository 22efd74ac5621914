"""Scanning folders and CSV manifests: every file read once, hashed and its header probed.

The scan gives the cache its content fingerprint (moving the folder or touching a file
changes nothing, editing one byte changes the key) and finds bad files before any
forward pass. Paths that could leave the data folder are refused here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from .dataset import Dataset, Item, Skipped
from .errors import ImageDecodeError, ImageReadError, TlpInputError
from .images import MAX_ASPECT_RATIO, probe_image

__all__ = ["IMAGE_EXTENSIONS", "folder_entries", "csv_entries", "sorted_labels", "read_image_file", "FileReader", "scan",
           "image_files"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif",
)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_COLUMN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_ .-]*")  # a header cell: a word, no path
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
    relative to the CSV's folder, classes in the order of :func:`sorted_labels`.

    Every refusal names the line, so a manifest written by hand or by a script is fixed
    where it is wrong: a header other than ``path,label`` is skipped with a warning (a
    header read as data would become a missing image), an image listed twice with two
    labels is refused, one listed twice with the same label is kept once.
    """
    root = manifest.resolve().parent
    rows = _header_skipped(_manifest_rows(manifest), manifest, root)
    labelled = []
    for line_number, row in rows:
        if len(row) != 2:
            raise TlpInputError(
                f"{manifest}:{line_number}: expected 2 columns (path,label), got {len(row)}; "
                "quote paths that contain commas"
            )
        path, label = _safe_relative_path(row[0].strip(), manifest, line_number), row[1].strip()
        if not label:
            raise TlpInputError(f"{manifest}:{line_number}: empty label for {path!r}; give every row a class "
                                "label (path,label)")
        labelled.append((line_number, path, label, row[0].strip()))
    if not labelled:
        raise TlpInputError(f"manifest {str(manifest)!r} has no rows; add lines of the form path,label")
    labelled = _unique_rows(labelled, manifest, root)
    classes = sorted_labels({row[2] for row in labelled})
    index = {name: i for i, name in enumerate(classes)}
    return root, [(path, index[label]) for _, path, label, _ in labelled], classes


def _manifest_rows(manifest: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every non-blank row. Text that is not UTF-8, holds a NUL
    byte or breaks CSV quoting is an input error naming the line, not a traceback."""
    data = manifest.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise TlpInputError(f"{manifest}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); "
                            "save the manifest as UTF-8") from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise TlpInputError(f"{manifest}:{line}: NUL byte in the line; a manifest is plain text, "
                            "remove the byte or regenerate the file")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, line_number = [], 1
    try:
        for row in reader:
            if row and any(cell.strip() for cell in row):
                rows.append((line_number, row))
            line_number = reader.line_num + 1  # a quoted cell may span lines
    except csv.Error as error:
        raise TlpInputError(f"{manifest}:{line_number}: not a CSV row ({error}); fix the quoting") from None
    return rows


def _header_skipped(rows: list[tuple[int, list[str]]], manifest: Path, root: Path) -> list[tuple[int, list[str]]]:
    """``rows`` without a header line, recognised by shape: the first cell looks like a
    column name (a word, no image extension) and names no file under ``root``.
    ``path,label`` is the documented header and goes silently; any other is named in a
    warning, since a misread first row would otherwise go unnoticed."""
    if not rows:
        return rows
    _, first = rows[0]
    cells = [cell.strip() for cell in first]
    if [cell.lower() for cell in cells] == ["path", "label"]:
        return rows[1:]
    name = cells[0]
    if (_COLUMN_NAME.fullmatch(name) and not name.lower().endswith(IMAGE_EXTENSIONS)
            and not os.path.isfile(os.path.join(root, name))):
        logger.warning("%s: first line %r read as a header (its first cell names no file); "
                       "start the file with path,label to silence this", manifest, ",".join(cells))
        return rows[1:]
    return rows


def _unique_rows(rows: list[tuple[int, str, str, str]], manifest: Path, root: Path) -> list[tuple[int, str, str, str]]:
    """Each file once. Two rows reach the same file when their paths are equal once
    normalised, or resolve to the same real file (a symlink in the folder): with two
    labels one image would be trained as two classes, so that is refused; with the same
    label the repeat would count twice (and a split could put it on both sides), so it
    is left out with one warning. Rows are (line, normalised path, label, path as written)."""
    seen: dict[str, tuple[int, str, str, str]] = {}
    unique, repeats = [], []
    for row in rows:
        line_number, path, label, _ = row
        key = os.path.realpath(os.path.join(root, path))
        first = seen.setdefault(key, row)
        if first is row:
            unique.append(row)
        elif first[2] != label:
            raise TlpInputError(f"{manifest}:{line_number}: {row[3]!r} is labelled {label!r} here and {first[2]!r} "
                                f"on line {first[0]} ({first[3]!r}); list each image once, with one label")
        else:
            repeats.append((row, first))
    if repeats:
        (line_number, _, _, path), (first_line, _, _, first_path) = repeats[0]
        logger.warning("%s: %d duplicate row(s) left out (the same file with the same label again), e.g. line %d "
                       "%r repeats line %d %r", manifest, len(repeats), line_number, path, first_line, first_path)
    return unique


def sorted_labels(labels) -> list[str]:
    """Class names in a total order that depends on the names alone (never on hash
    seeds, whose set order varies between runs and would change label indices and the
    cache key): when every label is an integer, by numeric value, then by the text
    itself (``01`` before ``1`` before ``2`` before ``10``); otherwise in plain text order."""
    if all(re.fullmatch(r"-?[0-9]+", label) for label in labels):
        return sorted(labels, key=lambda label: (int(label), label))
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
        probe_image(data, relative, max_pixels=max_pixels, max_aspect_ratio=MAX_ASPECT_RATIO)
    except ImageDecodeError as error:
        return error
    return None
