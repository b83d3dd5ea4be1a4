"""This project's training against the ``crabnet`` 2.0.8 package from PyPI, side by side.

    python benchmarks/peer.py                              # aflow__ael_bulk_modulus_vrh, 20 epochs
    python benchmarks/peer.py --epochs 20 --precision fp32,bf16 --threads 2
    python benchmarks/peer.py --json                        # one JSON line at the end
    python benchmarks/peer.py --rounds 2                    # ours then peer, twice; fastest of each

Both sides train CrabNet on the same splits with the same recipe (npj: cyclic learning rate
1e-4..6e-3 with a half-cycle of ``--epochs-step`` epochs, batch size ``--batch-size``, Lamb inside
Lookahead, each side's own SWA and early stop), the same number of epochs, seed and torch thread
count, one after the other, each in its own process. The peer runs from a scratch virtualenv that
this script creates the first time (``--venv``, default ``benchmarks/.peer_venv``, git-ignored):
``torch`` plus the peer's imports, then ``crabnet==2.0.8`` with ``--no-deps
--ignore-requires-python`` (it declares Python < 3.11 but runs on 3.11). Both packages are named
``crabnet``: each side runs in its own interpreter (ours: this project's environment, where the package
is installed with ``pip install -e .``; the peer: the scratch virtualenv) started with ``python -P`` from
a scratch folder, so that neither the script's folder nor the working directory is on ``sys.path``, and
each side checks which one it imported.

Data: the splits are read once with this project's loader (``crabnet.data.load_dataset``, which
drops single-element compounds as the original code did); the peer is fed exactly those rows as
DataFrames (the 2.0.8 package itself keeps single-element compounds: its drop is commented out).

Printed per side: seconds per epoch = wall time of the whole fit divided by the epochs it ran
(data loading and model construction excluded on both sides; the peer's fit is timed from the end
of its data loading), test MAE, peak RSS of the process (``ru_maxrss``) and the ratio of seconds
per epoch ours/peer, and the 1-minute load average before and after (the timings are only
comparable on an otherwise idle machine). ``--json`` adds one JSON line (keys ``ours_s_per_epoch``,
``peer_s_per_epoch``, ``ratio``, ``ours_test_mae``, ``peer_test_mae``, ... and every run; with
several rounds each side's fastest run, with several precisions the first one). ``--precision``
is passed to this project's ``fit``/``predict``: a comma-separated list gives one row of ours per
precision; the peer runs once per round, in fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = Path(__file__).resolve().parent / ".peer_venv"
PEER_PACKAGE = "crabnet==2.0.8"
PEER_VERSION = "2.0.8"
# The peer's imports (found by importing its modules), pinned to the versions this project's own
# environment uses. torch 2.13.0 is the one build pip can take from a local wheel here.
PEER_REQUIREMENTS = [
    "torch==2.13.0",
    "numpy==2.4.6",
    "pandas==3.1.1",
    "scikit-learn==1.9.1",
    "scipy==1.17.1",
    "matplotlib==3.11.2",
    "seaborn==0.13.2",
    "tqdm==4.70.1",
    "colorama",
    "joblib",
    "psutil",
]
PRECISIONS = ("auto", "fp32", "bf16")


# ------------------------------------------------------------------------------------------------
# the two sides (each runs in its own child process)


def run_ours(cfg: dict) -> dict:
    """Train and test this project's CrabNet with the recipe in ``cfg``; returns the figures.

    Adapt here when the training API changes (named recipes, precision keyword).
    """
    import torch

    import crabnet
    from crabnet.data import load_dataset
    from crabnet.training import evaluate, loop
    from crabnet.training import recipe as R
    from crabnet.utils import seed_everything

    module = Path(crabnet.__file__).resolve()
    if ROOT not in module.parents:
        raise RuntimeError(f"'crabnet' resolved to {module}, not this project's package")
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    splits = load_dataset(cfg["data_dir"], cfg["dataset"], verbose=False)
    train, val, test = splits["train"], splits["val"], splits["test"]
    overrides = {"epochs": cfg["epochs"], "epochs_step": cfg["epochs_step"], "batch_size": cfg["batch_size"]}
    recipe, recipe_name = R.make_recipe("npj", **overrides), "npj"
    seed_everything(cfg["seed"])
    model = R.build_model(cfg["features"], n_elements=train.width).to(device)
    scaler = R.Scaler.fit(train.target)
    t0 = time.perf_counter()
    hist = loop.fit(model, train, val, scaler, recipe, seed=cfg["seed"], progress=False, precision=cfg["precision"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    pred, _ = evaluate.predict(model, test, scaler)  # fp32 inference of the trained weights on both sides
    return {
        "side": "ours",
        "package": f"crabnet {crabnet.__version__} (this project)",
        "precision": cfg["precision"],
        "precision_used": hist.precision,
        "recipe": recipe_name,
        "n_train": len(train),
        "n_val": len(val),
        "n_test": len(test),
        "batch_size": recipe.batch_size,
        "epochs_step": recipe.epochs_step,
        "epochs_run": hist.epochs_run,
        "fit_seconds": seconds,
        "s_per_epoch": seconds / hist.epochs_run,
        "test_mae": evaluate.mae(pred, test.target),
        "swa": f"{hist.swa_updates} SWA updates, {hist.swa_failures} failed SWA epochs, "
        f"averaged weights swapped in: {hist.swapped_swa}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def run_peer(cfg: dict) -> dict:
    """Train and test the ``crabnet`` 2.0.8 package's CrabNet with the recipe in ``cfg``."""
    import numpy as np
    import pandas as pd
    import torch

    import crabnet
    from crabnet.crabnet_ import CrabNet

    if getattr(crabnet, "__version__", None) != PEER_VERSION:
        raise RuntimeError(f"'crabnet' resolved to {crabnet.__file__}, not the {PEER_VERSION} package")
    warnings.filterwarnings("ignore", message=".*pin_memory.*")  # 2.0.8 asks for it on CPU too
    warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")
    torch.set_num_threads(cfg["threads"])
    split = {
        s: pd.read_csv(Path(cfg["csv_dir"]) / f"{s}.csv", keep_default_na=False, dtype={"formula": str})
        for s in ("train", "val", "test")
    }
    epochs = cfg["epochs"]

    class Timed(CrabNet):
        """The package's CrabNet, timed from the end of its data loading to the end of ``fit``.

        It also runs exactly ``epochs`` epochs: 2.0.8 rounds the count up to a multiple of
        2 * epochs_step, which would make short runs incomparable (no effect at 20 epochs).
        """

        def _load_trainval_data(self, *args, **kwargs):
            super()._load_trainval_data(*args, **kwargs)
            self.t_fit = time.perf_counter()

        def _get_epochs_checkin_stepsize(self, epochs_, checkin):
            _, checkin, stepsize = super()._get_epochs_checkin_stepsize(epochs_, checkin)
            return epochs, checkin, stepsize

    model = Timed(
        mat_prop=cfg["dataset"],
        model_name="peer_benchmark",
        elem_prop=cfg["features"],
        epochs=epochs,
        epochs_step=cfg["epochs_step"],
        batch_size=cfg["batch_size"],
        base_lr=1e-4,
        max_lr=6e-3,
        fudge=0.02,
        random_state=cfg["seed"],
        compute_device=torch.device(cfg["device"]),
        verbose=False,
        losscurve=False,
        learningcurve=False,
        save=False,
    )
    model.fit(split["train"], split["val"])
    if cfg["device"].startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - model.t_fit
    pred = model.predict(split["test"])
    target = split["test"]["target"].to_numpy(np.float64)
    swa = model.optimizer
    return {
        "side": "peer",
        "package": f"crabnet {crabnet.__version__} (PyPI)",
        "precision": "fp32",
        "precision_used": "fp32",
        "n_train": len(split["train"]),
        "n_val": len(split["val"]),
        "n_test": len(split["test"]),
        "batch_size": model.batch_size,
        "epochs_step": model.epochs_step,
        "lr_half_cycle_batches": model.stepsize,
        "optimizer": type(swa).__module__ + "." + type(swa).__name__,
        "epochs_run": model.epoch + 1,
        "fit_seconds": seconds,
        "s_per_epoch": seconds / (model.epoch + 1),
        "test_mae": float(np.mean(np.abs(pred - target))),
        "swa": f"{len(swa.maes)} SWA checks, {swa.discard_count} failed check epochs",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def child(side: str, config: Path) -> int:
    """Entry point of a child process: run one side and write its figures next to the config."""
    cfg = json.loads(config.read_text())
    out = run_ours(cfg) if side == "ours" else run_peer(cfg)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(cfg["result"]).write_text(json.dumps(out))
    return 0


# ------------------------------------------------------------------------------------------------
# the parent: data, scratch virtualenv, children, report


def ensure_peer_venv(venv: Path) -> Path:
    """Create (once) the scratch virtualenv with the peer package; returns its python."""
    python = venv / "bin" / "python"
    stamp = venv / "peer_requirements.txt"
    wanted = "\n".join([*PEER_REQUIREMENTS, PEER_PACKAGE]) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    if venv.exists() and any(venv.iterdir()) and not (venv / "pyvenv.cfg").exists():
        raise SystemExit(f"{venv} exists and is not a virtualenv: give another --venv")
    print(f"creating the peer's virtualenv in {venv} (once; a few minutes)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *PEER_REQUIREMENTS], check=True)
    subprocess.run([*pip, "--no-deps", "--ignore-requires-python", PEER_PACKAGE], check=True)
    stamp.write_text(wanted)
    return python


def run_child(python: Path, side: str, cfg: dict, workdir: Path, tag: str) -> dict:
    """Run one side in its own process (cwd ``workdir``) and return its figures."""
    cfg = {**cfg, "result": str(workdir / f"{tag}.result.json")}
    config = workdir / f"{tag}.config.json"
    config.write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS=str(cfg["threads"]), MKL_NUM_THREADS=str(cfg["threads"]), MPLBACKEND="Agg")
    cmd = [str(python), "-P", str(Path(__file__).resolve()), "--child", side, "--child-config", str(config)]
    print(f"running {tag} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=workdir, env=env)
    if proc.returncode:
        raise SystemExit(f"{tag} failed (exit {proc.returncode})")
    return json.loads(Path(cfg["result"]).read_text())


def write_splits(data_dir: Path, dataset: str, out: Path) -> dict[str, int]:
    """Write the splits as this project's loader reads them (unary dropped) to formula,target CSVs."""
    import pandas as pd

    from crabnet.data import load_dataset

    splits = load_dataset(data_dir, dataset, verbose=False)
    for name, data in splits.items():
        pd.DataFrame({"formula": data.formula, "target": data.target.astype("float64")}).to_csv(
            out / f"{name}.csv", index=False
        )
    return {name: len(data) for name, data in splits.items()}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="aflow__ael_bulk_modulus_vrh", help="default: %(default)s")
    p.add_argument("--features", default="mat2vec", help="element features (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=20, help="epochs on both sides (default: %(default)s)")
    p.add_argument("--epochs-step", type=int, default=10, help="LR half-cycle in epochs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="default: %(default)s")
    p.add_argument(
        "--precision",
        default="auto",
        help="ours: auto|fp32|bf16, or a comma-separated list for one row each (default: %(default)s)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--device", default="cpu", help="cpu|cuda, both sides (default: %(default)s)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat ours then peer this many times; the summary takes each side's fastest run",
    )
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="default: %(default)s")
    p.add_argument(
        "--venv",
        type=Path,
        default=DEFAULT_VENV,
        help="the peer's scratch virtualenv, created if missing (default: benchmarks/.peer_venv)",
    )
    p.add_argument(
        "--json", dest="as_json", action="store_true", help="print one JSON line with the figures at the end"
    )
    p.add_argument("--child", dest="child_side", choices=("ours", "peer"), help=argparse.SUPPRESS)
    p.add_argument("--child-config", type=Path, help=argparse.SUPPRESS)
    return p.parse_args()


def main(
    dataset: str,
    features: str,
    epochs: int,
    epochs_step: int,
    batch_size: int,
    precision: str,
    threads: int,
    seed: int,
    device: str,
    rounds: int,
    data_dir: Path,
    venv: Path,
    as_json: bool,
    child_side: str | None = None,
    child_config: Path | None = None,
) -> int:
    if child_side:
        return child(child_side, child_config)
    precisions = [p.strip() for p in precision.split(",") if p.strip()]
    if not precisions or any(p not in PRECISIONS for p in precisions):
        raise SystemExit(f"--precision: one or more of {', '.join(PRECISIONS)}, got {precision!r}")
    if rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    peer_python = ensure_peer_venv(venv.resolve())
    runs: list[dict] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="peer_bench_") as tmp:
        work = Path(tmp)
        counts = write_splits(data_dir, dataset, work)
        cfg = {
            "dataset": dataset,
            "features": features,
            "epochs": epochs,
            "epochs_step": epochs_step,
            "batch_size": batch_size,
            "threads": threads,
            "seed": seed,
            "device": device,
            "data_dir": str(data_dir.resolve()),
            "csv_dir": str(work),
        }
        for rnd in range(1, rounds + 1):
            ours = [
                run_child(Path(sys.executable), "ours", {**cfg, "precision": prec}, work, f"ours_{prec}_{rnd}")
                for prec in precisions
            ]
            peer = run_child(peer_python, "peer", cfg, work, f"peer_{rnd}")
            for r in ours:
                if (r["n_train"], r["n_val"], r["n_test"]) != (peer["n_train"], peer["n_val"], peer["n_test"]):
                    raise SystemExit(
                        f"the sides saw different splits: ours {r['n_train']}/{r['n_val']}/"
                        f"{r['n_test']}, peer {peer['n_train']}/{peer['n_val']}/{peer['n_test']}"
                    )
                r["ratio"] = r["s_per_epoch"] / peer["s_per_epoch"]
            runs += [{**r, "round": rnd} for r in [*ours, peer]]
    load_after = os.getloadavg()

    print(
        f"\n{dataset}, {features}: train/val/test {counts['train']}/{counts['val']}/{counts['test']} compounds "
        f"(single-element ones dropped, the same rows on both sides); {epochs} epochs, epochs_step "
        f"{epochs_step}, batch {batch_size}, seed {seed}, {threads} torch threads, {device}"
    )
    print(
        "s/epoch = wall time of the whole fit / epochs run (data loading and model construction excluded); "
        "each fit includes its side's own monitoring passes (ours: validation MAE every epoch; "
        "2.0.8: train and validation MAE at the first, every 2*epochs_step-th and the last epoch)"
    )
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} CPUs")
    print(
        f"\n{'round':>5s} {'side':30s} {'precision':>9s} {'epochs':>6s} {'fit s':>8s} {'s/epoch':>8s} "
        f"{'test MAE':>9s} {'peak RSS MB':>11s} {'ours/peer':>9s}"
    )
    for r in runs:
        prec = r["precision_used"] if r["precision"] == "auto" else r["precision"]
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
        print(
            f"{r['round']:5d} {r['package']:30s} {prec:>9s} {r['epochs_run']:6d} {r['fit_seconds']:8.1f} "
            f"{r['s_per_epoch']:8.2f} {r['test_mae']:9.4g} {r['peak_rss_mb']:11.0f} {ratio:>9s}"
        )
    for r in runs[: len(precisions) + 1]:
        print(
            f"{r['package']} [{r['precision']}]: batch {r['batch_size']}, epochs_step {r['epochs_step']}, "
            f"{r['swa']}; torch {r['torch']}, {r['threads']} threads"
        )

    def best(side: str, prec: str | None = None) -> dict:
        """The fastest run of one side (and precision) over the rounds."""
        mine = [r for r in runs if r["side"] == side and (prec is None or r["precision"] == prec)]
        return min(mine, key=lambda r: r["s_per_epoch"])

    peer_best = best("peer")
    if rounds > 1:
        print(f"\nbest of {rounds} rounds:")
        for prec in dict.fromkeys(r["precision"] for r in runs if r["side"] == "ours"):
            o = best("ours", prec)
            print(
                f"  ours [{prec}] {o['s_per_epoch']:.2f} s/epoch, peer {peer_best['s_per_epoch']:.2f} s/epoch: "
                f"ratio {o['s_per_epoch'] / peer_best['s_per_epoch']:.2f}"
            )
    if as_json:
        first = best("ours", next(r["precision"] for r in runs if r["side"] == "ours"))
        line = {
            "ours_s_per_epoch": first["s_per_epoch"],
            "peer_s_per_epoch": peer_best["s_per_epoch"],
            "ratio": first["s_per_epoch"] / peer_best["s_per_epoch"],
            "ours_test_mae": first["test_mae"],
            "peer_test_mae": peer_best["test_mae"],
            "ours_precision": first["precision"],
            "ours_peak_rss_mb": first["peak_rss_mb"],
            "peer_peak_rss_mb": peer_best["peak_rss_mb"],
            "epochs": epochs,
            "rounds": rounds,
            "dataset": dataset,
            "features": features,
            "threads": threads,
            "device": device,
            "load_avg_before": load_before[0],
            "load_avg_after": load_after[0],
            "runs": runs,
        }
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(**vars(parse_args())))
