"""Live runs: a lock that a running extraction holds, so ``tlp cache gc`` leaves its work alone.

A run that writes shards into ``<cache>/.partial/<run>/`` holds, for as long as it runs,
an exclusive ``flock`` on ``<cache>/.live/<run>.<pid>.<host>.<random>.lock`` and touches
the file every few seconds (a heartbeat). ``gc`` takes a run as live when it cannot get
the lock (the holder is alive on this machine; the kernel drops the lock when the
holder dies, even by SIGKILL), or when the file was touched recently (a holder on
another machine sharing the folder, where the lock may not be seen). Lock files of dead
runs are removed by the next ``gc``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import Iterator

from .files import temp_name

__all__ = ["LIVE_DIR", "HEARTBEAT_SECONDS", "STALE_SECONDS", "live_run", "live_runs"]

logger = logging.getLogger(__name__)

LIVE_DIR = ".live"
HEARTBEAT_SECONDS = 5.0
# A lock file untouched for this long, whose lock can be taken, belongs to a dead run.
STALE_SECONDS = 60.0
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


@contextlib.contextmanager
def live_run(cache_root: Path, run: str) -> Iterator[Path]:
    """Mark ``run`` (a shard folder name) live in ``cache_root`` for the ``with`` block."""
    folder = Path(cache_root) / LIVE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run}.{_suffix()}.lock"
    handle = open(path, "w")
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stop), name="tlp-heartbeat", daemon=True)
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in _NO_LOCKS:
                raise
            # A file system without locks (NFS without lockd, Lustre without flock): the
            # heartbeat alone marks the run live.
            logger.debug("no file locks in %s (%s); relying on the heartbeat", folder, error)
        beat.start()
        yield path
    finally:
        stop.set()
        if beat.is_alive():
            beat.join()
        with contextlib.suppress(OSError):
            path.unlink()
        handle.close()  # releases the lock


def _suffix() -> str:
    """pid.host.random, as temporary names carry them (see :func:`tlp.files.temp_name`)."""
    return temp_name(Path("x")).name.split(".tmp.", 1)[1]


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        with contextlib.suppress(OSError):
            os.utime(path)


def live_runs(cache_root: Path) -> set[str]:
    """Names of the runs in ``cache_root`` that are live now; removes dead runs' lock files."""
    folder = Path(cache_root) / LIVE_DIR
    if not folder.is_dir():
        return set()
    return {path.name.split(".", 1)[0] for path in folder.glob("*.lock") if _is_live(path)}


def _is_live(path: Path) -> bool:
    try:
        handle = open(path, "r+")
    except FileNotFoundError:
        return False  # the run ended while we looked
    except OSError:
        return True  # cannot tell: keep its work
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError as error:
            if error.errno not in _NO_LOCKS:
                return True  # cannot tell: keep its work
            return time.time() - os.fstat(handle.fileno()).st_mtime < STALE_SECONDS
        try:
            if time.time() - os.fstat(handle.fileno()).st_mtime < STALE_SECONDS:
                return True  # just created, or touched by a holder on another machine
            logger.info("removing the lock file of a dead run: %s", path.name)
            path.unlink(missing_ok=True)
            return False
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
