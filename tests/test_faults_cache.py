"""Reliability of the feature cache: what it serves is checked, `gc` never eats live work,
orphans are collected, `--on-error fail` means the same on a warm cache, and the key
names everything that changes the numbers (CPU kernel family, weights bytes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tlp import FeatureFile, extract
from tlp.cli import main
from tlp.errors import ImageDecodeError

from helpers import FAST, write_images

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _flip_byte(path: Path, dataset_name: str, row: int = 0) -> None:
    """Flip one byte of a dataset's stored values in place, as a bad disk or cable would
    (the HDF5 structure stays valid, only the numbers change)."""
    with h5py.File(path, "r") as handle:
        dataset = handle[dataset_name]
        offset = dataset.id.get_offset()
        if offset is None:  # chunked: the first chunk holds row 0
            offset = dataset.id.get_chunk_info(0).byte_offset
        offset += row * dataset.shape[1] * dataset.dtype.itemsize + 1
    with open(path, "r+b") as raw:
        raw.seek(offset)
        value = raw.read(1)
        raw.seek(offset)
        raw.write(bytes([value[0] ^ 0x40]))


def _same_features(a: Path, b: Path, layers) -> None:
    with FeatureFile(a) as left, FeatureFile(b) as right:
        assert left.paths == right.paths and list(left.labels) == list(right.labels)
        for layer in layers:
            np.testing.assert_array_equal(left.load(layer), right.load(layer))


# ----------------------------------------------------------------------------- served data is checked
def test_flipped_byte_in_a_finished_file_is_reported_recomputed_and_never_served(image_folder, cache_dir, capsys,
                                                                                 caplog, tmp_path):
    first = extract(image_folder, cache_dir=cache_dir, **FAST)
    clean = tmp_path / "clean.h5"
    shutil.copy(first.path, clean)
    _flip_byte(first.path, "features/late", row=3)

    assert main(["cache", "verify", "--cache-dir", str(cache_dir)]) == 1
    assert "BAD" in capsys.readouterr().out
    # Reading the file directly refuses the changed numbers, on one line.
    assert main(["sweep", str(first.path), "--layers", "late", "--heads", "softmax", "--cv", "2"]) == 2
    err = capsys.readouterr().err
    assert "does not match its checksum" in err and "Traceback" not in err

    again = extract(image_folder, cache_dir=cache_dir, **FAST)  # the hit fails its check: a miss
    assert again.key == first.key and again.n_extracted == 24
    assert "does not match its checksum" in caplog.text
    _same_features(again.path, clean, ["early", "mid", "late"])
    assert main(["cache", "verify", "--cache-dir", str(cache_dir)]) == 0


def test_flipped_index_is_caught(image_folder, cache_dir, capsys):
    result = extract(image_folder, cache_dir=cache_dir, **FAST)
    with h5py.File(result.path, "r+") as handle:
        labels = handle["index/labels"]
        labels[0] = (labels[0] + 1) % 3  # rows now belong to another class
    assert main(["cache", "verify", "--cache-dir", str(cache_dir)]) == 1
    assert "index" in capsys.readouterr().out
    again = extract(image_folder, cache_dir=cache_dir, **FAST)
    assert again.n_extracted == 24


def _bad_jpeg(path: Path) -> None:
    """A JPEG cut short: its header reads (the scan accepts it), decoding fails."""
    write_images(path.parent, 1, start=999)
    whole = path.parent / "img_0999.jpg"
    data = whole.read_bytes()
    whole.unlink()
    path.write_bytes(data[: len(data) // 2])


def test_flipped_byte_in_a_shard_is_detected_and_recomputed(tmp_path, capsys):
    data = tmp_path / "data"
    write_images(data / "a", 16)
    write_images(data / "b", 16, start=100)
    bad = data / "b" / "zzz_bad.jpg"  # sorts last: the batches before it are committed
    _bad_jpeg(bad)
    cache = tmp_path / "cache"
    args = ["extract", str(data), "--image-size", "64", "--batch-size", "8", "--workers", "0", "--commit-every", "8",
            "--precision", "fp32", "--cache-dir", str(cache), "--quiet"]
    assert main(args) == 2  # --on-error fail stops at the bad file; finished batches are kept as shards
    shards = sorted((cache / ".partial").glob("*/shard-*.h5"))
    assert len(shards) >= 2
    with h5py.File(shards[0], "r") as handle:
        layer_fp = sorted(handle["features"].keys())[0]
    _flip_byte(shards[0], f"features/{layer_fp}")

    assert main(["cache", "verify", "--cache-dir", str(cache)]) == 1
    out = capsys.readouterr().out
    assert "BAD" in out and shards[0].name in out and shards[1].name in out

    bad.unlink()
    assert main([*args[:-1], "--json"]) == 0  # not --quiet: the warning is the point
    out, err = capsys.readouterr()
    resumed = json.loads(out)
    assert resumed["n_extracted"] == 8  # the bad shard's batch again; the three good shards reused
    assert "is not used" in err and shards[0].name in err
    assert main([*args[:-3], "--cache-dir", str(tmp_path / "clean"), "--quiet", "--json"]) == 0
    clean = json.loads(capsys.readouterr().out)
    _same_features(Path(resumed["path"]), Path(clean["path"]), ["early", "mid", "late"])
    assert main(["cache", "verify", "--cache-dir", str(cache)]) == 0


# ----------------------------------------------------------------------------- gc and live work
def test_gc_in_a_loop_beside_a_live_extraction_of_another_layer_set(tmp_path, capsys):
    data = tmp_path / "data"
    write_images(data / "a", 32)
    write_images(data / "b", 32, start=100)
    common = ["--image-size", "64", "--batch-size", "8", "--workers", "0", "--commit-every", "8",
              "--precision", "fp32", "--quiet"]
    disturbed, quiet = tmp_path / "disturbed", tmp_path / "quiet"
    for cache in (disturbed, quiet):  # a finished file of another layer set holds the same images
        assert main(["extract", str(data), "--layers", "early,late", "--cache-dir", str(cache), *common]) == 0

    live = subprocess.Popen([sys.executable, "-m", "tlp", "extract", str(data), "--layers", "mid,late",
                             "--cache-dir", str(disturbed), *common, "--json"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    collections, saw_shards = 0, False
    while live.poll() is None:
        saw_shards = saw_shards or bool(list(disturbed.glob(".partial/*/shard-*.h5")))
        for partial in ([], ["--partial"]):
            assert main(["cache", "gc", "--cache-dir", str(disturbed), "--quiet", *partial]) == 0
            collections += 1
    out, err = live.communicate()
    assert live.returncode == 0, err[-2000:]
    assert collections >= 4 and saw_shards
    result = json.loads(out)
    assert result["n_extracted"] == 64 and result["n_reused"] == 0  # mid is new for every image

    capsys.readouterr()
    assert main(["extract", str(data), "--layers", "mid,late", "--cache-dir", str(quiet), *common, "--json"]) == 0
    reference = json.loads(capsys.readouterr().out)
    _same_features(Path(result["path"]), Path(reference["path"]), ["mid", "late"])
    # Nothing of the finished run is left behind, and gc after it removes nothing it needs.
    assert not list(disturbed.glob(".partial/*/shard-*.h5")) and not list(disturbed.glob(".live/*"))


def test_gc_keeps_shards_of_another_layer_set_and_of_a_killed_run(image_folder, cache_dir):
    extract(image_folder, cache_dir=cache_dir, layers=("early", "late"), **FAST)
    # Resumable work of another layer set: same images, a layer no finished file holds.
    bad = image_folder / "owl" / "zzz_bad.jpg"
    _bad_jpeg(bad)
    with pytest.raises(ImageDecodeError):
        extract(image_folder, cache_dir=cache_dir, layers=("mid", "late"), commit_every=8, **FAST)
    shards = list(cache_dir.glob(".partial/*/shard-*.h5"))
    assert shards
    assert main(["cache", "gc", "--cache-dir", str(cache_dir), "--quiet"]) == 0
    assert all(shard.exists() for shard in shards)
    bad.unlink()
    resumed = extract(image_folder, cache_dir=cache_dir, layers=("mid", "late"), commit_every=8, **FAST)
    assert resumed.n_extracted < 24  # the kept shards were used
    assert main(["cache", "gc", "--cache-dir", str(cache_dir), "--partial", "--quiet"]) == 0


def test_gc_partial_spares_a_live_run_and_collects_a_dead_one(tmp_path, cache_dir):
    from tlp.runlock import live_run

    live_dir = cache_dir / ".partial" / "liverun"
    dead_dir = cache_dir / ".partial" / "deadrun"
    for folder in (live_dir, dead_dir):
        folder.mkdir(parents=True)
        (folder / "shard-x.h5").write_bytes(b"")
    stale = cache_dir / ".live" / "deadrun.123.abcdef01.beef.lock"
    with live_run(cache_dir, "liverun"):
        stale.write_text("")
        os.utime(stale, (time.time() - 3600, time.time() - 3600))  # no heartbeat for an hour
        assert main(["cache", "gc", "--partial", "--cache-dir", str(cache_dir), "--quiet"]) == 0
        assert (live_dir / "shard-x.h5").exists()
        assert not dead_dir.exists() and not stale.exists()
    assert not list((cache_dir / ".live").iterdir())  # the run's lock is gone with it


def test_live_lock_is_released_by_sigkill(tmp_path, cache_dir):
    code = ("import sys, time; from pathlib import Path; from tlp.runlock import live_run\n"
            "with live_run(Path(sys.argv[1]), 'run'):\n    print('locked', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(cache_dir)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (cache_dir / ".partial" / "run").mkdir(parents=True)
        shard = cache_dir / ".partial" / "run" / "shard-x.h5"
        shard.write_bytes(b"")
        assert main(["cache", "gc", "--partial", "--cache-dir", str(cache_dir), "--quiet"]) == 0
        assert shard.exists()
    finally:
        holder.kill()
        holder.wait()
    lock = next((cache_dir / ".live").glob("*.lock"))  # a SIGKILLed holder cannot remove it
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    assert main(["cache", "gc", "--partial", "--cache-dir", str(cache_dir), "--quiet"]) == 0
    assert not shard.exists() and not lock.exists()


# ----------------------------------------------------------------------------- orphans
def test_next_extraction_collects_orphans_of_dead_writers(image_folder, cache_dir):
    cache_dir.mkdir(parents=True)
    orphan = cache_dir / f".{'ab' * 32}.h5.tmp.999999999.deadbeef"  # a killed assembly's file
    orphan.write_bytes(b"\0" * 4096)
    foreign_fresh = cache_dir / f".{'cd' * 32}.h5.tmp.1.0badf00d.cafe"  # another machine's writer, busy
    foreign_fresh.write_bytes(b"\0")
    extract(image_folder, cache_dir=cache_dir, **FAST)
    assert not orphan.exists() and foreign_fresh.exists()


def test_two_concurrent_runs_leave_no_merged_shards(tmp_path):
    data = tmp_path / "data"
    write_images(data / "a", 24)
    write_images(data / "b", 24, start=100)
    cache = tmp_path / "cache"
    args = ["extract", str(data), "--image-size", "64", "--batch-size", "8", "--workers", "0", "--commit-every", "8",
            "--precision", "fp32", "--cache-dir", str(cache), "--quiet"]
    runs = [subprocess.Popen([sys.executable, "-m", "tlp", *args], env=ENV, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    errors = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    assert not list(cache.glob(".partial/*/shard-*.h5")) and not list(cache.rglob(".*.tmp.*"))


# ----------------------------------------------------------------------------- keys that mean what they say
def test_on_error_fail_is_not_satisfied_by_a_cache_written_with_skip(image_folder, cache_dir, capsys):
    _bad_jpeg(image_folder / "dog" / "broken.jpg")
    common = ["extract", str(image_folder), "--cache-dir", str(cache_dir), "--image-size", "64", "--workers", "0",
              "--quiet"]
    assert main([*common, "--on-error", "fail"]) == 2  # fresh cache
    fresh = capsys.readouterr().err
    assert main([*common, "--on-error", "skip"]) == 0
    capsys.readouterr()
    assert main([*common, "--on-error", "fail"]) == 2  # warm cache: the same answer
    warm = capsys.readouterr().err
    assert "broken.jpg" in fresh and "broken.jpg" in warm and "Traceback" not in warm


def test_key_names_the_cpu_kernel_family(tmp_path):
    data = tmp_path / "data"  # two tiny images: the key is the point, not the forward pass
    write_images(data / "a", 1, size=(40, 32))
    write_images(data / "b", 1, start=7, size=(40, 32))

    def start(index: int, **env) -> subprocess.Popen:  # the three processes run at once
        return subprocess.Popen([sys.executable, "-m", "tlp", "extract", str(data), "--image-size", "32",
                                 "--workers", "0", "--precision", "fp32", "--cache-dir", str(tmp_path / f"cache{index}"),
                                 "--json", "--quiet"], env={**ENV, **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def key(process: subprocess.Popen) -> str:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
        return json.loads(out)["key"]

    runs = [start(0), start(1, ATEN_CPU_CAPABILITY="default"), start(2, ONEDNN_MAX_CPU_ISA="AVX2")]
    native, aten_default, onednn_avx2 = (key(run) for run in runs)
    assert len({native, aten_default, onednn_avx2}) == 3


def test_weights_are_keyed_by_content_not_name(image_folder, cache_dir, tmp_path):
    import torch

    from tlp.models import resolve_model

    first, renamed = tmp_path / "lite0.pth", tmp_path / "copy-with-another-name.pth"
    torch.save(resolve_model("efficientnet_lite0").build().state_dict(), first)  # a state dict in timm's naming
    shutil.copy(first, renamed)
    a = extract(image_folder, cache_dir=cache_dir, weights=str(first), **FAST)
    b = extract(image_folder, cache_dir=cache_dir, weights=str(renamed), **FAST)
    assert b.key == a.key and b.n_extracted == 0


# ----------------------------------------------------------------------------- donors
def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)


def test_duplicate_images_reuse_rows_of_a_file_this_process_already_checked(tmp_path, cache_dir):
    big = tmp_path / "big"
    write_images(big / "a", 21)
    write_images(big / "b", 21, start=100)
    extract(big, cache_dir=cache_dir, **FAST)
    extract(big, cache_dir=cache_dir, **FAST)  # a hit: every layer checked (and remembered)
    sub = tmp_path / "sub"
    _copy(big / "a" / "img_0000.jpg", sub / "a" / "x.jpg")
    _copy(big / "a" / "img_0000.jpg", sub / "a" / "x_copy.jpg")  # the same bytes twice
    _copy(big / "b" / "img_0100.jpg", sub / "b" / "y.jpg")
    result = extract(sub, cache_dir=cache_dir, **FAST)
    assert (result.n_extracted, result.n_reused) == (0, 3)
    with FeatureFile(result.path) as features:
        late = features.load("late")
    np.testing.assert_array_equal(late[0], late[1])


def test_donors_failing_their_checks_are_left_out_and_the_counts_add_up(tmp_path, cache_dir):
    first, second = tmp_path / "first", tmp_path / "second"
    write_images(first / "a", 4)
    write_images(first / "b", 4, start=100)
    write_images(second / "a", 4, start=4)
    write_images(second / "b", 4, start=104)
    donors = [extract(data, cache_dir=cache_dir, **FAST).path for data in (first, second)]
    for donor in donors:  # two bad donors: neither may cost the run its planning attempts
        _flip_byte(donor, "features/early")
    sub = tmp_path / "sub"
    _copy(first / "a" / "img_0000.jpg", sub / "a" / "img_0000.jpg")
    _copy(second / "b" / "img_0104.jpg", sub / "b" / "img_0104.jpg")
    write_images(sub / "a", 1, start=50)  # and one new image
    result = extract(sub, cache_dir=cache_dir, **FAST)
    assert (result.n_extracted, result.n_reused, result.n_images) == (3, 0, 3)
    clean = extract(sub, cache_dir=tmp_path / "clean", **FAST)
    _same_features(result.path, clean.path, ["early", "mid", "late"])


def test_a_donor_whose_index_was_changed_gives_no_rows(tmp_path, image_folder, cache_dir):
    donor = extract(image_folder, cache_dir=cache_dir, **FAST)
    with h5py.File(donor.path, "r+") as handle:  # two images swap their rows
        digests = handle["index/digests"]
        first, second = digests[0], digests[1]
        digests[0], digests[1] = second, first
    sub = tmp_path / "sub"
    _copy(image_folder / "cat" / "img_0000.jpg", sub / "cat" / "img_0000.jpg")
    _copy(image_folder / "dog" / "img_0100.jpg", sub / "dog" / "img_0100.jpg")
    result = extract(sub, cache_dir=cache_dir, **FAST)
    assert result.n_extracted == 2
    clean = extract(sub, cache_dir=tmp_path / "clean", **FAST)
    _same_features(result.path, clean.path, ["early", "mid", "late"])


def test_gc_keeps_shards_whose_layers_no_single_file_holds(image_folder, cache_dir):
    extract(image_folder, cache_dir=cache_dir, layers=("early", "late"), **FAST)
    extract(image_folder, cache_dir=cache_dir, layers=("mid", "late"), **FAST)
    bad = image_folder / "owl" / "zzz_bad.jpg"
    _bad_jpeg(bad)
    with pytest.raises(ImageDecodeError):  # a run of early,mid stops at the bad file
        extract(image_folder, cache_dir=cache_dir, layers=("early", "mid"), commit_every=8, **FAST)
    shards = list(cache_dir.glob(".partial/*/shard-*.h5"))
    assert shards
    assert main(["cache", "gc", "--cache-dir", str(cache_dir), "--quiet"]) == 0
    assert all(shard.exists() for shard in shards)
