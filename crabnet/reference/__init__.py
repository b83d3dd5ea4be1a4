"""Published reference tables shipped with the package (facts from the papers, not computed here).

- ``published_test_mae.csv``: test MAE per benchmark dataset of CrabNet (mat2vec), HotCrab (onehot),
  Roost, ElemNet and a random forest (Wang et al., npj Comput. Mater. 7 (2021) 77).
- ``published_stats_benchmark.csv``, ``published_stats_matbench_cv.csv``: the dataset statistics
  of the explainability paper (Wang et al., IMMI 11 (2022) 41); their val and test diversity
  columns are swapped (see ``crabnet.stats``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

REFERENCE_DIR = Path(__file__).resolve().parent
PUBLISHED_MAE = REFERENCE_DIR / "published_test_mae.csv"
# The atoms of the paper's local-EDM figures (IMMI 2022, step 6; docs/steps.md).
PAPER_ATOMS = tuple("Al Fe O C B N Ti Cu Li W Na Si Ag Te As Cr Pt Tl Sb".split())
# Column of the published MAE table for each element representation.
PUBLISHED_COLUMN = {"mat2vec": "crabnet", "onehot": "hotcrab"}


def published_mae(dataset: str, features: str, reference: Path | str | None = None) -> float | None:
    """Published test MAE of CrabNet (mat2vec) or HotCrab (onehot) on a dataset.

    Args:
        dataset: dataset name as in the reference table (e.g. ``mp_bulk_modulus``).
        features: ``mat2vec`` (column ``crabnet``) or ``onehot`` (column ``hotcrab``); other
            names select the column of that name (``roost``, ``elemnet``, ``rf``).
        reference: the CSV (columns ``dataset,n_test,crabnet,hotcrab,…``); default the shipped table.

    Returns:
        The MAE, or None when the table, the dataset or the column is not there (or blank).
    """
    path = Path(reference) if reference is not None else PUBLISHED_MAE
    if not path.is_file():
        return None
    df = pd.read_csv(path).set_index("dataset")
    column = PUBLISHED_COLUMN.get(features, features)
    if dataset not in df.index or column not in df.columns:
        return None
    value = df.loc[dataset, column]
    return None if pd.isna(value) else float(value)
