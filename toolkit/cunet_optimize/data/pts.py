"""Read and write 300-W `.pts` landmark files.

Format (iBUG 300-W)::

    version: 1
    n_points: 68
    {
    x y        <- one line per point
    }

Coordinate convention: `.pts` files are 1-based (the 300-W annotations come from
Matlab), the toolkit works in 0-based pixel coordinates where the centre of pixel
(0, 0) is at (0.0, 0.0). `read_pts` subtracts 1 and `write_pts` adds 1, so every
array in memory is 0-based and a write/read round trip returns the same numbers
(written with `repr`, which is exact for float64).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cunet_optimize.atomic import write_atomic
from cunet_optimize.errors import CUNetError

PTS_ORIGIN = 1.0  # what a .pts file adds to a 0-based coordinate


class PtsError(CUNetError):
    """A `.pts` file that does not follow the 300-W format."""


def read_pts(path: str | os.PathLike) -> np.ndarray:
    """Points of a `.pts` file as an (n, 2) float64 array of 0-based (x, y)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PtsError(f"{path}: cannot read landmark file ({exc}); check the path") from exc
    # (line number, stripped text) of the non-blank lines
    lines = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]

    def fail(lineno: int, what: str) -> PtsError:
        return PtsError(f"{path}:{lineno}: {what}; expected 300-W .pts (version, n_points, '{{', 'x y' lines, '}}')")

    header: dict[str, str] = {}
    pos = 0
    while pos < len(lines) and ":" in lines[pos][1]:
        key, _, value = lines[pos][1].partition(":")
        header[key.strip()] = value.strip()
        pos += 1
    if not lines:
        raise fail(1, "empty file")
    if "n_points" not in header:
        raise fail(lines[min(pos, len(lines) - 1)][0], "missing 'n_points:' header")
    try:
        n_points = int(header["n_points"])
    except ValueError:
        raise fail(lines[pos - 1][0], f"n_points is not an integer: {header['n_points']!r}") from None
    if pos >= len(lines) or lines[pos][1] != "{":
        raise fail(lines[pos][0] if pos < len(lines) else lines[-1][0], "missing '{'")
    body_start = pos + 1
    try:
        close = next(k for k in range(body_start, len(lines)) if lines[k][1] == "}")
    except StopIteration:
        raise fail(lines[-1][0], "missing '}'") from None
    body = lines[body_start:close]
    if len(body) != n_points:
        raise fail(lines[close][0], f"n_points is {n_points} but {len(body)} point lines were found")
    if close != len(lines) - 1:
        raise fail(lines[close + 1][0], "text after '}'")
    points = np.empty((n_points, 2), dtype=np.float64)
    for k, (lineno, line) in enumerate(body):
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError
            points[k] = [float(fields[0]), float(fields[1])]
        except ValueError:
            raise fail(lineno, f"expected two numbers 'x y', got {line!r}") from None
        if not np.isfinite(points[k]).all():
            raise fail(lineno, f"non-finite coordinate {line!r}")
    return points - PTS_ORIGIN


def format_pts(points: np.ndarray) -> str:
    """The `.pts` text of an (n, 2) array of 0-based points."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise PtsError(f"landmarks must be an (n, 2) array, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise PtsError("landmarks contain NaN or inf; a .pts file cannot hold them")
    rows = "".join(f"{x!r} {y!r}\n" for x, y in (points + PTS_ORIGIN).tolist())
    return f"version: 1\nn_points: {len(points)}\n{{\n{rows}}}\n"


def write_pts(path: str | os.PathLike, points: np.ndarray) -> None:
    """Write 0-based (n, 2) points as a 1-based `.pts` file, atomically."""
    path = Path(path)
    text = format_pts(points)
    write_atomic(path, text)
