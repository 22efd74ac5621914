"""The GPU stage: run a frozen network once and cache pooled activations from several depths.

:func:`extract` is what ``tlp extract`` calls. Its steps, each cheap until the last:

1. resolve the model (weights file and sha256, preprocessing) without building it;
2. scan the data (sha256 of every file, header check of every image);
3. compute the cache key from everything that changes the numbers; a finished file
   with that key is a hit and nothing else runs;
4. find rows that other finished files or committed shards already hold (same
   per-layer fingerprint, same image digest): adding images extracts only the new ones,
   and a killed run resumes where it stopped;
5. run the forward pass over the rest, committing a shard at least every 256 images;
6. assemble the finished file atomically and drop the shards it absorbed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import cache as cache_mod
from .cache import CacheDir, FeatureFile, LayerMeta, RowSource, fingerprint, gather_rows
from .data import Dataset, Item, Skipped, load_dataset
from .device import autocast, resolve_device, resolve_precision, tune_cpu_allocator
from .errors import ImageDecodeError, TlpInputError
from .images import DECODER_ID, DEFAULT_MAX_PIXELS, decode_image
from .layers import Tap, build_tap_extractor, resolve_taps, stride_of
from .models import DEFAULT_MODEL, ModelSpec, Preprocessing, resolve_model
from .pooling import parse_pooling, pool, pooled_dim, pooling_for_taps
from .preprocess import RESIZE_METHOD, normalize, resize_and_crop

__all__ = ["ExtractSettings", "ExtractResult", "extract", "DEFAULT_LAYERS"]

logger = logging.getLogger(__name__)

DEFAULT_LAYERS = ("early", "mid", "late")
DTYPE_POLICIES = ("float16", "float32")


@dataclass(frozen=True)
class ExtractSettings:
    """Settings of one extraction. Fields marked *key* change the numbers, hence the cache key."""

    model: str = DEFAULT_MODEL  # key: model name, optionally ":WEIGHTS" (torchvision enum)
    layers: tuple[str, ...] = DEFAULT_LAYERS  # key: presets or graph node names
    pool: str = "avg"  # key: avg, max, avgmax, gridK, auto, or LAYER=POOL pairs
    image_size: int | None = None  # key: crop size override (None: from the weights)
    precision: str = "auto"  # key once resolved: auto, fp32, bf16, fp16
    dtype: str = "float16"  # key: storage dtype; float16 layers that overflow become float32
    weights: str | None = None  # key via sha256: None (default), "none", or a file path
    device: str = "auto"  # key once resolved (cpu and cuda kernels differ): auto, cpu, cuda
    on_error: str = "fail"  # fail: exit on the first bad file; skip: leave it out and report it
    max_pixels: int = DEFAULT_MAX_PIXELS  # images with more pixels are refused
    batch_size: int = 32  # not key: images per forward pass
    workers: int | None = None  # not key: DataLoader decoding processes; 0 = threads in this
    # process between forward passes. None: 0 on CPU (the forward pass uses every core), up to 8 on CUDA.
    cache_dir: str = "cache"  # not key: cache root
    download: bool = False  # not key: allow torchvision to download missing weights
    progress: bool = True  # not key: show a progress bar on stderr
    commit_every: int = 256  # not key: commit a shard at least every this many images

    def validated(self) -> "ExtractSettings":
        if isinstance(self.layers, str):
            layers = tuple(p.strip() for p in self.layers.split(",") if p.strip())
            return dataclasses.replace(self, layers=layers).validated()
        parse_pooling(self.pool)
        if self.dtype not in DTYPE_POLICIES:
            raise TlpInputError(f"--dtype must be float16 or float32, got {self.dtype!r}")
        for name in ("batch_size", "commit_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise TlpInputError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            raise TlpInputError(f"--workers must be 0 or more, got {self.workers!r}")
        return self


@dataclass
class ExtractResult:
    """What one extraction did; ``to_report()`` gives the ``--report`` JSON."""

    path: Path  # the finished HDF5 file
    key: str
    model: str
    precision: str
    n_images: int  # rows in the cache file
    n_extracted: int  # forward passes (images) this run
    n_reused: int  # rows taken from earlier work
    skipped: list[dict]  # files left out: {path, reason}
    layers: dict[str, dict]  # name -> {node, dim, pooling, pre_pool_shape, dtype, bytes_per_image}
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        """Forward passes per second of wall time (0 when nothing was extracted)."""
        return self.n_extracted / self.seconds if self.n_extracted and self.seconds > 0 else 0.0

    def to_report(self) -> dict:
        return {
            "path": str(self.path),
            "key": self.key,
            "model": self.model,
            "precision": self.precision,
            "n_images": self.n_images,
            "n_extracted": self.n_extracted,
            "n_reused": self.n_reused,
            "n_skipped": len(self.skipped),
            "skipped": self.skipped,
            "layers": self.layers,
            "seconds": round(self.seconds, 4),
            "images_per_second": round(self.images_per_second, 2),
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }


# ----------------------------------------------------------------------------- identity
def _versions(spec: ModelSpec) -> dict:
    import PIL
    import torchvision

    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__}
    if spec.source in ("timm", "embedded"):
        from importlib.metadata import version  # no `import timm`: a warm hit never needs it

        versions["timm"] = version("timm")
    return versions


def _extractor_identity(spec: ModelSpec, precision: str, device: torch.device, settings: ExtractSettings) -> dict:
    """Everything except the data and the taps that decides the numbers."""
    return {
        "schema_version": cache_mod.SCHEMA_VERSION,
        "model": spec.identity(),
        "decoder": DECODER_ID,
        "resize_method": RESIZE_METHOD,
        "max_pixels": settings.max_pixels,
        "precision": precision,
        "device": device.type,
        "memory_format": "channels_last",
        "storage_dtype": settings.dtype,
        "versions": _versions(spec),
    }


def _layer_fingerprint(extractor_fp: str, tap: Tap, pooling: str) -> str:
    return fingerprint({"extractor": extractor_fp, "node": tap.node, "pool": pooling})


# ----------------------------------------------------------------------------- public entry
def extract(data, settings: ExtractSettings | None = None, **overrides) -> ExtractResult:
    """Extract (or reuse) pooled multi-depth features of a data set into the cache.

    Parameters
    ----------
    data : str, path or Dataset
        A folder (ImageFolder layout), a CSV manifest, ``"digits"``, or a scanned
        :class:`~pipeline.data.Dataset`.
    settings : ExtractSettings, optional
        All options; keyword ``overrides`` replace single fields.

    Returns
    -------
    ExtractResult
        Where the features are and what this run did.
    """
    settings = dataclasses.replace(settings or ExtractSettings(), **overrides).validated()
    started = time.perf_counter()
    timings: dict[str, float] = {}

    spec = resolve_model(settings.model, weights=settings.weights, image_size=settings.image_size, download=settings.download)
    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    taps = resolve_taps(spec, settings.layers, memo_dir=Path(settings.cache_dir))
    timings["resolve_seconds"] = time.perf_counter() - started

    mark = time.perf_counter()
    dataset = data if isinstance(data, Dataset) else load_dataset(data, on_error=settings.on_error, max_pixels=settings.max_pixels)
    timings["scan_seconds"] = time.perf_counter() - mark

    extractor_identity = _extractor_identity(spec, precision, device, settings)
    extractor_fp = fingerprint(extractor_identity)
    pools = pooling_for_taps(settings.pool, [tap.name for tap in taps])
    layer_fps = {tap.name: _layer_fingerprint(extractor_fp, tap, pools[tap.name]) for tap in taps}
    run_fp = fingerprint({"extractor": extractor_fp, "layers": sorted(layer_fps.values())})
    key_spec = {
        "extractor": extractor_identity,
        "layers": [[tap.name, tap.node, pools[tap.name]] for tap in taps],
        "data": dataset.identity(),
        "skipped_before_extraction": [s.to_dict() for s in dataset.skipped],
    }
    key = fingerprint(key_spec)
    cache = CacheDir(settings.cache_dir)
    final = cache.file_for(key)

    hit = _try_cache_hit(final, key)
    if hit is not None:
        return _result_from_file(hit, key, spec, precision, 0, started, timings)

    mark = time.perf_counter()
    sources = cache.donors(layer_fps.values(), run_fp)
    plan, todo, shard_skips = _assign_rows(dataset.items, sources)
    timings["plan_seconds"] = time.perf_counter() - mark
    n_reused = len(plan)

    new_metas: dict[str, LayerMeta] = {}
    if todo:
        mark = time.perf_counter()
        new_metas = _run_forward(
            spec, taps, pools, dataset, todo, settings, device, precision,
            cache.partial_dir(run_fp), layer_fps,
        )
        timings["forward_seconds"] = time.perf_counter() - mark

    mark = time.perf_counter()
    for attempt in range(3):
        # Another process extracting the same data may finish first and delete the shards
        # it absorbed; then its finished file is a hit or a donor, so plan again.
        hit = _try_cache_hit(final, key)
        if hit is not None:
            return _result_from_file(hit, key, spec, precision, len(todo), started, timings, n_reused=n_reused)
        sources = cache.donors(layer_fps.values(), run_fp)
        plan, remaining, shard_skips = _assign_rows(dataset.items, sources)
        skipped = [s.to_dict() for s in dataset.skipped] + [
            {"path": item.path, "reason": shard_skips[item.digest]} for item in dataset.items if item.digest in shard_skips
        ]
        try:
            if remaining:
                raise FileNotFoundError(f"{len(remaining)} images lost their rows")
            metas = _layer_metas(taps, layer_fps, new_metas, sources)
            _assemble(final, key, key_spec, spec, precision, dataset, plan, taps, metas, layer_fps, skipped, settings)
            break
        except (FileNotFoundError, KeyError, OSError) as error:
            if attempt == 2:
                raise RuntimeError(f"could not assemble {final.name}: {error}") from error
            logger.info("rows moved while assembling (%s); planning again", error)
    timings["assemble_seconds"] = time.perf_counter() - mark
    _drop_absorbed_shards(cache, run_fp, final)
    with FeatureFile(final) as features:
        n_extracted = sum(item.digest not in shard_skips for item in todo)
        return _result_from_file(features, key, spec, precision, n_extracted, started, timings, n_reused=n_reused)


# ----------------------------------------------------------------------------- cache hit
def _try_cache_hit(final: Path, key: str) -> FeatureFile | None:
    if not final.exists():
        return None
    try:
        features = FeatureFile(final)
    except TlpInputError:
        logger.warning("cache file %s is unreadable; extracting again", final.name)
        final.unlink(missing_ok=True)
        return None
    if features.key != key:
        features.close()
        logger.warning("cache file %s holds key %s; extracting again", final.name, features.key[:12])
        final.unlink(missing_ok=True)
        return None
    return features


def _result_from_file(
    features: FeatureFile, key, spec, precision, n_extracted, started, timings, n_reused=None
) -> ExtractResult:
    with features:
        layers = {}
        for name in features.layers:
            meta = features.layer_meta(name)
            dtype = features.stored_dtype(name)
            dims = features.dim(name)
            layers[name] = {
                "node": meta.node,
                "dim": int(dims),
                "pooling": meta.pooling,
                "pre_pool_shape": list(meta.pre_pool_shape),
                "stride": meta.stride,
                "dtype": str(dtype),
                "bytes_per_image": int(dims * dtype.itemsize),
            }
        n_images = features.n_rows()
        result = ExtractResult(
            path=features.path,
            key=key,
            model=spec.name,
            precision=precision,
            n_images=n_images,
            n_extracted=n_extracted,
            n_reused=n_images - n_extracted if n_reused is None else n_reused,
            skipped=features.skipped,
            layers=layers,
            seconds=time.perf_counter() - started,
            timings=timings,
        )
    return result


# ----------------------------------------------------------------------------- planning
def _assign_rows(items: list[Item], sources: list[RowSource]):
    """For each item, the first source holding its rows; items with none are to do.

    Returns (plan, todo, skipped): plan lists (source, row) for items with rows, in
    item order; skipped maps digests that a shard recorded as undecodable to the reason.
    """
    plan, todo, skipped = [], [], {}
    for item in items:
        for source in sources:
            if item.digest in source.rows:
                plan.append((source, source.rows[item.digest]))
                break
            if item.digest in source.skipped:
                skipped[item.digest] = source.skipped[item.digest]
                break
        else:
            todo.append(item)
    return plan, todo, skipped


def _layer_metas(taps, layer_fps, new_metas, sources) -> dict[str, LayerMeta]:
    metas = {}
    for tap in taps:
        fp = layer_fps[tap.name]
        found = new_metas.get(fp) or next((s.metas[fp] for s in sources if fp in s.metas), None)
        if found is None:
            raise TlpInputError("no image could be decoded, so no features exist; check the skipped files")
        metas[tap.name] = dataclasses.replace(found, name=tap.name, node=tap.node)
    return metas


# ----------------------------------------------------------------------------- forward pass
def _prepare(dataset: Dataset, item: Item, prep: Preprocessing, max_pixels: int):
    """(uint8 (3, H, W) pixels, None) or (None, reason): failures are data, not exceptions."""
    try:
        image = decode_image(dataset.read_bytes(item), item.path, max_pixels=max_pixels)
    except ImageDecodeError as error:
        return None, error.reason
    return resize_and_crop(image, prep), None


def stack_channels_last(pixels: list[torch.Tensor]) -> torch.Tensor:
    """Stack (3, H, W) uint8 images as (B, H, W, 3) and view them as (B, 3, H, W):
    channels-last without a transposing copy."""
    return torch.stack([p.permute(1, 2, 0) for p in pixels]).permute(0, 3, 1, 2)


def _batch(positions, samples):
    """(positions, positions decoded, uint8 (B,3,H,W) or None, [(position, reason)])."""
    good = [(p, pixels) for p, (pixels, _) in zip(positions, samples) if pixels is not None]
    stacked = stack_channels_last([pixels for _, pixels in good]) if good else None
    failures = [(p, reason) for p, (pixels, reason) in zip(positions, samples) if pixels is None]
    return list(positions), [p for p, _ in good], stacked, failures


class _DecodeSet(torch.utils.data.Dataset):
    """Items to extract, for DataLoader workers: position -> (pixels or None, reason)."""

    def __init__(self, dataset: Dataset, items: list[Item], prep: Preprocessing, max_pixels: int):
        self.dataset, self.items, self.prep, self.max_pixels = dataset, items, prep, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int):
        return position, _prepare(self.dataset, self.items[position], self.prep, self.max_pixels)


def _collate(samples):
    return _batch([s[0] for s in samples], [s[1] for s in samples])


class _ThreadedBatches:
    """Batches decoded by a thread pool in this process, *between* forward passes.

    On a CPU the forward pass already keeps every core busy; decoding in worker
    processes at the same time makes its OpenMP threads wait for each other. Here the
    phases alternate and each uses all cores: PIL and torch's resize release the GIL.
    (A process pool alternating the same way measured slower here: 62-64 vs 67-74 img/s.)
    """

    def __init__(self, dataset: Dataset, items: list[Item], prep: Preprocessing, max_pixels: int,
                 batch_size: int):
        self.dataset, self.items, self.prep, self.max_pixels = dataset, items, prep, max_pixels
        self.batch_size = batch_size

    def _prepare(self, position: int):
        return _prepare(self.dataset, self.items[position], self.prep, self.max_pixels)

    def __iter__(self):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            for start in range(0, len(self.items), self.batch_size):
                positions = range(start, min(start + self.batch_size, len(self.items)))
                yield _batch(positions, list(pool.map(self._prepare, positions)))


def _batches(dataset, todo, prep, settings, device):
    """The decoding strategy: alternate with the forward pass on CPU, overlap on CUDA."""
    workers = settings.workers
    if workers is None:
        workers = 0 if device.type == "cpu" else max(1, min(8, os.cpu_count() or 1))
    if workers == 0:
        return _ThreadedBatches(dataset, todo, prep, settings.max_pixels, settings.batch_size)
    return DataLoader(
        _DecodeSet(dataset, todo, prep, settings.max_pixels),
        batch_size=settings.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4,
    )


class _ShardWriter:
    """Buffers pooled rows and commits them as shards (whole batches only, so a resumed
    run batches the remaining images exactly as an uninterrupted run would)."""

    def __init__(self, directory: Path, layer_fps: dict[str, str], commit_every: int, batch_size: int):
        self.directory, self.layer_fps = directory, layer_fps
        self.commit_every, self.batch_size = commit_every, batch_size
        self.digests: list[str] = []
        self.rows: dict[str, list[np.ndarray]] = {fp: [] for fp in layer_fps.values()}
        self.skipped: list[tuple[str, str]] = []
        self.metas: dict[str, LayerMeta] = {}

    def add(self, digests, pooled: dict[str, np.ndarray], skipped) -> None:
        self.digests.extend(digests)
        for fp, values in pooled.items():
            self.rows[fp].append(values)
        self.skipped.extend(skipped)
        if len(self.digests) + len(self.skipped) + self.batch_size > self.commit_every:
            self.commit()

    def commit(self) -> None:
        if not self.digests and not self.skipped:
            return
        features = {fp: np.concatenate(parts) if parts else np.zeros((0, 0), np.float32) for fp, parts in self.rows.items()}
        cache_mod.write_shard(self.directory, self.digests, features, self.skipped, self.metas)
        self.digests, self.skipped = [], []
        self.rows = {fp: [] for fp in self.layer_fps.values()}


def _run_forward(spec, taps, pools, dataset, todo, settings, device, precision, shard_dir, layer_fps) -> dict[str, LayerMeta]:
    """Forward passes over ``todo``; commits shards; returns layer metadata by fingerprint."""
    from tqdm.auto import tqdm

    prep = spec.preprocessing
    tune_cpu_allocator()
    model = spec.build()
    extractor = build_tap_extractor(spec, model, taps).to(device=device, memory_format=torch.channels_last)
    loader = _batches(dataset, todo, prep, settings, device)
    writer = _ShardWriter(shard_dir, {t.name: layer_fps[t.name] for t in taps}, settings.commit_every, settings.batch_size)
    bar = tqdm(
        total=len(todo), unit="img", desc=f"extract {spec.name}", disable=not settings.progress,
        file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 5.0, smoothing=0.05,
    )
    try:
        with torch.inference_mode(), bar:
            for positions, good, pixels, failures in loader:
                bad = [(todo[p].digest, reason, todo[p].path) for p, reason in failures]
                if bad and settings.on_error == "fail":
                    writer.commit()  # keep what is done; the user fixes the file and reruns
                    raise ImageDecodeError(bad[0][2], bad[0][1])
                for _, reason, path in bad:
                    logger.warning("skipping %s: %s", path, reason)
                pooled = {}
                if pixels is not None:
                    batch = normalize(pixels.to(device, non_blocking=True), prep)
                    with autocast(device, precision):
                        outputs = extractor(batch)
                    for tap in taps:
                        fp = layer_fps[tap.name]
                        tensor = outputs[tap.node]
                        if fp not in writer.metas:
                            writer.metas[fp] = _meta_from_tensor(tap, fp, tensor, pools[tap.name], prep.crop_size)
                        pooled[fp] = pool(tensor, pools[tap.name]).cpu().numpy()
                writer.add([todo[p].digest for p in good], pooled, [(d, r) for d, r, _ in bad])
                bar.update(len(positions))
            writer.commit()
    except BaseException:
        # Commit finished batches even on Ctrl-C, so the rerun resumes from here.
        writer.commit()
        raise
    return writer.metas


def _meta_from_tensor(tap: Tap, fp: str, tensor: torch.Tensor, pooling: str, crop: int) -> LayerMeta:
    shape = tuple(int(v) for v in tensor.shape[1:])
    is_map = len(shape) == 3
    stride = stride_of(crop, shape[-1]) if is_map else None
    return LayerMeta(
        name=tap.name,
        node=tap.node,
        pooling=pooling if is_map else "none",
        pre_pool_shape=shape,
        channels=shape[0],
        stride=stride,
        layer_fingerprint=fp,
    )


# ----------------------------------------------------------------------------- assembly
def _assemble(final, key, key_spec, spec, precision, dataset, plan, taps, metas, layer_fps, skipped, settings) -> None:
    skipped_paths = {s["path"] for s in skipped}
    kept = [item for item in dataset.items if item.path not in skipped_paths]
    if len(kept) != len(plan):
        raise RuntimeError(f"internal error: {len(kept)} kept images but {len(plan)} planned rows")
    layers = []
    for tap in taps:
        meta = metas[tap.name]
        dims = pooled_dim(meta.pre_pool_shape, meta.pooling)
        layers.append((meta, gather_rows(plan, layer_fps[tap.name], dims)))
    root_attrs = {
        "schema_version": cache_mod.SCHEMA_VERSION,
        "key": key,
        "model": spec.name,
        "arch": spec.arch,
        "weights_id": spec.weights_id,
        "weights_sha256": spec.weights_sha256,
        "preprocessing": spec.preprocessing.to_dict(),
        "precision": precision,
        "storage_dtype": settings.dtype,
        "versions": key_spec["extractor"]["versions"],
        "data_name": dataset.name,
        "data_kind": dataset.kind,
        "created": cache_mod.now_iso(),
        "fingerprint_spec": {k: v for k, v in key_spec.items() if k != "skipped_before_extraction"},
    }
    cache_mod.write_feature_file(
        final,
        root_attrs=root_attrs,
        classes=dataset.classes,
        paths=[item.path for item in kept],
        labels=np.asarray([item.label for item in kept], dtype=np.int64),
        digests=[item.digest for item in kept],
        skipped=skipped,
        layers=layers,
        dtype_policy=settings.dtype,
    )


def _drop_absorbed_shards(cache: CacheDir, run_fp: str, final: Path) -> None:
    """Delete shards whose every row now lives in ``final``; keep the rest for later runs."""
    with FeatureFile(final) as features:
        held = set(features.digests)
    directory = cache.partial_dir(run_fp)
    for shard in directory.glob("shard-*.h5"):
        if cache_mod.shard_merged(shard, held):
            shard.unlink(missing_ok=True)
    try:
        directory.rmdir()  # only if empty: another run on the same data may be writing in it
    except OSError:
        pass
