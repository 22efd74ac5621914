"""How long does a warm command take, against the floor of starting Python with torch?

A user who reruns ``tlp extract`` or sweeps cached features waits for a new process: the
interpreter, torch, tlp, reading the cache. Side by side, on the same generated photos
(``extract.py``'s, cached once before timing), interleaved ``--repeats`` times, medians:

floor (the baseline)
    ``python -c "import torch"``: what any command of a torch-based tool pays.
warm extract
    ``tlp extract DATA --cache-dir C -q``: a cache hit (no network built, no timm or
    torchvision imported).
warm sweep
    ``tlp sweep DATA --cache-dir C --heads softmax --cv 2 -q``: a cache hit plus the
    sweep itself (loky workers start, the fits run).

With ``--baseline DIR`` (a checkout of another tlp version, e.g. ``git worktree add
/tmp/base COMMIT``), its warm extract and sweep run beside these: ``python -m tlp`` from a
folder whose ``tlp`` links to ``DIR/pipeline``, first on ``PYTHONPATH`` (so no module of
this checkout is imported), on the same cache when its key is the same.

Target (none in an issue; what tlp aims at): a warm extract within 1 s of the floor.

Run: ``.venv/bin/python benchmarks/startup.py --json benchmarks/results/startup.json``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from extract import make_images  # noqa: E402

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS")


def _seconds(command: list[str], pythonpath: Path | None = None) -> float:
    """Wall seconds of one command, run from ``pythonpath`` (first on PYTHONPATH) or the
    temporary folder (so the working directory adds no package of its own)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env["TQDM_DISABLE"] = "1"
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, cwd=pythonpath or tempfile.gettempdir())
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="write the results here")
    parser.add_argument("--n-images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="a checkout of another tlp version to time beside this one")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="tlp-bench-startup-"))
    try:
        data, cache = work / "data", work / "cache"
        make_images(data, args.n_images, n_classes=4, seed=0)
        extract = ["extract", str(data), "--cache-dir", str(cache), "-q"]
        sweep = ["sweep", str(data), "--cache-dir", str(cache), "--heads", "softmax", "--cv", "2", "-q"]
        commands = {"floor": ([sys.executable, "-c", "import torch"], None),
                    "warm_extract": ([sys.executable, "-m", "tlp", *extract], None),
                    "warm_sweep": ([sys.executable, "-m", "tlp", *sweep], None)}
        if args.baseline is not None:
            shim = work / "baseline"
            shim.mkdir()
            (shim / "tlp").symlink_to(args.baseline.resolve() / "pipeline", target_is_directory=True)
            commands["baseline_warm_extract"] = ([sys.executable, "-m", "tlp", *extract], shim)
            commands["baseline_warm_sweep"] = ([sys.executable, "-m", "tlp", *sweep], shim)
        for command, pythonpath in commands.values():  # the cold runs that fill the cache, not timed
            _seconds(command, pythonpath)
        runs = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, (command, pythonpath) in commands.items():
                runs[name].append(round(_seconds(command, pythonpath), 3))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in runs.items()}
    report = {"n_images": args.n_images, "repeats": args.repeats, "seconds": runs,
              "median_seconds": {k: round(v, 3) for k, v in medians.items()},
              "warm_extract_over_floor_seconds": round(medians["warm_extract"] - medians["floor"], 3),
              "target_over_floor_seconds": 1.0, "machine": {"cpu_count": os.cpu_count()}}
    print(f"{'command (' + str(args.n_images) + ' cached photos)':<36} {'median s':>9} {'over floor':>11}")
    for name, value in medians.items():
        print(f"{name:<36} {value:>9.2f} {value - medians['floor']:>11.2f}")
    met = report["warm_extract_over_floor_seconds"] <= 1.0
    print(f"warm extract within 1 s of the floor: {'met' if met else 'NOT met'}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
