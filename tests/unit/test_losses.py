"""Distillation losses against values worked out by hand from each paper's formula."""

from __future__ import annotations

import math

import pytest
import torch

from kd import losses as L

LN = math.log


def logits_of(*probs: float) -> torch.Tensor:
    """One row of logits whose softmax is `probs` (normalised)."""
    return torch.tensor([[LN(p) for p in probs]])


# --- prediction layer: full logits ---------------------------------------------------------------

def test_soft_ce_full_matches_hand_value_at_t1_and_t2():
    student, teacher = logits_of(1, 2, 1), logits_of(1, 1, 2)  # p = (1/4, 1/2, 1/4), q = (1/4, 1/4, 1/2)
    # T=1: -(1/4 ln 1/4 + 1/4 ln 1/2 + 1/2 ln 1/4) = 1.75 ln 2
    assert L.soft_ce_full(student, teacher).item() == pytest.approx(1.75 * LN(2), rel=1e-6)
    # T=2: logits halve, so p ~ (1, sqrt2, 1), q ~ (1, 1, sqrt2); times T^2 = 4
    r2 = math.sqrt(2)
    z = 2 + r2
    p, q = [1 / z, r2 / z, 1 / z], [1 / z, 1 / z, r2 / z]
    expected = 4 * -sum(qi * LN(pi) for qi, pi in zip(q, p))
    assert L.soft_ce_full(student, teacher, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)
    assert L.task_soft_ce(student, teacher, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_kl_full_is_cross_entropy_minus_teacher_entropy():
    student, teacher = logits_of(1, 2, 1), logits_of(1, 1, 2)
    # H(q) = 1.5 ln 2, so KL = 1.75 ln 2 - 1.5 ln 2
    assert L.kl_full(student, teacher).item() == pytest.approx(0.25 * LN(2), rel=1e-5)
    assert L.kl_full(teacher, teacher, temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["soft_ce_full", "kl_full", "task_soft_ce"])
def test_temperature_squared_scaling(name):
    torch.manual_seed(0)
    s, t, temp = torch.randn(4, 7), torch.randn(4, 7), 3.0
    q, logp = (t / temp).softmax(-1), (s / temp).log_softmax(-1)
    unscaled = -(q * logp).sum(-1).mean()
    if name == "kl_full":
        unscaled = unscaled + (q * q.log()).sum(-1).mean()
    assert L.LOSSES[name](s, t, temperature=temp).item() == pytest.approx(temp**2 * unscaled.item(), rel=1e-5)


# --- prediction layer: cached top-k --------------------------------------------------------------

TEACHER_P = [0.5, 0.25, 0.15, 0.10]
STUDENT_P = [0.4, 0.3, 0.2, 0.1]


def _topk_inputs():
    ids = torch.tensor([[0, 1]])
    logp = torch.tensor([[LN(0.5), LN(0.25)]])
    tail = torch.tensor([LN(0.25)])
    return logits_of(*STUDENT_P), ids, logp, tail


def test_topk_with_tail_at_t1_is_ce_over_k_plus_one_buckets():
    student, ids, logp, tail = _topk_inputs()
    # teacher buckets (0.5, 0.25, tail 0.25); student tail = 0.2 + 0.1
    expected = -(0.5 * LN(0.4) + 0.25 * LN(0.3) + 0.25 * LN(0.3))
    assert L.soft_ce_topk(student, ids, logp, tail).item() == pytest.approx(expected, rel=1e-6)


def test_topk_with_tempered_tail_at_t2_is_the_exact_tempered_buckets():
    student, ids, logp, _ = _topk_inputs()
    # teacher softmax(t/2) ~ p^(1/2): the k ids weigh 0.5^.5 and 0.25^.5, the tail bucket 0.15^.5 + 0.10^.5,
    # which the cache stores as log sum over the tail of p^(1/2)
    w = [0.5**0.5, 0.25**0.5, 0.15**0.5 + 0.10**0.5]
    q = [x / sum(w) for x in w]
    sw = [x**0.5 for x in STUDENT_P]
    ps = [sw[0] / sum(sw), sw[1] / sum(sw), (sw[2] + sw[3]) / sum(sw)]
    expected = 4 * -sum(qi * LN(pi) for qi, pi in zip(q, ps))
    tail_t2 = torch.tensor([LN(0.15**0.5 + 0.10**0.5)])
    assert L.soft_ce_topk(student, ids, logp, tail_t2, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)
    # the old even-spread assumption (each tail token 0.125) gives another value: the check can fail
    even = [0.5**0.5, 0.25**0.5, 2 * 0.125**0.5]
    assert abs(sum(w) - sum(even)) > 1e-3


def test_topk_without_tail_renormalises_the_k():
    student, ids, logp, _ = _topk_inputs()
    expected = -(2 / 3 * LN(0.4) + 1 / 3 * LN(0.3))
    assert L.soft_ce_topk(student, ids, logp).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0, 0.5])
def test_topk_with_k_equal_vocab_is_the_full_loss(temp):
    torch.manual_seed(1)
    s, t = torch.randn(5, 9), torch.randn(5, 9)
    ids = torch.randperm(9).repeat(5, 1)  # order of the k ids must not matter
    logp = t.log_softmax(-1).gather(-1, ids)
    full = L.soft_ce_full(s, t, temperature=temp).item()
    assert L.soft_ce_topk(s, ids, logp, temperature=temp).item() == pytest.approx(full, rel=1e-5)
    no_tail = torch.full((5,), -math.inf)
    assert L.soft_ce_topk(s, ids, logp, no_tail, temperature=temp).item() == pytest.approx(full, rel=1e-5)


def _composed_topk_tail(student_logits, ids, topk_logp, tail_logmass, temperature):
    """The top-k + tail loss written with plain autograd ops: the definition the fused form must match."""
    scaled = student_logits.float() / temperature
    log_z = scaled.logsumexp(-1, keepdim=True)
    s_top = scaled.gather(-1, ids) - log_z
    s_tail = scaled.scatter(-1, ids, -math.inf).logsumexp(-1, keepdim=True) - log_z
    t_tail = torch.nan_to_num(tail_logmass.float(), nan=-math.inf)
    q = torch.cat([topk_logp.float() / temperature, t_tail[:, None]], -1).softmax(-1)
    s = torch.cat([s_top, s_tail], -1)
    return temperature**2 * -torch.where(q > 0, q * s, torch.zeros_like(s)).sum(-1).mean()


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_fused_topk_tail_loss_and_gradient_equal_the_composed_form(temp):
    """70 rows (blocks of 32 and a partial one) of a 500-word vocabulary, k=8: flat rows, rows whose student
    tail is tiny (the exact-sum path), a teacher without tail (-inf), a NaN tail, and bf16 student logits."""
    torch.manual_seed(3)
    rows, vocab, k = 70, 500, 8
    logits = torch.randn(rows, vocab) * 2
    ids = torch.stack([torch.randperm(vocab)[:k] for _ in range(rows)])
    logits[:10].scatter_(-1, ids[:10, :1], 60.0)  # the student puts ~all its mass on one listed id
    topk_logp = torch.randn(rows, vocab).log_softmax(-1).gather(-1, ids)
    tail = torch.randn(rows) - 1.0
    tail[20], tail[21] = -math.inf, float("nan")
    for dtype in (torch.float32, torch.bfloat16):
        a = logits.to(dtype).clone().requires_grad_()
        b = logits.to(dtype).clone().requires_grad_()
        fused = L.soft_ce_topk(a, ids, topk_logp, tail, temperature=temp)
        composed = _composed_topk_tail(b, ids, topk_logp, tail, temp)
        fused.backward(), composed.backward()
        assert fused.item() == pytest.approx(composed.item(), rel=1e-5)
        assert a.grad.dtype == dtype and torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=1e-3, atol=1e-7 if dtype == torch.float32 else 1e-4)


def test_topk_gradient_is_finite_with_empty_negligible_or_nan_tail():
    torch.manual_seed(2)
    s = torch.randn(3, 6, requires_grad=True)
    ids = torch.tensor([[0, 1, 2]] * 3)
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.2]] * 3))
    tail = torch.tensor([-math.inf, -30.0, float("nan")])  # no tail, a negligible one, log of a rounded negative
    loss = L.soft_ce_topk(s, ids, logp.half(), tail.half(), temperature=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    expected = L.soft_ce_topk(s, ids, logp, None, temperature=2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-3)


# --- prediction layer: sampled -------------------------------------------------------------------

def test_sampled_hand_value_and_zero_count_padding():
    student = logits_of(*STUDENT_P)
    ids, counts = torch.tensor([[0, 2, 3]]), torch.tensor([[3, 1, 0]])
    expected = -(0.75 * LN(0.4) + 0.25 * LN(0.2))
    assert L.soft_ce_sampled(student, ids, counts).item() == pytest.approx(expected, rel=1e-6)


def test_sampled_expectation_equals_full_loss():
    gen = torch.Generator().manual_seed(3)
    rows, vocab, draws, groups, per_group, temp = 4, 6, 8, 40, 100, 2.0
    s, t = torch.randn(rows, vocab, generator=gen), 2 * torch.randn(rows, vocab, generator=gen)
    q = (t / temp).softmax(-1)
    n = rows * per_group
    ids = torch.arange(vocab).repeat(n, 1)
    estimates = []
    for _ in range(groups):  # each group: per_group independent draws for every row
        samples = torch.multinomial(q.repeat(per_group, 1), draws, replacement=True, generator=gen)
        counts = torch.zeros(n, vocab).scatter_add_(1, samples, torch.ones(n, draws))
        estimates.append(L.soft_ce_sampled(s.repeat(per_group, 1), ids, counts, temperature=temp))
    estimates = torch.stack(estimates)
    full = L.soft_ce_full(s, t, temperature=temp).item()
    stderr = estimates.std().item() / math.sqrt(groups)
    assert abs(estimates.mean().item() - full) < 4 * stderr
    # the estimator has variance, so the check above is not vacuous, and it is tight enough to catch a bias
    assert 1e-4 < stderr < 0.02 * full


# --- hard losses ---------------------------------------------------------------------------------

def test_mlm_loss_ignores_minus_100_and_survives_no_masked_token():
    logits = torch.cat([logits_of(0.2, 0.3, 0.5), logits_of(0.9, 0.05, 0.05)]).unsqueeze(0)  # [1, 2, 3]
    labels = torch.tensor([[2, -100]])
    assert L.mlm_loss(logits, labels).item() == pytest.approx(-LN(0.5), rel=1e-6)
    empty = L.mlm_loss(logits.requires_grad_(), torch.full((1, 2), -100))
    empty.backward()
    assert empty.item() == 0.0 and logits.grad is not None


def test_hard_loss_classification_and_regression():
    logits = torch.cat([logits_of(0.25, 0.75), logits_of(0.5, 0.5)])
    assert L.hard_loss(logits, torch.tensor([1, 0])).item() == pytest.approx(-(LN(0.75) + LN(0.5)) / 2, rel=1e-6)
    pred = torch.tensor([[1.0], [3.0]])
    assert L.hard_loss(pred, torch.tensor([0.0, 1.0]), regression=True).item() == pytest.approx((1 + 4) / 2)


# --- hidden states -------------------------------------------------------------------------------

def test_cosine_hidden_hand_value_excludes_padding():
    s = torch.tensor([[[1.0, 0.0], [5.0, -3.0]]])
    t = torch.tensor([[[1.0, 1.0], [-1.0, 7.0]]])
    mask = torch.tensor([[1, 0]])
    assert L.cosine_hidden(s, t, mask).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)


def test_hidden_mse_hand_value_excludes_padding_and_rejects_width_mismatch():
    s = torch.tensor([[[1.0, 2.0], [100.0, 100.0]]])
    t = torch.zeros(1, 2, 2)
    assert L.hidden_mse(s, t, torch.tensor([[1, 0]])).item() == pytest.approx(2.5)
    assert L.hidden_mse(s, t).item() == pytest.approx((1 + 4 + 2 * 100**2) / 4)
    with pytest.raises(ValueError, match="project"):
        L.hidden_mse(s, torch.zeros(1, 2, 3))


def test_attention_mse_counts_only_real_query_key_pairs():
    s = torch.tensor([[[[1.0, -math.inf], [9.0, 9.0]]]])  # [B=1, h=1, L=2, L=2], key 2 padded
    t = torch.tensor([[[[3.0, 0.0], [0.0, 0.0]]]])
    loss = L.attention_mse(s, t, torch.tensor([[1, 0]]))
    assert loss.item() == pytest.approx(4.0)
    both = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    assert L.attention_mse(both, torch.zeros_like(both), torch.tensor([[1, 1], [1, 1]])).item() == pytest.approx(30 / 8)


def test_pkd_cls_mse_is_the_mean_over_layers_batch_and_features_of_normalised_states():
    s = [torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 2.0]])]
    t = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[5.0, 0.0], [0.0, -1.0]])]
    # squared differences: layer 1 (0.6-1)^2 + 0.8^2 = 0.8 and 0; layer 2: 0 and (1 - -1)^2 = 4;
    # the released code's F.mse_loss divides their sum 4.8 by 2 layers x 2 rows x 2 features
    assert L.pkd_cls_mse(s, t).item() == pytest.approx(4.8 / 8, rel=1e-6)
    with pytest.raises(ValueError):
        L.pkd_cls_mse(s, t[:1])
    with pytest.raises(ValueError, match="project the student"):
        L.pkd_cls_mse([torch.ones(2, 3)], [torch.ones(2, 2)])


# --- MiniLM --------------------------------------------------------------------------------------

def _softmax(xs):
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


def test_minilm_attention_kl_hand_value_with_padding():
    # student q = k = (1, 0): scores [[1, 0], [0, 0]]; teacher q = 0: uniform rows
    sq = torch.tensor([[[1.0], [0.0], [7.0]]])
    tq = torch.tensor([[[0.0], [0.0], [-4.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding and must not matter
    row0 = _softmax([1.0, 0.0])
    kl_row0 = sum(0.5 * LN(0.5 / p) for p in row0)
    expected = (kl_row0 + 0.0) / 2
    got = L.minilm_attention_kl(sq, sq, tq, tq, student_heads=1, teacher_heads=1, mask=mask)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_minilm_value_kl_hand_value_across_widths_and_heads():
    sv = torch.tensor([[[1.0], [0.0]]])
    tv = torch.zeros(1, 2, 4)  # a wider teacher: relations are L x L, so widths may differ
    row0 = _softmax([1.0, 0.0])
    expected = sum(0.5 * LN(0.5 / p) for p in row0) / 2
    got = L.minilm_value_kl(sv, tv, student_heads=1, teacher_heads=1, mask=torch.ones(1, 2))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="same number of heads"):
        L.minilm_value_kl(sv, tv, student_heads=1, teacher_heads=2, mask=torch.ones(1, 2))


def test_minilm_losses_are_zero_for_equal_inputs_and_have_finite_gradients_with_padding():
    torch.manual_seed(4)
    q = torch.randn(2, 5, 8, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    same = L.minilm_attention_kl(q, q, q.detach(), q.detach(), student_heads=2, teacher_heads=2, mask=mask)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    loss = L.minilm_value_kl(q, torch.randn(2, 5, 4), student_heads=2, teacher_heads=2, mask=mask)
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(q.grad).all()
    assert q.grad[1, 3:].abs().sum() == 0  # padded tokens get no gradient


# --- layer maps ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,m,n,expected", [
    ("uniform", 3, 6, [2, 4, 6]),
    ("uniform", 4, 12, [3, 6, 9, 12]),
    ("uniform", 5, 12, [2, 4, 7, 9, 12]),
    ("last", 2, 6, [5, 6]),
    ("skip", 5, 12, [2, 4, 6, 8, 10]),
    ("first", 3, 12, [1, 2, 3]),
])
def test_layer_map(kind, m, n, expected):
    assert L.layer_map(kind, m, n) == expected


def test_layer_map_explicit_and_errors():
    assert L.layer_map("explicit", 3, 6, [0, 3, 6]) == [0, 3, 6]
    for bad in ([1, 2], [1, 7, 8], [3, 2, 4]):
        with pytest.raises(ValueError, match="explicit"):
            L.layer_map("explicit", 3, 6, bad)
    with pytest.raises(ValueError, match="more than the teacher"):
        L.layer_map("uniform", 7, 6)
    with pytest.raises(ValueError, match="kind must be one of"):
        L.layer_map("random", 2, 6)


def test_registry_names_every_loss():
    assert set(L.LOSSES) >= {"soft_ce_topk", "soft_ce_sampled", "soft_ce_full", "kl_full", "mlm", "cosine_hidden",
                             "hidden_mse", "attention_mse", "minilm_attention_kl", "minilm_value_kl",
                             "pkd_cls_mse", "task_soft_ce", "hard"}
    assert all(callable(fn) for fn in L.LOSSES.values())
