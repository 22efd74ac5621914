"""The feature cache: one self-describing HDF5 file per fingerprint, written atomically.

Layout of a cache directory::

    <root>/<key>.h5                       finished files, readable with plain h5py
    <root>/.partial/<run>/shard-*.h5      work committed by a running (or killed) extraction

A finished file is never modified: it is written under a temporary name in the same
directory, fsynced, renamed into place and the directory fsynced, so a reader sees
either nothing or a whole file. A killed HDF5 writer leaves an unreadable file, so
progress is not appended to one file either: every commit is a small shard written
the same atomic way. A rerun reads the shards, skips the images they hold, and the
final file is assembled from shards and from rows of other finished files whose
layers were made identically (same per-layer fingerprint, same image digest).

File contract (see DESIGN.md, "Cache contract")::

    /index/paths     (N,) str      relative image paths
    /index/labels    (N,) int64    class indices; class names in the attribute "classes"
    /index/digests   (N,) str      sha256 of each image's bytes (for reuse across data sets)
    /index/skipped_paths, /index/skipped_reasons   files left out under --on-error skip
    /features/<layer> (N, D) float16|float32, chunked by rows; attributes: node, pooling,
                      pre_pool_shape, channels, stride, layer_fingerprint, sha256
    root attributes:  schema_version, key, model, weights_id, weights_sha256,
                      preprocessing (JSON), precision, versions (JSON), created, ...
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import hashlib
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import h5py
import numpy as np

from .errors import TlpInputError

__all__ = [
    "SCHEMA_VERSION",
    "fingerprint",
    "FeatureFile",
    "LayerMeta",
    "CacheDir",
    "atomic_h5",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FLOAT16_MAX = float(np.finfo(np.float16).max)
_STR = h5py.string_dtype("utf-8")
_CHUNK_BYTES = 1 << 20  # ~1 MiB row chunks: whole-row reads, no re-decompression


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


# ----------------------------------------------------------------------------- atomic writes
def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(final: Path) -> Path:
    # The pid lets `tlp cache gc` tell an orphan (dead writer) from work in progress.
    return final.with_name(f".{final.name}.tmp.{os.getpid()}.{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_h5(final: Path) -> Iterator[h5py.File]:
    """Write an HDF5 file that appears at ``final`` complete or not at all."""
    final = Path(final)
    temp = temp_name(final)
    try:
        _create_in(temp)
        with h5py.File(temp, "w", libver=("earliest", "v110")) as handle:
            yield handle
        with open(temp, "rb+") as raw:
            os.fsync(raw.fileno())
        os.replace(temp, final)
        _fsync_dir(final.parent)
    finally:
        if temp.exists():
            temp.unlink()


def _create_in(temp: Path, attempts: int = 5) -> None:
    """Create the empty file ``temp``, and its folder if needed.

    Another process that finishes the same extraction removes the shard folder once it
    looks empty (see ``extract._drop_absorbed_shards``). It can do that between our
    ``mkdir`` and our open; then we make the folder again. Once our file exists, the
    folder is not empty and stays.
    """
    for attempt in range(attempts):
        temp.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise


# ----------------------------------------------------------------------------- reading
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


def _strings(dataset: h5py.Dataset) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in dataset[()]]


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
            if name in ("preprocessing", "versions", "fingerprint_spec") and isinstance(value, str):
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
        return _strings(self._file["index/paths"])

    @property
    def labels(self) -> np.ndarray:
        return self._file["index/labels"][()]

    @property
    def digests(self) -> list[str]:
        return _strings(self._file["index/digests"])

    @property
    def skipped(self) -> list[dict]:
        index = self._file["index"]
        if "skipped_paths" not in index:
            return []
        return [
            {"path": p, "reason": r}
            for p, r in zip(_strings(index["skipped_paths"]), _strings(index["skipped_reasons"]))
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
        """The (N, D) features of one layer, upcast to ``dtype`` (float32 by default)."""
        return self._dataset(name)[()].astype(dtype, copy=False)

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
        for name in self.layers:
            dataset = self._dataset(name)
            if dataset.shape[0] != n:
                problems.append(f"layer {name} has {dataset.shape[0]} rows, index {n}")
            if array_sha256(dataset[()]) != dataset.attrs.get("sha256"):
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
    layers: list[tuple[LayerMeta, np.ndarray]],
    dtype_policy: str,
) -> dict[str, np.dtype]:
    """Write a finished cache file atomically; returns the stored dtype of each layer."""
    n = len(paths)
    dtypes = {}
    with atomic_h5(final) as handle:
        for name, value in root_attrs.items():
            handle.attrs[name] = canonical_json(value) if isinstance(value, (dict, list)) else value
        index = handle.create_group("index")
        index.attrs["classes"] = np.asarray(classes, dtype=object).astype(_STR) if classes else np.asarray([], dtype=_STR)
        index.create_dataset("paths", data=np.asarray(paths, dtype=object), dtype=_STR)
        index.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
        index.create_dataset("digests", data=np.asarray(digests, dtype=object), dtype=_STR)
        index.create_dataset("skipped_paths", data=np.asarray([s["path"] for s in skipped], dtype=object), dtype=_STR)
        index.create_dataset("skipped_reasons", data=np.asarray([s["reason"] for s in skipped], dtype=object), dtype=_STR)
        features = handle.create_group("features")
        features.attrs["order"] = np.asarray([meta.name for meta, _ in layers], dtype=object).astype(_STR)
        for meta, values in layers:
            dtype = storage_dtype(values, dtype_policy)
            stored = values.astype(dtype, copy=False)
            dims = stored.shape[1]
            dataset = features.create_dataset(
                meta.name,
                data=stored,
                chunks=(_row_chunks(n, dims * dtype.itemsize), max(1, dims)) if n else None,
            )
            for key, value in meta.attrs().items():
                dataset.attrs[key] = value
            dataset.attrs["sha256"] = array_sha256(stored)
            dataset.attrs["bytes_per_image"] = int(dims * dtype.itemsize)
            dtypes[meta.name] = dtype
    return dtypes


# ----------------------------------------------------------------------------- shards
def write_shard(
    directory: Path,
    digests: list[str],
    features: dict[str, np.ndarray],
    skipped: list[tuple[str, str]],
    metas: dict[str, LayerMeta],
) -> Path:
    """Commit one block of work: float32 rows keyed by layer fingerprint, plus skips."""
    name = hashlib.sha256("\n".join(digests + [d for d, _ in skipped]).encode()).hexdigest()[:24]
    final = Path(directory) / f"shard-{name}.h5"
    with atomic_h5(final) as handle:
        handle.create_dataset("digests", data=np.asarray(digests, dtype=object), dtype=_STR)
        handle.create_dataset("skipped_digests", data=np.asarray([d for d, _ in skipped], dtype=object), dtype=_STR)
        handle.create_dataset("skipped_reasons", data=np.asarray([r for _, r in skipped], dtype=object), dtype=_STR)
        group = handle.create_group("features")
        for layer_fp, values in features.items():
            dataset = group.create_dataset(layer_fp, data=np.asarray(values, dtype=np.float32))
            if layer_fp in metas:
                for key, value in metas[layer_fp].attrs().items():
                    dataset.attrs[key] = value
    return final


@dataclass(frozen=True)
class RowSource:
    """Where already-computed rows for some image digests live."""

    path: Path
    datasets: dict[str, str]  # layer fingerprint -> dataset path inside the file
    rows: dict[str, int]  # image digest -> row
    skipped: dict[str, str]  # image digest -> reason (shards only)
    metas: dict[str, LayerMeta]  # layer fingerprint -> how the rows were made


class CacheDir:
    """A cache root: finished files, partial shards, and the queries extraction needs."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    def file_for(self, key: str) -> Path:
        return self.root / f"{key}.h5"

    def partial_dir(self, run_fingerprint: str) -> Path:
        return self.root / ".partial" / run_fingerprint

    def finished_files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("*.h5") if not p.name.startswith("."))

    def resolve(self, key_or_prefix: str) -> Path:
        """Path of the finished file whose key starts with ``key_or_prefix`` (unique)."""
        prefix = key_or_prefix.strip()
        if prefix.endswith(".h5"):
            prefix = Path(prefix).stem
        matches = [p for p in self.finished_files() if p.stem.startswith(prefix)] if prefix else []
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise TlpInputError(
                f"no cache entry {key_or_prefix!r} in {str(self.root)!r}; list them with `tlp cache ls`"
            )
        raise TlpInputError(
            f"cache key prefix {key_or_prefix!r} matches {len(matches)} entries; give more characters"
        )

    # -- donors ------------------------------------------------------------------------
    def donors(self, layer_fingerprints: Iterable[str], run_fingerprint: str) -> list[RowSource]:
        """Files and shards that hold rows for *all* the given layer fingerprints."""
        wanted = set(layer_fingerprints)
        sources = []
        for path in sorted(self.partial_dir(run_fingerprint).glob("shard-*.h5")):
            source = _shard_source(path, wanted)
            if source is not None:
                sources.append(source)
        for path in self.finished_files():
            source = _finished_source(path, wanted)
            if source is not None:
                sources.append(source)
        return sources

    # -- maintenance -------------------------------------------------------------------
    def temp_files(self) -> list[Path]:
        found = glob.glob(str(self.root / ".*.tmp.*")) + glob.glob(str(self.root / ".partial" / "*" / ".*.tmp.*"))
        return [Path(p) for p in found]

    def gc(self, *, partial: bool = False) -> list[tuple[Path, int]]:
        """Delete orphaned temporary files (their writer is dead), unreadable finished
        files, shards already merged into a finished file, and with ``partial=True``
        all in-progress shards. Returns (path, bytes) of what was removed."""
        removed = []
        for temp in self.temp_files():
            if not _writer_alive(temp):
                removed.append(_remove(temp))
        merged_digests: set[str] = set()
        for path in self.finished_files():
            try:
                with FeatureFile(path) as features:
                    merged_digests.update(features.digests)
            except TlpInputError:
                logger.warning("removing unreadable cache file %s", path.name)
                removed.append(_remove(path))
        partial_root = self.root / ".partial"
        for shard in sorted(partial_root.glob("*/shard-*.h5")) if partial_root.is_dir() else []:
            if partial or shard_merged(shard, merged_digests):
                removed.append(_remove(shard))
        if partial_root.is_dir():
            for directory in partial_root.iterdir():
                if directory.is_dir() and not any(directory.iterdir()):
                    with contextlib.suppress(OSError):  # a running extraction just wrote in it
                        directory.rmdir()
        return removed


def _remove(path: Path) -> tuple[Path, int]:
    size = path.stat().st_size if path.exists() else 0
    path.unlink(missing_ok=True)
    return path, size


def _writer_alive(temp: Path) -> bool:
    try:
        pid = int(temp.name.split(".tmp.")[1].split(".")[0])
    except (IndexError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    # Our own pid cannot be mid-write while we collect garbage: it is a leftover of an
    # earlier process that had the same pid.
    return pid != os.getpid()


def shard_merged(shard: Path, merged_digests: set[str]) -> bool:
    try:
        with h5py.File(shard, "r") as handle:
            return set(_strings(handle["digests"])) <= merged_digests
    except OSError:
        return True  # unreadable shards are useless


def _shard_source(path: Path, wanted: set[str]) -> RowSource | None:
    try:
        with h5py.File(path, "r") as handle:
            present = set(handle["features"].keys())
            if not wanted <= present:
                return None
            rows = {d: i for i, d in enumerate(_strings(handle["digests"]))}
            skipped = dict(zip(_strings(handle["skipped_digests"]), _strings(handle["skipped_reasons"])))
            metas = {
                fp: LayerMeta.from_dataset(fp, handle["features"][fp])
                for fp in wanted
                if "node" in handle["features"][fp].attrs
            }
    except (OSError, KeyError) as error:
        logger.warning("ignoring unreadable shard %s (%s)", path.name, error)
        return None
    return RowSource(path, {fp: f"features/{fp}" for fp in wanted}, rows, skipped, metas)


def _finished_source(path: Path, wanted: set[str]) -> RowSource | None:
    try:
        with h5py.File(path, "r") as handle:
            by_fp = {
                str(ds.attrs.get("layer_fingerprint", "")): name
                for name, ds in handle["features"].items()
            }
            if not wanted <= set(by_fp):
                return None
            rows = {d: i for i, d in enumerate(_strings(handle["index/digests"]))}
            metas = {fp: LayerMeta.from_dataset(by_fp[fp], handle["features"][by_fp[fp]]) for fp in wanted}
    except (OSError, KeyError) as error:
        logger.warning("ignoring unreadable cache file %s (%s)", path.name, error)
        return None
    return RowSource(path, {fp: f"features/{by_fp[fp]}" for fp in wanted}, rows, {}, metas)


def gather_rows(
    plan: list[tuple[RowSource, int]], layer_fp: str, dims: int
) -> np.ndarray:
    """Rows for one layer, in plan order, read from their sources (float32)."""
    out = np.empty((len(plan), dims), dtype=np.float32)
    by_source: dict[Path, tuple[RowSource, list[int], list[int]]] = {}
    for position, (source, row) in enumerate(plan):
        entry = by_source.setdefault(source.path, (source, [], []))
        entry[1].append(position)
        entry[2].append(row)
    for path, (source, positions, rows) in by_source.items():
        with h5py.File(path, "r") as handle:
            dataset = handle[source.datasets[layer_fp]]
            rows_array = np.asarray(rows)
            if len(rows) * 10 >= dataset.shape[0] or dataset.shape[0] <= 4096:
                block = dataset[()]
                values = block[rows_array]
            else:
                order = np.argsort(rows_array)
                values = np.empty((len(rows), dataset.shape[1]), dtype=dataset.dtype)
                values[order] = dataset[rows_array[order]]
            out[np.asarray(positions)] = values
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
