"""Step 3: oxidation-state guesses (pymatgen's answer, exactly) for the formulas of dataset splits.

Reads   <data-dir>/benchmark_data/<dataset>/<split>.csv and
        <data-dir>/matbench_cv/<dataset>/<split><fold>.csv (fetched on first need)
Writes  <data-dir>/oxidation/<dataset>__<split>[<fold>].json
            {formula: {element: mean oxidation state} or null}, in dataset row order
        <data-dir>/oxidation/<dataset>__<split>[<fold>].csv
            row, formula, composition (the integer composition guessed), reason (empty when
            guessed), one column per element
        <data-dir>/oxidation/element_ox_states.json
            common, ICSD and all oxidation states of every element (pymatgen)
        <data-dir>/oxidation/cache/guesses-exact__pymatgen-<version>.jsonl
            every result, written as each job finishes, shared by all datasets (an interrupted run
            resumes here)
Next    get_crabnet_embeddings.py (step 4); plot_local_edm_umap.py (step 6) colours atoms by these
        guesses.

The answer for a formula is that of pymatgen's Composition(formula).oxi_state_guesses()[0]: the
charge-balanced assignment of ICSD oxidation states whose states occur most often in the ICSD,
kept as the mean state per element (Fe in Fe3O4: 8/3), or null when there is none (reason
no_solution, common for intermetallics). It is computed by an exact dynamic programme on
pymatgen's own tables (crabnet/oxidation.py) instead of pymatgen's exponential enumeration.
The work is done once per integer composition as written (N2O4 and NO2 differ: pymatgen finds
N +4 for the first and nothing for the second), across all splits and datasets; fractional
formulas are first scaled to pymatgen's smallest integer formula (Li0.5Co0.5O2 -> LiCoO4).
The compositions that the cache lacks are cut into jobs of at most --chunk-size, which run in
this process when there is one job or one core, else on an embedded Dask LocalCluster (one worker
process per core), or anywhere --scheduler says (an existing Dask cluster, SLURM/PBS through
dask-jobqueue; see crabnet/jobs/engine.py). Each guess is bounded by --max-seconds of CPU time as a
safety net (null with reason timeout; the run goes on). Formulas that cannot be parsed, or with
more atoms than --max-sites, are null with their reason. Re-running only computes what the cache
lacks; --force starts afresh.

Examples:
    python guess_oxidation.py --quick                                   # demo dataset, test split
    python guess_oxidation.py --dataset OQMD_Bandgap                    # what step 6 needs
    python guess_oxidation.py --dataset all --split all                 # the 18 benchmark sets, all splits
    python guess_oxidation.py --dataset all --split all --matbench      # and the matbench_cv folds
    python guess_oxidation.py --dataset all --split all --scheduler sequential   # all in this process
"""

from __future__ import annotations

from pathlib import Path

from crabnet.data import select_split_files
from crabnet.errors import UsageError
from crabnet.jobs.cli import DEMO_DATASET, add_common, make_parser, run
from crabnet.jobs.engine import add_engine_args, engine_from_args
from crabnet.layout import SPLITS
from crabnet.oxidation import guess_all, keys_for, open_cache, read_formulas, write_outputs
from crabnet.oxidation_exact import CHUNK_SIZE
from crabnet.progress import bar
from crabnet.web.report import refresh_report


def parse_args(argv=None):
    p = make_parser(__doc__)
    add_common(
        p,
        dataset=None,
        device=False,
        seed=False,
        quick_help=f"demo: the {DEMO_DATASET} test split (unless --dataset is given)",
    )
    p.add_argument(
        "--dataset",
        action="append",
        default=None,
        help="dataset under benchmark_data/ or matbench_cv/ (all folds), repeatable; 'all' = every "
        "benchmark set (default: all; with --quick the demo dataset)",
    )
    p.add_argument("--matbench", action="store_true", help="also every matbench_cv set (all folds)")
    p.add_argument("--split", default="test", choices=[*SPLITS, "all"], help="split(s) to guess")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=10.0,
        help="CPU seconds allowed per formula, a safety net (null, reason timeout)",
    )
    p.add_argument(
        "--max-sites",
        type=int,
        default=None,
        help="skip compositions with more atoms than this (null, reason max_sites) (default: no bound)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=CHUNK_SIZE,
        metavar="N",
        help="compositions per job (one job runs in this process; smaller jobs spread a run over more workers)",
    )
    add_engine_args(p)
    return p.parse_args(argv)


def main(
    data_dir: Path,
    dataset: list[str] | None,
    quick: bool,
    force: bool,
    split: str,
    max_seconds: float,
    max_sites: int | None,
    chunk_size: int = CHUNK_SIZE,
    matbench: bool = False,
    **engine,
) -> int:
    if not max_seconds > 0 or (max_sites is not None and max_sites < 1) or chunk_size < 1:
        raise UsageError("--max-sites and --chunk-size must be >= 1 and --max-seconds > 0")
    eng = engine_from_args(engine, small=quick)
    names = dataset or ([DEMO_DATASET] if quick else ["all"])
    splits = SPLITS if split == "all" else (split,)
    # a DataError (unknown dataset, unreadable file) ends the script with one error line via crabnet.jobs.cli.run
    files = select_split_files(data_dir, names, splits, matbench=matbench)  # fetches the published sets if needed
    memo: dict = {}
    parts = [
        keys_for(f.label, read_formulas(f.path), max_sites, memo)
        for f in bar(files, desc="reading formulas", unit="file")
    ]

    cache = open_cache(data_dir, force=force, plan=eng.plan)
    keys = (k for p in parts for k in p.keys)
    run = guess_all(keys, cache, max_seconds=max_seconds, engine=eng, chunk_size=chunk_size)  # saved as they finish
    if run is None:  # --plan: the jobs were listed
        return 0
    print(
        f"{run['distinct']} distinct compositions: {run['cached']} from the cache, {run['computed']} computed "
        f"in {run['seconds']:.1f} s ({run['per_second']:.1f} formulas/s, {run['chunks']} job(s)); "
        f"outcomes of the computed: {run['reasons'] or '-'}"
    )
    write_outputs(parts, cache, max_seconds, data_dir)
    refresh_report(data_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main, parse_args()))
