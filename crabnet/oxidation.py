"""Oxidation-state guesses (step 3): pymatgen's answer, exactly, by dynamic programming.

For each formula we want what ``pymatgen.core.Composition(formula).oxi_state_guesses()[0]``
gives: among the charge-balanced assignments of the elements' ICSD oxidation states, the one
whose states occur most often in the ICSD, kept as ``{element: mean oxidation state}`` (the mean
over the atoms of an element, so Fe in Fe3O4 is 8/3), or ``None`` with a reason:

- ``no_solution``: no charge-balanced assignment (common for intermetallics, e.g. CuZn);
- ``timeout``: the guess used more CPU time than its bound (a safety net; it should not happen);
- ``max_sites``: the composition has more atoms than the ``max_sites`` bound (not tried);
- ``invalid_formula: …``: the formula could not be parsed;
- ``error: …``: an exception was raised (its type and message are kept).

pymatgen finds it by brute force (every multiset of states per element, then every combination
of the elements' sums), which is exponential in the number of atoms: minutes, or never, for some
formulas of the benchmark sets. :func:`element_sums` and :func:`guess_amounts` compute the same
answer with polynomial dynamic programmes over pymatgen's own data, read from the installed
pymatgen at run time (:func:`pymatgen_tables`: the states it tries per element and its ICSD
occurrence counts), including its order among solutions of equal score. pymatgen's defaults are
reproduced (``all_oxi_states=False``, no ``oxi_states_override``, ``target_charge=0``,
``max_sites=None``: the composition is not reduced). Scores are sums of integer counts, so the
arithmetic is exact.

How the work is shared and bounded:

- Every formula is parsed with :func:`crabnet.data.parse_formula` and turned into its integer
  composition, *not reduced* (pymatgen's answer depends on the amounts: N2O4 has one, NO2 none),
  elements in order of first appearance as pymatgen reads them (:func:`composition_key`).
  Fractional amounts are first scaled to the smallest integer formula with pymatgen's
  ``get_integer_formula_and_factor`` (Li0.5Co0.5O2 -> LiCoO4), since pymatgen refuses them.
  That composition, as text (``"N2 O4"``), is the unit of work and the key under which results
  are shared across formulas, splits and datasets.
- :func:`guess_all` cuts the distinct keys that the cache lacks into chunks of a few thousand,
  each a job of :mod:`crabnet.jobs.engine` (:func:`guess_chunk`): in this process for one chunk or on
  one core, else on an embedded Dask ``LocalCluster``, or wherever ``--scheduler`` says.
- Every guess is bounded by the CPU time of the thread running it (:func:`guess_bounded`: the
  loops of the dynamic programmes check ``time.thread_time``), so that the outcome does not depend
  on how busy the machine is and the bound holds in Dask's worker threads; an exception becomes
  the formula's ``error: …`` reason. Nothing stops a guess that would hang outside those loops
  (the rest is a few numpy operations and loops of bounded size per element); a worker process
  that dies has its chunk run again by Dask.
- :class:`GuessCache`: the submitting process alone appends each chunk's results to a JSON-lines
  file as soon as the chunk finishes, so an interrupted run resumes from the finished chunks; a
  timeout is retried when the bound is raised.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import heapq
import json
import math
import re
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crabnet.data import parse_formula, read_text_table
from crabnet.elements import ATOMIC_NUMBER, SYMBOLS
from crabnet.errors import DataError
from crabnet.jobs.engine import Engine, Job, run_jobs
from crabnet.layout import Layout

NO_SOLUTION = "no_solution"
TIMEOUT = "timeout"
MAX_SITES = "max_sites"
INVALID = "invalid_formula"
ERROR = "error"
CHUNK_SIZE = 5000  # compositions per job: about a second of one core (cheaper in this process than a cluster)
# CPU seconds of a guess, estimated (chunks of equal cost, --plan): a + b * atoms^2, fitted on aflow__Egap
SECONDS_PER_KEY, SECONDS_PER_ATOM2 = 1e-4, 2e-9


# --------------------------------------------------------------------------------------------
# single guesses: pymatgen's answer by dynamic programming


@dataclass(frozen=True)
class Guess:
    """The outcome of one guess.

    Attributes:
        key: the integer composition the guess was made for (:func:`composition_key`, ``"N2 O4"``).
        states: ``{element: mean oxidation state}`` of the most probable solution, or ``None``.
        reason: why ``states`` is ``None`` (see the module docstring); ``None`` when it is not.
        seconds: CPU time of the guess.
    """

    key: str
    states: dict[str, float] | None
    reason: str | None
    seconds: float = 0.0


def composition_key(formula: str) -> tuple[str, int]:
    """The integer composition a formula is guessed as, as text, and its number of atoms.

    Integer formulas keep their amounts and their order of elements (first appearance), which
    is what ``pymatgen.core.Composition(formula)`` sees: ``N2O4`` -> ``"N2 O4"`` (not reduced:
    pymatgen's answer depends on the amounts as written), ``O4Fe3`` -> ``"O4 Fe3"``. Formulas with
    fractional amounts are replaced by pymatgen's ``get_integer_formula_and_factor()`` formula,
    the smallest integer formula in its order of elements (``Li0.5Co0.5O2`` -> ``"Li1 Co1 O4"``).

    Args:
        formula: a formula understood by :func:`crabnet.data.parse_formula`.

    Returns:
        (key, number of atoms), e.g. ``("Fe6 O8", 14)``.

    Raises:
        DataError: the formula cannot be parsed.
    """
    amounts = parse_formula(formula)
    if any(a != int(a) for a in amounts.values()):
        from pymatgen.core import Composition

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            text = Composition(amounts).get_integer_formula_and_factor()[0]
        amounts = parse_formula(text)
    counts = [(el, int(a)) for el, a in amounts.items()]
    return " ".join(f"{el}{n}" for el, n in counts), sum(n for _, n in counts)


@functools.lru_cache(maxsize=1)
def pymatgen_tables() -> tuple[dict[str, tuple[int, ...]], dict[tuple[str, float], int]]:
    """What pymatgen's ``oxi_state_guesses()`` uses by default, read from the installed pymatgen.

    Returns:
        (states, occurrence): per element symbol the oxidation states tried, in pymatgen's order
        (``Element.icsd_oxidation_states``, or ``common_oxidation_states`` when that is empty;
        empty for e.g. the noble gases He, Ne, Ar); and the ICSD occurrence count of each
        ``(symbol, oxidation state)`` from pymatgen's ``icsd_bv.yaml`` (missing pairs count 0).

    Raises:
        RuntimeError: the occurrence table holds something other than integer counts (the exact
            integer arithmetic of :func:`element_sums` would not reproduce pymatgen's scores).
    """
    import pymatgen.core.composition as pmg_composition
    from monty.serialization import loadfn
    from pymatgen.core import Element, Species

    table = loadfn(Path(pmg_composition.__file__).parent / "icsd_bv.yaml")["occurrence"]
    occurrence: dict[tuple[str, float], int] = {}
    for name, count in table.items():
        if isinstance(count, bool) or not isinstance(count, int):
            raise RuntimeError(f"pymatgen's ICSD occurrence of {name} is {count!r}, not an integer count")
        sp = Species.from_str(name)
        occurrence[(sp.symbol, float(sp.oxi_state))] = count
    states = {}
    for sym in SYMBOLS:
        el = Element(sym)
        tried = el.icsd_oxidation_states or el.common_oxidation_states
        if any(o != int(o) for o in tried):
            raise RuntimeError(f"pymatgen lists a non-integer oxidation state of {sym}: {tried}")
        states[sym] = tuple(int(o) for o in tried)
    return states, occurrence


_UNREACHED = -(1 << 62)  # "no multiset has this sum"; scores are >= 0 and stay far from it


@functools.lru_cache(maxsize=4096)
def element_sums(symbol: str, sites: int) -> tuple[tuple[int, int], ...]:
    """The sums of oxidation states ``sites`` atoms of an element can have, with the best score of each.

    pymatgen enumerates every multiset of ``sites`` states of the element (its list, in order,
    with repetition: ``itertools.combinations_with_replacement``), scores a multiset by the sum of
    the ICSD occurrences of its states and keeps, per sum of states, the highest score. The sums
    are listed in the order they first appear in that enumeration, which decides pymatgen's order
    of solutions. Both are computed here without the enumeration, in
    O(states x sites x range of sums) time and O(states x range of sums) memory:

    - score: best[i][k][s] = the highest score of k sites using states 0..i with sum s, by the
      knapsack recurrence best[i][k] = max(best[i-1][k], best[i][k-1] shifted by state i + its count);
    - order: the multisets appear in lexicographic order of their (non-decreasing) index tuples,
      so first[j][k], the sums of k sites using states j.., in order of first appearance, is
      first[j][k-1] shifted by state j, followed by the sums of first[j+1][k] not seen yet.

    Args:
        symbol: element symbol.
        sites: number of atoms of the element (>= 1).

    Returns:
        ``((sum, score), …)`` in pymatgen's order; empty when the element has no states to try.
    """
    states, occurrence = pymatgen_tables()
    ox = states[symbol]
    if not ox or sites < 1:
        return ()
    low = min(ox)
    shift = [o - low for o in ox]  # >= 0; k sites have shifted sums in 0..k*width
    width = max(shift)
    size = sites * width + 1
    score = [occurrence.get((symbol, float(o)), 0) for o in ox]
    m = len(ox)

    # best[i] holds best[i][k] for the current k, by k: only k-1 is needed to make k
    best_prev = [np.full(size, _UNREACHED, dtype=np.int64) for _ in range(m)]
    for b in best_prev:
        b[0] = 0
    # first[j][k] for the current k, by j; first[m][k] is empty for k >= 1
    first_prev: list[np.ndarray] = [np.zeros(1, dtype=np.int64) for _ in range(m + 1)]
    empty = np.zeros(0, dtype=np.int64)
    end = _cpu_end()
    for _k in range(1, sites + 1):
        _check_time(end)
        best_cur = []
        below = np.full(size, _UNREACHED, dtype=np.int64)  # best[i-1][k]
        for i in range(m):
            cand = np.full(size, _UNREACHED, dtype=np.int64)
            d = shift[i]
            cand[d:] = best_prev[i][: size - d] + score[i]
            np.maximum(cand, below, out=cand)
            best_cur.append(cand)
            below = cand
        first_cur: list[np.ndarray] = [empty] * (m + 1)
        for j in range(m - 1, -1, -1):
            head = first_prev[j] + shift[j]
            tail = first_cur[j + 1]
            if tail.size:
                seen = np.zeros(size, dtype=bool)
                seen[head] = True
                tail = tail[~seen[tail]]
                head = np.concatenate([head, tail])
            first_cur[j] = head
        best_prev, first_prev = best_cur, first_cur

    order, best = first_prev[0], best_prev[m - 1]
    if not (best[order] >= 0).all() or int((best >= 0).sum()) != order.size:  # pragma: no cover - a bug
        raise AssertionError(f"sums and scores of {symbol}{sites} do not match")
    base = sites * low
    return tuple((int(s) + base, int(best[s])) for s in order)


@functools.lru_cache(maxsize=4096)
def _element_arrays(symbol: str, sites: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`element_sums` as two int64 arrays (sums, scores), in the same order."""
    pairs = element_sums(symbol, sites)
    return (
        np.array([v for v, _ in pairs], dtype=np.int64).reshape(-1),
        np.array([sc for _, sc in pairs], dtype=np.int64).reshape(-1),
    )


_DENSE_ABOVE = 4096  # (sums so far) x (sums of the element) above which numpy arrays replace dicts


class _Reach:
    """Best score per sum of states of the elements e.. (a suffix of the composition).

    Small ones are dicts ``{sum: best score}``; large ones a dense int64 array over
    ``low .. low + len - 1`` with ``_UNREACHED`` (negative) where no assignment has that sum.
    """

    def __init__(self, table: dict[int, int] | None = None, low: int = 0, dense: np.ndarray | None = None):
        self.table, self.low, self.dense = table, low, dense

    def size(self) -> int:
        return len(self.table) if self.table is not None else int(self.dense.size)

    def to_dense(self) -> tuple[int, np.ndarray]:
        if self.dense is not None:
            return self.low, self.dense
        low = min(self.table)
        arr = np.full(max(self.table) - low + 1, _UNREACHED, dtype=np.int64)
        arr[np.fromiter(self.table.keys(), dtype=np.int64, count=len(self.table)) - low] = np.fromiter(
            self.table.values(), dtype=np.int64, count=len(self.table)
        )
        return low, arr

    def extend(self, symbol: str, sites: int) -> _Reach:
        """The best scores of (element symbol with sites atoms) followed by this suffix."""
        if self.size() * len(element_sums(symbol, sites)) <= _DENSE_ABOVE and self.table is not None:
            out: dict[int, int] = {}
            opts = element_sums(symbol, sites)
            for rest, rest_score in self.table.items():
                for v, sc in opts:
                    total = sc + rest_score
                    if total > out.get(rest + v, -1):
                        out[rest + v] = total
            return _Reach(table=out)
        low, arr = self.to_dense()
        vs, scs = _element_arrays(symbol, sites)
        v_min = int(vs.min())
        out_arr = np.full(arr.size + int(vs.max()) - v_min, _UNREACHED, dtype=np.int64)
        end = _cpu_end()
        for i, (v, sc) in enumerate(zip((vs - v_min).tolist(), scs.tolist())):
            if not i % 16:
                _check_time(end)
            window = out_arr[v : v + arr.size]
            np.maximum(window, arr + sc, out=window)
        return _Reach(low=low + v_min, dense=out_arr)

    def choose(self, symbol: str, sites: int, need: int) -> int | None:
        """The first sum of the element (in pymatgen's order) that, with this suffix adding up to
        ``need`` minus it, reaches the best total score; ``None`` when none adds up to ``need``."""
        if self.table is not None:
            opts = element_sums(symbol, sites)
            best = max((sc + self.table[need - v] for v, sc in opts if need - v in self.table), default=None)
            if best is None:
                return None
            return next(v for v, sc in opts if need - v in self.table and sc + self.table[need - v] == best)
        vs, scs = _element_arrays(symbol, sites)
        idx = need - vs - self.low
        ok = (idx >= 0) & (idx < self.dense.size)
        rest = np.full(vs.size, _UNREACHED, dtype=np.int64)
        rest[ok] = self.dense[idx[ok]]
        ok &= rest >= 0
        if not ok.any():
            return None
        total = np.where(ok, scs + rest, -1)
        return int(vs[int(np.argmax(total))])  # argmax: the first of the best


def guess_amounts(counts: list[tuple[str, int]]) -> dict[str, float] | None:
    """pymatgen's first ``oxi_state_guesses()`` answer for an integer composition, exactly.

    pymatgen walks the Cartesian product of the elements' sums (each in the order of
    :func:`element_sums`, elements in the order of the composition), keeps those that add up to
    0, scores each by the sum of the elements' best scores and sorts them by score, highest first
    (a stable sort: among equal scores the first in the product comes first). Here a dynamic
    programme over the elements, from the last, gives the best score the elements e.. can reach
    for every sum; the answer is then built element by element, taking for each the first sum in
    its order that still reaches the best total score (the first in product order among the best).
    Time O(elements x sums per element x range of sums), instead of the product of the sizes.

    Args:
        counts: ``[(symbol, number of atoms), …]`` in the composition's order (distinct symbols).

    Returns:
        ``{symbol: mean oxidation state}`` (sum over its atoms / its number of atoms), or ``None``
        when no charge-balanced assignment exists. A single element gives ``{symbol: 0.0}``, as
        pymatgen does.
    """
    if len(counts) == 1:
        return {counts[0][0]: 0.0}
    if any(not element_sums(el, n) for el, n in counts):
        return None
    reach = [_Reach(table={0: 0})]  # reach[i]: the suffix of the last i elements
    for el, n in reversed(counts[1:]):
        reach.append(reach[-1].extend(el, n))
    chosen = []
    need = 0  # what the elements e.. must add up to
    for e, (el, n) in enumerate(counts):
        v = reach[len(counts) - 1 - e].choose(el, n, need)
        if v is None:
            return None
        chosen.append(v)
        need -= v
    return {el: v / float(n) for (el, n), v in zip(counts, chosen)}


def parse_key(key: str) -> list[tuple[str, int]]:
    """``"N2 O4"`` -> ``[("N", 2), ("O", 4)]``.

    Raises:
        ValueError: a fractional amount (keys are integer compositions) or an unparseable key.
    """
    amounts = parse_formula(key)
    if any(a != int(a) for a in amounts.values()):
        raise ValueError(f"charge balance needs integer amounts, got {key!r}")
    return [(el, int(a)) for el, a in amounts.items()]


def guess_states(key: str) -> dict[str, float] | None:
    """pymatgen's most probable oxidation states of an integer composition, as mean state per element.

    Equal to ``pymatgen.core.Composition(key).oxi_state_guesses()[0]`` (or ``None`` where that
    tuple is empty), computed by :func:`guess_amounts`.

    Args:
        key: an integer composition, e.g. ``"N2 O4"`` (see :func:`composition_key`).

    Returns:
        ``{element: mean oxidation state}``, or ``None`` when no charge-balanced solution exists.

    Raises:
        ValueError: the key has fractional amounts or cannot be parsed.
    """
    return guess_amounts(parse_key(key))


# --------------------------------------------------------------------------------------------
# the time bound and the job of step 3


class _Timeout(BaseException):
    """Raised by :func:`_check_time`; a BaseException so that no ``except Exception`` on the way swallows it."""


ChunkResult = tuple[str, dict[str, float] | None, str | None, float]  # (key, states, reason, seconds)
_BOUND = threading.local()  # .end: the thread CPU time (time.thread_time) at which the running guess stops


def _cpu_end() -> float | None:
    """The thread CPU time at which the guess running in this thread must stop; None when it is not bounded."""
    return getattr(_BOUND, "end", None)


def _check_time(end: float | None) -> None:
    """Raise :class:`_Timeout` when this thread's CPU time has passed ``end`` (None: never)."""
    if end is not None and time.thread_time() > end:
        raise _Timeout()


def guess_bounded(key: str, max_seconds: float | None) -> Guess:
    """:func:`guess_states` bounded by ``max_seconds`` of CPU time; exceptions become reasons.

    The loops of the dynamic programmes (:func:`element_sums`, the dense :meth:`_Reach.extend`)
    compare the CPU time of the thread running them (``time.thread_time``) with the bound, so the
    bound holds in any thread (Dask runs jobs in worker threads) and does not depend on how busy
    the machine is. A guess past it ends at the next step of a loop as ``timeout``.

    Args:
        key: an integer composition (:func:`composition_key`).
        max_seconds: CPU seconds allowed (``None``: no bound).

    Returns:
        The :class:`Guess`; ``seconds`` is the CPU time it took.
    """
    t0 = time.thread_time()
    _BOUND.end = None if max_seconds is None else t0 + max_seconds
    try:
        states = guess_states(key)
    except _Timeout:
        return Guess(key, None, TIMEOUT, time.thread_time() - t0)
    except Exception as err:  # recorded per formula, counted and reported by the caller
        return Guess(key, None, f"{ERROR}: {type(err).__name__}: {err}", time.thread_time() - t0)
    finally:
        _BOUND.end = None
    return Guess(key, states, None if states is not None else NO_SOLUTION, time.thread_time() - t0)


def guess_chunk(keys: list[str], max_seconds: float | None) -> list[ChunkResult]:
    """The job of step 3: :func:`guess_bounded` for each key, in order (run by :mod:`crabnet.jobs.engine`).

    Args:
        keys: integer compositions (:func:`composition_key`).
        max_seconds: CPU seconds allowed per key.

    Returns:
        ``(key, states, reason, seconds)`` per key, as plain tuples (small to send back from a worker).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pymatgen_tables()  # read once per process, before the clock of any guess starts
    out = []
    for key in keys:
        g = guess_bounded(key, max_seconds)
        out.append((g.key, g.states, g.reason, g.seconds))
    return out


# --------------------------------------------------------------------------------------------
# the cache


class GuessCache:
    """Results by key, appended to a JSON-lines file by one process (the one that submits the jobs).

    Each line is ``{"key", "states", "reason", "seconds", "max_seconds"}``. On loading, a line
    that cannot be read (the last line of a killed run) is ignored; later lines win. A
    ``timeout`` is reused only by runs whose bound is not larger than the one it was made with.

    Args:
        path: the JSON-lines file (created with its folder when results are added); ``None``
            keeps results in memory only.
    """

    def __init__(self, path: Path | str | None):
        self.path = None if path is None else Path(path)
        self.entries: dict[str, dict] = {}
        self.unreadable = 0
        self._file = None
        self._last_flush = 0.0
        if self.path is not None and self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        e = json.loads(line)
                        self.entries[e["key"]] = e
                    except (ValueError, KeyError, TypeError):
                        self.unreadable += 1

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str, max_seconds: float) -> Guess | None:
        """The cached result, or ``None`` when absent or a timeout under a smaller bound."""
        e = self.entries.get(key)
        if e is None or (e["reason"] == TIMEOUT and float(e.get("max_seconds") or 0) < max_seconds):
            return None
        return Guess(e["key"], e["states"], e["reason"], float(e.get("seconds") or 0.0))

    def add(self, guess: Guess, max_seconds: float) -> None:
        """Record a result (appended to the file, flushed at least once a second and by :meth:`flush`)."""
        e = {
            "key": guess.key,
            "states": guess.states,
            "reason": guess.reason,
            "seconds": round(guess.seconds, 6),
            "max_seconds": max_seconds,
        }
        self.entries[guess.key] = e
        if self.path is None:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            needs_newline = (
                self.path.is_file() and self.path.stat().st_size > 0 and self.path.read_bytes()[-1:] != b"\n"
            )
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open across writes, closed by close()
            if needs_newline:  # a killed run left half a line: start on a fresh one
                self._file.write("\n")
        self._file.write(json.dumps(e) + "\n")
        now = time.monotonic()
        if now - self._last_flush > 1.0:
            self._file.flush()
            self._last_flush = now

    def flush(self) -> None:
        """Write what was added to the file now."""
        if self._file is not None:
            self._file.flush()
            self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush and close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> GuessCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_cache(data_dir: Path | str, *, force: bool = False, plan: bool = False) -> GuessCache:
    """The shared cache of ``data_dir``; ``force`` deletes it first (a plan of ``force``: an empty cache)."""
    path = cache_path(data_dir)
    if force and path.exists() and not plan:
        path.unlink()
    cache = GuessCache(None if force and plan else path)
    if cache.unreadable:
        print(f"note: ignored {cache.unreadable} unreadable line(s) of {path} (an interrupted write)")
    return cache


def cache_path(data_dir: Path | str) -> Path:
    """The shared cache file, one per pymatgen version (its ICSD tables may change).

    Keyed by the exact integer composition (``guesses-exact__…``; the earlier
    ``guesses__pymatgen-<version>.jsonl`` of reduced compositions is not read).
    """
    from importlib.metadata import version

    return Layout(data_dir).oxidation_cache(f"guesses-exact__pymatgen-{version('pymatgen')}.jsonl")


# --------------------------------------------------------------------------------------------
# datasets: formulas -> keys -> results -> outputs


@dataclass
class SplitFormulas:
    """The formulas of one split file and their keys.

    Attributes:
        label: ``<dataset>__<split>[<fold>]``.
        formulas: formulas in file order.
        keys: composition key per row, or ``None`` when the row is not guessed.
        reasons: per row, ``None`` or why it is not guessed (invalid formula, too many sites).
    """

    label: str
    formulas: list[str]
    keys: list[str | None]
    reasons: list[str | None]


def read_formulas(path: Path | str) -> list[str]:
    """The ``formula`` column of a CSV, as text, in file order.

    Raises:
        DataError: the file is missing, empty or has no ``formula`` column.
    """
    return read_text_table(path, ("formula",))["formula"].tolist()


def keys_for(
    label: str,
    formulas: list[str],
    max_sites: int | None,
    memo: dict[str, tuple[str | None, int, str | None]] | None = None,
) -> SplitFormulas:
    """Composition keys of formulas (:func:`composition_key`); unparseable ones and those over ``max_sites``
    get a reason.

    Args:
        label: name of the split (for the result).
        formulas: formulas in file order.
        max_sites: skip compositions with more atoms than this (``None``: no bound).
        memo: formula -> (key, sites, parse error) shared between calls to avoid re-parsing.
    """
    memo = {} if memo is None else memo
    keys, reasons = [], []
    for f in formulas:
        hit = memo.get(f)
        if hit is None:
            try:
                key, sites = composition_key(f)
                hit = (key, sites, None)
            except DataError as err:
                hit = (None, 0, f"{INVALID}: {err}")
            except Exception as err:  # pymatgen refusing a parsed composition
                hit = (None, 0, f"{INVALID}: {type(err).__name__}: {err}")
            memo[f] = hit
        key, sites, bad = hit
        if bad is not None:
            keys.append(None)
            reasons.append(bad)
        elif max_sites is not None and sites > max_sites:
            keys.append(None)
            reasons.append(MAX_SITES)
        else:
            keys.append(key)
            reasons.append(None)
    return SplitFormulas(label, formulas, keys, reasons)


def progress_bar(iterable: Iterable | None = None, **kwargs) -> Any:
    """A tqdm bar, quiet when not on a terminal unless told (``disable`` given)."""
    from tqdm import tqdm

    kwargs.setdefault("disable", None)
    return tqdm(iterable, **kwargs)


_AMOUNT = re.compile(r"\d+")


def estimated_seconds(key: str) -> float:
    """CPU seconds a guess of ``key`` (``"Fe3 O4"``) takes, roughly: it grows with the square of its atoms."""
    atoms = sum(map(int, _AMOUNT.findall(key)))
    return SECONDS_PER_KEY + SECONDS_PER_ATOM2 * atoms * atoms


def chunks_of(keys: list[str], chunk_size: int) -> list[list[str]]:
    """``keys`` in ``ceil(len(keys) / chunk_size)`` chunks of about equal estimated cost, costliest first.

    A handful of huge compositions (fractional formulas scaled to tens of thousands of atoms) take
    most of the time of a dataset, so the chunks are balanced by :func:`estimated_seconds`, not by
    count: the costliest keys first, each to the chunk with the least so far (a chunk holding one
    huge key gets fewer others). Within a chunk the keys keep their order.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = math.ceil(len(keys) / chunk_size)
    if n <= 1:
        return [list(keys)] if keys else []
    cost = [estimated_seconds(k) for k in keys]
    heap = [(0.0, j) for j in range(n)]
    members: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(keys)), key=cost.__getitem__, reverse=True):
        total, j = heapq.heappop(heap)
        members[j].append(i)
        heapq.heappush(heap, (total + cost[i], j))
    members.sort(key=lambda m: -sum(cost[i] for i in m))
    return [[keys[i] for i in sorted(m)] for m in members]


def guess_all(
    keys: Iterable[str | None],
    cache: GuessCache,
    *,
    max_seconds: float,
    engine: Engine | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> dict | None:
    """Guess every distinct key that the cache lacks, as jobs of :mod:`crabnet.jobs.engine`.

    The keys to do are cut into chunks of about ``chunk_size`` and equal cost (:func:`chunks_of`), each a
    :class:`~crabnet.jobs.engine.Job` running :func:`guess_chunk`: in this process when there is one
    chunk or one core, else on an embedded Dask ``LocalCluster``, or wherever ``engine`` says. This
    process alone writes the cache: a chunk's results are added (and flushed) as soon as the chunk
    finishes, so an interrupted or failed run keeps them.

    Args:
        keys: composition keys (``None`` and duplicates are fine; each key is guessed once).
        cache: results so far; new results are added and its file is closed at the end.
        max_seconds: bound per formula (CPU seconds, :func:`guess_bounded`).
        engine: where the chunks run (default: ``crabnet.jobs.engine.Engine()``, this machine).
        chunk_size: about this many keys per job (``ceil(keys / chunk_size)`` jobs).

    Returns:
        Run figures: ``distinct``, ``cached``, ``computed``, ``chunks``, ``seconds``, ``per_second``
        and ``reasons`` (count of each outcome among the computed: ``ok`` or the reason); ``None``
        with ``engine.plan`` (the chunks were listed with their estimated cost, not run).

    Raises:
        crabnet.jobs.engine.JobsFailed: some chunks failed (e.g. their worker kept dying); the results of
            the others are in the cache.
    """
    distinct = list(dict.fromkeys(k for k in keys if k is not None))
    todo = [k for k in distinct if cache.get(k, max_seconds) is None]
    parts = chunks_of(todo, chunk_size) if todo else []
    # "oxidation-…": Dask puts the chunks in one task group "oxidation" (the key up to the first "-"), so that its
    # scheduler queues them and hands them out as workers free up, instead of assigning them all at once
    jobs = [
        Job(
            f"oxidation-chunk {i + 1} of {len(parts)}",
            guess_chunk,
            {"keys": part, "max_seconds": max_seconds},
            cost_s=sum(map(estimated_seconds, part)),
        )
        for i, part in enumerate(parts)
    ]
    reasons: dict[str, int] = {}

    def record(job: Job, result: list[ChunkResult]) -> None:
        for key, states, reason, seconds in result:
            cache.add(Guess(key, states, reason, seconds), max_seconds)
            r = "ok" if reason is None else reason.split(":")[0]
            reasons[r] = reasons.get(r, 0) + 1
        cache.flush()

    t0 = time.perf_counter()
    try:
        if run_jobs(jobs, engine, what="chunks", on_result=record) is None:
            return None
    finally:
        cache.close()
    seconds = time.perf_counter() - t0
    return {
        "distinct": len(distinct),
        "cached": len(distinct) - len(todo),
        "computed": len(todo),
        "chunks": len(jobs),
        "seconds": seconds,
        "per_second": len(todo) / seconds if todo and seconds > 0 else math.nan,
        "reasons": reasons,
    }


def results_for(split: SplitFormulas, cache: GuessCache, max_seconds: float) -> list[tuple[dict | None, str | None]]:
    """(states, reason) per row of a split, from the cache."""
    out = []
    for key, reason in zip(split.keys, split.reasons):
        if key is None:
            out.append((None, reason))
            continue
        g = cache.get(key, max_seconds)
        if g is None:
            raise RuntimeError(f"no result for {key!r} (the guessing step did not finish)")
        out.append((g.states, g.reason))
    return out


def write_split(split: SplitFormulas, results: list[tuple[dict | None, str | None]], out_dir: Path | str) -> dict:
    """Write ``<label>.json`` ({formula: states or null}, first-appearance order) and ``<label>.csv``.

    The CSV has one line per row of the split file: ``row`` (1-based), ``formula``,
    ``composition`` (the key: the integer composition guessed), ``reason`` (empty when guessed)
    and one column per element present in the split (by atomic number) holding its mean
    oxidation state.

    Returns:
        Counts: ``rows``, ``formulas`` (distinct), ``guessed`` and one entry per reason (by rows).
    """
    from crabnet.utils import atomic_path

    out_dir = Path(out_dir)
    mapping: dict[str, dict | None] = {}
    for f, (states, _) in zip(split.formulas, results):
        mapping.setdefault(f, states)
    lines = [f"{json.dumps(f)}: {json.dumps(s)}" for f, s in mapping.items()]
    with atomic_path(out_dir / f"{split.label}.json") as tmp:
        tmp.write_text("{\n" + ",\n".join(lines) + ("\n" if lines else "") + "}\n", encoding="utf-8")

    present = _symbols_of(split)
    elements = [el for el in SYMBOLS if el in present]
    column = {el: i for i, el in enumerate(elements)}
    counts: dict[str, int] = {"rows": len(split.formulas), "formulas": len(mapping), "guessed": 0}
    with atomic_path(out_dir / f"{split.label}.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["row", "formula", "composition", "reason", *elements])
        for i, (f, key, (states, reason)) in enumerate(zip(split.formulas, split.keys, results), start=1):
            if states is not None:
                counts["guessed"] += 1
            else:
                r = (reason or ERROR).split(":")[0]
                counts[r] = counts.get(r, 0) + 1
            cells = [""] * len(elements)
            for el, v in (states or {}).items():
                cells[column[el]] = repr(float(v))
            w.writerow([i, f, key or "", reason or "", *cells])
    return counts


def _symbols_of(split: SplitFormulas) -> set[str]:
    """Elements present in the parseable formulas of a split (read from the keys, ``"Fe3 O4"``)."""
    out: set[str] = set()
    for key in dict.fromkeys(k for k in split.keys if k is not None):
        out.update(token.rstrip("0123456789.") for token in key.split())
    return out


def element_ox_states() -> dict[str, dict[str, list[int]]]:
    """Common, ICSD and all oxidation states of every element H…Og, from pymatgen."""
    from pymatgen.core import Element

    out = {}
    for sym in SYMBOLS:
        el = Element(sym)
        out[sym] = {
            "common": [int(x) for x in el.common_oxidation_states],
            "icsd": [int(x) for x in el.icsd_oxidation_states],
            "all": [int(x) for x in el.oxidation_states],
        }
    return out


REASONS = ("no_solution", "timeout", "error", "max_sites", "invalid_formula")


def write_outputs(parts: list[SplitFormulas], cache: GuessCache, max_seconds: float, data_dir: Path | str) -> None:
    """Write every split's JSON + CSV and ``element_ox_states.json``, printing a table of outcomes per split."""
    layout = Layout(data_dir)
    out_dir = layout.oxidation()
    write_element_ox_states(layout.element_ox_states())

    def line(label: str, counts: dict) -> str:
        reasons = " ".join(f"{counts.get(r, 0):>15}" for r in REASONS)
        return f"{label:<45} {counts['rows']:>7} {counts['guessed']:>7} {reasons}"

    print(f"{'split':<45} {'rows':>7} {'guessed':>7} " + " ".join(f"{r:>15}" for r in REASONS))
    total: dict[str, int] = {}
    for part in parts:
        counts = write_split(part, results_for(part, cache, max_seconds), out_dir)
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
        print(line(part.label, counts))
    if len(parts) > 1:
        print(line("total", total))
    print(f"wrote {len(parts)} JSON + CSV pairs and element_ox_states.json to {out_dir}/")


def write_element_ox_states(path: Path | str) -> None:
    """Write :func:`element_ox_states` as JSON (one element per line, H…Og)."""
    from crabnet.utils import atomic_path

    states = element_ox_states()
    lines = [f"{json.dumps(s)}: {json.dumps(states[s])}" for s in sorted(states, key=ATOMIC_NUMBER.get)]
    with atomic_path(path) as tmp:
        tmp.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# reading the guesses back (steps 6 and the report)


def lookup_key(formula: str) -> str | None:
    """Formula-independent key of a composition: elements alphabetical with fractions to 6 digits.

    ``HfO2``, ``Hf1O2``, ``O2Hf`` and ``Hf2O4`` share a key. None for an unparsable formula.
    """
    try:
        amounts = parse_formula(str(formula))
    except DataError:
        return None
    total = sum(amounts.values())
    return "".join(f"{el}{amounts[el] / total:.6f}" for el in sorted(amounts))


def oxidation_path(data_dir: Path | str, dataset: str, split: str) -> Path:
    """``<data_dir>/oxidation/<dataset>__<split>.json`` (written by guess_oxidation.py, step 3)."""
    return Layout(data_dir).oxidation_guesses(dataset, split)


def load_oxidation(path: Path | str) -> dict[str, dict[str, float] | None] | None:
    """Oxidation guesses of step 3 keyed by ``lookup_key``; None when the file is absent.

    The file maps formula -> {element: mean oxidation state} or null (no charge-balanced guess).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err}); re-run guess_oxidation.py") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected an object {{formula: {{element: state}} or null}}")
    out: dict[str, dict[str, float] | None] = {}
    for formula, guess in raw.items():
        key = lookup_key(formula)
        if key is not None:
            out[key] = guess if isinstance(guess, dict) else None
    return out


def oxidation_states(guesses: dict[str, dict[str, float] | None] | None, formulas, symbol: str) -> np.ndarray:
    """The mean oxidation state of ``symbol`` in each formula; NaN when unknown.

    Args:
        guesses: from ``load_oxidation`` (None: all unknown).
        formulas: the compounds' formulas (matched by composition, not by text).
        symbol: the element.
    """
    out = np.full(len(formulas), np.nan)
    if not guesses:
        return out
    for i, f in enumerate(formulas):
        guess = guesses.get(lookup_key(f) or "")
        if guess and guess.get(symbol) is not None:
            with contextlib.suppress(TypeError, ValueError):
                out[i] = float(guess[symbol])
    return out


__all__ = [
    "Guess",
    "GuessCache",
    "SplitFormulas",
    "composition_key",
    "guess_states",
    "guess_amounts",
    "element_sums",
    "pymatgen_tables",
    "parse_key",
    "guess_bounded",
    "guess_chunk",
    "chunks_of",
    "estimated_seconds",
    "cache_path",
    "read_formulas",
    "keys_for",
    "guess_all",
    "results_for",
    "write_split",
    "element_ox_states",
    "write_element_ox_states",
    "progress_bar",
    "lookup_key",
    "oxidation_path",
    "load_oxidation",
    "oxidation_states",
    "NO_SOLUTION",
    "TIMEOUT",
    "MAX_SITES",
    "INVALID",
    "ERROR",
    "CHUNK_SIZE",
]
