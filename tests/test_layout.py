"""The data-folder layout: one owner of every path, documented in data/README.md."""

from __future__ import annotations

from pathlib import Path

from crabnet.data import resolve_datasets
from crabnet.layout import BENCHMARK_DATASETS, Layout, outputs_table
from crabnet.training.checkpoint import checkpoint_path

ROOT = Path(__file__).resolve().parents[1]


def test_data_readme_holds_the_outputs_table():
    assert outputs_table() in (ROOT / "data" / "README.md").read_text(encoding="utf-8")


def test_paths(tmp_path):
    lay = Layout(tmp_path)
    assert lay.checkpoint("ds", "mat2vec") == tmp_path / "models" / "ds__mat2vec.pt"
    assert lay.checkpoint("ds", "onehot", "npj") == tmp_path / "models" / "ds__onehot__npj.pt"
    assert lay.training_state("ds", "onehot", "npj") == tmp_path / "models" / "ds__onehot__npj.state.pt"
    assert checkpoint_path(tmp_path, "ds", "onehot", "npj") == lay.checkpoint("ds", "onehot", "npj")
    assert lay.attention_store("ds") == tmp_path / "attention" / "ds" / "attention.zarr"
    assert lay.embedding("onehot", "ds", 2, "V") == tmp_path / "embeddings" / "onehot" / "ds__layer2__V.csv"
    assert len(BENCHMARK_DATASETS) == 18


def test_dataset_discovery(tiny_data):
    assert resolve_datasets(tiny_data, ["tiny"]) == [("benchmark_data", "tiny")]
    assert resolve_datasets(tiny_data, ["all"]) == [("benchmark_data", "tiny")]
