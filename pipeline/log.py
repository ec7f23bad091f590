"""One readable line per event, printed by the main process; progress bars on a terminal, plain lines elsewhere.

Every long loop shows progress a person can follow: a tqdm bar with rate and ETA when stderr is a terminal,
and periodic plain lines (count, rate, ETA) when it is not, which is what Slurm and Kubernetes logs capture.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

from pipeline.secrets import scrub

T = TypeVar("T")
_state = {"quiet": False, "prefix": ""}


def configure(*, quiet: bool = False, prefix: str = "") -> None:
    """Silence non-main processes (`quiet`) and tag lines from workers (`prefix`)."""
    _state.update(quiet=quiet, prefix=prefix)


def info(message: str) -> None:
    """Print one timestamped line to stderr."""
    if not _state["quiet"]:
        print(f"{time.strftime('%H:%M:%S')} {_state['prefix']}{scrub(message)}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """Print a warning line, even on quiet processes."""
    print(f"{time.strftime('%H:%M:%S')} {_state['prefix']}warning: {scrub(message)}", file=sys.stderr, flush=True)


LINE_EVERY_S = 30.0
"""Seconds between plain progress lines when stderr is not a terminal."""


def eta(seconds: float) -> str:
    """H:MM:SS."""
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress(items: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it",
             every_s: float = LINE_EVERY_S) -> Iterator[T]:
    """Wrap an iterable in a tqdm bar when stderr is a terminal; elsewhere print a line (done, rate, ETA)
    every `every_s` seconds and one at the end (unless the loop was over within `every_s / 6`)."""
    if _state["quiet"]:
        yield from items
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    started = last = time.monotonic()
    done = printed = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s:
            last, printed = now, printed + 1
            info(_line(desc, done, total, unit, now - started))
    elapsed = time.monotonic() - started
    if done and (printed or elapsed >= every_s / 6):  # a loop over in a few seconds needs no closing line
        info(_line(desc, done, total, unit, elapsed))


def _line(desc: str, done: int, total: int | None, unit: str, elapsed: float) -> str:
    rate = done / max(elapsed, 1e-9)
    left = f", ETA {eta((total - done) / rate)}" if total and rate > 0 else ""
    return f"{desc}: {done}{f'/{total}' if total else ''} {unit}, {rate:.2f} {unit}/s{left}"


class Progress:
    """Progress of a training loop: a tqdm bar on a terminal (rate, ETA, last loss), else the `report` lines.

    `advance()` once per optimizer step is cheap (no host sync); `report(step, fields)` prints
    `desc step N/T k v ... ETA` (plain) or updates the bar's postfix (terminal).
    """

    def __init__(self, desc: str, total: int, *, start: int = 0, unit: str = "step"):
        self.desc, self.total, self.start = desc, total, start
        self.started = time.monotonic()
        self.bar = None
        if not _state["quiet"] and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, total=total, initial=start, unit=unit, leave=False, dynamic_ncols=True)

    def advance(self) -> None:
        """One step done."""
        if self.bar is not None:
            self.bar.update(1)

    def report(self, step: int, fields: dict[str, str]) -> None:
        """Show the fields of step `step` (already formatted)."""
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            return
        rate = (step - self.start) / max(time.monotonic() - self.started, 1e-9)
        left = f" ETA {eta((self.total - step) / rate)}" if rate > 0 else ""
        info(f"{self.desc} step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in fields.items()) + left)

    def close(self) -> None:
        """Remove the bar."""
        if self.bar is not None:
            self.bar.close()
