"""The command line as people and scripts use it: help, streams, --json, -q/-v, suggestions,
and `tlp run` taking every option of the stages it calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tlp
from tlp.cli import main

ROOT = Path(__file__).resolve().parents[1]
VERBS = ["extract", "sweep", "predict", "layers", "cache", "finetune", "advise", "run", "demo"]


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_renders_its_help_with_defaults(verb, capsys):
    assert main([verb, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: tlp {verb}")
    if verb not in ("cache", "layers"):
        assert "(default:" in text


def _help(verb: str, capsys) -> str:
    assert main([verb, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def test_help_texts_say_what_the_options_do(capsys):
    sweep = _help("sweep", capsys)
    assert "after 2 folds" not in sweep and "after its first fold" in sweep  # racing starts on the first fold
    assert "model.json" in sweep and "accuracy_by_depth.png" in sweep  # --out holds more than results.csv
    assert "--cv K | --val FRACTION" in sweep
    finetune = _help("finetune", capsys)
    assert "bf16 on capable CPUs" not in finetune and "fp32 otherwise and for all training" in finetune
    assert "--no-hflip no random horizontal flips" in finetune


@pytest.mark.parametrize("verb", ["run", "advise"])
def test_run_and_advise_offer_the_options_of_the_stages_they_call(verb, capsys):
    text = _help(verb, capsys)
    wanted = ["--on-error", "--batch-size", "--workers", "--device", "--model", "--image-size", "--cache-dir"]
    if verb == "run":
        wanted += ["--no-hflip", "--heads", "--layers", "--pool", "--cv", "--epochs", "--large-per-class"]
    assert [flag for flag in wanted if flag not in text] == []


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tlp {tlp.__version__}"


def test_misspelt_verbs_and_options_get_a_suggestion(capsys):
    assert main(["swep", "digits"]) == 2
    assert "did you mean 'sweep'?" in capsys.readouterr().err
    assert main(["sweep", "digits", "--imagesize", "64"]) == 2
    error = capsys.readouterr().err.strip()
    assert "did you mean --image-size" in error and "\n" not in error


def test_cache_dir_before_or_after_the_action(tmp_path, capsys):
    assert main(["cache", "--cache-dir", str(tmp_path), "ls"]) == 0
    assert main(["cache", "ls", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("key") == 2


def test_results_on_stdout_logs_on_stderr_quiet_and_verbose(image_folder, cache_dir, capsys):
    args = ["sweep", str(image_folder), "--image-size", "64", "--heads", "knn", "--cv", "2",
            "--cache-dir", str(cache_dir)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "best: knn on" in captured.out and "INFO" not in captured.out
    assert main(args + ["-q"]) == 0
    quiet = capsys.readouterr()
    assert "best: knn on" in quiet.out and quiet.err == ""  # -q hides logs, never results
    assert main(args + ["--heads", "knn,softmax", "-v"]) == 0  # -v after the verb
    assert "DEBUG" in capsys.readouterr().err


def test_json_report_on_stdout_parses(image_folder, cache_dir):
    """The design's pipe: `tlp sweep ... --json | python -c "import json,sys; json.load(sys.stdin)"`."""
    command = (f"{sys.executable} -m tlp sweep {image_folder} --image-size 64 --heads knn --cv 2 "
               f"--cache-dir {cache_dir} --json | {sys.executable} -c \"import json,sys; "
               f"r = json.load(sys.stdin); print(r['best']['head'], r['n_train'])\"")
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["knn", "24"]


def test_run_takes_every_option_of_the_stages_it_calls(image_folder, cache_dir, tmp_path):
    """The redesign's done-when command, on a folder with a bad file and a truncated one
    (its header passes the scan; decoding it fails in the planner's forward pass)."""
    (image_folder / "dog" / "broken.jpg").write_bytes(b"not an image at all")
    cut = image_folder / "cat" / "img_0001.jpg"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    report = tmp_path / "run.json"
    code = main(["run", str(image_folder), "--on-error", "skip", "--no-hflip", "--heads", "softmax,svm",
                 "--layers", "mid,late", "--cv", "3", "--image-size", "64", "--batch-size", "8", "--workers", "0",
                 "--device", "cpu", "--cache-dir", str(cache_dir), "--report", str(report), "-q"])
    assert code == 0
    result = json.loads(report.read_text())
    assert result["stage"] == "sweep" and result["cv_folds"] == 3 and result["n_train"] == 23  # one left out
    # The rows are the asked layers and heads: all four of lite0's own, or, when the planner's
    # second network won on CV, its one-head sweep of the winner fused with that network's layer.
    rows = {(row["layer"], row["head"]) for row in result["results"]}
    own = {(layer, head) for layer in ("mid", "late") for head in ("softmax", "svm")}
    fused = {(f"{layer}+efficientnet_lite2:{layer}", head) for layer, head in own}
    assert rows == own or (len(rows) == 1 and rows <= fused)
    assert result["evidence"]["size"]["n_images"] == 24  # the unreadable file was left out by the scan
    assert {s["path"] for s in result["extract"]["skipped"]} == {"dog/broken.jpg", "cat/img_0001.jpg"}


def test_advise_prints_the_real_next_command(image_folder, cache_dir, capsys):
    assert main(["advise", str(image_folder), "--image-size", "64", "--cache-dir", str(cache_dir), "-q"]) == 0
    next_line = next(line for line in capsys.readouterr().out.splitlines() if "next:" in line)
    assert f"tlp sweep {image_folder} --layers" in next_line and "--image-size 64" in next_line
    assert f"--cache-dir {cache_dir}" in next_line
