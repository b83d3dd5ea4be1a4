"""Formula parsing, EDM building and CSV validation."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from crabnet.data import (
    batch_size_for,
    compositions_from_formulas,
    load_dataset,
    normalise_formula,
    parse_formula,
    read_split,
)
from crabnet.errors import DataError
from crabnet.fetch import extract_datasets
from crabnet.utils import file_sha256


@pytest.mark.parametrize(
    "formula, expected",
    [
        ("Fe2O3", {"Fe": 2, "O": 3}),
        ("Li0.5Co0.5O2", {"Li": 0.5, "Co": 0.5, "O": 2}),
        ("Ca(OH)2", {"Ca": 1, "O": 2, "H": 2}),
        ("(NH4)2SO4", {"N": 2, "H": 8, "S": 1, "O": 4}),
        ("[Co(NH3)6]Cl3", {"Co": 1, "N": 6, "H": 18, "Cl": 3}),
        ("NbO1.9S1e-1", {"Nb": 1, "O": 1.9, "S": 0.1}),
        ("FeOFe", {"Fe": 2, "O": 1}),
        ("  Fe2 O3 ", {"Fe": 2, "O": 3}),
        ("Si1E+1O2", {"Si": 10, "O": 2}),
        ("Hf1O2", {"Hf": 1, "O": 2}),
    ],
)
def test_parse_accepted(formula, expected):
    got = parse_formula(formula)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v)


@pytest.mark.parametrize(
    "formula, why",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("Xx2O3", "unknown element"),
        ("fe2o3", "capital"),
        ("Fe2(O3", "unbalanced"),
        ("Fe2O3)", "unbalanced"),
        ("[Fe2O3)", "unbalanced"),
        ("Fe-2O3", "unexpected character"),
        ("Fe0O0", "positive"),
        ("Fe1.2.3O", "bad amount"),
    ],
)
def test_parse_rejected(formula, why):
    with pytest.raises(DataError, match=why):
        parse_formula(formula)


def test_normalise_formula():
    assert normalise_formula("HfO2") == normalise_formula("Hf1O2") == normalise_formula("O2Hf") == "Hf1O2"


def test_edm_order_and_fractions():
    d = compositions_from_formulas(["Fe2O3", "Li0.5Co0.5O2", "NaCl"], [1.0, 2.0, 3.0])
    assert d.elements.shape == (3, 3)
    assert d.elements[0].tolist() == [8, 26, 0]  # O (3) before Fe (2), then padding
    np.testing.assert_allclose(d.fractions[0], [0.6, 0.4, 0.0], rtol=1e-6)
    assert d.elements[1].tolist() == [8, 3, 27]  # O2 first; ties keep formula order (Li, Co)
    np.testing.assert_allclose(d.fractions[1], [2 / 3, 1 / 6, 1 / 6], rtol=1e-6)
    np.testing.assert_allclose(d.fractions.sum(1), 1.0, rtol=1e-6)
    assert (d.fractions[d.elements == 0] == 0).all()


def _write(tmp_path, text, name="bad.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, match",
    [
        ("formula\nFe2O3\n", "missing column"),
        ("", "empty"),
        ("formula,target\n", "no data rows"),
        ("formula,target\nFe2O3,1.0\nNaCl,nan\n", r"row 2, formula 'NaCl'.*non-finite"),
        ("formula,target\nFe2O3,1.0\nNaCl,\n", r"row 2.*missing or non-finite|row 2.*non-numeric"),
        ("formula,target\nFe2O3,abc\n", "non-numeric"),
        ("formula,target\nFe2O3,1\nQq2O,1.0\n", r"bad\.csv, row 2, formula 'Qq2O'.*unknown element"),
    ],
)
def test_bad_csv_clear_error(tmp_path, text, match):
    with pytest.raises(DataError, match=match):
        read_split(_write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_split(tmp_path / "nope.csv")


def test_skip_invalid_reports(tmp_path, capsys):
    p = _write(tmp_path, "formula,target\nFe2O3,1.0\nQq2O,2.0\nNaCl,3\nKBr,x\n")
    d = read_split(p, skip_invalid=True)
    assert d.formula.tolist() == ["Fe2O3", "NaCl"]
    assert d.rows.tolist() == [1, 3]
    err = capsys.readouterr().err
    assert "skipped 2 invalid row(s)" in err and "Qq2O" in err and "KBr" in err


def test_drop_unary(tmp_path):
    p = _write(tmp_path, "formula,target\nFe2O3,1.0\nFe,2.0\nO2,3\nNaCl,4\n")
    assert read_split(p).formula.tolist() == ["Fe2O3", "NaCl"]
    assert read_split(p, drop_unary=False).formula.tolist() == ["Fe2O3", "Fe", "O2", "NaCl"]


def test_load_dataset_common_width(tiny_data):
    splits = load_dataset(tiny_data, "tiny", fetch=False)
    widths = {d.width for d in splits.values()}
    assert len(widths) == 1
    assert len(splits["train"]) == 64


def test_unknown_dataset_lists_available(tiny_data):
    with pytest.raises(DataError, match="Available: tiny"):
        load_dataset(tiny_data, "nope", fetch=False)


@pytest.mark.parametrize("n, bs", [(100, 128), (3390, 256), (19330, 1024), (239125, 4096), (10**7, 4096)])
def test_batch_size(n, bs):
    assert batch_size_for(n) == bs


def _fake_wheel(path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("crabnet/data/benchmark_data/__init__.py", "")
        zf.writestr("crabnet/data/benchmark_data/toy/train.csv", "formula,target\nFe2O3,1\n")
        zf.writestr("crabnet/data/matbench_cv/toy2/train0.csv", "formula,target\nNaCl,1\n")
        zf.writestr("crabnet/training/model.py", "x = 1\n")
    path.write_bytes(buf.getvalue())
    return path


def test_extract_checks_sha_and_extracts(tmp_path):
    wheel = _fake_wheel(tmp_path / "w.whl")
    with pytest.raises(DataError, match="sha256"):
        extract_datasets(wheel, tmp_path / "data", sha256="0" * 64)
    assert not (tmp_path / "data" / "benchmark_data").exists()
    names = extract_datasets(wheel, tmp_path / "data", sha256=file_sha256(wheel))
    assert sorted(names) == ["benchmark_data/toy", "matbench_cv/toy2"]
    assert (tmp_path / "data" / "benchmark_data" / "toy" / "train.csv").read_text().startswith("formula")
    assert not list((tmp_path / "data").glob(".extract-*"))
    assert not (tmp_path / "data" / "benchmark_data" / "__init__.py").exists()


def test_fetch_failure_gives_manual_instructions(tmp_path, monkeypatch):
    import subprocess

    from crabnet import fetch as data_mod

    def failing_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(data_mod.subprocess, "run", failing_run)
    with pytest.raises(
        DataError, match=r"(?s)could not download crabnet==2\.0\.8.*network unreachable.*place the files by hand"
    ):
        data_mod.dataset_dir(tmp_path, "aflow__Egap")
    assert not (tmp_path / "benchmark_data").exists()


def _write_user_dataset(root, splits):
    folder = root / "benchmark_data" / "user"
    folder.mkdir(parents=True)
    for split, text in splits.items():
        (folder / f"{split}.csv").write_text("formula,target\n" + text)
    return root


def test_duplicates_merged_and_train_test_overlap(tmp_path, capsys):
    # Fe2O3 twice and Fe4O6 (same fractions), FeO/OFe (same pairs in another order) and
    # Li0.1Co0.2O0.3/Li1Co2O3 (float64 fractions differ in the last bit, float32 ones do not)
    root = _write_user_dataset(
        tmp_path,
        {
            "train": "Fe2O3,1\nNaCl,5\nFe2O3,2\nLi0.1Co0.2O0.3,7\nFe4O6,3\nFeO,10\nLi1Co2O3,9\nFe,4\nOFe,12\nKBr,6\n",
            "val": "ZnS,1\nMgO,2\n",
            "test": "MgO,1\nFe4O6,0\nCaO,2\nNaCl,3\n",
        },
    )
    splits = load_dataset(root, "user", fetch=False)
    out, err = capsys.readouterr()
    train = splits["train"]
    assert train.formula.tolist() == ["Fe2O3", "NaCl", "Li0.1Co0.2O0.3", "FeO", "KBr"]  # first occurrence
    np.testing.assert_allclose(train.target, [2.0, 5.0, 8.0, 11.0, 6.0])
    assert train.rows.tolist() == [1, 2, 4, 6, 10]
    assert train.elements[3, :2].tolist() == [26, 8]  # the first row's element order (FeO)
    assert (train.n_merged, train.n_merged_into, train.n_csv_rows) == (7, 3, 10)
    assert "user train: 7 duplicate rows merged into 3 compositions" in out
    assert "user val:" not in out and "user test:" not in out
    assert (splits["test"].n_merged, len(splits["test"])) == (0, 4)
    assert "warning: user: 2 test compound(s) have the same composition as a train compound" in err
    assert "Fe4O6 (train: Fe2O3)" in err and "NaCl" in err and "MgO" not in err

    quiet = load_dataset(root, "user", fetch=False, verbose=False)
    assert capsys.readouterr() == ("", "")
    assert quiet["train"].n_merged == 7
    kept = load_dataset(root, "user", splits=("train",), fetch=False, merge_duplicates=False, verbose=False)
    assert len(kept["train"]) == 9 and kept["train"].n_merged == 0


def test_batch_size_counts_csv_rows_before_drops(tmp_path):
    from crabnet.training.loop import fit
    from crabnet.training.recipe import Recipe, Scaler, build_model

    # 2890 compounds + 10 single-element rows: 2^round(log2(2900) - 4) = 256, but 128 for 2890
    assert (batch_size_for(2900), batch_size_for(2890)) == (256, 128)
    root = _write_user_dataset(
        tmp_path,
        {
            "train": "".join(f"Li{i}O1000,{i % 7}\n" for i in range(1, 2891)) + "Fe,1\n" * 10,
            "val": "NaCl,1\nKBr,2\n",
            "test": "NaCl,1\n",
        },
    )
    splits = load_dataset(root, "user", fetch=False, verbose=False)
    train = splits["train"]
    assert (len(train), train.n_csv_rows, train.n_merged) == (2890, 2900, 0)
    assert train.padded(train.width + 2).n_csv_rows == train.subset(np.arange(5)).n_csv_rows == 2900
    assert compositions_from_formulas(["NaCl", "KBr"]).n_csv_rows == 2
    model = build_model("onehot", d_model=16, n_heads=2, d_ff=32, head_dims=(16, 8))
    hist = fit(
        model,
        train,
        splits["val"],
        Scaler.fit(train.target),
        Recipe(epochs=1, epochs_step=1),
        progress=False,
        precision="fp32",
    )
    assert hist.steps == -(-2890 // 256)  # batches of 256: one epoch of ceil(2890 / 256) steps


def test_csv_encodings_read_or_one_clear_error(tmp_path):
    """A spreadsheet's "Unicode text" export (UTF-16 with a byte-order mark) and UTF-8 with a BOM read as
    plain UTF-8 does; other bytes are one DataError naming the file and the encoding, not a traceback."""
    text = "formula,target\nFe2O3,1.5\nNaCl,2.0\n"
    plain = read_split(_write_bytes(tmp_path / "plain.csv", text.encode("utf-8")), verbose=False)
    for name, raw in (("utf16.csv", text.encode("utf-16")), ("bom.csv", text.encode("utf-8-sig"))):
        got = read_split(_write_bytes(tmp_path / name, raw), verbose=False)
        assert list(got.formula) == list(plain.formula) and np.array_equal(got.target, plain.target), name
    latin = _write_bytes(tmp_path / "latin1.csv", "formula,target,note\nFe2O3,1.5,café\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv: not utf-8 text .*save it as CSV in UTF-8"):
        read_split(latin, verbose=False)


def _write_bytes(path, raw: bytes):
    path.write_bytes(raw)
    return path
