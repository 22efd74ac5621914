"""Files on disk: atomic writes, content hashes and the library versions that files record.

Every file tlp writes (cache files and shards, reports, saved models, checkpoints) goes
through :func:`atomic_file`: it is written under a hidden temporary name in its final
folder, fsynced, renamed into place and the folder fsynced, so a reader sees the old
file or the whole new one, never half of one. The temporary name carries the writer's
pid, which lets ``tlp cache gc`` tell an orphan (dead writer) from work in progress.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import importlib
import json
import os
import secrets
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator

import numpy as np

__all__ = [
    "canonical_json", "fingerprint", "array_sha256", "file_sha256", "forget_file_hashes", "temp_name", "atomic_file", "write_json",
    "atomic_h5", "torch_save", "library_versions", "now_iso",
]

_HASH_BLOCK = 1 << 20


# ----------------------------------------------------------------------------- hashing
def canonical_json(value) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def fingerprint(value) -> str:
    """sha256 hex digest of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def array_sha256(array: np.ndarray) -> str:
    """Digest of an array's dtype, shape and little-endian C-order bytes."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}|{array.shape}".encode())
    digest.update(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _memo_sha256(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the memo key, so an edited file is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, memoised per (path, size, mtime) within the process:
    a weights file is hashed once however often its model is resolved."""
    stat = os.stat(path)
    return _memo_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def forget_file_hashes() -> None:
    """Forget the file hashes this process memoised, so the next :func:`file_sha256` reads
    the file again (the benchmarks time cold runs)."""
    _memo_sha256.cache_clear()


# ----------------------------------------------------------------------------- atomic writes
def temp_name(final: Path) -> Path:
    """The hidden temporary name a writer of ``final`` uses: ``.NAME.tmp.PID.RANDOM``."""
    return final.with_name(f".{final.name}.tmp.{os.getpid()}.{secrets.token_hex(4)}")


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_exclusively(temp: Path, attempts: int = 5) -> None:
    """Create the empty file ``temp``, and its folder if needed.

    Another process finishing the same extraction removes a shard folder once it looks
    empty; it can do that between our ``mkdir`` and our open. Then the folder is made
    again. Once our file exists, the folder is not empty and stays.
    """
    for attempt in range(attempts):
        temp.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it becomes ``final`` atomically.

    The caller writes the whole file to the yielded path (and closes it); this fsyncs
    it, renames it over ``final`` and fsyncs the folder. On any error the temporary
    file is removed and ``final`` is left as it was.
    """
    final = Path(final)
    temp = temp_name(final)
    try:
        _create_exclusively(temp)
        yield temp
        with open(temp, "rb+") as raw:
            os.fsync(raw.fileno())
        os.replace(temp, final)
        _fsync_folder(final.parent)
    finally:
        temp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, value: dict) -> Path:
    """Write ``value`` as indented JSON to ``path``, atomically."""
    path = Path(path)
    with atomic_file(path) as temp:
        with open(temp, "w", encoding="utf-8") as handle:
            json.dump(value, handle, indent=2)
            handle.write("\n")
    return path


@contextlib.contextmanager
def atomic_h5(final: str | os.PathLike):
    """An open, writable ``h5py.File`` that appears at ``final`` complete or not at all.

    A killed HDF5 writer leaves an unreadable file, which is why nothing is ever
    appended to a file a reader may open.
    """
    import h5py

    with atomic_file(final) as temp:
        with h5py.File(temp, "w", libver=("earliest", "v110")) as handle:
            yield handle


def torch_save(obj, final: str | os.PathLike) -> Path:
    """``torch.save`` to ``final``, atomically (checkpoints, fine-tuned weights)."""
    import torch

    final = Path(final)
    with atomic_file(final) as temp:
        with open(temp, "wb") as handle:
            torch.save(obj, handle)
    return final


# ----------------------------------------------------------------------------- provenance
# How each library's version is read: torch and torchvision through the module, whose
# version names the build ("2.14.1+cu130"; extraction imports both anyway), the others
# from their installed metadata, without importing them (a warm cache hit never pays for
# importing timm).
_VERSION_SOURCES = {"torch": "module", "torchvision": "module", "pillow": "pillow", "timm": "timm",
                    "sklearn": "scikit-learn"}


def library_versions(*names: str) -> dict[str, str]:
    """Versions of the named libraries (keys of ``_VERSION_SOURCES``), as files record
    them; a missing one reads ``"missing"``."""
    found = {}
    for name in names:
        source = _VERSION_SOURCES[name]
        try:
            found[name] = importlib.import_module(name).__version__ if source == "module" else version(source)
        except (ImportError, PackageNotFoundError):
            found[name] = "missing"
    return found


def now_iso() -> str:
    """The current UTC time, to the second, in ISO 8601."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
