"""Does sharded extraction pay on one machine, and what does assembling a large one cost?

Side by side, on the same generated JPEG photos (``extract.py``'s, 500x375 by default),
each run a fresh ``tlp extract`` process into a fresh cache directory, timed end to end
(process start-up, scan, model, forward, writing: what a user waits for), interleaved
``--repeats`` times; medians are reported:

one process (the baseline)
    ``tlp extract DATA`` with ``--threads`` intra-op threads (``OMP_NUM_THREADS``; default
    2, this machine's cores).
ranks
    ``torchrun --standalone --nproc-per-node --ranks -m tlp extract DATA``, one thread per
    rank (torchrun's default): each rank extracts its part of the images by content
    digest and the last to finish assembles the one file.

Both files hold the same images; their values differ only by the thread count's
summation order (max abs difference recorded: the README's guarantee states it). Then
the assembly of ``--assemble-rows`` synthetic rows x 1280 dims (``assemble_memory.py``,
streamed, in a subprocess whose peak RSS is recorded).

On a GPU machine, run it first with ``--device cuda`` on a machine with 2+ GPUs: each
rank takes ``cuda:LOCAL_RANK``, and the baseline uses one GPU.

Run: ``.venv/bin/python benchmarks/scale.py --json benchmarks/results/scale.json``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import assemble_memory  # noqa: E402
from extract import make_images  # noqa: E402

TORCHRUN = Path(sys.executable).with_name("torchrun")
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS")


def _env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    return {**env, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}


def _extract_command(data: Path, cache: Path, options: list[str]) -> list[str]:
    return ["-m", "tlp", "extract", str(data), "--cache-dir", str(cache), *options, "--quiet"]


def one_process(data: Path, cache: Path, threads: int, options: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, *_extract_command(data, cache, options)], env=_env(threads), check=True,
                   capture_output=True)
    return time.perf_counter() - started


def ranks(data: Path, cache: Path, n_ranks: int, options: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", str(n_ranks),
                    *_extract_command(data, cache, options)], env=_env(1), check=True, capture_output=True)
    return time.perf_counter() - started


def _largest_difference(a: Path, b: Path) -> dict:
    """Per layer, the largest absolute difference between two finished files' rows."""
    from tlp import FeatureFile

    (file_a,), (file_b,) = sorted(a.glob("*.h5")), sorted(b.glob("*.h5"))
    with FeatureFile(file_a) as one, FeatureFile(file_b) as other:
        assert one.digests == other.digests, "both files hold the same images in the same order"
        return {layer: float(np.abs(one.load(layer).astype(np.float64) - other.load(layer)).max())
                for layer in one.layers}


def assembly(rows: int, dims: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="tlp-bench-scale-"))
    try:
        write_s = assemble_memory.write_shards(work / "cache", rows, dims, 4096)
        run = assemble_memory.assemble_in_subprocess(work / "cache", work / "streamed.h5", rows, dims, "streamed")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "dims": dims, "write_shards_seconds": round(write_s, 1), **run}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="write the results here")
    parser.add_argument("--n-images", type=int, default=300)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="the one process's threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", help="tlp extract's --precision (default auto)")
    parser.add_argument("--assemble-rows", type=int, default=200_000)
    args = parser.parse_args(argv)

    options = ["--device", args.device, "--precision", args.precision]
    work = Path(tempfile.mkdtemp(prefix="tlp-bench-scale-"))
    seconds = {"one_process": [], "ranks": []}
    try:
        data = work / "data"
        make_images(data, args.n_images, n_classes=4, seed=0)
        for repeat in range(args.repeats):
            seconds["one_process"].append(one_process(data, work / f"one-{repeat}", args.threads, options))
            seconds["ranks"].append(ranks(data, work / f"ranks-{repeat}", args.ranks, options))
            print(f"repeat {repeat + 1}: one process {seconds['one_process'][-1]:.1f} s, "
                  f"{args.ranks} ranks {seconds['ranks'][-1]:.1f} s", flush=True)
        difference = _largest_difference(work / "one-0", work / "ranks-0")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    rate = {name: args.n_images / value for name, value in medians.items()}
    assembled = assembly(args.assemble_rows, 1280)
    report = {
        "n_images": args.n_images, "device": args.device, "precision": args.precision, "repeats": args.repeats,
        "one_process": {"threads": args.threads, "seconds": seconds["one_process"],
                        "median_seconds": round(medians["one_process"], 2),
                        "images_per_s": round(rate["one_process"], 1)},
        "ranks": {"ranks": args.ranks, "threads_per_rank": 1, "seconds": seconds["ranks"],
                  "median_seconds": round(medians["ranks"], 2), "images_per_s": round(rate["ranks"], 1)},
        "ranks_vs_one_process": round(rate["ranks"] / rate["one_process"], 3),
        "max_abs_difference_by_layer": difference,
        "assembly": assembled,
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
    }
    print(f"\n{'extraction (' + str(args.n_images) + ' photos, end to end)':<44} {'median s':>9} {'img/s':>7}")
    print(f"{'one process x ' + str(args.threads) + ' threads':<44} {medians['one_process']:>9.1f} "
          f"{rate['one_process']:>7.1f}")
    print(f"{str(args.ranks) + ' ranks x 1 thread (torchrun)':<44} {medians['ranks']:>9.1f} {rate['ranks']:>7.1f}")
    print(f"ranks / one process: {report['ranks_vs_one_process']:.2f}x; largest difference between the files: "
          + ", ".join(f"{layer} {value:.2g}" for layer, value in difference.items()))
    print(f"assembly of {assembled['rows']:,} x {assembled['dims']} rows: {assembled['seconds']:.1f} s, "
          f"peak RSS {assembled['peak_rss_mb']:.0f} MB")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
