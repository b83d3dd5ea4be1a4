"""Step 3: pymatgen oxidation-state guesses for the formulas of dataset splits.

Reads   <data-dir>/benchmark_data/<dataset>/<split>.csv and
        <data-dir>/matbench_cv/<dataset>/<split><fold>.csv (fetched on first need)
Writes  <data-dir>/oxidation/<dataset>__<split>[<fold>].json
            {formula: {element: mean oxidation state} or null}, in dataset row order
        <data-dir>/oxidation/<dataset>__<split>[<fold>].csv
            row, formula, reduced_formula, reason (empty when guessed), one column per element
        <data-dir>/oxidation/element_ox_states.json
            common, ICSD and all oxidation states of every element (pymatgen)
        <data-dir>/oxidation/cache/guesses__pymatgen-<version>.jsonl
            every result as it arrives, shared by all datasets (an interrupted run resumes here)
Next    get_crabnet_embeddings.py (step 4); plot_local_edm_umap.py (step 6) colours atoms by these
        guesses.

For each formula, pymatgen's Composition.oxi_state_guesses() ranks the charge-balanced
assignments of ICSD oxidation states; the most probable one is kept as the mean state per element
(Fe in Fe3O4: 8/3), or null when there is none (reason no_solution, common for intermetallics).
The work is done once per reduced composition (Fe6O8 and Fe3O4 share one guess, across all
datasets; fractional formulas are first scaled to the smallest integer formula), in --workers
processes, each guess bounded by --max-seconds of CPU time, so that a busy machine does not
change the outcome (null with reason timeout; the run goes on; a worker stuck beyond a longer
wall-clock bound is killed and replaced).
Formulas that cannot be parsed, or whose reduced formula has more atoms than --max-sites, are
null with their reason. Re-running only computes what the cache lacks; --force starts afresh.

Examples:
    python guess_oxidation.py --quick                                   # demo dataset, test split
    python guess_oxidation.py --dataset OQMD_Bandgap                    # what step 6 needs
    python guess_oxidation.py --dataset all --split all --max-sites 200 # everything (hours)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from crabnet.cli import DEMO_DATASET, add_common, make_parser, run
from crabnet.data import SPLITS, DataError
from crabnet.oxidation import (GuessCache, cache_path, default_workers, guess_all, keys_for, progress_bar,
                               read_formulas, results_for, write_element_ox_states, write_split)
from crabnet.report import refresh_report
from crabnet.stats import resolve_datasets, split_files

REASONS = ("no_solution", "timeout", "error", "max_sites", "invalid_formula")


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_common(p, dataset=None, quick_help=f"demo: the {DEMO_DATASET} test split (unless --dataset is given)")
    p.add_argument("--dataset", action="append", default=None,
                   help="dataset under benchmark_data/ or matbench_cv/ (all folds), repeatable; 'all' = every "
                        "benchmark set and every matbench set (default: all; with --quick the demo dataset)")
    p.add_argument("--split", default="test", choices=[*SPLITS, "all"], help="split(s) to guess")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="worker processes (the default is the number of cores of this machine)")
    p.add_argument("--max-seconds", type=float, default=10.0,
                   help="CPU seconds allowed per formula (null, reason timeout)")
    p.add_argument("--max-sites", type=int, default=None,
                   help="skip reduced formulas with more atoms than this (null, reason max_sites) (default: no bound)")
    return p.parse_args(argv)


def main(data_dir: Path, dataset: list[str] | None, device: str, seed: int, quick: bool, force: bool,
         split: str, workers: int, max_seconds: float, max_sites: int | None) -> int:
    if workers < 1 or not max_seconds > 0 or (max_sites is not None and max_sites < 1):
        print("error: --workers and --max-sites must be >= 1 and --max-seconds > 0", file=sys.stderr)
        return 2
    names = dataset or ([DEMO_DATASET] if quick else ["all"])
    splits = SPLITS if split == "all" else (split,)
    try:
        files = [f for kind, name in resolve_datasets(data_dir, names)
                 for f in split_files(data_dir, kind, name, splits)]
        memo: dict = {}
        parts = [keys_for(f.label, read_formulas(f.path), max_sites, memo)
                 for f in progress_bar(files, desc="reading formulas", unit="file")]
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    cache_file = cache_path(data_dir)
    if force and cache_file.exists():
        cache_file.unlink()
    cache = GuessCache(cache_file)
    if cache.unreadable:
        print(f"note: ignored {cache.unreadable} unreadable line(s) of {cache_file} (an interrupted write)")
    t0 = time.perf_counter()
    try:
        run = guess_all((k for p in parts for k in p.keys), cache, workers=workers, max_seconds=max_seconds)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(cache)} results are saved in {cache_file}; run again to resume", file=sys.stderr)
        return 130
    print(f"{run['distinct']} distinct reduced formulas: {run['cached']} from the cache, {run['computed']} computed "
          f"in {run['seconds']:.1f} s ({run['per_second']:.1f} formulas/s with {workers} worker(s)); "
          f"outcomes of the computed: {run['reasons'] or '-'}; workers killed at the hard bound: {run['kills']}, "
          f"died: {run['deaths']}")

    out_dir = Path(data_dir) / "oxidation"
    write_element_ox_states(out_dir / "element_ox_states.json")
    header = f"{'split':<45} {'rows':>7} {'guessed':>7} " + " ".join(f"{r:>15}" for r in REASONS)
    print(header)
    total: dict[str, int] = {}
    for part in parts:
        counts = write_split(part, results_for(part, cache, max_seconds), out_dir)
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
        print(f"{part.label:<45} {counts['rows']:>7} {counts['guessed']:>7} "
              + " ".join(f"{counts.get(r, 0):>15}" for r in REASONS))
    if len(parts) > 1:
        print(f"{'total':<45} {total['rows']:>7} {total['guessed']:>7} "
              + " ".join(f"{total.get(r, 0):>15}" for r in REASONS))
    print(f"wrote {len(parts)} JSON + CSV pairs and element_ox_states.json to {out_dir}/ "
          f"({time.perf_counter() - t0:.1f} s)")
    refresh_report(data_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, parse_args()))
