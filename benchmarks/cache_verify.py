"""What does checking a cache hit cost? ``FeatureFile.load`` against the plain h5py read it replaced.

Every read of a finished file's layer now streams the stored values through sha256 and
compares with the digest written with them (a mismatch is a miss, never served). This
script measures that cost side by side, in one process, on synthetic finished files of
the sizes a sweep reads (float16, 1,280 dimensions, the default model's ``late`` layer):

plain read (the baseline)
    ``h5py.File(path)["features/late"][()]`` upcast to float32: what ``load`` did before.
checked read, first
    ``FeatureFile(path).load("late")`` in a process that has not checked the file yet
    (the in-process memo is cleared before each repeat): read + sha256 + upcast.
checked read, again
    The same call once more: a sweep reads what extraction's hit check just verified, and
    the memo (file, inode, size, mtime) skips the second hash.

The page cache is warmed before timing, so disk speed is not measured (a cold disk
makes the read slower and the ratio smaller). Medians of ``--repeats`` interleaved runs.
Target: the first checked read costs < 2x the plain read; for scale, a default sweep
over 2,000 rows takes tens of seconds (see ``benchmarks/sweep.py``).

    .venv/bin/python benchmarks/cache_verify.py --json benchmarks/results/cache_verify.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from tlp.featurefile import FeatureFile, LayerMeta, forget_checks, write_feature_file

DIMS = 1280


def _write(path: Path, rows: int) -> None:
    rng = np.random.default_rng(rows)
    values = rng.standard_normal((rows, DIMS), dtype=np.float32)
    meta = LayerMeta(name="late", node="bn2", pooling="avg", pre_pool_shape=(DIMS, 7, 7), channels=DIMS, stride=32,
                     layer_fingerprint="f" * 64)
    write_feature_file(path, root_attrs={"schema_version": 1, "key": path.stem}, classes=["a", "b"],
                       paths=[f"x/{i}.jpg" for i in range(rows)], labels=np.arange(rows) % 2,
                       digests=[f"{i:064x}" for i in range(rows)], skipped=[], layers=[(meta, values)],
                       dtype_policy="float16")


def _plain(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as handle:
        return handle["features/late"][()].astype(np.float32)


def _checked(path: Path) -> np.ndarray:
    with FeatureFile(path) as features:
        return features.load("late")


def _seconds(call, path: Path) -> float:
    started = time.perf_counter()
    call(path)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="2000,10000,50000")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for rows in [int(r) for r in args.rows.split(",")]:
            path = Path(folder) / f"{rows:064d}.h5"
            _write(path, rows)
            np.testing.assert_array_equal(_plain(path), _checked(path))  # same numbers either way
            times = {"plain": [], "checked_first": [], "checked_again": []}
            for _ in range(args.repeats):
                times["plain"].append(_seconds(_plain, path))
                forget_checks()
                times["checked_first"].append(_seconds(_checked, path))
                times["checked_again"].append(_seconds(_checked, path))
            medians = {name: statistics.median(values) for name, values in times.items()}
            results.append({"rows": rows, "megabytes": path.stat().st_size / 1e6,
                            **{f"{name}_seconds": round(value, 5) for name, value in medians.items()},
                            "first_over_plain": round(medians["checked_first"] / medians["plain"], 3),
                            "again_over_plain": round(medians["checked_again"] / medians["plain"], 3)})
    print(f"{'rows':>7} {'MB':>7} {'plain s':>9} {'checked s':>10} {'again s':>9} {'first/plain':>12} {'again/plain':>12}")
    for r in results:
        print(f"{r['rows']:>7} {r['megabytes']:>7.1f} {r['plain_seconds']:>9.4f} {r['checked_first_seconds']:>10.4f} "
              f"{r['checked_again_seconds']:>9.4f} {r['first_over_plain']:>12.2f} {r['again_over_plain']:>12.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "repeats": args.repeats}, indent=2) + "\n")


if __name__ == "__main__":
    main()
