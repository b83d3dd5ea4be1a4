"""The served attention explorer (``python -m crabnet.web.serve --serve``): any compound of the store in a
real headless Chromium, the fixed read-only routes, refused traversal, the command line.

The browser test drives Debian's ``chromium`` through Playwright (``conftest.browser``) and skips, saying
why, where either is missing.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from playwright.sync_api import expect
from test_explorer import add_attributions, assert_bars, assert_same, expected_cells, shown_cells
from test_videos import FORMULAS, write_store

from crabnet.explain.store import AttentionStore
from crabnet.web import serve
from crabnet.web.explorer import choose_compounds
from crabnet.web.serve import ExplorerApp, has_traversal, make_server

ROOT = Path(__file__).resolve().parents[1]
MORE = ["Li1F1", "Na1Cl1", "K1Br1", "Mg1O1", "Ca1S1", "Al2O3", "Li1Fe1P1O4", "Ca1Mg1Si2O6"]
N_LISTED = 3  # compounds listed (as the offline page's sample)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A store of 13 compounds with every attribution, served on a free port in a thread: (store, port)."""
    root = tmp_path_factory.mktemp("served")
    path = write_store(root, formulas=FORMULAS + MORE)
    add_attributions(path)
    store = AttentionStore(path)
    server = make_server(ExplorerApp(store, "synth", n_others=N_LISTED), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield store, server.server_address[1]
    server.shutdown()
    server.server_close()


def request(port: int, method: str, target: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """A raw request (the target sent exactly as given): status, headers, body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, target, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# routes


def test_routes_answer_the_store(served):
    store, port = served
    status, headers, body = request(port, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'"served":true' in body and b"explorer-data" in body
    status, _, body = request(port, "GET", "/api/index")
    index = json.loads(body)
    assert status == 200 and index["formulas"] == store.formulas and len(index["keys"]) == len(store)
    status, _, body = request(port, "GET", "/api/compound?row=4")
    entry = json.loads(body)
    assert status == 200 and entry["formula"] == store.formulas[4] and "attention" in entry and "shapley" in entry
    assert json.loads(request(port, "GET", "/api/compound?formula=Fe2O3")[2])["row"] == store.find("Fe2O3")
    status, _, body = request(port, "GET", "/api/compound?formula=Cu3Au")
    assert status == 404 and "close matches" in json.loads(body)["error"]
    assert request(port, "GET", "/api/compound?row=999")[0] == 404
    assert request(port, "GET", "/api/compound?row=x")[0] == 400
    # gzip for clients that accept it; HEAD: the headers alone
    page = request(port, "GET", "/")[2]
    status, headers, body = request(port, "GET", "/", {"Accept-Encoding": "gzip, deflate"})
    assert headers.get("Content-Encoding") == "gzip" and gzip.decompress(body) == page
    status, headers, body = request(port, "HEAD", "/")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000
    for target in ("/index.html", "/attention.zarr/zarr.json", "/api", "/api/compound/1", "/explorer.js"):
        assert request(port, "GET", target)[0] == 404, target


@pytest.mark.parametrize(
    "target",
    [
        "/../pyproject.toml",
        "/%2e%2e/pyproject.toml",
        "/%2E%2E%2Fpyproject.toml",
        "/%252e%252e/pyproject.toml",  # encoded twice
        "/api/..%2f..%2fpyproject.toml",
        "/api/compound?formula=../../pyproject.toml",
        "/./../../../../etc/passwd",
    ],
)
def test_traversal_is_refused(served, target):
    status, _, body = request(served[1], "GET", target)
    assert status == 403 and b"[project]" not in body and b"root:" not in body
    assert request(served[1], "HEAD", target)[0] == 403


def test_read_only_and_local_only(served):
    port = served[1]
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        status, headers, _ = request(port, method, "/")
        assert status == 405 and headers["Allow"] == "GET, HEAD", method
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("POST", "/api/compound?row=1", body=b"x" * 5000)  # a body is read and dropped
    assert conn.getresponse().status == 405
    conn.close()
    assert request(port, "GET", "/", {"Host": "evil.example:80"})[0] == 403  # DNS rebinding
    assert request(port, "GET", "/", {"Host": f"localhost:{port}"})[0] == 200
    assert has_traversal("/a%2E./b") and not has_traversal("/api/compound?formula=Hf1O2")


# --------------------------------------------------------------------------------------------
# in the browser


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    context.set_default_timeout(5000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    expected_404 = ("/favicon.ico", "formula=Cu3Au")  # Chromium asks for an icon; a formula the store lacks

    def console(m) -> None:
        url = m.location.get("url", "")
        if m.type == "error" and not url.endswith(expected_404):
            errors.append(f"{m.text} ({url})")

    pg.on("console", console)
    yield pg
    assert errors == []  # no JavaScript errors (and no failed or refused requests) on the way
    context.close()


def test_browser_opens_a_compound_the_offline_page_does_not_embed(page, served):
    store, port = served
    listed = {store.formulas[i] for i, _ in choose_compounds(store, "synth", (), N_LISTED)}
    hidden = [f for f in store.formulas if f not in listed]
    assert len(listed) == N_LISTED and "Al1Gd1O3" in hidden and "Ca1Mg1Si2O6" in hidden
    page.goto(f"http://127.0.0.1:{port}/#compound=GdAlO3&layer=1&head=2&capture=3")
    page.wait_for_selector("body[data-ready='1']")
    assert page.text_content("#title") == "Al1Gd1O3"
    assert_same(shown_cells(page), expected_cells(store, "Al1Gd1O3", 3, 1, 2))
    assert_bars(page, store.compound("Al1Gd1O3"), 3)
    assert page.evaluate("location.hash") == "#compound=Al1Gd1O3&layer=1&head=2&capture=3"
    listed_items = page.eval_on_selector_all("#compound-list li.item", "els => els.map(e => e.dataset.formula)")
    assert sorted(listed_items) == sorted(listed)  # the list holds the sample; the store has more
    # the search finds any compound of the store and opens it from the server
    page.fill("#search", "Si2 O6 Ca Mg")
    expect(page.locator("#title")).to_have_text("Ca1Mg1Si2O6")  # (the page's CSP forbids eval: no wait_for_function)
    assert page.text_content("#search-msg") == "found Ca1Mg1Si2O6"
    page.wait_for_selector("body:not([data-loading])")
    assert_same(shown_cells(page), expected_cells(store, "Ca1Mg1Si2O6", 3, 1, 2))
    page.fill("#search", "O")  # by element: the listed ones and the store's others
    found = page.eval_on_selector_all("#compound-list li.item.found", "els => els.map(e => e.dataset.formula)")
    assert set(found) == {f for f in hidden if "O" in re.findall("[A-Z][a-z]*", f)}
    page.click("#compound-list li.item.found[data-formula='Al2O3']")
    expect(page.locator("#title")).to_have_text("Al2O3")
    page.select_option("#head", "0")
    assert_same(shown_cells(page), expected_cells(store, "Al2O3", 3, 1, 0))
    # a link to a compound the store lacks names it and the closest ones
    page.goto(f"http://127.0.0.1:{port}/#compound=Cu3Au")
    page.wait_for_selector("body[data-ready='1']")
    expect(page.locator("#notice")).to_contain_text("'Cu3Au' is not in")
    assert "close matches" in page.text_content("#notice")


# --------------------------------------------------------------------------------------------
# the command line


def test_port_taken_and_store_missing_are_one_line(served, tmp_path, capsys):
    store, _ = served
    data_dir = store.path.parents[2]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc = serve.main(["--serve", "--data-dir", str(data_dir), "--dataset", "synth", "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: port {port} is in use; pass --port N\n"
    assert serve.main(["--serve", "--data-dir", str(tmp_path), "--dataset", "nothing"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no attention store for nothing" in err and "get_training_attention.py" in err
    with pytest.raises(SystemExit) as done:
        serve.parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--serve" in text and "127.0.0.1" in text and "8765" in text and "aflow__Egap" in text
    with pytest.raises(SystemExit):
        serve.parse_args([])  # neither --serve nor --out


def test_command_prints_the_url_and_stops_on_ctrl_c(served):
    store, _ = served
    data_dir = store.path.parents[2]
    cmd = [sys.executable, "-m", "crabnet.web.serve", "--serve", "--data-dir", str(data_dir), "--dataset", "synth"]
    proc = subprocess.Popen([*cmd, "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, line + proc.stderr.read()
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        assert request(port, "GET", "/api/compound?formula=HfO2")[0] == 200
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "stopped" in err and "Traceback" not in err
