"""The feature cache folder: finished files, committed shards, reuse and clean-up.

Layout of a cache directory::

    <root>/<key>.h5                       finished files (see :mod:`tlp.featurefile`)
    <root>/.partial/<run>/shard-*.h5      work committed by a running (or killed) extraction
    <root>/.live/<run>.<pid>.<host>.<random>.lock   held by a running extraction (:mod:`tlp.runlock`)
    <root>/presets.json                   layer presets per architecture (a memo)

Progress is never appended to one file (a killed HDF5 writer leaves an unreadable
file): every commit is a small shard written atomically. A rerun reads the shards,
skips the images they hold, and the final file is assembled from shards and from rows
of other finished files whose layers were made identically (same per-layer
fingerprint, same image digest).

Nothing is served or absorbed unchecked: a shard carries the sha256 of its digests and
of each layer's rows, checked before its rows are used (a mismatch deletes the shard
and its images are extracted again), and rows taken from a finished file are read
through its per-layer sha256 (:func:`tlp.featurefile.read_verified`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from .errors import CacheCorruptError, TlpInputError
from .featurefile import STRING_DTYPE, FeatureFile, LayerMeta, read_strings, read_verified
from .files import array_sha256, atomic_h5, fingerprint, remove_orphans
from .runlock import live_runs

__all__ = ["CacheDir", "RowSource", "HeldRows", "ShardWriter", "write_shard", "gather_rows", "PlannedRows",
           "check_source", "shard_merged"]

logger = logging.getLogger(__name__)


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
        handle.create_dataset("digests", data=np.asarray(digests, dtype=object), dtype=STRING_DTYPE)
        handle.create_dataset("skipped_digests", data=np.asarray([d for d, _ in skipped], dtype=object), dtype=STRING_DTYPE)
        handle.create_dataset("skipped_reasons", data=np.asarray([r for _, r in skipped], dtype=object), dtype=STRING_DTYPE)
        handle.attrs["index_sha256"] = _shard_index_sha256(digests, skipped)
        group = handle.create_group("features")
        for layer_fp, values in features.items():
            rows = np.asarray(values, dtype=np.float32)
            dataset = group.create_dataset(layer_fp, data=rows)
            dataset.attrs["sha256"] = array_sha256(rows)
            if layer_fp in metas:
                for key, value in metas[layer_fp].attrs().items():
                    dataset.attrs[key] = value
    return final


def _shard_index_sha256(digests, skipped) -> str:
    return fingerprint({"digests": list(digests), "skipped": [list(pair) for pair in skipped]})


class ShardWriter:
    """Buffers pooled rows of one extraction and commits them as shards under ``directory``
    (whole batches only, so a resumed run batches the remaining images exactly as an
    uninterrupted run would). ``metas`` (layer fingerprint -> LayerMeta) is filled by
    the caller on the first batch and written into every shard."""

    def __init__(self, directory: Path, layer_fps: Iterable[str], commit_every: int, batch_size: int):
        self.directory, self.layer_fps = directory, list(layer_fps)
        self.commit_every, self.batch_size = commit_every, batch_size
        self.metas: dict[str, LayerMeta] = {}
        self._clear()

    def _clear(self) -> None:
        self.digests: list[str] = []
        self.rows: dict[str, list[np.ndarray]] = {fp: [] for fp in self.layer_fps}
        self.skipped: list[tuple[str, str]] = []

    def add(self, digests, pooled: dict[str, np.ndarray], skipped) -> None:
        """Rows of one batch (``pooled``: layer fingerprint -> (B, D)) and its undecodable files."""
        self.digests.extend(digests)
        for fp, values in pooled.items():
            self.rows[fp].append(values)
        self.skipped.extend(skipped)
        if len(self.digests) + len(self.skipped) + self.batch_size > self.commit_every:
            self.commit()

    def commit(self) -> None:
        if not self.digests and not self.skipped:
            return
        features = {fp: np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
                    for fp, parts in self.rows.items()}
        write_shard(self.directory, self.digests, features, self.skipped, self.metas)
        self._clear()


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

    def drop_absorbed(self, run_fingerprint: str, held: list[HeldRows]) -> None:
        """Delete a run's shards whose every row finished files now hold (``held``: see
        :meth:`held_rows`); keep the rest for later runs."""
        folder = self.partial_dir(run_fingerprint)
        for shard in folder.glob("shard-*.h5"):
            if shard_merged(shard, held):
                shard.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # only if empty: another run may be writing in it
            folder.rmdir()

    def held_rows(self, paths: Iterable[Path] | None = None) -> list[HeldRows]:
        """What finished files (all, or ``paths``) hold, one entry per readable file whose
        checksums pass: a file that fails them cannot serve its rows, so it holds none."""
        held = []
        for path in self.finished_files() if paths is None else paths:
            try:
                with FeatureFile(path) as features:
                    features.check()
                    fps = frozenset(features.layer_meta(name).layer_fingerprint for name in features.layers)
                    held.append(HeldRows(fps, frozenset(features.digests)))
            except TlpInputError:  # unreadable, failing its checksums, or removed meanwhile
                continue
        return held

    # -- maintenance -------------------------------------------------------------------
    def remove_orphans(self) -> list[tuple[Path, int]]:
        """Delete temporary files whose writer is dead (a killed assembly leaves one the
        size of the final file); every extraction does this first, cheaply."""
        return remove_orphans(self.root, ".*.tmp.*", ".partial/*/.*.tmp.*")

    def shards(self) -> list[Path]:
        partial_root = self.root / ".partial"
        return sorted(partial_root.glob("*/shard-*.h5")) if partial_root.is_dir() else []

    def gc(self, *, partial: bool = False) -> list[tuple[Path, int]]:
        """Delete what no run needs: temporary files of dead writers, unreadable finished
        files, and shards whose rows finished files hold *for the same layers*; with
        ``partial=True`` also every other shard of runs that are not live. Work of a
        live run (see :mod:`tlp.runlock`) is never removed. Returns (path, bytes)."""
        removed = self.remove_orphans()
        readable = []
        for path in self.finished_files():
            try:
                with FeatureFile(path):
                    readable.append(path)
            except TlpInputError:
                logger.warning("removing unreadable cache file %s", path.name)
                removed.append(_remove(path))
        held = self.held_rows(readable)
        # Shards first, live runs second: a run takes its lock before it writes a shard,
        # so every shard listed here whose run is running has its lock seen below.
        shards = self.shards()
        live = live_runs(self.root)
        for shard in shards:
            if shard.parent.name in live:
                continue
            if partial or shard_merged(shard, held):
                removed.append(_remove(shard))
        for directory in self._partial_dirs():
            with contextlib.suppress(OSError):  # not empty (a run just wrote in it), or gone
                if directory.name not in live and not any(directory.iterdir()):
                    directory.rmdir()
        return removed

    def _partial_dirs(self) -> list[Path]:
        partial_root = self.root / ".partial"
        return [d for d in partial_root.iterdir() if d.is_dir()] if partial_root.is_dir() else []

    def verify_shards(self) -> list[tuple[Path, list[str]]]:
        """(shard, problems) for every committed shard; empty problems when it is sound."""
        found = []
        for shard in self.shards():
            try:
                with h5py.File(shard, "r") as handle:
                    problems = _shard_problems(handle, set(handle["features"].keys()))
            except (OSError, KeyError) as error:
                problems = [f"unreadable ({error})"]
            found.append((shard, problems))
        return found


def _remove(path: Path) -> tuple[Path, int]:
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:  # removed meanwhile (another gc, or the run that absorbed it)
        size = 0
    return path, size


@dataclass(frozen=True)
class HeldRows:
    """The rows one finished file holds: its layer fingerprints and image digests."""

    layer_fps: frozenset[str]
    digests: frozenset[str]


def shard_merged(shard: Path, held: list[HeldRows]) -> bool:
    """Whether finished files hold every row of ``shard`` as a run of its layer set could
    reuse them: each image by a file that holds *all* the shard's layers (a run takes an
    image's rows from one file). Rows of another layer set are not merged, whatever
    images they share, nor rows split between two files of other layer sets."""
    try:
        with h5py.File(shard, "r") as handle:
            digests = set(read_strings(handle["digests"]))
            fps = set(handle["features"].keys())
    except (OSError, KeyError):
        return True  # unreadable shards are useless
    covered = set().union(*(h.digests for h in held if fps <= h.layer_fps))
    return digests <= covered


def _shard_problems(handle: h5py.File, layer_fps: set[str]) -> list[str]:
    """What is wrong with an open shard's checksums (index and the given layers)."""
    if "index_sha256" not in handle.attrs:
        return ["written without checksums (before tlp 0.3)"]
    skipped = list(zip(read_strings(handle["skipped_digests"]), read_strings(handle["skipped_reasons"])))
    problems = []
    if _shard_index_sha256(read_strings(handle["digests"]), skipped) != str(handle.attrs["index_sha256"]):
        problems.append("its image digests do not match their checksum")
    for fp in sorted(layer_fps):
        dataset = handle["features"][fp]
        try:  # memoised by path: assembly reading these rows again does not hash them again
            if dataset.shape[0]:
                read_verified(dataset, rows=np.empty(0, dtype=np.int64), memo_path=Path(handle.filename))
        except CacheCorruptError:
            problems.append(f"rows of layer {fp[:12]} do not match their checksum")
    return problems


def _shard_source(path: Path, wanted: set[str]) -> RowSource | None:
    try:
        with h5py.File(path, "r") as handle:
            present = set(handle["features"].keys())
            if not wanted <= present:
                return None
            if "index_sha256" not in handle.attrs:
                return None  # written before shards carried checksums: cannot be checked
            problems = _shard_problems(handle, wanted)
            if problems:
                # Never absorb rows that changed on disk: the final file's sha256 would be
                # computed over them and `verify` would call it sound. Recompute instead.
                logger.warning("shard %s is not used (%s); its images are extracted again",
                               path.name, "; ".join(problems))
                path.unlink(missing_ok=True)
                return None
            rows = {d: i for i, d in enumerate(read_strings(handle["digests"]))}
            skipped = dict(zip(read_strings(handle["skipped_digests"]), read_strings(handle["skipped_reasons"])))
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
            rows = {d: i for i, d in enumerate(read_strings(handle["index/digests"]))}
            metas = {fp: LayerMeta.from_dataset(by_fp[fp], handle["features"][by_fp[fp]]) for fp in wanted}
    except (OSError, KeyError) as error:
        logger.warning("ignoring unreadable cache file %s (%s)", path.name, error)
        return None
    return RowSource(path, {fp: f"features/{by_fp[fp]}" for fp in wanted}, rows, {}, metas)


def check_source(source: RowSource) -> None:
    """Check a finished-file donor before any of its rows is used: its index (digests
    must still name the right rows) and the layers the run takes from it; raises
    :class:`~tlp.errors.CacheCorruptError`. Memoised per process, so a donor is hashed
    once however often it is planned with. Shards were checked when they were read."""
    if source.path.name.startswith("shard-"):
        return
    with FeatureFile(source.path) as features:
        features.check([name.split("/", 1)[1] for name in source.datasets.values()])


# Rows per block when a finished file is assembled: ~32 MiB of float32 (6,553 rows of 1,280).
ASSEMBLY_BLOCK_BYTES = 32 << 20


class PlannedRows:
    """One layer's rows in plan order, read from their sources one block of rows at a time
    (for :func:`tlp.featurefile.write_feature_file`): assembling a million images holds a
    block, not the layer (5 GB of float32 at 1,280 dimensions)."""

    def __init__(self, plan: list[tuple[RowSource, int]], layer_fp: str, dims: int, block_rows: int | None = None,
                 on_block=None):
        self.plan, self.layer_fp = plan, layer_fp
        self.shape = (len(plan), dims)
        self.block_rows = block_rows or max(1, ASSEMBLY_BLOCK_BYTES // (4 * max(1, dims)))
        self.on_block = on_block  # called with each block's row count once it is read (a progress bar)

    def chunks(self):
        for start in range(0, max(1, len(self.plan)), self.block_rows):
            block = gather_rows(self.plan[start:start + self.block_rows], self.layer_fp, self.shape[1])
            if self.on_block is not None:
                self.on_block(len(block))
            yield block


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
            # Every row that goes into a finished file is read from checked data.
            out[np.asarray(positions)] = read_verified(dataset, rows=np.asarray(rows), memo_path=path)
    return out
