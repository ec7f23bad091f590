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


@torch.inference_mode()
def shard_records(samples: list, masker: Any, model: Any, config: Config, *, device, pad_id: int,
                  vocab_size: int) -> tuple[list, dict]:
    """Cache records (in corpus order) and integer stats for one corpus shard's samples.

    The teacher's next batch is launched before the CPU work on the last one (top-k, tail, sampled draws
    and the copy to host) runs on a helper thread, so the two overlap; the bytes are the same either way.
    """
    from concurrent.futures import ThreadPoolExecutor

    masked = masker.batch(samples)  # one vectorised pass; the same masks as masking each sample
    starts = np.concatenate([[0], np.cumsum(masked.lengths)])
    mstarts = np.concatenate([[0], np.cumsum(masked.n_masked)])
    found: dict[int, dict] = {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-targets") as pool:
        pending = None
        for batch in _length_batches(masked.lengths, config.batch_tokens):
            logits, cls, group = _forward(masked, starts, mstarts, batch, model, config, device, pad_id)
            if pending is not None:
                found.update(pending.result())
            pending = pool.submit(_targets, logits, cls, group, masked, mstarts, masker, config, vocab_size)
        if pending is not None:
            found.update(pending.result())
    records = [CacheRecord(key=key, positions=masked.positions[mstarts[i]:mstarts[i + 1]], **found[i])
               for i, key in enumerate(masked.keys)]
    stats = {"samples": len(records), "tokens": int(masked.lengths.sum()), "masked": int(masked.n_masked.sum()),
             "top1_correct": int(sum((r.topk_ids[:, 0] == masked.labels[mstarts[i]:mstarts[i + 1]]).sum()
                                     for i, r in enumerate(records)))}
    return records, stats


def _forward(masked, starts, mstarts, batch: np.ndarray, model, config: Config, device, pad_id: int):
    """Teacher logits at the masked positions of one length-grouped batch (rows and cols built vectorised)."""
    lengths, counts = masked.lengths[batch], masked.n_masked[batch]
    inner = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    source = np.repeat(starts[batch], lengths) + inner
    rows = np.repeat(np.arange(len(batch)), lengths)
    ids = np.full((len(batch), int(lengths.max())), pad_id, dtype=np.int64)
    types = np.zeros_like(ids)
    ids[rows, inner] = masked.input_ids[source]
    types[rows, inner] = masked.token_type_ids[source]
    minner = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    cols = masked.positions[np.repeat(mstarts[batch], counts) + minner]
    ids_t = torch.from_numpy(ids).to(device)
    lengths_t = torch.from_numpy(lengths).to(device)
    attention = (torch.arange(ids_t.shape[1], device=device)[None, :] < lengths_t[:, None]).long()
    inputs = {"input_ids": ids_t, "attention_mask": attention, "token_type_ids": torch.from_numpy(types).to(device)}
    logits, cls = teachers.masked_lm_logits(model, inputs, torch.from_numpy(np.repeat(np.arange(len(batch)), counts)).to(device),
                                            torch.from_numpy(cols).to(device), cls_hidden=config.cls_hidden)
    return logits, cls, batch


@torch.inference_mode()
def _targets(logits, cls, group: np.ndarray, masked, mstarts, masker, config: Config, vocab_size: int) -> dict[int, dict]:
    """What the cache keeps for each sample of one batch (runs on the helper thread)."""
    uniforms = None
    if config.sampled:
        uniforms = np.concatenate([sample_rng(masker.spec.mask_seed, masked.keys[i], "sampled")
                                   .random((int(masked.n_masked[i]), config.sampled)) for i in group])
    targets = teachers.teacher_targets(logits[:, :vocab_size], config.k, uniforms,
                                       sample_temperature=config.sample_temperature,
                                       tail_temperatures=tuple(config.stored_tail_temperatures[1:]))
    cls_np = cls.float().cpu().numpy().astype(np.float16) if cls is not None else None
    bounds = np.concatenate([[0], np.cumsum(masked.n_masked[group])])
    out = {}
    for r, i in enumerate(group):
        part = {name: value[bounds[r]:bounds[r + 1]] for name, value in targets.items()}
        if cls_np is not None:
            part["cls_hidden"] = cls_np[r]
        out[int(i)] = part
    return out
