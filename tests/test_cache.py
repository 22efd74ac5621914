"""`tlp cache` management and the cache's defences against stale or corrupt files."""

from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pytest

from tlp import FeatureFile, extract
from tlp.files import fingerprint
from tlp.cli import main

from helpers import FAST


def test_ls_info_verify_rm(image_folder, cache_dir, capsys):
    result = extract(image_folder, cache_dir=cache_dir, **FAST)
    short = result.key[:12]
    assert main(["cache", "ls", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert short in out and "efficientnet_lite0" in out and "24" in out

    assert main(["cache", "info", short, "--cache-dir", str(cache_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_images"] == 24 and info["classes"] == ["cat", "dog", "owl"]
    assert info["layers"]["mid"]["node"] == "blocks.4"
    assert info["attributes"]["key"] == result.key

    assert main(["cache", "verify", "--cache-dir", str(cache_dir)]) == 0
    assert "ok" in capsys.readouterr().out

    assert main(["cache", "rm", short, "--cache-dir", str(cache_dir)]) == 0
    assert not result.path.exists()
    assert main(["cache", "info", short, "--cache-dir", str(cache_dir)]) == 2


def test_ls_tells_entries_apart_and_shows_where_the_data_was(image_folder, cache_dir, capsys, monkeypatch):
    extract(image_folder, cache_dir=cache_dir, **FAST)
    extract(image_folder, cache_dir=cache_dir, pool="grid2", **{**FAST, "image_size": 72})
    monkeypatch.chdir(image_folder.parent)
    assert main(["cache", "ls", "--cache-dir", str(cache_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["key", "model", "weights", "size", "pooling", "data"]
    rows = [line.split() for line in lines[2:]]
    assert sorted((row[3], row[4]) for row in rows) == [("64", "avg"), ("72", "grid2")]
    assert {row[2] for row in rows} == {"IMAGENET1K"} and {row[5] for row in rows} == {"data"}


def test_default_cache_location(tmp_path, monkeypatch):
    """--cache-dir, else $TLP_CACHE_DIR, else the checkout's cache/ (whatever the working
    directory), else ~/.cache/tlp."""
    from pathlib import Path

    from tlp.settings import resolve_cache_dir

    checkout = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    assert resolve_cache_dir(str(tmp_path / "mine")) == tmp_path / "mine"
    monkeypatch.setenv("TLP_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir(None) == tmp_path / "env"
    monkeypatch.delenv("TLP_CACHE_DIR")
    assert resolve_cache_dir(None) == checkout / "cache"
    import shutil

    installed = tmp_path / "site-packages" / "tlp"
    shutil.copytree(checkout / "pipeline", installed, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import tlp.settings as s; "
            "print(s.resolve_cache_dir(None))")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code, str(installed.parent)], capture_output=True, text=True,
                          check=True, env={k: v for k, v in os.environ.items() if k != "TLP_CACHE_DIR"})
    assert done.stdout.strip() == str(tmp_path / "home" / ".cache" / "tlp")


def test_verify_catches_flipped_values_and_renamed_files(image_folder, cache_dir, capsys):
    result = extract(image_folder, cache_dir=cache_dir, **FAST)
    with h5py.File(result.path, "r+") as handle:
        handle["features/late"][0, 0] += 1
    assert main(["cache", "verify", result.key[:8], "--cache-dir", str(cache_dir)]) == 1
    assert "late" in capsys.readouterr().out
    # A file copied to another key's name is refused, never served as that key.
    impostor = cache_dir / f"{'0' * 64}.h5"
    shutil.copy(result.path, impostor)
    with FeatureFile(impostor) as features:
        assert any("does not match file name" in p for p in features.verify())


def test_corrupt_cache_file_is_recomputed(image_folder, cache_dir, caplog):
    result = extract(image_folder, cache_dir=cache_dir, **FAST)
    result.path.write_bytes(b"\x89HDF garbage")
    again = extract(image_folder, cache_dir=cache_dir, **FAST)
    assert again.key == result.key and again.n_extracted == 24
    assert "unreadable" in caplog.text
    with FeatureFile(again.path) as features:
        assert features.verify() == []


def test_fingerprint_is_order_independent():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 1.5})


def test_layer_subset_reuses_rows_of_a_bigger_run(image_folder, cache_dir):
    full = extract(image_folder, cache_dir=cache_dir, layers=("early", "mid", "late"), **FAST)
    subset = extract(image_folder, cache_dir=cache_dir, layers=("late",), **FAST)
    assert subset.key != full.key and subset.n_extracted == 0 and subset.n_reused == 24
    with FeatureFile(full.path) as a, FeatureFile(subset.path) as b:
        np.testing.assert_array_equal(a.load("late"), b.load("late"))


def test_gc_removes_merged_and_partial_shards(image_folder, cache_dir, capsys):
    extract(image_folder, cache_dir=cache_dir, **FAST)
    partial = cache_dir / ".partial" / "deadbeef"
    partial.mkdir(parents=True)
    (partial / "shard-0.h5").write_bytes(b"not hdf5")
    assert main(["cache", "gc", "--cache-dir", str(cache_dir)]) == 0
    assert not partial.exists()
    assert "freed" in capsys.readouterr().out


def test_shard_folder_removed_by_another_run_is_made_again(tmp_path):
    """Two runs on the same data share a shard folder; the one that finishes first removes
    it when it looks empty, possibly between the other's mkdir and its open. The other
    must still write its shard (seen once in the two-process test of test_resume.py)."""
    import os
    import threading
    import time

    from tlp.files import atomic_h5

    folder = tmp_path / ".partial" / "run"
    stop, removal_due = threading.Event(), threading.Semaphore(0)

    def other_run_finishing():
        # Once per write: remove the folder as soon as it exists and is empty (the
        # other run's single clean-up), trying for up to 20 ms.
        while not stop.is_set():
            if not removal_due.acquire(timeout=0.05):
                continue
            deadline = time.monotonic() + 0.02
            while time.monotonic() < deadline:
                try:
                    os.rmdir(folder)
                    break
                except OSError:
                    pass

    other = threading.Thread(target=other_run_finishing)
    other.start()
    try:
        for index in range(150):
            shard = folder / f"shard-{index}.h5"
            removal_due.release()
            with atomic_h5(shard) as handle:
                handle.create_dataset("rows", data=np.arange(index + 1))
            with h5py.File(shard, "r") as handle:
                assert list(handle["rows"][()]) == list(range(index + 1))
            shard.unlink()
            time.sleep(0.021)  # the other run's removal attempts for this write are over
            if folder.exists():
                folder.rmdir()  # the next write starts without the folder, as a fresh run does
    finally:
        stop.set()
        other.join()


class _Blocks:
    """Rows handed to write_feature_file a block at a time, as assembly streams them."""

    def __init__(self, values: np.ndarray, block: int):
        self.values, self.block, self.shape = values, block, values.shape

    def chunks(self):
        for start in range(0, len(self.values), self.block):
            yield self.values[start:start + self.block]


@pytest.mark.parametrize("overflow", [False, True])
def test_a_layer_written_in_blocks_is_the_layer_written_at_once(tmp_path, overflow):
    """Assembly writes and hashes each layer a block of rows at a time (bounded memory): the
    file reads back exactly as one written from the whole array, checksum included, and a
    value beyond float16 in the last block still makes the whole layer float32."""
    from tlp.featurefile import LayerMeta, write_feature_file

    values = np.random.default_rng(0).normal(size=(1000, 24)).astype(np.float32)
    if overflow:
        values[-1, 3] = 1e5
    meta = LayerMeta("late", "bn2", "avg", (24, 2, 2), 24, 32, "fp")
    common = dict(root_attrs={"key": "k"}, classes=["a", "b"], paths=[f"{i}.png" for i in range(1000)],
                  labels=np.arange(1000) % 2, digests=[f"{i:064x}" for i in range(1000)], skipped=[],
                  dtype_policy="float16")
    write_feature_file(tmp_path / "whole.h5", layers=[(meta, values)], **common)
    write_feature_file(tmp_path / "blocks.h5", layers=[(meta, _Blocks(values, 96))], **common)
    with FeatureFile(tmp_path / "whole.h5") as whole, FeatureFile(tmp_path / "blocks.h5") as blocks:
        assert whole.stored_dtype("late") == blocks.stored_dtype("late") == (np.float32 if overflow else np.float16)
        np.testing.assert_array_equal(whole.load("late"), blocks.load("late"))
        with h5py.File(whole.path) as a, h5py.File(blocks.path) as b:
            assert a["features/late"].attrs["sha256"] == b["features/late"].attrs["sha256"]
