"""The command-line contract: help shows every default once; errors are one line with exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from crabnet.jobs.cli import make_parser

ROOT = Path(__file__).resolve().parents[1]


def _help() -> str:
    p = make_parser("doc")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--dataset", default=None, help="dataset (default: all)")
    p.add_argument("--layers", default=None, help="layers")
    p.add_argument("--quick", action="store_true", help="demo")
    p.add_argument("--fps", type=float, default=10.0, help="frames per second (default 10)")
    return " ".join(p.format_help().split())


def test_zero_default_is_shown():
    assert "random seed (default: 0)" in _help()


def test_stated_or_missing_defaults_are_not_repeated():
    text = _help()
    assert "(default: None)" not in text
    assert "(default: False)" not in text
    assert text.count("default: all") == 1
    assert "(default 10) (default" not in text


def test_usage_errors_are_one_line_with_exit_code_2(capsys):
    import argparse

    from crabnet.errors import DataError, UsageError
    from crabnet.jobs.cli import run

    def main(problem):
        raise problem

    for problem in (UsageError("bad flag"), DataError("train.csv row 3: bad formula 'Xx'")):
        assert run(main, argparse.Namespace(problem=problem)) == 2
        err = capsys.readouterr().err
        assert err == f"error: {problem}\n"
    # other exceptions are bugs: they keep their traceback
    with pytest.raises(KeyError):
        run(main, argparse.Namespace(problem=KeyError("x")))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message of a machine without a GPU")
@pytest.mark.parametrize(
    "script", ["get_training_attention.py", "get_crabnet_embeddings.py", "plot_global_edm_umap.py"]
)
def test_cuda_without_gpu_is_a_clear_error(script, tiny_data):
    run = subprocess.run(
        [sys.executable, str(ROOT / script), "--data-dir", str(tiny_data), "--dataset", "tiny", "--device", "cuda"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2
    assert "error: --device cuda was requested but no CUDA GPU is available" in run.stderr
    assert "Traceback" not in run.stderr
