"""Stopping on SIGTERM (SLURM's warning before preemption or the walltime): save, then exit promptly.

``STOP`` is a process-wide flag. :func:`install_stop_handler` (``crabnet.jobs.cli.run`` calls it) makes
SIGTERM set it. Inside a training (:func:`deferred_stop`, entered by ``crabnet.training.loop.fit``) that is
all the handler does: ``fit`` checks the flag after every batch, saves its training state and raises
:class:`Preempted`, so the same command started again goes on from there. Outside a training the
handler raises :class:`Preempted` at once (as Ctrl-C raises ``KeyboardInterrupt``), so a script
never ignores SIGTERM. ``crabnet.jobs.cli.run`` turns ``Preempted`` into one ``stopped: …`` line on
stderr and exit code 143 (128 + SIGTERM).

Code that trains in worker threads (where signal handlers cannot run) may set ``STOP`` itself
to ask every running ``fit`` to save and stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

STOP = threading.Event()  # set: this process was asked to stop (SIGTERM); trainings save their state and stop
EXIT_CODE = 128 + signal.SIGTERM  # 143: the exit code of a process stopped by SIGTERM


class Preempted(Exception):
    """The process was asked to stop (SIGTERM); the message says where the training state was saved."""


_lock = threading.Lock()
_previous: dict[str, object] = {}  # the handler that install_stop_handler replaced ("handler" key)
_interrupt = True  # raise Preempted from the handler outside deferred_stop()
_deferring = 0  # depth of deferred_stop() in the main thread


def _handler(signum: int, frame) -> None:
    """SIGTERM: set ``STOP``; chain to a previous Python handler; raise ``Preempted`` outside a training.

    In a forked child (a worker process that inherited the handler) SIGTERM acts as it did before.
    """
    previous = _previous.get("handler")
    if _previous.get("pid") != os.getpid():
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    STOP.set()
    if callable(previous):
        previous(signum, frame)
    if _interrupt and not _deferring:
        raise Preempted("SIGTERM received (no training state to save)")


def install_stop_handler(*, interrupt: bool = True) -> bool:
    """Make SIGTERM set :data:`STOP` (idempotent; only the main thread can install signal handlers).

    A previous Python handler is still called after the flag is set; :func:`uninstall_stop_handler`
    puts it back.

    Args:
        interrupt: also raise :class:`Preempted` in the main thread when SIGTERM arrives outside
            :func:`deferred_stop` (scripts: stop promptly wherever they are). False only sets the
            flag (a process whose trainings run in worker threads and check ``STOP`` themselves).

    Returns:
        Whether this call installed the handler (False: already installed, or not the main thread).
    """
    global _interrupt
    if threading.current_thread() is not threading.main_thread():
        return False
    with _lock:
        _interrupt = interrupt
        current = signal.getsignal(signal.SIGTERM)
        if current is _handler:
            return False
        _previous["handler"], _previous["pid"] = current, os.getpid()
        signal.signal(signal.SIGTERM, _handler)
        return True


def uninstall_stop_handler() -> None:
    """Put back the SIGTERM handler that :func:`install_stop_handler` replaced (no-op if not installed)."""
    if threading.current_thread() is not threading.main_thread():
        return
    with _lock:
        if signal.getsignal(signal.SIGTERM) is _handler and "handler" in _previous:
            previous = _previous.pop("handler")
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def deferred_stop() -> Iterator[None]:
    """Inside: SIGTERM only sets :data:`STOP` (the code checks it at safe points, e.g. after a batch).

    Leaving the outermost one normally while the handler is installed and ``STOP`` is set raises
    :class:`Preempted` (a SIGTERM the code inside did not act on). Only the main thread defers:
    elsewhere this does nothing (the handler runs in the main thread). Also usable as a decorator.
    """
    global _deferring
    main = threading.current_thread() is threading.main_thread()
    if main:
        _deferring += 1
    try:
        yield
    finally:
        if main:
            _deferring -= 1
    if main and not _deferring and _interrupt and STOP.is_set() and signal.getsignal(signal.SIGTERM) is _handler:
        raise Preempted("SIGTERM received")
