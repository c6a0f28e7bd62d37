"""Progress display for long steps: a spinner per step on a terminal, a log line per step always."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

log = logging.getLogger("nanoexport")
console = Console(stderr=True)


class Steps:
    """Shows named steps as they run; ``seconds`` keeps how long each took."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and console.is_terminal
        self.seconds: dict[str, float] = {}
        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
        )

    def __enter__(self) -> Steps:
        if self.enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.enabled:
            self._progress.stop()

    @contextmanager
    def step(self, name: str) -> Iterator[Callable[[str], None]]:
        """Time the block as step ``name``; yields a function that sets the step's detail text."""
        task = self._progress.add_task(name) if self.enabled else None

        def detail(text: str) -> None:
            if task is not None:
                self._progress.update(task, description=f"{name}: {text}")

        started = time.perf_counter()
        yield detail
        self.seconds[name] = time.perf_counter() - started
        if task is not None:
            self._progress.remove_task(task)
        log.info("%s: %.1fs", name, self.seconds[name])


class Countdown:
    """Counts ``total`` similar pieces of work (layers, tensors) and estimates the time left from the pace so
    far: each piece updates the step's detail, and every tenth of the way is logged, so a CI log shows it too.
    """

    def __init__(self, what: str, total: int, detail: Callable[[str], None] | None = None):
        self.what = what
        self.total = total
        self.detail = detail or (lambda _: None)
        self.done = 0
        self._started = time.perf_counter()
        self._logged_tenths = 0

    def advance(self, name: str = "") -> None:
        """One more piece done; ``name`` says which."""
        self.done += 1
        elapsed = time.perf_counter() - self._started
        left = elapsed / self.done * (self.total - self.done)
        text = f"{self.what} {self.done}/{self.total}{f' {name}' if name else ''}, {_duration(left)} left"
        self.detail(text)
        tenths = self.done * 10 // max(self.total, 1)
        if tenths > self._logged_tenths:
            self._logged_tenths = tenths
            log.info("%s (%s so far)", text, _duration(elapsed))


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
