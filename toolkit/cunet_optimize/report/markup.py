"""The HTML building blocks the report's sections share (html.py, auto_plan.py): escaping,
tables, sections, figures. Plain strings in, escaped markup out."""

from __future__ import annotations

from html import escape
from typing import Any, Iterable, Sequence


def esc(x: Any) -> str:
    return escape("" if x is None else str(x), quote=True)


def _cell(value: Any, cls: str = "", raw: bool = False) -> str:
    c = f' class="{cls}"' if cls else ""
    return f"<td{c}>{value if raw else esc(value)}</td>"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = (),
          row_classes: Sequence[str] | None = None, cls: str = "") -> str:
    """rows hold plain values (escaped) or ("raw", html) pairs for cells with markup."""
    num = set(numeric)
    head = "".join(f'<th class="num">{esc(h)}</th>' if i in num else f"<th>{esc(h)}</th>"
                   for i, h in enumerate(header))
    body = []
    for r, row in enumerate(rows):
        cells = []
        for i, v in enumerate(row):
            klass = "num" if i in num else ""
            if isinstance(v, tuple) and len(v) == 2 and v[0] == "raw":
                cells.append(_cell(v[1], klass, raw=True))
            elif isinstance(v, tuple) and len(v) == 2 and v[0] == "small":
                cells.append(_cell(v[1], "small"))
            else:
                cells.append(_cell(v, klass))
        rc = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        body.append(f"<tr{rc}>{''.join(cells)}</tr>")
    c = f' class="{cls}"' if cls else ""
    return f'<div class="scroll"><table{c}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{esc(caption)}</figcaption></figure>"
