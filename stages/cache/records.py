"""The cache stage's per-shard work: mask each sample, run the teacher on length-grouped batches, keep its targets."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from formats.cache import CacheRecord
from kd import teachers
from kd.masking import sample_rng
from stages.cache.config import Config


def _length_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Indices grouped into batches of similar length, each at most `batch_tokens` padded tokens."""
    order = np.argsort(lengths, kind="stable")
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > batch_tokens:
            batches.append(np.array(current))
            current = []
        current.append(i)
    return batches + ([np.array(current)] if current else [])


def _pad(arrays: list[np.ndarray], value: int, device) -> torch.Tensor:
    longest = max(a.size for a in arrays)
    out = np.full((len(arrays), longest), value, dtype=np.int64)
    for row, a in enumerate(arrays):
        out[row, :a.size] = a
    return torch.from_numpy(out).to(device)


@torch.inference_mode()
def shard_records(samples: list, masker: Any, model: Any, config: Config, *, device, pad_id: int,
                  vocab_size: int) -> tuple[list, dict]:
    """Cache records (in corpus order) and integer stats for one corpus shard's samples."""
    masked = [masker(s) for s in samples]
    found: dict[int, dict] = {}
    for batch in _length_batches(np.array([m.input_ids.size for m in masked]), config.batch_tokens):
        group = [masked[i] for i in batch]
        ids = _pad([m.input_ids for m in group], pad_id, device)
        types = _pad([m.token_type_ids if m.token_type_ids is not None else np.zeros(m.input_ids.size, np.int64)
                      for m in group], 0, device)
        rows = torch.from_numpy(np.concatenate([np.full(m.positions.size, r) for r, m in enumerate(group)])).to(device)
        cols = torch.from_numpy(np.concatenate([m.positions for m in group])).to(device)
        batch_inputs = {"input_ids": ids, "attention_mask": _attention(group, ids), "token_type_ids": types}
        logits, cls = teachers.masked_lm_logits(model, batch_inputs,
                                       rows, cols, cls_hidden=config.cls_hidden)
        uniforms = None
        if config.sampled:
            uniforms = np.concatenate([sample_rng(masker.spec.mask_seed, m.key, "sampled").random((m.positions.size, config.sampled))
                                       for m in group])
        targets = teachers.teacher_targets(logits[:, :vocab_size], config.k, uniforms)
        bounds = np.concatenate([[0], np.cumsum([m.positions.size for m in group])])
        for r, i in enumerate(batch):
            part = {name: value[bounds[r]:bounds[r + 1]] for name, value in targets.items()}
            if cls is not None:
                part["cls_hidden"] = cls[r].float().cpu().numpy().astype(np.float16)
            found[int(i)] = part
    records = [CacheRecord(key=m.key, positions=m.positions, **found[i]) for i, m in enumerate(masked)]
    stats = {"samples": len(records), "tokens": int(sum(s.input_ids.size for s in samples)),
             "masked": int(sum(m.positions.size for m in masked)),
             "top1_correct": int(sum((r.topk_ids[:, 0] == m.labels).sum() for r, m in zip(records, masked)))}
    return records, stats


def _attention(group: list, ids: torch.Tensor) -> torch.Tensor:
    """1 on each sample's real tokens, 0 on padding (by length, since a masked input may hold pad ids)."""
    lengths = torch.tensor([m.input_ids.size for m in group], device=ids.device)
    return (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).long()
