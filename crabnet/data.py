"""Datasets, formula parsing and element-derived matrices (EDM).

Datasets are folders ``<data-dir>/benchmark_data/<name>/{train,val,test}.csv`` (and
``<data-dir>/matbench_cv/<name>/{train,val,test}<fold>.csv``) with columns ``formula,target``.
The published sets are fetched on first need from the ``crabnet==2.0.8`` wheel on PyPI.

A compound becomes two rows of an EDM: atomic numbers (0 = padding) and fractions (summing to 1),
ordered by descending amount, padded to a common width ``E``.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from crabnet.elements import ATOMIC_NUMBER, SYMBOLS
from crabnet.layout import BENCHMARK, MATBENCH, SPLITS, Layout, available
from crabnet.utils import UsageError, file_sha256

WHEEL_SPEC = "crabnet==2.0.8"
WHEEL_NAME = "crabnet-2.0.8-py3-none-any.whl"
WHEEL_SHA256 = "4901565abaa5b4cd1a7841b9de647a3906df21676b226a7abf972d113f92054a"
WHEEL_FOLDERS = (BENCHMARK, MATBENCH)  # under crabnet/data/ in the wheel


class DataError(UsageError):
    """A dataset file or formula that cannot be used, with a message naming where."""


# --------------------------------------------------------------------------------------------
# fetching


def _manual_instructions(data_dir: Path) -> str:
    return (
        f"To place the files by hand: on a machine with access to PyPI run\n"
        f"  pip download --no-deps --only-binary=:all: --python-version 3.10 {WHEEL_SPEC}\n"
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
    print(f"Fetching the published datasets ({WHEEL_SPEC} wheel from PyPI) into {data_dir}/ …", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.10", "--disable-pip-version-check", "-q", "-d", tmp, WHEEL_SPEC]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / WHEEL_NAME
        if proc.returncode != 0 or not wheel.exists():
            raise DataError(
                f"could not download {WHEEL_SPEC} (pip said: {proc.stderr.strip()[-500:]})\n"
                + _manual_instructions(data_dir)
            )
        names = extract_datasets(wheel, data_dir)
    print(f"  extracted {len(names)} datasets", flush=True)
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


# --------------------------------------------------------------------------------------------
# formulas

_DIGITS = "0123456789."


class _FormulaParser:
    """Recursive-descent parser: formula := (group | element) amount?; group := (…) or […]."""

    def __init__(self, text: str):
        self.s = text
        self.i = 0

    def error(self, why: str) -> DataError:
        return DataError(f"{why} in formula {self.s!r}")

    def skip_space(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def amount(self) -> float:
        self.skip_space()
        j = self.i
        while j < len(self.s) and self.s[j] in _DIGITS:
            j += 1
        if j == self.i:
            return 1.0
        # scientific notation: 1e-1, 2.5E+3
        if j < len(self.s) and self.s[j] in "eE":
            k = j + 1
            if k < len(self.s) and self.s[k] in "+-":
                k += 1
            if k < len(self.s) and self.s[k].isdigit():
                while k < len(self.s) and self.s[k].isdigit():
                    k += 1
                j = k
        token = self.s[self.i : j]
        try:
            value = float(token)
        except ValueError:
            raise self.error(f"bad amount {token!r}") from None
        self.i = j
        return value

    def sequence(self, closing: str | None) -> dict[str, float]:
        out: dict[str, float] = {}
        while True:
            self.skip_space()
            if self.i >= len(self.s):
                if closing is not None:
                    raise self.error(f"unbalanced brackets: missing {closing!r}")
                return out
            c = self.s[self.i]
            if c in ")]":
                if closing != c:
                    raise self.error(f"unbalanced brackets: unexpected {c!r} at position {self.i}")
                self.i += 1
                return out
            if c in "([":
                self.i += 1
                inner = self.sequence(")" if c == "(" else "]")
                mult = self.amount()
                for el, n in inner.items():
                    out[el] = out.get(el, 0.0) + n * mult
            elif c.isupper():
                j = self.i + 1
                while j < len(self.s) and self.s[j].islower():
                    j += 1
                sym = self.s[self.i : j]
                if sym not in ATOMIC_NUMBER:
                    raise self.error(f"unknown element symbol {sym!r}")
                self.i = j
                out[sym] = out.get(sym, 0.0) + self.amount()
            elif c.islower():
                raise self.error(f"element symbols start with a capital letter (found {c!r} at position {self.i})")
            else:
                raise self.error(f"unexpected character {c!r} at position {self.i}")


def parse_formula(formula: str) -> dict[str, float]:
    """Parse a chemical formula into element amounts.

    Accepts ``Fe2O3``, ``Li0.5Co0.5O2``, ``Ca(OH)2``, ``(NH4)2SO4``, ``[Co(NH3)6]Cl3``,
    scientific notation (``NbO1.9S1e-1``), repeated elements (summed) and whitespace.

    Args:
        formula: the formula text.

    Returns:
        ``{symbol: amount}`` in order of first appearance; elements with amount 0 are dropped.

    Raises:
        DataError: unknown or lower-case symbols, empty input, unbalanced brackets, bad numbers,
            or a total amount that is not positive.
    """
    if not isinstance(formula, str) or not formula.strip():
        raise DataError(f"empty formula {formula!r}")
    amounts = _FormulaParser(formula).sequence(None)
    amounts = {el: n for el, n in amounts.items() if n != 0}
    total = sum(amounts.values())
    if not amounts or not math.isfinite(total) or total <= 0 or any(n < 0 for n in amounts.values()):
        raise DataError(f"total amount must be positive in formula {formula!r}")
    return amounts


def normalise_formula(formula: str) -> str:
    """Canonical text of a formula for matching: elements alphabetical, amounts as %g.

    ``HfO2``, ``Hf1O2`` and ``O2 Hf`` all give ``Hf1O2``.
    """
    amounts = parse_formula(formula)
    return "".join(f"{el}{amounts[el]:g}" for el in sorted(amounts))


def composition_row(amounts: dict[str, float]) -> tuple[list[int], list[float]]:
    """Atomic numbers and fractions of one compound, ordered by descending amount (stable)."""
    total = sum(amounts.values())
    items = sorted(amounts.items(), key=lambda kv: -kv[1])
    return [ATOMIC_NUMBER[el] for el, _ in items], [n / total for _, n in items]


# --------------------------------------------------------------------------------------------
# datasets


@dataclass
class CompositionData:
    """Compounds of one split as an element-derived matrix (EDM).

    Attributes:
        formula: (n,) formulas as in the file.
        elements: (n, E) int64 atomic numbers, 0 = padding, by descending fraction.
        fractions: (n, E) float32 fractions summing to 1 over real elements, 0 at padding.
        target: (n,) float32 targets.
        rows: (n,) row numbers in the source file (1-based data rows, header excluded).
        source: where the data came from (for messages).
    """

    formula: np.ndarray
    elements: np.ndarray
    fractions: np.ndarray
    target: np.ndarray
    rows: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.formula)

    @property
    def width(self) -> int:
        """Element-axis width E."""
        return self.elements.shape[1]

    @property
    def n_real(self) -> np.ndarray:
        """(n,) number of real elements of each compound."""
        return (self.elements > 0).sum(axis=1)

    def padded(self, width: int) -> "CompositionData":
        """The same data with the element axis padded (never truncated) to ``width``."""
        if width < self.width:
            need = int(self.n_real.max()) if len(self) else 0
            if need > width:
                raise DataError(f"{self.source}: compounds with {need} elements do not fit width {width}")
            return CompositionData(self.formula, self.elements[:, :width], self.fractions[:, :width],
                                   self.target, self.rows, self.source)
        pad = width - self.width
        return CompositionData(
            self.formula,
            np.pad(self.elements, ((0, 0), (0, pad))),
            np.pad(self.fractions, ((0, 0), (0, pad))),
            self.target, self.rows, self.source,
        )


def compositions_from_formulas(
    formulas: list[str], targets: np.ndarray | None = None, *, source: str = "", rows: np.ndarray | None = None
) -> CompositionData:
    """Build an EDM from formulas (no dropping, no validation of targets)."""
    parsed = [composition_row(parse_formula(f)) for f in formulas]
    width = max((len(z) for z, _ in parsed), default=1)
    elements = np.zeros((len(parsed), width), dtype=np.int64)
    fractions = np.zeros((len(parsed), width), dtype=np.float32)
    for i, (z, x) in enumerate(parsed):
        elements[i, : len(z)] = z
        fractions[i, : len(x)] = x
    target = np.zeros(len(parsed), np.float32) if targets is None else np.asarray(targets, np.float32)
    rows = np.arange(1, len(parsed) + 1) if rows is None else rows
    return CompositionData(np.asarray(formulas, dtype=object), elements, fractions, target, rows, source)


def read_text_table(path: Path | str, columns: tuple[str, ...]) -> pd.DataFrame:
    """Read a CSV as text (no NaN conversion) and check that it has ``columns``.

    Raises:
        DataError: the file is missing, empty, or lacks one of the columns.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, keep_default_na=False, dtype=str)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty (expected a header with {', '.join(columns)})") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(df.columns)}")
    return df


def read_split(
    path: Path | str, *, drop_unary: bool = True, skip_invalid: bool = False, verbose: bool = True
) -> CompositionData:
    """Read and validate one ``formula,target`` CSV.

    Args:
        path: the CSV file.
        drop_unary: drop single-element compounds (the original code's default, used for the
            published test counts).
        skip_invalid: skip rows with an unusable formula or target instead of raising; the
            count and the first few skipped rows are printed.
        verbose: print what was dropped or skipped.

    Raises:
        DataError: naming the file, row and formula of the first bad row (unless skipping), or
            a missing file, an empty file or missing columns.
    """
    path = Path(path)
    df = read_text_table(path, ("formula", "target"))
    if len(df) == 0:
        raise DataError(f"{path}: no data rows")

    formulas, targets, rows, bad = [], [], [], []
    for row, (formula, target) in enumerate(zip(df["formula"], df["target"]), start=1):
        try:
            parse_formula(formula)  # validates; the EDM is built below
            try:
                value = float(target)
            except ValueError:
                raise DataError(f"non-numeric target {target!r}") from None
            if not math.isfinite(value):
                raise DataError(f"missing or non-finite target {target!r}")
        except DataError as err:
            msg = f"{path}, row {row}, formula {formula!r}: {err}"
            if not skip_invalid:
                raise DataError(msg + " (use --skip-invalid to skip such rows)") from None
            bad.append(msg)
            continue
        formulas.append(formula)
        targets.append(value)
        rows.append(row)
    if bad and verbose:
        print(f"{path}: skipped {len(bad)} invalid row(s); first ones:", file=sys.stderr)
        for msg in bad[:5]:
            print(f"  {msg}", file=sys.stderr)
    if not formulas:
        raise DataError(f"{path}: no valid rows")
    data = compositions_from_formulas(formulas, np.array(targets), source=str(path), rows=np.array(rows))
    if drop_unary:
        keep = data.n_real > 1
        if verbose and (~keep).any():
            print(f"{path.name}: dropped {int((~keep).sum())} single-element compound(s) (drop_unary)")
        data = CompositionData(data.formula[keep], data.elements[keep], data.fractions[keep],
                               data.target[keep], data.rows[keep], data.source)
        if len(data) == 0:
            raise DataError(f"{path}: no compounds left after dropping single-element ones")
        width = int(data.n_real.max())
        data = data.padded(width)
    return data


def load_dataset(
    data_dir: Path | str, dataset: str, splits: tuple[str, ...] = SPLITS, *, fold: int | None = None,
    drop_unary: bool = True, skip_invalid: bool = False, fetch: bool = True, verbose: bool = True,
) -> dict[str, CompositionData]:
    """Load splits of a dataset, all padded to one common element width.

    Args:
        data_dir: the ``--data-dir`` root.
        dataset: folder name under ``benchmark_data/`` (or ``matbench_cv/`` when ``fold`` is set).
        splits: which of train, val, test to load.
        fold: matbench cross-validation fold (reads ``<split><fold>.csv`` under ``matbench_cv``).
    """
    if fold is None:
        folder = dataset_dir(data_dir, dataset, fetch=fetch)
        files = {s: folder / f"{s}.csv" for s in splits}
    else:
        dataset_dir(data_dir, "aflow__Egap", fetch=fetch)  # triggers the fetch if nothing is there
        folder = Layout(data_dir).matbench(dataset)
        files = {s: folder / f"{s}{fold}.csv" for s in splits}
    out = {s: read_split(p, drop_unary=drop_unary, skip_invalid=skip_invalid, verbose=verbose)
           for s, p in files.items()}
    width = max(d.width for d in out.values())
    return {s: d.padded(width) for s, d in out.items()}


def batch_size_for(n_train: int, max_size: int = 4096) -> int:
    """The recipe's batch size: 2^round(log2(n_train) - 4), clamped to [128, max_size].

    ``max_size`` is 4096 for models and 1024 for the attention run of step 1 (SPEC §4).
    """
    return int(min(max_size, max(128, 2 ** round(math.log2(max(n_train, 1)) - 4))))


__all__ = [
    "SYMBOLS", "DataError", "CompositionData", "parse_formula", "normalise_formula", "composition_row",
    "compositions_from_formulas", "read_split", "load_dataset", "dataset_dir", "fetch_datasets",
    "extract_datasets", "batch_size_for",
]


def _main() -> int:
    """``python -m crabnet.data [--data-dir DIR]``: fetch the published datasets if missing."""
    import argparse

    p = argparse.ArgumentParser(description="Fetch the published datasets into <data-dir> if they are missing.")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="default: %(default)s")
    args = p.parse_args()
    try:
        folder = dataset_dir(args.data_dir, "aflow__Egap")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n = len(available(args.data_dir, BENCHMARK))
    print(f"datasets ready: {n} benchmark sets in {folder.parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
