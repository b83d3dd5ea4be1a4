"""Every error type of the package, in one place.

A ``UsageError`` (and its subclasses) is the user's to fix: the scripts report it as one ``error: …`` line
on stderr with exit code 2 (``crabnet.jobs.cli.run``), without a traceback. The others are failures of a tool or
of jobs, reported with their message and exit code 1.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input, a missing prerequisite or an unavailable device."""


class DataError(UsageError):
    """A dataset file or formula that cannot be used, with a message naming where."""


class UmapParamError(UsageError):
    """A UMAP setting that cannot work, with a message naming it."""


class VideoError(RuntimeError):
    """Rendering or encoding a video failed (the message names the compound and, for ffmpeg, its stderr)."""


class JobsFailed(RuntimeError):
    """Some jobs failed (after their retries); the others finished. ``failures``: (name, error text)."""

    def __init__(self, failures: list[tuple[str, str]], total: int):
        self.failures = failures
        lines = [f"{len(failures)} of {total} job(s) failed:"] + [f"  {name}: {err}" for name, err in failures]
        super().__init__("\n".join(lines))
