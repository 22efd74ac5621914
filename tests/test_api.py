"""The Python API as users meet it: `import tlp`, the README's quick start, sweeps over
features a user already has, results as tables and frames, settings that carry the key."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

import tlp
from tlp.settings import ExtractSettings, FinetuneSettings, ModelOptions, PlanSettings, SweepSettings, key_entries

from helpers import FAST

ROOT = Path(__file__).resolve().parents[1]


def test_readme_quick_start_runs_as_written_beside_a_pipeline_py(tmp_path):
    """The snippet under "Python quick start", run in a folder whose own pipeline.py would
    shadow a package called pipeline."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python quick start", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "pipeline.py").write_text("raise ImportError('this is the user\\'s own pipeline.py')\n")
    (tmp_path / "quick_start.py").write_text(snippet)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "quick_start.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "best: softmax on mid" in done.stdout and "rank_test_score" in done.stdout


def test_sweep_on_arrays_with_per_fold_results():
    """(X, y) with named layers and text labels: the racing sweep, its per-grid-point
    results in cv_results_ form, a frame, and a repr that reads as a table."""
    X, y = load_digits(return_X_y=True)
    names = np.asarray("zero one two three four five six seven eight nine".split())
    X, labels = X[:600], names[y[:600]]
    result = tlp.sweep(({"pixels": X, "halves": X[:, :32]}, labels), test=0.25, heads=["knn", "softmax"], n_jobs=1,
                       progress=False)
    assert result.n_train == 450 and result.n_test == 150 and result.classes == sorted(names)
    assert result.best["layer"] == "pixels" and result.best["test_accuracy"] > 0.9
    predicted = [result.classes[i] for i in result.best_estimator.predict(X[:20])]
    assert np.mean(np.asarray(predicted) == labels[:20]) >= 0.9
    cv = result.cv_results
    n_points = len(cv["layer"])
    assert n_points == sum(row["grid_size"] for row in result.results)
    assert all(len(column) == n_points for column in cv.values())
    winner = cv["rank_test_score"].index(1)
    assert (cv["layer"][winner], cv["head"][winner], cv["params"][winner]) == (
        result.best["layer"], result.best["head"], result.best["params"])
    assert cv["mean_test_score"][winner] == pytest.approx(result.best["cv_accuracy"], abs=1e-5)
    frame = result.to_frame()
    assert {"split0_test_score", "split4_test_score", "param_C", "param_k", "n_splits_run"} <= set(frame.columns)
    assert frame["param_C"].dropna().min() == pytest.approx(1e-6)  # full precision, not "1e-06" text
    text = repr(result)
    assert "pixels" in text and "halves" in text and "best: " in text and "*" in text


def test_to_frame_without_pandas_says_how_to_install(monkeypatch):
    X, y = load_digits(return_X_y=True)
    result = tlp.sweep((X[:200], y[:200]), heads=["knn"], cv=2, n_jobs=1, progress=False)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        result.to_frame()


def test_a_cache_file_sweeps_like_the_images_it_holds(image_folder, cache_dir):
    """Images with --test 0.25 and the cache file of all of them, split the same way, give
    the same table."""
    from_images = tlp.sweep(image_folder, test=0.25, cv=2, heads=["knn", "softmax"], cache_dir=cache_dir, **FAST)
    whole = tlp.extract(image_folder, cache_dir=cache_dir, pool="auto", **FAST)
    from_file = tlp.sweep(whole.path, test=0.25, cv=2, heads=["knn", "softmax"], progress=False)
    key = lambda row: (row["layer"], row["head"], row["cv_accuracy"], row["test_accuracy"])  # noqa: E731
    assert [key(row) for row in from_file.results] == [key(row) for row in from_images.results]
    assert from_file.model == "efficientnet_lite0"


def test_library_logs_nothing_unless_asked():
    """A warning inside the library (fewer folds for a tiny class) reaches no one who did not
    configure logging; the command line configures it."""
    code = ("import numpy as np, tlp\n"
            "X = np.random.default_rng(0).normal(size=(40, 5)); y = np.array([0] * 37 + [1] * 3)\n"
            "r = tlp.sweep((X, y), heads=['knn'], cv=5, n_jobs=1, progress=False)\n"
            "assert r.n_folds == 3\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_the_old_import_name_gives_the_same_modules(tmp_path):
    """From any folder, as the installed import name was pipeline before 0.2."""
    code = ("import pipeline, tlp\n"
            "from pipeline.cli import main\n"
            "import tlp.cli, pipeline.settings, tlp.settings\n"
            "assert pipeline is tlp and main is tlp.cli.main and pipeline.settings is tlp.settings\n"
            "assert tlp.cli.__spec__.name == 'tlp.cli'\n")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=60)
    done = subprocess.run([sys.executable, "-m", "pipeline", "--version"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == f"tlp {tlp.__version__}"


def test_images_with_a_test_fraction_make_one_cache_file_and_report_every_skip(image_folder, cache_dir):
    """As before the split moved into tlp.split: the whole data set is extracted once, and
    a file that fails to decode is reported whichever part it fell in."""
    (image_folder / "owl" / "empty.jpg").write_bytes(b"")
    cut = image_folder / "dog" / "img_0100.jpg"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    result = tlp.sweep(image_folder, test=0.25, cv=2, heads=["knn"], cache_dir=cache_dir, on_error="skip", **FAST)
    assert len(list(cache_dir.glob("*.h5"))) == 1
    assert {s["path"] for s in result.extract.skipped} == {"owl/empty.jpg", "dog/img_0100.jpg"}
    assert result.n_train + result.n_test == 23 and result.extract.n_images == 23


def test_advise_takes_the_keywords_it_took_before(image_folder, cache_dir):
    advice = tlp.advise(image_folder, image_size=64, cache_dir=cache_dir, large_per_class=5, seed=0, precision="bf16",
                        progress=False)
    assert advice.case in (3, 4) and advice.evidence["size"]["large"]
    assert advice.command.startswith(f"tlp finetune {image_folder} --case {advice.case}")
    assert "--image-size 64 --precision bf16" in advice.command


def test_keyword_options_are_checked_by_name():
    with pytest.raises(TypeError, match="did you mean 'image_size'"):
        tlp.extract("digits", imagesize=64)
    with pytest.raises(TypeError, match="unknown option 'epoch'"):
        tlp.run("digits", epoch=3)


# ----------------------------------------------------------------------------- settings and the key
SETTINGS = [ModelOptions, ExtractSettings, SweepSettings, PlanSettings, FinetuneSettings]


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda cls: cls.__name__)
def test_every_settings_field_is_in_the_key_or_excluded_with_a_reason(cls):
    for item in dataclasses.fields(cls):
        key, why = item.metadata.get("key"), item.metadata.get("why")
        assert (key is None) != (why is None), f"{cls.__name__}.{item.name}: mark it key=... or why=..."
        assert item.metadata.get("help"), f"{cls.__name__}.{item.name} has no help text"


def test_an_unmarked_settings_field_cannot_enter_a_fingerprint():
    @dataclasses.dataclass(frozen=True)
    class Careless(ExtractSettings):
        sharpen: float = 0.0  # changes the pixels, but says nothing about the key

    with pytest.raises(TypeError, match=r"Careless\.sharpen is neither in the key nor excluded"):
        key_entries(Careless(), {"model": {}, "precision": "fp32", "device": "cpu", "layers": []})
    with pytest.raises(TypeError, match="exactly one of key= .* or why="):
        tlp.settings.option(1, help="x", group="model")
