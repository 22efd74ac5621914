"""Transfer quality on real photos: ``tlp run`` with its defaults against the oracle.

For each real image set in ``../shared/data`` (see its README), the script writes a
seeded, stratified 80/20 split once (copies in ImageFolder layout under
``benchmarks/data/<set>/{train,test}``, with a ``split.json`` listing every file; a later
run reuses the split when that list still matches), then measures on the same split:

run
    ``tlp run TRAIN --test TEST`` with its defaults (the planner decides everything on the
    training part; the test part is scored once at the end).
linear probe
    The plain baseline: a cross-validated logistic regression (tlp's ``softmax`` head) on
    the avg-pooled ``late`` features of the default network.
oracle (``--oracle``)
    Every recipe run to completion, each selected by its own validation on the training
    part: the frozen sweep over every layer and head, fused layers (``mid+late``, the
    late layers of lite0 and lite2 together), flip-averaged and d4 features, partial
    fine-tuning (first third frozen) and whole-network fine-tuning, each with and without
    quarter-turned crops (``--rotate``), and each fine-tune averaged with the frozen CV
    winners. The oracle's figure is the best *test* accuracy over its recipes, which no
    honest planner can see: the planner's regret is the oracle's figure minus ``run``'s.

Run: ``.venv/bin/python benchmarks/quality.py --json benchmarks/results/quality.json``
(about 15 minutes on 2 cores without ``--oracle``; the oracle may take an hour).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_DATA = HERE.parent.parent / "shared" / "data"
SETS = {  # name -> folder of class folders
    "sign-language-digits": "sign-language-digits/Dataset",
    "caltech101_10cls": "caltech101_10cls/images",
    "eurosat_rgb_5cls": "eurosat_rgb_5cls/images",
}
# The figures of `tlp run` (defaults) before this benchmark existed, from the issue that asked for it.
BEFORE = {"sign-language-digits": 0.976, "caltech101_10cls": 1.000, "eurosat_rgb_5cls": 0.960}
TARGETS = {"sign-language-digits": 0.985, "caltech101_10cls": 1.000, "eurosat_rgb_5cls": 0.985}
SPLIT_SEED = 0
TEST_FRACTION = 0.2
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


# ----------------------------------------------------------------------------- splits
def _listing(root: Path) -> list[tuple[str, str]]:
    """(relative path, class) of every image under ``root``'s class folders, sorted."""
    return sorted((path.relative_to(root).as_posix(), path.parent.name)
                  for path in root.glob("*/*") if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def write_splits(data_dir: Path = SHARED_DATA, out: Path = HERE / "data", seed: int = SPLIT_SEED) -> dict[str, Path]:
    """The seeded stratified 80/20 split of every set, written once: set -> its folder."""
    from sklearn.model_selection import train_test_split

    folders = {}
    for name, relative in SETS.items():
        source = data_dir / relative
        if not source.is_dir():
            print(f"skipping {name}: {source} is missing", file=sys.stderr)
            continue
        files = _listing(source)
        listing_sha = hashlib.sha256(json.dumps(files).encode()).hexdigest()
        target = out / name
        record = target / "split.json"
        if record.is_file() and json.loads(record.read_text()).get("source_sha256") == listing_sha:
            folders[name] = target
            continue
        shutil.rmtree(target, ignore_errors=True)
        train, test = train_test_split(files, test_size=TEST_FRACTION, random_state=seed,
                                       stratify=[label for _, label in files])
        for part, rows in (("train", train), ("test", test)):
            for path, _label in rows:
                destination = target / part / path
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / path, destination)
        record.write_text(json.dumps({"source": str(source), "source_sha256": listing_sha, "seed": seed,
                                      "test_fraction": TEST_FRACTION, "train": sorted(p for p, _ in train),
                                      "test": sorted(p for p, _ in test)}, indent=1))
        folders[name] = target
    return folders


# ----------------------------------------------------------------------------- measurements
def _tlp(*args: str, report: Path) -> tuple[dict, float]:
    """One ``tlp`` command in its own process (as a user runs it): its report and wall seconds."""
    import subprocess

    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tlp", *args, "--report", str(report), "--quiet"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"tlp {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return json.loads(report.read_text()), seconds


def measure_run(folder: Path, work: Path, budget: float | None) -> dict:
    """``tlp run TRAIN --test TEST`` with its defaults, on a cold cache (its own folder) and
    an empty output folder (a fine-tuning run's checkpoints there would be resumed)."""
    cache = work / "run-cache"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(work / "run-out", ignore_errors=True)
    extra = ["--budget", str(budget)] if budget is not None else []
    report, seconds = _tlp("run", str(folder / "train"), "--test", str(folder / "test"), "--cache-dir", str(cache),
                           "--out", str(work / "run-out"), *extra, report=work / "run.json")
    test = report["best"]["test_accuracy"]
    return {"test_accuracy": test, "seconds": round(seconds, 1), "case": report["case"], "stage": report["stage"],
            "best": {k: report["best"].get(k) for k in ("layer", "head", "params", "cv_accuracy")},
            "why": report["recipe"].get("why"), "candidates": report["evidence"].get("candidates", []),
            "budget_minutes": budget}


def measure_probe(folder: Path, cache: Path) -> dict:
    """The plain linear probe: tlp's softmax head (CV'd C) on avg-pooled ``late`` features."""
    import tlp

    started = time.perf_counter()
    result = tlp.sweep(folder / "train", test=folder / "test", layers=("late",), pool="avg", heads=["softmax"],
                       cache_dir=cache, progress=False)
    return {"test_accuracy": result.best["test_accuracy"], "cv_accuracy": result.best["cv_accuracy"],
            "seconds": round(time.perf_counter() - started, 1)}


def measure_ablation(folder: Path, cache: Path, similar: bool) -> list[dict]:
    """What each frozen lever adds, step by step, on the same split and cache: the winner
    (by CV) of softmax+SVM heads on late only; on the case's plain depths; with their
    fusions; with flip-averaged features."""
    import tlp

    depths = ["mid", "late"] if similar else ["early", "mid", "late"]
    fused = ["mid+late"] if similar else ["mid+late", "early+mid+late"]
    steps = [("late only", ["late"], "none"), ("case depths", depths, "none"),
             ("+ fusion", depths + fused, "none"), ("+ fusion, flip-averaged", depths + fused, "flip")]
    rows = []
    for name, layers, tta in steps:
        result = tlp.sweep(folder / "train", test=folder / "test", layers=tuple(layers), pool="auto", tta=tta,
                           heads=["softmax", "svm"], cache_dir=cache, progress=False)
        rows.append({"step": name, "layer": result.best["layer"], "head": result.best["head"],
                     "cv_accuracy": result.best["cv_accuracy"], "test_accuracy": result.best["test_accuracy"]})
    return rows


def _test_scores(model: Path, test: Path, classes: list[str]):
    """A saved model's class probabilities on every image of the test folder (``tlp.predict``)."""
    import numpy as np
    import tlp
    from tlp.ensemble import Scored

    root = test.resolve()
    rows = tlp.predict(model, [str(root)], top_k=len(classes)).rows
    probabilities = np.asarray([[dict(zip(r["labels"], r["probabilities"]))[c] for c in classes] for r in rows])
    labels = np.asarray([classes.index(Path(r["path"]).parent.name) for r in rows])
    # Paths relative to the folder, as the sweep's cache records them.
    return Scored([Path(r["path"]).relative_to(root).as_posix() for r in rows], labels, probabilities, list(classes))


FINETUNES = (("fine-tune, first third frozen", "0.3333", ()), ("fine-tune, whole network", "0", ()),
             ("fine-tune, first third frozen, quarter turns", "0.3333", ("--rotate",)),
             ("fine-tune, whole network, quarter turns", "0", ("--rotate",)))


def measure_oracle(folder: Path, work: Path, cache: Path, reuse: bool = False) -> dict:
    """Every recipe to completion; the best test accuracy among them (and which). With
    ``reuse``, a fine-tune an earlier oracle finished in ``work`` (its report and saved
    model there) is read back instead of trained again."""
    import tlp

    from tlp.ensemble import average

    recipes, frozen_winners = {}, {}
    layers = ("early", "mid", "late", "mid+late", "early+mid+late",
              "efficientnet_lite0:late+efficientnet_lite2:late",
              "early+mid+late+efficientnet_lite2:early+efficientnet_lite2:mid+efficientnet_lite2:late")
    for tta in ("none", "flip", "d4"):
        started = time.perf_counter()
        result = tlp.sweep(folder / "train", test=folder / "test", layers=layers, pool="auto", tta=tta,
                           racing=False, cache_dir=cache, progress=False)
        for row in result.results:
            recipes[f"frozen {row['head']} on {row['layer']}" + (f" ({tta})" if tta != "none" else "")] = {
                "cv_accuracy": row["cv_accuracy"], "test_accuracy": row["test_accuracy"]}
        recipes[f"frozen sweep ({tta}) seconds"] = round(time.perf_counter() - started, 1)
        frozen_winners[tta] = result.test_scores()  # the CV winner's, as tlp run would average it
    for name, freeze, more in FINETUNES:
        stem = f"finetune-{freeze}" + "".join(more).replace("--", "-")
        out, report_file = work / f"oracle-{stem}", work / f"{stem}.json"
        if reuse and (out / "model.json").is_file() and report_file.is_file():
            report, seconds = json.loads(report_file.read_text()), None
        else:
            shutil.rmtree(out, ignore_errors=True)  # trained to completion, never resumed
            report, seconds = _tlp("finetune", str(folder / "train"), "--test", str(folder / "test"), "--freeze",
                                   freeze, *more, "--cache-dir", str(cache), "--out", str(out), report=report_file)
        recipes[name] = {"validation_accuracy": report["best"]["cv_accuracy"],
                         "test_accuracy": report["best"]["test_accuracy"],
                         "seconds": None if seconds is None else round(seconds, 1)}
        tuned = _test_scores(out, folder / "test", report["classes"])
        for tta, frozen in frozen_winners.items():
            recipes[f"average: frozen CV winner ({tta}) + {name}"] = {
                "test_accuracy": average([frozen, tuned]).accuracy}
    scored = {k: v for k, v in recipes.items() if isinstance(v, dict) and v.get("test_accuracy") is not None}
    best = max(scored, key=lambda k: scored[k]["test_accuracy"])
    return {"test_accuracy": scored[best]["test_accuracy"], "recipe": best, "recipes": recipes}


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated set names")
    parser.add_argument("--budget", type=float, default=None, help="tlp run --budget (default: tlp's own)")
    parser.add_argument("--oracle", action="store_true", help="also run every recipe to completion (about an hour)")
    parser.add_argument("--reuse-finetunes", action="store_true",
                        help="with --oracle: read back the fine-tunes an earlier oracle finished in --work")
    parser.add_argument("--ablation", action="store_true", help="also measure the frozen levers one by one")
    parser.add_argument("--work", type=Path, default=HERE / "data" / "work", help="reports, outputs and caches")
    args = parser.parse_args(argv)
    folders = write_splits()
    from tlp.settings import PlanSettings

    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
               "budget_minutes": args.budget if args.budget is not None else PlanSettings.budget, "sets": {}}
    for name in args.sets.split(","):
        if name not in folders:
            continue
        work = args.work / name
        work.mkdir(parents=True, exist_ok=True)
        cache = work / "cache"  # kept between runs: the probe, ablation and oracle reuse it
        entry = {"before": BEFORE[name], "target": TARGETS[name], "run": measure_run(folders[name], work, args.budget),
                 "linear_probe": measure_probe(folders[name], cache)}
        if args.ablation:
            entry["ablation"] = measure_ablation(folders[name], cache, similar=entry["run"]["case"] in (1, 3))
        if args.oracle:
            entry["oracle"] = measure_oracle(folders[name], work, cache, reuse=args.reuse_finetunes)
            entry["regret_points"] = round(100 * (entry["oracle"]["test_accuracy"] - entry["run"]["test_accuracy"]), 2)
        results["sets"][name] = entry
        print(f"{name}: run {entry['run']['test_accuracy']:.4f} in {entry['run']['seconds']:.0f} s", file=sys.stderr)
    _print_table(results)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _print_table(results: dict) -> None:
    header = ["set", "before", "run", "target", "met", "linear probe", "oracle", "regret", "run s", "case/stage"]
    rows = []
    for name, e in results["sets"].items():
        oracle = e.get("oracle", {}).get("test_accuracy")
        rows.append([name, f"{e['before']:.3f}", f"{e['run']['test_accuracy']:.4f}", f"{e['target']:.3f}",
                     "yes" if e["run"]["test_accuracy"] >= e["target"] else "no",
                     f"{e['linear_probe']['test_accuracy']:.4f}", "-" if oracle is None else f"{oracle:.4f}",
                     "-" if oracle is None else f"{e['regret_points']:+.2f}", f"{e['run']['seconds']:.0f}",
                     f"{e['run']['case']}/{e['run']['stage']}"])
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths]] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))
    for name, e in results["sets"].items():
        for step in e.get("ablation", []):
            print(f"{name}: {step['step']:<26} {step['head']} on {step['layer']}: CV {step['cv_accuracy']:.4f}, "
                  f"test {step['test_accuracy']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
