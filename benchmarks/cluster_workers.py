"""One training's s/epoch in a plain process, in a ``dask worker`` started by hand and in a SLURM worker job.

Runs step 4 (``get_crabnet_embeddings.py``) on one dataset and one feature set with one thread, three
ways one after the other, each into a fresh data folder (the datasets linked in):

    plain   ``--scheduler sequential``: the training runs in the command's own process
    worker  ``dask scheduler`` + one ``dask worker --nthreads 1`` started by hand on 127.0.0.1, ``--scheduler-file``
    slurm   ``--scheduler slurm``: dask-jobqueue submits a one-core worker job (needs a SLURM cluster:
            sbatch on PATH, ``SLURM_CONF`` where it is not the system's; skipped otherwise)

and prints each run's mean s/epoch (from the trainings' own epoch lines, the first epoch left out)
and its ratio to the plain process. With ``--json`` one JSON line at the end
(``plain_s_per_epoch``, ``worker_over_plain``, ``slurm_over_plain``). Run it on an idle machine.

    python benchmarks/cluster_workers.py          # aflow__ael_bulk_modulus_vrh, mat2vec, 6 epochs
    python tests/slurm_cluster.py slurm-state &   # (as root) a one-node SLURM for the slurm leg; export its SLURM_CONF
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EPOCH = re.compile(r" epoch (\d+)/\d+ .* ([\d.]+) s/epoch ")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="where the datasets are (default: data)")
    p.add_argument("--dataset", default="aflow__ael_bulk_modulus_vrh", help="(default: aflow__ael_bulk_modulus_vrh)")
    p.add_argument("--features", default="mat2vec", help="(default: mat2vec)")
    p.add_argument("--epochs", type=int, default=6, help="epochs of each training (default: 6)")
    p.add_argument("--modes", default="plain,worker,slurm", help="which runs, in this order (default: all three)")
    p.add_argument("--json", dest="as_json", action="store_true", help="one JSON line with the figures at the end")
    return p.parse_args()


def seconds_per_epoch(text: str) -> float:
    """The last epoch line's s/epoch is a running mean; recompute it without the first epoch."""
    lines = [(int(e), float(s)) for e, s in EPOCH.findall(text)]
    if len(lines) < 2:
        raise RuntimeError(f"no epoch lines in the training's log:\n{text[-2000:]}")
    (e1, s1), (en, sn) = lines[0], lines[-1]
    return (sn * en - s1 * e1) / (en - e1)


def step4(work: Path, args: argparse.Namespace, *extra: str, env: dict | None = None) -> str:
    cmd = [sys.executable, str(ROOT / "get_crabnet_embeddings.py"), "--data-dir", str(work), "--dataset", args.dataset,
           "--features", args.features, "--epochs", str(args.epochs), "--device", "cpu", "--threads-per-job", "1",
           *extra]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
    return out.stdout


def by_hand(work: Path, args: argparse.Namespace) -> str:
    """A scheduler and one worker started as separate commands; returns the worker's log."""
    dask, sched = shutil.which("dask") or str(Path(sys.executable).parent / "dask"), work / "dask.json"
    procs = [subprocess.Popen([dask, "scheduler", "--scheduler-file", str(sched), "--host", "127.0.0.1",
                               "--dashboard-address", ":0"], stderr=subprocess.DEVNULL)]  # fmt: skip
    with open(work / "worker.log", "w") as log:
        try:
            while not sched.exists():
                time.sleep(0.2)
            worker = [dask, "worker", "--scheduler-file", str(sched), "--nthreads", "1", "--host", "127.0.0.1"]
            procs.append(subprocess.Popen([*worker, "--no-dashboard"], stdout=log, stderr=subprocess.STDOUT))
            step4(work, args, "--scheduler-file", str(sched))
        finally:
            for p in procs[::-1]:
                p.terminate()
                p.wait(timeout=30)
    return (work / "worker.log").read_text()


def on_slurm(work: Path, args: argparse.Namespace) -> str:
    env = {"DASK_JOBQUEUE__SLURM__CORES": "1", "DASK_JOBQUEUE__SLURM__MEMORY": "4GB",
           "DASK_JOBQUEUE__SLURM__WALLTIME": "01:00:00", "DASK_JOBQUEUE__SLURM__PYTHON": sys.executable,
           "DASK_JOBQUEUE__SLURM__LOG_DIRECTORY": str(work / "logs"),
           "DASK_JOBQUEUE__SLURM__SCHEDULER_OPTIONS": "{'host': '127.0.0.1', 'dashboard_address': ':0'}",
           "DASK_JOBQUEUE__SLURM__WORKER_EXTRA_ARGS": "['--host', '127.0.0.1']"}  # fmt: skip
    step4(work, args, "--scheduler", "slurm", env=env)
    return "".join(p.read_text() for p in sorted((work / "logs").glob("*.out")))


def main(data_dir: Path, dataset: str, features: str, epochs: int, modes: str, as_json: bool) -> int:
    args = argparse.Namespace(dataset=dataset, features=features, epochs=epochs)
    runs = {"plain": lambda w: step4(w, args, "--scheduler", "sequential"), "worker": lambda w: by_hand(w, args),
            "slurm": lambda w: on_slurm(w, args)}  # fmt: skip
    rates: dict[str, float] = {}
    for mode in modes.split(","):
        if mode == "slurm" and shutil.which("sbatch") is None:
            print("slurm: skipped (no sbatch on PATH)")
            continue
        work = Path(tempfile.mkdtemp(prefix=f"cluster_{mode}_"))
        (work / "benchmark_data").symlink_to((data_dir / "benchmark_data").resolve())
        try:
            rates[mode] = seconds_per_epoch(runs[mode](work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        ratio = f"{rates[mode] / rates['plain']:.2f}x plain" if "plain" in rates else ""
        print(f"{mode:<7} {rates[mode]:7.2f} s/epoch  {ratio}", flush=True)
    if as_json:
        out = {f"{m}_s_per_epoch": round(r, 3) for m, r in rates.items()}
        out.update({f"{m}_over_plain": round(r / rates["plain"], 3) for m, r in rates.items() if "plain" in rates})
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(**vars(parse_args())))
