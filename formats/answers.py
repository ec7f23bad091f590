"""Answer journals: what a served model answered, one JSON line per query, written as it goes.

The extract stage keeps one journal per query set (`answers/<generator>.jsonl`, `answers/test.jsonl`), the
watermarking deployment one of the answers it marked. A batch of answers is appended with a single write and
fsynced before the next batch is asked, so a process killed at any moment leaves every answered batch on disk
and at most one torn last line, which the reader drops (and the next append cuts off). A resumed run therefore
asks only the queries no line records: no query is asked twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from pipeline.manifest import ManifestError


def read(path: Path) -> list[dict]:
    """The complete records of a journal in order (none when it does not exist); a torn last line is ignored,
    a torn line anywhere else means the file was altered, an error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records = []
    for number, line in enumerate(lines[:-1], start=1):  # the part after the last newline is never complete
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ManifestError(f"{path}: line {number} is not JSON; the journal was altered, delete it to re-ask") from None
    return records


def _complete_length(path: Path) -> int:
    data = path.read_bytes() if path.is_file() else b""
    return data.rfind(b"\n") + 1


def append(path: Path, records: Iterable[dict]) -> None:
    """Append `records` in one write, then fsync; a torn line a killed writer left is cut off first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = b"".join(json.dumps(r, sort_keys=True).encode("utf-8") + b"\n" for r in records)
    if not payload:
        return
    keep = _complete_length(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, keep)
        os.lseek(fd, keep, os.SEEK_SET)
        view = memoryview(payload)
        while view:  # os.write may write less than asked (signals, pipes); loop until all of it is down
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def answered(path: Path, texts: list[tuple[str, ...]]) -> dict[int, dict]:
    """Records of `path` by query index, checked against the queries they answer: a journal written for
    other queries (another generator, seed or corpus) is an error naming it, never silently mixed in."""
    found = {}
    for record in read(path):
        i = record["i"]
        if i >= len(texts) or tuple(record["text"]) != tuple(texts[i]):
            raise ManifestError(f"{path}: answer {i} is for another query than this run asks; delete the journal "
                                "(or the stage directory) to start over")
        found[i] = record
    return found
