"""`distill bench`: run every benchmark, print a table of ratios, write JSON.

Each part (bench/*_bench.py) measures its figures side by side in one process, as medians of repeats, and
returns a dict of numbers. Ratios are what we report: this machine is shared and noisy, and a ratio of two
things measured together survives that far better than an absolute time.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import time
from pathlib import Path

import torch

PARTS = ("shard_bench", "data_bench", "cache_bench", "general_bench", "task_bench")
"""Benchmark modules, each with `run(quick: bool) -> dict[str, float]`."""

GPU_PARTS = ("gpu_bench",)
"""What `distill bench --gpu` runs instead (a CUDA GPU must be visible)."""

KEYS = {
    "cache_write_vs_forward": ("cache writing / bare teacher forward (throughput)", ">= 0.95"),
    "cached_vs_online_share_of_ideal": ("cached vs online teacher step, share of ideal speed-up", ">= 0.90"),
    "reader_vs_trainer": ("reader tokens/s / trainer tokens/s", ">= 20"),
    "reader_rank_scaling": ("per-rank loader tokens/s at 8 simulated ranks / at 1 rank", ">= 0.9"),
    "loader_vs_reader": ("training input path (read, mask, join cache, collate, pin) / bare shard reader", ">= 0.5"),
    "loader_rss_bytes_per_sample": ("resident memory the loader adds per corpus sample (bytes)", "<= 1"),
    "shard_worker_scaling": ("input bytes each of 4 shard workers reads / total input", "<= 0.3"),
    "cache_bytes_per_token": ("cache bytes per corpus token (k=32, 15% masking)", "<= 20"),
    "train_flops_vs_matmul": ("student-training FLOP/s / fp32 matmul FLOP/s", ">= 0.6"),
    "student_cpu_speedup": ("student vs teacher CPU inference speed-up", ">= 5"),
    "task_step_vs_hf_trainer": ("our task-distillation step / HF Trainer step (time)", "<= 1.0"),
}
"""The JSON keys the suite promises, with a description and the goal."""

GPU_KEYS = {
    "gpu_train_tokens_per_s": ("student training tokens/s, bf16, one GPU", "-"),
    "gpu_train_mfu": ("training FLOP/s / measured bf16 matmul FLOP/s", "-"),
    "gpu_cache_write_vs_forward": ("cache writing / bare bf16 teacher forward on the GPU", ">= 0.95"),
}
"""The keys `--gpu` promises."""


def machine() -> dict:
    """What the numbers were measured on."""
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def run_suite(quick: bool, parts: tuple[str, ...] = PARTS, keys: dict = KEYS) -> dict:
    """Run the benchmark parts in order and combine their figures into the promised keys."""
    figures: dict = {}
    timings: dict = {}
    for part in parts:
        module = importlib.import_module(f"bench.{part}")
        start = time.perf_counter()
        figures.update(module.run(quick=quick))
        timings[part] = round(time.perf_counter() - start, 1)
    if "reader_tokens_per_s" in figures and "trainer_tokens_per_s" in figures:
        figures["reader_vs_trainer"] = figures["reader_tokens_per_s"] / figures["trainer_tokens_per_s"]
    result = {key: figures[key] for key in keys if key in figures}
    result["details"] = {k: v for k, v in figures.items() if k not in keys}
    result["seconds"] = timings
    result["machine"] = machine()
    from bench.text import source

    result["text"] = source()
    result["quick"] = quick
    return result


def format_table(result: dict, keys: dict = KEYS) -> str:
    """The promised figures as a plain table with their goals."""
    rows = [("figure", "value", "goal", "what")]
    for key, (what, goal) in keys.items():
        value = result.get(key)
        rows.append((key, "missing" if value is None else f"{value:.3g}", goal, what))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(quick: bool, out: str | None, gpu: bool = False) -> int:
    """Run, print, and write JSON if asked; `gpu` runs the GPU figures (ConfigError without a GPU)."""
    keys = GPU_KEYS if gpu else KEYS
    if gpu:
        from pipeline.train.device import resolve

        resolve("cuda")  # no GPU: one line, exit 2, before anything loads
    result = run_suite(quick, GPU_PARTS, GPU_KEYS) if gpu else run_suite(quick)
    print(format_table(result, keys))
    print(f"machine: {result['machine']['cpu']}, {result['machine']['threads']} threads, torch {result['machine']['torch']}")
    print(f"text: {result.get('text', 'unknown')} (bench/text.py)")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    missing = [k for k in keys if k not in result]
    return 1 if missing else 0
