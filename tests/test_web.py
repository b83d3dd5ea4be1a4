"""crabnet/web: the front-end files are found as package resources, the templates fill, the JavaScript parses,
and the Python modules keep their markup in those files."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from importlib.resources import files
from pathlib import Path

import pytest

from crabnet import web

PACKAGE = Path(__file__).resolve().parents[1] / "crabnet"
WEB = files("crabnet.web")
MAX_MARKUP_LINES = 40  # lines of HTML/CSS/JS text a Python module of the package may hold


def front_end_files(*suffixes: str) -> list[str]:
    return sorted(p.name for p in WEB.iterdir() if p.name.endswith(suffixes))


def test_front_end_files_are_package_resources_listed_as_package_data():
    names = front_end_files(".html", ".css", ".js")
    expected = {"theme.css", "explorer.html", "explorer.css", "explorer.js", "report.html", "report.css"}
    assert expected <= set(names)
    # pyproject.toml ships them: every suffix used here has its package-data pattern
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8")
    for suffix in {Path(n).suffix for n in names}:
        assert f'"web/*{suffix}"' in pyproject, suffix
    for name in names:
        assert web.asset(name).strip(), name


def test_templates_fill_and_parts_parse():
    parts = web.parts("report_parts.html")
    assert {"table", "thumb", "video", "section", "workflow", "model"} <= set(parts)
    # a part's lines are joined without breaks or indentation
    assert parts["table"].template.startswith("<div class='table-wrap'><table class='data'>$caption<thead>")
    assert parts["link"].substitute(href="a%20b.png", text="&lt;x&gt;") == "<a href='a%20b.png'>&lt;x&gt;</a>"
    with pytest.raises(KeyError):
        parts["link"].substitute(href="x")  # a missing value is an error, not an empty hole
    page = web.fill("report.html", css="", stamp="now", version="1", nav="", sections="$data {{x}}")
    assert "$data {{x}}" in page  # values are inserted as given, never scanned again
    css = web.styles("theme.css", "explorer.css")
    assert css.index("--accent") < css.index("#compound-list")  # the theme first, then the page's sheet


@pytest.mark.parametrize("name", front_end_files(".js"))
def test_javascript_parses(name):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the JavaScript syntax check needs `node --check`")
    done = subprocess.run([node, "--check", str(WEB / name)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


TAGS = (
    "html|head|body|header|main|nav|footer|section|aside|div|span|p|a|b|br|wbr|small|code|h[1-6]|ul|ol|li|table|"
    "caption|thead|tbody|tr|th|td|figure|figcaption|img|video|details|summary|style|script|svg|label|input|select|"
    "button|option|meta|title|noscript"
)
MARKUP = re.compile(
    rf"</?(?:{TAGS})(?:[\s>/]|$)"  # an HTML tag
    r"|[{;]\s*[a-z-]+\s*:\s*[^;{}]+;"  # a CSS declaration
    r"|\bdocument\.|=>|\b(?:const|let|function)\s|[;{}]\s*$"  # JavaScript
)


def markup_lines(path: Path) -> int:
    """Lines of the file's string literals (docstrings aside) that look like HTML tags, CSS or JavaScript."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    lines = [line.encode("utf-8") for line in source.splitlines(keepends=True)]

    def segment(node: ast.AST) -> str:  # as ast.get_source_segment, without re-splitting the file each time
        first, last = node.lineno - 1, node.end_lineno - 1
        if first == last:
            return lines[first][node.col_offset : node.end_col_offset].decode("utf-8")
        parts = [lines[first][node.col_offset :], *lines[first + 1 : last], lines[last][: node.end_col_offset]]
        return b"".join(parts).decode("utf-8")

    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    count, todo = 0, [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Constant, ast.JoinedStr)) and id(node) not in docstrings:
            text = segment(node)
            count += sum(bool(MARKUP.search(line)) for line in text.splitlines())
        elif not isinstance(node, ast.Constant):
            todo.extend(ast.iter_child_nodes(node))
    return count


def test_python_modules_keep_their_markup_in_front_end_files(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        'A = "<td>x</td>"\nB = """body { margin:0; }\nplain text\n"""\nC = "el => { document.x }"\nD = "<dataset>"\n'
    )
    assert markup_lines(sample) == 3  # a tag, a CSS declaration, a line of JavaScript; not a placeholder
    counts = {p.relative_to(PACKAGE).as_posix(): markup_lines(p) for p in sorted(PACKAGE.rglob("*.py"))}
    over = {name: n for name, n in counts.items() if n > MAX_MARKUP_LINES}
    assert not over, over
