"""Stochastic multi-teacher distillation end to end on tiny teachers and 64 SST-2 lines: a team of the full
teacher and its 2-layer truncation (fine-tuned through teacher_finetune), scored on dev, cached and online;
a team of one equals plain KD bit for bit; resume continues the same teacher sequence; a member whose cache
has other data, another teacher or another tokenizer is refused in one line naming it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError
from pipeline.manifest import Manifest
from pipeline.recipe import load_recipe
from pipeline.runner import run_stage
from pipeline.world import World
from tests.conftest import run_cli
from tests.e2e.test_task_pipeline import tiny_encoder

RECIPE = """
run: {{name: tiny-skd, seed: 0}}
tracking: {{enabled: true}}
stages:
  teacher_finetune: &teacher {{teacher_path: {teacher}, epochs: 1, batch_size: 16, eval_every: 2, lr: 1.0e-3,
    device: cpu, data: &data {{train: {sst2}/train.tsv, dev: {sst2}/dev.tsv, limit_train: 64, limit_dev: 32,
                               max_length: 32}}}}
  teacher_l2: {{<<: *teacher, stage: teacher_finetune, num_layers: 2}}
  augment: &augment {{n_aug: 2, top_k: 4, chunk_size: 8, teacher: "@teacher_finetune",
                      data: {{train: {sst2}/train.tsv, dev: {sst2}/dev.tsv, limit_train: 12, max_length: 32}}}}
  augment_l2: {{<<: *augment, stage: augment, teacher: "@teacher_l2"}}
  augment_other:  # l2's outputs over other augmented text
    <<: *augment
    stage: augment
    teacher: "@teacher_l2"
    data: {{train: {sst2}/train.tsv, dev: {sst2}/dev.tsv, limit_train: 10, max_length: 32}}
  team:
    data: *data
    members:
      - {{name: full, teacher: "@teacher_finetune", augmented: "@augment"}}
      - {{name: l2, teacher: "@teacher_l2", augmented: "@augment_l2"}}
  team_one: {{stage: team, data: *data, members: [{{name: full, teacher: "@teacher_finetune", augmented: "@augment"}}]}}
  team_online:
    stage: team
    data: *data
    members: [{{name: full, teacher: "@teacher_finetune"}}, {{name: l2, teacher: "@teacher_l2", level: 10}}]
  plain: &task
    stage: task
    data: *data
    teacher: "@teacher_finetune"
    augmented: "@augment"
    objective: tinybert_prediction
    student_init: {{num_layers: 2}}
    max_steps: 6
    batch_size: 4
    checkpoint_every: 2
    keep_last: 10
    device: cpu
    latency_repeats: 1
    latency_batch_size: 2
    latency_seq_len: 8
  one: {{<<: *task, augmented: null, team: "@team_one", sampler: {{law: single}}}}
  skd: {{<<: *task, augmented: null, team: "@team", sampler: {{law: uniform}}}}
  online:  # step 1 from the reference teacher online, step 2 from the online team, one member per example
    <<: *task
    team: "@team_online"
    sampler: {{law: capacity, unit: example}}
    objective: tinybert
    intermediate_epochs: 1
    max_steps: 3
"""


@pytest.fixture(scope="module")
def skd_run(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    root = tmp_path_factory.mktemp("skd")
    run_dir = root / "run"
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(teacher=tiny_encoder(root / "teacher"), sst2=SHARED_DATA / "sst2"))
    done = run_cli("run", str(recipe), "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    return root, recipe, run_dir


def weights(folder):
    return load_file(str(folder / "model/model.safetensors"))


def test_team_is_scored_with_levels_in_manifest(skd_run):
    _, _, run_dir = skd_run
    team = Manifest.load(run_dir / "team")
    members = json.loads((run_dir / "team/team.json").read_text())["members"]
    assert [m["name"] for m in members] == ["full", "l2"] and [m["layers"] for m in members] == [4, 2]
    assert [m["level"] for m in members] == [4 * 32, 2 * 32]
    assert team.extra["cached"] and team.metrics["l2_level"] == 64 and 0 <= team.metrics["l2_dev_score"] <= 1
    assert {i.name for i in team.inputs} == {"members.0.teacher", "members.0.augmented", "members.1.teacher",
                                             "members.1.augmented"}
    online = json.loads((run_dir / "team_online/team.json").read_text())["members"]
    assert online[1]["level"] == 10 and online[1]["cache"] is None


def test_team_of_one_equals_plain_kd_bit_for_bit(skd_run):
    _, _, run_dir = skd_run
    plain, one = weights(run_dir / "plain"), weights(run_dir / "one")
    assert plain.keys() == one.keys() and all(torch.equal(plain[k], one[k]) for k in plain)
    assert Manifest.load(run_dir / "one").metrics["team_steps_full"] == 6


def test_cached_team_samples_each_step_without_teacher_forward(skd_run):
    _, _, run_dir = skd_run
    skd = Manifest.load(run_dir / "skd")
    assert skd.metrics["teacher_train_examples"] == 0
    assert skd.metrics["team_steps_full"] + skd.metrics["team_steps_l2"] == 6
    assert skd.extra["team"]["law"] == "uniform" and [m["p"] for m in skd.extra["team"]["members"]] == [0.5, 0.5]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = {r.data.tags.get("mlflow.runName"): r for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()])}
    assert runs["skd"].data.metrics["team_steps_l2"] == skd.metrics["team_steps_l2"]
    assert runs["team"].data.metrics["l2_level"] == 64
    shares = client.get_metric_history(runs["skd"].info.run_id, "train/team_l2")  # per log window
    assert shares and all(0 <= m.value <= 1 for m in shares)
    # Not plain KD from either member: the soft targets changed teacher along the way.
    assert not torch.equal(weights(run_dir / "skd")["classifier.weight"], weights(run_dir / "plain")["classifier.weight"])


def test_online_team_per_example(skd_run):
    _, _, run_dir = skd_run
    online = Manifest.load(run_dir / "online")
    assert online.metrics["teacher_train_examples"] > 0  # the members ran online
    assert online.metrics["team_examples_full"] + online.metrics["team_examples_l2"] == 3 * 4
    # Capacity law: the 2-layer student (level 64) is nearer the full member (128) than l2 (level 10).
    assert online.metrics["team_p_full"] > online.metrics["team_p_l2"] > 0


def test_resume_continues_the_same_teacher_sequence(skd_run, tmp_path):
    _, recipe, run_dir = skd_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for path in ["skd/manifest.json", "skd/model", "skd/ckpt/step-4", "skd/ckpt/step-6"]:
        target = copy / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    resumed = run_stage(load_recipe(recipe), "skd", copy, world=World())
    first = Manifest.load(run_dir / "skd")
    assert resumed.metrics["resumed_from_step"] == 2 and resumed.metrics["steps"] == 4
    assert {k: v for k, v in resumed.metrics.items() if k.startswith("team_")} == \
        {k: v for k, v in first.metrics.items() if k.startswith("team_")}
    before, after = weights(run_dir / "skd"), weights(copy / "skd")
    assert all(torch.equal(before[k], after[k]) for k in before)


def refused(recipe_path, run_dir, tmp_path, l2_cache: str) -> str:
    """The error of the team stage when member l2's cache is `l2_cache`."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, dirs_exist_ok=True)
    members = ('[{name: full, teacher: "@teacher_finetune", augmented: "@augment"}, '
               f'{{name: l2, teacher: "@teacher_l2", augmented: "{l2_cache}"}}]')
    with pytest.raises(ConfigError) as err:
        run_stage(load_recipe(recipe_path, [f"stages.team.members={members}"]), "team", copy, world=World())
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_member_with_another_cache_is_refused_naming_it(skd_run, tmp_path):
    _, recipe, run_dir = skd_run
    # l2's own cache, but over other augmented text than full's.
    msg = refused(recipe, run_dir, tmp_path, "@augment_other")
    assert msg.startswith("team member 'l2'") and "data hash" in msg and "'full'" in msg
    # Another teacher's cache for l2: its provenance names another teacher.
    msg = refused(recipe, run_dir, tmp_path, "@augment")
    assert msg.startswith("team member 'l2'") and "teacher" in msg
    # Another tokenizer: the cache's recorded tokenizer no longer matches the member's.
    copy = tmp_path / "tok"
    shutil.copytree(run_dir / "augment_l2", copy)
    manifest = Manifest.load(copy)
    manifest.extra["provenance"]["tokenizer_sha256"] = "0" * 64
    manifest.write(copy)
    msg = refused(recipe, run_dir, tmp_path, str(copy))
    assert msg.startswith("team member 'l2'") and "tokenizer" in msg
