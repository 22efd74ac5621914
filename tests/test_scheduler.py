"""Sweeps on a dask cluster (`tlp sweep --scheduler ADDRESS`): a real LocalCluster of two
worker processes runs the fold and refit tasks; the results, the winner and the saved head
are those of a run on this machine's cores."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from tlp import sweep
from tlp.cli import main

pytestmark = pytest.mark.scale


@pytest.fixture(scope="module")
def scheduler():
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def _features():
    X, y = load_digits(return_X_y=True)
    X = X[:600].astype(np.float32)
    return {"raw": X, "halved": X[:, ::2].copy()}, y[:600]


def _chosen(result) -> dict:
    return {k: v for k, v in result.best.items() if not k.endswith("seconds")}


def test_a_sweep_on_a_dask_cluster_equals_a_local_one(scheduler):
    X, y = _features()
    local = sweep((X, y), heads=["softmax", "svm", "knn"], n_jobs=2, progress=False)
    remote = sweep((X, y), heads=["softmax", "svm", "knn"], scheduler=scheduler, progress=False)
    assert _chosen(remote) == _chosen(local)
    for key, values in local.cv_results.items():
        if key.startswith("split") or key in ("mean_test_score", "n_splits_run"):
            np.testing.assert_array_equal(np.asarray(remote.cv_results[key], dtype=float),
                                          np.asarray(values, dtype=float))
    np.testing.assert_array_equal(remote.best_estimator.predict(X[remote.best["layer"]]),
                                  local.best_estimator.predict(X[local.best["layer"]]))


def test_an_unreachable_scheduler_is_one_line_exit_2(image_folder, tmp_path, capsys, monkeypatch):
    # $TLP_DASK_SCHEDULER names the scheduler when --scheduler is not given.
    monkeypatch.setenv("TLP_DASK_SCHEDULER", "tcp://127.0.0.1:9")
    code = main(["sweep", str(image_folder), "--image-size", "32", "--weights", "none", "--heads", "knn", "--cv", "2",
                 "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "cannot reach the dask scheduler at tcp://127.0.0.1:9" in err
