"""How much memory does assembling a large sharded extraction take?

A synthetic cache of ``--rows`` images x ``--dims`` dimensions (default 200,000 x 1,280,
the late layer of efficientnet_lite0) is written directly as extraction shards (float32,
``--shard-rows`` rows each, with their checksums; no forward passes), then assembled into
one finished file twice, each time in a fresh subprocess whose peak RSS is recorded
(``VmHWM`` of ``/proc/self/status``, the new process's own high-water mark; Linux keeps
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` across ``exec``, so there it also counts the
process that launched the child, and it is recorded beside it as ``ru_maxrss_mb``):

streamed
    what ``tlp extract`` / ``tlp cache assemble`` do now: each layer read from its shards
    and written and hashed a block of rows at a time (``tlp.cache.PlannedRows``).
whole layer (the baseline)
    what tlp 0.5 and earlier did: the layer gathered into one (N, D) float32 array
    (``tlp.cache.gather_rows``), then written.

Both produce the same stored values, and both files pass their checksums (checked). Figures go in the
README, not in an assertion.

Run: ``.venv/bin/python benchmarks/assemble_memory.py --json benchmarks/results/assemble_memory.json``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LAYER_FP = "f" * 64
RUN_FP = "r" * 64


def _digests(n: int) -> list[str]:
    return [f"{i:064x}" for i in range(n)]


def _meta(dims: int):
    from tlp.featurefile import LayerMeta

    return LayerMeta("late", "bn2", "avg", (dims, 7, 7), dims, 32, LAYER_FP)


def write_shards(root: Path, n_rows: int, dims: int, shard_rows: int, seed: int = 0) -> float:
    """The synthetic cache: shards under root/.partial/RUN_FP, as extraction commits them."""
    from tlp.cache import CacheDir, write_shard

    started = time.perf_counter()
    directory = CacheDir(root).partial_dir(RUN_FP)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    digests = _digests(n_rows)
    for start in range(0, n_rows, shard_rows):
        part = digests[start:start + shard_rows]
        rows = rng.standard_normal((len(part), dims), dtype=np.float32)
        write_shard(directory, part, {LAYER_FP: rows}, [], {LAYER_FP: _meta(dims)})
    return time.perf_counter() - started


def assemble(root: Path, out: Path, n_rows: int, dims: int, mode: str) -> dict:
    """One assembly in this process (run as a subprocess): seconds and peak RSS."""
    from tlp.cache import CacheDir, PlannedRows, gather_rows
    from tlp.featurefile import write_feature_file

    rss_start = _high_water_mb()
    started = time.perf_counter()
    sources = CacheDir(root).donors([LAYER_FP], RUN_FP)
    by_digest = {digest: (source, row) for source in sources for digest, row in source.rows.items()}
    digests = _digests(n_rows)
    plan = [by_digest[digest] for digest in digests]
    rows = PlannedRows(plan, LAYER_FP, dims) if mode == "streamed" else gather_rows(plan, LAYER_FP, dims)
    write_feature_file(out, root_attrs={"key": "synthetic"}, classes=["a", "b"],
                       paths=[f"{i}.jpg" for i in range(n_rows)], labels=np.arange(n_rows) % 2, digests=digests,
                       skipped=[], layers=[(_meta(dims), rows)], dtype_policy="float16")
    return {"mode": mode, "seconds": round(time.perf_counter() - started, 2),
            "peak_rss_mb": _high_water_mb(), "rss_before_mb": rss_start,
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _high_water_mb() -> float:
    """This process's peak resident memory, MB (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def assemble_in_subprocess(root: Path, out: Path, n_rows: int, dims: int, mode: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", mode, "--root", str(root), "--out", str(out),
                           "--rows", str(n_rows), "--dims", str(dims), "--json", "-"],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="write the results here ('-': stdout)")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dims", type=int, default=1280)
    parser.add_argument("--shard-rows", type=int, default=4096)
    parser.add_argument("--child", choices=("streamed", "whole"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(assemble(args.root, args.out, args.rows, args.dims, args.child)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="tlp-bench-assemble-"))
    try:
        write_s = write_shards(work / "cache", args.rows, args.dims, args.shard_rows)
        print(f"wrote {args.rows:,} x {args.dims} float32 rows as shards in {write_s:.1f} s", flush=True)
        runs = {mode: assemble_in_subprocess(work / "cache", work / f"{mode}.h5", args.rows, args.dims, mode)
                for mode in ("streamed", "whole")}
        from tlp import FeatureFile

        with FeatureFile(work / "streamed.h5") as a, FeatureFile(work / "whole.h5") as b:
            a.check()
            b.check()
            same = bool(np.array_equal(a.load("late"), b.load("late")))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    layer_mb = args.rows * args.dims * 4 / 2**20
    report = {"rows": args.rows, "dims": args.dims, "shard_rows": args.shard_rows, "layer_float32_mb": round(layer_mb, 1),
              "streamed": runs["streamed"], "whole_layer": runs["whole"], "same_file_values": same,
              "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()}}
    print(f"{'assembly':<12} {'seconds':>8} {'peak RSS MB':>12}")
    for name, run in (("streamed", runs["streamed"]), ("whole layer", runs["whole"])):
        print(f"{name:<12} {run['seconds']:>8.1f} {run['peak_rss_mb']:>12.1f}")
    print(f"one layer as float32: {layer_mb:,.0f} MB; same values (both files pass their checksums): {same}")
    if args.json == "-":
        print(json.dumps(report))
    else:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
