"""The finished cache file: one self-describing HDF5 file per key, readable with plain h5py.

File contract (see DESIGN.md, "Cache contract")::

    /index/paths     (N,) str      relative image paths
    /index/labels    (N,) int64    class indices; class names in the attribute "classes"
    /index/digests   (N,) str      sha256 of each image's bytes (for reuse across data sets)
    /index/skipped_paths, /index/skipped_reasons   files left out under --on-error skip
                     attribute "sha256": :func:`index_sha256` of classes, paths, labels, digests
    /features/<layer> (N, D) float16|float32, chunked by rows; attributes: node, pooling,
                      pre_pool_shape, channels, stride, layer_fingerprint, sha256
    root attributes:  schema_version, key, model, weights_id, weights_sha256,
                      preprocessing (JSON), precision, versions (JSON), created, data_root, ...

A finished file is never modified; it is written in one go by :func:`write_feature_file`
(atomically, see :mod:`tlp.files`). Every read of a layer through :class:`FeatureFile`
is checked against its sha256 as it streams by, and an extraction's cache hit checks the
index and every layer, so numbers changed on disk are never served.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .errors import CacheCorruptError, TlpInputError
from .files import atomic_h5, canonical_json, fingerprint

__all__ = ["SCHEMA_VERSION", "LayerMeta", "FeatureFile", "write_feature_file", "storage_dtype", "read_strings",
           "STRING_DTYPE", "read_verified", "index_sha256", "forget_checks"]

SCHEMA_VERSION = 1
FLOAT16_MAX = float(np.finfo(np.float16).max)
STRING_DTYPE = h5py.string_dtype("utf-8")
_CHUNK_BYTES = 1 << 20  # ~1 MiB row chunks: whole-row reads, no re-decompression
JSON_ATTRIBUTES = ("preprocessing", "versions", "fingerprint_spec")


@dataclass(frozen=True)
class LayerMeta:
    """How one stored layer was made."""

    name: str  # dataset name under /features ("early", or a node name)
    node: str  # graph node that was tapped
    pooling: str  # avg, max, avgmax, gridK; "none" for vector taps
    pre_pool_shape: tuple[int, ...]  # tap output shape for one image, before pooling
    channels: int
    stride: int | None
    layer_fingerprint: str  # identifies model + preprocessing + precision + node + pooling

    def attrs(self) -> dict:
        return {
            "node": self.node,
            "pooling": self.pooling,
            "pre_pool_shape": np.asarray(self.pre_pool_shape, dtype=np.int64),
            "channels": int(self.channels),
            "stride": -1 if self.stride is None else int(self.stride),
            "layer_fingerprint": self.layer_fingerprint,
        }

    @classmethod
    def from_dataset(cls, name: str, dataset: h5py.Dataset) -> "LayerMeta":
        stride = int(dataset.attrs["stride"])
        return cls(
            name=name,
            node=str(dataset.attrs["node"]),
            pooling=str(dataset.attrs["pooling"]),
            pre_pool_shape=tuple(int(v) for v in dataset.attrs["pre_pool_shape"]),
            channels=int(dataset.attrs["channels"]),
            stride=None if stride < 0 else stride,
            layer_fingerprint=str(dataset.attrs["layer_fingerprint"]),
        )


def read_strings(dataset: h5py.Dataset) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in dataset[()]]


# ----------------------------------------------------------------------------- checksums
_VERIFY_BLOCK_BYTES = 64 << 20  # rows hashed per read: bounded memory at any file size
_verified: set[tuple] = set()  # (path, inode, size, mtime_ns, dataset) checked in this process


def _file_identity(path: Path) -> tuple:
    stat = os.stat(path)
    return str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns


def read_verified(dataset: h5py.Dataset, *, rows: np.ndarray | None = None,
                  memo_path: Path | None = None) -> np.ndarray:
    """Read a 2-D dataset whose ``sha256`` attribute holds :func:`~tlp.files.array_sha256`
    of its values, checking the digest as the rows stream by (in blocks of ~64 MiB).

    Returns the whole array, or with ``rows`` (row numbers in any order, repeats allowed)
    those rows in that order, read in the same pass. Raises
    :class:`~tlp.errors.CacheCorruptError` when the digest is missing or differs, or a
    row number lies outside the dataset (an index that no longer fits its features).
    With ``memo_path`` a dataset already checked in this process (same file, inode, size
    and mtime) is not hashed again, so a sweep that reads what extraction just checked
    pays once.
    """
    expected = dataset.attrs.get("sha256")
    where = Path(dataset.file.filename)
    if expected is None:
        raise CacheCorruptError(where, f"{dataset.name} has no sha256")
    n = dataset.shape[0]
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise CacheCorruptError(where, f"the index (it refers to row {int(rows.max())} of {dataset.name}, "
                                           f"which has {n} rows)")
    memo = (*_file_identity(memo_path), dataset.name) if memo_path is not None else None
    if memo in _verified:
        return dataset[()] if rows is None else _rows_of(dataset, rows)
    digest = hashlib.sha256(f"{dataset.dtype.newbyteorder('<').str}|{dataset.shape}".encode())
    block = max(1, _VERIFY_BLOCK_BYTES // max(1, dataset.dtype.itemsize * int(np.prod(dataset.shape[1:]))))
    order = None if rows is None else np.argsort(rows, kind="stable")
    wanted = None if rows is None else rows[order]
    parts = []
    for start in range(0, n, block):
        values = dataset[start:start + block]
        digest.update(np.ascontiguousarray(values.astype(values.dtype.newbyteorder("<"), copy=False)).data)
        if rows is None:
            parts.append(values)
        else:
            inside = wanted[(wanted >= start) & (wanted < start + block)]
            parts.append(values[inside - start])
    if digest.hexdigest() != (expected.decode() if isinstance(expected, bytes) else str(expected)):
        raise CacheCorruptError(where, f"{dataset.name}")
    if memo is not None:
        _verified.add(memo)
    values = np.concatenate(parts) if parts else np.empty((0, *dataset.shape[1:]), dtype=dataset.dtype)
    if order is None:
        return values
    out = np.empty_like(values)
    out[order] = values
    return out


def forget_checks() -> None:
    """Forget which layers this process has checked, so the next read hashes them again
    (the benchmarks time first reads)."""
    _verified.clear()


def _rows_of(dataset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """``dataset[rows]`` for row numbers in any order with repeats (h5py itself wants
    them increasing and unique)."""
    if len(rows) * 10 >= dataset.shape[0]:
        return dataset[()][rows]
    unique, inverse = np.unique(rows, return_inverse=True)
    return dataset[unique][inverse]


def index_sha256(classes, paths, labels, digests) -> str:
    """The checksum of a finished file's index (class names, paths, labels, digests): a
    flipped byte there would attach rows to the wrong image or class."""
    return fingerprint({"classes": list(classes), "paths": list(paths),
                        "labels": [int(v) for v in np.asarray(labels).tolist()], "digests": list(digests)})


class FeatureFile:
    """Read access to one finished cache file.

    Use as a context manager, or call :meth:`close`. Arrays are loaded on demand.

    Examples
    --------
    >>> with FeatureFile(result.path) as features:          # doctest: +SKIP
    ...     X = features.load("late")                      # (N, D) float32
    ...     y = features.labels                            # (N,) int64
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._file = h5py.File(self.path, "r")
        except (OSError, ValueError) as error:
            raise TlpInputError(
                f"cache file {str(self.path)!r} cannot be opened ({error}); delete it with "
                "`tlp cache rm KEY` and extract again"
            ) from None

    def __enter__(self) -> "FeatureFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def attrs(self) -> dict:
        """Root attributes, with JSON-valued ones decoded."""
        out = {}
        for name, value in self._file.attrs.items():
            if isinstance(value, bytes):
                value = value.decode()
            if name in JSON_ATTRIBUTES and isinstance(value, str):
                value = json.loads(value)
            elif isinstance(value, np.generic):
                value = value.item()
            out[name] = value
        return out

    @property
    def key(self) -> str:
        return str(self._file.attrs["key"])

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self._file["index"].attrs["classes"]]

    @property
    def paths(self) -> list[str]:
        return read_strings(self._file["index/paths"])

    @property
    def labels(self) -> np.ndarray:
        return self._file["index/labels"][()]

    @property
    def digests(self) -> list[str]:
        return read_strings(self._file["index/digests"])

    @property
    def skipped(self) -> list[dict]:
        index = self._file["index"]
        if "skipped_paths" not in index:
            return []
        return [
            {"path": p, "reason": r}
            for p, r in zip(read_strings(index["skipped_paths"]), read_strings(index["skipped_reasons"]))
        ]

    @property
    def layers(self) -> list[str]:
        return list(self._file["features"].attrs.get("order", list(self._file["features"].keys())))

    def layer_meta(self, name: str) -> LayerMeta:
        return LayerMeta.from_dataset(name, self._dataset(name))

    def _dataset(self, name: str) -> h5py.Dataset:
        if name not in self._file["features"]:
            raise TlpInputError(
                f"layer {name!r} is not in cache file {self.path.name}; it holds {', '.join(self.layers)}"
            )
        return self._file["features"][name]

    def load(self, name: str, dtype=np.float32) -> np.ndarray:
        """The (N, D) features of one layer, upcast to ``dtype`` (float32 by default).

        The stored values are checked against the layer's sha256 as they are read (once
        per process and file version); a mismatch raises
        :class:`~tlp.errors.CacheCorruptError` instead of serving changed numbers."""
        return read_verified(self._dataset(name), memo_path=self.path).astype(dtype, copy=False)

    def check(self, layers: list[str] | None = None) -> None:
        """Check the index and the given layers (all by default) against their checksums;
        raises :class:`~tlp.errors.CacheCorruptError` on the first mismatch."""
        self.check_index()
        for name in self.layers if layers is None else layers:
            read_verified(self._dataset(name), rows=np.empty(0, dtype=np.int64), memo_path=self.path)

    def check_index(self, *, memo: bool = True) -> None:
        """Raise :class:`~tlp.errors.CacheCorruptError` when the index no longer matches
        the checksum written with it (files from before tlp 0.3 carry none). Like layer
        reads, a check is remembered per process and file version unless ``memo=False``
        (``verify`` always hashes again)."""
        expected = self._file["index"].attrs.get("sha256")
        key = (*_file_identity(self.path), "/index")
        if expected is None or (memo and key in _verified):
            return
        actual = index_sha256(self.classes, self.paths, self.labels, self.digests)
        if actual != (expected.decode() if isinstance(expected, bytes) else str(expected)):
            raise CacheCorruptError(self.path, "the index (paths, labels, digests or class names)")
        _verified.add(key)

    def dim(self, name: str) -> int:
        """Length D of one layer's feature vectors."""
        return int(self._dataset(name).shape[1])

    def stored_dtype(self, name: str) -> np.dtype:
        return self._dataset(name).dtype

    def n_rows(self) -> int:
        return int(self._file["index/labels"].shape[0])

    def verify(self) -> list[str]:
        """Problems found by re-hashing every layer and checking the index; empty if sound."""
        problems = []
        expected_key = self.path.stem
        if self.key != expected_key:
            problems.append(f"key attribute {self.key[:12]} does not match file name {expected_key[:12]}")
        n = self.n_rows()
        for name in ("paths", "digests"):
            if self._file["index"][name].shape[0] != n:
                problems.append(f"/index/{name} has {self._file['index'][name].shape[0]} rows, labels {n}")
        try:
            self.check_index(memo=False)
        except CacheCorruptError:
            problems.append("index: paths, labels, digests or class names do not match their sha256")
        for name in self.layers:
            dataset = self._dataset(name)
            if dataset.shape[0] != n:
                problems.append(f"layer {name} has {dataset.shape[0]} rows, index {n}")
            try:
                read_verified(dataset, rows=np.empty(0, dtype=np.int64))
            except CacheCorruptError:
                problems.append(f"layer {name}: stored values do not match their sha256")
        return problems


# ----------------------------------------------------------------------------- writing
def _row_chunks(n_rows: int, row_bytes: int) -> tuple[int, int]:
    return max(1, min(n_rows, _CHUNK_BYTES // max(1, row_bytes)))


def storage_dtype(values: np.ndarray, policy: str) -> np.dtype:
    """float16 unless the policy says float32 or a finite value would overflow float16."""
    if policy == "float32":
        return np.dtype(np.float32)
    finite = values[np.isfinite(values)]
    if finite.size and float(np.abs(finite).max()) > FLOAT16_MAX:
        return np.dtype(np.float32)
    return np.dtype(np.float16)


def write_feature_file(
    final: Path,
    *,
    root_attrs: dict,
    classes: list[str],
    paths: list[str],
    labels: np.ndarray,
    digests: list[str],
    skipped: list[dict],
    layers: list[tuple[LayerMeta, object]],
    dtype_policy: str,
) -> dict[str, np.dtype]:
    """Write a finished cache file atomically; returns the stored dtype of each layer.

    A layer's rows are an (N, D) array or anything with ``shape`` (N, D) and ``chunks()``,
    an iterator of float32 row blocks in order (see :class:`tlp.cache.PlannedRows`): those
    are written and hashed block by block, so assembling never holds a whole layer.
    """
    n = len(paths)
    dtypes = {}
    with atomic_h5(final) as handle:
        for name, value in root_attrs.items():
            handle.attrs[name] = canonical_json(value) if isinstance(value, (dict, list)) else value
        index = handle.create_group("index")
        index.attrs["classes"] = np.asarray(classes, dtype=object).astype(STRING_DTYPE) if classes else np.asarray([], dtype=STRING_DTYPE)
        index.create_dataset("paths", data=np.asarray(paths, dtype=object), dtype=STRING_DTYPE)
        index.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
        index.create_dataset("digests", data=np.asarray(digests, dtype=object), dtype=STRING_DTYPE)
        index.create_dataset("skipped_paths", data=np.asarray([s["path"] for s in skipped], dtype=object), dtype=STRING_DTYPE)
        index.create_dataset("skipped_reasons", data=np.asarray([s["reason"] for s in skipped], dtype=object), dtype=STRING_DTYPE)
        index.attrs["sha256"] = index_sha256(classes, paths, labels, digests)
        features = handle.create_group("features")
        features.attrs["order"] = np.asarray([meta.name for meta, _ in layers], dtype=object).astype(STRING_DTYPE)
        for meta, values in layers:
            blocks = values.chunks if hasattr(values, "chunks") else (lambda values=values: iter([values]))
            dtype = np.dtype(np.float32 if dtype_policy == "float32" else np.float16)
            dataset, digest = _write_rows(features, meta.name, blocks(), n, values.shape[1], dtype)
            if dataset is None:  # a value overflows float16: the layer is stored as float32 (rare; the file
                # keeps the space of the abandoned float16 attempt: HDF5 does not reclaim it)
                dtype = np.dtype(np.float32)
                dataset, digest = _write_rows(features, meta.name, blocks(), n, values.shape[1], dtype)
            for key, value in meta.attrs().items():
                dataset.attrs[key] = value
            dataset.attrs["sha256"] = digest
            dataset.attrs["bytes_per_image"] = int(values.shape[1] * dtype.itemsize)
            dtypes[meta.name] = dtype
    return dtypes


def _write_rows(features: h5py.Group, name: str, blocks, n: int, dims: int, dtype: np.dtype):
    """(dataset, :func:`~tlp.files.array_sha256` of its values) written from row blocks;
    (None, None), and no dataset, when a finite value overflows a float16 ``dtype``."""
    dataset = features.create_dataset(name, shape=(n, dims), dtype=dtype,
                                      chunks=(_row_chunks(n, dims * dtype.itemsize), max(1, dims)) if n else None)
    digest = hashlib.sha256(f"{dtype.str}|{(n, dims)}".encode())  # as array_sha256 hashes the whole array
    start = 0
    for block in blocks:
        if dtype == np.float16 and storage_dtype(block, "float16") != np.float16:
            del features[name]
            return None, None
        stored = np.ascontiguousarray(block.astype(dtype, copy=False))
        if len(stored):
            dataset[start:start + len(stored)] = stored
        digest.update(stored.astype(dtype.newbyteorder("<"), copy=False).tobytes())
        start += len(stored)
    if start != n:
        raise ValueError(f"layer {name}: {start} rows written, {n} expected")
    return dataset, digest.hexdigest()


