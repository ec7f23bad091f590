"""GPU figures (`distill bench --gpu`), measured side by side in one process on the first visible GPU.

gpu_train_tokens_per_s      tokens per second of the general trainer (cached soft loss, the one trainer's pieces:
                            `Trainee`, `LossPlan`, the torch engine) on the GPU in bf16 autocast
gpu_train_mfu               model FLOPs utilisation: the analytic training FLOP/s of that step (as in
                            general_bench) / the GPU's measured dense bf16 matmul FLOP/s (a large square matmul,
                            so the figure is a share of what this GPU really reaches, not of a datasheet number)
gpu_cache_write_vs_forward  cache-writing throughput / bare bf16 teacher forward on the same batches (the
                            cache stage on the GPU); with `gpu_cache_tokens_per_s` and `gpu_forward_tokens_per_s`

Without a visible CUDA GPU the verb prints one line and exits 2.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch


def _peak_bf16(device, size: int = 8192, repeats: int = 10) -> float:
    """Measured dense bf16 matmul FLOP/s on `device`."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return repeats * 2 * size**3 / (time.perf_counter() - start)


def _train(device, quick: bool) -> dict:
    from bench.general_bench import _batches, _train_flops, _with_topk, setup_for, trainer_pieces

    steps, batch, seq = (10, 64, 128) if quick else (30, 128, 128)
    tokenizer, teacher, trainee, plan, engine = trainer_pieces(batch, precision="bf16", device=device)
    batches = [_with_topk(teacher, b) for b in _batches(tokenizer, steps, batch, seq)]
    setup = setup_for(teacher, online=False)

    def step(b):
        loss, _ = plan(engine, engine.to_device(b), setup)
        engine.backward(loss)
        engine.step()

    for b in batches[:3]:
        step(b)  # warm-up: kernels, allocator
    torch.cuda.synchronize(device)
    times = []
    for b in batches:
        start = time.perf_counter()
        step(b)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    t = statistics.median(times)
    tokens = int(batches[0]["attention_mask"].sum())
    flops = _train_flops(trainee.student.config, tokens, int(len(batches[0]["labels"])), seq) / t
    peak = _peak_bf16(device)
    return {"gpu_train_tokens_per_s": tokens / t, "gpu_train_mfu": flops / peak, "gpu_train_tflops": flops / 1e12,
            "gpu_bf16_matmul_tflops": peak / 1e12, "gpu_train_step_s": t}


def _cache(device, quick: bool) -> dict:
    from transformers import AutoTokenizer

    from bench.cache_bench import MINILM, _samples, _throughput_ratio
    from pipeline.assets import resolve_asset

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_asset(MINILM)))
    samples = _samples(tokenizer, 3000 if quick else 12000)
    with tempfile.TemporaryDirectory(prefix="gpu-cache-bench-") as tmp:
        figures = _throughput_ratio(samples, tokenizer, 3 if quick else 5, Path(tmp), chunk=512, device=device,
                                    dtype="bf16")
    return {"gpu_cache_write_vs_forward": figures["cache_write_vs_forward"],
            "gpu_forward_tokens_per_s": figures["cache_forward_tokens_per_s"],
            "gpu_cache_tokens_per_s": figures["cache_write_tokens_per_s"]}


def run(quick: bool) -> dict:
    """The GPU figures on cuda:0 (ConfigError, one line, without a GPU)."""
    from pipeline.train.device import resolve, use

    device = use(resolve("cuda"))
    return {**_train(device, quick), **_cache(device, quick), "gpu_name": torch.cuda.get_device_name(device)}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
