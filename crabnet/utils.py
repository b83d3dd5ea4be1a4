"""Small helpers shared by the package and the scripts: devices, seeding, safe file writes."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from crabnet.errors import UsageError


def resolve_device(name: str = "auto"):
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error.

    Returns:
        a ``torch.device``.
    """
    import torch  # imported here so that light users of this module (file helpers) stay light

    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but no CUDA GPU is available (use --device cpu)")
    return torch.device(name)


def file_sha256(path: Path | str) -> str:
    """Hex sha256 digest of a file's content, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def available_cpus() -> int:
    """The CPU cores this process may use (its affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    Works for files and folders. On an exception the temporary is removed and ``path`` is left
    as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        replace_path(tmp, path)
    finally:
        remove_path(tmp)


def replace_path(src: Path, dst: Path) -> None:
    """Move ``src`` onto ``dst``, replacing a file or a folder."""
    if dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old")
        remove_path(old)
        os.replace(dst, old)
        os.replace(src, dst)
        remove_path(old)
    else:
        os.replace(src, dst)


def remove_path(path: Path) -> None:
    """Remove a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def meta_sidecar(checkpoint: Path | str) -> Path:
    """``<name>.meta.json`` beside a checkpoint ``<name>.pt``: its metadata, readable without torch."""
    return Path(checkpoint).with_suffix(".meta.json")


def write_meta_sidecar(checkpoint: Path | str, meta: dict) -> Path:
    """Write a checkpoint's metadata as JSON beside it (atomically), for readers without torch."""
    import json

    path = meta_sidecar(checkpoint)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(meta, default=str), encoding="utf-8")
    return path


def read_checkpoint_meta(checkpoint: Path | str) -> dict | None:
    """The metadata of a checkpoint without building its model; None if unreadable.

    Read from its JSON sidecar when that is at least as new as the checkpoint (no torch needed), else
    from the checkpoint itself (memory-mapped, ``weights_only=True``; older checkpoints have no sidecar).
    """
    import json

    checkpoint, side = Path(checkpoint), meta_sidecar(checkpoint)
    try:
        if side.is_file() and side.stat().st_mtime >= checkpoint.stat().st_mtime:
            meta = json.loads(side.read_text(encoding="utf-8"))
            return meta if isinstance(meta, dict) else None
    except (OSError, ValueError):
        pass
    import torch

    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable, or a file system without mmap
        return None
    meta = ckpt.get("meta", {}) if isinstance(ckpt, dict) else {}
    return dict(meta) if isinstance(meta, dict) else None
