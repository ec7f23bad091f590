"""Preemption: a training stage checkpoints at the next step boundary when the scheduler signals, then exits.

Slurm sends SIGUSR1 (`--signal=B:USR1@SECONDS`) or SIGTERM before it kills a job; Kubernetes sends SIGTERM.
The trainer polls `requested()` once per step; when set it saves a checkpoint and raises `Preempted`, which
the CLI turns into exit status EXIT_PREEMPTED so the job script knows to requeue rather than fail.
"""

from __future__ import annotations

import signal
import threading

EXIT_PREEMPTED = 75
"""Exit status of a stage that stopped on a preemption signal after saving a checkpoint (EX_TEMPFAIL)."""

_flag = threading.Event()
_installed: dict[int, object] = {}


class Preempted(Exception):
    """Raised by a trainer after it saved a checkpoint on a preemption signal."""


def install(signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
    """Route the given signals to the preemption flag (main thread only; safe to call twice)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in signals:
        if sig not in _installed:
            _installed[sig] = signal.signal(sig, lambda signum, frame: _flag.set())


def uninstall() -> None:
    """Restore the previous handlers and clear the flag."""
    for sig, previous in _installed.items():
        signal.signal(sig, previous)
    _installed.clear()
    _flag.clear()


def requested() -> bool:
    """True once a preemption signal arrived."""
    return _flag.is_set()


def request() -> None:
    """Set the flag by hand (tests, or a trainer that hit its wall-clock budget)."""
    _flag.set()
