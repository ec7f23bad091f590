"""DynaBERT's method code: the depth pattern, sliced sub-networks equal to cut plain BERTs, losses and sizes."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification
from transformers import logging as hf_logging

from kd import dynabert
from kd.importance import encoder_layers
from kd.latency import parameter_count

hf_logging.set_verbosity_error()

GRID = [(w, d) for w in (0.25, 0.5, 0.75, 1.0) for d in (0.5, 0.75, 1.0)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=24,
        max_position_embeddings=32, num_labels=3, attn_implementation="sdpa")).eval()


def _inputs():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 120, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_depth_pattern_is_the_papers():
    # 12 layers: d = 0.5 keeps every other layer, d = 0.75 drops every fourth (layers 3, 7, 11)
    assert dynabert.kept_layers(12, 0.5) == [0, 2, 4, 6, 8, 10]
    assert dynabert.kept_layers(12, 0.75) == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert dynabert.kept_layers(12, 1.0) == list(range(12))
    assert dynabert.kept_layers(6, 0.5) == [0, 2, 4] and dynabert.kept_layers(2, 0.25) == [0]
    assert [dynabert.kept_units(12, w) for w in (0.25, 0.5, 0.75, 1.0)] == [3, 6, 9, 12]
    assert dynabert.kept_units(4, 0.1) == 1


@pytest.mark.parametrize("width,depth", GRID)
def test_a_cut_sub_network_equals_the_adaptive_model(model, width, depth):
    inputs = _inputs()
    with torch.no_grad():
        sliced = dynabert.forward(model, width, depth, hidden=True, **inputs)
        small = dynabert.cut(model, width, depth).eval()
        out = small(**inputs, output_hidden_states=True)
    assert torch.allclose(sliced.logits, out.logits, atol=1e-5)
    assert len(sliced.hidden_states) == len(dynabert.kept_layers(4, depth)) + 1
    for mine, theirs in zip(sliced.hidden_states, out.hidden_states):
        assert torch.allclose(mine, theirs, atol=1e-5)
    zeroed = (4 - dynabert.kept_units(4, width)) * 8 * (3 * 33 + 32) * small.config.num_hidden_layers
    assert dynabert.active_parameters(model, width, depth) == parameter_count(small) - zeroed
    assert len(encoder_layers(model)) == 4  # the adaptive model is untouched


def test_gradients_reach_only_the_kept_slices(model):
    model.zero_grad()
    dynabert.forward(model, 0.5, 0.5, **_inputs()).logits.sum().backward()
    layers = encoder_layers(model)
    ffn = layers[0].intermediate.dense.weight.grad
    assert ffn[:12].abs().sum() > 0 and ffn[12:].abs().sum() == 0
    query = layers[2].attention.self.query.weight.grad
    assert query[:16].abs().sum() > 0 and query[16:].abs().sum() == 0
    assert layers[1].intermediate.dense.weight.grad is None and layers[3].output.dense.weight.grad is None
    model.zero_grad(set_to_none=True)


def test_the_loss_is_zero_against_itself_and_sums_the_grid(model):
    inputs = _inputs()
    full = dynabert.teacher_targets(model, 1.0, **inputs)
    same = dynabert.grid_loss(model, [(1.0, 1.0)], {1.0: full}, **inputs)
    assert same["hidden"].item() == pytest.approx(0.0, abs=1e-10)
    soft = torch.nn.functional.softmax(full[0], -1)
    entropy = -(soft * soft.log()).sum(-1).mean()  # soft CE against itself is the teacher's entropy
    assert same["logits"].item() == pytest.approx(entropy.item(), rel=1e-5)
    grid = [(0.5, 1.0), (0.5, 0.5)]
    both = dynabert.grid_loss(model, grid, {0.5: full}, **inputs)
    one = [dynabert.grid_loss(model, [g], {0.5: full}, **inputs)["total"] for g in grid]
    assert both["total"].item() == pytest.approx(sum(t.item() for t in one), rel=1e-6)
    half = dynabert.teacher_targets(model, 0.5, **inputs)
    assert dynabert.grid_loss(model, [(0.5, 1.0)], {0.5: half}, **inputs)["hidden"].item() == pytest.approx(0, abs=1e-10)
