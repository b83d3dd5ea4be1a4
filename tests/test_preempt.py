"""Running on a cluster: plain per-epoch log lines, SIGTERM saves the training state and exits 143,
the state-save interval from the environment, and an unwritable --data-dir."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import preempt_job
import pytest
import torch

from crabnet.data import load_dataset
from crabnet.errors import UsageError
from crabnet.explain.capture import AttentionRecorder
from crabnet.jobs.cli import check_writable, run
from crabnet.jobs.signals import STOP, Preempted, install_stop_handler, uninstall_stop_handler
from crabnet.training.evaluate import predict
from crabnet.training.loop import epoch_line, fit
from crabnet.training.recipe import Recipe, Scaler, build_model
from crabnet.training.state import History, state_save_interval
from crabnet.utils import seed_everything

ROOT = Path(__file__).resolve().parents[1]
SMALL = preempt_job.SMALL


@pytest.fixture
def stop_handler():
    """SIGTERM handler of the scripts installed in this (main) thread; flag cleared before and after."""
    STOP.clear()
    assert install_stop_handler()
    try:
        yield
    finally:
        uninstall_stop_handler()
        STOP.clear()


def _fit(splits, state_path=None, callback=None, progress=False, epochs=6, save_every_s=None):
    seed_everything(0)
    model = build_model("onehot", **SMALL)
    scaler = Scaler.fit(splits["train"].target)
    recipe = Recipe(epochs=epochs, epochs_step=1, batch_size=16, early_stop=0)  # 4 batches per epoch
    hist = fit(
        model,
        splits["train"],
        splits["val"],
        scaler,
        recipe,
        progress=progress,
        callback=callback,
        desc="tiny onehot",
        state_path=state_path,
        state_key={"dataset": "tiny"},
        save_every_s=save_every_s,
    )
    return model, scaler, hist


def _assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_epoch_lines_where_stdout_is_not_a_terminal(tiny_data, capsys):
    splits = load_dataset(tiny_data, "tiny", fetch=False)
    _fit(splits, progress=None, epochs=3)  # capsys: not a terminal
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " epoch " in ln]
    assert len(lines) == 3
    assert lines[0].startswith("tiny onehot epoch 1/3 loss ") and lines[2].startswith("tiny onehot epoch 3/3 ")
    for ln in lines:
        assert "val MAE " in ln and "s/epoch" in ln and "elapsed 0:" in ln and "ETA " in ln and "SWA " in ln
    assert "SWA +" in lines[1] and "(checks 1 failed" in lines[1]  # epochs_step 1: a SWA check every 2nd epoch
    _fit(splits, progress=False, epochs=1)
    assert " epoch " not in capsys.readouterr().out


def test_epoch_line_format():
    hist = History(epochs_run=12, train_loss=[0.12341], val_mae=[10.871], epoch_swa=[-1, 0, -1, 3], swa_failures=1)
    line = epoch_line("mp_bulk_modulus mat2vec", hist, Recipe(epochs=300), 4.1, 49.4)
    # ETA: 288 epochs left x 4.1 s = 1181 s; "<=": SWA early stopping may end the run sooner
    assert line == (
        "mp_bulk_modulus mat2vec epoch 12/300 loss 0.1234 val MAE 10.87 SWA +3 (checks 2 failed 1) "
        "4.1 s/epoch elapsed 0:49 ETA <=19:41"
    )
    no_stop = epoch_line("d", hist, Recipe(epochs=12, early_stop=0), 3600.0, 7200.0)
    assert "elapsed 2:00:00 ETA 0:00" in no_stop


def test_state_every_s_from_the_environment(tiny_data, tmp_path, monkeypatch):
    monkeypatch.delenv("CRABNET_STATE_EVERY_S", raising=False)
    assert state_save_interval() == 60.0
    monkeypatch.setenv("CRABNET_STATE_EVERY_S", "2.5")
    assert state_save_interval() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("CRABNET_STATE_EVERY_S", bad)
        with pytest.raises(UsageError, match="CRABNET_STATE_EVERY_S"):
            state_save_interval()
    monkeypatch.setenv("CRABNET_STATE_EVERY_S", "0")  # a state after every epoch
    splits = load_dataset(tiny_data, "tiny", fetch=False)
    state = tmp_path / "run.state.pt"

    def die_in_epoch_2(event, epoch, step):
        if event == "step" and epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(splits, state, callback=die_in_epoch_2)
    assert torch.load(state, weights_only=True)["epoch"] == 0


@pytest.mark.parametrize("batch", [1, 3])  # inside epoch 3 (2 of 4 batches done) / after its last batch
def test_sigterm_in_training_saves_state_and_resumes_bit_for_bit(tiny_data, tmp_path, capsys, stop_handler, batch):
    splits = load_dataset(tiny_data, "tiny", fetch=False)
    ref, ref_scaler, ref_hist = _fit(splits)
    state = tmp_path / "run.state.pt"

    def sigterm(event, epoch, step):
        if event == "step" and step == 2 * 4 + batch + 1:  # epoch index 2, batch index `batch`
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(200):  # the Python handler runs in the main thread at the next check
                if STOP.is_set():
                    break
                time.sleep(0.005)

    with pytest.raises(Preempted, match=f"SIGTERM in epoch 3/6.*saved at {state}"):
        _fit(splits, state, callback=sigterm)
    saved = torch.load(state, weights_only=True)
    if batch == 1:
        assert saved["epoch"] == 1 and saved["partial"]["batches"] == 2
    else:
        assert saved["epoch"] == 2 and not saved["partial"]
    STOP.clear()
    capsys.readouterr()
    model, scaler, hist = _fit(splits, state)
    out = capsys.readouterr().out
    assert f"resuming tiny onehot from {state} at epoch {saved['epoch'] + 2}" in out
    _assert_same_model(model, ref)
    np.testing.assert_array_equal(
        predict(model, splits["test"], scaler)[0], predict(ref, splits["test"], ref_scaler)[0]
    )
    assert (hist.train_loss, hist.val_mae, hist.lr, hist.epoch_swa) == (
        ref_hist.train_loss,
        ref_hist.val_mae,
        ref_hist.lr,
        ref_hist.epoch_swa,
    )


def test_sigterm_outside_training_stops_at_once(stop_handler, capsys):
    def main(seconds):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(seconds)  # interrupted by the handler
        return 0

    t0 = time.perf_counter()
    assert run(main, argparse.Namespace(seconds=10)) == 143
    assert time.perf_counter() - t0 < 5
    assert capsys.readouterr().err.startswith("stopped: SIGTERM received")
    assert STOP.is_set()


def test_sigterm_subprocess_exits_143_then_resumes_to_the_same_checkpoint(tiny_data, tmp_path, capsys):
    epochs = 8
    ckpt = tmp_path / "run.pt"
    cmd = [sys.executable, str(ROOT / "tests" / "preempt_job.py"), str(tiny_data), str(ckpt), str(epochs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        for line in proc.stdout:  # not a terminal: one line per epoch
            if " epoch " in line:
                break
        proc.send_signal(signal.SIGTERM)
        t0 = time.perf_counter()
        rc = proc.wait(timeout=30)
        waited = time.perf_counter() - t0
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert rc == 143, err
    assert waited < 5
    assert err.startswith("stopped: tiny onehot: SIGTERM in epoch ") and "Traceback" not in err
    state = tiny_data / "models" / "tiny.state.pt"
    assert state.is_file() and not ckpt.exists()

    preempt_job.train(tiny_data, ckpt, epochs)  # the rerun (here in this process, also 1 thread)
    out = capsys.readouterr().out
    assert f"resuming tiny onehot from {state} at epoch " in out and f"epoch {epochs}/{epochs}" in out
    assert not state.exists()
    ref_dir, ref_path = tmp_path / "ref", tmp_path / "ref.pt"
    (ref_dir / "benchmark_data").mkdir(parents=True)
    os.symlink(tiny_data / "benchmark_data" / "tiny", ref_dir / "benchmark_data" / "tiny")
    preempt_job.train(ref_dir, ref_path, epochs)  # uninterrupted
    got, want = torch.load(ckpt, weights_only=True)["model"], torch.load(ref_path, weights_only=True)["model"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_unwritable_data_dir_is_one_error_line(tmp_path, capsys):
    import get_training_attention as gta

    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    bad = blocker / "data"  # under a regular file: cannot be created, even by root
    with pytest.raises(UsageError, match=f"cannot write to {bad} "):
        check_writable(bad)
    assert check_writable(tmp_path / "new" / "data").is_dir()
    args = gta.parse_args(["--data-dir", str(bad), "--dataset", "tiny", "--epochs", "1", "--device", "cpu"])
    assert run(gta.main, args) == 2  # before main: nothing loaded
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write to {bad} (") and err.count("\n") == 1


def test_sigterm_in_step1_saves_state_and_staged_captures(tiny_data, monkeypatch, capsys, stop_handler):
    import get_training_attention as gta

    real = AttentionRecorder.__call__

    def sigterm_at_step_2(self, event, epoch, step):
        real(self, event, epoch, step)
        if event == "step" and step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            while not STOP.is_set():
                time.sleep(0.005)

    monkeypatch.setattr(AttentionRecorder, "__call__", sigterm_at_step_2)
    args = gta.parse_args(
        [
            "--data-dir",
            str(tiny_data),
            "--dataset",
            "tiny",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--features",
            "onehot",
            "--device",
            "cpu",
        ]
    )
    assert run(gta.main, args) == 143
    err = capsys.readouterr().err
    state = tiny_data / "attention" / "tiny" / "attention.zarr.state.pt"
    assert err.startswith("stopped: tiny onehot: SIGTERM in epoch 1/2 (after batch 2/4)") and str(state) in err
    assert "captures staged in" in err and err.count("\n") == 1
    saved = torch.load(state, weights_only=True)
    assert saved["partial"]["batches"] == 2 and saved["callback"]["steps"] == [0]
    assert not (tiny_data / "models").exists()
