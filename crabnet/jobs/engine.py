"""Where the independent jobs of a step run: this process, an embedded Dask ``LocalCluster``, an
existing Dask cluster, or a SLURM/PBS/… queue through ``dask-jobqueue`` (one engine: Dask distributed).

Every script with several independent jobs (models of step 4, datasets of step 8, …) builds a
list of :class:`Job` and calls :func:`run_jobs` with the ``--scheduler`` flags of
:func:`add_engine_args`:

- default (``--scheduler local``): in this process when there is one job or one core, otherwise on
  an embedded ``distributed.LocalCluster`` of min(jobs, cores / threads per job) worker processes
  with one task each;
- ``--scheduler tcp://HOST:PORT`` or ``--scheduler-file PATH``: an existing Dask cluster (on a
  cluster: ``dask scheduler --scheduler-file F`` in one job, ``srun dask worker --scheduler-file F``
  in others);
- ``--scheduler slurm|pbs|sge|lsf|htcondor|moab|oar``: a ``dask_jobqueue`` cluster configured
  through Dask's own configuration (``~/.config/dask/jobqueue.yaml`` or ``DASK_JOBQUEUE__SLURM__…``
  variables: cores, memory, queue, walltime, …), scaled to the number of jobs;
- ``--scheduler sequential``: always in this process, one job after the other.

A job asks for a GPU through the Dask worker resource ``GPU`` (1 per job): start GPU workers with
``dask worker --resources GPU=K`` to let K trainings share one GPU; the embedded cluster does this
itself with ``--jobs-per-gpu K`` workers.

Jobs write their outputs under ``--data-dir`` (a shared filesystem on a cluster) with atomic
writes; a job whose outputs are up to date comes with its result already set and is not scheduled.
A task whose worker dies is run again by Dask (it resumes from its ``.state.pt``); one that raises
is retried ``--retries`` times; the failures are reported together after the other jobs finished.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crabnet.errors import JobsFailed, UsageError
from crabnet.progress import duration, say
from crabnet.utils import available_cpus

PLAN_LOG_ENV = "CRABNET_PLAN_LOG"  # --plan appends its totals here (make paper-plan)
JOBQUEUE = {
    "slurm": "SLURMCluster",
    "pbs": "PBSCluster",
    "sge": "SGECluster",
    "lsf": "LSFCluster",
    "htcondor": "HTCondorCluster",
    "moab": "MoabCluster",
    "oar": "OARCluster",
}
SCHEDULERS = ("local", "sequential", *JOBQUEUE)
CONNECT_TIMEOUT_S = 20


@dataclass
class Job:
    """One independent piece of work of a step.

    Attributes:
        name: unique, human-readable (e.g. ``"mp_bulk_modulus onehot"``).
        fn: a module-level function (workers import it by name); returns a small picklable result.
        kwargs: its keyword arguments (paths, names, numbers: small and picklable).
        cost_s: estimated seconds on one CPU core, or on one GPU for a ``gpu`` job (for ``--plan``; 0 = unknown).
        gpu: whether the job trains on a GPU (asks for the worker resource ``GPU``).
        result: set when the outputs are already up to date: the job is not scheduled.
    """

    name: str
    fn: Callable[..., Any]
    kwargs: dict = field(default_factory=dict)
    cost_s: float = 0.0
    gpu: bool = False
    result: Any = None

    @property
    def done(self) -> bool:
        return self.result is not None


@dataclass
class Engine:
    """The ``--scheduler`` settings of a script (see :func:`add_engine_args`)."""

    scheduler: str = "local"
    scheduler_file: Path | None = None
    threads_per_job: int | None = None
    jobs_per_gpu: int = 1
    retries: int = 2
    plan: bool = False  # print the jobs and their estimated cost instead of running them

    def __post_init__(self) -> None:
        check_engine(self)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add --scheduler, --scheduler-file, --threads-per-job, --jobs-per-gpu and --retries."""
    g = parser.add_argument_group("where the jobs run (Dask; see docs in crabnet/jobs/engine.py and the README)")
    g.add_argument(
        "--scheduler",
        default=None,
        metavar="WHERE",
        help="local = this machine (one process for one job, else an embedded Dask LocalCluster); "
        "sequential = this process, one job after the other; tcp://HOST:PORT = an existing Dask "
        f"scheduler; {'|'.join(JOBQUEUE)} = a dask-jobqueue cluster configured in Dask's "
        "jobqueue.yaml or DASK_JOBQUEUE__… variables (default: local; sequential for the small jobs of "
        "--quick)",
    )
    g.add_argument(
        "--scheduler-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="connect to the Dask scheduler that wrote this file (dask scheduler --scheduler-file PATH)",
    )
    g.add_argument(
        "--threads-per-job",
        type=int,
        default=None,
        metavar="N",
        help="torch/BLAS/numba threads of each job (default: cores / jobs running at once on that "
        "machine; a run is bit for bit the same for the same N)",
    )
    g.add_argument(
        "--jobs-per-gpu",
        type=int,
        default=1,
        metavar="K",
        help="trainings sharing one GPU at once (the embedded cluster; external workers: "
        "dask worker --resources GPU=K)",
    )
    g.add_argument(
        "--retries",
        type=int,
        default=2,
        help="retries of a job that raised (a job whose worker died is always rescheduled by Dask)",
    )
    g.add_argument(
        "--plan",
        action="store_true",
        help="print every job with its estimated cost (from rates measured on this machine) and what "
        "is already done; run nothing",
    )


def engine_from_args(args: dict, *, small: bool = False, keep_threads: bool = False) -> Engine:
    """Pop the engine flags of :func:`add_engine_args` from a ``vars(args)`` dict into an :class:`Engine`.

    ``small``: the jobs take seconds (a ``--quick`` demo): without ``--scheduler`` they then run in
    this process, since starting worker processes (and compiling numba code in each) costs more.
    ``keep_threads``: a job run on this machine (``local`` or ``sequential``) keeps torch's thread count
    unless ``--threads-per-job`` is given (step 1's one training); elsewhere the workers' count applies
    (under torchrun: cores / ranks, :func:`crabnet.jobs.distributed.threads_per_rank`).
    """
    scheduler = args.pop("scheduler", None)
    if scheduler is None:  # not given: local, or this process for small jobs
        scheduler = "sequential" if small else "local"
    threads = args.pop("threads_per_job", None)
    scheduler_file = args.pop("scheduler_file", None)
    here = scheduler_file is None and scheduler in ("local", "sequential")
    if keep_threads and threads is None and here and not _under_torchrun(False):
        import torch

        threads = torch.get_num_threads()
    return Engine(
        scheduler=scheduler,
        scheduler_file=scheduler_file,
        threads_per_job=threads,
        jobs_per_gpu=args.pop("jobs_per_gpu", 1),
        retries=args.pop("retries", 2),
        plan=args.pop("plan", False),
    )


def check_engine(engine: Engine) -> None:
    """One clear error per bad setting (before any work starts)."""
    s = engine.scheduler
    if engine.scheduler_file is None and s not in SCHEDULERS and "://" not in s:
        raise UsageError(
            f"--scheduler must be one of {', '.join(SCHEDULERS)} or a scheduler address such as "
            f"tcp://127.0.0.1:8786, got {s!r}"
        )
    if engine.scheduler_file is not None and s not in ("local", ""):
        raise UsageError("give either --scheduler or --scheduler-file, not both")
    if engine.scheduler_file is not None and not Path(engine.scheduler_file).is_file():
        raise UsageError(
            f"--scheduler-file {engine.scheduler_file} does not exist (start the scheduler with "
            "dask scheduler --scheduler-file PATH first)"
        )
    if engine.threads_per_job is not None and engine.threads_per_job < 1:
        raise UsageError(f"--threads-per-job must be >= 1, got {engine.threads_per_job}")
    if engine.jobs_per_gpu < 1:
        raise UsageError(f"--jobs-per-gpu must be >= 1, got {engine.jobs_per_gpu}")
    if engine.retries < 0:
        raise UsageError(f"--retries must be >= 0, got {engine.retries}")
    if s in JOBQUEUE:
        try:
            import dask_jobqueue  # noqa: F401
        except ImportError as err:
            raise UsageError(f"--scheduler {s} needs dask-jobqueue (pip install dask-jobqueue): {err}") from None


def local_shape(n_jobs: int, threads_per_job: int | None, cores: int | None = None) -> tuple[int, int]:
    """(worker processes, threads per job) on this machine: workers x threads = cores where possible."""
    cores = cores or available_cpus()
    if threads_per_job is None:
        workers = max(1, min(n_jobs, cores))
        return workers, max(1, cores // workers)
    return max(1, min(n_jobs, cores // threads_per_job)), threads_per_job


def run_jobs(
    jobs: list[Job],
    engine: Engine | None = None,
    *,
    what: str = "jobs",
    on_result: Callable[[Job, Any], None] | None = None,
) -> list[Any] | None:
    """Run the jobs that are not done where ``engine`` says; return every job's result in order
    (None with ``engine.plan``: the plan is printed and nothing runs).

    ``on_result(job, result)``, when given, is called in this process as each job finishes (not for
    jobs already done or failed), e.g. to save the results of a long run as they come.

    Raises:
        JobsFailed: after all other jobs finished, if any job failed for good.
        UsageError: the scheduler cannot be reached or set up; or the single job failed with one.
    """
    engine = engine or Engine()
    if engine.plan:
        print_plan(jobs, what)
        return None
    todo = [j for j in jobs if not j.done]
    if len(jobs) > len(todo):
        say(f"{len(jobs) - len(todo)} of {len(jobs)} {what} up to date, not scheduled")
    remote = engine.scheduler_file is not None or engine.scheduler not in ("local", "sequential")
    if todo and _under_torchrun(remote):
        _run_ranks(todo, engine.threads_per_job, what, on_result)
    elif todo:
        workers, _ = local_shape(len(todo), engine.threads_per_job)
        if not remote and (
            engine.scheduler == "sequential" or workers == 1 and not any(j.gpu for j in todo) or len(todo) == 1
        ):
            threads = engine.threads_per_job or available_cpus()
            say(f"running {len(todo)} {what} in this process, {threads} thread(s) each")
            _run_here(todo, threads, on_result)
        else:
            with _client(engine, todo) as client:
                _run_dask(client, todo, engine, what, on_result)
    return [j.result for j in jobs]


def print_plan(jobs: list[Job], what: str = "jobs") -> None:
    """One line per job (done or to run, estimated hours) and the totals, for ``--plan``."""
    say(f"{'job':<44} {'state':<8} {'estimate':>12}")
    for j in jobs:
        est = "-" if j.done else (f"{j.cost_s / 3600:8.2f} {'GPU' if j.gpu else 'core'}-h" if j.cost_s else "unknown")
        say(f"{j.name:<44} {'done' if j.done else 'to run':<8} {est:>12}")
    todo = [j for j in jobs if not j.done]
    cpu = sum(j.cost_s for j in todo if not j.gpu)
    gpu = sum(j.cost_s for j in todo if j.gpu)
    cores = available_cpus()
    longest = max((j.cost_s for j in todo), default=0.0)
    say(
        f"total: {len(jobs)} {what}, {len(jobs) - len(todo)} done, {len(todo)} to run: "
        + (
            f"{cpu / 3600:.2f} core-hours (about {duration(max(cpu / cores, longest))} on this machine's {cores} "
            f"core(s); the longest job {duration(longest)})"
            if cpu or not gpu
            else ""
        )
        + (f"{gpu / 3600:.2f} GPU-hours" if gpu else "")
    )
    log = os.environ.get(PLAN_LOG_ENV)
    if log:  # make paper-plan adds the steps up (python -m crabnet.jobs.engine --plan-total LOG)
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(
                json.dumps(
                    {
                        "step": Path(sys.argv[0]).name,
                        "what": what,
                        "jobs": len(jobs),
                        "to_run": len(todo),
                        "core_s": cpu,
                        "gpu_s": gpu,
                        "longest_s": longest,
                    }
                )
                + "\n"
            )


def plan_total(log: Path) -> str:
    """The totals over the steps that ``--plan`` wrote to ``log`` (``$CRABNET_PLAN_LOG``), as text."""
    rows = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
    cpu, gpu = sum(r["core_s"] for r in rows), sum(r["gpu_s"] for r in rows)
    cores, longest = available_cpus(), max((r["longest_s"] for r in rows), default=0.0)
    lines = [
        f"{r['step']:<30} {r['to_run']:>4} of {r['jobs']:>4} {r['what']:<14} to run "
        f"{r['core_s'] / 3600:9.2f} core-h {r['gpu_s'] / 3600:7.2f} GPU-h"
        for r in rows
    ]
    lines.append(
        f"the paper: {sum(r['to_run'] for r in rows)} jobs to run, {cpu / 3600:.1f} core-hours"
        + (f" and {gpu / 3600:.1f} GPU-hours" if gpu else "")
        + f"; on this machine ({cores} cores, one job per core) about "
        f"{max(cpu / cores, longest) / 3600:.1f} h; "
        f"on N such machines about max({cpu / cores / 3600:.1f} h / N, {longest / 3600:.1f} h for the longest "
        "job); steps 2 and 5 (minutes) are not counted"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# running one job (here or on a worker)


def call_job(fn: Callable[..., Any], kwargs: dict, threads: int | None) -> dict:
    """Run ``fn(**kwargs)`` with ``threads`` torch/BLAS/numba threads (None: this machine's cores
    divided by the worker's task slots). Returns ``{"result", "seconds", "host", "pid"}``."""
    from crabnet.jobs.signals import Preempted

    if threads is None:
        threads = max(1, available_cpus() // _worker_slots())
    if _worker_slots(default=0):
        plain_allocator()
    t0 = time.perf_counter()
    try:
        with limit_threads(threads):
            result = fn(**kwargs)
    except Preempted:
        if _worker_slots(default=0):  # on a Dask worker asked to stop: the state is saved, now end as SIGTERM would
            _end_worker_process()
        raise
    return {"result": result, "seconds": time.perf_counter() - t0, "host": socket.gethostname(), "pid": os.getpid()}


MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its adaptive mmap threshold on 64-bit machines


def plain_allocator() -> bool:
    """Give this process glibc's allocator behaviour of a plain process, where a Dask nanny took it away.

    The nanny of a Dask worker (started by dask-jobqueue or by hand with ``dask worker``) sets
    ``MALLOC_TRIM_THRESHOLD_=65536``, which turns off glibc's adaptive mmap threshold: every tensor
    buffer above 128 KiB is then mapped and unmapped anew, and a one-thread training ran 1.55x as long
    per epoch as in a plain process. The adaptive threshold of a plain process grows to the size of the
    buffers it frees (at most 32 MiB) with a trim threshold of twice that; this sets those values. Only
    where the variable is set, on glibc (elsewhere a no-op). Returns whether it changed anything.
    """
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, 2 * MMAP_THRESHOLD))


def _worker_slots(default: int = 1) -> int:
    """Tasks the Dask worker running this may run at once (``default`` outside a worker)."""
    try:
        from distributed import get_worker

        return max(1, get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return default


def _end_worker_process() -> None:
    """End this worker process as SIGTERM would have (its training state is saved): Dask sees the worker
    gone and runs its job again elsewhere, where it resumes. Called from the task's thread, where no
    signal handler can be changed, so the process exits directly."""
    from crabnet.jobs.signals import EXIT_CODE

    say(f"worker {os.getpid()} on {socket.gethostname()} stops after SIGTERM; its job will resume elsewhere")
    sys.stderr.flush()
    os._exit(EXIT_CODE)


def _save_on_sigterm() -> Any:
    """A Dask worker plugin: SIGTERM to a worker process (SLURM preemption, the walltime, scancel) only
    sets ``crabnet.jobs.signals.STOP``; a training saves its state and its job ends the process (see
    :func:`call_job`), so that Dask reruns the job elsewhere and it resumes instead of restarting."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class SaveOnSigterm(WorkerPlugin):
        name = "crabnet-save-on-sigterm"

        def setup(self, worker) -> None:  # runs in the worker's main thread
            from crabnet.jobs.signals import install_stop_handler

            install_stop_handler(interrupt=False)

    return SaveOnSigterm()


@contextlib.contextmanager
def limit_threads(threads: int) -> Iterator[None]:
    """Torch intra-op threads, BLAS/OpenMP pools (threadpoolctl) and numba threads, restored after.

    Torch and numba are set only when already imported (a job's module that uses them imports them
    at its top, which unpickling the job's function does first): a job without torch does not pay
    for its import.
    """
    torch = sys.modules.get("torch")
    before = None
    if torch is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
    numba_before = None
    if "numba" in sys.modules:
        import numba

        numba_before = numba.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(threads):
            yield
    finally:
        if before is not None:
            torch.set_num_threads(before)
        if numba_before is not None:
            import numba

            numba.set_num_threads(numba_before)


def _run_here(jobs: list[Job], threads: int, on_result: Callable[[Job, Any], None] | None = None) -> None:
    """One after the other in this process, setting each job's result; failures reported together at the end."""
    from crabnet.jobs.signals import Preempted

    failures: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    t0 = time.perf_counter()
    for i, job in enumerate(jobs):
        try:
            out = call_job(job.fn, job.kwargs, threads)
        except Preempted:
            raise
        except Exception as err:
            failures.append((job.name, _error_text(err)))
            errors.append(err)
            continue
        job.result = out["result"]
        if on_result is not None:
            on_result(job, job.result)
        if len(jobs) > 1:
            _progress_line(
                i + 1 - len(failures), len(jobs), 0, len(failures), job.name, out["seconds"], time.perf_counter() - t0
            )
    if len(errors) == 1 and len(jobs) == 1 and isinstance(errors[0], UsageError):
        raise errors[0]
    if failures:
        raise JobsFailed(failures, len(jobs))


def _under_torchrun(remote: bool) -> bool:
    """Whether this process is one of several torchrun ranks (:mod:`crabnet.jobs.distributed`).

    Raises:
        UsageError: it is, and ``--scheduler`` names a Dask cluster (the two do not mix).
    """
    if os.environ.get("WORLD_SIZE", "").strip() in ("", "0", "1"):  # no torchrun ranks (and no torch import)
        return False
    from crabnet.jobs import distributed

    if not distributed.requested():
        return False
    if remote:
        raise UsageError("under torchrun the jobs run in the ranks themselves; leave out --scheduler/--scheduler-file")
    return True


def _run_ranks(
    jobs: list[Job], threads: int | None, what: str, on_result: Callable[[Job, Any], None] | None = None
) -> None:
    """Under torchrun: every rank runs every job, one after the other, in this process (each training is
    one model trained by all ranks together), with cores / ranks threads (or ``--threads-per-job``).

    A failure is raised at once, not collected: the other ranks would wait for this one in the next
    collective, so torchrun must end them all.
    """
    from crabnet.jobs import distributed

    threads = threads or distributed.threads_per_rank()
    if distributed.is_main():
        say(
            f"running {len(jobs)} {what} on {distributed.world_size()} torchrun ranks together, "
            f"{threads} thread(s) per rank"
        )
    for job in jobs:
        job.result = call_job(job.fn, job.kwargs, threads)["result"]
        if on_result is not None:
            on_result(job, job.result)


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _progress_line(done: int, total: int, running: int, failed: int, name: str, seconds: float, elapsed: float) -> None:
    """One plain line per finished job: counts, its time and an ETA over the jobs left."""
    left = total - done - failed
    eta = elapsed / max(done + failed, 1) * left if left else 0.0
    say(f"[{done}/{total} done, {running} running, {failed} failed, ETA {duration(eta)}] {name} ({duration(seconds)})")


# ---------------------------------------------------------------------------------------------
# Dask


@contextlib.contextmanager
def _client(engine: Engine, jobs: list[Job]) -> Iterator[Any]:
    """A ``distributed.Client`` for ``engine``, with the cluster it started closed afterwards."""
    try:
        from distributed import Client
    except ImportError as err:  # a dependency of the project; only a broken install lands here
        raise UsageError(f"the Dask engine needs 'distributed' (pip install distributed): {err}") from None
    cluster = None
    try:
        if engine.scheduler_file is not None:
            client = _connect(
                lambda: Client(scheduler_file=str(engine.scheduler_file), timeout=CONNECT_TIMEOUT_S),
                f"the scheduler of {engine.scheduler_file}",
            )
        elif "://" in engine.scheduler:
            client = _connect(lambda: Client(engine.scheduler, timeout=CONNECT_TIMEOUT_S), engine.scheduler)
        elif engine.scheduler in JOBQUEUE:
            cluster = _jobqueue_cluster(engine.scheduler, len(jobs))
            client = Client(cluster)
        else:
            cluster = _local_cluster(engine, jobs)
            client = Client(cluster)
        with client:
            try:
                client.register_plugin(_save_on_sigterm())
            except Exception as err:
                say(f"note: workers will not save training state on SIGTERM ({err})")
            yield client
    finally:
        if cluster is not None:
            cluster.close()


def _connect(make: Callable[[], Any], where: str) -> Any:
    try:
        return make()
    except (OSError, TimeoutError) as err:
        raise UsageError(f"cannot reach the Dask scheduler at {where} within {CONNECT_TIMEOUT_S} s: {err}") from None


def _local_cluster(engine: Engine, jobs: list[Job]) -> Any:
    """An embedded LocalCluster: one task per worker process; GPU jobs share the GPU K at a time."""
    workers, threads = local_shape(len(jobs), engine.threads_per_job)
    resources = None
    if any(j.gpu for j in jobs):
        workers, resources = engine.jobs_per_gpu, {"GPU": 1}
    say(f"starting a Dask LocalCluster: {workers} worker process(es) x 1 job, {threads} thread(s) per job")
    return local_cluster(workers, threads, resources)


def local_cluster(workers: int, threads: int, resources: dict | None = None) -> Any:
    """A ``distributed.LocalCluster`` on 127.0.0.1 of ``workers`` processes that run one task each with
    ``threads`` threads.

    Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in its workers by default, which turns off
    glibc's adaptive mmap threshold: every tensor buffer above 128 KiB is then mapped and unmapped
    anew, and a one-thread training ran 1.5x slower in a worker than in a plain process (7.4 against
    4.9 s/epoch, measured). The workers here keep glibc's default, as a plain process does.
    """
    import dask
    from distributed import LocalCluster

    env = {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")}
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",
            resources=resources,
            env=env,
            silence_logs=40,
        )


def _jobqueue_cluster(name: str, n_jobs: int) -> Any:
    """A dask-jobqueue cluster of kind ``name`` from Dask's configuration, scaled to ``n_jobs`` workers."""
    import dask_jobqueue

    cls = getattr(dask_jobqueue, JOBQUEUE[name])
    try:
        cluster = cls()
    except ValueError as err:  # e.g. cores or memory not configured
        raise UsageError(
            f"--scheduler {name}: dask-jobqueue needs its settings ({err}); set them in "
            f"~/.config/dask/jobqueue.yaml (jobqueue: {name}: cores, memory, …) or as "
            f"DASK_JOBQUEUE__{name.upper()}__CORES=… variables"
        ) from None
    say(f"submitting {n_jobs} {name} job(s) through dask-jobqueue ({JOBQUEUE[name]})")
    # a worker job cancelled or preempted by the queue is not replaced (dask-jobqueue keeps it in its plan):
    # its training resumes from its state file on the next worker that frees up (docs/scaling.md)
    cluster.scale(jobs=n_jobs)
    return cluster


def _run_dask(
    client: Any, jobs: list[Job], engine: Engine, what: str, on_result: Callable[[Job, Any], None] | None = None
) -> None:
    """Submit the jobs, print one line per finished job, set each job's result."""
    from distributed import as_completed

    threads = engine.threads_per_job
    if threads is None and engine.scheduler == "local" and engine.scheduler_file is None:
        threads = local_shape(len(jobs), None)[1]
    tag = uuid.uuid4().hex[:8]
    futures = []
    group = "".join(c if c.isalnum() else "_" for c in what)  # one Dask task group, so that Dask queues them
    for i, job in enumerate(jobs):
        resources = {"GPU": 1} if job.gpu else None
        futures.append(
            client.submit(
                call_job,
                job.fn,
                job.kwargs,
                threads,
                key=f"{group}-{tag}-{i}",
                pure=False,
                retries=engine.retries,
                resources=resources,
            )
        )
    index = {f.key: i for i, f in enumerate(futures)}
    say(f"submitted {len(jobs)} {what} to the Dask scheduler at {client.scheduler.address}")
    failures: list[tuple[str, str]] = []
    done, t0 = 0, time.perf_counter()
    for fut in as_completed(futures):
        i = index[fut.key]
        if fut.status == "error":
            err = fut.exception()
            tb = "".join(traceback.format_tb(fut.traceback())) if fut.traceback() is not None else ""
            say(f"job {jobs[i].name} failed: {_error_text(err)}\n{tb}", file=sys.stderr)
            failures.append((jobs[i].name, _error_text(err)))
        else:
            out = fut.result()
            jobs[i].result = out["result"]
            done += 1
            if on_result is not None:
                on_result(jobs[i], jobs[i].result)
        running = _running(client, futures)
        _progress_line(
            done,
            len(jobs),
            running,
            len(failures),
            jobs[i].name,
            0.0 if fut.status == "error" else out["seconds"],
            time.perf_counter() - t0,
        )
    if failures:
        raise JobsFailed(failures, len(jobs))


def _running(client: Any, futures: list[Any]) -> int:
    """How many of ``futures`` a worker is processing now."""
    keys = {f.key for f in futures if f.status == "pending"}
    try:
        return sum(1 for tasks in client.processing().values() for k in tasks if k in keys)
    except Exception:
        return 0


if __name__ == "__main__":  # python -m crabnet.jobs.engine --plan-total LOG (make paper-plan)
    _p = argparse.ArgumentParser(description="Totals of the --plan runs logged to LOG.")
    _p.add_argument("--plan-total", type=Path, required=True, metavar="LOG")
    say(plan_total(_p.parse_args().plan_total))
