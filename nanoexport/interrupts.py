"""SIGINT and SIGTERM as an exception that cleans up, and the few steps an interrupt must not split.

The command line turns both signals into ``Interrupted`` raised in the main thread, so every ``finally`` runs
(the artifact's staging folder is removed) and the process exits with 128 + the signal number. A step
inside ``uninterrupted()`` (taking the destination's lock and creating the staging folder, the final rename,
the clean-up) finishes first; the interrupt is raised when it ends. Library users who install no handler keep
Python's own behaviour.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

HANDLED = (signal.SIGINT, signal.SIGTERM)
_depth = 0  # nesting of uninterrupted() blocks in progress
_pending: int | None = None  # a signal that arrived inside one


class Interrupted(BaseException):
    """A SIGINT or SIGTERM. A BaseException, so that ``except Exception`` cannot swallow it."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


def raise_interrupted(signal_number: int, frame: object) -> None:
    """The signal handler: raises ``Interrupted`` now, or at the end of the ``uninterrupted()`` block."""
    global _pending
    for number in HANDLED:  # a second Ctrl-C must not cut the clean-up of the first one short
        signal.signal(number, signal.SIG_IGN)
    if _depth:
        _pending = signal_number
        return
    raise Interrupted(signal_number)


@contextmanager
def handling_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Interrupted`` inside the block; the previous handlers come back after it."""
    previous = {number: signal.signal(number, raise_interrupted) for number in HANDLED}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Steps that must not be split by an interrupt; one arriving meanwhile is raised when they are done."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending is not None:
            signal_number, _pending = _pending, None
            raise Interrupted(signal_number)
