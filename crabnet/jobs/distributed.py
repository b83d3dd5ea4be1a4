"""One training spread over several processes (``torchrun``): the process group and its few collectives.

``torchrun --nproc_per_node N script.py …`` starts N copies of a script with the environment variables
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``.
When ``WORLD_SIZE`` > 1, :func:`init` joins the process group they describe (backend ``gloo`` on the
CPU, ``nccl`` on CUDA, chosen from the training device); ``crabnet.training.loop.fit`` then trains one model
together: every rank runs its share of each global batch, DDP averages the gradients, and the
validation MAE of the SWA rule is summed over the ranks, so every rank takes the same decisions.
Rank 0 alone writes files (:func:`is_main`). Without torchrun, or with ``WORLD_SIZE=1``, nothing here
creates a process group and every helper is a no-op, so a plain run is exactly what it was.

Only public ``torch.distributed`` APIs are used. See ``docs/distributed.md`` for how to launch.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from crabnet.errors import UsageError
from crabnet.utils import available_cpus

TIMEOUT_ENV = "CRABNET_DIST_TIMEOUT_S"  # seconds a rank waits in a collective (default 3600)
DEFAULT_TIMEOUT_S = 3600.0  # rank 0 captures attention while the others wait: longer than torch's 30 min

_saved_stdout: list[Any] = []  # the stdout that init() replaced on ranks other than 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError:
        raise UsageError(f"${name} must be an integer, got {raw!r}") from None


def requested() -> bool:
    """Whether this process was started as one of several ranks (``WORLD_SIZE`` > 1, e.g. by torchrun)."""
    return _env_int("WORLD_SIZE", 1) > 1


def active() -> bool:
    """Whether a process group of more than one rank is up (after :func:`init`)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group or torchrun)."""
    if active():
        return dist.get_rank()
    return _env_int("RANK", 0) if requested() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group or torchrun)."""
    if active():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1) if requested() else 1


def local_rank() -> int:
    """Rank on this machine (``LOCAL_RANK``; 0 without torchrun)."""
    return _env_int("LOCAL_RANK", 0) if requested() else 0


def local_world_size() -> int:
    """Ranks on this machine (``LOCAL_WORLD_SIZE``, else all of them; 1 without torchrun)."""
    return max(1, _env_int("LOCAL_WORLD_SIZE", world_size())) if requested() else 1


def is_main() -> bool:
    """Whether this process writes files and prints: rank 0, or the only process. Valid before :func:`init`."""
    return rank() == 0


def threads_per_rank() -> int:
    """Torch threads of each rank: this machine's cores divided by its ranks (at least 1)."""
    return max(1, available_cpus() // local_world_size())


def backend_for(device: torch.device | str) -> str:
    """``nccl`` for a CUDA device, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_device(device: torch.device | str) -> torch.device:
    """The device of this rank: ``cuda`` without an index becomes ``cuda:LOCAL_RANK`` under torchrun
    (modulo the GPUs this process sees: where each rank is given only its own GPU, that is ``cuda:0``)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and requested():
        return torch.device("cuda", local_rank() % max(1, torch.cuda.device_count()))
    return device


def init(device: torch.device | str = "cpu") -> torch.device:
    """Join the process group torchrun describes, once (a no-op when ``WORLD_SIZE`` <= 1).

    The backend follows ``device`` (:func:`backend_for`); on CUDA the rank's GPU becomes the current
    device. Ranks other than 0 print nothing to stdout from then on (their stderr is kept). The group
    is destroyed at exit (:func:`cleanup`).

    Returns:
        The device this rank trains on (:func:`rank_device`).

    Raises:
        UsageError: the rendezvous variables are missing, or the group is already up with the
            backend of another device type.
    """
    device = rank_device(device)
    if not requested():
        return device
    backend = backend_for(device)
    if dist.is_initialized():
        if dist.get_backend() != backend:
            raise UsageError(
                f"the process group uses {dist.get_backend()}, but this training runs on {device} "
                f"(needs {backend}); train every model of one torchrun on the same kind of device"
            )
        return device
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing or not dist.is_available():
        raise UsageError(
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but {', '.join(missing) or 'torch.distributed'} "
            "is missing; start the script with torchrun (docs/distributed.md)"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "").strip() or DEFAULT_TIMEOUT_S))
    except ValueError:
        raise UsageError(f"${TIMEOUT_ENV} must be a number of seconds, got {os.environ[TIMEOUT_ENV]!r}") from None
    dist.init_process_group(backend=backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    atexit.register(cleanup)
    if not is_main():
        _saved_stdout.append(sys.stdout)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - closed by cleanup()
    return device


def cleanup() -> None:
    """Destroy the process group (if any) and give back the stdout :func:`init` silenced."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if _saved_stdout:
        quiet, sys.stdout = sys.stdout, _saved_stdout.pop()
        quiet.close()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if active():
        dist.barrier()


def _collective_device() -> torch.device:
    """Where the tensors of a collective live: the current GPU for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``values`` combined over the ranks (``op`` "sum", "max" or "min"), as a new tensor on ``values``' device.

    Without a process group: ``values`` itself.
    """
    if not active():
        return values
    out = values.detach().to(_collective_device(), copy=True)
    dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return out.to(values.device)


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (``flag`` itself without a process group)."""
    if not active():
        return bool(flag)
    return bool(all_reduce(torch.tensor([float(flag)]), "max").item())


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fetching the datasets), the others after it finished."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel`` when a process group is up, else ``model`` itself.

    Every parameter gets a gradient in every step (no ``find_unused_parameters``); the buffers
    (feature table, fractional-encoding tables) are constants, so they are not broadcast before
    every forward pass. DDP starts by copying rank 0's parameters to every rank.
    """
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        forward_sync_buffers=False,
        find_unused_parameters=False,
    )
