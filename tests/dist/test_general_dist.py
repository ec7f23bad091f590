"""Stage `general` on 2 ranks (torchrun, gloo) under DeepSpeed ZeRO 0, 2 and 3: the same losses and weights
as one process on the same global batch, and a 2-rank checkpoint resumed on 1 rank."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.dist.general_inputs import build, fresh_run, run_inprocess, run_torchrun, student_weights

# Dropout off: two ranks draw other dropout masks than one process, so only then can the runs agree.
COMMON = ("max_steps=4", "checkpoint_every=2", "eval_every=0", "lr=3.0e-3")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("general-dist")
    recipe, reference = build(root, dropout=0.0, cache=False)
    single = fresh_run(reference, root / "single")
    run_inprocess(recipe, single, *COMMON, "engine=torch")
    return recipe, reference, single


def _metrics(run_dir):
    return json.loads((run_dir / "general" / "manifest.json").read_text())["metrics"]


def _assert_same_training(run_dir, single):
    a, b = _metrics(single), _metrics(run_dir)
    for key in ("train_total", "train_soft", "train_mlm", "eval_mlm_loss", "eval_teacher_kl"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    expected, got = student_weights(single), student_weights(run_dir)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_two_ranks_match_one_process(inputs, tmp_path, zero_stage):
    recipe, reference, single = inputs
    run_dir = fresh_run(reference, tmp_path / "run")
    result = run_torchrun(recipe, run_dir, *COMMON, "engine=deepspeed", f"zero_stage={zero_stage}")
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((run_dir / "general" / "checkpoints" / "step-4" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == zero_stage
    _assert_same_training(run_dir, single)
    if zero_stage == 0:
        # Stop the 2-rank run after step 2 (keep only that checkpoint) and finish it on 1 rank.
        resumed = tmp_path / "resumed"
        shutil.copytree(run_dir, resumed)
        shutil.rmtree(resumed / "general" / "checkpoints" / "step-4")
        shutil.rmtree(resumed / "general" / "model")
        (resumed / "general" / "manifest.json").unlink()
        manifest = run_inprocess(recipe, resumed, *COMMON, "engine=deepspeed", "zero_stage=0")
        assert manifest.metrics["train_steps"] == 4
        _assert_same_training(resumed, single)
