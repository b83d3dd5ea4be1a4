"""Independent trainings on one machine: one process with all threads, against Dask workers of one thread.

The same set of step-4 jobs (train a model, write its embeddings and test predictions) for the
smallest benchmark sets x mat2vec/onehot, run three ways, each into a fresh data folder:

    (a) sequential: one process, one job after the other, 2 torch threads (``--threads``)
    (b) a Dask LocalCluster of 1 worker x 1 thread
    (c) a Dask LocalCluster of 2 workers x 1 thread (``--workers``)

Prints wall time, jobs/hour and peak RSS per worker of each, the speed-up of (c) over (b) (the
scaling efficiency is that over the number of workers) and of (c) over (a). With ``--json`` one
JSON line at the end: ``efficiency`` ((c) over (b), jobs per hour; the ideal is the number of workers) and
``speedup_vs_sequential`` ((c) over (a)).

    python benchmarks/scale.py                                 # 8 smallest sets x 2 features, 20 epochs
    python benchmarks/scale.py --datasets 2 --epochs 3 --json  # a quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

from crabnet.embeddings import model_job
from crabnet.jobs.engine import Engine, Job, local_cluster, run_jobs
from crabnet.layout import BENCHMARK_DATASETS, Layout
from crabnet.training.costs import count_rows
from crabnet.training.recipe import make_recipe


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="where the datasets are (default: data)")
    p.add_argument("--datasets", type=int, default=8, help="the N smallest benchmark sets (default: 8)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per training (default: 20)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the sequential run (default: 2)")
    p.add_argument("--workers", type=int, default=2, help="workers of run (c) (default: 2)")
    p.add_argument("--modes", default="a,b,c", help="which runs (default: a,b,c)")
    p.add_argument("--json", dest="as_json", action="store_true", help="one JSON line with the figures at the end")
    return p.parse_args()


def timed_model_job(**kwargs) -> dict:
    """Step 4's job, plus the peak RSS of the process that ran it (MB)."""
    row = model_job(**kwargs)
    return {
        "dataset": row["dataset"],
        "features": row["features"],
        "test_mae": row["test_mae"],
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def smallest(data_dir: Path, n: int) -> list[str]:
    lay = Layout(data_dir)
    sizes = {
        ds: count_rows(lay.split_csv(ds, "train")) for ds in BENCHMARK_DATASETS if lay.split_csv(ds, "train").is_file()
    }
    return sorted(sizes, key=sizes.get)[:n]


def run_mode(mode: str, data_dir: Path, datasets: list[str], epochs: int, threads: int, workers: int) -> dict:
    """Wall time and results of one way of running the jobs, in a fresh data folder."""
    work = Path(tempfile.mkdtemp(prefix=f"scale_{mode}_"))
    (work / "benchmark_data").symlink_to((data_dir / "benchmark_data").resolve())
    recipe = make_recipe("immi", epochs=epochs)
    jobs = [
        Job(
            f"{ds} {feat}",
            timed_model_job,
            dict(
                data_dir=work,
                dataset=ds,
                features=feat,
                recipe=recipe,
                device="cpu",
                seed=0,
                force=True,
                precision="auto",
            ),
        )
        for ds in datasets
        for feat in ("mat2vec", "onehot")
    ]
    cluster = None
    try:
        if mode == "a":
            engine = Engine(scheduler="sequential", threads_per_job=threads)
        else:
            cluster = local_cluster(1 if mode == "b" else workers, 1)  # what --scheduler local starts
            engine = Engine(scheduler=cluster.scheduler_address, threads_per_job=1)
        t0 = time.perf_counter()
        rows = run_jobs(jobs, engine, what="trainings")
        wall = time.perf_counter() - t0
    finally:
        if cluster is not None:
            cluster.close()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "wall_s": wall,
        "jobs_per_hour": len(jobs) / wall * 3600,
        "rss_mb": max(r["rss_mb"] for r in rows),
        "maes": {f"{r['dataset']} {r['features']}": r["test_mae"] for r in rows},
    }


def main(data_dir: Path, datasets: int, epochs: int, threads: int, workers: int, modes: str, as_json: bool) -> int:
    names = smallest(data_dir, datasets)
    labels = {
        "a": f"(a) sequential, 1 process x {threads} threads",
        "b": "(b) LocalCluster 1 worker x 1 thread",
        "c": f"(c) LocalCluster {workers} workers x 1 thread",
    }
    print(f"{len(names) * 2} trainings of {epochs} epochs: {', '.join(names)} x mat2vec/onehot")
    res = {}
    for mode in modes.split(","):
        res[mode] = run_mode(mode, data_dir, names, epochs, threads, workers)
    print(f"\n{'run':<44} {'wall s':>8} {'jobs/h':>8} {'peak RSS/worker':>16}")
    for mode, r in res.items():
        print(f"{labels[mode]:<44} {r['wall_s']:8.1f} {r['jobs_per_hour']:8.1f} {r['rss_mb']:13.0f} MB")
    out = {}
    if "b" in res and "c" in res:
        speed = res["c"]["jobs_per_hour"] / res["b"]["jobs_per_hour"]
        out["efficiency"] = speed
        print(f"(c) over (b): {speed:.2f}x jobs/hour with {workers} workers (scaling efficiency {speed / workers:.0%})")
    if "a" in res and "c" in res:
        out["speedup_vs_sequential"] = res["a"]["wall_s"] / res["c"]["wall_s"]
        print(f"(c) over (a): {out['speedup_vs_sequential']:.2f}x")
    if len(res) > 1:
        first, *rest = res.values()
        same = all(r["maes"] == first["maes"] for r in rest)
        print(f"test MAEs identical across the runs: {same} (threads differ between (a) and (b)/(c))")
    if as_json:
        print(json.dumps({k: round(v, 4) for k, v in out.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(**vars(parse_args())))
