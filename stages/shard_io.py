"""Packing token streams into BERT sequences, and writing them as reproducible webdataset tar shards.

Pure functions of their inputs: the same documents always give the same sequences and the same bytes
(tar members carry fixed names, mtimes, owners and modes).
"""

from __future__ import annotations

import io
import os
import signal
import tarfile
from pathlib import Path

import numpy as np

from pipeline.manifest import atomic_path

Sequence = tuple[np.ndarray, np.ndarray]
"""(input_ids int32, token_type_ids uint8) of one packed sample."""
MEMBERS = ("input_ids.npy", "token_type_ids.npy")


def pack_plain(docs: list[np.ndarray], max_seq_len: int, cls_id: int, sep_id: int) -> list[Sequence]:
    """`[CLS] chunk [SEP]` over the stream doc1 [SEP] doc2 [SEP] ... docN, cut every max_seq_len - 2 tokens.

    Every document token appears exactly once, in order; only the last sequence may be shorter.
    """
    if not docs:
        return []
    body = max_seq_len - 2
    parts: list[np.ndarray] = []
    separator = np.array([sep_id], dtype=np.int32)
    for i, doc in enumerate(docs):
        if i:
            parts.append(separator)
        parts.append(doc.astype(np.int32, copy=False))
    stream = np.concatenate(parts)
    cls, sep = np.array([cls_id], np.int32), separator
    out = []
    for start in range(0, len(stream), body):
        ids = np.concatenate([cls, stream[start:start + body], sep])
        out.append((ids, np.zeros(len(ids), np.uint8)))
    return out


def pack_pairs(docs: list[np.ndarray], max_seq_len: int, cls_id: int, sep_id: int) -> list[Sequence]:
    """`[CLS] A [SEP] B [SEP]` (types 0 then 1) over the concatenated documents, max_seq_len - 3 content tokens each.

    A and B are split at the document boundary nearest the middle of the chunk, or at the middle when the
    chunk lies inside one document; a one-token final chunk has no B. No document token is dropped.
    """
    if not docs:
        return []
    body = max_seq_len - 3
    stream = np.concatenate([d.astype(np.int32, copy=False) for d in docs])
    bounds = np.cumsum([len(d) for d in docs])[:-1]
    out = []
    for start in range(0, len(stream), body):
        end = min(start + body, len(stream))
        inside = bounds[(bounds > start) & (bounds < end)]
        middle = (start + end) / 2
        cut = int(inside[np.argmin(np.abs(inside - middle))]) if len(inside) else start + (end - start) // 2
        a, b = stream[start:cut], stream[cut:end]
        if len(a) == 0:
            a, b = b, a
        ids = np.concatenate([[cls_id], a, [sep_id]] + ([b, [sep_id]] if len(b) else [])).astype(np.int32)
        types = np.zeros(len(ids), np.uint8)
        types[len(a) + 2:] = 1
        out.append((ids, types))
    return out


def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy encoding of an array (never pickled)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _KillAfter(io.RawIOBase):
    """Test hook: a file wrapper that SIGKILLs the process once `limit` bytes were written, mid-shard."""

    def __init__(self, handle, limit: int):
        self.handle, self.limit, self.count = handle, limit, 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.handle.tell()

    def write(self, data) -> int:
        self.count += len(data)
        if self.count >= self.limit:
            self.handle.write(bytes(data)[: max(0, len(data) - (self.count - self.limit))])
            self.handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.handle.write(data)


def write_shard(path: Path, prefix: str, samples: list[Sequence], *, kill_after_bytes: int | None = None) -> None:
    """Write `samples` to the tar `path` (temporary name, fsync, rename); keys are `{prefix}-{i:06d}`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        handle = _KillAfter(raw, kill_after_bytes) if kill_after_bytes is not None else raw
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, (ids, types) in enumerate(samples):
                key = f"{prefix}-{i:06d}"
                for member, array in zip(MEMBERS, (ids.astype(np.int32), types.astype(np.uint8))):
                    data = npy_bytes(array)
                    tar.addfile(_member(f"{key}.{member}", len(data)), io.BytesIO(data))
