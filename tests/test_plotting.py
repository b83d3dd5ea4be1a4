"""Offline HTML: plotly.js inline in every file, or one shared copy per folder."""

import re

import plotly.graph_objects as go
import pytest

import plot_element_correlation as pec
import plot_global_edm_umap as pg
import plot_local_edm_umap as pl
from crabnet.plotting import PLOTLY_JS, save_html


def _fig(i: int) -> go.Figure:
    return go.Figure(go.Scatter(x=[0, 1], y=[i, i + 1], name=f"trace{i}"))


def _script_srcs(html: str) -> list[str]:
    return re.findall(r"<script[^>]*\bsrc=[\"']?([^\"' >]+)", html, flags=re.I)


def test_shared_js_written_once_and_referenced_relatively(tmp_path):
    a = save_html(_fig(1), tmp_path / "a.html", js="shared")
    b = save_html(_fig(2), tmp_path / "b.html", js="shared")
    bundle = tmp_path / PLOTLY_JS
    assert bundle.stat().st_size > 1_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html", "b.html", PLOTLY_JS]  # no temporaries left
    for path in (a, b):
        html = path.read_text()
        assert _script_srcs(html) == [PLOTLY_JS]  # nothing from the internet
        assert path.stat().st_size < 100_000
    inline = save_html(_fig(3), tmp_path / "inline" / "c.html")
    assert _script_srcs(inline.read_text()) == [] and inline.stat().st_size > 1_000_000
    assert not (tmp_path / "inline" / PLOTLY_JS).exists()


def test_truncated_shared_js_is_rewritten(tmp_path):
    (tmp_path / PLOTLY_JS).write_text("partial")
    save_html(_fig(1), tmp_path / "a.html", js="shared")
    assert (tmp_path / PLOTLY_JS).stat().st_size > 1_000_000


def test_bad_js_mode(tmp_path):
    with pytest.raises(ValueError, match="js must be one of"):
        save_html(_fig(1), tmp_path / "a.html", js="cdn")


@pytest.mark.parametrize("module", [pec, pl, pg])
def test_scripts_take_html_js(module, capsys):
    assert vars(module.parse_args([]))["html_js"] == "inline"
    assert vars(module.parse_args(["--html-js", "shared"]))["html_js"] == "shared"
    with pytest.raises(SystemExit):
        module.parse_args(["--html-js", "cdn"])
    assert "invalid choice" in capsys.readouterr().err
