"""Stage `general` on 2 ranks (torchrun, gloo) under the torch engine (DDP) and DeepSpeed ZeRO 0, 2 and 3: the
same losses and weights as one process on the same global batch, and a 2-rank checkpoint resumed on 1 rank.

One torchrun runs the four variants as four stages of one recipe (interpreter starts dominate here).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.dist.general_inputs import (build, fresh_run, run_torchrun_stages,
                                       variants_recipe)

# Dropout is off (the teacher's config, inherited by the student): two ranks draw other dropout masks than
# one process, so only then can the runs agree.
COMMON = {"max_steps": 4, "checkpoint_every": 2, "eval_every": 0, "lr": 3.0e-3}
ZERO = {f"zero{z}": {**COMMON, "engine": "deepspeed", "zero_stage": z} for z in (0, 2, 3)}
ZERO["ddp"] = {**COMMON, "engine": "torch"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("general-dist")
    recipe, reference = build(root, dropout=0.0, cache=False)
    recipe = variants_recipe(recipe, {"single": {**COMMON, "engine": "torch"}, **ZERO})
    run_dir = fresh_run(reference, root / "run")
    result = run_torchrun_stages(recipe, run_dir, list(ZERO))
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_inprocess_stage(recipe, run_dir, "single") is not None
    return recipe, run_dir


def run_inprocess_stage(recipe, run_dir, stage):
    from pipeline.recipe import load_recipe
    from pipeline.runner import run_recipe

    return run_recipe(load_recipe(recipe), run_dir, stages=[stage])[stage]


def _metrics(stage_dir):
    return json.loads((stage_dir / "manifest.json").read_text())["metrics"]


def _weights(stage_dir):
    from safetensors.torch import load_file

    return load_file(str(stage_dir / "model" / "model.safetensors"))


def _assert_same_training(stage_dir, single_dir):
    a, b = _metrics(single_dir), _metrics(stage_dir)
    for key in ("train_total", "train_soft", "train_mlm", "eval_mlm_loss", "eval_teacher_kl"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    expected, got = _weights(single_dir), _weights(stage_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("stage", list(ZERO))
def test_two_ranks_match_one_process(runs, stage):
    recipe, run_dir = runs
    meta = json.loads((run_dir / stage / "checkpoints" / "step-4" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == ZERO[stage].get("zero_stage", 0)
    assert meta["backend"] == ZERO[stage]["engine"]
    _assert_same_training(run_dir / stage, run_dir / "single")


def test_two_rank_checkpoint_resumes_on_one_rank(runs, tmp_path):
    recipe, run_dir = runs
    # As if the 2-rank ZeRO-0 run had stopped after its step-2 checkpoint; finish it on 1 rank.
    resumed = tmp_path / "run"
    shutil.copytree(run_dir / "shard", resumed / "shard")
    shutil.copytree(run_dir / "zero0", resumed / "zero0")
    shutil.rmtree(resumed / "zero0" / "checkpoints" / "step-4")
    shutil.rmtree(resumed / "zero0" / "model")
    (resumed / "zero0" / "manifest.json").unlink()
    manifest = run_inprocess_stage(recipe, resumed, "zero0")
    assert manifest.metrics["train_steps"] == 4
    _assert_same_training(resumed / "zero0", run_dir / "single")
