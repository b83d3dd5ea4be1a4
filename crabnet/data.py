"""Datasets, formula parsing and element-derived matrices (EDM).

Datasets are folders ``<data-dir>/benchmark_data/<name>/{train,val,test}.csv`` (and
``<data-dir>/matbench_cv/<name>/{train,val,test}<fold>.csv``) with columns ``formula,target``.
The published sets are fetched on first need (:mod:`crabnet.fetch`).

A compound becomes two rows of an EDM: atomic numbers (0 = padding) and fractions (summing to 1),
ordered by descending amount, padded to a common width ``E``. Rows of a split with the same model
input (the same elements and fractions) are merged into one with the mean target, as the original
code averages duplicate formulas.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from crabnet.elements import ATOMIC_NUMBER
from crabnet.errors import DataError
from crabnet.fetch import dataset_dir
from crabnet.layout import BENCHMARK, MATBENCH, SPLITS, Layout, SplitFile, available, folds_of
from crabnet.progress import say

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
        rows: (n,) row numbers in the source file (1-based data rows, header excluded); a row
            merged from duplicates has the number of the first of them.
        source: where the data came from (for messages).
        n_csv_rows: data rows of the source CSV before anything was dropped, skipped or merged
            (the recipe's batch size counts these, as the original code); ``len`` by default.
        n_merged: rows with a duplicate model input that were merged (:func:`merge_same_inputs`).
        n_merged_into: the compositions those ``n_merged`` rows became.
    """

    formula: np.ndarray
    elements: np.ndarray
    fractions: np.ndarray
    target: np.ndarray
    rows: np.ndarray
    source: str = ""
    n_csv_rows: int | None = None
    n_merged: int = 0
    n_merged_into: int = 0

    def __post_init__(self) -> None:
        if self.n_csv_rows is None:
            self.n_csv_rows = len(self.formula)

    def __len__(self) -> int:
        return len(self.formula)

    def subset(self, index: np.ndarray) -> CompositionData:
        """The rows at ``index`` (a boolean mask or integer positions), keeping ``source``,
        ``n_csv_rows`` and the merge counts (they describe the file the rows came from)."""
        return replace(
            self,
            formula=self.formula[index],
            elements=self.elements[index],
            fractions=self.fractions[index],
            target=self.target[index],
            rows=self.rows[index],
        )

    @property
    def width(self) -> int:
        """Element-axis width E."""
        return self.elements.shape[1]

    @property
    def n_real(self) -> np.ndarray:
        """(n,) number of real elements of each compound."""
        return (self.elements > 0).sum(axis=1)

    def padded(self, width: int) -> CompositionData:
        """The same data with the element axis padded (never truncated) to ``width``."""
        if width < self.width:
            need = int(self.n_real.max()) if len(self) else 0
            if need > width:
                raise DataError(f"{self.source}: compounds with {need} elements do not fit width {width}")
            return replace(self, elements=self.elements[:, :width], fractions=self.fractions[:, :width])
        pad = width - self.width
        return replace(
            self,
            elements=np.pad(self.elements, ((0, 0), (0, pad))),
            fractions=np.pad(self.fractions, ((0, 0), (0, pad))),
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


def input_keys(data: CompositionData) -> np.ndarray:
    """One key per row that identifies the model input: its (atomic number, fraction) pairs.

    Two rows get the same key when their EDM rows, the int64 atomic numbers and the float32
    fractions the model sees, hold exactly the same pairs in any order. Fractions are thus compared
    exactly after normalisation and the cast to float32: ``Fe2O3`` and ``Fe4O6`` match, and so do
    ``Li0.1Co0.2O0.3`` and ``Li1Co2O3`` although their float64 fractions differ in the last bit.
    Keys compare only between data of the same width.

    Args:
        data: compounds as an EDM.

    Returns:
        (n,) numpy void (fixed-size bytes) keys.
    """
    order = np.argsort(data.elements, axis=1, kind="stable")
    z = np.take_along_axis(data.elements, order, axis=1).astype(np.int64)
    x = np.take_along_axis(data.fractions, order, axis=1).astype(np.float32).view(np.int32).astype(np.int64)
    pairs = np.ascontiguousarray(np.concatenate([z, x], axis=1))
    return pairs.view(np.dtype((np.void, pairs.shape[1] * pairs.itemsize))).reshape(-1)


def merge_same_inputs(data: CompositionData, target: np.ndarray | None = None) -> CompositionData:
    """Merge rows with the same model input (:func:`input_keys`) into one row with their mean target.

    A merged row keeps the first row's formula, element order and row number; rows stay in order
    of first occurrence. ``n_merged`` and ``n_merged_into`` of the result count the rows that had
    duplicates and the compositions they became (``data`` itself is returned when there are none).

    Args:
        data: one split.
        target: (n,) the targets at full precision for the mean (default: ``data.target``).

    Returns:
        The split with one row per model input.
    """
    y = np.asarray(data.target if target is None else target, dtype=np.float64)
    _, first, inverse, counts = np.unique(input_keys(data), return_index=True, return_inverse=True, return_counts=True)
    if len(first) == len(data):
        return data
    by_first = np.argsort(first)  # groups in order of first occurrence
    rank = np.empty(len(first), dtype=np.int64)
    rank[by_first] = np.arange(len(first))
    group = rank[inverse.reshape(-1)]
    mean = np.bincount(group, weights=y, minlength=len(first)) / counts[by_first]
    dup = counts > 1
    return replace(
        data.subset(first[by_first]),
        target=mean.astype(np.float32),
        n_merged=int(counts[dup].sum()),
        n_merged_into=int(dup.sum()),
    )


def shared_inputs(a: CompositionData, b: CompositionData) -> list[tuple[str, str]]:
    """Compounds of ``b`` whose model input (:func:`input_keys`) is also in ``a``.

    Args:
        a, b: two splits (of any widths).

    Returns:
        ``(formula in b, formula of the first such row in a)`` pairs, in ``b``'s order.
    """
    if not len(a) or not len(b):
        return []
    width = max(a.width, b.width)
    keys_a, keys_b = input_keys(a.padded(width)), input_keys(b.padded(width))
    uniq, first = np.unique(keys_a, return_index=True)
    pos = np.minimum(np.searchsorted(uniq, keys_b), len(uniq) - 1)
    hit = np.flatnonzero(uniq[pos] == keys_b)
    return [(str(b.formula[j]), str(a.formula[first[pos[j]]])) for j in hit]


BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def text_encoding(path: Path | str) -> str:
    """The encoding of a text file by its byte-order mark: UTF-8 with or without one, or UTF-16 (what a
    spreadsheet's "Unicode text" export writes)."""
    with open(path, "rb") as f:
        head = f.read(3)
    return next((enc for bom, enc in BOMS if head.startswith(bom)), "utf-8")


def read_text_table(path: Path | str, columns: tuple[str, ...]) -> pd.DataFrame:
    """Read a CSV as text (no NaN conversion) and check that it has ``columns``.

    Raises:
        DataError: the file is missing, empty, or lacks one of the columns.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    encoding = text_encoding(path)
    try:
        df = pd.read_csv(path, keep_default_na=False, dtype=str, encoding=encoding)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty (expected a header with {', '.join(columns)})") from None
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not {encoding} text (byte {err.object[err.start : err.start + 1]!r} at offset {err.start}); "
            "save it as CSV in UTF-8 (or UTF-16 with its byte-order mark)"
        ) from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(df.columns)}")
    return df


def _valid_rows(
    path: Path, df: pd.DataFrame, skip_invalid: bool, verbose: bool
) -> tuple[list[str], list[float], list[int]]:
    """The rows of a split with a valid formula and a finite target: formulas, targets, 1-based rows.

    Raises:
        DataError: the first bad row (unless ``skip_invalid``: then the count and the first few are
            printed), or no valid row.
    """
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
        say(f"{path}: skipped {len(bad)} invalid row(s); first ones:", file=sys.stderr)
        for msg in bad[:5]:
            say(f"  {msg}", file=sys.stderr)
    if not formulas:
        raise DataError(f"{path}: no valid rows")
    return formulas, targets, rows


def read_split(
    path: Path | str,
    *,
    drop_unary: bool = True,
    skip_invalid: bool = False,
    merge_duplicates: bool = True,
    verbose: bool = True,
) -> CompositionData:
    """Read and validate one ``formula,target`` CSV.

    The result's ``n_csv_rows`` is the file's number of data rows before anything is dropped,
    skipped or merged.

    Args:
        path: the CSV file.
        drop_unary: drop single-element compounds (the original code's default, used for the
            published test counts).
        skip_invalid: skip rows with an unusable formula or target instead of raising; the
            count and the first few skipped rows are printed.
        merge_duplicates: merge rows with the same model input (same elements and fractions, e.g.
            ``Fe2O3`` and ``Fe4O6``) into one with their mean target (:func:`merge_same_inputs`),
            after dropping single-element compounds, as the original code averages duplicates.
        verbose: print what was dropped, skipped or merged.

    Raises:
        DataError: naming the file, row and formula of the first bad row (unless skipping), or
            a missing file, an empty file or missing columns.
    """
    path = Path(path)
    df = read_text_table(path, ("formula", "target"))
    if len(df) == 0:
        raise DataError(f"{path}: no data rows")

    formulas, targets, rows = _valid_rows(path, df, skip_invalid, verbose)
    target = np.array(targets, dtype=np.float64)
    data = compositions_from_formulas(formulas, target, source=str(path), rows=np.array(rows))
    data = replace(data, n_csv_rows=len(df))
    if drop_unary:
        keep = data.n_real > 1
        if verbose and (~keep).any():
            say(f"{path.name}: dropped {int((~keep).sum())} single-element compound(s) (drop_unary)")
        data, target = data.subset(keep), target[keep]
        if len(data) == 0:
            raise DataError(f"{path}: no compounds left after dropping single-element ones")
        width = int(data.n_real.max())
        data = data.padded(width)
    if merge_duplicates:
        data = merge_same_inputs(data, target)
        if verbose and data.n_merged:
            say(
                f"{path.parent.name} {path.stem}: {data.n_merged} duplicate rows merged into "
                f"{data.n_merged_into} compositions (mean target)"
            )
    return data


def load_dataset(
    data_dir: Path | str,
    dataset: str,
    splits: tuple[str, ...] = SPLITS,
    *,
    fold: int | None = None,
    drop_unary: bool = True,
    skip_invalid: bool = False,
    merge_duplicates: bool = True,
    fetch: bool = True,
    verbose: bool = True,
) -> dict[str, CompositionData]:
    """Load splits of a dataset, all padded to one common element width.

    When both train and test are loaded, test compounds with the same model input as a train
    compound are reported (with ``verbose``) as a ``warning:`` line on stderr.

    Args:
        data_dir: the ``--data-dir`` root.
        dataset: folder name under ``benchmark_data/`` (or ``matbench_cv/`` when ``fold`` is set).
        splits: which of train, val, test to load.
        fold: matbench cross-validation fold (reads ``<split><fold>.csv`` under ``matbench_cv``).
        drop_unary, skip_invalid, merge_duplicates: as for :func:`read_split`.
        fetch: download the published datasets when they are missing.
        verbose: print what was dropped, skipped or merged, and the train/test overlap.
    """
    if fold is None:
        folder = dataset_dir(data_dir, dataset, fetch=fetch)
        files = {s: folder / f"{s}.csv" for s in splits}
    else:
        dataset_dir(data_dir, "aflow__Egap", fetch=fetch)  # triggers the fetch if nothing is there
        folder = Layout(data_dir).matbench(dataset)
        files = {s: folder / f"{s}{fold}.csv" for s in splits}
    out = {
        s: read_split(
            p, drop_unary=drop_unary, skip_invalid=skip_invalid, merge_duplicates=merge_duplicates, verbose=verbose
        )
        for s, p in files.items()
    }
    width = max(d.width for d in out.values())
    out = {s: d.padded(width) for s, d in out.items()}
    if verbose and "train" in out and "test" in out:
        shared = shared_inputs(out["train"], out["test"])
        if shared:
            first = ", ".join(t if t == r else f"{t} (train: {r})" for t, r in shared[:5])
            say(
                f"warning: {dataset}: {len(shared)} test compound(s) have the same composition as a train "
                f"compound; first ones: {first}",
                file=sys.stderr,
            )
    return out


def batch_size_for(n_train: int, max_size: int = 4096) -> int:
    """The recipe's batch size: 2^round(log2(n_train) - 4), clamped to [128, max_size].

    ``n_train`` is, as in the original code, the training CSV's number of rows before anything
    is dropped or merged (``CompositionData.n_csv_rows``).

    ``max_size`` is 4096 for models and 1024 for the attention run of step 1 (docs/model-and-recipe.md#the-two-recipes).
    """
    return int(min(max_size, max(128, 2 ** round(math.log2(max(n_train, 1)) - 4))))


# --------------------------------------------------------------------------------------------
# datasets by name


def resolve_datasets(data_dir: Path | str, names: list[str] | None) -> list[tuple[str, str]]:
    """Turn ``--dataset`` values into ``(kind, name)`` pairs, fetching the published data if needed.

    Args:
        data_dir: the ``--data-dir`` root.
        names: dataset names; ``None``, empty or ``["all"]`` means every benchmark set and every
            matbench set present. A name is looked up under ``benchmark_data/`` first, then
            ``matbench_cv/``.

    Raises:
        DataError: a name found in neither folder (the message lists what is available).
    """
    data_dir = Path(data_dir)
    if not (data_dir / BENCHMARK).is_dir() and not (data_dir / MATBENCH).is_dir():
        dataset_dir(data_dir, "aflow__Egap")  # fetches the published sets (or explains how to)
    if not names or "all" in names:
        return [(BENCHMARK, n) for n in available(data_dir, BENCHMARK)] + [
            (MATBENCH, n) for n in available(data_dir, MATBENCH)
        ]
    out: list[tuple[str, str]] = []
    for name in dict.fromkeys(names):
        if (data_dir / BENCHMARK / name).is_dir():
            out.append((BENCHMARK, name))
        elif (data_dir / MATBENCH / name).is_dir():
            out.append((MATBENCH, name))
        else:
            have = available(data_dir, BENCHMARK) + available(data_dir, MATBENCH)
            raise DataError(
                f"dataset {name!r} not found under {data_dir}/{BENCHMARK}/ or {data_dir}/{MATBENCH}/. "
                f"Available: {', '.join(have) or 'none'}"
            )
    return out


def select_split_files(
    data_dir: Path | str, names: list[str], splits: tuple[str, ...] = SPLITS, *, matbench: bool = False
) -> list[SplitFile]:
    """The split files of ``--dataset`` values: ``all`` means every benchmark set (plus the matbench sets
    named beside it); ``matbench`` adds every matbench set. Fetches the published sets if needed."""
    pairs = resolve_datasets(data_dir, names)
    if "all" in names:
        named = [n for n in names if n != "all"]
        pairs = [p for p in pairs if p[0] == BENCHMARK] + [
            p for p in (resolve_datasets(data_dir, named) if named else []) if p[0] == MATBENCH
        ]
    if matbench:
        pairs += [(MATBENCH, n) for n in available(data_dir, MATBENCH) if (MATBENCH, n) not in pairs]
    return [f for kind, name in pairs for f in split_files(data_dir, kind, name, splits)]


def split_files(data_dir: Path | str, kind: str, dataset: str, splits: tuple[str, ...] = SPLITS) -> list[SplitFile]:
    """The CSV files of a dataset: one per split, or per split and fold for matbench sets.

    Raises:
        DataError: a missing split file (benchmark) or no complete fold (matbench).
    """
    folder = Path(data_dir) / kind / dataset
    if kind == BENCHMARK:
        files = [SplitFile(kind, dataset, s, None, folder / f"{s}.csv") for s in splits]
        missing = [f.path.name for f in files if not f.path.is_file()]
        if missing:
            raise DataError(f"{folder}/: missing {', '.join(missing)} (a dataset needs train.csv, val.csv, test.csv)")
        return files
    folds = folds_of(data_dir, dataset)
    if not folds:
        raise DataError(f"{folder}/: no complete fold (expected train<k>.csv, val<k>.csv, test<k>.csv)")
    return [SplitFile(kind, dataset, s, k, folder / f"{s}{k}.csv") for k in folds for s in splits]
