"""The rule for tests that need real data: skip on a developer's machine, fail in CI.

Run: pytest tests/test_require_data.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REQUIRE_DATA_ENV, require_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value", ["", "0", "yes"])
def test_missing_data_skips_outside_ci(monkeypatch, value):
    monkeypatch.setenv(REQUIRE_DATA_ENV, value)
    with pytest.raises(pytest.skip.Exception, match="tables are missing"):
        require_data("tables are missing")
    monkeypatch.delenv(REQUIRE_DATA_ENV)
    with pytest.raises(pytest.skip.Exception):
        require_data("tables are missing")


def test_missing_data_fails_in_ci(monkeypatch):
    monkeypatch.setenv(REQUIRE_DATA_ENV, "1")
    try:
        require_data("tables are missing")
    except pytest.skip.Exception:  # caught here: escaping, it would turn this test into a skip, not a failure
        outcome = "skip"
    except pytest.fail.Exception as err:
        outcome = str(err)
    else:
        outcome = "returned"
    assert "tables are missing" in outcome and "not a skip" in outcome, outcome


def test_ci_requires_the_data():
    """.ci/run stops when `make data` fails and runs the tests with CRABNET_REQUIRE_DATA=1."""
    lines = [ln.split("#")[0].strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    assert "set -euo pipefail" in lines
    assert "make data" in lines  # a bare command: with `set -e` its failure ends CI
    assert f"export {REQUIRE_DATA_ENV}=1" in lines
    assert lines.index("make data") < lines.index(f"export {REQUIRE_DATA_ENV}=1") < lines.index("make test")
