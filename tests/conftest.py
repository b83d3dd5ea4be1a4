"""Shared fixtures: tiny seeded datasets written to temporary folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# Formulas of 2-4 elements from a small palette, so tiny runs are quick but not trivial.
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


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """A --data-dir holding the dataset 'tiny'."""
    write_dataset(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------------------------
# a real headless Chromium for the browser tests (Debian's `chromium`, driven by Playwright)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


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
        pytest.skip("browser test: the playwright package is not installed (pip install -r requirements.txt)")
    exe = chromium_executable()
    if exe is None:
        pytest.skip("browser test: no Chromium installed (Debian/Ubuntu: apt-get install chromium; or set $CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
