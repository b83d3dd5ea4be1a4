"""One training across processes (torchrun, crabnet.jobs.distributed): two gloo ranks on the CPU train the
same weights as one process, and step 1 under torchrun writes one store shaped like a single process's."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from crabnet.data import load_dataset
from crabnet.jobs import distributed
from crabnet.jobs.signals import STOP, Preempted
from crabnet.training.loop import fit
from crabnet.training.recipe import Recipe, Scaler, build_model
from crabnet.utils import seed_everything

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(d_model=32, n_heads=2, d_ff=64, head_dims=(32, 16), dropout=0.0)
# 4 epochs of 4 global batches of 21, 21, 21 and 1 rows (SWA checks after every batch of epochs 2 and 4);
# the last batch leaves rank 0 without rows: it runs one row with weight 0
RECIPE = dict(epochs=4, epochs_step=1, batch_size=21, jitter=0.0, early_stop=0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_small(data_dir: Path, out: Path | None = None, kind: str = "plain") -> dict:
    """The small fp32 training both sides run; rank 0 (or the single process) saves its result to ``out``.

    ``kind``: "plain" (dropout and jitter off); "state" (dropout and jitter on, the training state kept
    in ``data_dir/<out name>.state.pt``); "stop" (the same, and rank 1 alone gets SIGTERM in step 6).
    """
    splits = load_dataset(data_dir, "tiny", fetch=False, verbose=False)
    seed_everything(0)
    plain = kind == "plain"
    model = build_model("onehot", **{**SMALL, "dropout": 0.0 if plain else 0.1})
    state = None if plain else data_dir / f"{out.stem}.state.pt"

    def sigterm_on_rank1(event: str, epoch: int, step: int) -> None:
        if kind == "stop" and distributed.rank() == 1 and event == "step" and step == 6:
            STOP.set()  # what SIGTERM does (crabnet.jobs.signals); epoch 2 stops after its 2nd batch on both ranks

    try:
        hist = fit(
            model,
            splits["train"],
            splits["val"],
            Scaler.fit(splits["train"].target),
            Recipe(**{**RECIPE, "jitter": 0.0 if plain else 0.02}),
            progress=False,
            precision="fp32",
            state_path=state,
            callback=sigterm_on_rank1,
        )
    except Preempted:
        STOP.clear()
        return {}
    result = {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "train_loss": hist.train_loss,
        "val_mae": hist.val_mae,
        "steps": hist.steps,
        "swa_updates": hist.swa_updates,
        "world": distributed.world_size(),
    }
    if out is not None and distributed.is_main():
        torch.save(result, out)
    return result


def _rank_main(rank: int, world: int, port: int, data_dir: Path, out: Path, kind: str = "plain") -> None:
    """One spawned rank: the environment torchrun would set, then the training."""
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world, "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()}, MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    try:
        train_small(data_dir, out, kind)
    finally:
        distributed.cleanup()


def test_without_torchrun_nothing_is_distributed(monkeypatch):
    for env in ({}, {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}):  # plain, and torchrun with one process
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert not distributed.requested() and distributed.is_main()
        assert distributed.init("cpu") == torch.device("cpu") and not torch.distributed.is_initialized()
        assert (distributed.rank(), distributed.world_size(), distributed.any_rank(True)) == (0, 1, True)
        model = torch.nn.Linear(2, 2)
        assert distributed.wrap(model) is model


@pytest.mark.cluster
def test_two_gloo_ranks_train_the_weights_of_one_process(tiny_data, tmp_path):
    one = train_small(tiny_data)
    out = tmp_path / "two.pt"
    torch.multiprocessing.spawn(_rank_main, args=(2, free_port(), tiny_data, out), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    assert two["world"] == 2 and one["world"] == 1
    assert two["steps"] == one["steps"] == 16 and two["swa_updates"] == one["swa_updates"] > 0
    for k, w in one["weights"].items():  # the same steps up to float32 rounding of the summation order
        torch.testing.assert_close(two["weights"][k], w, rtol=1e-4, atol=1e-5, msg=k)
    np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(two["val_mae"], one["val_mae"], rtol=1e-5)


@pytest.mark.cluster
def test_two_ranks_resume_after_sigterm_on_one_rank(tiny_data, tmp_path):
    def spawn(out: Path, kind: str) -> None:
        torch.multiprocessing.spawn(_rank_main, args=(2, free_port(), tiny_data, out, kind), nprocs=2, join=True)

    spawn(tmp_path / "ref.pt", "state")  # dropout and jitter on, uninterrupted
    spawn(tmp_path / "run.pt", "stop")  # both ranks stop after the same batch; rank 0 saves every rank's state
    saved = torch.load(tiny_data / "run.state.pt", weights_only=True)
    assert saved["epoch"] == 0 and saved["partial"]["batches"] == 2 and len(saved["rank_rng"]) == 2
    assert not (tmp_path / "run.pt").exists()
    spawn(tmp_path / "run.pt", "state")  # goes on from epoch 2, batch 3
    ref, run = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("ref", "run"))
    assert run["train_loss"] == ref["train_loss"] and run["val_mae"] == ref["val_mae"]
    for k, w in ref["weights"].items():  # bit for bit
        assert torch.equal(run["weights"][k], w), k


STEP1 = ["--dataset", "tiny", "--epochs", "2", "--device", "cpu", "--precision", "fp32", "--features", "onehot"]


@pytest.mark.cluster
def test_step1_under_torchrun_writes_one_store_shaped_like_one_process(tiny_data, tmp_path):
    two_dir = tmp_path / "two"
    shutil.copytree(tiny_data / "benchmark_data", two_dir / "benchmark_data")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS")}
    proc = subprocess.run(
        [*torchrun, str(ROOT / "get_training_attention.py"), "--data-dir", str(two_dir), *STEP1],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("attention: 3 captures x 24 compounds") == 1  # rank 1 prints nothing
    assert "on 2 torchrun ranks together, 1 thread(s) per rank" in proc.stdout
    one = subprocess.run(
        [sys.executable, str(ROOT / "get_training_attention.py"), "--data-dir", str(tiny_data), *STEP1],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    stores = [d / "attention" / "tiny" / "attention.zarr" for d in (tiny_data, two_dir)]
    assert sorted(p.name for p in stores[1].parent.iterdir()) == ["attention.zarr"]  # no .partial, no state
    a, b = (zarr.open_group(p, mode="r") for p in stores)
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for name in a.array_keys():
        assert a[name].shape == b[name].shape, name
    np.testing.assert_array_equal(a["step"][:], b["step"][:])
    # capture 0 is the untrained model: the same on both sides (later ones differ by the dropout masks)
    np.testing.assert_allclose(a["prediction"][:, 0], b["prediction"][:, 0], rtol=1e-6)
    np.testing.assert_allclose(a["attention"][:, 0], b["attention"][:, 0], rtol=1e-5, atol=1e-6)
    assert a.attrs["complete"] and b.attrs["complete"] and b.attrs["epochs_run"] == 2
    assert (two_dir / "models" / "tiny__onehot.pt").is_file() and (two_dir / "index.html").is_file()
