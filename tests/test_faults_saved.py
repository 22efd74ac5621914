"""Saved model folders are data, not code, and are replaced atomically.

Hostile heads (pickle and joblib payloads with matching checksums) never run; files the
spec names stay inside the folder; a malformed model.json is one line, exit 2; a save
on a full disk leaves the previous model predicting; fine-tuning leaves no temporary
files and collects those of dead writers.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import joblib
import pytest

from tlp.cli import main
from tlp.files import temp_name
from tlp.saved import load_model

from helpers import write_images

pytestmark = pytest.mark.faults

FAST_CLI = ["--image-size", "64", "--workers", "0", "--quiet"]


class Payload:
    """Unpickling this creates ``marker``: the proof that a loaded file ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _sweep_args(data: Path, cache: Path, out: Path) -> list[str]:
    # kNN on the early layer: a small head (its rows), so the disk-full test stays short.
    return ["sweep", str(data), *FAST_CLI, "--cache-dir", str(cache), "--heads", "knn", "--cv", "2",
            "--layers", "early", "--out", str(out)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A head swept on 3 classes x 8 photos (features cached outside the model folder),
    and its predictions for three of the photos."""
    root = tmp_path_factory.mktemp("saved")
    for index, name in enumerate(["cat", "dog", "owl"]):
        write_images(root / "data" / name, 8, start=100 * index)
    model = root / "M"
    assert main(_sweep_args(root / "data", root / "cache", model)) == 0
    images = [str(p) for p in sorted((root / "data" / "owl").iterdir())[:3]]
    return {"root": root, "model": model, "images": images, "predictions": _predict(model, images)}


def _predict(model: Path, images: list[str], *extra: str) -> str:
    """The CSV of top-3 predictions (written beside the images, never on the model's disk)."""
    out = Path(images[0]).parents[2] / "predictions.csv"
    out.unlink(missing_ok=True)
    assert main(["predict", str(model), *images, "--top-k", "3", "--out", str(out), *extra]) == 0
    return out.read_text()


def _copy(saved, tmp_path: Path) -> Path:
    copy = tmp_path / "M"
    shutil.copytree(saved["model"], copy)
    return copy


def _spec(folder: Path) -> dict:
    return json.loads((folder / "model.json").read_text())


def _write_spec(folder: Path, spec) -> None:
    (folder / "model.json").write_text(json.dumps(spec))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line_error(capsys, code: int, expected: int = 2) -> str:
    err = capsys.readouterr().err
    assert code == expected, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tlp: error:") and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- a) hostile heads
@pytest.mark.parametrize("writer", ["pickle", "joblib"])
@pytest.mark.parametrize("layout", ["v1 head.joblib", "v2 head.joblib", "v2 head-*.skops"])
def test_a_pickle_payload_head_never_runs(saved, tmp_path, capsys, writer, layout):
    folder, marker = _copy(saved, tmp_path), tmp_path / "marker"
    spec = _spec(folder)
    (folder / spec["head"]["file"]).unlink()
    name = "head.joblib" if "joblib" in layout else "head-0123456789ab.skops"
    if writer == "pickle":
        (folder / name).write_bytes(pickle.dumps(Payload(marker)))
    else:
        joblib.dump(Payload(marker), folder / name)
    spec["head"].update(file=name, sha256=_sha(folder / name))  # the attacker rewrites both
    if layout.startswith("v1"):
        spec["format"] = "tlp-head-v1"
    _write_spec(folder, spec)
    error = _one_line_error(capsys, main(["predict", str(folder), saved["images"][0]]))
    assert not marker.exists(), "loading the saved model ran code"
    if layout.startswith("v1"):
        assert "pickle" in error and "can run" in error and "--trust-pickle" in error and "tlp sweep" in error
    else:
        assert "not a readable skops file" in error and name in error


def test_a_skops_head_with_an_untrusted_type_is_refused_naming_it(saved, tmp_path, capsys):
    import skops.io
    from sklearn.preprocessing import FunctionTransformer

    folder = _copy(saved, tmp_path)
    spec = _spec(folder)
    head = folder / spec["head"]["file"]
    skops.io.dump(FunctionTransformer(func=os.system), head)
    spec["head"]["sha256"] = _sha(head)
    _write_spec(folder, spec)
    error = _one_line_error(capsys, main(["predict", str(folder), saved["images"][0]]))
    assert spec["head"]["file"] in error and "system" in error and "could run code" in error


def test_an_old_pickle_head_loads_only_with_trust_pickle_and_a_resave_replaces_it(saved, tmp_path, capsys):
    folder = _copy(saved, tmp_path)
    spec = _spec(folder)
    estimator = load_model(folder).estimator
    (folder / spec["head"]["file"]).unlink()
    joblib.dump(estimator, folder / "head.joblib")  # the layout tlp wrote before skops
    spec["format"] = "tlp-head-v1"
    spec["head"].update(file="head.joblib", sha256=_sha(folder / "head.joblib"))
    _write_spec(folder, spec)
    error = _one_line_error(capsys, main(["predict", str(folder), saved["images"][0]]))
    assert "--trust-pickle" in error and "can run" in error
    assert _predict(folder, saved["images"], "--trust-pickle") == saved["predictions"]

    assert main(_sweep_args(saved["root"] / "data", saved["root"] / "cache", folder)) == 0
    capsys.readouterr()
    assert _spec(folder)["format"] == "tlp-head-v2" and not (folder / "head.joblib").exists()
    assert _predict(folder, saved["images"]) == saved["predictions"]


# ----------------------------------------------------------------------------- b) confinement
@pytest.mark.parametrize("entry", ["/etc/passwd", "../outside.skops", "symlink"])
def test_a_spec_naming_a_file_outside_the_folder_is_refused_before_reading(saved, tmp_path, capsys, entry):
    folder = _copy(saved, tmp_path)
    spec = _spec(folder)
    outside = tmp_path / "outside.skops"
    shutil.copy(folder / spec["head"]["file"], outside)  # a valid head: only its place is wrong
    name = entry
    if entry == "symlink":
        name = "head-aaaaaaaaaaaa.skops"
        (folder / name).symlink_to(outside)
    spec["head"].update(file=name, sha256=_sha(Path("/etc/passwd") if entry.startswith("/") else outside))
    _write_spec(folder, spec)
    error = _one_line_error(capsys, main(["predict", str(folder), saved["images"][0]]))
    assert "model.json" in error and f"head.file {name!r}" in error and "inside" in error


# ----------------------------------------------------------------------------- d) malformed specs
MALFORMED = {
    "a JSON list": lambda s: [s],
    "null": lambda s: None,
    "format missing": lambda s: {k: v for k, v in s.items() if k != "format"},
    "unknown format": lambda s: {**s, "format": "tlp-head-v9"},
    "head missing": lambda s: {k: v for k, v in s.items() if k != "head"},
    "head a string": lambda s: {**s, "head": "head.skops"},
    "head.file a number": lambda s: {**s, "head": {**s["head"], "file": 5}},
    "head.sha256 missing": lambda s: {**s, "head": {k: v for k, v in s["head"].items() if k != "sha256"}},
    "versions missing": lambda s: {k: v for k, v in s.items() if k != "versions"},
    "classes truncated": lambda s: {**s, "classes": s["classes"][:2]},
    "one class": lambda s: {**s, "classes": s["classes"][:1]},
    "classes repeated": lambda s: {**s, "classes": [s["classes"][0]] * 3},
    "classes a number": lambda s: {**s, "classes": 3},
    "classes not names": lambda s: {**s, "classes": [1, 2, 3]},
    "image_size a string": lambda s: {**s, "image_size": "64"},
    "image_size true": lambda s: {**s, "image_size": True},
    "precision unknown": lambda s: {**s, "precision": "fp8"},
    "storage_dtype unknown": lambda s: {**s, "storage_dtype": "object"},
    "layer a list": lambda s: {**s, "layer": ["early"]},
    "model missing": lambda s: {k: v for k, v in s.items() if k != "model"},
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_spec_is_one_line_exit_2(saved, tmp_path, capsys, case):
    folder = _copy(saved, tmp_path)
    _write_spec(folder, MALFORMED[case](_spec(folder)))
    error = _one_line_error(capsys, main(["predict", str(folder), saved["images"][0]]))
    assert "model.json" in error


# ----------------------------------------------------------------------------- c) disk full
def _fill(disk: Path, leave: int) -> None:
    """Take all free space of ``disk`` but ``leave`` bytes."""
    fill = disk / "fill"
    fill.unlink(missing_ok=True)
    stat = os.statvfs(disk)
    size = stat.f_bavail * stat.f_frsize - leave
    with open(fill, "wb") as handle:
        if size > 0:
            os.posix_fallocate(handle.fileno(), 0, size)


def test_a_save_on_a_full_disk_leaves_the_old_model_predicting(saved, tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill ({mounted.stderr.strip() or mounted.returncode})")
    reader = None
    try:
        model = disk / "M"
        shutil.copytree(saved["model"], model)
        spec, listing = _spec(model), sorted(os.listdir(model))
        reader = open(model / spec["head"]["file"], "rb")  # a `tlp predict` reading the old head
        page = os.statvfs(disk).f_frsize
        failures = 0
        # Free space from nothing upwards, one page at a time, until the save fits: every
        # point the write can stop at (the head, the spec, the plots) fails once.
        for pages in range(64):
            _fill(disk, pages * page)
            code = main(_sweep_args(saved["root"] / "data", saved["root"] / "cache", model))
            if code == 0:
                break
            error = _one_line_error(capsys, code, expected=1)
            assert "No space left on device" in error
            assert _spec(model) == spec and sorted(os.listdir(model)) == listing  # no new head, no temp files
            load_model(model)  # loads and checks: the old head is still whole
            if failures == 0:
                assert _predict(model, saved["images"]) == saved["predictions"]
            failures += 1
        else:
            pytest.fail("the save never fit in 64 pages")
        assert failures >= 1
        capsys.readouterr()
        (disk / "fill").unlink()
        assert _predict(model, saved["images"]) == saved["predictions"]  # the same sweep: the same head
        assert not [name for name in os.listdir(model) if ".tmp." in name]
    finally:
        if reader is not None:
            reader.close()
        subprocess.run(["umount", str(disk)], check=False)


# ----------------------------------------------------------------------------- e) fine-tuning
@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """One fine-tuned model folder (1 epoch, 64 px) and its data."""
    root = tmp_path_factory.mktemp("finetuned")
    for index, name in enumerate(["cat", "dog", "owl"]):
        write_images(root / "data" / name, 8, start=100 * index)
    out = root / "ft"
    assert main(_finetune_args(root / "data", out)) == 0
    return {"data": root / "data", "out": out, "image": str(next((root / "data" / "owl").iterdir()))}


def _finetune_args(data: Path, out: Path) -> list[str]:
    return ["finetune", str(data), "--case", "4", "--image-size", "64", "--batch-size", "8", "--epochs", "1",
            "--precision", "fp32", "--val", "0", "--workers", "0", "--out", str(out), "--quiet"]


def _temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*.tmp.*"))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _orphan(final: Path, pid: int) -> Path:
    """A temporary file as a writer with ``pid`` leaves it when killed mid-write."""
    name = temp_name(final).name.replace(f".tmp.{os.getpid()}.", f".tmp.{pid}.")
    path = final.with_name(name)
    path.write_bytes(b"half a file")
    return path


def test_fine_tuning_leaves_no_temporary_files_and_collects_dead_writers(finetuned, tmp_path, capsys):
    assert _temporaries(finetuned["out"]) == []
    out = tmp_path / "ft"
    shutil.copytree(finetuned["out"], out)
    dead = _dead_pid()
    orphans = [_orphan(out / "model.pt", dead), _orphan(out / "checkpoints" / "epoch-001.pt", dead)]
    live = _orphan(out / "model.pt", 1)  # pid 1 is alive: a writer at work, not an orphan
    assert main(_finetune_args(finetuned["data"], out)) == 0
    capsys.readouterr()
    assert not any(p.exists() for p in orphans)
    assert _temporaries(out) == [live.name]
    assert (out / "history.csv").exists() and (out / "checkpoints").is_dir()
    assert main(["predict", str(out), finetuned["image"]]) == 0
    # model.pt, the name tlp 0.2 wrote, still loads: a link to the weights the spec names.
    assert (out / "model.pt").is_symlink() and os.readlink(out / "model.pt") == _spec(out)["finetuned"]["file"]
    import torch
    assert torch.load(out / "model.pt", weights_only=True).keys() == torch.load(
        out / _spec(out)["finetuned"]["file"], weights_only=True).keys()


def test_a_finetuned_spec_naming_a_file_outside_is_refused(finetuned, tmp_path, capsys):
    out = tmp_path / "ft"
    shutil.copytree(finetuned["out"], out)
    spec = _spec(out)
    shutil.copy(out / spec["finetuned"]["file"], tmp_path / "model.pt")
    spec["finetuned"]["file"] = "../model.pt"
    _write_spec(out, spec)
    error = _one_line_error(capsys, main(["predict", str(out), finetuned["image"]]))
    assert "finetuned.file '../model.pt'" in error


@pytest.mark.parametrize("case", ["corrupt weights", "classes truncated", "payload"])
def test_a_broken_finetuned_folder_is_one_line_exit_2(finetuned, tmp_path, capsys, case):
    out, marker = tmp_path / "ft", tmp_path / "marker"
    shutil.copytree(finetuned["out"], out)
    spec = _spec(out)
    weights = out / spec["finetuned"]["file"]
    if case == "classes truncated":
        spec["classes"] = spec["classes"][:2]
    else:
        weights.write_bytes(b"\x80\x04not a state dict" if case == "corrupt weights" else pickle.dumps(Payload(marker)))
        spec["finetuned"]["sha256"] = _sha(weights)
    _write_spec(out, spec)
    error = _one_line_error(capsys, main(["predict", str(out), finetuned["image"]]))
    assert spec["finetuned"]["file"] in error and not marker.exists()
