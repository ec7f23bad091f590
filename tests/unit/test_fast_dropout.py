"""CPU dropout from 16-bit draws (pipeline.train.dropout): the drop rate, the scale, the gradient, the attention
path against SDPA, and the trainer swapping it in on the CPU only when asked."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

from pipeline.train import dropout as fd
from pipeline.train.engine import EngineSettings, build_engine
from pipeline.world import World


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_the_mask_drops_each_element_with_probability_p_and_the_scale_keeps_the_mean(p):
    torch.manual_seed(0)
    n = 1 << 20
    keep = fd.keep_mask(torch.Size([n]), p, torch.device("cpu"))
    assert keep.dtype == torch.bool
    # Standard error of the kept share is sqrt(p (1 - p) / n) <= 5e-4; 5 of them.
    assert abs(keep.float().mean().item() - (1 - p)) < 2.5e-3
    out = fd.fast_dropout(torch.ones(n), p)
    values = torch.unique(out).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p), rel=1e-4)
    assert abs(out.mean().item() - 1.0) < 5e-3 / (1 - p)


def test_masks_are_independent_across_positions_and_calls():
    torch.manual_seed(1)
    a, b = (fd.keep_mask(torch.Size([1 << 18]), 0.5, torch.device("cpu")).float() for _ in range(2))
    # Each of the four 16-bit draws of a 64-bit word decides one element: neighbours and calls are uncorrelated.
    assert abs(torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1].item()) < 0.01
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.01


def test_the_same_seed_draws_the_same_mask_and_the_gradient_uses_it():
    x = torch.randn(7, 33, requires_grad=True)
    torch.manual_seed(3)
    y = fd.fast_dropout(x, 0.3)
    torch.manual_seed(3)
    assert torch.equal(y, fd.fast_dropout(x.detach(), 0.3))
    y.backward(torch.ones_like(y))
    kept = y.detach() != 0
    assert torch.allclose(x.grad, kept.float() / (1 - round(0.3 * 65536) / 65536))


def test_identity_when_not_training_or_p_is_zero_and_p_is_checked():
    x = torch.randn(4, 5)
    assert fd.fast_dropout(x, 0.5, training=False) is x and fd.fast_dropout(x, 0.0) is x
    with pytest.raises(ValueError, match="dropout probability"):
        fd.fast_dropout(x, 1.0)
    module = fd.FastDropout(0.5).eval()
    assert module(x) is x


@pytest.mark.parametrize("mask_kind", ["none", "additive", "bool"])
def test_the_attention_math_equals_sdpa_when_nothing_is_dropped(mask_kind, monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    allowed = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    allowed[0, ..., 3:] = False  # padded keys of the first sequence
    mask = {"none": None, "bool": allowed,
            "additive": torch.zeros(2, 1, 5, 5).masked_fill(~allowed, torch.finfo(torch.float32).min)}[mask_kind]
    module = nn.Module()
    module.is_causal = False
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.5)
    monkeypatch.setattr(fd, "keep_mask", lambda shape, p, device: torch.ones(shape, dtype=torch.bool))
    got, weights = fd.attention(module, q, k, v, mask, dropout=0.1, scaling=0.5)
    assert weights is None and got.shape == (2, 5, 3, 4)
    # Nothing dropped, so the probabilities are only scaled by 1 / (1 - p) for the p the mask draws.
    assert torch.allclose(got, expected * 65536 / (65536 - round(0.1 * 65536)), atol=1e-5)


def _tiny_bert() -> BertForMaskedLM:
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=16))


def test_the_trainer_swaps_dropout_on_the_cpu_and_the_saved_model_is_plain(tmp_path):
    model = _tiny_bert()
    ids = torch.randint(5, 64, (3, 9))
    padded = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7])}
    before = model.eval()(**padded).logits
    engine = build_engine(model, settings=EngineSettings(backend="torch"), world=World())
    dropouts = [m for m in engine.module.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(type(m) is fd.FastDropout for m in dropouts)
    assert model.config._attn_implementation == fd.ATTENTION
    # Evaluation unchanged, padding masked (transformers builds no mask for an implementation without a mask
    # function: this once dropped the padding mask).
    assert torch.allclose(model.eval()(**padded).logits, before, atol=1e-6)
    model.train()
    torch.manual_seed(5)
    first = model(**padded).logits
    torch.manual_seed(5)
    assert torch.equal(model(**padded).logits, first) and not torch.allclose(first, before, atol=1e-3)
    model.save_pretrained(tmp_path)
    assert not any("attn" in key for key in json.loads((tmp_path / "config.json").read_text()))
    assert AutoModelForMaskedLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_fast_dropout_false_keeps_torch_dropout():
    model = _tiny_bert()
    build_engine(model, settings=EngineSettings(backend="torch", fast_dropout=False), world=World())
    assert all(type(m) is nn.Dropout for m in model.modules() if isinstance(m, nn.Dropout))
    assert model.config._attn_implementation == "sdpa"
