"""Crash safety: a real `tlp extract` process killed with SIGKILL resumes bit-identically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tlp import FeatureFile
from tlp.cli import main

from helpers import write_images

ROOT = Path(__file__).resolve().parents[1]


def _command(data: Path, cache: Path, report: Path) -> list[str]:
    return [
        "extract", str(data), "--image-size", "64", "--batch-size", "8", "--workers", "0",
        "--commit-every", "16", "--precision", "fp32", "--cache-dir", str(cache), "--report", str(report), "--quiet",
    ]


def _kill_after_first_shard(args: list[str], cache: Path, timeout: float = 120.0) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if list((cache / ".partial").glob("*/shard-*.h5")):
                break
            if process.poll() is not None:
                pytest.fail(f"extract finished before it could be killed: {process.stderr.read().decode()[-500:]}")
            time.sleep(0.01)
        else:
            pytest.fail("no shard was committed in time")
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL


def test_sigkill_then_rerun_is_bit_identical(tmp_path):
    data = tmp_path / "data"
    for index, name in enumerate(["a", "b"]):
        write_images(data / name, 60, start=1000 * index)
    killed_cache, clean_cache = tmp_path / "killed", tmp_path / "clean"
    report = tmp_path / "resumed.json"

    _kill_after_first_shard(_command(data, killed_cache, report), killed_cache)
    assert not list(killed_cache.glob("*.h5"))  # no reader ever sees a finished-looking file

    assert main(_command(data, killed_cache, report)) == 0
    resumed = json.loads(report.read_text())
    assert resumed["n_reused"] > 0
    assert resumed["n_reused"] + resumed["n_extracted"] == 120

    clean_report = tmp_path / "clean.json"
    assert main(_command(data, clean_cache, clean_report)) == 0
    clean = json.loads(clean_report.read_text())
    assert clean["key"] == resumed["key"] and clean["n_extracted"] == 120

    with FeatureFile(resumed["path"]) as a, FeatureFile(clean["path"]) as b:
        assert a.paths == b.paths and list(a.labels) == list(b.labels)
        for layer in ("early", "mid", "late"):
            np.testing.assert_array_equal(a.load(layer), b.load(layer))
            assert a.stored_dtype(layer) == b.stored_dtype(layer)
    # Shards absorbed into the finished file are gone; no temporary files are left.
    assert not list(killed_cache.glob(".partial/*/shard-*.h5"))
    assert not list(killed_cache.rglob(".*.tmp.*"))


def test_orphaned_temp_files_are_collected(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    orphan = cache / ".abc.h5.tmp.999999999.deadbeef"  # no such pid: its writer is dead
    orphan.write_bytes(b"partial")
    writer = subprocess.Popen(["sleep", "30"])  # a live process stands in for a writer
    try:
        live = cache / f".def.h5.tmp.{writer.pid}.cafebabe"
        live.write_bytes(b"in progress")
        assert main(["cache", "gc", "--cache-dir", str(cache)]) == 0
        assert not orphan.exists() and live.exists()
    finally:
        writer.kill()
        writer.wait()


def test_two_concurrent_runs_on_one_key_both_succeed(tmp_path):
    data = tmp_path / "data"
    write_images(data / "a", 24)
    write_images(data / "b", 24, start=100)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    processes = [
        subprocess.Popen([sys.executable, "-m", "tlp", *_command(data, cache, tmp_path / f"r{i}.json")],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for i in range(2)
    ]
    errors = [p.communicate(timeout=300)[1].decode() for p in processes]
    assert [p.returncode for p in processes] == [0, 0], errors
    reports = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2)]
    assert reports[0]["key"] == reports[1]["key"]
    assert len(list(cache.glob("*.h5"))) == 1
    with FeatureFile(reports[0]["path"]) as features:
        assert features.verify() == [] and features.n_rows() == 48
