"""The report's HTML pieces: the parts of ``report_parts.html`` filled in, their text escaped here.

Used by :mod:`crabnet.web.report` and :mod:`crabnet.web.paper`; tables, thumbnails and links relative to the
data folder.
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from crabnet import web

TABLE_ROWS = 60  # rows of a CSV shown in the page (the rest behind the link)
FOLD_ROWS = 12  # longer tables start folded


def _part(part: str, /, **values: Any) -> str:
    """The part ``part`` of ``report_parts.html`` with ``values`` (markup or escaped text) filled in."""
    return web.parts("report_parts.html")[part].substitute({k: str(v) for k, v in values.items()})


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(root: Path, path: Path, fragment: str = "") -> str:
    """Relative, URL-quoted link from the report to ``path``."""
    rel = path.relative_to(root).as_posix()
    return _esc(quote(rel, safe="/()-_.,~") + (f"#{fragment}" if fragment else ""))


def _link(root: Path, path: Path, text: str, fragment: str = "") -> str:
    """A link to ``path`` with the (escaped) ``text``."""
    return _part("link", href=_href(root, path, fragment), text=_esc(text))


def _file_link(root: Path, path: Path, text: str) -> str:
    """A link to ``path`` with its size beside it."""
    return _part("file_link", href=_href(root, path), text=_esc(text), size=_size(path))


def _size(path: Path) -> str:
    try:
        n = path.stat().st_size
    except OSError:
        return ""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _num(value: Any, digits: int = 4) -> str:
    """A number with ``digits`` significant digits, integers as such; text unchanged."""
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return str(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(x):
        return "–"
    if x == int(x) and abs(x) < 1e15 and (not isinstance(value, str) or "." not in value):
        return f"{int(x):,}" if abs(x) >= 10000 else str(int(x))
    return f"{x:.{digits}g}"


def _row(cells: Iterable[Any], tag: str = "td") -> str:
    """A table row of cells given as markup (escape text first)."""
    return _part("tr", cells="".join(_part(tag, text=c) for c in cells))


def _table(head: Sequence[str], body: Sequence[str], caption: str, n_rows: int, fold_caption: str) -> str:
    """A data table of escaped ``head`` names and ``body`` rows (markup); a table of more than ``FOLD_ROWS``
    rows (``n_rows``, those shown or not) starts folded, ``fold_caption`` visible."""
    head_html = "".join(_part("th", text=_esc(h)) for h in head)
    table = _part("table", caption=caption, head=head_html, body="".join(body))
    if n_rows > FOLD_ROWS:
        return _part("folded", caption=_esc(fold_caption), n=n_rows, table=table)
    return table


def csv_table(
    root: Path,
    path: Path,
    max_rows: int = TABLE_ROWS,
    caption: str | None = None,
    keep: Callable[[str], bool] | None = None,
) -> str:
    """A CSV rendered as an HTML table (first ``max_rows`` rows; numbers to 4 significant digits).

    ``keep``: show only the columns whose name it accepts (all by default).
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        return _part("muted", text=f"cannot read {_esc(path.name)}: {_esc(err)}")
    if not rows:
        return _part("muted", text=f"{_esc(path.name)} is empty")
    if keep is not None:
        cols = [i for i, name in enumerate(rows[0]) if keep(name)]
        rows = [[row[i] for i in cols if i < len(row)] for row in rows]
    head, body = rows[0], rows[1:]
    cap = caption or path.relative_to(root).as_posix()
    more = (
        f" · first {max_rows} of {len(body)} rows"
        if len(body) > max_rows
        else f" · {len(body)} row{'' if len(body) == 1 else 's'}"
    )
    caption_html = _part("caption_link", href=_href(root, path), text=_esc(cap), more=more)
    shown = [_row(_esc(_num(v)) for v in row) for row in body[:max_rows]]
    return _table(head, shown, caption_html, len(body), cap)


def data_table(head: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "") -> str:
    """Rows of plain values as an HTML table in the style of :func:`csv_table` (numbers via ``_num``, all escaped).

    Longer tables than ``FOLD_ROWS`` start folded, their caption visible.
    """
    body = [_row(_esc(_num(v)) for v in r) for r in rows]
    return _table(head, body, _part("caption", text=_esc(caption)) if caption else "", len(body), caption)


def thumbs(root: Path, images: Iterable[Path], twins: bool = True, label: Callable[[Path], str] | None = None) -> str:
    """A grid of figure thumbnails, each linking to its interactive HTML twin when there is one.

    ``label``: the caption of a figure (its file name without suffix by default)."""
    cards = []
    for png in images:
        twin = png.with_suffix(".html")
        if twins and not twin.is_file():
            # correlation figures: <name>__z92.png belongs to <name>.html
            twin = png.with_name(re.sub(r"__z\d+$", "", png.stem) + ".html")
        target = twin if twins and twin.is_file() else png
        extra = " · " + _link(root, png, "PNG") if target != png else ""
        cards.append(
            _part(
                "thumb",
                target=_href(root, target),
                src=_href(root, png),
                alt=_esc(png.stem),
                name=_esc(label(png)) if label else _breakable(png.stem),
                label="interactive" if target != png else "full size",
                extra=extra,
            )
        )
    return _part("thumbs", cards="".join(cards)) if cards else ""


def _breakable(name: str) -> str:
    """Escaped name that may wrap after its ``__`` separators."""
    return "__<wbr>".join(_esc(part) for part in name.split("__"))


def file_links(root: Path, paths: Iterable[Path], label=lambda p: p.name) -> str:
    items = "".join(_part("li", text=_file_link(root, p, label(p))) for p in paths)
    return _part("files", items=items) if items else ""


def _store_attrs(zarr_json: Path) -> dict:
    """Group attributes of a Zarr v3 store (read from its ``zarr.json``; no zarr import)."""
    try:
        return dict(json.loads(zarr_json.read_text()).get("attributes", {}))
    except (OSError, ValueError):
        return {}
