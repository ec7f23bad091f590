"""The general stage trains exactly the parameters its enabled losses reach: each projection only for the
losses that read it, the MLM head only with a logit loss, the top layer's value/FFN only when its output is
read. Checked against autograd: every selected parameter gets a gradient from those losses, no other does."""

from __future__ import annotations

import pytest
import torch

from stages.general.model import Trainee


def _trainee(hidden: bool, embed: bool) -> Trainee:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    student = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=16))
    return Trainee(student, 32, hidden=hidden, embed=embed)


def _reached_by_autograd(trainee: Trainee, weights: dict) -> set[str]:
    """Names of the parameters that get a gradient from a stand-in for each enabled term's inputs."""
    ids = torch.randint(5, 50, (2, 6))
    out = trainee.student.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    last = trainee.student.base_model.encoder.layer[-1].attention.self
    h_last_in = out.hidden_states[-2]
    parts = []
    if {"soft", "mlm"} & set(weights):
        parts.append(trainee.student.cls(out.last_hidden_state).sum())
    if "cosine" in weights or "hidden" in weights:
        parts.append(trainee.proj_hidden(out.hidden_states[-1]).sum())
    if "embedding" in weights:
        parts.append(trainee.proj_embed(out.hidden_states[0]).sum())
    if "attention" in weights:  # scores of the top layer come from its query and key
        parts.append((last.query(h_last_in) * last.key(h_last_in)).sum())
    if "minilm_value" in weights:
        parts.append(last.value(h_last_in).sum())
    torch.stack(parts).sum().backward()
    return {n for n, p in trainee.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("weights", [{"cosine": 1.0}, {"hidden": 1.0}, {"embedding": 1.0}, {"attention": 1.0},
                                     {"minilm_value": 1.0}, {"soft": 1.0, "mlm": 0.5}, {"soft": 1.0, "embedding": 1.0}])
def test_trained_parameters_are_the_ones_the_losses_reach(weights):
    trainee = _trainee(hidden=bool({"cosine", "hidden"} & set(weights)), embed="embedding" in weights)
    chosen = {n for n, _ in trainee.trained_parameters(weights)}
    assert chosen == _reached_by_autograd(trainee, weights)
    assert (trainee.proj_hidden is None) == (not {"cosine", "hidden"} & set(weights))
    assert (trainee.proj_embed is None) == ("embedding" not in weights)
