"""The SKD sampling laws (kd/teams.py): their probabilities against hand-worked values, empirical frequencies
over many steps against those probabilities (chi-square), the curriculum's blocks, and draws that depend only
on (seed, step, example id) so a resumed run continues the same teacher sequence."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from kd.teams import SamplerConfig, TeamSampler, probabilities, truncate_encoder, uniforms

NAMES = ["l2", "l4", "l6"]
LEVELS = [768.0, 1536.0, 2304.0]
SCORES = [0.6, 0.7, 0.9]
STUDENT = 1536.0


def probs(law: str, **kw) -> np.ndarray:
    return probabilities(SamplerConfig(law=law, **kw), names=NAMES, levels=LEVELS, scores=SCORES,
                         student_level=STUDENT)


def test_law_probabilities_match_hand_worked_values():
    assert np.allclose(probs("uniform"), [1 / 3] * 3)
    assert np.allclose(probs("quality"), np.array(SCORES) / sum(SCORES))
    assert np.allclose(probs("quality", temperature=0.5), np.square(SCORES) / np.square(SCORES).sum())
    ratios = np.array([0.5, 1.0, 1536 / 2304])  # min(c, c_s) / max(c, c_s)
    assert np.allclose(probs("capacity"), ratios / ratios.sum())
    assert np.allclose(probs("single"), [0, 0, 1])  # best dev score
    assert np.allclose(probs("single", member="l4"), [0, 1, 0])
    with pytest.raises(ValueError, match="not a team member"):
        probs("single", member="l8")


def draw_counts(law: str, steps: int, **kw) -> tuple[np.ndarray, np.ndarray]:
    config = SamplerConfig(law=law, **kw)
    p = probs(law, **{k: v for k, v in kw.items() if k != "unit"})
    sampler = TeamSampler.build(config, p, LEVELS, seed=3, total=steps)
    if config.unit == "step":
        picks = [sampler.step_teacher(s) for s in range(steps)]
    else:  # 8 examples a step, ids as an epoch-shuffled loader would give them
        picks = np.concatenate([sampler.teachers(s, np.arange(8 * s, 8 * s + 8) % 1000) for s in range(steps)])
    return np.bincount(picks, minlength=3), p


@pytest.mark.parametrize("law,unit,kw", [("uniform", "step", {}), ("quality", "step", {}),
                                         ("quality", "example", {"temperature": 0.25}), ("capacity", "step", {}),
                                         ("capacity", "example", {})])
def test_empirical_frequencies_match_the_law(law, unit, kw):
    counts, p = draw_counts(law, 6000, unit=unit, **kw)
    # A fixed seed makes this deterministic; a sampler biased by even 2 points in 6000 draws fails it.
    assert stats.chisquare(counts, p * counts.sum()).pvalue > 1e-3, (counts, p)


def test_a_wrong_law_fails_the_frequency_check():
    counts, _ = draw_counts("quality", 6000, temperature=0.25)
    assert stats.chisquare(counts, probs("uniform") * counts.sum()).pvalue < 1e-6


def test_single_and_curriculum_are_deterministic():
    counts, _ = draw_counts("single", 500)
    assert counts.tolist() == [0, 0, 500]
    config = SamplerConfig(law="curriculum")
    sampler = TeamSampler.build(config, probs("curriculum"), [2304.0, 768.0, 1536.0], seed=0, total=9)
    # Small to large over equal blocks: member 1 (768), then 2 (1536), then 0 (2304).
    assert [sampler.step_teacher(s) for s in range(9)] == [1, 1, 1, 2, 2, 2, 0, 0, 0]
    assert sampler.teachers(4, [5, 6, 7]).tolist() == [2, 2, 2]


def test_draws_depend_only_on_seed_step_and_id():
    config = SamplerConfig(law="uniform", unit="example")
    a = TeamSampler.build(config, probs("uniform"), LEVELS, seed=7, total=100)
    b = TeamSampler.build(config, probs("uniform"), LEVELS, seed=7, total=100)
    # A resumed run (a fresh sampler) starting at step 50 draws what the first one drew there.
    first = [a.step_teacher(s) for s in range(100)]
    assert [b.step_teacher(s) for s in range(50, 100)] == first[50:]
    # Per example: the same id gets the same teacher whatever batch (or rank slice) it lands in.
    assert a.teachers(3, [10, 11, 12, 13])[2:].tolist() == b.teachers(3, [12, 13]).tolist()
    other = TeamSampler.build(config, probs("uniform"), LEVELS, seed=8, total=100)
    assert [other.step_teacher(s) for s in range(100)] != first
    u = uniforms(0, 1, range(10000))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_config_and_truncation_are_validated():
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    with pytest.raises(ValueError, match="temperature"):
        SamplerConfig(temperature=0)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=3,
                                                     num_attention_heads=2, intermediate_size=16))
    kept = model.bert.encoder.layer[0].attention.self.query.weight.clone()
    truncate_encoder(model, 2)
    assert len(model.bert.encoder.layer) == 2 and model.config.num_hidden_layers == 2
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, kept)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 2)
    with pytest.raises(ValueError, match="num_layers"):
        truncate_encoder(model, 5)
