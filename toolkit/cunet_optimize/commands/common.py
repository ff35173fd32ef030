"""Small helpers shared by the subcommands: tables, JSON output."""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]], file=None) -> None:
    """A plain aligned text table (numbers right-aligned)."""
    file = file or sys.stdout
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        out = []
        for i, c in enumerate(row):
            numeric = c.replace(".", "", 1).replace("M", "").replace("%", "").lstrip("-").isdigit()
            out.append(c.rjust(widths[i]) if numeric else c.ljust(widths[i]))
        return "  ".join(out).rstrip()

    print(fmt(cells[0]), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells[1:]:
        print(fmt(row), file=file)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))
