"""The report data/index.html: learning curves, what it shows and links, that it never fails a step,
and (in a real headless Chromium) that every link, image and video resolves."""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from test_videos import write_store

import generate_attention_videos as gav
from crabnet.oxidation import SplitFormulas, write_split
from crabnet.plotting import write_learning_curve
from crabnet.training.checkpoint import save_checkpoint
from crabnet.training.recipe import Recipe, Scaler, build_model, recipe_dict
from crabnet.web.report import refresh_report, write_report

SMALL = {"d_model": 32, "n_heads": 2, "d_ff": 64, "head_dims": (32, 16)}


def history(n: int = 6) -> dict:
    return {
        "epoch": list(range(1, n + 1)),
        "train_loss": [1.0 / (e + 1) for e in range(n)],
        "val_mae": [10.0, 8.0, math.nan, 6.0, 7.0, 7.5][:n],
        "lr": [1e-4 * (e + 1) for e in range(n)],
        "swa_updates": [0, 0, 1, 0, 2, 0][:n],
    }


def read_png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(path)


def test_learning_curve_png(tmp_path):
    path = write_learning_curve({**history(), "recipe": "6 epochs"}, tmp_path / "fig" / "c.png")
    img = read_png(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
    assert img[..., :3].std() > 0.05  # something is drawn
    # missing series leave their panel empty instead of failing
    part = write_learning_curve({"train_loss": [3.0, 2.0, 1.5]}, tmp_path / "part.png")
    assert read_png(part).shape[0] > 300


def imsave(path: Path, image: np.ndarray) -> None:
    from matplotlib.image import imsave as save

    save(path, image)


def save_small(path: Path, meta: dict) -> Path:
    model = build_model("onehot", n_elements=4, **SMALL)
    return save_checkpoint(path, model, Scaler(0.0, 1.0), meta)


class Links(HTMLParser):
    """Every href/src of a page."""

    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value is not None:
                self.links.append((tag, value))


def add_attributions(store: Path) -> None:
    """Leave-one-out, Shapley values and contributions (random, 0 at padding) in a store written without them:
    step 2 then writes faithfulness.csv with its Shapley columns and the periodic table of mean Shapley values."""
    import zarr

    group = zarr.open_group(store, mode="r+")
    real = group["elements"][:] > 0
    shape = (*group["prediction"].shape, real.shape[1])  # (n, c, E)
    rng = np.random.default_rng(1)
    for name in ("attribution", "shapley", "contribution"):  # the store reads a compound's three together
        group.create_array(name, data=(rng.normal(size=shape) * real[:, None, :]).astype(np.float32))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A data folder with some output of every kind; step 2 (videos + explorer) refreshes the report."""
    root = tmp_path_factory.mktemp("report")
    add_attributions(write_store(root))
    recipe = recipe_dict(Recipe(epochs=6, epochs_step=1))
    save_small(
        root / "models" / "synth__onehot.pt",
        {
            "dataset": "synth",
            "features": "onehot",
            "recipe": recipe,
            "epochs_run": 6,
            "test_mae": 1.2345,
            "written_by": "test",
            "history": history(),
        },
    )
    save_small(root / "models" / "synth__mat2vec.pt", {"dataset": "synth", "features": "mat2vec", "test_mae": 2.5})
    (root / "models" / "synth__mat2vec.state.pt").write_bytes(b"not shown")
    figs = root / "figures"
    for rel in (
        "umap_local/synth/onehot__test__O.png",
        "correlation/mat2vec.png",
        "correlation/mat2vec__z92.png",
        "stats/diversity_benchmark.png",
        "stats/prevalence/synth__by_count.png",
        "faithfulness/synth.png",
    ):
        path = figs / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        imsave(path, np.random.default_rng(0).random((30, 40)))  # any PNG
    for rel in ("umap_local/synth/onehot__test__O.html", "correlation/mat2vec.html"):
        (figs / rel).write_text("<html><body>plot</body></html>")
    for rel, text in {
        "umap/local/synth/summary.csv": "atom,layer,knn_accuracy\nO,0,0.8123456\nO,1,0.9\n",
        "figures/correlation/summary.csv": "name,mean_abs_r\nmat2vec,0.25\n",
        "stats/benchmark.csv": "dataset,samples_total,train_diversity\nsynth,5,0.912345\n",
        "predictions/synth__onehot__test.csv": "formula,target,prediction\nHf1O2,60,61\n",
        "embeddings/onehot/synth__layer0__Q.csv": "element,0\nH,1\n",
        "notes/extra.json": "{}",
        # the training split: the prevalence table of step 2 reads it
        "benchmark_data/synth/train.csv": "formula,target\nHf1O2,1\nFe2O3,2\nAl1Gd1O3,3\nGd2O7Ti2,4\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    # the oxidation table as step 3 writes it: one guess, one formula without a charge-balanced solution
    split = SplitFormulas("synth__test", ["Hf1O2", "P1W3"], ["Hf1 O2", "P1 W3"], [None, None])
    write_split(split, [({"Hf": 4.0, "O": -2.0}, None), (None, "no_solution")], root / "oxidation")
    argv = [
        "--data-dir",
        str(root),
        "--dataset",
        "synth",
        "--scheduler",
        "sequential",
        "--dpi",
        "40",
        "--formula",
        "HfO2",
        "--formula",
        "Fe2O3",
        "--explore",
        "1",
    ]
    assert gav.main(**vars(gav.parse_args(argv))) == 0
    return root


def test_report_shows_and_links_everything(data_dir):
    page = data_dir / "index.html"
    text = page.read_text()
    # training summary and a learning curve written from the checkpoint's history
    assert (data_dir / "figures" / "training" / "synth__onehot.png").is_file()
    assert "figures/training/synth__onehot.png" in text
    assert not (data_dir / "figures" / "training" / "synth__mat2vec.png").exists()  # no history, no figure
    assert "1.234" in text and "6 epochs, epochs_step 1" in text and "last 7.5, best 6" in text
    assert "state.pt" not in text
    # attention: explorer, the merged videos with controls, the others as links
    assert "explorer/synth.html" in text
    assert len(re.findall(r"<video controls", text)) == 2
    assert "videos/synth/Hf1O2_attention.mp4" in text and "videos/synth/Fe2O3_progress.mp4" in text
    # figures as thumbnails linking to their interactive twins; CSV tables rendered
    assert "href='figures/umap_local/synth/onehot__test__O.html'" in text
    assert "href='figures/correlation/mat2vec.html'><img" in text
    assert "<td>0.8123</td>" in text and "<td>0.9123</td>" in text
    assert "<td>1</td><td>50.0 %</td><td>no solution 1</td>" in text  # oxidation: 1 of 2 guessed
    assert "figures/faithfulness/synth.png" in text and "notes/extra.json" in text
    # faithfulness: the table with |attribution| as the reference and the one with |Shapley| and the sign test
    assert "<th>tau_rollout</th>" in text and "<th>shapley_tau_attention</th>" in text
    assert "<th>shapley_positive_random</th>" in text and "<th>shapley_tau_rollout_se</th>" not in text
    # the periodic tables: thumbnails linking their interactive twins, in crabnet.explain.ptable order, then the CSV
    assert "Periodic tables per element" in text
    tables = ("prevalence", "attention", "shapley", "mae", "test_mae")  # test_mae: predictions/synth__onehot__test.csv
    places = []
    for name in tables:
        assert (data_dir / "figures" / "ptable" / "synth" / f"{name}.html").is_file(), name
        link = f"href='figures/ptable/synth/{name}.html'><img src='figures/ptable/synth/{name}.png'"
        assert link in text, name
        places.append(text.index(link))
    assert places == sorted(places) and text.index("Faithfulness of attention") < places[0]
    assert "training prevalence" in text and "attention/synth/per_element.csv" in text
    assert "<th>prevalence</th>" in text and "<th>test_mae</th>" in text
    assert "figures/ptable/synth/plotly.min.js" not in text  # beside the HTML files, not an output of its own
    # every link is relative and resolves to a file here
    parser = Links()
    parser.feed(text)
    assert len(parser.links) > 20
    for _tag, link in parser.links:
        url = urlsplit(link)
        if not url.path:
            assert url.fragment, link  # an in-page anchor
            continue
        assert not url.scheme and not url.netloc and not link.startswith("/"), link
        assert (data_dir / unquote(url.path)).exists(), link


def test_report_survives_a_broken_checkpoint(data_dir, tmp_path, capsys):
    root = tmp_path
    (root / "models").mkdir()
    (root / "models" / "bad__mat2vec.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="cannot read"):
        path = write_report(root)
    assert "bad__mat2vec" in path.read_text()
    # a step's refresh never raises: here the folder is a file
    assert refresh_report(root / "models" / "bad__mat2vec.pt") is None
    assert "could not refresh the report" in capsys.readouterr().err


def test_report_in_browser_every_link_image_and_video_resolves(browser, data_dir):
    page = browser.new_page()
    page.set_default_timeout(5000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto((data_dir / "index.html").as_uri())
    links = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
    sources = page.eval_on_selector_all("img[src], video[src]", "els => els.map(e => e.src)")
    assert len(links) > 20 and len(sources) >= 8
    for url in links + sources:
        parts = urlsplit(url)
        assert parts.scheme == "file", url
        if parts.fragment and Path(unquote(parts.path)) == data_dir / "index.html":
            assert page.query_selector(f"[id='{parts.fragment}']"), url  # an anchor of this page
            continue
        assert Path(unquote(parts.path)).is_file(), url
    # images decode and videos load their metadata in the browser
    page.evaluate("() => document.querySelectorAll('img').forEach(i => i.loading = 'eager')")
    page.wait_for_function("[...document.images].every(i => i.complete)")
    assert page.evaluate("[...document.images].every(i => i.naturalWidth > 0)")
    page.wait_for_function("[...document.querySelectorAll('video')].every(v => v.readyState >= 1 || v.error)")
    assert page.evaluate("[...document.querySelectorAll('video')].map(v => v.duration > 0)") == [True, True]
    assert all(urlsplit(u).scheme == "file" for u in requests)  # nothing fetched from a network
    # the explorer link of a video opens that compound
    href = page.get_attribute("a:text-is('explore')", "href")
    assert "compound=Fe2O3" in href or "compound=Hf1O2" in href
    page.click("a:text-is('explore')")
    page.wait_for_selector("body[data-ready='1']")
    assert page.text_content("#title") in ("Fe2O3", "Hf1O2")
    assert errors == []
    page.close()


def test_report_paper_vs_this_run(tmp_path):
    """One full-recipe checkpoint and one statistics row: published beside ours, the checklist partly done."""
    from crabnet.layout import BENCHMARK, Layout
    from crabnet.reference import published_mae
    from crabnet.stats import read_published

    layout = Layout(tmp_path)
    layout.checkpoint("aflow__Egap", "mat2vec").parent.mkdir(parents=True)
    save_small(
        layout.checkpoint("aflow__Egap", "mat2vec"),
        {"dataset": "aflow__Egap", "features": "mat2vec", "full_recipe": "immi", "test_mae": 0.3456},
    )
    save_small(
        layout.checkpoint("aflow__Egap", "onehot"),  # a short run is no full-recipe model
        {"dataset": "aflow__Egap", "features": "onehot", "full_recipe": None, "test_mae": 9.876},
    )
    published = read_published(BENCHMARK)
    row = published[published["mat_prop"] == "aflow__Egap"].copy()
    row[["val_diversity", "test_diversity"]] = row[["test_diversity", "val_diversity"]].to_numpy()  # ours: unswapped
    layout.stats().mkdir()
    row.to_csv(layout.stats_table(BENCHMARK), index=False, float_format="%.17g")

    text = write_report(tmp_path).read_text()
    section = text[text.index("<section class='card' id='paper'>") :]
    section = section[: section.index("</section>")]
    assert "href='#paper'" in text
    reference = published_mae("aflow__Egap", "mat2vec")
    mae = re.search(
        r"<tr><td>aflow__Egap</td><td>CrabNet \(mat2vec\)</td><td>immi</td><td>([^<]+)</td>"
        r"<td>([^<]+)</td><td>([^<]+)</td></tr>",
        section,
    )
    assert mae, section
    assert float(mae.group(1)) == pytest.approx(reference, rel=1e-3) and mae.group(2) == "0.3456"
    assert float(mae.group(3)) == pytest.approx(0.3456 / reference, abs=0.01)
    assert "HotCrab (onehot)</td><td>immi" not in section and "9.876" not in section
    # statistics: the row step 8 wrote, equal to the published one once its val/test columns are swapped back
    assert re.search(r"<tr><td>aflow__Egap</td>.*?<td>✓ equal</td></tr>", section)
    # checklist: step 4 partly done (1 of the 36 models), step 8's benchmark statistics 1 of 18, step 1 not done
    assert re.search(r"<td>4</td><td>full-recipe models[^<]*</td><td>partly: 1 of 36</td>", section)
    assert re.search(r"<td>4</td><td>Q/K/V element embeddings[^<]*</td><td>not done</td>", section)
    assert re.search(r"<td>8</td><td>statistics: the 18 benchmark sets</td><td>partly: 1 of 18</td>", section)
    assert re.search(r"<td>1</td><td>aflow__Egap: attention captured[^<]*</td><td>not done</td>", section)
