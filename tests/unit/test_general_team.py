"""The general stage's team targets: each masked row gets its sample's member's cached targets (the tail at the
training temperature from that member's own column), per step or per example, as the sampler draws them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from formats.loader import SAMPLE_IDS, team_key
from kd.teams import SamplerConfig
from stages.general.config import Config, TeamTeacher
from stages.general.team import Member, Team


def _team(law: str, unit: str, steps: int = 10) -> Team:
    config = Config(teacher_path="x", max_steps=steps, sampler=SamplerConfig(law=law, unit=unit),
                    team=[TeamTeacher(name="a", teacher_path="x", cache="@a"),
                          TeamTeacher(name="b", teacher_path="y", cache="@b")])
    members = [Member(name="a", teacher_dir=Path("x"), level=64, score=0.5, cache_dir=Path("a"), tail_column=None),
               Member(name="b", teacher_dir=Path("y"), level=32, score=0.5, cache_dir=Path("b"), tail_column=1)]
    return Team(config, members, 32.0, seed=7)


def _batch(samples: int = 6, per: int = 3, k: int = 4) -> dict:
    rows = torch.arange(samples).repeat_interleave(per)
    n = len(rows)
    batch = {"input_ids": torch.ones(samples, 5, dtype=torch.long), "rows": rows,
             SAMPLE_IDS: torch.arange(100, 100 + samples, dtype=torch.long)}
    for j in range(2):
        base = 1000 * (j + 1)
        batch[team_key(j, "topk_ids")] = base + torch.arange(n * k).reshape(n, k)
        batch[team_key(j, "topk_logp")] = -torch.rand(n, k) - j
        batch[team_key(j, "tail_logmass")] = torch.full((n,), -10.0 - j)
        batch[team_key(j, "tail_logmass_t")] = torch.stack([torch.full((n,), -20.0 - j), torch.full((n,), -30.0 - j)], 1)
    return batch


def test_per_example_rows_take_their_samples_member_and_its_tail_column():
    team, batch = _team("uniform", "example"), _batch()
    seen = set()
    for step in range(8):
        out, logits, choice = team.targets(batch, step)
        assert logits is None and not any(k.startswith("team") for k in out)
        member = choice[batch["rows"]]
        seen |= set(choice.tolist())
        for r, j in enumerate(member.tolist()):
            assert torch.equal(out["topk_ids"][r], batch[team_key(j, "topk_ids")][r])
            assert torch.equal(out["topk_logp"][r], batch[team_key(j, "topk_logp")][r])
            want = -10.0 if j == 0 else -31.0  # member a at T=1, member b's column 1
            assert out["tail_logmass"][r] == want
        assert "tail_logmass_t" not in out
    assert seen == {0, 1}


def test_per_example_draw_depends_on_sample_id_not_batch_position():
    team, batch = _team("uniform", "example"), _batch()
    _, _, choice = team.targets(batch, 3)
    flipped = {**batch, SAMPLE_IDS: batch[SAMPLE_IDS].flip(0)}
    _, _, again = team.targets(flipped, 3)
    assert torch.equal(again, choice.flip(0))


def test_per_step_one_member_for_the_batch_with_the_laws_frequencies():
    team, batch = _team("capacity", "step", steps=3000), _batch()
    counts = np.zeros(2)
    for step in range(3000):
        _, _, choice = team.targets(batch, step)
        assert len(set(choice.tolist())) == 1
        counts[int(choice[0])] += 1
    p = np.array(team.probs)
    assert p == pytest.approx([1 / 3, 2 / 3])  # capacity: student 32 is twice as close to b (32) as to a (64)
    sigma = np.sqrt(3000 * p * (1 - p))
    assert np.all(np.abs(counts - 3000 * p) < 5 * sigma)
    metrics = team.counts(3000)
    assert metrics["team_steps_a"] == counts[0] and metrics["team_steps_b"] == counts[1]
