"""Head/neuron importance, rewiring and cutting: the masks' gradients, a permutation that keeps outputs, real cuts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
from transformers import logging as hf_logging

from kd.importance import encoder_layers, head_neuron_importance, reorder, shrink

hf_logging.set_verbosity_error()

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=24,
            max_position_embeddings=32, num_labels=3, attn_implementation="sdpa")


def _model(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(**TINY)).eval()
    with torch.no_grad():  # non-zero biases everywhere, so a forgotten bias permutation shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def _batch(seed: int = 1, n: int = 4, length: int = 9) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (n, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # padding, so masked attention is exercised
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (n,), generator=gen)}


def _task_loss(output, batch):
    return torch.nn.functional.cross_entropy(output.logits, batch["labels"])


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_importance_is_the_gradient_of_a_unit_mask():
    model, batch = _model().double(), _batch()
    heads, neurons = head_neuron_importance(model, [batch, _batch(2)], _task_loss)
    assert heads.shape == (3, 4) and neurons.shape == (3, 24)
    assert (heads > 0).all() and (neurons >= 0).all() and neurons.sum() > 0
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())
    # by hand: scaling one unit by (1 +- eps) moves the loss by about +- grad * eps (central difference)
    one_heads, one_neurons = head_neuron_importance(model, [batch], _task_loss)
    layer, eps = encoder_layers(model)[1], 1e-4
    j, h = int(one_neurons[1].argmax()), int(one_heads[1].argmax())

    def loss_at(module, scale: torch.Tensor) -> float:
        hook = module.register_forward_pre_hook(lambda _m, a: (a[0] * scale.to(a[0].dtype),))
        try:
            with torch.no_grad():
                return float(_task_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch))
        finally:
            hook.remove()

    unit = torch.zeros(24, dtype=torch.float64)
    unit[j] = eps
    numeric = (loss_at(layer.output.dense, 1 + unit) - loss_at(layer.output.dense, 1 - unit)) / (2 * eps)
    assert one_neurons[1, j].item() == pytest.approx(abs(numeric), rel=1e-4)
    block = torch.zeros(4, dtype=torch.float64)
    block[h] = eps
    numeric = (loss_at(layer.attention.output.dense, 1 + block.repeat_interleave(8))
               - loss_at(layer.attention.output.dense, 1 - block.repeat_interleave(8))) / (2 * eps)
    assert one_heads[1, h].item() == pytest.approx(abs(numeric), rel=1e-4)
    # summed over batches: the two-batch figure is the sum of the one-batch ones
    second = head_neuron_importance(model, [_batch(2)], _task_loss)
    assert torch.allclose(heads, one_heads + second[0]) and torch.allclose(neurons, one_neurons + second[1])


def test_reorder_is_a_permutation_that_keeps_the_outputs():
    model, batch = _model(), _batch()
    before = _logits(model, batch)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    heads, neurons = head_neuron_importance(model, [batch], _task_loss)
    reorder(model, heads, neurons)
    assert torch.allclose(_logits(model, batch), before, atol=1e-5)
    for name, p in model.named_parameters():  # the same numbers, only moved
        assert torch.equal(torch.sort(p.detach().flatten()).values, torch.sort(weights[name].flatten()).values), name
    h2, n2 = head_neuron_importance(model, [batch], _task_loss)
    for i in range(3):  # after rewiring the most important come first
        assert torch.all(h2[i][:-1] >= h2[i][1:] - 1e-6) and torch.all(n2[i][:-1] >= n2[i][1:] - 1e-6)
    q = encoder_layers(model)[0].attention.self.query.weight
    assert not torch.equal(q, weights["bert.encoder.layer.0.attention.self.query.weight"])  # something moved


def test_shrink_to_everything_is_the_identity():
    model, batch = _model(), _batch()
    full = shrink(model, [list(range(4))] * 3, [list(range(24))] * 3)
    assert torch.allclose(_logits(full, batch), _logits(model, batch), atol=1e-6)
    assert full.state_dict().keys() == model.state_dict().keys()


def _masked_logits(model, batch, heads, neurons, layers):
    """The reference: the full model with dropped heads / neurons multiplied by zero and layers skipped."""
    ref = shrink(model, [list(range(4))] * 3, [list(range(24))] * 3, layers)
    hooks = []
    for layer, i in zip(encoder_layers(ref), layers):
        hm = torch.zeros(4)
        hm[heads[i]] = 1
        nm = torch.zeros(24)
        nm[neurons[i]] = 1
        hooks.append(layer.attention.output.dense.register_forward_pre_hook(
            lambda _m, a, hm=hm: (a[0] * hm.repeat_interleave(8),)))
        hooks.append(layer.output.dense.register_forward_pre_hook(lambda _m, a, nm=nm: (a[0] * nm,)))
    try:
        return _logits(ref, batch)
    finally:
        for h in hooks:
            h.remove()


def test_shrink_cuts_real_matrices_and_matches_masking(tmp_path):
    model, batch = _model(), _batch()
    heads = [[0, 2], [1], [3, 0, 1]]
    neurons = [list(range(0, 24, 2)), list(range(5)), [7, 3, 1]]
    small = shrink(model, heads, neurons, layers=[0, 2])
    assert small.config.num_hidden_layers == 2 and small.config.intermediate_size == 12
    assert encoder_layers(small)[1].intermediate.dense.weight.shape == (12, 32)  # [7, 3, 1] padded with zeros
    assert len(encoder_layers(model)) == 3  # the source is untouched
    expected = _masked_logits(model, batch, heads, neurons, [0, 2])
    assert torch.allclose(_logits(small, batch), expected, atol=1e-5)
    small.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert torch.allclose(_logits(loaded, batch), expected, atol=1e-5)


def test_shrink_names_the_bad_argument():
    model = _model()
    with pytest.raises(ValueError, match="one list per layer"):
        shrink(model, [[0]], [[0]] * 3)
    with pytest.raises(ValueError, match="layer 1: heads"):
        shrink(model, [[0], [], [0]], [[0]] * 3)
    with pytest.raises(ValueError, match="layers must be distinct"):
        shrink(model, [[0]] * 3, [[0]] * 3, layers=[0, 0])
