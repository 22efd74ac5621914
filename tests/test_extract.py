"""`tlp extract` end to end: the cache contract, reuse, incremental runs and the key."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from tlp import FeatureFile, extract
from tlp.cli import main
from tlp.errors import ImageDecodeError, TlpInputError

from helpers import FAST, write_images


def test_contract_file_rerun_and_added_images(image_folder, cache_dir, tmp_path):
    report_path = tmp_path / "r.json"
    code = main([
        "extract", str(image_folder), "--model", "efficientnet_lite0", "--layers", "early,mid,late",
        "--image-size", "64", "--cache-dir", str(cache_dir), "--report", str(report_path),
        "--workers", "0", "--batch-size", "8", "--quiet",
    ])
    assert code == 0
    report = json.loads(report_path.read_text())
    for key in ("path", "key", "n_images", "n_extracted", "n_reused", "n_skipped", "skipped", "layers",
                "seconds", "images_per_second"):
        assert key in report
    assert report["n_images"] == 24 and report["n_extracted"] == 24 and report["n_reused"] == 0
    assert set(report["layers"]) == {"early", "mid", "late"}
    assert report["layers"]["late"] == {**report["layers"]["late"], "node": "bn2", "dim": 1280}

    with h5py.File(report["path"], "r") as handle:  # plain h5py, as outside scripts read it
        assert handle.attrs["key"] == report["key"]
        assert handle["index/paths"].shape == (24,)
        assert list(handle["index/labels"][()]) == [0] * 8 + [1] * 8 + [2] * 8
        assert [c for c in handle["index"].attrs["classes"]] == ["cat", "dog", "owl"]
        for layer in ("early", "mid", "late"):
            data = handle[f"features/{layer}"]
            assert data.shape == (24, report["layers"][layer]["dim"])
            assert data.dtype == np.float16
            assert data.chunks is not None
            assert data.attrs["node"] and data.attrs["pooling"] == "avg"
            assert len(data.attrs["pre_pool_shape"]) == 3
        assert json.loads(handle.attrs["preprocessing"])["crop_size"] == 64
        assert handle.attrs["weights_sha256"]

    # A second identical run does no forward pass.
    assert main(["extract", str(image_folder), "--image-size", "64", "--cache-dir", str(cache_dir),
                 "--report", str(report_path), "--workers", "0", "--quiet"]) == 0
    again = json.loads(report_path.read_text())
    assert again["n_extracted"] == 0 and again["key"] == report["key"]

    # Adding 6 images extracts only those 6.
    write_images(image_folder / "dog", 6, start=500)
    assert main(["extract", str(image_folder), "--image-size", "64", "--cache-dir", str(cache_dir),
                 "--report", str(report_path), "--workers", "0", "--quiet"]) == 0
    grown = json.loads(report_path.read_text())
    assert grown["n_extracted"] == 6 and grown["n_reused"] == 24 and grown["n_images"] == 30
    assert grown["key"] != report["key"]


def test_reused_rows_equal_fresh_rows(image_folder, cache_dir, tmp_path):
    first = extract(image_folder, cache_dir=cache_dir, **FAST)
    write_images(image_folder / "cat", 3, start=900)
    grown = extract(image_folder, cache_dir=cache_dir, **FAST)
    fresh = extract(image_folder, cache_dir=tmp_path / "fresh", **FAST)
    assert grown.n_extracted == 3 and fresh.n_extracted == 27
    with FeatureFile(grown.path) as a, FeatureFile(fresh.path) as b:
        assert a.paths == b.paths
        for layer in a.layers:
            np.testing.assert_array_equal(a.load(layer), b.load(layer))
    assert first.key != grown.key


def test_key_ignores_batch_size_workers_and_locations(image_folder, cache_dir, tmp_path):
    base = extract(image_folder, cache_dir=cache_dir, **FAST)
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(image_folder, moved)
    other = extract(moved, cache_dir=cache_dir, **{**FAST, "batch_size": 5})
    assert other.key == base.key and other.n_extracted == 0
    relocated_cache = tmp_path / "cache2"
    shutil.copytree(cache_dir, relocated_cache)
    again = extract(image_folder, cache_dir=relocated_cache, **{**FAST, "workers": 1})
    assert again.key == base.key and again.n_extracted == 0


@pytest.mark.parametrize(
    "change",
    [{"pool": "max"}, {"image_size": 72}, {"precision": "fp32"}, {"dtype": "float32"}, {"layers": ("early", "late")}],
)
def test_key_changes_with_what_changes_numbers(image_folder, cache_dir, change):
    base = extract(image_folder, cache_dir=cache_dir, **{**FAST, "precision": "bf16"})
    changed = extract(image_folder, cache_dir=cache_dir, **{**FAST, "precision": "bf16", **change})
    assert changed.key != base.key


def test_one_changed_byte_changes_key_and_reextracts_only_that_image(image_folder, cache_dir):
    base = extract(image_folder, cache_dir=cache_dir, **FAST)
    target = sorted((image_folder / "owl").iterdir())[0]
    stat = target.stat()
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x01  # inside the entropy-coded data, still a valid JPEG
    target.write_bytes(bytes(data))
    import os

    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: content decides
    changed = extract(image_folder, cache_dir=cache_dir, **FAST)
    assert changed.key != base.key
    assert changed.n_extracted == 1 and changed.n_reused == 23


def test_storage_dtype_float32_on_request_or_overflow(image_folder, cache_dir):
    result = extract(image_folder, cache_dir=cache_dir, layers=("logits",), dtype="float32", **FAST)
    assert result.layers["logits"]["dtype"] == "float32"
    from tlp.featurefile import storage_dtype

    assert storage_dtype(np.array([[1.0, 7e4]], dtype=np.float32), "float16") == np.float32
    assert storage_dtype(np.array([[1.0, 6e4]], dtype=np.float32), "float16") == np.float16


def test_pooling_dims_in_cache(image_folder, cache_dir):
    result = extract(image_folder, cache_dir=cache_dir, layers=("early", "penultimate"), pool="grid2", **FAST)
    assert result.layers["early"]["dim"] == 40 * 4
    assert result.layers["penultimate"]["dim"] == 1280
    assert result.layers["penultimate"]["pooling"] == "none"
    assert result.layers["early"]["bytes_per_image"] == 40 * 4 * 2


def test_bad_files_fail_names_file_and_skip_keeps_labels(image_folder, cache_dir, tmp_path):
    truncated = image_folder / "cat" / "img_0003.jpg"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (image_folder / "dog" / "zero.jpg").write_bytes(b"")
    (image_folder / "owl" / "page.jpg").write_text("<!DOCTYPE html><html><body>404</body></html>")

    report = tmp_path / "r.json"
    args = ["extract", str(image_folder), "--image-size", "64", "--cache-dir", str(cache_dir),
            "--workers", "0", "--batch-size", "4", "--quiet", "--report", str(report)]
    assert main(args) == 2
    assert not report.exists()

    assert main(args + ["--on-error", "skip"]) == 0
    result = json.loads(report.read_text())
    reasons = {s["path"]: s["reason"] for s in result["skipped"]}
    assert set(reasons) == {"cat/img_0003.jpg", "dog/zero.jpg", "owl/page.jpg"}
    assert "truncated" in reasons["cat/img_0003.jpg"]
    assert result["n_skipped"] == 3 and result["n_images"] == 23
    with FeatureFile(result["path"]) as features:
        for path, label in zip(features.paths, features.labels):
            assert features.classes[label] == path.split("/")[0]
        assert "cat/img_0003.jpg" not in features.paths
    # Skips are remembered by the cache: a rerun reports them without decoding again.
    assert main(args + ["--on-error", "skip"]) == 0
    again = json.loads(report.read_text())
    assert again["n_extracted"] == 0 and again["n_skipped"] == 3


def test_fail_message_names_file_and_fix(image_folder, cache_dir, capsys):
    (image_folder / "dog" / "zero.jpg").write_bytes(b"")
    code = main(["extract", str(image_folder), "--image-size", "64", "--cache-dir", str(cache_dir), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "dog/zero.jpg" in err[-1] and "--on-error skip" in err[-1]


def test_truncated_file_mid_run_keeps_finished_work(image_folder, cache_dir):
    # The header is fine, so the scan passes; decoding fails during the forward loop.
    bad = sorted((image_folder / "owl").iterdir())[-1]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(ImageDecodeError, match="owl/img_0207.jpg"):
        extract(image_folder, cache_dir=cache_dir, commit_every=8, **{**FAST, "batch_size": 4})
    bad.unlink()
    resumed = extract(image_folder, cache_dir=cache_dir, **{**FAST, "batch_size": 4})
    assert resumed.n_reused >= 16 and resumed.n_extracted + resumed.n_reused == 23


def test_bad_options_exit_2(image_folder, cache_dir, capsys):
    assert main(["extract", str(image_folder), "--pool", "median", "--cache-dir", str(cache_dir)]) == 2
    assert "--pool" in capsys.readouterr().err
    assert main(["extract", str(image_folder / "missing"), "--cache-dir", str(cache_dir)]) == 2
    assert main(["extract", str(image_folder), "--layers", "nonexistent.node", "--image-size", "64",
                 "--cache-dir", str(cache_dir), "--quiet", "--workers", "0"]) == 2
    assert "tlp layers" in capsys.readouterr().err


def test_digits_builtin(cache_dir):
    from tlp.builtin import digits_images
    from tlp.data import load_dataset

    images, labels = digits_images()
    assert images.shape == (1797, 8, 8, 3) and images.dtype == np.uint8
    assert images.max() == 255 and images.min() == 0
    assert set(np.unique(images)) <= {round(v * 255 / 16) for v in range(17)}
    dataset = load_dataset("digits")
    assert dataset.classes == [str(d) for d in range(10)]
    assert [item.label for item in dataset.items] == list(labels)


@pytest.mark.parametrize("batch_size", [8, 40])  # 40: each batch joined from two worker chunks
def test_decoding_strategy_does_not_change_numbers(image_folder, tmp_path, batch_size):
    (image_folder / "dog" / "broken.jpg").write_bytes(b"not an image")  # skipped by both
    settings = {**FAST, "batch_size": batch_size, "on_error": "skip"}
    threads = extract(image_folder, cache_dir=tmp_path / "threads", **{**settings, "workers": 0})
    processes = extract(image_folder, cache_dir=tmp_path / "processes", **{**settings, "workers": 2})
    assert threads.key == processes.key
    assert [s["path"] for s in processes.skipped] == [s["path"] for s in threads.skipped] == ["dog/broken.jpg"]
    with FeatureFile(threads.path) as a, FeatureFile(processes.path) as b:
        assert list(a.paths) == list(b.paths) and len(a.paths) == 24
        for layer in a.layers:
            np.testing.assert_array_equal(a.load(layer), b.load(layer))


def test_warm_hit_builds_no_network(image_folder, cache_dir):
    """A new process finds the features cached and never builds (or imports) a network,
    nor timm or torchvision (importing them costs seconds a cache hit does not need)."""
    import subprocess
    import sys

    first = extract(image_folder, cache_dir=cache_dir, **FAST)
    code = (
        "import sys, tlp, tlp.models\n"
        "def refuse(self): raise AssertionError('a cache hit must not build the network')\n"
        "tlp.models.ModelSpec.build = refuse\n"
        f"again = tlp.extract({str(image_folder)!r}, cache_dir={str(cache_dir)!r}, image_size=64, batch_size=8, "
        "progress=False)\n"
        f"assert again.key == {first.key!r} and again.n_extracted == 0, again\n"
        "assert not {'timm', 'torchvision'} & set(sys.modules), 'a cache hit imported timm or torchvision'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_per_layer_pooling_auto_and_pairs(image_folder, cache_dir):
    from tlp.pooling import pooling_for_taps

    assert pooling_for_taps("auto", ["early", "mid", "late"]) == {"early": "grid2", "mid": "grid2", "late": "avg"}
    assert pooling_for_taps("late=max,avgmax", ["early", "late"]) == {"early": "avgmax", "late": "max"}
    with pytest.raises(TlpInputError, match="not among --layers"):
        pooling_for_taps("penultimate=avg", ["early"])
    result = extract(image_folder, cache_dir=cache_dir, pool="auto", **FAST)
    assert [result.layers[n]["dim"] for n in ("early", "mid", "late")] == [160, 448, 1280]
    assert result.layers["early"]["pooling"] == "grid2" and result.layers["late"]["pooling"] == "avg"
    # Rows of the avg-pooled late layer are shared with a plain avg run.
    plain = extract(image_folder, cache_dir=cache_dir, layers=("late",), **FAST)
    assert plain.n_extracted == 0


def test_rows_do_not_depend_on_which_images_share_their_batch(tmp_path):
    """A resumed, sharded or grown extraction batches images differently from one run over
    all of them; each row is still the same to the bit (fp32, one thread, where oneDNN's
    kernels for a batch of 13 and a batch of 32 round differently)."""
    import torch

    everything, half = tmp_path / "all", tmp_path / "half"
    for index, name in enumerate(["cat", "dog", "owl"]):
        (half / name).mkdir(parents=True)
        for path in write_images(everything / name, 30, start=100 * index, size=(120, 90))[::2]:
            shutil.copy(path, half / name / path.name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        options = dict(layers=["early", "late"], image_size=96, precision="fp32", progress=False)
        # Separate caches: the second run must compute its rows, not reuse the first's.
        with FeatureFile(extract(everything, cache_dir=tmp_path / "a", **options).path) as a, \
                FeatureFile(extract(half, cache_dir=tmp_path / "b", **options).path) as b:
            assert 0 < len(b.paths) < len(a.paths)
            rows = {path: i for i, path in enumerate(a.paths)}
            for layer in ("early", "late"):
                np.testing.assert_array_equal(a.load(layer)[[rows[p] for p in b.paths]], b.load(layer))
    finally:
        torch.set_num_threads(threads)


def test_image_threads_run_torch_on_one_thread_each_and_leave_the_callers_count():
    """The decoding/augmenting threads must not start OpenMP teams of their own that spin
    into the forward pass or training step; the caller's count stays what it was, also for
    threads started afterwards."""
    import threading

    from tlp.device import image_threads

    before = torch.get_num_threads()
    with image_threads(2) as pool:
        inside = {pool.submit(torch.get_num_threads).result() for _ in range(4)}
        during = torch.get_num_threads()
    later = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert inside == {1}
    assert (during, torch.get_num_threads(), later) == (before, before, [before])
