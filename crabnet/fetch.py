"""The published datasets: fetched on first need from the ``crabnet==2.0.8`` wheel on PyPI.

    python -m crabnet.fetch --data-dir data   # what `make data` runs; the scripts do the same on first need

The CrabNet authors publish the 18 benchmark sets and the 13 matbench tasks inside that wheel
(``crabnet/data/benchmark_data`` and ``crabnet/data/matbench_cv``); it is downloaded with pip, its
sha256 checked, and the two folders extracted into ``--data-dir``. Offline, the error says how to
place the files by hand.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from crabnet.errors import DataError
from crabnet.layout import BENCHMARK, MATBENCH, Layout, available
from crabnet.progress import say
from crabnet.utils import file_sha256

WHEEL = "crabnet==2.0.8"
WHEEL_NAME = "crabnet-2.0.8-py3-none-any.whl"
WHEEL_SHA256 = "4901565abaa5b4cd1a7841b9de647a3906df21676b226a7abf972d113f92054a"
WHEEL_FOLDERS = (BENCHMARK, MATBENCH)  # under crabnet/data/ in the wheel


def _manual_instructions(data_dir: Path) -> str:
    return (
        f"To place the files by hand: on a machine with access to PyPI run\n"
        f"  pip download --no-deps --only-binary=:all: --python-version 3.10 {WHEEL}\n"
        f"check that the sha256 of {WHEEL_NAME} is {WHEEL_SHA256}, and unzip its folders "
        f"crabnet/data/benchmark_data/ and crabnet/data/matbench_cv/ into {data_dir}/ "
        f"(giving {data_dir}/benchmark_data/<dataset>/train.csv …)."
    )


def extract_datasets(wheel: Path, data_dir: Path, sha256: str = WHEEL_SHA256) -> list[str]:
    """Verify the wheel's sha256 and extract its dataset folders into ``data_dir``.

    Extraction goes to a temporary folder inside ``data_dir`` first; each top-level folder
    (``benchmark_data``, ``matbench_cv``) is moved into place only when complete, so an
    interrupted extraction never leaves a half-filled dataset folder.

    Returns:
        The dataset folders extracted, as ``"benchmark_data/<name>"`` strings.
    """
    digest = file_sha256(wheel)
    if digest != sha256:
        raise DataError(f"sha256 of {wheel.name} is {digest}, expected {sha256}; refusing to use it")
    data_dir.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".extract-") as tmp:
        tmp_path = Path(tmp)
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                parts = info.filename.split("/")
                if len(parts) < 4 or parts[:2] != ["crabnet", "data"] or parts[2] not in WHEEL_FOLDERS:
                    continue
                if info.is_dir() or not parts[-1].endswith(".csv") or ".." in parts:
                    continue
                target = tmp_path.joinpath(*parts[2:])
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        for folder in WHEEL_FOLDERS:
            src = tmp_path / folder
            if not src.is_dir():
                continue
            dst_root = data_dir / folder
            dst_root.mkdir(exist_ok=True)
            for ds in sorted(p for p in src.iterdir() if p.is_dir()):
                dst = dst_root / ds.name
                if dst.exists():
                    continue  # never overwrite a user's folder of the same name
                os.replace(ds, dst)
                names.append(f"{folder}/{ds.name}")
    return names


def fetch_datasets(data_dir: Path) -> list[str]:
    """Download the ``crabnet==2.0.8`` wheel with pip and extract the datasets into ``data_dir``."""
    say(f"Fetching the published datasets ({WHEEL} wheel from PyPI) into {data_dir}/ …")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.10",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            WHEEL,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / WHEEL_NAME
        if proc.returncode != 0 or not wheel.exists():
            raise DataError(
                f"could not download {WHEEL} (pip said: {proc.stderr.strip()[-500:]})\n"
                + _manual_instructions(data_dir)
            )
        names = extract_datasets(wheel, data_dir)
    say(f"  extracted {len(names)} datasets")
    return names


def dataset_dir(data_dir: Path | str, dataset: str, fetch: bool = True) -> Path:
    """Folder of a benchmark-style dataset, fetching the published sets if it is missing.

    Args:
        data_dir: the ``--data-dir`` root.
        dataset: name of a folder under ``<data_dir>/benchmark_data/``.
        fetch: download the published datasets when the folder is absent.
    """
    layout = Layout(data_dir)
    folder = layout.dataset(dataset)
    if not folder.is_dir() and fetch and not layout.dataset("aflow__Egap").is_dir():
        fetch_datasets(data_dir)
    if not folder.is_dir():
        have = available(data_dir, BENCHMARK)
        raise DataError(
            f"dataset {dataset!r} not found: expected {folder}/ with train.csv, val.csv, test.csv. "
            f"Available: {', '.join(have) or 'none'}"
        )
    return folder


def _main() -> int:
    """``python -m crabnet.fetch [--data-dir DIR]``: fetch the published datasets if missing."""
    import argparse

    p = argparse.ArgumentParser(description="Fetch the published datasets into <data-dir> if they are missing.")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="default: %(default)s")
    args = p.parse_args()
    try:
        folder = dataset_dir(args.data_dir, "aflow__Egap")
    except DataError as err:
        say(f"error: {err}", file=sys.stderr)
        return 2
    n = len(available(args.data_dir, BENCHMARK))
    say(f"datasets ready: {n} benchmark sets in {folder.parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
