"""Training recipe, attention capture to Zarr, and the get_training_attention.py script."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import get_training_attention as gta
from crabnet.data import load_dataset
from crabnet.errors import DataError
from crabnet.explain.capture import AttentionRecorder
from crabnet.explain.store import AttentionStore, AttentionWriter
from crabnet.training.evaluate import predict
from crabnet.training.loop import fit
from crabnet.training.recipe import Recipe, Scaler, build_model
from crabnet.utils import seed_everything

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(d_model=32, n_heads=2, d_ff=64, head_dims=(32, 16))


def _train(splits, seed=0, callback=None, epochs=4):
    seed_everything(seed)
    model = build_model("onehot", **SMALL)
    scaler = Scaler.fit(splits["train"].target)
    recipe = Recipe(epochs=epochs, epochs_step=1, batch_size=16)
    hist = fit(model, splits["train"], splits["val"], scaler, recipe, seed=seed, callback=callback, progress=False)
    return model, scaler, hist


def test_fit_deterministic_on_cpu_and_learns(tiny_data):
    splits = load_dataset(tiny_data, "tiny", fetch=False)
    m1, s1, h1 = _train(splits)
    m2, s2, h2 = _train(splits)
    p1, _ = predict(m1, splits["test"], s1)
    p2, _ = predict(m2, splits["test"], s2)
    np.testing.assert_array_equal(p1, p2)
    assert h1.train_loss == h2.train_loss
    assert h1.train_loss[-1] < h1.train_loss[0]
    assert h1.swa_updates >= 1 and h1.swapped_swa  # epochs_step 1: SWA checks at epochs 1 and 3


def test_capture_does_not_change_training(tiny_data, tmp_path):
    splits = load_dataset(tiny_data, "tiny", fetch=False)
    model, scaler, _ = _train(splits)
    plain, _ = predict(model, splits["test"], scaler)

    seed_everything(0)
    m2 = build_model("onehot", **SMALL)
    writer = AttentionWriter(tmp_path / "a.zarr", splits["val"], 3, 2, {"dataset": "tiny"})
    rec = AttentionRecorder(m2, splits["val"], scaler, writer, mode="epoch")
    fit(
        m2,
        splits["train"],
        splits["val"],
        scaler,
        Recipe(epochs=4, epochs_step=1, batch_size=16),
        seed=0,
        callback=rec,
        progress=False,
    )
    captured, _ = predict(m2, splits["test"], scaler)
    np.testing.assert_array_equal(plain, captured)
    assert writer.n_captures == 5 and writer.steps == [0, 1, 2, 3, 4]


def test_step_capture_every_k(tiny_data, tmp_path):
    splits = load_dataset(tiny_data, "tiny", fetch=False)
    seed_everything(0)
    model = build_model("onehot", **SMALL)
    scaler = Scaler.fit(splits["train"].target)
    writer = AttentionWriter(tmp_path / "a.zarr", splits["val"], 3, 2, {"dataset": "tiny"})
    rec = AttentionRecorder(model, splits["val"], scaler, writer, mode="step", every=3)
    hist = fit(
        model,
        splits["train"],
        splits["val"],
        scaler,
        Recipe(epochs=2, epochs_step=1, batch_size=16),
        callback=rec,
        progress=False,
    )
    assert hist.steps == 8  # 64 / 16 = 4 batches x 2 epochs
    assert writer.steps == [0, 3, 6]
    writer.finalize()
    store = AttentionStore(tmp_path / "a.zarr")
    assert store.n_captures == 3
    with pytest.raises(ValueError):
        AttentionRecorder(model, splits["val"], scaler, writer, mode="batch")


def run_script(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "get_training_attention.py"), *args], capture_output=True, text=True, cwd=cwd
    )


def test_script_two_epochs_store_contract(tiny_data):
    proc = run_script("--data-dir", str(tiny_data), "--dataset", "tiny", "--epochs", "2", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    path = tiny_data / "attention" / "tiny" / "attention.zarr"
    assert not (path.parent / "attention.zarr.partial").exists()
    g = zarr.open_group(path, mode="r")
    a = dict(g.attrs)
    for key in (
        "dataset",
        "features",
        "split",
        "capture",
        "n_layers",
        "n_heads",
        "n_elements",
        "model_config",
        "created_with",
    ):
        assert key in a, key
    assert a["dataset"] == "tiny" and a["split"] == "val" and a["capture"] == "epoch" and a["complete"]
    n, E, L, H = 24, a["n_elements"], a["n_layers"], a["n_heads"]
    assert (L, H) == (3, 4)
    assert g["formula"].shape == (n,) and g["elements"].shape == (n, E) and g["fractions"].shape == (n, E)
    assert g["target"].shape == (n,) and g["step"][:].tolist() == [0, 1, 2]
    assert g["prediction"].shape == (n, 3)
    att = g["attention"]
    assert att.shape == (n, 3, L, H, E, E)
    assert att.chunks == (1, 3, L, H, E, E)  # one compound's history per chunk
    assert att.shards == (n, 3, L, H, E, E)  # a store this small is one shard: one file on disk
    assert len([p for p in (path / "attention" / "c").rglob("*") if p.is_file()]) == 1
    maps = att[:]
    el = g["elements"][:]
    for i in range(n):
        k = int((el[i] > 0).sum())
        np.testing.assert_allclose(maps[i, :, :, :, :k, :k].sum(-1), 1.0, rtol=1e-5)
        assert (maps[i, :, :, :, k:, :] == 0).all() and (maps[i, :, :, :, :, k:] == 0).all()

    store = AttentionStore(path)
    f = store.formulas[5]
    h = store.compound(f)
    assert h.index == 5 and h.attention.shape[:3] == (3, L, H)
    np.testing.assert_array_equal(h.prediction, g["prediction"][5])
    assert store.compound(5).formula == f
    with pytest.raises(KeyError, match="close matches"):
        store.compound("U3Pu2")
    assert (tiny_data / "models" / "tiny__mat2vec.pt").is_file()

    again = run_script("--data-dir", str(tiny_data), "--dataset", "tiny", "--epochs", "2", "--device", "cpu")
    assert again.returncode == 0 and "up to date" in again.stdout


@pytest.mark.cluster
def test_training_sent_to_a_dask_scheduler_equals_sequential(tiny_data, tmp_path):
    """Step 1 is one job: --scheduler tcp://… sends it to a Dask worker process; with one thread on both
    sides the store and the model equal the run in this process (--scheduler sequential)."""
    from distributed import LocalCluster

    remote = tmp_path / "remote"
    shutil.copytree(tiny_data / "benchmark_data", remote / "benchmark_data")
    args = ("--dataset", "tiny", "--epochs", "2", "--device", "cpu", "--features", "onehot", "--threads-per-job", "1")
    here = run_script("--data-dir", str(tiny_data), *args, "--scheduler", "sequential")
    assert here.returncode == 0 and "running 1 trainings in this process" in here.stdout, here.stderr
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        sent = run_script("--data-dir", str(remote), *args, "--scheduler", cluster.scheduler_address)
    assert sent.returncode == 0, sent.stdout[-3000:] + sent.stderr[-3000:]
    assert f"submitted 1 trainings to the Dask scheduler at {cluster.scheduler_address}" in sent.stdout
    assert "[1/1 done, 0 running, 0 failed" in sent.stdout and "attention: 3 captures x 24 compounds" in sent.stdout
    a, b = (AttentionStore(d / "attention" / "tiny" / "attention.zarr").group for d in (tiny_data, remote))
    for name in ("attention", "prediction", "attribution", "step", "formula"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    wa, wb = (torch.load(d / "models" / "tiny__onehot.pt", weights_only=True)["model"] for d in (tiny_data, remote))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_script_bad_csv_clear_error_no_outputs(tiny_data):
    csv = tiny_data / "benchmark_data" / "tiny" / "train.csv"
    csv.write_text(csv.read_text() + "Zz2O3,1.0\n")
    proc = run_script("--data-dir", str(tiny_data), "--dataset", "tiny", "--epochs", "1")
    assert proc.returncode == 2
    assert "train.csv, row 65, formula 'Zz2O3'" in proc.stderr and "unknown element" in proc.stderr
    assert not (tiny_data / "attention").exists() and not (tiny_data / "models").exists()


def test_interrupted_run_leaves_no_complete_store(tiny_data, monkeypatch):
    calls = {"n": 0}
    real = AttentionRecorder.__call__

    def interrupting(self, event, epoch, step):
        real(self, event, epoch, step)
        calls["n"] += 1
        if event == "epoch":
            raise KeyboardInterrupt

    monkeypatch.setattr(AttentionRecorder, "__call__", interrupting)
    rc = gta.main(
        data_dir=tiny_data,
        dataset="tiny",
        device="cpu",
        seed=0,
        quick=False,
        force=False,
        epochs=3,
        epochs_step=None,
        features="onehot",
        capture="epoch",
        capture_every=1,
        split="val",
        batch_size=0,
        keep_unary=False,
        skip_invalid=False,
    )
    assert rc == 130
    path = tiny_data / "attention" / "tiny" / "attention.zarr"
    assert not path.exists() and (path.parent / "attention.zarr.partial").exists()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        AttentionStore(path)
    assert not (tiny_data / "models").exists()


def test_incomplete_store_refused(tmp_path):
    g = zarr.open_group(tmp_path / "x.zarr", mode="w")
    g.attrs["complete"] = False
    with pytest.raises(DataError, match="not a complete"):
        AttentionStore(tmp_path / "x.zarr")


def test_help_mentions_defaults():
    proc = run_script("--help")
    assert proc.returncode == 0
    assert "--capture-every" in proc.stdout and "default: data" in proc.stdout and "Next" in proc.stdout


@pytest.mark.cuda
def test_cuda_matches_cpu(tiny_data):
    splits = load_dataset(tiny_data, "tiny", fetch=False)
    model, scaler, _ = _train(splits, epochs=1)
    cpu, _ = predict(model, splits["test"], scaler)
    gpu, _ = predict(model.to("cuda"), splits["test"], scaler)
    np.testing.assert_allclose(cpu, gpu, rtol=1e-3, atol=1e-3)


class _Interrupt(Exception):
    pass


def _fit_resumable(splits, state_path, *, seed=0, interrupt_at_epoch=None):
    seed_everything(seed)
    model = build_model("onehot", **SMALL)
    scaler = Scaler.fit(splits["train"].target)
    recipe = Recipe(epochs=8, epochs_step=1, batch_size=16, early_stop=0)  # SWA checks every 2nd epoch

    def callback(event, epoch, step):
        if event == "step" and epoch == interrupt_at_epoch:
            raise _Interrupt()

    hist = fit(
        model,
        splits["train"],
        splits["val"],
        scaler,
        recipe,
        seed=seed,
        progress=False,
        callback=callback,
        state_path=state_path,
        state_key={"dataset": "tiny"},
        save_every_s=0,
    )
    return model, scaler, hist


def test_interrupted_training_resumes_bit_for_bit(tiny_data, tmp_path):
    splits = load_dataset(tiny_data, "tiny", fetch=False)
    m_ref, s_ref, h_ref = _fit_resumable(splits, tmp_path / "ref.state.pt")
    state = tmp_path / "run.state.pt"
    with pytest.raises(_Interrupt):
        _fit_resumable(splits, state, interrupt_at_epoch=5)  # dies in epoch 5, after SWA checks in 1 and 3
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] == 4 and saved["history"]["swa_updates"] >= 1
    m, s, h = _fit_resumable(splits, state)
    np.testing.assert_array_equal(predict(m, splits["test"], s)[0], predict(m_ref, splits["test"], s_ref)[0])
    assert h.train_loss == h_ref.train_loss and h.val_mae == h_ref.val_mae
    assert (h.epochs_run, h.steps, h.swa_updates, h.swa_failures) == (
        8,
        h_ref.steps,
        h_ref.swa_updates,
        h_ref.swa_failures,
    )


def test_state_of_other_run_is_ignored(tiny_data, tmp_path, capsys):
    splits = load_dataset(tiny_data, "tiny", fetch=False)
    state = tmp_path / "run.state.pt"
    with pytest.raises(_Interrupt):
        _fit_resumable(splits, state, seed=1, interrupt_at_epoch=3)
    m, s, h = _fit_resumable(splits, state, seed=0)  # other seed: starts afresh
    assert "ignoring" in capsys.readouterr().out
    m_ref, s_ref, _ = _fit_resumable(splits, tmp_path / "ref.state.pt", seed=0)
    np.testing.assert_array_equal(predict(m, splits["test"], s)[0], predict(m_ref, splits["test"], s_ref)[0])
    assert h.epochs_run == 8


def _run_step1(data_dir, epochs=4):
    return gta.main(
        data_dir=data_dir,
        dataset="tiny",
        device="cpu",
        seed=0,
        quick=False,
        force=False,
        epochs=epochs,
        epochs_step=1,
        features="onehot",
        capture="epoch",
        capture_every=1,
        split="val",
        batch_size=16,
        keep_unary=False,
        skip_invalid=False,
    )


def test_interrupted_step1_goes_on_to_the_same_store(tiny_data, monkeypatch):
    import crabnet.training.state

    monkeypatch.setattr(crabnet.training.state, "SAVE_EVERY_S", 0.0)  # save the state after every epoch
    store = tiny_data / "attention" / "tiny" / "attention.zarr"
    assert _run_step1(tiny_data) == 0
    ref = AttentionStore(store)
    ref_att, ref_pred, ref_steps = ref.group["attention"][:], ref.group["prediction"][:], ref.group["step"][:]
    assert not store.with_name("attention.zarr.state.pt").exists()

    real = AttentionRecorder.__call__

    def interrupting(self, event, epoch, step):
        if event == "step" and epoch == 2:
            raise KeyboardInterrupt  # in epoch 2: the state of epoch 1 and captures 0-2 are saved
        real(self, event, epoch, step)

    shutil.rmtree(store)
    with monkeypatch.context() as m:
        m.setattr(AttentionRecorder, "__call__", interrupting)
        assert _run_step1(tiny_data) == 130
    state = store.with_name("attention.zarr.state.pt")
    assert state.exists() and torch.load(state, weights_only=True)["callback"]["steps"] == [0, 1, 2]
    assert _run_step1(tiny_data) == 0  # goes on from epoch 2
    out = AttentionStore(store)
    np.testing.assert_array_equal(out.group["step"][:], ref_steps)
    np.testing.assert_array_equal(out.group["prediction"][:], ref_pred)
    np.testing.assert_array_equal(out.group["attention"][:], ref_att)
    assert not state.exists() and not store.with_name("attention.zarr.partial").exists()
