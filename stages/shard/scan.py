"""The shard stage's first two passes: each worker scans its own input pieces once, then dedup over digests.

Scan (per piece, by worker piece % num_workers): read, clean and hash the piece's documents and keep, under
`.scan/`, what the later passes need: per raw document what cleaning did (kept, empty, too long), per kept
document its 16-byte digest (stored bucket by bucket) and split, and the cleaned texts per split
(length-prefixed, zstd). The input is read once in all: the writing pass reads these files, not the input.

Dedup (whichever worker first finds every piece scanned, written atomically to `.scan/dedup.npz`): digests are grouped into
`dedup_buckets` buckets by their first byte pair; one bucket of every piece at a time is held in memory, so the
pass needs about 24 B x documents / buckets, whatever the corpus size. The first copy (lowest piece, then
position) wins, as it always did.

Every scan file is written to a temporary name and renamed; a piece whose files exist is not scanned again.
Once the stage's manifest is written, `clear` removes `.scan/` (the cleaned texts are as large as the input),
keeping only each piece's small record (which worker read which bytes) under `.pieces/`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import zstandard

from pipeline.config import ConfigError
from pipeline.manifest import atomic_path, atomic_write_text
from stages.shard.sources import Piece, clean, doc_hash, read_piece, split_of

SCAN_DIR = ".scan"
PIECES_DIR = ".pieces"
"""Where `clear` keeps each piece's record (path, byte range, worker, input bytes) once the scan is gone."""
KEPT, EMPTY, TOO_LONG = 0, 1, 2
"""What cleaning did to a raw document (the duplicate verdict comes later, from the dedup pass)."""
SPLIT_CODES = {"train": 0, "valid": 1}


def _path(stage_dir: Path, piece: int, name: str) -> Path:
    return stage_dir / SCAN_DIR / f"piece-{piece:06d}.{name}"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def scan_piece(stage_dir: Path, piece: Piece, *, text_field: str, separator: str | None, normalize: str,
               max_doc_chars: int, valid_fraction: float, buckets: int, worker: int = 0) -> None:
    """Scan one piece into `.scan/piece-N.*` (the `.json` record last: a piece is scanned iff it exists).

    The record names the worker and the input bytes the piece spans (a whole file, or its byte range), which
    `distill bench` adds up per worker.
    """
    outcome, digests, splits = [], [], []
    texts: dict[str, list[bytes]] = {split: [] for split in SPLIT_CODES}
    for raw in read_piece(piece, text_field=text_field, separator=separator):
        text = clean(raw, normalize)
        if not text:
            outcome.append(EMPTY)
            continue
        if len(text) > max_doc_chars:
            outcome.append(TOO_LONG)
            continue
        digest = doc_hash(text)
        split = split_of(digest, valid_fraction)
        outcome.append(KEPT)
        digests.append(digest)
        splits.append(SPLIT_CODES[split])
        texts[split].append(text.encode("utf-8"))
    table = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 16)
    bucket = (table[:, 0].astype(np.int64) << 8 | table[:, 1]) % buckets if len(table) else np.zeros(0, np.int64)
    order = np.argsort(bucket, kind="stable")  # bucket by bucket, document order within each
    _save_npy(_path(stage_dir, piece.index, "outcome.npy"), np.array(outcome, dtype=np.uint8))
    _save_npy(_path(stage_dir, piece.index, "split.npy"), np.array(splits, dtype=np.uint8))
    _save_npy(_path(stage_dir, piece.index, "digests.npy"), table[order])
    _save_npy(_path(stage_dir, piece.index, "order.npy"), order.astype(np.int64))
    _save_npy(_path(stage_dir, piece.index, "bucket_starts.npy"),
              np.searchsorted(bucket[order], np.arange(buckets + 1)).astype(np.int64))
    for split, items in texts.items():
        lengths = np.array([len(t) for t in items], dtype=np.int64)
        _save_npy(_path(stage_dir, piece.index, f"{split}.lengths.npy"), lengths)
        with atomic_path(_path(stage_dir, piece.index, f"{split}.zst")) as tmp:
            tmp.write_bytes(zstandard.ZstdCompressor(level=1).compress(b"".join(items)))
    atomic_write_text(_path(stage_dir, piece.index, "json"),
                      json.dumps({"path": str(piece.path), "start": piece.start, "end": piece.end,
                                  "docs": len(outcome), "kept": len(splits), "worker": worker,
                                  "input_bytes": _input_bytes(piece)}, sort_keys=True))


def _input_bytes(piece: Piece) -> int:
    """Bytes of input a piece covers: its byte range, its row groups' compressed size, or the whole file."""
    if piece.end is not None and piece.path.suffix == ".parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(piece.path).metadata
        return sum(meta.row_group(g).column(c).total_compressed_size
                   for g in range(piece.start, piece.end) for c in range(meta.num_columns))
    if piece.end is not None:
        return piece.end - piece.start
    return sum(f.stat().st_size for f in ([piece.path] if piece.path.is_file() else piece.path.rglob("*")) if f.is_file())


def scanned(stage_dir: Path, piece: Piece) -> bool:
    """True when the piece's scan is complete and is of this very piece."""
    record = _path(stage_dir, piece.index, "json")
    if not record.is_file():
        return False
    data = json.loads(record.read_text())
    return (data["path"], data["start"], data["end"]) == (str(piece.path), piece.start, piece.end)


def clear(stage_dir: Path) -> None:
    """Remove the scan once the stage is complete, keeping the piece records. Several workers may finish at
    once and call this together: each step tolerates another having done it."""
    scan_dir, kept = stage_dir / SCAN_DIR, stage_dir / PIECES_DIR
    if not scan_dir.is_dir():
        return
    kept.mkdir(exist_ok=True)
    for record in scan_dir.glob("piece-*.json"):
        try:
            record.replace(kept / record.name)
        except FileNotFoundError:
            pass
    shutil.rmtree(scan_dir, ignore_errors=True)


def mark_started(stage_dir: Path, worker: int) -> None:
    """Record that array worker `worker` is scanning its pieces (so the others wait for them, not redo them)."""
    atomic_write_text(stage_dir / SCAN_DIR / f"worker-{worker:05d}.started", "")


def started(stage_dir: Path, worker: int) -> bool:
    """Whether array worker `worker` has begun scanning in this stage directory."""
    return (stage_dir / SCAN_DIR / f"worker-{worker:05d}.started").is_file()


class StageComplete(Exception):
    """The other workers completed the stage (its manifest exists) while this one waited for their scans."""


def wait_for(paths: list[Path], timeout_s: float, what: str, complete: Callable[[], bool] | None = None) -> None:
    """Poll until every path exists (other array workers write them); ConfigError after `timeout_s`.
    StageComplete when `complete()` turns true first: the scan is cleared once the stage is done, so a worker
    that had nothing left to write would otherwise wait for files that will not come back."""
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        if complete is not None and complete():
            raise StageComplete(what)
        if time.monotonic() > deadline:
            missing = sum(not p.exists() for p in paths)
            raise ConfigError(f"{what}: {missing} of {len(paths)} files still missing after {timeout_s:.0f} s "
                              "(a worker that started scanning stopped; rerun it, or raise wait_timeout_s)")
        time.sleep(0.2)


def dedup(stage_dir: Path, pieces: int, *, buckets: int, enabled: bool) -> None:
    """Write `.scan/dedup.npz`: the (piece, kept-document index) of every duplicate, a bucket at a time."""
    drop_piece, drop_index = [], []
    if enabled:
        digests = [np.load(_path(stage_dir, p, "digests.npy"), mmap_mode="r") for p in range(pieces)]
        orders = [np.load(_path(stage_dir, p, "order.npy"), mmap_mode="r") for p in range(pieces)]
        starts = [np.load(_path(stage_dir, p, "bucket_starts.npy")) for p in range(pieces)]
        for b in range(buckets):
            parts = [(p, digests[p][starts[p][b]:starts[p][b + 1]], orders[p][starts[p][b]:starts[p][b + 1]])
                     for p in range(pieces) if starts[p][b + 1] > starts[p][b]]
            if not parts:
                continue
            table = np.ascontiguousarray(np.concatenate([d for _, d, _ in parts])).view("V16").ravel()
            owner = np.concatenate([np.full(len(d), p) for p, d, _ in parts])
            index = np.concatenate([np.asarray(o) for _, _, o in parts])
            # Concatenated in (piece, position) order, and unique() sorts stably: the first index is the first copy.
            _, first = np.unique(table, return_index=True)
            dup = np.ones(len(table), dtype=bool)
            dup[first] = False
            drop_piece.append(owner[dup])
            drop_index.append(index[dup])
    piece = np.concatenate(drop_piece) if drop_piece else np.zeros(0, np.int64)
    index = np.concatenate(drop_index) if drop_index else np.zeros(0, np.int64)
    with atomic_path(stage_dir / SCAN_DIR / "dedup.npz") as tmp, open(tmp, "wb") as handle:
        np.savez(handle, piece=piece.astype(np.int64), index=index.astype(np.int64))


@dataclass
class Layout:
    """Where every surviving document is: per piece its split codes and keep flags; the max_docs cut applied."""

    splits: list[np.ndarray]
    """Per piece, the split code of each kept document."""
    keep: list[np.ndarray]
    """Per piece, True where a kept document survives dedup and the max_docs prefix."""
    stats: dict[str, int]
    """docs_read, docs_empty, docs_too_long, docs_duplicate, counted as the single pass did."""

    def counts(self, split: str) -> np.ndarray:
        """Surviving documents of `split` per piece."""
        code = SPLIT_CODES[split]
        return np.array([int((k & (s == code)).sum()) for s, k in zip(self.splits, self.keep)], dtype=np.int64)


def layout(stage_dir: Path, pieces: int, max_docs: int | None) -> Layout:
    """Surviving documents per piece from the scan and dedup files (small: bytes per document, no texts)."""
    drops = np.load(stage_dir / SCAN_DIR / "dedup.npz", allow_pickle=False)
    splits, keep, outcomes = [], [], []
    stats = {"docs_read": 0, "docs_empty": 0, "docs_too_long": 0, "docs_duplicate": 0}
    budget = max_docs
    for p in range(pieces):
        outcome = np.load(_path(stage_dir, p, "outcome.npy"))
        split = np.load(_path(stage_dir, p, "split.npy"))
        alive = np.ones(len(split), dtype=bool)
        alive[drops["index"][drops["piece"] == p]] = False
        if budget is not None:
            # The old single pass stopped right after the max_docs-th surviving document: count only up to it.
            if budget <= 0:
                alive[:] = False
                outcome = outcome[:0]
            elif alive.sum() >= budget:
                last = int(np.flatnonzero(alive)[budget - 1])
                alive[last + 1:] = False
                kept_seen = np.cumsum(outcome == KEPT)
                outcome = outcome[: int(np.searchsorted(kept_seen, last + 1)) + 1]
                stats["docs_duplicate"] += int((~alive[: last + 1]).sum())
                budget = 0
            else:
                budget -= int(alive.sum())
                stats["docs_duplicate"] += int((~alive).sum())
        else:
            stats["docs_duplicate"] += int((~alive).sum())
        stats["docs_read"] += len(outcome)
        stats["docs_empty"] += int((outcome == EMPTY).sum())
        stats["docs_too_long"] += int((outcome == TOO_LONG).sum())
        splits.append(split)
        keep.append(alive)
    return Layout(splits, keep, stats)


def texts(stage_dir: Path, lay: Layout, split: str, lo: int, hi: int) -> list[str]:
    """Surviving documents of `split` with ranks [lo, hi), read from the scan files of the pieces holding them."""
    counts = lay.counts(split)
    ends = np.cumsum(counts)
    out: list[str] = []
    code = SPLIT_CODES[split]
    for p in range(int(np.searchsorted(ends, lo, side="right")), len(counts)):
        begin = int(ends[p] - counts[p])
        if begin >= hi:
            break
        lengths = np.load(_path(stage_dir, p, f"{split}.lengths.npy"))
        data = zstandard.ZstdDecompressor().decompress(_path(stage_dir, p, f"{split}.zst").read_bytes(),
                                                       max_output_size=int(lengths.sum()))
        survive = lay.keep[p][lay.splits[p] == code]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        rank = begin
        for i in np.flatnonzero(survive):
            if lo <= rank < hi:
                out.append(data[offsets[i]:offsets[i + 1]].decode("utf-8"))
            rank += 1
            if rank >= hi:
                break
    return out


def pieces_of(stage_dir: Path, count: int) -> Iterator[Path]:
    """The completion records of pieces 0..count-1."""
    return (_path(stage_dir, p, "json") for p in range(count))
