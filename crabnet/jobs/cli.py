"""Command-line flags shared by the workflow scripts (docs/steps.md)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from crabnet.errors import JobsFailed, UsageError
from crabnet.jobs.signals import EXIT_CODE, Preempted, install_stop_handler, uninstall_stop_handler
from crabnet.progress import say

# the dataset every step's --quick uses, so that the demo steps chain (make demo)
DEMO_DATASET = "aflow__ael_bulk_modulus_vrh"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows the module docstring as written and every flag's default, unless the help text
    already states it (a "default" in the text) or there is none to show (``None``, flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text.lower()
            or any(action.default is v for v in (None, False, argparse.SUPPRESS))
            or action.nargs == 0
        ):
            return text
        return super()._get_help_string(action)


def make_parser(doc: str | None) -> argparse.ArgumentParser:
    """Parser whose description is the script's docstring."""
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


def add_html_js(parser: argparse.ArgumentParser) -> None:
    """Add --html-js: plotly.js inside every HTML file, or one shared copy per folder."""
    from crabnet.plotting import HTML_JS

    parser.add_argument(
        "--html-js",
        default="inline",
        choices=HTML_JS,
        help="inline: each HTML file embeds plotly.js (~4.8 MB, stands alone); shared: one "
        "plotly.min.js per folder beside small HTML files (keep the folder together); "
        "both work offline (default: inline)",
    )


def add_common(
    parser: argparse.ArgumentParser,
    *,
    dataset: str | None = "aflow__Egap",
    quick_help: str = "small settings for a CPU demo",
    device: bool = True,
    seed: bool = True,
    force: bool = True,
) -> None:
    """Add --data-dir, --dataset, --quick and, where the script uses them, --device, --seed and --force."""
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="root of inputs and outputs")
    if dataset is not None:
        parser.add_argument(
            "--dataset",
            default=None,
            help=f"dataset folder under <data-dir>/benchmark_data/ (default {dataset}; with --quick the demo dataset)",
        )
    if device:
        parser.add_argument(
            "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = CUDA when available, else CPU"
        )
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="random seed (runs on CPU are deterministic)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if force:
        parser.add_argument("--force", action="store_true", help="recompute even if outputs are up to date")


def add_training(parser: argparse.ArgumentParser, *, recipe: str = "immi", epochs_step: bool = False) -> None:
    """Add --recipe and --precision (scripts that train a model), and with ``epochs_step`` --epochs-step."""
    if epochs_step:
        cycle = "half-cycle of the cyclic learning rate in epochs (default: the recipe's, 1 for immi, 10 for npj)"
        parser.add_argument("--epochs-step", type=int, default=None, help=cycle)
    parser.add_argument(
        "--recipe",
        default=recipe,
        choices=["immi", "npj"],
        help="training recipe (docs/model-and-recipe.md): immi = the explainability paper's code (learning rate "
        "cycles every 2 epochs), npj = the CrabNet paper's (every 20 epochs; gave the "
        f"published MAEs) (default: {recipe})",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="matmul precision of training: auto = bf16 autocast on CUDA and on CPUs with "
        "AVX-512 bf16/AMX, else fp32; weights, optimiser and loss stay fp32 (default: auto)",
    )


def check_writable(data_dir: Path | str) -> Path:
    """Make sure outputs can be written under ``data_dir``: create it if missing, then create and
    remove a temporary file in it.

    Raises:
        UsageError: ``cannot write to <data_dir> (<reason>)``.
    """
    path = Path(data_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"cannot write to {path} ({err.strerror or err})") from None
    return path


def run(main: Callable[..., int], args: argparse.Namespace) -> int:
    """``main(**vars(args))``, after checking that ``--data-dir`` (if the script has it) can be written.

    A :class:`~crabnet.utils.UsageError` (bad input, missing prerequisite, unavailable device, a
    --data-dir that cannot be written; ``DataError`` is one) becomes one ``error: …`` line on stderr
    and exit code 2. SIGTERM (:func:`crabnet.jobs.signals.install_stop_handler`) makes a training save its
    state and stop, and any other work stop at once: one ``stopped: …`` line on stderr, exit code 143.
    Failed jobs (:class:`~crabnet.errors.JobsFailed`) exit with 1, Ctrl-C with 130, each with one message.
    """
    installed = install_stop_handler()
    try:
        if getattr(args, "data_dir", None) is not None:
            check_writable(args.data_dir)
        return main(**vars(args))
    except UsageError as err:
        say(f"error: {err}", file=sys.stderr)
        return 2
    except Preempted as err:
        say(f"stopped: {err}", file=sys.stderr)
        return EXIT_CODE
    except JobsFailed as err:  # some of a step's jobs failed for good (crabnet.jobs.engine); the others finished
        say(f"error: {err}\nthe other jobs' results are kept; run again to retry the failed ones", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # every step writes finished work at once (caches, checkpoints, state files)
        say("\ninterrupted: finished work is kept; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if installed:
            uninstall_stop_handler()
