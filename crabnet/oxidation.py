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
import heapq
import json
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crabnet.data import parse_formula, read_text_table
from crabnet.elements import ATOMIC_NUMBER, SYMBOLS
from crabnet.errors import DataError
from crabnet.jobs.engine import Engine, Job, run_jobs
from crabnet.layout import Layout
from crabnet.oxidation_exact import (
    CHUNK_SIZE,
    ERROR,
    INVALID,
    MAX_SITES,
    SECONDS_PER_ATOM2,
    SECONDS_PER_KEY,
    TIMEOUT,
    ChunkResult,
    Guess,
    composition_key,
    guess_chunk,
)
from crabnet.progress import say


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
        say(f"note: ignored {cache.unreadable} unreadable line(s) of {path} (an interrupted write)")
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


def _chunk_jobs(todo: list[str], chunk_size: int, max_seconds: float) -> list[Job]:
    """The keys to guess as jobs of about ``chunk_size`` keys and equal cost (:func:`chunks_of`)."""
    parts = chunks_of(todo, chunk_size) if todo else []
    # "oxidation-…": Dask puts the chunks in one task group "oxidation" (the key up to the first "-"), so that its
    # scheduler queues them and hands them out as workers free up, instead of assigning them all at once
    return [
        Job(f"oxidation-chunk {i + 1} of {len(parts)}", guess_chunk, {"keys": part, "max_seconds": max_seconds},
            cost_s=sum(map(estimated_seconds, part)))
        for i, part in enumerate(parts)
    ]  # fmt: skip


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
    jobs = _chunk_jobs(todo, chunk_size, max_seconds)
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
    rate = len(todo) / seconds if todo and seconds > 0 else math.nan
    return {"distinct": len(distinct), "cached": len(distinct) - len(todo), "computed": len(todo), "chunks": len(jobs),
            "seconds": seconds, "per_second": rate, "reasons": reasons}  # fmt: skip


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

    say(f"{'split':<45} {'rows':>7} {'guessed':>7} " + " ".join(f"{r:>15}" for r in REASONS))
    total: dict[str, int] = {}
    for part in parts:
        counts = write_split(part, results_for(part, cache, max_seconds), out_dir)
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
        say(line(part.label, counts))
    if len(parts) > 1:
        say(line("total", total))
    say(f"wrote {len(parts)} JSON + CSV pairs and element_ox_states.json to {out_dir}/")


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
