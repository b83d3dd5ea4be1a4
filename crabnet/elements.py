"""Element symbols and element feature tables.

Feature tables come from the ``CBFV`` package (``CBFV/element_properties/<name>.csv``, first column
the element symbol). They are returned as arrays indexed by atomic number, with row 0 reserved for
padding (all zeros), so that ``table[Z]`` is the feature vector of element ``Z``.
"""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np
import pandas as pd

# fmt: off
SYMBOLS: tuple[str, ...] = (
    "H", "He", "Li", "Be", "B", "C", "N", "O", "F", "Ne", "Na", "Mg", "Al", "Si", "P", "S", "Cl", "Ar",
    "K", "Ca", "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga", "Ge", "As", "Se", "Br",
    "Kr", "Rb", "Sr", "Y", "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd", "In", "Sn", "Sb", "Te",
    "I", "Xe", "Cs", "Ba", "La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm",
    "Yb", "Lu", "Hf", "Ta", "W", "Re", "Os", "Ir", "Pt", "Au", "Hg", "Tl", "Pb", "Bi", "Po", "At", "Rn",
    "Fr", "Ra", "Ac", "Th", "Pa", "U", "Np", "Pu", "Am", "Cm", "Bk", "Cf", "Es", "Fm", "Md", "No", "Lr",
    "Rf", "Db", "Sg", "Bh", "Hs", "Mt", "Ds", "Rg", "Cn", "Nh", "Fl", "Mc", "Lv", "Ts", "Og",
)
# fmt: on
N_ELEMENTS = len(SYMBOLS)  # 118
ATOMIC_NUMBER: dict[str, int] = {s: i + 1 for i, s in enumerate(SYMBOLS)}

FEATURE_NAMES = ("mat2vec", "onehot", "magpie", "oliynyk", "jarvis", "random_200")


def symbol(z: int) -> str:
    """Element symbol of atomic number ``z`` (1…118)."""
    if not 1 <= z <= N_ELEMENTS:
        raise ValueError(f"atomic number must be in 1..{N_ELEMENTS}, got {z}")
    return SYMBOLS[z - 1]


@functools.cache
def feature_frame(name: str) -> pd.DataFrame:
    """Raw CBFV element table ``name`` as a DataFrame indexed by element symbol.

    The one-hot table ships with a ``Dummy`` row and column; both are removed, leaving the
    118-dimensional one-hot encoding of H…Og ("HotCrab").

    Args:
        name: one of ``FEATURE_NAMES``.

    Returns:
        DataFrame with one row per element present in the table (float64 features).
    """
    if name not in FEATURE_NAMES:
        raise ValueError(f"unknown element features {name!r}; choose one of {', '.join(FEATURE_NAMES)}")
    try:
        path = resources.files("CBFV") / "element_properties" / f"{name}.csv"
        with resources.as_file(path) as p:
            df = pd.read_csv(p, index_col=0)
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise RuntimeError("element feature tables come from the CBFV package: pip install CBFV==1.1.0") from err
    if "Dummy" in df.index:
        df = df.drop(index="Dummy")
        df = df.loc[:, (df != 0).any(axis=0)]  # the Dummy column is all zero for real elements
    df.index = df.index.astype(str)
    unknown = [s for s in df.index if s not in ATOMIC_NUMBER]
    if unknown:
        df = df.drop(index=unknown)
    return df.astype(np.float64)


def feature_table(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Element feature table indexed by atomic number.

    Args:
        name: one of ``FEATURE_NAMES``.

    Returns:
        ``(table, present)``: ``table`` is float32 of shape (119, d) with row 0 (padding) and rows
        of elements missing from the table set to zero (NaN entries are also set to zero);
        ``present`` is a bool array (119,) telling which atomic numbers the table covers.
    """
    df = feature_frame(name)
    table = np.zeros((N_ELEMENTS + 1, df.shape[1]), dtype=np.float32)
    present = np.zeros(N_ELEMENTS + 1, dtype=bool)
    z = np.array([ATOMIC_NUMBER[s] for s in df.index])
    table[z] = np.nan_to_num(df.to_numpy(dtype=np.float64)).astype(np.float32)
    present[z] = True
    return table, present
