"""Number formatting shared by the HTML report and the CLI tables ("—" = not measured)."""

from __future__ import annotations

import math

MISSING = "—"


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt_bytes(n) -> str:
    if not _ok(n):
        return MISSING
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_ms(x) -> str:
    """Milliseconds with 3 significant digits (0.123, 1.23, 12.3, 123)."""
    if not _ok(x):
        return MISSING
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt_num(x, digits: int = 2, sign: bool = False) -> str:
    if not _ok(x):
        return MISSING
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def fmt_speedup(x) -> str:
    if not _ok(x):
        return MISSING
    if x >= 100:
        return f"{x:.0f}x"
    if x >= 10:
        return f"{x:.1f}x"
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.2g}x"


def fmt_pass(passed) -> str:
    return {True: "pass", False: "FAIL"}.get(passed, MISSING)
