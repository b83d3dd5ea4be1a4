"""The Dask engine (crabnet.jobs.engine): settings, the embedded LocalCluster, an external scheduler
started as separate commands, and a worker
killed during a training. Tiny datasets; each test starts real processes on 127.0.0.1."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_dataset

from crabnet.errors import JobsFailed, UsageError
from crabnet.jobs.cli import run
from crabnet.jobs.engine import Engine, Job, local_shape, run_jobs

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "get_crabnet_embeddings.py"


def _square(x: int) -> int:
    return x * x


def _fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise RuntimeError(f"job {x} broke")
    return x


def test_local_shape_fills_the_cores():
    assert local_shape(10, None, cores=2) == (2, 1)
    assert local_shape(1, None, cores=8) == (1, 8)
    assert local_shape(3, None, cores=8) == (3, 2)
    assert local_shape(10, 2, cores=8) == (4, 2)
    assert local_shape(10, 4, cores=2) == (1, 4)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(scheduler="spark"), "--scheduler must be one of"),
        (dict(scheduler_file=Path("/nonexistent/scheduler.json")), "does not exist"),
        (dict(threads_per_job=0), "--threads-per-job"),
        (dict(jobs_per_gpu=0), "--jobs-per-gpu"),
        (dict(retries=-1), "--retries"),
    ],
)
def test_bad_settings_one_clear_error(kw, msg):
    with pytest.raises(UsageError, match=msg):
        Engine(**kw)


def test_sequential_runs_in_order_and_gathers_failures(capsys):
    jobs = [Job(f"j{i}", _fail_on, {"x": i, "bad": 1}) for i in range(3)]
    with pytest.raises(JobsFailed, match="1 of 3 job") as err:
        run_jobs(jobs, Engine(scheduler="sequential"))
    assert err.value.failures[0][0] == "j1" and "job 1 broke" in err.value.failures[0][1]
    assert jobs[2].result == 2  # the job after the failed one still ran
    done = [Job("a", _square, {"x": 3}, result=99), Job("b", _square, {"x": 4})]
    assert run_jobs(done, Engine(scheduler="sequential")) == [99, 16]  # a done job is not run again
    assert "1 of 2 jobs up to date" in capsys.readouterr().out


@pytest.mark.ci  # waits out the connection timeout (20 s)
def test_unreachable_scheduler_is_one_clear_error():
    with socket.socket() as s:  # a free port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UsageError, match="cannot reach the Dask scheduler"):
        run_jobs(
            [Job("a", _square, {"x": 2}), Job("b", _square, {"x": 3})], Engine(scheduler=f"tcp://127.0.0.1:{port}")
        )


def _two_datasets(root: Path) -> Path:
    write_dataset(root, "tiny", sizes=(48, 16, 16), seed=0)
    write_dataset(root, "tiny2", sizes=(40, 16, 16), seed=1)
    return root


def _step4(
    data_dir: Path, *extra: str, epochs: int = 2, env: dict | None = None, timeout: float = 240, check: bool = True
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--data-dir",
        str(data_dir),
        "--dataset",
        "tiny",
        "--dataset",
        "tiny2",
        "--features",
        "onehot",
        "--epochs",
        str(epochs),
        "--device",
        "cpu",
        *extra,
    ]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _assert_same_outputs(a: Path, b: Path) -> None:
    for ds in ("tiny", "tiny2"):
        wa = torch.load(a / "models" / f"{ds}__onehot.pt", weights_only=True)["model"]
        wb = torch.load(b / "models" / f"{ds}__onehot.pt", weights_only=True)["model"]
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), ds
        pa, pb = (d / "predictions" / f"{ds}__onehot__test.csv" for d in (a, b))
        assert pa.read_bytes() == pb.read_bytes(), ds
        qa, qb = (d / "embeddings" / "onehot" / f"{ds}__layer2__V.csv" for d in (a, b))
        assert qa.read_bytes() == qb.read_bytes(), ds


@pytest.fixture(scope="module")
def sequential_reference(tmp_path_factory) -> Path:
    """Step 4 on two tiny datasets, one after the other in one process with one thread per job."""
    root = _two_datasets(tmp_path_factory.mktemp("sequential"))
    _step4(root, "--scheduler", "sequential", "--threads-per-job", "1")
    return root


@pytest.mark.cluster
def test_local_cluster_equals_sequential(sequential_reference, tmp_path):
    _two_datasets(tmp_path)
    out = _step4(tmp_path, "--threads-per-job", "1")  # default scheduler: an embedded LocalCluster
    assert "LocalCluster: 2 worker process(es)" in out.stdout
    assert "[2/2 done, 0 running, 0 failed" in out.stdout and "test MAE" in out.stdout
    _assert_same_outputs(sequential_reference, tmp_path)
    again = _step4(tmp_path)  # everything up to date: nothing scheduled
    assert "2 of 2 models up to date, not scheduled" in again.stdout and "LocalCluster" not in again.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(path: Path, seconds: float = 60) -> None:
    end = time.time() + seconds
    while not path.exists():
        if time.time() > end:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.2)


@pytest.mark.cluster
def test_external_scheduler_and_workers(sequential_reference, tmp_path):
    """`dask scheduler` and two `dask worker` processes started as separate commands on 127.0.0.1."""
    port = _free_port()
    sched_file = tmp_path / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dask = [sys.executable, "-m", "distributed.cli"]
    procs = [
        subprocess.Popen(
            [
                *dask[:2],
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dashboard-address",
                ":0",
                "--scheduler-file",
                str(sched_file),
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        _wait_for(sched_file)
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        *dask[:2],
                        "distributed.cli.dask_worker",
                        f"tcp://127.0.0.1:{port}",
                        "--nthreads",
                        "1",
                        "--host",
                        "127.0.0.1",
                        "--no-dashboard",
                    ],
                    env=env,
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        by_address = tmp_path / "by_address"
        _two_datasets(by_address)
        out = _step4(by_address, "--scheduler", f"tcp://127.0.0.1:{port}", "--threads-per-job", "1")
        assert f"Dask scheduler at tcp://127.0.0.1:{port}" in out.stdout
        _assert_same_outputs(sequential_reference, by_address)
        by_file = tmp_path / "by_file"
        _two_datasets(by_file)
        out = _step4(by_file, "--scheduler-file", str(sched_file), "--threads-per-job", "1")
        assert "[2/2 done" in out.stdout
        _assert_same_outputs(sequential_reference, by_file)
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_missing_jobqueue_settings_is_one_clear_error(tiny_data, capsys, monkeypatch):
    monkeypatch.delenv("DASK_JOBQUEUE__PBS__CORES", raising=False)
    import get_crabnet_embeddings as gce

    write_dataset(tiny_data, "tiny2", sizes=(40, 16, 16), seed=1)
    rc = run(
        gce.main,
        argparse.Namespace(
            data_dir=tiny_data,
            dataset=["tiny", "tiny2"],
            device="cpu",
            seed=0,
            quick=False,
            force=False,
            features=["onehot"],
            epochs=1,
            epochs_step=1,
            scheduler="pbs",
        ),
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --scheduler pbs") and "jobqueue" in err


@pytest.mark.cluster
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_worker_job_resumes(tmp_path, sig):
    """SIGKILL (a dead node) or SIGTERM (preemption: the training saves first) to one LocalCluster worker
    during a training: Dask runs the job again, it resumes from its state file and the outputs equal
    an uninterrupted run."""
    import psutil

    reference = _two_datasets(tmp_path / "reference")
    _step4(reference, "--scheduler", "sequential", "--threads-per-job", "1", epochs=12)
    data = _two_datasets(tmp_path / "killed")
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--data-dir",
        str(data),
        "--dataset",
        "tiny",
        "--dataset",
        "tiny2",
        "--features",
        "onehot",
        "--epochs",
        "12",
        "--device",
        "cpu",
        "--threads-per-job",
        "1",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "CRABNET_STATE_EVERY_S": "0"},
    )
    lines, killed = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if killed is None and " epoch 3/" in line:
                workers = [
                    c
                    for c in psutil.Process(proc.pid).children(recursive=True)
                    if "spawn_main" in " ".join(c.cmdline())
                ]  # not the resource tracker
                assert workers, "no worker process found"
                killed = workers[0].pid
                os.kill(killed, sig)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines)
    assert rc == 0, log[-4000:]
    assert killed is not None and "resuming" in log, log[-4000:]
    _assert_same_outputs(reference, data)
