"""The GPU path, wherever a CUDA GPU is visible: every stage on a tiny corpus on the GPU in bf16, the trainer's
device placement, and 2 ranks under DDP and DeepSpeed ZeRO 0/2/3 (one rank per GPU with 2 or more GPUs; with
one GPU both ranks share it and gloo carries the CUDA collectives, see pipeline/train/dist.py).

These are the only tests that skip, and only when no CUDA GPU is visible. They have not run yet: no GPU was
lent while they were written (docs/training.md says what they cover).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import SHARED_DATA

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")]


def _recipe(root: Path, device: str) -> tuple[Path, Path]:
    from tests.dist.general_inputs import build
    from tests.dist.test_train_dist import tiny_classifier_encoder

    recipe, reference = build(root, dropout=0.0, cache=False)
    tree = yaml.safe_load(recipe.read_text())
    teacher = tree["stages"]["general"]["teacher_path"]
    data = {"train": f"{SHARED_DATA}/sst2/train.tsv", "dev": f"{SHARED_DATA}/sst2/dev.tsv", "limit_train": 48,
            "limit_dev": 16, "max_length": 24}
    gpu = {"device": device, "precision": "bf16"}
    tree["stages"].update({
        "teacher_adapt": {"teacher_path": teacher, "steps": 4, "batch_size": 8, "eval_samples": 16,
                          "checkpoint_every": 2, **gpu},
        "cache": {**tree["stages"]["cache"], "teacher": "@teacher_adapt", "teacher_path": None, "dtype": "bf16",
                  "device": device},
        "general": {**tree["stages"]["general"], "teacher_dtype": "bf16", **gpu},
        "teacher_finetune": {"teacher_path": str(tiny_classifier_encoder(root / "encoder")), "data": data,
                             "epochs": 1, "batch_size": 8, "eval_every": 3, "lr": 1.0e-3, **gpu},
        "augment": {"data": {**data, "limit_train": 8}, "n_aug": 2, "top_k": 4, "teacher": "@teacher_finetune",
                    "chunk_size": 8, "device": device},
        "task": {"data": data, "teacher": "@teacher_finetune", "augmented": "@augment", "student": "@general",
                 "max_steps": 3, "batch_size": 8, "latency_repeats": 1, "latency_batch_size": 2,
                 "latency_seq_len": 8, **gpu},
    })
    tree["stages"]["cache"].pop("teacher_path")
    path = root / "gpu.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path, reference


def test_device_resolution_on_this_machine():
    from pipeline.train.device import precision, resolve
    from pipeline.world import World

    assert resolve("auto", World()) == torch.device("cuda", 0)
    assert precision("auto", torch.device("cuda", 0)) == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")


def test_engine_places_module_batches_and_autocast_on_the_gpu():
    from pipeline.train.engine import EngineSettings, build_engine
    from pipeline.world import World

    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    engine = build_engine(model, settings=EngineSettings(backend="torch", precision="bf16",
                                                         device=torch.device("cuda", 0)), world=World())
    batch = engine.to_device({"x": torch.randn(4, 6)})
    assert batch["x"].is_cuda and next(engine.module.parameters()).is_cuda
    out = engine.forward(batch["x"])
    assert out.dtype == torch.bfloat16
    engine.backward(out.float().pow(2).mean())
    assert engine.step()


def test_every_stage_on_the_gpu_in_bf16(tmp_path):
    from pipeline.recipe import load_recipe
    from pipeline.runner import run_recipe
    from tests.dist.general_inputs import fresh_run

    recipe, reference = _recipe(tmp_path, "cuda")
    run_dir = fresh_run(reference, tmp_path / "run")
    stages = ["teacher_adapt", "cache", "general", "teacher_finetune", "augment", "task"]
    done = run_recipe(load_recipe(recipe), run_dir, stages=stages)
    assert all(done[s] is not None for s in stages)
    report = json.loads((run_dir / "task" / "report.json").read_text())
    assert report["summary"]["device"] == "cuda:0"
    assert report["student"]["device_latency_ms"] > 0 and report["student"]["latency_ms"] > 0
    assert json.loads((run_dir / "general" / "checkpoints" / "step-4" / "meta.json").read_text())["world_size"] == 1


@pytest.mark.parametrize("zero", [None, 0, 2, 3])
def test_general_two_ranks_on_the_gpu(tmp_path, zero):
    from tests.dist.general_inputs import fresh_run, run_torchrun_stages, variants_recipe

    recipe, reference = _recipe(tmp_path, "cuda" if torch.cuda.device_count() >= 2 else "cuda:0")
    engine = {"engine": "torch"} if zero is None else {"engine": "deepspeed", "zero_stage": zero}
    recipe = variants_recipe(recipe, {"two": {"max_steps": 4, "checkpoint_every": 2, "eval_every": 0, **engine}})
    run_dir = fresh_run(reference, tmp_path / "run")
    result = run_torchrun_stages(recipe, run_dir, ["two"])
    assert result.returncode == 0, result.stderr[-4000:]
    meta = json.loads((run_dir / "two" / "checkpoints" / "step-4" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == (zero or 0)


def test_finetune_and_task_two_ranks_zero2_on_the_gpu(tmp_path):
    from tests.dist.general_inputs import run_torchrun_stages

    recipe, _ = _recipe(tmp_path, "cuda" if torch.cuda.device_count() >= 2 else "cuda:0")
    tree = yaml.safe_load(recipe.read_text())
    for name in ("teacher_finetune", "task"):
        tree["stages"][name].update(engine="deepspeed", zero_stage=2)
    tree["stages"]["task"].update(augmented=None, student=None, objective="tinybert", student_init={"num_layers": 1})
    recipe.write_text(yaml.safe_dump(tree, sort_keys=False))
    result = run_torchrun_stages(recipe, tmp_path / "run", ["teacher_finetune", "task"])
    assert result.returncode == 0, result.stderr[-4000:]
