"""Sweeps on a dask cluster: the (layer, head, fold) fits through joblib's dask backend.

tlp brings no scheduler of its own: ``tlp sweep --scheduler tcp://HOST:8786`` (or
``$TLP_DASK_SCHEDULER``) hands the same fold and refit tasks that run on this machine's
cores to the workers of a running dask cluster, with ``parallel_config(backend="dask",
scatter=...)``: each layer's feature array is sent to the workers once and every task
refers to it, instead of being pickled into each task (a sweep of 3 layers x 4 heads
x 5 folds is ~60 tasks per round). The tasks and their seeds are the same, so results,
winner and saved head equal a local run's. ``dask[distributed]`` is an optional extra
(``pip install tlp[dask]``), imported only when a scheduler is named.
"""

from __future__ import annotations

import contextlib
import os

from .errors import TlpInputError

__all__ = ["scheduler_address", "fit_backend"]

CONNECT_TIMEOUT = "3s"  # a scheduler answers in milliseconds; a wrong address should not hang a sweep


def scheduler_address(value: str | None) -> str | None:
    """The scheduler to use: ``value`` (``--scheduler``), else ``$TLP_DASK_SCHEDULER``, else None."""
    return value or os.environ.get("TLP_DASK_SCHEDULER") or None


@contextlib.contextmanager
def fit_backend(address: str | None, arrays):
    """Where joblib runs the sweep's tasks inside this block: its default (loky processes
    on this machine) without an address; with one, the dask cluster there, ``arrays``
    scattered to its workers once."""
    if address is None:
        yield
        return
    try:
        from dask.distributed import Client
    except ImportError:
        raise TlpInputError("--scheduler needs dask's distributed scheduler, which is not installed: "
                            "pip install 'tlp[dask]'") from None
    from joblib import parallel_config

    try:
        client = Client(address, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as error:
        raise TlpInputError(f"cannot reach the dask scheduler at {address} ({error}); start one (dask scheduler) "
                            "or fix --scheduler / $TLP_DASK_SCHEDULER") from None
    with client, parallel_config(backend="dask", scatter=list(arrays)):
        yield
