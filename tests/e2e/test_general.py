"""Stage `general` on a real tiny corpus with a tiny teacher: cache and online training, HF export, exact
resume after kill -9, preemption, and the errors raised before any compute."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.inspect import verify_path
from pipeline.train.preempt import EXIT_PREEMPTED
from tests.dist.general_inputs import (
    build,
    fresh_run,
    run_cli,
    run_inprocess,
    student_weights,
    tiny_teacher,
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("general")
    recipe, reference = build(root, dropout=0.1)
    return root, recipe, reference


def test_from_cache_trains_evaluates_and_exports_hf_student(inputs, tmp_path):
    root, recipe, reference = inputs
    run_dir = fresh_run(reference, tmp_path / "run")
    manifest = run_inprocess(recipe, run_dir, 'cache="@cache"', "cache_targets=sampled")
    metrics = manifest.metrics
    assert metrics["train_steps"] == 4 and metrics["eval_masked_tokens"] > 0
    for key in ("train_soft", "train_mlm", "eval_mlm_loss", "eval_teacher_kl"):
        assert 0 < metrics[key] < 60, key
    assert 0 <= metrics["eval_teacher_top1_agreement"] <= 1
    assert manifest.extra["model_dir"] == "model" and manifest.extra["online_teacher"] is False
    assert any(line.endswith("files ok") for line in verify_path(run_dir / "general"))
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(run_dir / "general" / "model")
    assert model.config.num_hidden_layers == 1
    assert AutoTokenizer.from_pretrained(run_dir / "general" / "model").mask_token == "[MASK]"
    assert [p.name for p in sorted((run_dir / "general" / "checkpoints").iterdir())] == ["model-template", "step-2", "step-4"]

    # Any checkpoint exports to a model folder (fill-mask MLflow Model): the last one is the exported student,
    # and an evaluation step's checkpoint carries that step's eval metrics for promotion gates.
    from safetensors.torch import load_file

    from pipeline.cli import main as distill

    assert distill(["export", str(run_dir / "general"), "--checkpoint", "step-4", "--out", str(tmp_path / "x")]) == 0
    final, exported = (load_file(str(d / "model" / "model.safetensors")) for d in (run_dir / "general", tmp_path / "x"))
    assert final.keys() == exported.keys() and all(torch.equal(final[k], exported[k]) for k in final)
    assert "task: fill-mask" in (tmp_path / "x" / "model" / "MLmodel").read_text()
    meta = json.loads((run_dir / "general" / "checkpoints" / "step-2" / "meta.json").read_text())
    assert 0 <= meta["metrics"]["eval_mlm_accuracy"] <= 1


def test_online_teacher_every_loss_with_projection(inputs, tmp_path):
    root, recipe, reference = inputs
    run_dir = fresh_run(reference, tmp_path / "run")
    every = "{soft: 1, mlm: 1, cosine: 1, embedding: 1, hidden: 1, attention: 1, minilm_attention: 1, minilm_value: 1}"
    manifest = run_inprocess(recipe, run_dir, f"loss={every}", "student={init: scratch, num_layers: 2, hidden_size: 16, "
                             "num_heads: 2, intermediate_size: 32}", "max_steps=2", "checkpoint_every=0")
    metrics = manifest.metrics
    for key in ("soft", "mlm", "cosine", "embedding", "hidden", "attention", "minilm_attention", "minilm_value"):
        assert torch.isfinite(torch.tensor(metrics[f"train_{key}"])) and metrics[f"train_{key}"] > 0, key
    assert manifest.extra["online_teacher"] is True and manifest.extra["layer_map"] == [1, 2]
    # The exported student has no projection weights: plain BertForMaskedLM keys only.
    assert not [k for k in student_weights(run_dir) if "proj" in k]


def test_student_cut_by_importance_on_the_corpus(inputs, tmp_path):
    """keep_by importance scores the teacher on the stage's first corpus sequences and records the cut."""
    root, recipe, reference = inputs
    run_dir = fresh_run(reference, tmp_path / "run")
    manifest = run_inprocess(recipe, run_dir, "student={init: teacher, num_layers: 1, keep_heads: 1, "
                             "keep_intermediate: 16, keep_by: importance, importance_samples: 8}",
                             'cache="@cache"', "max_steps=2", "checkpoint_every=0")
    assert manifest.metrics["train_steps"] == 2
    cut = json.loads((run_dir / "general" / "model" / "config.json").read_text())["distill_cut"]
    assert cut["keep_by"] == "importance" and len(cut["channels"]) == 16 and [len(n) for n in cut["neurons"]] == [16]
    assert cut["channels"] == sorted(set(cut["channels"])) and cut["channels"] != list(range(16))


def test_kill_then_resume_auto_is_bit_equal_with_dropout(inputs, tmp_path):
    root, recipe, reference = inputs
    straight = fresh_run(reference, tmp_path / "straight")
    assert run_inprocess(recipe, straight) is not None
    run_dir = fresh_run(reference, tmp_path / "killed")
    killed = run_cli(recipe, run_dir, "die_after_steps=3")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (run_dir / "general" / "manifest.json").exists() and not (run_dir / "general" / "model").exists()
    resumed = run_cli(recipe, run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and "step-2" in resumed.stderr
    expected, got = student_weights(straight), student_weights(run_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    a = json.loads((straight / "general" / "manifest.json").read_text())["metrics"]
    b = json.loads((run_dir / "general" / "manifest.json").read_text())["metrics"]
    assert a["eval_mlm_loss"] == b["eval_mlm_loss"] and a["train_total"] == b["train_total"]


def test_preemption_saves_a_checkpoint_and_exits_75_then_resumes(inputs, tmp_path):
    root, recipe, reference = inputs
    run_dir = fresh_run(reference, tmp_path / "run")
    stopped = run_cli(recipe, run_dir, "preempt_at_step=3", "checkpoint_every=0")
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr[-2000:]
    assert (run_dir / "general" / "checkpoints" / "step-3" / "meta.json").is_file()
    assert not (run_dir / "general" / "manifest.json").exists()
    again = run_inprocess(recipe, run_dir, "checkpoint_every=0")
    assert again.metrics["train_steps"] == 4


def test_bad_inputs_fail_before_compute(inputs, tmp_path):
    root, recipe, reference = inputs
    run_dir = fresh_run(reference, tmp_path / "run")
    other = tiny_teacher(tmp_path / "other", 0.0)
    from transformers import BertForMaskedLM

    # Same architecture and vocabulary, different weights: the cache was not made from this teacher.

    model = BertForMaskedLM.from_pretrained(other)
    torch.nn.init.normal_(model.cls.predictions.transform.dense.weight)
    model.save_pretrained(other)
    cases = [
        ((f"teacher_path={other}", 'cache="@cache"'), "weights differ"),
        (("layer_map=explicit", "layer_map_layers=[1, 2]", "loss={hidden: 1}"), "layer_map"),
        (("student={init: scratch, num_layers: 1, hidden_size: 16, num_heads: 2}", "projection=false",
          "loss={hidden: 1}"), "set projection: true"),
        (("student={init: scratch, num_layers: 1, hidden_size: 32, num_heads: 4}", "loss={attention: 1}"), "heads"),
        (("engine=deepspeed", f"deepspeed_config={root / 'ds.json'}"), "train_micro_batch_size_per_gpu"),
        # the cache stores the tempered top-k tail at 1 and 2 and drew its samples at 2 (the defaults)
        (('cache="@cache"', "temperature=3.0"), r"stores the top-k tail at temperatures \[1.0, 2.0\]; add 3"),
        (('cache="@cache"', "cache_targets=sampled", "temperature=1.0"), "drew its sampled ids at sample_temperature 2"),
    ]
    (root / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 64}))
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_inprocess(recipe, run_dir, *overrides)
        assert not (run_dir / "general" / "checkpoints").exists(), overrides
    with pytest.raises(ConfigError, match="not divisible by grad_accum"):
        run_inprocess(recipe, run_dir, "batch_size=9", "grad_accum=2")
    shutil.rmtree(run_dir)
