"""Stage `general` with a cached teacher team on 2 ranks (torchrun, gloo, DDP): each example's member is drawn
from its own key, so 2 ranks draw exactly the members 1 rank draws (the same counts per member) and train
the same student up to float reduction order."""

from __future__ import annotations

import json
import shutil

import torch

from pipeline.recipe import load_recipe
from pipeline.runner import run_recipe
from tests.dist.general_inputs import build, fresh_run, run_torchrun_stages, student_weights, variants_recipe
from tests.e2e.test_general_skd import _small_teacher

CACHE_B = """
  cache_b: {{stage: cache, teacher_path: {b}, teacher_id: tiny_b, k: 8, sampled: 4, batch_tokens: 800, device: cpu}}
"""


def test_cached_team_per_example_draws_the_same_members_on_one_and_two_ranks(tmp_path):
    recipe, reference = build(tmp_path, lines=120, dropout=0.0)
    small = _small_teacher(tmp_path / "teacher_b")
    recipe.write_text(recipe.read_text() + CACHE_B.format(b=small))
    run_recipe(load_recipe(recipe), reference, stages=["cache_b"])
    team = [{"name": "big", "teacher_path": str(tmp_path / "teacher"), "cache": "@cache"},
            {"name": "small", "teacher_path": str(small), "cache": "@cache_b"}]
    variant = {"team": team, "sampler": {"law": "uniform", "unit": "example"}, "engine": "torch", "max_steps": 4,
               "eval_every": 0, "checkpoint_every": 0}
    recipe = variants_recipe(recipe, {"team_two": variant})
    one_dir, two_dir = fresh_run(reference, tmp_path / "one"), fresh_run(reference, tmp_path / "two")
    for run_dir in (one_dir, two_dir):
        shutil.copytree(reference / "cache_b", run_dir / "cache_b")
    one = run_recipe(load_recipe(recipe), one_dir, stages=["team_two"])["team_two"].metrics
    result = run_torchrun_stages(recipe, two_dir, ["team_two"])
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((two_dir / "team_two" / "manifest.json").read_text())["metrics"]
    assert two["team_examples_big"] == one["team_examples_big"] and two["team_examples_small"] == one["team_examples_small"]
    assert one["team_examples_big"] + one["team_examples_small"] == 4 * 8
    a, b = student_weights(one_dir, "team_two"), student_weights(two_dir, "team_two")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

