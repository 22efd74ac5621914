"""Exceptions that the command line turns into exit codes.

Every error a user can fix themselves is a :class:`TlpInputError`; the CLI prints its
message on one line and exits with status 2. Messages follow one shape: what was
given, what was expected, one fix.
"""

from __future__ import annotations


class TlpInputError(ValueError):
    """Bad usage or bad input: the CLI exits 2 with ``str(error)`` as the reason."""


class ImageDecodeError(TlpInputError):
    """One image file could not be turned into RGB pixels.

    Parameters
    ----------
    path : str
        The file, as the user named it (relative to the data root when there is one).
    reason : str
        Short description of what is wrong, e.g. ``"truncated image data"``.
    """

    verb = "decode"

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(
            f"cannot {self.verb} image {path!r}: {reason}; "
            "fix or remove the file, or pass --on-error skip to leave bad files out"
        )

    def __reduce__(self):
        # DataLoader workers pickle failures back to the main process; the default
        # (type, (message,)) cannot rebuild an error that takes (path, reason).
        return type(self), (self.path, self.reason)


class ImageReadError(ImageDecodeError):
    """An image file could not be read at all (missing, unreadable, outside its folder)."""

    verb = "read"


class CacheCorruptError(TlpInputError):
    """Stored features or an index no longer match the checksum written with them.

    Extraction treats this as a miss (it recomputes and never serves the rows); a
    reader of a cache file the user named gets it as a one-line error.
    """

    def __init__(self, path, what: str):
        self.path = path
        self.what = what
        super().__init__(
            f"cache file {str(path)!r}: {what} does not match its checksum (changed on disk after it was "
            "written), so it is not used; run the same `tlp extract` again to recompute it, or list such "
            "files with `tlp cache verify` and remove one with `tlp cache rm KEY`"
        )
