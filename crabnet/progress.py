"""The one writer of progress bars and log lines, and the one duration format.

Every long loop of the package shows a tqdm bar on a terminal and goes quiet elsewhere (a cluster
job's log, a pipe); where a bar stays quiet, the loops that take minutes (training epochs, jobs of
the engine) print one plain line per unit of work instead, through :func:`say`.

Usage::

    for x in bar(items, desc="videos", unit="compound"):
        ...
    say(f"epoch 3/50 elapsed {duration(75)}")  # -> epoch 3/50 elapsed 1:15
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


def duration(seconds: float) -> str:
    """A duration as ``m:ss``, or ``h:mm:ss`` from one hour on (``75`` -> ``1:15``, ``3725`` -> ``1:02:05``)."""
    m, s = divmod(round(max(seconds, 0.0)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def on_terminal() -> bool:
    """Whether both stdout and stderr are terminals (where a tqdm bar is drawn)."""

    def tty(stream: Any) -> bool:
        return bool(getattr(stream, "isatty", lambda: False)())

    return tty(sys.stdout) and tty(sys.stderr)


def plain_lines(progress: bool | None) -> bool:
    """Whether a loop prints plain lines instead of a bar: ``progress`` None (automatic) off a terminal."""
    return progress is None and not on_terminal()


def bar(iterable: Iterable | None = None, progress: bool | None = None, **kwargs: Any) -> Any:
    """A tqdm bar: ``progress`` None draws it on a terminal only, True always, False never.

    Args:
        iterable: what to iterate over (None: update the bar by hand, with ``total=``).
        progress: None (automatic), True or False.
        **kwargs: tqdm's own options (``desc``, ``unit``, ``total``, ``leave``, ...).
    """
    from tqdm.auto import tqdm

    disable = None if progress is None else not progress
    return tqdm(iterable, disable=kwargs.pop("disable", disable), **kwargs)


def say(*parts: Any, file: Any = None) -> None:
    """One log line, flushed at once (a job's log shows it while the job runs)."""
    print(*parts, file=file or sys.stdout, flush=True)
