"""Oxidation-state guesses of single compositions, exactly as pymatgen's first guess, in polynomial time.

The algorithm of step 3; :mod:`crabnet.oxidation` applies it to datasets (cache, jobs, files). See
that module's docstring for what is computed and how the work is bounded.
"""

from __future__ import annotations

import functools
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crabnet.data import parse_formula
from crabnet.elements import SYMBOLS

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


def _one_more_site(
    best_prev: list[np.ndarray], first_prev: list[np.ndarray], shift: list[int], score: list[int], size: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One step k-1 -> k of :func:`element_sums`' two recurrences (best[i][k] and first[j][k], see there)."""
    m = len(shift)
    best_cur = []
    below = np.full(size, _UNREACHED, dtype=np.int64)  # best[i-1][k]
    for i in range(m):
        cand = np.full(size, _UNREACHED, dtype=np.int64)
        d = shift[i]
        cand[d:] = best_prev[i][: size - d] + score[i]
        np.maximum(cand, below, out=cand)
        best_cur.append(cand)
        below = cand
    first_cur: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * (m + 1)
    for j in range(m - 1, -1, -1):
        head = first_prev[j] + shift[j]
        tail = first_cur[j + 1]
        if tail.size:
            seen = np.zeros(size, dtype=bool)
            seen[head] = True
            tail = tail[~seen[tail]]
            head = np.concatenate([head, tail])
        first_cur[j] = head
    return best_cur, first_cur


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
    end = _cpu_end()
    for _k in range(1, sites + 1):
        _check_time(end)
        best_prev, first_prev = _one_more_site(best_prev, first_prev, shift, score, size)

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
