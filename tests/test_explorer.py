"""Attention explorer: encoding, the choice of compounds, the step-2 flags, and the page in a real headless Chromium.

The browser tests drive Debian's ``chromium`` through Playwright (see ``conftest.browser``) and
skip, saying why, where either is missing.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from test_videos import FORMULAS, C, H, write_store

import generate_attention_videos as gav
from crabnet.data import normalise_formula
from crabnet.explain.store import AttentionStore
from crabnet.jobs.cli import run
from crabnet.web.explorer import (
    QUANT_MAX,
    choose_compounds,
    decode_weights,
    encode_weights,
    explorer_path,
    write_explorer,
)

TOL = 1e-3  # shown weights (4 decimals of a 16-bit code) vs the store


def store_at(data_dir: Path, **kw) -> AttentionStore:
    return AttentionStore(write_store(data_dir, **kw))


def test_weights_round_trip_within_quantisation():
    rng = np.random.default_rng(1)
    w = rng.random((3, 2, 4, 5, 5))
    w[0, 0, 0, 0, 0] = np.nan
    w[1, 1, 1, 1, 1] = 1.0
    w[2, 1, 3, 4, 4] = 0.0
    back = decode_weights(encode_weights(w), w.shape)
    assert np.isnan(back[0, 0, 0, 0, 0]) and np.isnan(back).sum() == 1
    finite = np.isfinite(w)
    assert np.abs(back[finite] - w[finite]).max() <= 0.5 / QUANT_MAX + 1e-12
    assert back[1, 1, 1, 1, 1] == 1.0 and back[2, 1, 3, 4, 4] == 0.0
    assert len(encode_weights(w)) == 4 * ((w.size * 2 + 2) // 3)  # 2 bytes a weight, base64


def test_choice_paper_first_then_chosen_then_spread(tmp_path):
    # the paper's aflow compounds HfO2, GaN, BN are in this store (as Hf1O2 …), plus duplicates and
    # 2-, 3- and 4-element others
    others = [
        "Li1F1",
        "Na1Cl1",
        "K1Br1",
        "Mg1O1",
        "Ca1S1",
        "Al2O3",
        "Fe2O3",
        "Li2O1Ti1",
        "Na1Nb1O3",
        "Ba1Ti1O3",
        "Li1Fe1P1O4",
        "Ca1Mg1Si2O6",
        "K1Al1Si3O8",
    ]
    formulas = ["Ga1N1", "Hf1O2", "Li1F1", "B1N1", "O2Hf1", *others[1:], "Li1F1"]
    store = store_at(tmp_path, formulas=formulas)
    chosen = choose_compounds(
        store, "aflow__ael_bulk_modulus_vrh", rows=[store.find("Fe2O3"), store.find("HfO2")], n_others=6
    )
    groups = [g for _, g in chosen]
    forms = [store.formulas[i] for i, _ in chosen]
    # the paper's order (…, HfO2, …, GaN, …, BN …), then the chosen row not already there, then six others
    assert forms[:4] == ["Hf1O2", "Ga1N1", "B1N1", "Fe2O3"]
    assert groups == ["paper"] * 3 + ["chosen"] + ["sample"] * 6
    keys = [normalise_formula(f) for f in forms]
    assert len(set(keys)) == len(keys)  # O2Hf1 (= Hf1O2) and the second Li1F1 are not embedded twice
    n_el = [int((store.elements[i] > 0).sum()) for i, g in chosen if g == "sample"]
    assert sorted(set(n_el)) == [2, 3, 4] and max(n_el.count(k) for k in (2, 3, 4)) == 2  # evenly spread
    assert n_el == sorted(n_el)
    assert choose_compounds(store, "synth", n_others=0) == []
    everything = choose_compounds(store, "synth", n_others=1000)
    assert len(everything) == len({normalise_formula(f) for f in formulas})


def test_choice_spans_the_error_range(tmp_path):
    formulas = ["Li1F1", "Na1Cl1", "K1Br1", "Mg1O1", "Ca1S1", "Sr1Se1", "Ba1Te1"]
    store = store_at(tmp_path, formulas=formulas)
    err = np.abs(np.asarray(store.group["prediction"][:, -1]) - store.targets)
    picked = [i for i, _ in choose_compounds(store, "synth", n_others=2)]
    assert set(picked) == {int(np.argmin(err)), int(np.argmax(err))}  # the best and the worst


def run_main(data_dir: Path, *args: str) -> int:
    argv = ["--data-dir", str(data_dir), "--dataset", "synth", "--scheduler", "sequential", "--dpi", "40", *args]
    return run(gav.main, gav.parse_args(argv))  # as the script runs: usage errors -> exit 2


def test_step2_writes_offline_explorer_and_no_explorer_skips(tmp_path, capsys):
    write_store(tmp_path)
    page = explorer_path(tmp_path, "synth")
    assert run_main(tmp_path, "--formula", "Fe2O3", "--no-explorer") == 0
    assert not page.exists()
    assert run_main(tmp_path, "--formula", "Fe2O3", "--explore", "2") == 0
    out = capsys.readouterr().out
    assert "explorer: 3 compounds" in out and str(page) in out
    text = page.read_text()
    assert "Fe2O3" in text and "--explore" in text
    assert not re.search(r"<(script|link|img)[^>]+(src|href)\s*=", text)  # nothing loaded from anywhere
    assert "https://" not in text
    assert (tmp_path / "index.html").is_file()  # the report is refreshed at the end of the step
    assert run_main(tmp_path, "--formula", "Fe2O3", "--explore", "-1") == 2


# --------------------------------------------------------------------------------------------
# in the browser


@pytest.fixture(scope="module")
def page_file(tmp_path_factory) -> tuple[Path, Path]:
    """A store of the test compounds and its explorer page (every compound embedded)."""
    root = tmp_path_factory.mktemp("explorer")
    path = write_store(root)
    info = write_explorer(AttentionStore(path), explorer_path(root, "synth"), "synth", n_others=10)
    assert info.n_compounds == len(FORMULAS)
    return path, info.path


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    context.set_default_timeout(5000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    assert errors == []  # no JavaScript errors on the way
    context.close()


def open_page(page, path: Path, fragment: str = "") -> None:
    page.goto(path.as_uri() + (f"#{fragment}" if fragment else ""))
    page.wait_for_selector("body[data-ready='1']")


def shown_cells(page, table: str = "table.heatmap") -> dict[tuple[str, str], float]:
    cells = page.eval_on_selector_all(
        f"{table} td[data-value]", "els => els.map(e => [e.dataset.query, e.dataset.key, e.dataset.value])"
    )
    return {(q, k): float(v) for q, k, v in cells}


def expected_cells(store: AttentionStore, formula: str, capture: int, layer: int, head: int) -> dict:
    h = store.compound(formula)
    m = h.attention[capture, layer, head]
    return {(a, b): float(m[i, j]) for i, a in enumerate(h.symbols) for j, b in enumerate(h.symbols)}


def assert_same(shown: dict, expected: dict) -> None:
    assert shown.keys() == expected.keys()
    for key, value in expected.items():
        assert abs(shown[key] - value) <= TOL, (key, shown[key], value)


def test_browser_search_slider_head_show_store_weights(page, page_file):
    store_path, html_path = page_file
    store = AttentionStore(store_path)
    open_page(page, html_path)
    page.fill("#search", "Ti2 Gd2O7")  # another order and spacing of Gd2O7Ti2
    assert page.text_content("#title") == "Gd2O7Ti2"
    assert page.text_content("#search-msg") == "found Gd2O7Ti2"
    page.focus("#capture")
    page.keyboard.press("Home")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.select_option("#layer", "1")
    page.select_option("#head", "2")
    assert page.input_value("#capture") == "2"
    assert "epoch 2" in page.text_content("#capture-label")
    assert_same(shown_cells(page), expected_cells(store, "Gd2O7Ti2", 2, 1, 2))
    assert page.evaluate("location.hash") == "#compound=Gd2O7Ti2&layer=1&head=2&capture=2"
    # the prediction chart marks capture 2 with its prediction
    point = page.get_attribute("#current-point", "data-prediction")
    assert float(point) == pytest.approx(float(store.compound("Gd2O7Ti2").prediction[2]), rel=1e-5)

    page.select_option("#head", "all")
    tables = page.query_selector_all("table.heatmap")
    assert len(tables) == H
    for h in range(H):
        assert_same(shown_cells(page, f"table.heatmap[data-head='{h}']"), expected_cells(store, "Gd2O7Ti2", 2, 1, h))

    assert not page.is_visible("#compound-list li.item[data-formula='P1W3']")  # filtered out by the search
    page.fill("#search", "")
    page.click("#compound-list li.item[data-formula='P1W3']")
    assert page.text_content("#title") == "P1W3"
    assert "compound=P1W3&layer=1&head=all&capture=2" in page.evaluate("location.hash")

    page.fill("#search", "Xe2F3")
    assert "not embedded" in page.text_content("#search-msg")
    assert page.text_content("#title") == "P1W3"  # the view stays


def test_browser_hash_link_opens_that_view(page, page_file):
    store_path, html_path = page_file
    store = AttentionStore(store_path)
    last = C - 1
    open_page(page, html_path, f"compound=HfO2&layer=0&head=0&capture={last}")
    assert page.text_content("#title") == "Hf1O2"
    assert page.input_value("#capture") == str(last)
    assert page.input_value("#layer") == "0" and page.input_value("#head") == "0"
    assert_same(shown_cells(page), expected_cells(store, "Hf1O2", last, 0, 0))
    # a changed hash (e.g. a pasted link) is followed
    page.evaluate("location.hash = '#compound=Al1Gd1O3&layer=1&head=1&capture=0'")
    page.wait_for_function("document.getElementById('title').textContent === 'Al1Gd1O3'")
    assert "untrained" in page.text_content("#capture-label")
    assert_same(shown_cells(page), expected_cells(store, "Al1Gd1O3", 0, 1, 1))
    # a compound that is not embedded is named, with how to add it
    open_page(page, html_path, "compound=Cu3Au&capture=1")
    assert "Cu3Au is not embedded" in page.text_content("#notice")
    assert "--formula" in page.text_content("#notice")


def test_browser_play_advances_and_pauses(page, page_file):
    _, html_path = page_file
    open_page(page, html_path, "compound=Fe2O3&layer=0&head=1&capture=0")
    page.click("#play")
    page.wait_for_function("Number(document.getElementById('capture').value) >= 1", timeout=3000)
    page.click("#play")  # pause
    stopped = page.input_value("#capture")
    page.wait_for_timeout(800)
    assert page.input_value("#capture") == stopped
    assert f"capture={stopped}" in page.evaluate("location.hash")


@pytest.fixture(scope="module")
def attributed_page(tmp_path_factory) -> tuple[Path, Path]:
    """A store with known attributions added (as step 1 writes them) and its explorer page."""
    import zarr

    root = tmp_path_factory.mktemp("explorer_attr")
    path = write_store(root)
    g = zarr.open_group(path, mode="r+")
    el = g["elements"][:]
    n, E = el.shape
    i, c, j = np.meshgrid(np.arange(n), np.arange(C), np.arange(E), indexing="ij")
    values = ((i + 1) * (j - 1.2) * (c + 1) * 0.37).astype(np.float32) * (el > 0)[:, None, :]
    g.create_array("attribution", data=values, chunks=(n, C, E))
    store = AttentionStore(path)
    assert store.has_attribution
    info = write_explorer(store, explorer_path(root, "synth"), "synth", n_others=10)
    return path, info.path


def test_browser_attribution_bars_show_the_store_values(page, attributed_page, page_file):
    store_path, html_path = attributed_page
    store = AttentionStore(store_path)
    open_page(page, html_path, "compound=Gd2O7Ti2&layer=0&head=0&capture=3")
    assert page.is_visible("#attribution-box") and "epoch 3" in page.text_content("#attribution-title")

    def shown() -> dict[str, tuple[float, float]]:
        rows = page.eval_on_selector_all(
            "#attribution tbody tr", "els => els.map(e => [e.dataset.element, e.dataset.value, e.dataset.importance])"
        )
        return {s: (float(v), float(m)) for s, v, m in rows}

    h = store.compound("Gd2O7Ti2")
    raw = (h.attention * h.fractions[None, None, None, :, None]).sum(-2).mean(axis=(1, 2))  # (c, k) by hand
    rows = shown()
    assert list(rows) == h.symbols
    for j, s in enumerate(h.symbols):
        assert rows[s][0] == pytest.approx(float(h.attribution[3, j]), rel=1e-5)
        assert rows[s][1] == pytest.approx(float(raw[3, j]), abs=1e-4)
    assert any(v < 0 for v, _ in rows.values()) and any(v > 0 for v, _ in rows.values())  # signed bars
    page.focus("#capture")
    page.keyboard.press("Home")  # the slider moves the bars to capture 0
    assert "untrained" in page.text_content("#attribution-title")
    rows = shown()
    for j, s in enumerate(h.symbols):
        assert rows[s][0] == pytest.approx(float(h.attribution[0, j]), rel=1e-5)
    # a store without attribution (the module's other page) shows no bars
    open_page(page, page_file[1], "compound=Gd2O7Ti2")
    assert page.is_hidden("#attribution-box")


BASELINE = 55.0  # the Shapley values' empty-compound prediction (the training mean) of the test stores


def add_attributions(path: Path, seed: int = 3) -> None:
    """Add every kind of attribution to a finished test store, as step 1 writes them: leave-one-out, Shapley
    values (summing to the prediction minus ``BASELINE``), output contributions (summing to the prediction)
    and the head ablation (c, L, H)."""
    import zarr

    rng = np.random.default_rng(seed)
    g = zarr.open_group(path, mode="r+")
    real = g["elements"][:] > 0  # (n, E)
    pred = g["prediction"][:].astype(np.float64)  # (n, c)
    n, E = real.shape
    c, L_, H_ = pred.shape[1], g.attrs["n_layers"], g.attrs["n_heads"]
    k = real.sum(1)[:, None, None]

    def spread(total: np.ndarray) -> np.ndarray:  # signed values over the real elements summing to total (n, c)
        x = rng.normal(size=(n, c, E)) * 30 * real[:, None, :]
        x -= (x.sum(-1, keepdims=True) / k) * real[:, None, :]
        return (x + (total[..., None] / k) * real[:, None, :]).astype(np.float32)

    arrays = {
        "attribution": spread(np.zeros((n, c))),
        "shapley": spread(pred - BASELINE),
        "contribution": spread(pred),
        "head_effect": rng.normal(size=(c, L_, H_)).astype(np.float32),
        "head_change": rng.random((c, L_, H_)).astype(np.float32) * 3,
    }
    for name, values in arrays.items():
        g.create_array(name, data=values, chunks=values.shape)
    g.attrs.update({"shapley_baseline": BASELINE, "head_sample": 64})


@pytest.fixture(scope="module")
def full_page(tmp_path_factory) -> tuple[Path, Path]:
    """A store with every kind of attribution and its explorer page."""
    root = tmp_path_factory.mktemp("explorer_full")
    path = write_store(root)
    add_attributions(path)
    store = AttentionStore(path)
    assert store.has_attribution and store.has_shapley
    return path, write_explorer(store, explorer_path(root, "synth"), "synth", n_others=10).path


def shown_bars(page, table: str) -> dict[str, float]:
    rows = page.eval_on_selector_all(f"#{table} tbody tr", "els => els.map(e => [e.dataset.element, e.dataset.value])")
    return {s: float(v) for s, v in rows}


def assert_bars(page, h, capture: int) -> None:
    """The Shapley and contribution bars show the store's values of compound history ``h`` at ``capture``."""
    for name in ("shapley", "contribution"):
        rows = shown_bars(page, name)
        assert list(rows) == h.symbols, name
        for j, s in enumerate(h.symbols):
            assert rows[s] == pytest.approx(float(getattr(h, name)[capture, j]), rel=1e-5, abs=1e-9), (name, s)


def test_browser_shapley_contribution_and_head_effect_show_the_store(page, full_page, page_file):
    store_path, html_path = full_page
    store = AttentionStore(store_path)
    effect, change = store.head_effects()
    h = store.compound("Gd2O7Ti2")
    open_page(page, html_path, "compound=Gd2O7Ti2&layer=1&head=2&capture=3")
    assert page.is_visible("#shapley-box") and "epoch 3" in page.text_content("#shapley-title")
    assert_bars(page, h, 3)
    values = [v for name in ("shapley", "contribution") for v in shown_bars(page, name).values()]
    assert min(values) < 0 < max(values)  # signed bars
    # the footers add them up: Shapley values to the prediction minus the baseline, contributions to the prediction
    p = float(h.prediction[3])
    sums = page.eval_on_selector_all("#shapley-box tfoot td.num", "els => els.map(e => e.textContent)")
    assert [float(t.replace("−", "-")) for t in sums] == pytest.approx([p - BASELINE, p], rel=1e-3)
    # the selected head's ablation beside the selector, and one label per head in the grid
    label = page.locator("#head-effect")
    assert float(label.get_attribute("data-effect")) == pytest.approx(float(effect[3, 1, 2]), rel=1e-5)
    assert float(label.get_attribute("data-change")) == pytest.approx(float(change[3, 1, 2]), rel=1e-5)
    word = "helps" if effect[3, 1, 2] > 0 else "hurts"
    assert re.search(rf"zeroing this head: MAE [+-]\d.*\({word}\) · mean \|Δ\| \d", label.text_content())
    page.select_option("#head", "all")
    for hd in range(H):
        e = page.get_attribute(f"table.heatmap[data-head='{hd}'] caption .effect", "data-effect")
        assert float(e) == pytest.approx(float(effect[3, 1, hd]), rel=1e-5)
    page.focus("#capture")
    page.keyboard.press("Home")  # the slider moves the bars and the labels to capture 0
    assert "untrained" in page.text_content("#shapley-title")
    assert_bars(page, h, 0)
    e = page.get_attribute("table.heatmap[data-head='0'] caption .effect", "data-effect")
    assert float(e) == pytest.approx(float(effect[0, 1, 0]), rel=1e-5)
    # a store without them (the module's first page) hides the panels
    open_page(page, page_file[1], "compound=Gd2O7Ti2&head=1")
    assert page.is_hidden("#shapley-box") and page.is_hidden("#head-effect")
    assert page.locator("table.heatmap caption .effect").count() == 0
