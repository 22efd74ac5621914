"""benchmarks/gpu_check.sh is ready before a GPU is lent: its dry run works on a CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.scripts  # a real process running the script end to end; make test runs the group
def test_dry_run_runs_the_cpu_part_and_writes_one_json_and_a_log(tmp_path):
    out = tmp_path / "gpu"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--dry-run",
                           "--python", sys.executable], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "would run benchmarks/extract.py --device cuda --batch-size 256" in done.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    steps = report["steps"]
    assert steps["tests"]["status"] == "ok" and "skipped" in steps["tests"]["summary"]
    assert steps["benchmark"]["status"] == "ok"
    assert steps["benchmark"]["figures"]["tlp_cold_images_per_s"] > 0
    assert json.loads((out / "extract_cuda.json").read_text())["settings"]["device"] == "cpu"
    assert (out / "gpu_check.log").stat().st_size > 0
