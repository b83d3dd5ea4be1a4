"""Oxidation-state guessing: our dynamic programme against pymatgen itself, one formula at a time, in one run.

    python benchmarks/oxidation.py                              # mp_bulk_modulus and aflow__Egap test sets
    python benchmarks/oxidation.py --dataset aflow__Egap --scheduler sequential --max-seconds 10   # one core

For each dataset split, in the same process:

- ours: ``crabnet.oxidation`` as ``guess_oxidation.py`` runs it (parse, one guess per integer
  composition, chunks of --chunk-size as jobs of ``crabnet.jobs.engine`` where --scheduler says, with
  the time bound), starting from an empty in-memory cache, the start of a Dask cluster included;
- pymatgen: for each row in turn, ``pymatgen.core.Composition(formula).oxi_state_guesses()``
  (fractional amounts scaled to pymatgen's smallest integer formula with
  ``get_integer_formula_and_factor``, as ours does), keeping the first guess, bounded by the same
  --max-seconds of CPU time (``SIGPROF`` timer) in this process.

Both start cold: pymatgen's ICSD occurrence table and our tables are unloaded before each timed run.

Prints formulas (rows) per wall-clock second and per CPU second of both, the speed-up, and the
agreement of the results on the rows where pymatgen finished (must be 100 %; a timeout of ours
there counts as a disagreement), with the first disagreements. Rows where pymatgen did not finish
within the bound are counted apart, with what ours found for them.
Writes ``<data-dir>/benchmarks/oxidation.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import time
import warnings
from pathlib import Path

from crabnet.data import resolve_datasets, split_files
from crabnet.jobs.engine import Engine, add_engine_args, engine_from_args
from crabnet.oxidation import CHUNK_SIZE, TIMEOUT, GuessCache, guess_all, keys_for, read_formulas, results_for


class _Alarm(BaseException):
    pass


def _raise(signum, frame):
    raise _Alarm()


def baseline_one(formula: str, max_seconds: float) -> tuple[dict | None, str | None]:
    """pymatgen directly, bounded in CPU time: (first guess or None, reason or None)."""
    from pymatgen.core import Composition

    signal.setitimer(signal.ITIMER_PROF, max_seconds)
    try:
        try:
            comp = Composition(formula)
            if any(float(a) != int(a) for a in comp.values()):
                comp = Composition(comp.get_integer_formula_and_factor()[0])
            guesses = comp.oxi_state_guesses()
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
    except _Alarm:
        return None, TIMEOUT
    except Exception as err:
        return None, f"error: {type(err).__name__}: {err}"
    if not guesses:
        return None, "no_solution"
    return {str(k): float(v) for k, v in guesses[0].items()}, None


def cold() -> None:
    """Forget pymatgen's loaded ICSD occurrence table and our tables, so that each timed run pays its loading once."""
    from pymatgen.core import Composition

    from crabnet import oxidation

    Composition.oxi_prob = None
    for cached in (oxidation.pymatgen_tables, oxidation.element_sums, oxidation._element_arrays):
        cached.cache_clear()


def cpu_seconds() -> float:
    """CPU time of this process and of its finished (waited-for) child processes."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_baseline(formulas: list[str], max_seconds: float) -> tuple[list, float, float]:
    cold()
    t0, c0 = time.perf_counter(), cpu_seconds()
    out = [baseline_one(f, max_seconds) for f in formulas]
    return out, time.perf_counter() - t0, cpu_seconds() - c0


def run_ours(
    label: str, formulas: list[str], engine: Engine, chunk_size: int, max_seconds: float
) -> tuple[list, float, float, dict]:
    """Ours on one split: (results, wall seconds, CPU seconds, run figures of ``guess_all``).

    The CPU seconds count this process and its finished child processes (the workers of an embedded
    Dask cluster; not those of an external one).
    """
    cold()
    t0, c0 = time.perf_counter(), cpu_seconds()
    part = keys_for(label, formulas, None)
    cache = GuessCache(None)
    run = guess_all(part.keys, cache, max_seconds=max_seconds, engine=engine, chunk_size=chunk_size)
    results = results_for(part, cache, max_seconds)
    return results, time.perf_counter() - t0, cpu_seconds() - c0, run


def agreement(ours: list, base: list) -> tuple[int, int, list]:
    """(rows compared, rows equal, first disagreements) over the rows where pymatgen finished.

    Equal: the same states (element order included), or both ``None`` for the same reason.
    """
    compared = equal = 0
    bad = []
    for i, ((s1, r1), (s2, r2)) in enumerate(zip(ours, base)):
        if r2 == TIMEOUT:
            continue
        compared += 1
        same = s1 == s2 and (s1 is None or list(s1) == list(s2))
        if same and (s1 is not None or (r1 or "").split(":")[0] == (r2 or "").split(":")[0]):
            equal += 1
        elif len(bad) < 5:
            bad.append({"row": i + 1, "ours": [s1, r1], "baseline": [s2, r2]})
    return compared, equal, bad


def count(results: list, reason: str) -> int:
    return sum(1 for s, r in results if s is None and (r or "").split(":")[0] == reason)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dataset",
        action="append",
        default=None,
        help="dataset (repeatable; default: mp_bulk_modulus and aflow__Egap)",
    )
    p.add_argument("--split", default="test", help="split (default: %(default)s)")
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE, help="our compositions per job (default: %(default)s)")
    p.add_argument(
        "--max-seconds", type=float, default=10.0, help="CPU seconds per formula, both (default: %(default)s)"
    )
    p.add_argument("--limit", type=int, default=0, help="only the first N rows of each split (0 = all)")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="default: %(default)s")
    add_engine_args(p)
    return p.parse_args(argv)


def main(
    dataset: list[str] | None, split: str, chunk_size: int, max_seconds: float, limit: int, data_dir: Path, **engine
) -> int:
    eng = engine_from_args(engine)
    warnings.simplefilter("ignore")
    signal.signal(signal.SIGPROF, _raise)
    names = dataset or ["mp_bulk_modulus", "aflow__Egap"]

    rows = []
    for kind, name in resolve_datasets(data_dir, names):
        for f in split_files(data_dir, kind, name, (split,)):
            formulas = read_formulas(f.path)
            if limit > 0:
                formulas = formulas[:limit]
            base, t_base, c_base = run_baseline(formulas, max_seconds)
            ours, t_ours, c_ours, run = run_ours(f.label, formulas, eng, chunk_size, max_seconds)
            compared, equal, bad = agreement(ours, base)
            unfinished = [o for o, b in zip(ours, base) if b[1] == TIMEOUT]
            row = {
                "split": f.label,
                "rows": len(formulas),
                "distinct_compositions": run["distinct"],
                "scheduler": eng.scheduler,
                "chunks": run["chunks"],
                "max_seconds": max_seconds,
                "ours_seconds": round(t_ours, 3),
                "ours_per_second": round(len(formulas) / t_ours, 1),
                "pymatgen_seconds": round(t_base, 3),
                "pymatgen_per_second": round(len(formulas) / t_base, 1),
                "speedup": round(t_base / t_ours, 2),
                "ours_cpu_seconds": round(c_ours, 3),
                "pymatgen_cpu_seconds": round(c_base, 3),
                "ours_per_cpu_second": round(len(formulas) / c_ours, 1),
                "pymatgen_per_cpu_second": round(len(formulas) / c_base, 1),
                "cpu_speedup": round(c_base / c_ours, 2),
                "agreement_rows": compared,
                "agreement_pct": round(100.0 * equal / compared, 3) if compared else None,
                "disagreements": bad,
                "ours_null": sum(1 for s, _ in ours if s is None),
                "ours_timeouts": count(ours, TIMEOUT),
                "pymatgen_null": sum(1 for s, _ in base if s is None),
                "pymatgen_unfinished": len(unfinished),
                "ours_guessed_where_pymatgen_unfinished": sum(1 for s, _ in unfinished if s is not None),
                "ours_no_solution_where_pymatgen_unfinished": count(unfinished, "no_solution"),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)

    print()
    print(
        f"{'split':<24} {'rows':>6} {'ours f/s':>9} {'pmg f/s':>9} {'speed-up':>8} {'ours f/cpu-s':>12} "
        f"{'pmg f/cpu-s':>12} {'agree %':>8} {'compared':>8} {'pmg unfinished':>14} {'our timeouts':>12}"
    )
    for r in rows:
        print(
            f"{r['split']:<24} {r['rows']:>6} {r['ours_per_second']:>9} {r['pymatgen_per_second']:>9} "
            f"{r['speedup']:>8} {r['ours_per_cpu_second']:>12} {r['pymatgen_per_cpu_second']:>12} "
            f"{r['agreement_pct']!s:>8} {r['agreement_rows']:>8} {r['pymatgen_unfinished']:>14} "
            f"{r['ours_timeouts']:>12}"
        )
    print(
        "f/s: rows per wall-clock second; f/cpu-s: rows per CPU second (ours: this process and its workers), "
        "which does not depend on how busy the machine is; pymatgen's time includes --max-seconds for each "
        "unfinished row; agreement: over the rows where pymatgen finished."
    )
    out = data_dir / "benchmarks" / "oxidation.json"
    from crabnet.utils import atomic_path

    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")
    ok = all(r["agreement_pct"] in (None, 100.0) and r["ours_timeouts"] == 0 for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(**vars(parse_args())))
