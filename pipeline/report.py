"""Output for people: aligned plain-text tables (the CLI prints them on stdout).

Reports for scripts are JSON, written atomically by :func:`tlp.files.write_json`.
"""

from __future__ import annotations

from typing import Sequence

from .files import write_json

__all__ = ["format_table", "write_report"]

write_report = write_json  # the spelling before tlp.files held every writer


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
