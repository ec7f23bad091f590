"""One readable line per event, printed by the main process; progress bars only on a terminal."""

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


def progress(items: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Wrap an iterable in a tqdm bar when stderr is a terminal, else pass it through unchanged."""
    if _state["quiet"] or not sys.stderr.isatty():
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
