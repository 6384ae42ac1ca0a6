"""SIGINT and SIGTERM held back once a change has happened.

From the moment a change switches the link, stopping halfway would only leave clean-up for the
next command and report a failure for a change that is live. So from the switch on, the two
signals are recorded instead of acted on: until the change is retired (a library caller), or
until the command exits (the CLI, so that its report is written too), which then says they came.
Only the main thread can take signals in Python; elsewhere holding does nothing.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

_saved: dict[int, Any] = {}
_caught: list[str] = []
_until_exit = False


def _record(signum: int, _frame: object) -> None:
    _caught.append(signal.Signals(signum).name)


def until_exit() -> None:
    """Hold, once held, until the process calls release() at its end (the CLI)."""
    global _until_exit
    _until_exit = True


def hold() -> None:
    """Record SIGINT and SIGTERM instead of acting on them (again: no effect)."""
    if _saved or threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        _saved[sig] = signal.signal(sig, _record)


def done() -> list[str]:
    """The change is retired: release the signals, unless they are held until exit. Returns
    those that came (to say so), or nothing when the exit will say it."""
    return [] if _until_exit else release()


def release() -> list[str]:
    """Act on signals again; returns the names of those that came while held."""
    for sig, handler in _saved.items():
        signal.signal(sig, handler)
    _saved.clear()
    caught = list(dict.fromkeys(_caught))
    _caught.clear()
    return caught
