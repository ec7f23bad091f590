"""Inference speed of a sequence classifier: median latency per batch and throughput, at a fixed shape.

Teacher and student are measured on the same random token ids (same batch size and sequence length,
every token real), alternating repeats so that machine noise hits both alike.
"""

from __future__ import annotations

import statistics
import time

import torch


def _timed(model, batch: dict, device) -> float:
    start = time.perf_counter()
    model(**batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def compare(models: dict, *, vocab_size: int, batch_size: int = 32, seq_len: int = 64, repeats: int = 10,
            warmup: int = 2, device: str = "cpu", seed: int = 0,
            batch: dict | None = None) -> dict[str, dict[str, float]]:
    """{name: {latency_ms, throughput_per_s}} for each model, measured side by side on one input: `batch`
    (model keyword arguments, e.g. encoded text) or random ids of `batch_size` x `seq_len`, every token real."""
    device = torch.device(device)
    if batch is None:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(1000, vocab_size, (batch_size, seq_len), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch = {k: v.to(device) for k, v in batch.items()}
    batch_size = len(batch["input_ids"])
    times = {name: [] for name in models}
    for name, model in models.items():
        model.eval().to(device)
        for _ in range(warmup):
            _timed(model, batch, device)
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(_timed(model, batch, device))
    out = {}
    for name, values in times.items():
        median = statistics.median(values)
        out[name] = {"latency_ms": 1000 * median, "throughput_per_s": batch_size / median}
    return out


def parameter_count(model) -> int:
    """All parameters of a model (embeddings included)."""
    return sum(p.numel() for p in model.parameters())
