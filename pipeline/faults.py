"""Errors that are not tlp's own, as the one line and exit code the command line prints.

tlp's own errors (:class:`~tlp.errors.TlpInputError`) already say what is wrong and how
to fix it. Everything else that reaches ``tlp.cli.main`` comes here:

- a fault of the environment (an ``OSError`` whose errno is in ``ENVIRONMENT_FIXES``:
  disk full, read-only, permissions, a file where a folder should be, ...): exit 1,
  naming the path, what happened and the fix. Found in the exception's cause and context
  too, since libraries wrap them;
- h5py failing on an HDF5 file the user named (``tlp sweep FILE.h5``): exit 2, naming it;
- a file that is not UTF-8 text: exit 2, naming it when the traceback knows it;
- anything else: exit 1 with the exception's type and message.

Every message is one line: library messages (HDF5's carry newlines) are joined.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["ENVIRONMENT_FIXES", "one_line", "environment_fault", "describe"]

_RERUN = "then rerun the same command (finished work is kept)"
_FOLDER_IN_WAY = ("a file is in the way where a folder is needed: move that file away or pass another "
                  "folder (--cache-dir, --out)")

#: errno -> how to fix it; these are faults of the machine, not of tlp or its input.
ENVIRONMENT_FIXES: dict[int, str] = {
    errno.ENOSPC: f"free space on that disk or pass --cache-dir (or --out) on another one, {_RERUN}",
    errno.EDQUOT: f"free space within your quota or pass --cache-dir (or --out) elsewhere, {_RERUN}",
    errno.EROFS: f"the file system is read-only: pass a writable --cache-dir (or --out, --report), {_RERUN}",
    errno.EACCES: f"make it writable for you (chmod/chown) or pass another folder (--cache-dir, --out), {_RERUN}",
    errno.EPERM: f"make it writable for you (chmod/chown) or pass another folder (--cache-dir, --out), {_RERUN}",
    errno.ENOTDIR: _FOLDER_IN_WAY,
    errno.EEXIST: _FOLDER_IN_WAY,
    errno.EISDIR: "a folder is in the way where a file is needed: pass a file name (e.g. --report FILE.json)",
    errno.ENOENT: "check the path; create the folder first if you meant a new one",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EIO: f"the disk reported an input/output error: check it (e.g. dmesg), {_RERUN}",
    errno.EMFILE: f"too many open files: raise the limit (ulimit -n) or pass fewer --workers, {_RERUN}",
    errno.ENFILE: f"too many open files on this machine: close some programs, {_RERUN}",
}

# Reading an HDF5 file the user named fails for these from the machine, not the file.
_MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENFILE}


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) as one space."""
    return " ".join(str(text).split())


def _chain(error: BaseException):
    """``error``, then what it was raised from or while handling, without cycles."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def environment_fault(error: BaseException) -> OSError | None:
    """The first ``OSError`` with an errno in ``ENVIRONMENT_FIXES`` in ``error``'s chain."""
    return next((e for e in _chain(error) if isinstance(e, OSError) and e.errno in ENVIRONMENT_FIXES), None)


def _frames(error: BaseException):
    """The traceback's frames, innermost first."""
    frames, tb = [], error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return reversed(frames)


def _file_in_traceback(error: BaseException) -> str | None:
    """The innermost existing file that a frame of the traceback names as ``path`` (or
    ``self.path``): the file being read when a reader that does not name it failed."""
    for frame in _frames(error):
        owner = frame.f_locals.get("self")
        try:
            candidates = (frame.f_locals.get("path"), vars(owner).get("path") if hasattr(owner, "__dict__") else None)
        except TypeError:
            continue
        for value in candidates:
            if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
                return os.fspath(value)
    return None


def _from_h5py(error: BaseException) -> bool:
    return any(f"h5py{os.sep}" in frame.f_code.co_filename for frame in _frames(error))


def _named_hdf5(args) -> list[str]:
    """HDF5 files the user named as data (``tlp sweep FILE.h5 --test FILE.h5``)."""
    named = [getattr(args, "data", None), getattr(args, "test", None), *(getattr(args, "inputs", None) or [])]
    return [str(p) for p in named if isinstance(p, str) and p.endswith((".h5", ".hdf5")) and Path(p).is_file()]


def _where(error: OSError) -> str:
    """The path an OSError names (the destination of a rename), or ''."""
    path = error.filename2 if error.filename2 is not None else error.filename
    return f": {os.fsdecode(path)}" if path is not None else ""


def describe(error: Exception, args=None) -> tuple[int, str]:
    """(exit code, the line to print after ``tlp: error: ``) for an error tlp did not raise.

    ``args``: the parsed command line, to tell an HDF5 file the user named from tlp's own.
    """
    fault = environment_fault(error)
    hdf5, found = _named_hdf5(args), _file_in_traceback(error)
    if hdf5 and (_from_h5py(error) or found in hdf5) and (fault is None or fault.errno not in _MACHINE_ERRNOS):
        name = repr(found) if found in hdf5 else " or ".join(repr(p) for p in hdf5)
        return 2, one_line(f"{name}: not a readable tlp cache file ({type(error).__name__}: {error}); pass a file "
                           "that `tlp extract` wrote (see `tlp cache ls`), or extract the images again")
    if fault is not None:
        return 1, one_line(f"{fault.strerror or type(fault).__name__}{_where(fault)}; "
                           f"{ENVIRONMENT_FIXES[fault.errno]}")
    if isinstance(error, UnicodeDecodeError):
        byte = error.object[error.start:error.start + 1].hex() or "?"
        return 2, one_line(f"{repr(found) if found else 'a file tlp read'} is not UTF-8 text (byte 0x{byte} at "
                           f"position {error.start}); save it as UTF-8")
    if isinstance(error, OSError):
        return 1, one_line(f"{error.strerror or error}{_where(error)}; check that path, {_RERUN}")
    return 1, one_line(f"{type(error).__name__}: {error} (rerun with -v for the traceback)")
