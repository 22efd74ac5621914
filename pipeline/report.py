"""Output for people (aligned tables on stderr) and for scripts (JSON reports, atomically)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from .cache import temp_name

__all__ = ["write_report", "format_table"]


def write_report(path: str | os.PathLike, report: dict) -> Path:
    """Write ``report`` as JSON to ``path``: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_name(path)
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def format_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Plain aligned table; numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in cells[1:]) and len(cells) > 1 for i in range(len(headers))]

    def line(row):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(row, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True
