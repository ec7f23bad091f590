"""Packing token streams into BERT sequences: pure functions, the same documents always give the same sequences."""

from __future__ import annotations

import numpy as np

Sequence = tuple[np.ndarray, np.ndarray]
"""(input_ids int32, token_type_ids uint8) of one packed sample."""


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
