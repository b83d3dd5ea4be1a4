"""The attention explorer served: any compound of a store, read from the store when it is opened.

``python -m crabnet.web.serve --serve --data-dir data --dataset aflow__Egap --port 8765`` serves
the explorer of that dataset's attention store at ``http://127.0.0.1:8765/`` (this machine only). The
page is the offline explorer (:mod:`crabnet.web.explorer`: same look, same URL-hash state), but its
list holds only the names of the embedded-style choice (the paper's compounds and a sample), its
search covers every compound of the store (the page fetches an index of all formulas once), and a
compound's maps, predictions and attributions are fetched when it is opened, as the JSON the offline
page embeds, read from the Zarr store for that request.

Routes (GET and HEAD; any other method gets 405):

- ``/``                          the explorer page
- ``/api/index``                 ``{"formulas": [...], "keys": [...]}`` by row (:func:`store_index`)
- ``/api/compound?row=N``        one compound (:func:`compound_entry`); ``?formula=F`` finds it after
  normalising; 404 (JSON ``error``, with close matches) for a formula or row the store lacks

Everything else is 404. A request whose target contains ``..`` (raw or percent-encoded, however many
times) is refused with 403 before anything else; no route reads a file: the page and the index are
made at start-up, and a compound is read through :class:`crabnet.explain.store.AttentionStore`. Requests
naming another host than 127.0.0.1/localhost (DNS rebinding) get 403 too.
"""

from __future__ import annotations

import errno
import gzip
import json
import sys
import threading
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from crabnet.errors import UsageError
from crabnet.progress import say
from crabnet.web.explorer import (
    DEFAULT_EXPLORE,
    choose_compounds,
    compound_entry,
    render_explorer,
    served_payload,
    store_index,
    write_explorer,
)

HOST = "127.0.0.1"
DEFAULT_PORT = 8765
LOCAL_NAMES = {"127.0.0.1", "localhost"}
GZIP_MIN = 1024  # bodies at least this long are sent gzip-compressed to clients that accept it
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'",
}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def has_traversal(target: str) -> bool:
    """Whether a request target holds ``..``, as written or after percent-decoding (repeatedly)."""
    for _ in range(8):
        if ".." in target:
            return True
        decoded = unquote(target)
        if decoded == target:
            return False
        target = decoded
    return True  # still encoded after 8 rounds: refuse


class ExplorerApp:
    """What the server answers: the page and the index (made once) and compounds (read per request).

    Args:
        store: a :class:`crabnet.explain.store.AttentionStore`.
        dataset: its dataset (titles, the paper's compounds).
        n_others: compounds listed besides the paper's (as ``--explore`` of step 2).
    """

    def __init__(self, store: Any, dataset: str, n_others: int = DEFAULT_EXPLORE):
        self.store = store
        self.dataset = dataset
        self.lock = threading.Lock()  # one store read at a time (each takes about a millisecond)
        chosen = choose_compounds(store, dataset, (), n_others)
        self.page = render_explorer(served_payload(store, chosen, dataset, n_others)).encode("utf-8")
        self.index = _dumps(store_index(store))
        self.page_gz, self.index_gz = gzip.compress(self.page, 6), gzip.compress(self.index, 6)  # compressed once

    def compound(self, query: str) -> tuple[int, bytes]:
        """Status and JSON body of ``/api/compound?row=N`` or ``?formula=F``."""
        params = parse_qs(query)
        try:
            if "row" in params:
                row = int(params["row"][0])
                if not 0 <= row < len(self.store):
                    raise KeyError(f"row {row} out of range 0..{len(self.store) - 1}")
            elif "formula" in params:
                row = self.store.find(params["formula"][0])
            else:
                return 400, _dumps({"error": "pass row=N or formula=F"})
        except ValueError:
            return 400, _dumps({"error": "row must be a whole number"})
        except KeyError as err:
            return 404, _dumps({"error": str(err.args[0] if err.args else err)})
        with self.lock:
            entry = compound_entry(self.store, row, "store")
        return 200, _dumps(entry)


class ExplorerHandler(BaseHTTPRequestHandler):
    """Fixed routes, read-only (see the module docstring); :func:`make_server` binds ``app``."""

    app: ExplorerApp
    quiet = True

    def version_string(self) -> str:
        return "crabnet-explorer"

    def do_GET(self) -> None:
        self._answer(body_too=True)

    def do_HEAD(self) -> None:
        self._answer(body_too=False)

    def __getattr__(self, name: str):
        if name.startswith("do_"):  # POST, PUT, DELETE, PATCH, OPTIONS, … : read-only server
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if 0 < length <= 1 << 20:
            self.rfile.read(length)  # drain a small body so the client reads the answer, not a reset
        text = b"method not allowed: this server is read-only (GET, HEAD)\n"
        self._send(405, text, "text/plain", {"Allow": "GET, HEAD"})

    def _answer(self, body_too: bool) -> None:
        if has_traversal(self.path):
            return self._send(403, b"forbidden: '..' in the path\n", "text/plain", body_too=body_too)
        host = (self.headers.get("Host") or HOST).rsplit(":", 1)[0].strip("[]").lower()
        if host not in LOCAL_NAMES:
            return self._send(403, b"forbidden: unexpected Host\n", "text/plain", body_too=body_too)
        url, app = urlsplit(self.path), self.app
        if url.path == "/":
            return self._send(200, app.page, "text/html; charset=utf-8", body_too=body_too, packed=app.page_gz)
        if url.path == "/api/index":
            return self._send(200, app.index, "application/json", body_too=body_too, packed=app.index_gz)
        if url.path == "/api/compound":
            try:
                status, body = self.app.compound(url.query)
            except Exception as err:  # a store that cannot be read: say so, keep serving
                self.log_error("compound %s: %r", url.query, err)
                status, body = 500, _dumps({"error": f"reading the store failed: {err}"})
            return self._send(status, body, "application/json", body_too=body_too)
        return self._send(404, b"not found\n", "text/plain", body_too=body_too)

    def _send(
        self, status: int, body: bytes, ctype: str, extra: dict | None = None, body_too: bool = True,
        packed: bytes | None = None,
    ) -> None:  # fmt: skip
        """One answer; ``packed``: the body gzip-compressed already."""
        headers = {**HEADERS, **(extra or {}), "Content-Type": ctype}
        if len(body) >= GZIP_MIN and "gzip" in (self.headers.get("Accept-Encoding") or ""):
            body = packed or gzip.compress(body, 6)
            headers.update({"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
        self.send_response(status, HTTPStatus(status).phrase)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body_too:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        if not self.quiet:
            super().log_message(format, *args)

    def log_error(self, format: str, *args: Any) -> None:
        super().log_message(format, *args)  # errors are always printed


def make_server(app: ExplorerApp, port: int = DEFAULT_PORT, quiet: bool = True) -> ThreadingHTTPServer:
    """A server of ``app`` on 127.0.0.1:``port`` (0: a free port; see ``server_address``), not yet serving.

    Raises:
        UsageError: the port is in use or cannot be used (one line, naming ``--port``).
    """
    handler = type("BoundExplorerHandler", (ExplorerHandler,), {"app": app, "quiet": quiet})
    try:
        server = ThreadingHTTPServer((HOST, port), handler)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} is in use; pass --port N") from None
        raise UsageError(f"cannot listen on {HOST}:{port} ({err.strerror or err}); pass --port N") from None
    server.daemon_threads = True
    return server


def open_store(data_dir: Path | str, dataset: str) -> Any:
    """The dataset's attention store, or a :class:`UsageError` saying which step makes it."""
    from crabnet.explain.store import AttentionStore, partial_path
    from crabnet.layout import Layout

    path = Layout(data_dir).attention_store(dataset)
    try:
        return AttentionStore(path)
    except FileNotFoundError:
        unfinished = (
            " (only the .partial store of a running or interrupted step 1)" if partial_path(path).exists() else ""
        )
        raise UsageError(
            f"no attention store for {dataset} at {path}{unfinished}; step 1 makes it: "
            f"python get_training_attention.py --data-dir {data_dir} --dataset {dataset}"
        ) from None


def serve(data_dir: Path | str, dataset: str, port: int = DEFAULT_PORT, n_others: int = DEFAULT_EXPLORE,
          verbose: bool = False) -> int:  # fmt: skip
    """Serve the explorer until Ctrl-C (then 0). Raises :class:`UsageError` (no store, port taken)."""
    store = open_store(data_dir, dataset)
    app = ExplorerApp(store, dataset, n_others)
    server = make_server(app, port, quiet=not verbose)
    url = f"http://{HOST}:{server.server_address[1]}/"
    say(f"attention explorer of {dataset} ({len(store)} compounds, {store.path}) at {url}")
    say("Ctrl-C stops it")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        say("\nstopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


CLI_DOC = """The attention explorer of one dataset's attention store, served on this machine.

  python -m crabnet.web.serve --serve --data-dir data --dataset aflow__Egap --port 8765

serves it at http://127.0.0.1:8765/ (only this machine can connect; Ctrl-C stops it): the same page
as the offline explorer that step 2 writes (data/explorer/<dataset>.html), but its search finds any
compound of the store, and each compound's maps, predictions and attributions are read from the
store when it is opened. Links keep the view in the URL hash (#compound=HfO2&layer=0&head=2&capture=8).
The store is made by step 1 (get_training_attention.py). Without --serve, --out FILE writes the
offline page of the paper's compounds and --explore N more to FILE (step 2 also adds the compounds
it renders as videos).
"""


def parse_args(argv: Sequence[str] | None = None):
    """The flags of ``python -m crabnet.web.serve`` (see :data:`CLI_DOC`)."""
    from crabnet.jobs.cli import make_parser

    parser = make_parser(CLI_DOC)
    parser.prog = "python -m crabnet.web.serve"
    parser.add_argument("--serve", action="store_true", help="serve the explorer at http://127.0.0.1:PORT/")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="root of inputs and outputs")
    parser.add_argument("--dataset", default="aflow__Egap", help="whose attention store (data/attention/<dataset>/)")
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument(
        "--explore",
        type=int,
        default=DEFAULT_EXPLORE,
        help="compounds listed besides the paper's (the search finds any)",
    )
    parser.add_argument("--out", type=Path, default=None, help="without --serve: write the offline page to this file")
    parser.add_argument("--verbose", action="store_true", help="--serve: print every request")
    args = parser.parse_args(argv)
    if not args.serve and args.out is None:
        parser.error("pass --serve, or --out FILE to write the offline page")
    if args.explore < 0 or not 0 <= args.port <= 65535:
        parser.error("--explore must be >= 0 and --port within 0..65535")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the explorer (``--serve``) or write the offline page (``--out``); usage errors: one line, exit 2."""
    import sys

    from crabnet.errors import UsageError

    args = parse_args(argv)
    try:
        if args.serve:
            return serve(args.data_dir, args.dataset, args.port, args.explore, verbose=args.verbose)
        info = write_explorer(open_store(args.data_dir, args.dataset), args.out, args.dataset, n_others=args.explore)
        say(f"explorer: {info.n_compounds} compounds -> {info.path} ({info.size / 1e6:.1f} MB)")
        return 0
    except UsageError as err:
        say(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
