"""Sharded extraction: `tlp extract --shard RANK/WORLD` (or a launcher's ranks), assembly.

Real processes throughout: ranks started by `torchrun --standalone`, or by hand as a
Slurm array would; one is SIGKILLed mid-run. What a user would notice: the assembled file
is the one a single process makes, bit for bit (same precision, batch size and threads
per process); every image has one row; a dead rank costs only its unfinished part; an
assembly that cannot finish says how many images are missing and what finishes them.
"""

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
from tlp.launch import Shard, launcher_shard, resolve_shard

from helpers import write_images

pytestmark = pytest.mark.scale

OPTIONS = ["--image-size", "64", "--precision", "fp32", "--layers", "early,late", "--batch-size", "8",
           "--commit-every", "8"]
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards") / "data"
    for index, name in enumerate(["cat", "dog"]):
        write_images(root / name, 60, start=1000 * index)
    return root


@pytest.fixture(scope="module")
def one_process(data) -> Path:
    """The file one process with one thread makes (the reference every launch must equal)."""
    cache = data.parent / "one"
    _tlp("extract", str(data), *OPTIONS, "--cache-dir", str(cache), "--quiet")
    return _finished(cache)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _tlp(*args, env=None, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "tlp", *args], capture_output=True, text=True, env=env or _env(),
                          timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"tlp {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
    return done


def _finished(cache: Path) -> Path:
    files = sorted(cache.glob("*.h5"))
    assert len(files) == 1, files
    return files[0]


def _same_file(a: Path, b: Path) -> None:
    with FeatureFile(a) as one, FeatureFile(b) as other:
        assert one.key == other.key
        assert one.paths == other.paths and len(set(one.digests)) == len(one.digests) == len(other.digests)
        assert one.digests == other.digests
        np.testing.assert_array_equal(one.labels, other.labels)
        for layer in one.layers:
            np.testing.assert_array_equal(one.load(layer), other.load(layer))


def test_torchrun_ranks_assemble_the_file_one_process_makes(data, one_process, tmp_path):
    done = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "tlp", "extract", str(data), *OPTIONS,
         "--cache-dir", str(tmp_path / "two"), "--quiet"],
        capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Two ranks reported: a part done, or the assembled file (both, when they finish together).
    assert done.stdout.count("cache file:") + done.stdout.count("/2 done") == 2, done.stdout
    _same_file(one_process, _finished(tmp_path / "two"))
    assert not list((tmp_path / "two" / ".partial").rglob("shard-*.h5"))  # absorbed shards are removed


def test_a_killed_rank_costs_only_its_unfinished_part(data, one_process, tmp_path):
    cache = tmp_path / "cache"
    _tlp("extract", str(data), *OPTIONS, "--cache-dir", str(cache), "--shard", "0/2", "--quiet")
    # Rank 1 is SIGKILLed as soon as it has committed work.
    rank = subprocess.Popen([sys.executable, "-m", "tlp", "extract", str(data), *OPTIONS, "--cache-dir", str(cache),
                             "--shard", "1/2", "--quiet"], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    committed = set((cache / ".partial").rglob("shard-*.h5"))
    while rank.poll() is None and time.monotonic() < deadline:
        if set((cache / ".partial").rglob("shard-*.h5")) - committed:
            break
        time.sleep(0.01)
    assert rank.poll() is None, "rank 1 ended before it could be killed"
    rank.send_signal(signal.SIGKILL)
    rank.wait()
    assert not list(cache.glob("*.h5"))
    rerun = _tlp("extract", str(data), *OPTIONS, "--cache-dir", str(cache), "--shard", "1/2", "--json")
    report = json.loads(rerun.stdout)
    with FeatureFile(one_process) as reference:
        part = sum(Shard(1, 2).owns(digest) for digest in reference.digests)
    assert report["complete"] is True and report["n_images"] == 120
    assert 0 < report["n_extracted"] < part  # the killed run's committed rows were reused
    assert report["n_reused"] == 120 - report["n_extracted"]
    _same_file(one_process, _finished(cache))


def test_assembly_names_what_is_missing_and_another_world_size_reuses_every_row(data, one_process, tmp_path,
                                                                                    capsys):
    cache = tmp_path / "cache"
    # Part 0 run by two processes at once (a requeued job beside its straggler).
    command = [sys.executable, "-m", "tlp", "extract", str(data), *OPTIONS, "--cache-dir", str(cache), "--shard",
               "0/2", "--json"]
    copies = [subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    outputs = [copy.communicate(timeout=300) for copy in copies]
    assert all(copy.returncode == 0 for copy in copies), [err[-1000:] for _, err in outputs]
    part = json.loads(outputs[0][0])
    assert part["complete"] is False and part["path"] is None and part["shard"] == "0/2"
    assert part["n_extracted"] + part["n_reused"] + part["n_missing"] == part["n_images"] == 120
    assert part["n_missing"] > 0

    code = main(["cache", "assemble", str(data), *OPTIONS, "--cache-dir", str(cache)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{part['n_missing']} of 120 images have no rows" in err and "tlp extract" in err

    # The same data as one part (or any other world size): part 0's rows are reused, not recomputed.
    whole = json.loads(_tlp("extract", str(data), *OPTIONS, "--cache-dir", str(cache), "--shard", "0/1",
                            "--json").stdout)
    assert whole["complete"] and whole["n_extracted"] == part["n_missing"]
    assert whole["n_reused"] == 120 - part["n_missing"]
    _same_file(one_process, _finished(cache))  # one row per image, though two processes made part 0
    assert main(["cache", "assemble", str(data), *OPTIONS, "--cache-dir", str(cache), "--quiet"]) == 0


def test_bad_shard_exits_2(data, tmp_path, capsys):
    assert main(["extract", str(data), "--shard", "2/2", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "--shard 2/2" in capsys.readouterr().err


def test_launcher_variables_choose_the_part():
    assert launcher_shard({"RANK": "1", "WORLD_SIZE": "4"}) == Shard(1, 4)
    assert launcher_shard({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8"}) == Shard(3, 8)
    # A batch script's own environment (no srun step) names the allocation, not a rank: every image.
    assert launcher_shard({"SLURM_PROCID": "0", "SLURM_NTASKS": "16"}) is None
    assert launcher_shard({"RANK": "0", "WORLD_SIZE": "1"}) is None and launcher_shard({}) is None
    assert resolve_shard("all", {"RANK": "1", "WORLD_SIZE": "4"}) is None
    assert resolve_shard(None, {"RANK": "1", "WORLD_SIZE": "4"}) is None
    # Every image is in exactly one part, whatever the world size.
    digests = [f"{i:064x}" for i in range(0, 10**6, 7919)]
    for world in (2, 3, 5):
        assert all(sum(Shard(r, world).owns(d) for r in range(world)) == 1 for d in digests)
