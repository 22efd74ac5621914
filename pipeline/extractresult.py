"""What one extraction did: :class:`ExtractResult`, and its ``--report`` JSON."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .featurefile import FeatureFile

__all__ = ["ExtractResult", "result_from_file", "unfinished_result"]


@dataclass
class ExtractResult:
    """What one extraction did; ``to_report()`` gives the ``--report`` JSON."""

    path: Path | None  # the finished HDF5 file (None: a shard's part is done, other parts are missing)
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
    shard: str | None = None  # RANK/WORLD when this run extracted one part of the data
    n_missing: int = 0  # rows of other parts not extracted yet (the file is assembled when none are)

    @property
    def complete(self) -> bool:
        """Whether the finished file exists (always, except for a shard with parts missing)."""
        return self.path is not None

    @property
    def images_per_second(self) -> float:
        """Forward passes per second of wall time (0 when nothing was extracted)."""
        return self.n_extracted / self.seconds if self.n_extracted and self.seconds > 0 else 0.0

    def to_report(self) -> dict:
        return {
            "path": None if self.path is None else str(self.path),
            "complete": self.complete,
            "shard": self.shard,
            "n_missing": self.n_missing,
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


def result_from_file(features: FeatureFile, key: str, precision: str, n_extracted: int, started: float,
                     timings: dict, n_reused: int | None = None) -> ExtractResult:
    """The result of a run that ended with the finished file ``features``."""
    with features:
        layers = {}
        for name in features.layers:
            meta = features.layer_meta(name)
            dtype = features.stored_dtype(name)
            dims = features.dim(name)
            layers[name] = {
                "node": meta.node, "dim": int(dims), "pooling": meta.pooling,
                "pre_pool_shape": list(meta.pre_pool_shape), "stride": meta.stride, "dtype": str(dtype),
                "bytes_per_image": int(dims * dtype.itemsize),
            }
        n_images = features.n_rows()
        return ExtractResult(
            path=features.path, key=key, model=features.attrs["model"], precision=precision, n_images=n_images,
            n_extracted=n_extracted, n_reused=n_images - n_extracted if n_reused is None else n_reused,
            skipped=features.skipped, layers=layers, seconds=time.perf_counter() - started, timings=timings,
        )


def unfinished_result(key: str, model: str, precision: str, shard: str, *, n_images: int, n_extracted: int,
                      n_missing: int, started: float, timings: dict) -> ExtractResult:
    """The result of one rank of a sharded extraction that finished its part while other
    parts' rows are still missing: no file yet (``path`` None), ``n_missing`` rows to go."""
    return ExtractResult(path=None, key=key, model=model, precision=precision, n_images=n_images,
                         n_extracted=n_extracted, n_reused=max(0, n_images - n_missing - n_extracted), skipped=[],
                         layers={}, seconds=time.perf_counter() - started, timings=timings, shard=shard,
                         n_missing=n_missing)
