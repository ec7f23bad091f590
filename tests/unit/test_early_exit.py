"""FastBERT's pure parts: normalised entropy on hand-worked values, the summed KL, and batched early exit against
the full model (S = 0) and against exiting sample by sample."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from kd.early_exit import Branches, early_exit, normalized_entropy, self_distillation_loss, spec_of
from kd.losses import kl_full


def test_normalized_entropy_hand_values():
    # uniform over 4 classes: log 4 / log 4 = 1; one-hot-like: ~0; two of four equal: log 2 / log 4 = 0.5
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0], [0.0, 0.0, -80.0, -80.0]])
    assert normalized_entropy(logits).tolist() == pytest.approx([1.0, 0.0, 0.5], abs=1e-6)
    p = torch.tensor([0.7, 0.2, 0.1])
    assert normalized_entropy(p.log()[None]).item() == pytest.approx(-(p * p.log()).sum().item() / math.log(3), abs=1e-6)


def test_self_distillation_sums_the_branch_kls_and_leaves_the_target_alone():
    torch.manual_seed(0)
    branch, final = torch.randn(3, 5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    loss = self_distillation_loss(branch, final, temperature=2.0)
    assert loss.item() == pytest.approx(sum(kl_full(branch[k], final, 2.0).item() for k in range(3)), rel=1e-6)
    loss.backward()
    assert final.grad is None and branch.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def model():
    """A random 4-layer classifier whose branches give confident and unsure answers alike (sharpened output)."""
    torch.manual_seed(3)
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, num_labels=3)
    classifier = BertForSequenceClassification(config).eval()
    branches = Branches(spec_of(classifier, width=16, heads=2)).eval()
    with torch.no_grad():
        for k, b in enumerate(branches.branch):
            b.out.weight.mul_(8.0 + 6 * k)  # later branches surer, so samples leave at different layers
    ids = torch.randint(5, 120, (24, 12), generator=torch.Generator().manual_seed(4))
    lengths = torch.randint(3, 13, (24,), generator=torch.Generator().manual_seed(5))
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    return classifier, branches, ids * mask, mask


def test_speed_zero_is_the_full_model(model):
    classifier, branches, ids, mask = model
    logits, layers = early_exit(classifier, branches, ids, mask, speed=0.0)
    with torch.no_grad():
        full = classifier(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, full, rtol=0, atol=1e-6)
    assert layers.tolist() == [4] * len(ids)


@pytest.mark.parametrize("speed", [0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_batched_exit_matches_sample_by_sample(model, speed):
    classifier, branches, ids, mask = model
    logits, layers = early_exit(classifier, branches, ids, mask, speed=speed)
    one = [early_exit(classifier, branches, ids[i:i + 1, :int(mask[i].sum())], mask[i:i + 1, :int(mask[i].sum())],
                      speed=speed) for i in range(len(ids))]
    assert layers.tolist() == [int(la) for _, la in one]
    assert logits.argmax(1).tolist() == [int(lo.argmax()) for lo, _ in one]
    torch.testing.assert_close(logits, torch.cat([lo for lo, _ in one]), rtol=1e-5, atol=1e-5)
    # each sample exits where its branch is first sure enough (or runs the whole model)
    with torch.no_grad():
        hidden = classifier(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        unsure = torch.stack([normalized_entropy(b(h, mask)) for b, h in zip(branches.branch, hidden[1:-1])])
    expect = [next((k + 1 for k in range(3) if unsure[k, i] < speed), 4) for i in range(len(ids))]
    assert layers.tolist() == expect


def test_the_grid_spreads_exits_and_higher_speed_runs_fewer_layers(model):
    classifier, branches, ids, mask = model
    means = [early_exit(classifier, branches, ids, mask, speed=s)[1].float().mean().item() for s in (0, 0.3, 0.6, 1.0)]
    assert means == sorted(means, reverse=True) and means[0] == 4 and means[-1] == 1
    assert len(set(early_exit(classifier, branches, ids, mask, speed=0.5)[1].tolist())) >= 2


def test_branches_refuse_a_one_layer_backbone():
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=2)
    with pytest.raises(ValueError, match=">= 2 layers"):
        Branches(spec_of(BertForSequenceClassification(config)))


@pytest.mark.parametrize("bad, key", [
    ({"speeds": [0.5, 0.1]}, "speeds"), ({"speeds": [0.0, 1.5]}, "speeds"),
    ({"branch_width": 10, "branch_heads": 3}, "branch_heads"), ({"temperature": 0}, "temperature"),
    ({"data": {"task": "stsb"}}, "regression"), ({"teacher_path": "x"}, "exactly one of teacher"),
])
def test_fastbert_config_errors_name_the_key(bad, key):
    from formats.taskdata import TaskData
    from stages.fastbert.config import Config

    fields = {"teacher": "@teacher_finetune", **bad}
    if "data" in fields:
        fields["data"] = TaskData(**fields["data"])
    with pytest.raises(ValueError, match=key):
        Config(**fields)
