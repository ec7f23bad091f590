"""Cached soft targets are right at any temperature: sampled ids drawn at T give an unbiased gradient of the
full soft cross-entropy at T (and ids drawn at another T are caught as biased); the cached tempered top-k tail
is the true one, k = V gives the full loss at every T; a cache refuses a temperature it did not store."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from formats.cache import check_sample_temperature, tail_column
from kd import losses as L
from kd.teachers import teacher_targets
from pipeline.config import ConfigError

VOCAB, DRAWS, ROWS = 12, 4, 20000


def _pair():
    """One teacher row (every token at least ~0.3% likely at T=1, so every coordinate has a spread) and one
    student row."""
    gen = torch.Generator().manual_seed(5)
    teacher = torch.linspace(-2.5, 2.5, VOCAB)[torch.randperm(VOCAB, generator=gen)]
    return teacher, torch.randn(VOCAB, generator=gen)


def _z_scores(drawn_at: float, trained_at: float) -> torch.Tensor:
    """(mean sampled gradient - true gradient) / its standard error, per vocabulary coordinate, over ROWS
    independent draws of DRAWS ids each, drawn by the cache's own sampler at `drawn_at`."""
    teacher, student = _pair()
    uniforms = np.random.default_rng(7).random((ROWS, DRAWS))
    targets = teacher_targets(teacher.repeat(ROWS, 1), 2, uniforms, sample_temperature=drawn_at)
    rows = student.repeat(ROWS, 1).requires_grad_()
    L.soft_ce_sampled(rows, torch.from_numpy(targets["sampled_ids"]),
                      torch.from_numpy(targets["sampled_counts"]).float(), trained_at).backward()
    per_row = rows.grad * ROWS  # the loss is a mean over rows: undo the 1/ROWS
    one = student[None].clone().requires_grad_()
    L.soft_ce_full(one, teacher[None], trained_at).backward()
    stderr = per_row.std(0) / math.sqrt(ROWS)
    assert (stderr > 0).all()
    return (per_row.mean(0) - one.grad[0]) / stderr


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_sampled_gradient_is_unbiased_when_drawn_at_the_training_temperature(temp):
    assert _z_scores(temp, temp).abs().max() < 5


@pytest.mark.parametrize("temp", [2.0, 4.0])
def test_ids_drawn_at_t1_are_caught_as_biased_at_another_temperature(temp):
    # what the cache did before sample_temperature: draws at T=1 used at the training T
    assert _z_scores(1.0, temp).abs().max() > 20


def _teacher_rows(n: int = 6) -> torch.Tensor:
    gen = torch.Generator().manual_seed(9)
    return 4 * torch.randn(n, 50, generator=gen)  # peaked: the top few ids hold most of the mass


@pytest.mark.parametrize("temp", [0.5, 2.0, 4.0])
def test_cached_tempered_tail_is_the_true_tempered_tail(temp):
    logits = _teacher_rows()
    t = teacher_targets(logits, 5, tail_temperatures=(temp, 7.0))
    logp = logits.double().log_softmax(-1)
    tail = logp.scatter(-1, torch.from_numpy(t["topk_ids"]).long(), -math.inf)
    true = (tail / temp).logsumexp(-1).numpy()
    np.testing.assert_allclose(t["tail_logmass_t"][:, 0], true, rtol=1e-5, atol=1e-5)
    # the share of the tempered teacher outside the top-k, against the true softmax(t / T)
    q = (logits.double() / temp).softmax(-1)
    true_share = 1 - q.gather(-1, torch.from_numpy(t["topk_ids"]).long()).sum(-1)
    top = torch.from_numpy(t["topk_logp"].astype(np.float64)) / temp
    stored = torch.from_numpy(t["tail_logmass_t"][:, 0]).double()
    share = stored.exp() / (top.exp().sum(-1) + stored.exp())
    torch.testing.assert_close(share, true_share, rtol=2e-3, atol=1e-6)


def test_even_spread_tail_assumption_is_far_from_the_true_tail_at_t2():
    logits, temp, k = _teacher_rows(), 2.0, 5
    t = teacher_targets(logits, k, tail_temperatures=(temp,))
    even = (1 - 1 / temp) * math.log(50 - k) + torch.from_numpy(t["tail_logmass"]) / temp
    assert (torch.from_numpy(t["tail_logmass_t"][:, 0]) - even).abs().max() > 0.3


@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0, 4.0])
def test_topk_loss_from_the_cache_is_the_bucketed_full_loss(temp):
    logits = _teacher_rows()
    student = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    # k = V: the full soft cross-entropy at every T
    t = teacher_targets(logits, 50, tail_temperatures=(temp,))
    args = (torch.from_numpy(t["topk_ids"]), torch.from_numpy(t["topk_logp"].astype(np.float32)))
    full = L.soft_ce_full(student, logits, temp).item()
    assert L.soft_ce_topk(student, *args, torch.from_numpy(t["tail_logmass_t"][:, 0]), temp).item() == pytest.approx(full, rel=2e-3)
    # k < V: the soft cross-entropy of the tempered teacher and student with the unlisted ids as one class
    t = teacher_targets(logits, 5, tail_temperatures=(temp,))
    ids = torch.from_numpy(t["topk_ids"]).long()
    q, logp = (logits.double() / temp).softmax(-1), (student.double() / temp).log_softmax(-1)
    q_top, p_top = q.gather(-1, ids), logp.gather(-1, ids)
    p_tail = logp.scatter(-1, ids, -math.inf).logsumexp(-1)
    expected = temp**2 * -((q_top * p_top).sum(-1) + (1 - q_top.sum(-1)) * p_tail).mean().item()
    got = L.soft_ce_topk(student, ids, torch.from_numpy(t["topk_logp"].astype(np.float32)),
                         torch.from_numpy(t["tail_logmass_t"][:, 0]), temp).item()
    assert got == pytest.approx(expected, rel=2e-3)


def _cache(**provenance) -> SimpleNamespace:
    return SimpleNamespace(name="cache", extra={"provenance": provenance})


def test_a_cache_refuses_temperatures_it_did_not_store():
    cache = _cache(tail_temperatures=[1.0, 2.0, 4.0], sample_temperature=2.0)
    assert tail_column(cache, 1.0) is None and tail_column(cache, 2) == 0 and tail_column(cache, 4.0) == 1
    with pytest.raises(ConfigError, match=r"temperature 3: .*\[1.0, 2.0, 4.0\]; add 3 to the cache's tail_temperatures"):
        tail_column(cache, 3.0)
    check_sample_temperature(cache, 2.0)
    with pytest.raises(ConfigError, match="sample_temperature 2; set temperature: 2, or rebuild .* sample_temperature: 1"):
        check_sample_temperature(cache, 1.0)
    # a cache written before tail_temperatures: exact at T=1, refused elsewhere with the reason
    old = _cache(sample_temperature=1.0)
    assert tail_column(old, 1.0) is None
    with pytest.raises(ConfigError, match="predates tail_temperatures"):
        tail_column(old, 2.0)
    with pytest.raises(ConfigError, match="sample_temperature 1"):
        check_sample_temperature(old, 2.0)
