"""benchmarks/gpu_check.py: its CPU smoke run writes every figure; --device cuda without a GPU is one clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PARTS = {"device", "tests", "throughput", "fused_lamb", "attention", "resume", "step1", "peer"}


def _quick(data_dir: Path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--device",
            "cpu",
            "--quick",
            "--data-dir",
            str(data_dir),
            "--dataset",
            "tiny",
            *flags,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc, json.loads((data_dir / "benchmarks" / "gpu_check.json").read_text())


@pytest.mark.ci
def test_quick_cpu_run_writes_the_json(tiny_data):
    """The in-process parts (the pytest run and step 1 skipped: see the slow test below)."""
    proc, r = _quick(tiny_data, "--skip-tests", "--skip-step1")
    assert PARTS | {"seconds", "failed_parts"} <= set(r)
    assert r["quick"] and r["failed_parts"] == [] and r["device"]["device"] == "cpu"
    assert r["device"]["auto_precision"] in ("fp32", "bf16")
    for prec in ("fp32", "bf16"):
        row = r["throughput"][prec]
        assert row["samples_per_s"] > 0 and row["share_of_matmul_peak"] > 0 and row["peak_rss_mb"] > 0
    assert r["fused_lamb"]["ok"] is hasattr(torch, "_fused_adamw_")
    assert r["attention"]["max_abs_diff"] < 1e-4 and r["attention"]["compounds"] == 24
    assert r["resume"]["bit_for_bit"] and r["resume"]["max_abs_diff_rerun"] == 0.0 and r["resume"]["same_history"]
    assert r["tests"] == {"skipped": "--skip-tests"} and r["step1"] == {"skipped": "--skip-step1"}
    assert r["peer"] == {"skipped": "--quick"}
    for label in ("throughput bf16", "resume", "fused Lamb probe", "attention vs SDPA", "step 1"):
        assert label in proc.stdout


@pytest.mark.ci
def test_quick_cpu_run_with_the_cuda_tests_and_step1(tiny_data):
    """The whole --quick run (40-70 s on a busy 2-core machine): the nested pytest and step 1 too."""
    proc, r = _quick(tiny_data)
    assert r["failed_parts"] == []
    assert r["tests"]["failed"] == 0 and r["tests"]["errors"] == 0
    assert r["tests"]["passed"] + r["tests"]["skipped"] >= 5  # the tests marked cuda (skipped without a GPU)
    s1 = r["step1"]
    assert s1["returncode"] == 0 and s1["epochs_run"] == 2 and s1["val_mae"] > 0 and s1["wall_seconds"] > 0
    assert "tests (pytest -m cuda)" in proc.stdout and "step 1" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_cuda_without_gpu_is_one_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cuda", "--data-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda needs a CUDA GPU")
    assert not (tmp_path / "benchmarks").exists()
