"""Reports: a profile's JSON -> one self-contained HTML page (inline CSS and SVG).

- html:   render_html(profile_json, compare=None) -> str
- svg:    the plots (scatter with Pareto front, CED lines, horizontal bars)
- format: number formatting shared with the CLI tables
`write_report` writes <name>.json and <name>.html atomically into a reports folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cunet_optimize.atomic import write_atomic
from cunet_optimize.report.html import render_html

__all__ = ["render_html", "write_report", "write_html"]


def write_html(profile_json: dict, path: str | os.PathLike, compare: dict | None = None,
               json_name: str | None = None) -> Path:
    """Render and write one HTML file atomically (rendered fully before anything is written)."""
    page = render_html(profile_json, compare, json_name=json_name)
    return write_atomic(path, page)


def write_report(profile_json: dict, reports_dir: str | os.PathLike, name: str,
                 compare: dict | None = None) -> tuple[Path, Path]:
    """reports_dir/<name>.json and reports_dir/<name>.html; both rendered before either is written."""
    reports = Path(reports_dir)
    json_path, html_path = reports / f"{name}.json", reports / f"{name}.html"
    text = json.dumps(profile_json, indent=1, allow_nan=False) + "\n"
    page = render_html(profile_json, compare, json_name=str(json_path))
    write_atomic(json_path, text)
    write_atomic(html_path, page)
    return json_path, html_path
