"""Shared fixtures: tiny seeded datasets written to temporary folders; the rule for missing real data.

Tests that compare with the published datasets or reference tables call :func:`require_data`
when those are missing: the test is skipped on a developer's machine, but fails when the
environment variable ``CRABNET_REQUIRE_DATA=1`` is set (``.ci/run`` sets it), so CI cannot pass
without comparing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Formulas of 2-4 elements from a small palette, so tiny runs are quick but not trivial.
REQUIRE_DATA_ENV = "CRABNET_REQUIRE_DATA"
PALETTE = ["Li", "Na", "Mg", "Al", "Si", "Ti", "Fe", "Co", "Ni", "Cu", "Zn", "O", "N", "S", "Cl", "F"]


def make_formulas(n: int, rng: np.random.Generator) -> list[str]:
    out = []
    for _ in range(n):
        k = int(rng.integers(2, 5))
        els = rng.choice(PALETTE, size=k, replace=False)
        out.append("".join(f"{e}{int(rng.integers(1, 5))}" for e in els))
    return out


def write_dataset(root: Path, name: str = "tiny", sizes=(64, 24, 24), seed: int = 0) -> Path:
    """Write <root>/benchmark_data/<name>/{train,val,test}.csv with a learnable target."""
    rng = np.random.default_rng(seed)
    folder = root / "benchmark_data" / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "val", "test"), sizes):
        formulas = make_formulas(n, rng)
        # target: a smooth function of the composition (number of distinct elements + noise)
        target = [len([c for c in f if c.isupper()]) * 1.5 + rng.normal(0, 0.1) for f in formulas]
        lines = ["formula,target"] + [f"{f},{t:.5f}" for f, t in zip(formulas, target)]
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests run tiny models, which a second thread slows down (thread hand-off, and contention when
    the machine is busy); scripts started as subprocesses keep torch's default."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """A --data-dir holding the dataset 'tiny'."""
    write_dataset(tmp_path)
    return tmp_path


def require_data(reason: str) -> None:
    """Skip the calling test because real data or a reference table is missing; fail instead in CI.

    Args:
        reason: what is missing and how to get it.

    Raises:
        pytest.fail.Exception: when ``CRABNET_REQUIRE_DATA=1``.
        pytest.skip.Exception: otherwise.
    """
    if os.environ.get(REQUIRE_DATA_ENV, "").strip() == "1":
        pytest.fail(f"{reason} ({REQUIRE_DATA_ENV}=1: missing data is a failure here, not a skip)", pytrace=False)
    pytest.skip(reason)


# --------------------------------------------------------------------------------------------
# a real headless Chromium for the browser tests (Debian's `chromium`, driven by Playwright)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def chromium_executable() -> str | None:
    """The system Chromium ($CHROMIUM, else chromium / chromium-browser on PATH); None if there is none."""
    import os
    import shutil

    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per test module; skips with the reason when Playwright or Chromium is missing.

    Playwright is pointed at the installed executable and never downloads a browser.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require_data("browser test: the playwright package is not installed (pip install -r requirements.txt)")
    exe = chromium_executable()
    if exe is None:
        require_data("browser test: no Chromium installed (Debian/Ubuntu: apt-get install chromium; or set $CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped where PyTorch sees no CUDA GPU (``benchmarks/gpu_check.py`` runs them)."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked cuda)")
    for item in marked:
        item.add_marker(skip)
