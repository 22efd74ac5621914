"""How fast is ``tlp sweep`` compared with the ``GridSearchCV`` script users write instead?

One process measures, on the same cached features (the built-in ``digits``, 1,797
images, default model at image size 96, tlp's sweep defaults: pooling ``auto`` and the
taps ``early,mid,late`` with 160, 448 and 1,280 dimensions), the same held-out test half
and the same five stratified folds of the training half:

tlp
    ``tlp.sweep("digits", test=0.5, image_size=96, heads=..., n_jobs=N)`` (with
    ``--no-racing``: ``racing=False``). The features are cached before timing, so the
    call is the sweep itself (plus a cache hit and reading the HDF5 file, which its wall
    time includes and ``sweep_seconds`` does not): (layer, head, fold) grids in parallel,
    round by round, then the refits scored on the test half.
GridSearchCV
    The plain script: for each layer and head, ``GridSearchCV`` over
    ``tlp.heads.make_head(head, ...)`` with exactly the same grid points (the
    classifier step itself is swapped per point, built by ``HEADS[head].classifier``,
    so linear and RBF SVMs stay as they are), the same folds, ``n_jobs=N`` and
    ``refit=True``, on the training half loaded once in memory.

The difference being measured, all of it in ``tlp.sweep`` and ``tlp.heads``:
tlp fits the preprocessing once per fold and head; fits the logistic-regression path
(45 values of C) coarse-to-fine, warm-started (every 4th C, then the 3 values either
side of the best coarse C over the first folds); scores the RBF SVM on a kernel matrix
computed once per fold, and the linear SVM (and, when features outnumber training rows,
the softmax) on the training rows' span, both equal to the plain fits up to float
rounding; races across folds (every (layer, head) runs its folds round by round, and
one clearly behind the leader by a paired test on the same validation samples stops,
from the first fold on; the table marks it ``~``, its row says how many folds it ran,
and it is not refit); skips, on later folds, the linear-SVM C values an earlier fold's
path stopped before (they can no longer be selected); refits only the winner as the
plain pipeline (the other rows that ran every fold get their test accuracy from the
scoring form); and keeps its loky workers' garbage collector off the ~95,000 objects
imported at start-up (the workers do not import torch; the main process does).
GridSearchCV fits every grid point of every fold from scratch, preprocessing included.
Targets: tlp is >= 5x faster, and its best cross-validated accuracy is within 0.5
points of GridSearchCV's (which shows whether the adaptive path and racing cost anything).

Fairness: both use the same ``n_jobs`` (default: all cores) and the same joblib (loky)
workers, which are started and warmed up before any timing. ConvergenceWarnings are
silenced identically in both (in this process and in the workers); tlp counts them
itself, and for GridSearchCV an extra scorer counts the fits that stopped at
``max_iter`` (the condition of the warning for these solvers, except lbfgs line-search
failures, so the two counts are comparable only roughly). tlp runs first, then
GridSearchCV; with ``--repeats R`` the pair is repeated (interleaved) and medians are
reported. Other busy processes skew both; the share of CPU busy before and after is
recorded.

Per-cell seconds are medians over the repeats of CPU seconds summed over workers (tlp: its
fold tasks plus its refit, if any; GridSearchCV: fit and score times plus its refit).

At realistic sizes (``--rows 2000`` or ``--rows 2000,10000``) the same comparison runs on
synthetic features instead of digits: three layers of 40, 112 and 1,280 dimensions (the
avg-pooled early, mid and late taps of efficientnet_lite0) for 10 classes, each class
three sub-modes (poses, backgrounds) in a 64-dimensional latent space with a decaying
within-class spectrum, mixed into each layer by its own random projection plus
per-dimension noise, then rectified (non-negative and about a third zeros, as pooled
ReLU6 activations are). Deeper layers separate the classes better: a logistic
regression on 80% reaches about 0.59, 0.85 and 0.93 on the three at 2,000 rows, close
to real photos' 0.77, 0.90 and 0.94 (Sign Language Digits, avg-pooled). All rows are
swept (5-fold CV, no test part). Per size the JSON holds ``tlp_seconds`` and
``gridsearch_seconds`` (``None`` above ``--gridsearch-max-rows``, default 2,000: the
baseline would take most of an hour at 10,000). Targets there: tlp <= 20 s at 2,000 rows,
>= 8x GridSearchCV, best CV within 0.3 points.

Run: ``python benchmarks/sweep.py --repeats 3 --json benchmarks/results/sweep.json``
(``--rows 2000,10000 --json benchmarks/results/sweep_rows.json`` for the sizes)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

# Before joblib starts any worker: loky workers read this at start-up, so both sides run
# with ConvergenceWarnings silenced in every process (tlp records its own regardless).
# By message, as -W cannot name a category from a module not yet imported at start-up.
CONVERGENCE_MESSAGES = ("lbfgs failed to converge", "Liblinear failed to converge", "Stochastic Optimizer")
os.environ["PYTHONWARNINGS"] = ",".join(f"ignore:{message}" for message in CONVERGENCE_MESSAGES)

import joblib  # noqa: E402
import numpy as np  # noqa: E402
import sklearn  # noqa: E402
from joblib import Parallel, delayed  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402

import tlp  # noqa: E402
from tlp.files import write_json  # noqa: E402
from tlp.heads import HEADS, PATH_REFINE, PATH_STEP, head_grid, make_head  # noqa: E402
from tlp.racing import RACE_FOLDS, RACE_MIN_GAP, RACE_Z, cv_folds  # noqa: E402
from tlp.report import format_table  # noqa: E402
from tlp.settings import DEFAULT_HEADS, DEFAULT_MODEL  # noqa: E402

from extract import cpu_busy_fraction  # noqa: E402  (benchmarks/extract.py)

DATA = "digits"
IMAGE_SIZE = 96
POOL = "auto"  # tlp sweep's default
LAYERS = ("early", "mid", "late")
TEST_FRACTION, CV, SEED = 0.5, 5, 0  # hold out half; cv and seed are tlp sweep's defaults
QUICK_LAYERS, QUICK_HEADS = ("mid",), ("softmax", "knn")
TARGETS = {"speedup_at_least": 5.0, "abs_accuracy_gap_points_at_most": 0.5}
ROWS_TARGETS = {"tlp_seconds_at_most_at_2000": 20.0, "speedup_at_least": 8.0, "abs_accuracy_gap_points_at_most": 0.3}
# --rows: (layer, dimensions, class separation) of the synthetic features; see the docstring.
SYNTHETIC_LAYERS = (("early", 40, 0.32), ("mid", 112, 0.34), ("late", 1280, 0.17))
SYNTHETIC_CLASSES, SYNTHETIC_LATENT, SYNTHETIC_MODES = 10, 64, 3


# ----------------------------------------------------------------------------- data
def load_features(cache_dir: Path, layers: tuple[str, ...]):
    """Extract (or reuse) the features as ``tlp.sweep(DATA, test=TEST_FRACTION)`` does (the
    whole data set, one cache file), so tlp's timed calls are cache hits; return
    (extract result, {layer: X_train}, y_train) for the training half that ``tlp.split`` holds."""
    dataset = tlp.load_dataset(DATA)
    train, _test = tlp.split(dataset, TEST_FRACTION, SEED)
    result = tlp.extract(dataset, image_size=IMAGE_SIZE, pool=POOL, layers=layers, cache_dir=str(cache_dir),
                         progress=False)
    with tlp.FeatureFile(result.path) as features:
        row = {path: i for i, path in enumerate(features.paths)}
        rows = np.asarray([row[item.path] for item in train.items])
        X = {name: features.load(name)[rows] for name in layers}
        y = features.labels[rows]
    return result, X, y


def _warm_worker() -> int:
    # Import what both sides' workers need, so neither pays for it inside its timing.
    import tlp.racing  # noqa: F401
    import sklearn.model_selection  # noqa: F401

    return os.getpid()


def warm_up_workers(n_jobs: int) -> int:
    """Start the loky workers both sides reuse; returns how many distinct workers ran."""
    return len(set(Parallel(n_jobs=n_jobs)(delayed(_warm_worker)() for _ in range(4 * max(1, os.cpu_count() or 1)))))


# ----------------------------------------------------------------------------- tlp
def summarise_tlp(result, seconds: float) -> dict:
    """One timed ``tlp.sweep`` call as the report holds it: wall seconds, the winner and,
    per (layer, head), its CV accuracy, folds, test accuracy and CPU seconds."""
    cells = {
        f"{row['layer']}/{row['head']}": {
            "cv_accuracy": row["cv_accuracy"],
            "params": row["params"],
            "n_folds": row["n_folds"],
            "test_accuracy": row["test_accuracy"],
            # Summed over workers (fold grids + refit), comparable with GridSearchCV's serial_seconds.
            "serial_seconds": round(row["cv_seconds"] + (row["fit_seconds"] or 0.0), 4),
            "n_convergence_warnings": row["n_convergence_warnings"],
        }
        for row in result.results
    }
    return {
        "seconds": seconds,
        "sweep_seconds": result.timings["sweep_seconds"],
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "best_cv_accuracy": result.best["cv_accuracy"],
        "best": f"{result.best['layer']}/{result.best['head']}",
        "convergence_warnings": sum(row["n_convergence_warnings"] for row in result.results),
        "cells": cells,
        "table": result.table(),
    }


def run_tlp(cache_dir: Path, layers, heads, n_jobs: int, racing: bool = True) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        result = tlp.sweep(DATA, test=TEST_FRACTION, image_size=IMAGE_SIZE, layers=layers,
                                cache_dir=str(cache_dir), heads=heads, n_jobs=n_jobs, racing=racing, progress=False)
        seconds = time.perf_counter() - start
    if result.extract is not None and result.extract.n_extracted:
        raise RuntimeError(f"tlp sweep extracted {result.extract.n_extracted} images; expected a cache hit")
    return summarise_tlp(result, seconds)


def synthetic_features(n_rows: int, seed: int = SEED) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({layer: (n_rows, D) float32}, labels): the --rows features (see the docstring)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n_rows) % SYNTHETIC_CLASSES
    rng.shuffle(y)
    centres = rng.standard_normal((SYNTHETIC_CLASSES, SYNTHETIC_LATENT))
    modes = centres[:, None, :] + 0.6 * rng.standard_normal((SYNTHETIC_CLASSES, SYNTHETIC_MODES, SYNTHETIC_LATENT))
    mode = rng.integers(0, SYNTHETIC_MODES, n_rows)
    spectrum = 1.0 / np.sqrt(1.0 + np.arange(SYNTHETIC_LATENT))
    X = {}
    for name, dim, separation in SYNTHETIC_LAYERS:
        latent = separation * modes[y, mode] + 1.5 * spectrum * rng.standard_normal((n_rows, SYNTHETIC_LATENT))
        mixing = rng.standard_normal((SYNTHETIC_LATENT, dim)) / np.sqrt(SYNTHETIC_LATENT)
        X[name] = np.maximum(latent @ mixing + rng.standard_normal((n_rows, dim)) + 0.5, 0.0).astype(np.float32)
    return X, y


def run_tlp_arrays(X: dict, y: np.ndarray, heads, n_jobs: int, racing: bool = True) -> dict:
    """``tlp.sweep((X, y))`` on all rows (5-fold CV, no test part), timed like run_tlp."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        result = tlp.sweep((X, y), heads=heads, n_jobs=n_jobs, racing=racing, progress=False)
        seconds = time.perf_counter() - start
    return summarise_tlp(result, seconds)


def run_rows(args) -> dict:
    """Per --rows size: tlp and (up to --gridsearch-max-rows) GridSearchCV, interleaved."""
    busy_before = cpu_busy_fraction()
    workers = warm_up_workers(args.n_jobs)
    baseline_jobs = args.n_jobs if args.baseline_n_jobs is None else args.baseline_n_jobs
    sizes = {}
    for n_rows in args.rows:
        X, y = synthetic_features(n_rows)
        X = {name: X[name] for name in args.layers}
        folds = cv_folds(y, CV, None, SEED)
        tlp_runs, gs_runs = [], []
        for repeat in range(args.repeats):
            tlp_runs.append(run_tlp_arrays(X, y, args.heads, args.n_jobs, racing=not args.no_racing))
            print(f"{n_rows} rows, repeat {repeat + 1}: tlp {tlp_runs[-1]['seconds']:.2f} s", flush=True)
            if n_rows <= args.gridsearch_max_rows:
                gs_runs.append(run_gridsearch(X, y, folds, args.heads, baseline_jobs))
                print(f"{n_rows} rows, repeat {repeat + 1}: GridSearchCV {gs_runs[-1]['seconds']:.2f} s", flush=True)
        tlp_s = statistics.median(run["seconds"] for run in tlp_runs)
        gs_s = statistics.median(run["seconds"] for run in gs_runs) if gs_runs else None
        tlp_best = tlp_runs[-1]["best_cv_accuracy"]
        gs_best = gs_runs[-1]["best_cv_accuracy"] if gs_runs else None
        sizes[str(n_rows)] = {
            "rows": n_rows, "dims": {name: int(v.shape[1]) for name, v in X.items()},
            "tlp_seconds": round(tlp_s, 3), "gridsearch_seconds": None if gs_s is None else round(gs_s, 3),
            "speedup": None if gs_s is None else round(gs_s / tlp_s, 3),
            "tlp_best": tlp_runs[-1]["best"], "tlp_best_cv_accuracy": tlp_best,
            "gridsearch_best": gs_runs[-1]["best"] if gs_runs else None, "gridsearch_best_cv_accuracy": gs_best,
            "accuracy_gap_points": None if gs_best is None else round(100.0 * (gs_best - tlp_best), 3),
            "tlp_runs_seconds": [round(run["seconds"], 3) for run in tlp_runs],
            "gridsearch_runs_seconds": [round(run["seconds"], 3) for run in gs_runs],
            "tlp_cells": tlp_runs[-1]["cells"], "gridsearch_cells": gs_runs[-1]["cells"] if gs_runs else None,
            "tlp_table": tlp_runs[-1]["table"],
        }
    n_jobs = os.cpu_count() if args.n_jobs == -1 else args.n_jobs
    return {"sizes": sizes, "targets": ROWS_TARGETS,
            "settings": {"features": "synthetic", "layers": list(args.layers), "heads": list(args.heads), "cv": CV,
                         "seed": SEED, "repeats": args.repeats, "racing": not args.no_racing,
                         "gridsearch_max_rows": args.gridsearch_max_rows, "statistic": "median"},
            "machine": _machine(n_jobs, workers, (busy_before, cpu_busy_fraction()))}


def format_rows_report(report: dict) -> str:
    rows = []
    for size in report["sizes"].values():
        gs = size["gridsearch_seconds"]
        rows.append([str(size["rows"]), f"{size['tlp_seconds']:.2f}", "-" if gs is None else f"{gs:.2f}",
                     "-" if gs is None else f"{size['speedup']:.2f}x",
                     f"{size['tlp_best']} {size['tlp_best_cv_accuracy']:.4f}",
                     "-" if gs is None else f"{size['gridsearch_best']} {size['gridsearch_best_cv_accuracy']:.4f}"])
    table = format_table(rows, ["rows", "tlp s", "GridSearchCV s", "speedup", "tlp best", "GridSearchCV best"])
    cells = []
    for size in report["sizes"].values():
        for cell, value in size["tlp_cells"].items():
            gs = (size["gridsearch_cells"] or {}).get(cell, {})
            cells.append([str(size["rows"]), cell, f"{value['cv_accuracy']:.4f}", str(value["n_folds"]),
                          f"{value['serial_seconds']:.2f}", f"{gs['cv_accuracy']:.4f}" if gs else "-",
                          f"{gs['serial_seconds']:.2f}" if gs else "-"])
    per_cell = format_table(cells, ["rows", "layer/head", "tlp cv", "folds", "tlp cpu s", "gs cv", "gs cpu s"])
    t, machine = report["targets"], report["machine"]
    return "\n".join([table, "", per_cell, "",
                      f"targets: tlp <= {t['tlp_seconds_at_most_at_2000']} s at 2,000 rows, >= {t['speedup_at_least']}x "
                      f"GridSearchCV, best CV within {t['abs_accuracy_gap_points_at_most']} points",
                      f"machine: {machine['cpu_count']} CPUs, n_jobs {machine['n_jobs']}, CPU busy before/after "
                      f"{machine['cpu_busy_before']}/{machine['cpu_busy_after']}"])


# ----------------------------------------------------------------------------- GridSearchCV
def _at_max_iter(estimator, X, y) -> float:
    """1.0 when the fitted classifier stopped at ``max_iter`` (why it would warn), else 0.0."""
    classifier = estimator[-1]
    max_iter, n_iter = getattr(classifier, "max_iter", None), getattr(classifier, "n_iter_", None)
    if max_iter is None or n_iter is None or max_iter <= 0:
        return 0.0
    return float(np.max(n_iter) >= max_iter)


def run_gridsearch(X_train: dict, y_train, folds, heads, n_jobs: int) -> dict:
    cells, total, at_max_iter = {}, 0.0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for layer, X in X_train.items():
            for head in heads:
                grid = head_grid(head, y_train)
                search = GridSearchCV(
                    make_head(head, grid[0], SEED),
                    param_grid=[{"classifier": [HEADS[head].classifier(params, SEED)]} for params in grid],
                    cv=folds,
                    scoring={"accuracy": "accuracy", "at_max_iter": _at_max_iter},
                    refit="accuracy",
                    n_jobs=n_jobs,
                )
                start = time.perf_counter()
                search.fit(X, y_train)
                seconds = time.perf_counter() - start
                total += seconds
                results = search.cv_results_
                n_fits = len(folds) * len(grid)
                serial = float(np.sum(results["mean_fit_time"] + results["mean_score_time"]) * len(folds))
                hits = int(round(float(np.sum(results["mean_test_at_max_iter"]) * len(folds))))
                at_max_iter += hits
                cells[f"{layer}/{head}"] = {
                    "cv_accuracy": round(float(search.best_score_), 5),
                    "params": grid[int(search.best_index_)],
                    "seconds": round(seconds, 4),
                    "serial_seconds": round(serial + search.refit_time_, 4),
                    "n_fits": n_fits + 1,
                    "n_fits_at_max_iter": hits,
                }
    best = max(cells, key=lambda cell: cells[cell]["cv_accuracy"])
    return {"seconds": total, "best_cv_accuracy": cells[best]["cv_accuracy"], "best": best,
            "fits_at_max_iter": at_max_iter, "cells": cells}


# ----------------------------------------------------------------------------- report
def _machine(n_jobs: int, workers: int, busy: tuple) -> dict:
    from threadpoolctl import threadpool_info

    return {
        "cpu_count": os.cpu_count(),
        "n_jobs": n_jobs,
        "distinct_workers_seen_in_warm_up": workers,
        "python": platform.python_version(),
        "sklearn": sklearn.__version__,
        "joblib": joblib.__version__,
        "numpy": np.__version__,
        "blas": [{k: pool.get(k) for k in ("internal_api", "num_threads", "version")} for pool in threadpool_info()],
        "cpu_busy_before": busy[0],
        "cpu_busy_after": busy[1],
    }


def build_report(args, grids, n_jobs, dims, n_train, folds, tlp_runs, gs_runs, workers, busy) -> dict:
    tlp_s = statistics.median(run["seconds"] for run in tlp_runs)
    tlp_sweep_s = statistics.median(run["sweep_seconds"] for run in tlp_runs)
    gs_s = statistics.median(run["seconds"] for run in gs_runs)
    tlp, gs = tlp_runs[-1], gs_runs[-1]
    speedup = gs_s / tlp_s
    gap = 100.0 * (gs["best_cv_accuracy"] - tlp["best_cv_accuracy"])
    def median(runs, cell, key):
        return round(statistics.median(run["cells"][cell][key] for run in runs), 4)

    cells = {  # accuracies and parameters of the last repeat (every repeat gives the same), seconds: medians
        cell: {
            "tlp_cv_accuracy": tlp["cells"][cell]["cv_accuracy"],
            "gridsearch_cv_accuracy": gs["cells"][cell]["cv_accuracy"],
            "tlp_params": tlp["cells"][cell]["params"],
            "gridsearch_params": gs["cells"][cell]["params"],
            "tlp_n_folds": tlp["cells"][cell]["n_folds"],
            "tlp_test_accuracy": tlp["cells"][cell]["test_accuracy"],
            "tlp_serial_seconds": median(tlp_runs, cell, "serial_seconds"),
            "gridsearch_serial_seconds": median(gs_runs, cell, "serial_seconds"),
            "gridsearch_seconds": median(gs_runs, cell, "seconds"),
            "tlp_convergence_warnings": tlp["cells"][cell]["n_convergence_warnings"],
            "gridsearch_fits_at_max_iter": gs["cells"][cell]["n_fits_at_max_iter"],
        }
        for cell in gs["cells"]
    }
    return {
        "tlp_seconds": round(tlp_s, 3),
        "tlp_sweep_seconds": round(tlp_sweep_s, 3),
        "gridsearch_seconds": round(gs_s, 3),
        "tlp_best_cv_accuracy": tlp["best_cv_accuracy"],
        "gridsearch_best_cv_accuracy": gs["best_cv_accuracy"],
        "tlp_best": tlp["best"],
        "gridsearch_best": gs["best"],
        "speedup": round(speedup, 3),
        "speedup_sweep_only": round(gs_s / tlp_sweep_s, 3),
        "accuracy_gap_points": round(gap, 3),
        "targets": TARGETS,
        "targets_met": {
            "speedup": speedup >= TARGETS["speedup_at_least"],
            "accuracy_gap": abs(gap) <= TARGETS["abs_accuracy_gap_points_at_most"] + 1e-9,
        },
        "tlp_runs_seconds": [round(run["seconds"], 3) for run in tlp_runs],
        "tlp_runs_sweep_seconds": [round(run["sweep_seconds"], 3) for run in tlp_runs],
        "gridsearch_runs_seconds": [round(run["seconds"], 3) for run in gs_runs],
        "tlp_timings": tlp["timings"],
        "tlp_convergence_warnings": tlp["convergence_warnings"],
        "gridsearch_fits_at_max_iter": gs["fits_at_max_iter"],
        "tlp_table": tlp["table"],
        "cells": cells,
        "settings": {
            "data": DATA, "model": _model_name(), "image_size": IMAGE_SIZE,
            "pool": POOL, "layers": list(args.layers), "dims": dims, "heads": list(args.heads),
            "grid_sizes": {head: len(grid) for head, grid in grids.items()},
            "test_fraction": TEST_FRACTION, "n_train": n_train, "cv": len(folds), "seed": SEED,
            "path_step": PATH_STEP, "path_refine": PATH_REFINE,
            "racing": {"enabled": not args.no_racing, "first_folds": RACE_FOLDS, "z": RACE_Z, "min_gap": RACE_MIN_GAP},
            "repeats": args.repeats, "quick": args.quick, "statistic": "median",
        },
        "machine": _machine(n_jobs, workers, busy),
    }


def _model_name() -> str:
    return DEFAULT_MODEL


def format_report(report: dict) -> str:
    """The report as plain-text tables for people."""
    rows = []
    for cell, v in report["cells"].items():
        rows.append([cell, f"{v['tlp_cv_accuracy']:.4f}", str(v["tlp_n_folds"]), f"{v['gridsearch_cv_accuracy']:.4f}",
                     f"{v['tlp_serial_seconds']:.2f}", f"{v['gridsearch_serial_seconds']:.2f}",
                     f"{v['gridsearch_seconds']:.2f}"])
    table = format_table(rows, ["layer/head", "tlp cv acc", "tlp folds", "gs cv acc", "tlp serial s", "gs serial s",
                                "gs wall s"])
    met, t, machine = report["targets_met"], report["targets"], report["machine"]
    lines = [
        table,
        "",
        "tlp's layer x head table (CV accuracy, mean ± std over folds):",
        report["tlp_table"],
        "",
        f"tlp sweep wall    {report['tlp_seconds']:8.2f} s  (sweep_seconds {report['tlp_sweep_seconds']:.2f}; "
        f"best {report['tlp_best']} {report['tlp_best_cv_accuracy']:.4f})",
        f"GridSearchCV wall {report['gridsearch_seconds']:8.2f} s  (best {report['gridsearch_best']} "
        f"{report['gridsearch_best_cv_accuracy']:.4f})",
        f"speedup           {report['speedup']:8.2f} x  (target >= {t['speedup_at_least']})  "
        f"{'met' if met['speedup'] else 'NOT met'}; sweep_seconds only {report['speedup_sweep_only']:.2f} x",
        f"accuracy gap      {report['accuracy_gap_points']:+8.2f} points (GridSearchCV - tlp; target |gap| <= "
        f"{t['abs_accuracy_gap_points_at_most']})  {'met' if met['accuracy_gap'] else 'NOT met'}",
        f"convergence: tlp {report['tlp_convergence_warnings']} warnings; GridSearchCV "
        f"{report['gridsearch_fits_at_max_iter']} fits at max_iter",
        "tlp timings (s): " + ", ".join(f"{k.removesuffix('_seconds')} {v:.2f}" for k, v in report["tlp_timings"].items()),
        f"machine: {machine['cpu_count']} CPUs, n_jobs {machine['n_jobs']}, sklearn {machine['sklearn']}, "
        f"CPU busy before/after {machine['cpu_busy_before']}/{machine['cpu_busy_after']}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rows takes comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 100:
        raise argparse.ArgumentTypeError(f"--rows sizes must be at least 100, got {text!r}")
    return sizes


def _names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, type=Path, help="write the results here")
    parser.add_argument("--n-jobs", type=int, default=-1, help="joblib workers for both sides (default -1: all cores)")
    parser.add_argument("--layers", type=_names, help=f"comma-separated taps (default {','.join(LAYERS)})")
    parser.add_argument("--heads", type=_names, help=f"comma-separated heads (default {','.join(DEFAULT_HEADS)})")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: layers {','.join(QUICK_LAYERS)}, heads {','.join(QUICK_HEADS)} "
                             "(--layers/--heads still override)")
    parser.add_argument("--baseline-n-jobs", type=int, default=None,
                        help="GridSearchCV's n_jobs if it should differ (1 = its own default, one core); default: --n-jobs")
    parser.add_argument("--no-racing", action="store_true", help="tlp runs every fold of every (layer, head)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved tlp/GridSearchCV pairs; medians reported (default 1)")
    parser.add_argument("--cache-dir", type=Path, help="feature cache to use and keep (default: a temporary folder)")
    parser.add_argument("--rows", type=_sizes, help="comma-separated sizes: sweep synthetic 40/112/1280-dim "
                        "features of that many rows instead of digits (e.g. 2000,10000)")
    parser.add_argument("--gridsearch-max-rows", type=int, default=2000,
                        help="with --rows, run GridSearchCV only up to this size (default 2000)")
    args = parser.parse_args(argv)
    args.layers = args.layers or (QUICK_LAYERS if args.quick else LAYERS)
    args.heads = args.heads or (QUICK_HEADS if args.quick else DEFAULT_HEADS)
    unknown = [head for head in args.heads if head not in HEADS]
    if unknown:
        parser.error(f"--heads must name some of {', '.join(HEADS)}, got {', '.join(unknown)}")
    if args.repeats < 1:
        parser.error(f"--repeats must be a positive integer, got {args.repeats}")
    if args.n_jobs == 0:
        parser.error("--n-jobs must be -1 (all cores) or a positive integer, got 0")
    return args


def run(args, cache_dir: Path) -> dict:
    busy_before = cpu_busy_fraction()
    if busy_before is not None and busy_before > 0.2:
        print(f"warning: {busy_before:.0%} of the CPU is busy before starting; other processes will skew the numbers")
    extracted, X_train, y_train = load_features(cache_dir, args.layers)
    dims = {name: int(values.shape[1]) for name, values in X_train.items()}
    print(f"{DATA}: {len(y_train)} training images, layers {dims} (extracted {extracted.n_extracted} in "
          f"{extracted.seconds:.1f} s)")
    # Exactly the sweep's folds (tlp.sweep makes them with this function and seed 0).
    folds = cv_folds(y_train, CV, None, SEED)
    grids = {head: head_grid(head, y_train) for head in args.heads}
    workers = warm_up_workers(args.n_jobs)

    tlp_runs, gs_runs = [], []
    for repeat in range(args.repeats):
        tlp_runs.append(run_tlp(cache_dir, args.layers, args.heads, args.n_jobs, racing=not args.no_racing))
        print(f"repeat {repeat + 1}: tlp {tlp_runs[-1]['seconds']:.2f} s", flush=True)
        baseline_jobs = args.n_jobs if args.baseline_n_jobs is None else args.baseline_n_jobs
        gs_runs.append(run_gridsearch(X_train, y_train, folds, args.heads, baseline_jobs))
        print(f"repeat {repeat + 1}: GridSearchCV {gs_runs[-1]['seconds']:.2f} s", flush=True)
    busy = (busy_before, cpu_busy_fraction())
    n_jobs = os.cpu_count() if args.n_jobs == -1 else args.n_jobs
    report = build_report(args, grids, n_jobs, dims, len(y_train), folds, tlp_runs, gs_runs, workers, busy)
    report["gridsearch_n_jobs"] = args.n_jobs if args.baseline_n_jobs is None else args.baseline_n_jobs
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rows:
        report = run_rows(args)
        print()
        print(format_rows_report(report))
        write_json(args.json, report)
        print(f"\nwrote {args.json}")
        return 0
    if args.cache_dir is not None:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        report = run(args, args.cache_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="tlp-bench-sweep-") as work:
            report = run(args, Path(work))
    print()
    print(format_report(report))
    write_json(args.json, report)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
