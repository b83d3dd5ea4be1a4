"""The two pages of the workflow: the attention explorer and the report, and their front-end files.

- ``crabnet.web.explorer``  the offline attention explorer page (step 2)
- ``crabnet.web.serve``     the same explorer served for any compound of a store (127.0.0.1 only)
- ``crabnet.web.report``    ``data/index.html``, the report of every output

The markup, styles and scripts are files of this package (``theme.css`` is the one theme of both
pages; ``explorer.html`` / ``.css`` / ``.js``, ``report.html`` / ``.css``, ``report_parts.html``);
Python prepares data and fills them in. A written page inlines everything it needs: one offline,
self-contained HTML file.

Templates are :class:`string.Template` text: ``$name`` (or ``${name}``) is a placeholder, ``$$`` a
dollar sign. Values are inserted as given (escape data text with :func:`html.escape` first) and are
not scanned again, so CSS, JavaScript and JSON go in unchanged.

A parts file holds small named templates, each starting at a line ``<!--@ name -->``; text before
the first one is a comment. A part's lines are trimmed and joined: with nothing where the break is
beside a tag (a line ending in ``>`` or the next one starting with ``<``), else with one space, so
parts can be indented and wrapped without adding whitespace between tags.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files
from string import Template

_PART = re.compile(r"^<!--@ (\w+) -->$", re.MULTILINE)


@cache
def asset(name: str) -> str:
    """The text of a front-end file of this package (``theme.css``, ``explorer.js``, …)."""
    return (files(__package__) / name).read_text(encoding="utf-8")


def fill(name: str, /, **values: str) -> str:
    """The template file ``name`` with its placeholders replaced (a missing value raises KeyError)."""
    return Template(asset(name)).substitute(values)


def styles(*names: str) -> str:
    """The style sheets ``names`` (``theme.css`` first, then the page's own), one after another."""
    return "\n".join(asset(n).strip() for n in names)


@cache
def parts(name: str) -> dict[str, Template]:
    """The named templates of a parts file (see the module docstring)."""
    chunks = _PART.split(asset(name))
    out = {}
    for key, body in zip(chunks[1::2], chunks[2::2]):
        text = ""
        for line in filter(None, (line.strip() for line in body.splitlines())):
            text += ("" if not text or text.endswith(">") or line.startswith("<") else " ") + line
        out[key] = Template(text)
    return out
