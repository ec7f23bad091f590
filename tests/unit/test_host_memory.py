"""A CPU training process keeps freed large buffers in its heap (glibc): the next step reuses them instead of
mapping and faulting in fresh pages. Each case runs in its own process, since the setting is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = r"""
import ctypes, json, sys
import torch
from pipeline.train.engine import EngineSettings, build_engine
from pipeline.world import World

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
build_engine(torch.nn.Linear(4, 4), settings=EngineSettings(backend="torch", keep_host_memory=sys.argv[1] == "keep"),
             world=World())
big = torch.ones(64 << 18)  # 64 MiB, above glibc's largest mmap threshold
mapped = libc.mallinfo2().hblkhd
del big
print(json.dumps({"mapped": mapped}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_training_keeps_large_buffers_in_the_heap_unless_turned_off():
    kept, default = _probe("keep"), _probe("system")
    assert kept["mapped"] < 64 << 20, "a 64 MiB tensor was served by mmap with keep_host_memory on"
    assert default["mapped"] >= 64 << 20, "glibc's default should map a 64 MiB tensor (the probe measures nothing)"


def test_keep_host_memory_is_a_training_key_outside_the_config_hash():
    from pipeline.train.optim import TrainConfig

    settings = TrainConfig(keep_host_memory=False).engine_settings(total_steps=1, micro_batch_size=1, world=None)
    assert settings.keep_host_memory is False and TrainConfig().keep_host_memory is True
    from dataclasses import fields

    assert next(f for f in fields(TrainConfig) if f.name == "keep_host_memory").metadata["hash"] is False
