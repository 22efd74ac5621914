"""Resource bounds and environment faults: each refusal is one line with the right exit code.

Bounds (exit 2 or a skipped file, before memory or disk is spent): extreme aspect ratios,
--image-size, gridK larger than the tapped map. Environment faults (exit 1, one line naming
the path and the fix, no traceback): a full disk on a real tmpfs at several fill levels
(no segfault, committed shards survive and a rerun resumes), read-only file systems,
permissions, files where folders should be. A malformed HDF5 file the user passes exits 2.
Damaged fine-tuning checkpoints fall back to the one before.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from tlp.cli import main
from tlp.settings import ExtractSettings

from helpers import write_images

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--image-size", "64", "--batch-size", "8", "--workers", "0", "--precision", "fp32", "--quiet"]


def _error_line(capsys) -> str:
    """The one line a refusal prints on stderr (and assert there is only that line)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tlp: error: "), lines
    return lines[0]


@pytest.fixture
def tmpfs(tmp_path):
    """A mount helper: ``tmpfs(name, size, read_only=False)`` -> a fresh tmpfs folder,
    unmounted at the end. Skips the test where mounting is not allowed."""
    mounted = []

    def mount(name: str, size: str = "300k", read_only: bool = False) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(folder)
        if read_only:
            (folder / "cache").mkdir()  # an existing folder, on a file system that is read-only
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


# ----------------------------------------------------------------------------- resource bounds
def _thin_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (60000, 2), (200, 40, 40)).save(path)
    assert path.stat().st_size < 1000  # a few hundred bytes that would resize to gigabytes
    return path


@pytest.mark.parametrize("workers", ["0", "1"])
def test_extreme_aspect_ratio_is_skipped_with_its_reason_and_a_panorama_is_kept(image_folder, cache_dir, tmp_path,
                                                                                workers):
    _thin_png(image_folder / "cat" / "strip.png")
    Image.new("RGB", (12000, 2000), (10, 120, 30)).save(image_folder / "dog" / "panorama.jpg")  # 6:1
    report = tmp_path / "r.json"
    code = main(["extract", str(image_folder), *FAST, "--workers", workers, "--on-error", "skip",
                 "--layers", "late", "--cache-dir", str(cache_dir), "--report", str(report)])
    assert code == 0
    result = json.loads(report.read_text())
    assert result["n_images"] == 25  # 24 photos and the panorama
    assert [s["path"] for s in result["skipped"]] == ["cat/strip.png"]
    assert "60000x2" in result["skipped"][0]["reason"] and "limit of 64" in result["skipped"][0]["reason"]


def test_extreme_aspect_ratio_fails_naming_the_file(image_folder, cache_dir, capsys):
    _thin_png(image_folder / "owl" / "strip.png")
    code = main(["extract", str(image_folder), *FAST, "--layers", "late", "--cache-dir", str(cache_dir)])
    assert code == 2
    line = _error_line(capsys)
    assert "owl/strip.png" in line and "60000x2" in line and "--on-error skip" in line


def test_image_size_beyond_the_bound_names_the_memory_before_anything_is_built(image_folder, cache_dir, capsys):
    assert main(["extract", str(image_folder), "--image-size", "100000", "--cache-dir", str(cache_dir)]) == 2
    line = _error_line(capsys)
    assert "--image-size 100000" in line and "3,840.0 GB" in line and "at most 2048" in line
    assert not list(cache_dir.rglob("*.h5"))
    assert ExtractSettings(image_size=2048, cache_dir=str(cache_dir)).validated().image_size == 2048


def test_grid_larger_than_the_tapped_map_is_refused_before_anything_is_written(image_folder, cache_dir, capsys):
    code = main(["extract", str(image_folder), *FAST, "--layers", "late", "--pool", "grid99",
                 "--cache-dir", str(cache_dir)])
    assert code == 2
    line = _error_line(capsys)
    assert "grid99" in line and "'late'" in line and "2x2" in line and "grid2 or smaller" in line
    assert not list(cache_dir.rglob("*.h5"))  # no shard, no cache file
    assert main(["extract", str(image_folder), *FAST, "--layers", "late", "--pool", "grid2",
                 "--cache-dir", str(cache_dir)]) == 0


# ----------------------------------------------------------------------------- disk full
def _start_extract(data: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "tlp", "extract", str(data), *FAST, "--commit-every", "8",
                             "--cache-dir", str(cache)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def test_full_disk_is_one_line_at_every_write_and_a_rerun_resumes(image_folder, tmpfs, tmp_path):
    """Fill a 300 KB tmpfs to several levels, so that the failure hits the first, second
    and third shard and the finished file: each time exit 1, one line, no traceback, no
    segfault; then free the disk and rerun: committed shards are reused, not recomputed."""
    failed_writes = set()
    disks = []
    for level, free_kb in enumerate((0, 64, 120, 180)):
        disk = tmpfs(f"disk{level}")
        with open(disk / "filler", "wb") as filler:
            filler.write(b"\0" * ((300 - free_kb) * 1024))
        disks.append((free_kb, disk, _start_extract(image_folder, disk / "cache")))  # all four run at once
    for level, (free_kb, disk, process) in enumerate(disks):
        cache = disk / "cache"
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 1, (free_kb, process.returncode, stderr[-2000:])
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("tlp: error: No space left on device: "), lines
        assert "Traceback" not in stderr and "free space" in lines[0]
        failed_writes.add(lines[0].split(": ")[3].split(";")[0].rsplit("/", 1)[-1])
        committed = 0
        for shard in cache.glob(".partial/*/shard-*.h5"):
            with h5py.File(shard, "r") as handle:
                committed += len(handle["digests"])

        (disk / "filler").unlink()
        report = tmp_path / f"resumed{level}.json"
        assert main(["extract", str(image_folder), *FAST, "--commit-every", "8", "--cache-dir", str(cache),
                     "--report", str(report)]) == 0
        resumed = json.loads(report.read_text())
        assert (resumed["n_reused"], resumed["n_extracted"]) == (committed, 24 - committed)
    assert len(failed_writes) >= 3, failed_writes  # shards and the finished file, not one write only


# ----------------------------------------------------------------------------- other environment faults
def test_read_only_cache_and_report_are_one_line_naming_the_path(image_folder, tmpfs, cache_dir, tmp_path, capsys):
    read_only = tmpfs("ro", read_only=True)
    assert main(["extract", str(image_folder), *FAST, "--cache-dir", str(read_only / "cache")]) == 1
    line = _error_line(capsys)
    assert "Read-only file system" in line and str(read_only / "cache") in line and "--cache-dir" in line

    assert main(["extract", str(image_folder), *FAST, "--cache-dir", str(cache_dir),
                 "--report", str(read_only / "r.json")]) == 1
    line = _error_line(capsys)
    assert line.startswith(f"tlp: error: Read-only file system: {read_only / 'r.json'};")  # not a temporary name


def test_files_where_folders_should_be(image_folder, cache_dir, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for cache in (a_file, a_file / "sub"):
        assert main(["extract", str(image_folder), *FAST, "--cache-dir", str(cache)]) == 1
        line = _error_line(capsys)
        assert "Not a directory" in line and str(a_file) in line and "a file is in the way" in line

    assert main(["extract", str(image_folder), *FAST, "--layers", "late", "--cache-dir", str(cache_dir)]) == 0
    capsys.readouterr()
    [features] = cache_dir.glob("*.h5")
    assert main(["sweep", str(features), "--heads", "softmax", "--cv", "2", "--quiet", "--out", str(a_file)]) == 1
    line = _error_line(capsys)
    assert str(a_file) in line and "a file is in the way" in line


def _drop_file_permission_override() -> None:
    """In the child: root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, so file modes apply."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_permission_denied_is_one_line(image_folder, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "tlp", "extract", str(image_folder), *FAST, "--cache-dir", str(locked / "cache")]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                              preexec_fn=_drop_file_permission_override)
    except subprocess.SubprocessError as error:
        pytest.skip(f"cannot drop file-permission capabilities here: {error}")
    assert done.returncode == 1, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"tlp: error: Permission denied: {locked / 'cache'};"), lines
    assert "chmod" in lines[0]


def test_malformed_hdf5_passed_by_the_user_exits_2_naming_it(image_folder, cache_dir, tmp_path, capsys):
    not_ours = tmp_path / "other.h5"
    with h5py.File(not_ours, "w") as handle:
        handle["x"] = np.arange(3)
    assert main(["sweep", str(not_ours), "--heads", "softmax", "--cv", "2", "--quiet"]) == 2
    line = _error_line(capsys)
    assert repr(str(not_ours)) in line and "not a readable tlp cache file" in line

    assert main(["extract", str(image_folder), *FAST, "--layers", "late", "--cache-dir", str(cache_dir)]) == 0
    capsys.readouterr()
    [features] = cache_dir.glob("*.h5")
    damaged = tmp_path / "damaged.h5"
    shutil.copy(features, damaged)
    with h5py.File(damaged, "r+") as handle:
        handle.attrs["model"] = np.bytes_(b"\xff\xfe")  # an attribute that is not UTF-8
    assert main(["sweep", str(damaged), "--heads", "softmax", "--cv", "2", "--quiet"]) == 2
    line = _error_line(capsys)
    assert repr(str(damaged)) in line and "UnicodeDecodeError" in line


# ----------------------------------------------------------------------------- fine-tuning checkpoints
@pytest.fixture(scope="module")
def finished_finetune(tmp_path_factory):
    """A finished 2-epoch fine-tuning run: (data, its --out folder, the command)."""
    root = tmp_path_factory.mktemp("finetune")
    data = root / "data"
    for index, name in enumerate(["cat", "dog"]):
        write_images(data / name, 8, start=100 * index)
    out = root / "out"
    command = ["finetune", str(data), "--case", "4", "--epochs", "2", "--val", "0", "--seed", "0", *FAST]
    assert main(command + ["--out", str(out)]) == 0
    return out, command


def _weights(out: Path) -> dict:
    return torch.load(out / json.loads((out / "model.json").read_text())["finetuned"]["file"], weights_only=True)


@pytest.mark.parametrize("damage", ["missing optimizer", "missing history", "missing weight", "wrong shape"])
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(finished_finetune, tmp_path, damage, capsys):
    finished, command = finished_finetune
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    newest = out / "checkpoints" / "epoch-002.pt"
    saved = torch.load(newest, weights_only=True)
    first_weight = next(iter(saved["model"]))
    if damage.startswith("missing") and damage != "missing weight":
        del saved[damage.split()[1]]
    elif damage == "missing weight":
        del saved["model"][first_weight]
    else:
        saved["model"][first_weight] = torch.zeros(1, 2, 3)
    torch.save(saved, newest)
    capsys.readouterr()

    report = tmp_path / "r.json"
    assert main(command + ["--out", str(out), "--report", str(report)]) == 0
    assert json.loads(report.read_text())["resumed_from_epoch"] == 1
    expected, resumed = _weights(finished), _weights(out)
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)
