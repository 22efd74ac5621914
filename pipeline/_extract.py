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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .candidates import plain_layers
from .cache import CacheDir, PlannedRows, RowSource, ShardWriter, check_source
from .data import as_dataset
from .dataset import Dataset, Item
from .extractresult import ExtractResult, result_from_file, unfinished_result
from .device import default_workers, kernel_family, resolve_device, resolve_precision
from .errors import CacheCorruptError, ImageDecodeError, TlpInputError
from .featurefile import SCHEMA_VERSION, FeatureFile, LayerMeta, write_feature_file
from .files import fingerprint, library_versions, now_iso
from .folding import FOLD_ID
from .forward import Forward, ItemBytes, PreparedImages, batches
from .images import DECODER_ID
from .launch import Shard, launcher_device, resolve_shard
from .layers import Tap, resolve_taps, stride_of
from .models import ModelSpec, resolve_model
from .pooling import pooled_dim, pooling_for_taps
from .runlock import live_run
from .preprocess import RESIZE_METHOD
from .settings import ExtractSettings, key_entries, with_overrides

__all__ = ["ExtractSettings", "ExtractResult", "extract", "assemble"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- identity
def _versions(spec: ModelSpec) -> dict:
    names = ("torch", "torchvision", "pillow") + (("timm",) if spec.source in ("timm", "embedded") else ())
    return library_versions(*names)


def _extractor_identity(settings: ExtractSettings, spec: ModelSpec, precision: str, device: torch.device,
                        layers: list) -> tuple[dict, list]:
    """(everything except the data and the taps that decides the numbers, the taps).

    The settings' key fields give their entries (see :func:`tlp.settings.key_entries`),
    resolved: the model's identity, the precision and device type that will run, the
    resolved taps; the rest names the code that makes the pixels, the libraries and the
    kernel family that computes (see :func:`tlp.device.kernel_family`).
    """
    entries = key_entries(settings, {"model": spec.identity(), "precision": precision, "device": device.type,
                                     "layers": layers})
    taps = entries.pop("layers")
    if entries.get("tta") == "none":
        del entries["tta"]  # plain features keep the keys they had before --tta existed
    if entries.pop("fold_bn", False):
        entries["fold_bn"] = FOLD_ID  # unfolded features keep the keys they had before folding existed
    identity = {"schema_version": SCHEMA_VERSION, "decoder": DECODER_ID, "resize_method": RESIZE_METHOD,
                "memory_format": "channels_last", "versions": _versions(spec), "kernels": kernel_family(device),
                **entries}
    return identity, taps


def _layer_fingerprint(extractor_fp: str, tap: Tap, pooling: str) -> str:
    return fingerprint({"extractor": extractor_fp, "node": tap.node, "pool": pooling})


@dataclass
class _Plan:
    """What one extraction computes: the key and where each layer's rows are filed."""

    spec: ModelSpec
    device: torch.device
    precision: str
    taps: list[Tap]
    pools: dict[str, str]
    key_spec: dict
    key: str
    layer_fps: dict[str, str]  # tap name -> layer fingerprint
    run_fp: str  # the shard folder of this (extractor, layer set)


def _plan(settings: ExtractSettings, dataset) -> tuple[_Plan, Dataset]:
    """Resolve the model and taps (cheap: the network is not built), then scan the data if
    it is not a Dataset yet, then derive the key: a bad model name fails before a long scan."""
    spec = resolve_model(settings.model, weights=settings.weights, image_size=settings.image_size,
                         download=settings.download)
    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    # A fused entry (mid+late) extracts its parts: fusion happens at sweep time (tlp.candidates).
    taps = resolve_taps(spec, plain_layers(settings.layers, settings.model), memo_dir=Path(settings.cache_dir))
    pools = pooling_for_taps(settings.pool, [tap.name for tap in taps])
    dataset = as_dataset(dataset, on_error=settings.on_error, max_pixels=settings.max_pixels)
    extractor, layer_entries = _extractor_identity(settings, spec, precision, device,
                                                   [[tap.name, tap.node, pools[tap.name]] for tap in taps])
    extractor_fp = fingerprint(extractor)
    layer_fps = {tap.name: _layer_fingerprint(extractor_fp, tap, pools[tap.name]) for tap in taps}
    key_spec = {"extractor": extractor, "layers": layer_entries, "data": dataset.identity(),
                "skipped_before_extraction": [s.to_dict() for s in dataset.skipped]}
    plan = _Plan(spec=spec, device=device, precision=precision, taps=taps, pools=pools, key_spec=key_spec,
                 key=fingerprint(key_spec), layer_fps=layer_fps,
                 run_fp=fingerprint({"extractor": extractor_fp, "layers": sorted(layer_fps.values())}))
    return plan, dataset


# ----------------------------------------------------------------------------- public entry
def extract(data, settings: ExtractSettings | None = None, **overrides) -> ExtractResult:
    """Extract (or reuse) pooled multi-depth features of a data set into the cache.

    Parameters
    ----------
    data : Dataset, str or path
        A scanned :class:`~tlp.dataset.Dataset`, a folder (ImageFolder layout), a CSV
        manifest, or a built-in name (``"digits"``).
    settings : ExtractSettings, optional
        All options; keyword ``overrides`` replace single fields (``image_size=96``).

    Returns
    -------
    ExtractResult
        Where the features are and what this run did. With ``shard`` (``"RANK/WORLD"``,
        or ``"auto"``: from torchrun's or Slurm's variables), only the images whose
        content digest is in that part are extracted; the run that finds every part done
        assembles the file, the others return with ``complete`` False and ``n_missing``
        rows to go (see :func:`assemble`).
    """
    settings = with_overrides(settings or ExtractSettings(), overrides, "extract()").validated()
    shard = resolve_shard(settings.shard)
    if shard is not None:  # each rank of a launch on its own GPU (LOCAL_RANK)
        settings = dataclasses.replace(settings, device=launcher_device(settings.device))
    return _extract_or_assemble(data, settings, shard=shard, forward=True)


def assemble(data, settings: ExtractSettings | None = None, **overrides) -> ExtractResult:
    """The finished cache file of ``data`` from the rows already in the cache (the shards of
    ``tlp extract --shard`` runs and finished files), without a forward pass. Raises
    TlpInputError saying how many images have no rows yet (and the first few) and which
    command extracts them. Takes the options the extraction ran with (they make the key)."""
    settings = with_overrides(settings or ExtractSettings(), overrides, "assemble()").validated()
    return _extract_or_assemble(data, settings, shard=None, forward=False)


def _extract_or_assemble(data, settings: ExtractSettings, *, shard: Shard | None, forward: bool) -> ExtractResult:
    started = time.perf_counter()
    plan, dataset = _plan(settings, data)
    timings = {"plan_seconds": time.perf_counter() - started}  # model, taps, scan and key
    cache = CacheDir(settings.cache_dir)
    final = cache.file_for(plan.key)
    logger.debug("%s: cache key %s, %d images", dataset.name, plan.key, len(dataset.items))

    hit = _try_cache_hit(final, plan.key, settings.on_error)
    if hit is not None:
        return result_from_file(hit, plan.key, plan.precision, 0, started, timings)
    cache.remove_orphans()
    with live_run(cache.root, plan.run_fp):
        return _extract_missing(plan, dataset, settings, cache, started, timings, shard=shard, forward=forward)


def _extract_missing(plan: _Plan, dataset: Dataset, settings: ExtractSettings, cache: CacheDir, started: float,
                     timings: dict, *, shard: Shard | None = None, forward: bool = True) -> ExtractResult:
    """Reuse what donors hold, extract the rest (of this ``shard``'s part; nothing unless
    ``forward``), assemble when no row is missing; while the run is marked live.

    Planning repeats until every row has a checked source: another process extracting
    the same data may finish first and delete the shards it absorbed (then its finished
    file is a hit or a donor), and a donor whose rows fail their checksum is left out
    and its images extracted again.
    """
    final = cache.file_for(plan.key)
    excluded: set[Path] = {final}  # a finished file with this key failed its check (or is absent)
    new_metas: dict[str, LayerMeta] = {}
    forwarded: dict[str, Item] = {}  # path -> item this run passed forward
    for attempt in range(5):  # forward passes and "rows moved" retries; exclusions do not count
        hit = _try_cache_hit(final, plan.key, settings.on_error) if attempt else None
        if hit is not None:
            cache.drop_absorbed(plan.run_fp, cache.held_rows([final]))
            return _finished(hit, plan, forwarded, {s["path"] for s in hit.skipped}, started, timings)
        mark = time.perf_counter()
        sources, rows, todo, shard_skips = _checked_plan(dataset.items, cache, plan, excluded)
        timings["reuse_seconds"] = timings.get("reuse_seconds", 0.0) + time.perf_counter() - mark
        _refuse_recorded_failures(dataset, shard_skips, settings.on_error)
        own = [item for item in todo if shard is None or shard.owns(item.digest)] if forward else []
        if own:
            mark = time.perf_counter()
            new_metas.update(_run_forward(plan, dataset, own, settings, cache.partial_dir(plan.run_fp)))
            timings["forward_seconds"] = timings.get("forward_seconds", 0.0) + time.perf_counter() - mark
            forwarded.update((item.path, item) for item in own)
            continue  # the new shards are donors now; planning again sees other ranks' too
        if todo:  # other parts are not done: their ranks (the last to finish assembles), or assemble later
            return _unfinished(plan, dataset, todo, shard, forward, len(forwarded), cache, started, timings)
        skipped = [s.to_dict() for s in dataset.skipped] + [
            {"path": item.path, "reason": shard_skips[item.digest]} for item in dataset.items if item.digest in shard_skips
        ]
        mark = time.perf_counter()
        try:
            _assemble(final, plan, dataset, settings, rows=rows, metas=_layer_metas(plan, new_metas, sources),
                      skipped=skipped)
        except CacheCorruptError as error:  # changed on disk after it was checked
            logger.warning("%s: %s does not match its checksum; extracting its rows again",
                           Path(error.path).name, error.what)
            excluded.add(Path(error.path))
            continue
        except (FileNotFoundError, KeyError) as error:
            logger.info("rows moved while assembling (%s); planning again", error)
            continue
        finally:
            timings["assemble_seconds"] = timings.get("assemble_seconds", 0.0) + time.perf_counter() - mark
        features = FeatureFile(final)
        cache.drop_absorbed(plan.run_fp, cache.held_rows([final]))
        return _finished(features, plan, forwarded, {s["path"] for s in skipped}, started, timings)
    raise RuntimeError(f"could not assemble {final.name}: its rows kept moving (another process removing shards?)")


def _checked_plan(items: list[Item], cache: CacheDir, plan: _Plan, excluded: set[Path]):
    """(sources, rows, todo, recorded skips) where every finished file that gives rows
    passed its checks; a donor that fails is left out (with a warning) and the plan is
    made again without it, so its images come from elsewhere or are extracted again."""
    while True:
        sources = [s for s in cache.donors(plan.layer_fps.values(), plan.run_fp) if s.path not in excluded]
        rows, todo, shard_skips = _assign_rows(items, sources)
        bad = None
        for source in {id(source): source for source, _ in rows}.values():
            try:
                check_source(source)
            except TlpInputError as error:  # a checksum mismatch, or removed meanwhile
                reason = f"{error.what} does not match its checksum" if isinstance(error, CacheCorruptError) else error
                logger.warning("%s: %s; its rows are not reused", source.path.name, reason)
                bad = source.path
                break
        if bad is None:
            return sources, rows, todo, shard_skips
        excluded.add(bad)


def _finished(features: FeatureFile, plan: _Plan, forwarded: dict[str, Item], skipped_paths: set[str],
              started: float, timings: dict) -> ExtractResult:
    """The result: forward passes are the images this run extracted that are in the file
    (decode failures are not), every other row was reused."""
    n_extracted = sum(path not in skipped_paths for path in forwarded)
    return result_from_file(features, plan.key, plan.precision, n_extracted, started, timings,
                            n_reused=max(0, features.n_rows() - n_extracted))


def _unfinished(plan: _Plan, dataset: Dataset, todo: list[Item], shard: Shard | None, forward: bool,
                n_extracted: int, cache: CacheDir, started: float, timings: dict) -> ExtractResult:
    """Rows are missing after this run did its part: assembly refuses (nothing may be
    guessed), a shard's rank reports its part done."""
    if not forward or shard is None:
        examples = ", ".join(item.path for item in todo[:3])
        raise TlpInputError(
            f"cannot assemble {dataset.name}: {len(todo)} of {len(dataset.items)} images have no rows in "
            f"{cache.root} yet (first: {examples}); run the `tlp extract --shard` ranks whose parts are missing "
            "again, or `tlp extract` with the same options to extract them here")
    logger.info("part %s done; %d images of other parts have no rows yet: the rank that finishes last assembles "
                "the file (or run `tlp cache assemble` with the same options once every part is done)", shard,
                len(todo))
    return unfinished_result(plan.key, plan.spec.name, plan.precision, str(shard), n_images=len(dataset.items),
                             n_extracted=n_extracted, n_missing=len(todo), started=started, timings=timings)


def _refuse_recorded_failures(dataset: Dataset, recorded: dict[str, str], on_error: str) -> None:
    """Under ``--on-error fail``, a bad file that an earlier ``skip`` run recorded fails now
    as it would on a fresh cache, instead of being left out silently."""
    if on_error != "fail" or not recorded:
        return
    first = next(item for item in dataset.items if item.digest in recorded)
    raise ImageDecodeError(first.path, recorded[first.digest])


# ----------------------------------------------------------------------------- cache hit
def _try_cache_hit(final: Path, key: str, on_error: str) -> FeatureFile | None:
    """The finished file for ``key`` if it exists, is readable and passes its checksums
    (a mismatch is a miss: the file is recomputed and replaced, never served)."""
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
    try:
        features.check()
    except CacheCorruptError as error:
        features.close()
        logger.warning("cache file %s: %s does not match its checksum; extracting again", final.name, error.what)
        return None
    if on_error == "fail" and features.skipped:
        first = features.skipped[0]
        features.close()
        raise ImageDecodeError(first["path"], first["reason"])
    return features


# ----------------------------------------------------------------------------- planning
def _assign_rows(items: list[Item], sources: list[RowSource]):
    """For each item, the first source holding its rows; items with none are to do.

    Returns (rows, todo, skipped): rows lists (source, row) for items with rows, in item
    order; skipped maps digests that a shard recorded as undecodable to the reason.
    """
    rows, todo, skipped = [], [], {}
    for item in items:
        for source in sources:
            if item.digest in source.rows:
                rows.append((source, source.rows[item.digest]))
                break
            if item.digest in source.skipped:
                skipped[item.digest] = source.skipped[item.digest]
                break
        else:
            todo.append(item)
    return rows, todo, skipped


def _layer_metas(plan: _Plan, new_metas, sources) -> dict[str, LayerMeta]:
    metas = {}
    for tap in plan.taps:
        fp = plan.layer_fps[tap.name]
        found = new_metas.get(fp) or next((s.metas[fp] for s in sources if fp in s.metas), None)
        if found is None:
            raise TlpInputError("no image could be decoded, so no features exist; check the skipped files")
        metas[tap.name] = dataclasses.replace(found, name=tap.name, node=tap.node)
    return metas


# ----------------------------------------------------------------------------- forward pass
def _run_forward(plan: _Plan, dataset: Dataset, todo: list[Item], settings: ExtractSettings,
                 shard_dir: Path) -> dict[str, LayerMeta]:
    """Forward passes over ``todo``; commits shards; returns layer metadata by fingerprint."""
    from tqdm.auto import tqdm

    forward = Forward.for_taps(plan.spec, plan.taps, plan.pools, device=plan.device, precision=plan.precision,
                               tta=settings.tta, fold_bn=settings.fold_bn)
    prepare = PreparedImages(ItemBytes(dataset, todo), plan.spec.preprocessing, settings.max_pixels)
    writer = ShardWriter(shard_dir, plan.layer_fps.values(), settings.commit_every, settings.batch_size)
    bar = tqdm(total=len(todo), unit="img", desc=f"extract {plan.spec.name}", disable=not settings.progress,
               file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 5.0, smoothing=0.05)
    try:
        with bar:
            for batch in batches(prepare, len(todo), batch_size=settings.batch_size,
                                 workers=default_workers(settings.workers, plan.device),
                                 pin_memory=plan.device.type == "cuda"):
                if batch.failures and settings.on_error == "fail":
                    writer.commit()  # keep what is done; the user fixes the file and reruns
                    raise batch.failures[0][1]
                for _, error in batch.failures:
                    logger.warning("skipping %s: %s", error.path, error.reason)
                pooled = {}
                if batch.pixels is not None:
                    outputs = forward(batch.pixels, pad_to=settings.batch_size)
                    for tap in plan.taps:
                        fp = plan.layer_fps[tap.name]
                        writer.metas.setdefault(fp, _meta(tap, fp, forward.tap_shapes[tap.name], plan.pools[tap.name],
                                                          plan.spec.preprocessing.crop_size))
                        pooled[fp] = outputs[tap.name]
                writer.add([todo[p].digest for p in batch.good], pooled,
                           [(todo[p].digest, error.reason) for p, error in batch.failures])
                bar.update(len(batch.positions))
            writer.commit()
    except BaseException:
        # Commit finished batches even on Ctrl-C, so the rerun resumes from here.
        writer.commit()
        raise
    return writer.metas


def _meta(tap: Tap, fp: str, shape: tuple[int, ...], pooling: str, crop: int) -> LayerMeta:
    is_map = len(shape) == 3
    return LayerMeta(name=tap.name, node=tap.node, pooling=pooling if is_map else "none", pre_pool_shape=shape,
                     channels=shape[0], stride=stride_of(crop, shape[-1]) if is_map else None, layer_fingerprint=fp)


# ----------------------------------------------------------------------------- assembly
def _assemble(final: Path, plan: _Plan, dataset: Dataset, settings: ExtractSettings, *, rows, metas, skipped) -> None:
    skipped_paths = {s["path"] for s in skipped}
    kept = [item for item in dataset.items if item.path not in skipped_paths]
    if len(kept) != len(rows):
        raise RuntimeError(f"internal error: {len(kept)} kept images but {len(rows)} planned rows")
    from tqdm.auto import tqdm

    # Each layer is read from its shards and files and written a block of rows at a time;
    # that takes a while only for large caches.
    bar = tqdm(total=len(rows) * len(plan.taps), desc="assemble", unit="row", unit_scale=True, file=sys.stderr,
               disable=not settings.progress or len(rows) < 50_000, leave=False)
    layers = [(metas[tap.name], PlannedRows(rows, plan.layer_fps[tap.name],
                                            pooled_dim(metas[tap.name].pre_pool_shape, metas[tap.name].pooling),
                                            on_block=bar.update))
              for tap in plan.taps]
    spec = plan.spec
    root_attrs = {
        "schema_version": SCHEMA_VERSION, "key": plan.key, "model": spec.name, "arch": spec.arch,
        "weights_id": spec.weights_id, "weights_sha256": spec.weights_sha256,
        "preprocessing": spec.preprocessing.to_dict(), "precision": plan.precision, "storage_dtype": settings.dtype,
        "tta": settings.tta, "fold_bn": settings.fold_bn,
        "versions": plan.key_spec["extractor"]["versions"], "data_name": dataset.name, "data_kind": dataset.kind,
        "data_root": str(dataset.root) if dataset.root is not None else "", "created": now_iso(),
        "fingerprint_spec": {k: v for k, v in plan.key_spec.items() if k != "skipped_before_extraction"},
    }
    with bar:
        write_feature_file(
            final, root_attrs=root_attrs, classes=dataset.classes, paths=[item.path for item in kept],
            labels=np.asarray([item.label for item in kept], dtype=np.int64), digests=[item.digest for item in kept],
            skipped=skipped, layers=layers, dtype_policy=settings.dtype,
        )
