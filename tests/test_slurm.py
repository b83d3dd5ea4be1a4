"""The cluster path against a real one-node SLURM (tests/slurm_cluster.py), not a stand-in.

- step 4 of two tiny models with ``--scheduler slurm`` (dask-jobqueue submits the worker jobs);
- ``scancel`` of the worker job that trains one model mid-training: the training saves its state, the
  other worker job takes the job over when its own training ends and resumes it, and the outputs
  equal an uninterrupted run;
- the README's own recipe: ``sbatch --wrap "dask scheduler --scheduler-file …"`` and an
  ``sbatch --array`` of ``dask worker`` jobs, then ``--scheduler-file``.

Marked ``cluster`` (``make test-long``, run by ``.ci/run``, which installs slurm-wlm and munge). Without
SLURM or root they skip, and fail under ``CRABNET_REQUIRE_DATA=1``. Every daemon, scheduler and worker
binds 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require_data
from slurm_cluster import SlurmCluster, missing
from test_engine import (
    ROOT,
    _assert_same_outputs,
    _step4,
    _two_datasets,
    _wait_for,
    sequential_reference,  # noqa: F401  (a fixture)
)

pytestmark = pytest.mark.cluster
EPOCHS = 30  # long enough (about 15 s) for a cancelled job's training to be picked up again


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = missing()
    if why:
        require_data(f"real-SLURM test: {why}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _jobqueue_env(slurm: SlurmCluster, logs: Path) -> dict[str, str]:
    """dask-jobqueue's SLURM settings for one-core worker jobs on 127.0.0.1, logs in ``logs``."""
    return {
        **slurm.env(),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "CRABNET_STATE_EVERY_S": "0",
        "DASK_JOBQUEUE__SLURM__CORES": "1",
        "DASK_JOBQUEUE__SLURM__MEMORY": "3GB",
        "DASK_JOBQUEUE__SLURM__WALLTIME": "00:30:00",
        "DASK_JOBQUEUE__SLURM__PYTHON": sys.executable,
        "DASK_JOBQUEUE__SLURM__LOG_DIRECTORY": str(logs),
        "DASK_JOBQUEUE__SLURM__SCHEDULER_OPTIONS": "{'host': '127.0.0.1', 'dashboard_address': ':0'}",
        "DASK_JOBQUEUE__SLURM__WORKER_EXTRA_ARGS": "['--host', '127.0.0.1']",
        "DASK_JOBQUEUE__SLURM__JOB_SCRIPT_PROLOGUE": f"['export PYTHONPATH={ROOT}']",
    }


def _worker_jobs(env: dict) -> set[str]:
    """Ids of the dask-jobqueue worker jobs slurmctld knows (finished ones too, for MinJobAge seconds)."""
    out = subprocess.run(["scontrol", "-o", "show", "job"], env=env, capture_output=True, text=True).stdout
    return {ln.split()[0] for ln in out.splitlines() if "JobName=dask-worker" in ln}


def test_the_cluster_is_real_and_binds_loopback_only(slurm):
    out = subprocess.run(["srun", "hostname"], capture_output=True, text=True, env={**os.environ, **slurm.env()})
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    addresses = slurm.listening()
    assert len(addresses) >= 2 and all(a.startswith("127.0.0.1:") for a in addresses), addresses


def test_step4_through_dask_jobqueue(slurm, sequential_reference, tmp_path):  # noqa: F811
    data = _two_datasets(tmp_path / "data")
    env = _jobqueue_env(slurm, tmp_path / "logs")
    out = _step4(data, "--scheduler", "slurm", "--threads-per-job", "1", env=env, timeout=400)
    assert "slurm job(s) through dask-jobqueue" in out.stdout and "[2/2 done" in out.stdout
    logs = list((tmp_path / "logs").glob("*.out")) + list((tmp_path / "logs").glob("*.err"))
    assert logs, "no worker job wrote a log: were the jobs run by SLURM?"
    _assert_same_outputs(sequential_reference, data)


def test_scancel_of_a_worker_job_resumes_its_training(slurm, tmp_path):
    reference = _two_datasets(tmp_path / "reference")
    _step4(reference, "--scheduler", "sequential", "--threads-per-job", "1", epochs=EPOCHS)
    data, logs = _two_datasets(tmp_path / "data"), tmp_path / "logs"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **_jobqueue_env(slurm, logs)}
    cmd = [sys.executable, str(ROOT / "get_crabnet_embeddings.py"), "--data-dir", str(data), "--dataset", "tiny",
           "--dataset", "tiny2", "--features", "onehot", "--epochs", str(EPOCHS), "--device", "cpu",
           "--threads-per-job", "1", "--scheduler", "slurm"]  # fmt: skip
    before = _worker_jobs(env)
    client_log = tmp_path / "client.log"
    with open(client_log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    cancelled = None
    try:
        end = time.time() + 300
        while cancelled is None and proc.poll() is None and time.time() < end:
            for job_log in logs.glob("*.out"):  # dask-worker-<SLURM job id>.out: its training's epoch lines
                if " epoch 3/" in job_log.read_text(errors="replace"):
                    cancelled = re.search(r"-(\d+)\.out$", job_log.name).group(1)
                    subprocess.run(["scancel", cancelled], check=True, env=env)
                    break
            time.sleep(0.2)
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = client_log.read_text() + "".join(p.read_text(errors="replace") for p in sorted(logs.glob("*.*")))
    assert proc.returncode == 0 and cancelled, log[-4000:]
    assert "stops after SIGTERM" in log, log[-4000:]  # the cancelled job's training saved its state ...
    assert "resuming" in log, log[-4000:]  # ... and went on from there in another worker job
    assert len(_worker_jobs(env) - before) == 2, log[-4000:]  # no replacement job: the other worker took it over
    _assert_same_outputs(reference, data)


def test_the_readme_recipe_sbatch_scheduler_and_worker_array(slurm, sequential_reference, tmp_path):  # noqa: F811
    env = {**os.environ, **_jobqueue_env(slurm, tmp_path), "PYTHONPATH": str(ROOT)}
    sched_file = tmp_path / "dask.json"
    dask = Path(sys.executable).parent / "dask"
    submit = ["sbatch", "--parsable", f"--chdir={tmp_path}", "-c", "1", "--mem=2G"]
    jobs = []
    try:
        sched = f"{dask} scheduler --scheduler-file {sched_file} --host 127.0.0.1 --dashboard-address :0"
        jobs.append(subprocess.run([*submit, "--wrap", sched], check=True, env=env, capture_output=True, text=True))
        _wait_for(sched_file, 60)
        worker = f"{dask} worker --scheduler-file {sched_file} --nthreads 1 --host 127.0.0.1 --no-dashboard"
        array = [*submit, "--array=1-2", "--wrap", worker]
        jobs.append(subprocess.run(array, check=True, env=env, capture_output=True, text=True))
        data = _two_datasets(tmp_path / "data")
        out = _step4(data, "--scheduler-file", str(sched_file), "--threads-per-job", "1", env=env, timeout=400)
        assert "[2/2 done" in out.stdout
        _assert_same_outputs(sequential_reference, data)
    finally:
        ids = [j.stdout.strip().split(";")[0] for j in jobs]
        if ids:
            subprocess.run(["scancel", *ids], env=env, capture_output=True)
