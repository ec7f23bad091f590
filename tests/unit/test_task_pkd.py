"""Patient KD's phase loss: (1-alpha) hard + alpha soft + beta mean normalised [CLS] MSE, with a student
narrower than the teacher going through the learned projection (trained in the PKD phase)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from kd import losses as L
from kd.students import StudentConfig
from pipeline.config import config_hash
from stages.task.config import Config
from stages.task.loop import Trainee, _phase_params, _projection, build_classifier, phase_loss


@pytest.fixture(scope="module")
def models():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    # keep_heads 1 of 2: a hidden-16 student under a hidden-32 teacher
    student = build_classifier(None, StudentConfig(num_layers=2, layer_selection="first", keep_heads=1), teacher, 2)
    return teacher, student


def test_narrow_student_pkd_loss_projects_cls_states_and_trains_the_projection(models):
    teacher, student = models
    assert student.config.hidden_size == 16
    trainee = Trainee(student, _projection(student, teacher))
    config = Config(teacher_path="unused", objective="pkd", pkd_layers="skip", alpha=0.3, beta=50.0, temperature=2.0)
    ids = torch.randint(5, 100, (3, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "labels": torch.tensor([0, 1, 1])}
    loss = phase_loss("pkd", config, trainee, trainee.forward, teacher, batch, regression=False)

    # by hand: PKD-skip of 2 student layers under 4 maps student layer 1 to teacher layer 2 (the top pair is
    # left to the soft loss)
    model_in = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        t_out = teacher(**model_in, output_hidden_states=True)
    s_out = student(**model_in, output_hidden_states=True)
    s_cls = F.normalize(trainee.proj(s_out.hidden_states[1][:, 0]), dim=-1)
    t_cls = F.normalize(t_out.hidden_states[2][:, 0], dim=-1)
    pt = (s_cls - t_cls).pow(2).sum() / (3 * 32)
    expected = (0.7 * F.cross_entropy(s_out.logits, batch["labels"])
                + 0.3 * L.soft_ce_full(s_out.logits, t_out.logits, 2.0) + 50.0 * pt)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    loss.backward()
    assert trainee.proj.weight.grad is not None and trainee.proj.weight.grad.abs().sum() > 0
    trainable = {n for n, p in trainee.named_parameters() if p.requires_grad}
    assert {"proj.weight", "proj.bias"} <= {n for n, _ in _phase_params(trainee, "pkd", trainable)}
    assert not {"proj.weight"} & {n for n, _ in _phase_params(trainee, "prediction", trainable)}


@pytest.mark.parametrize("hard_weight", [0.0, 0.25, 1.0])
def test_prediction_loss_mixes_the_hard_cross_entropy_by_hard_weight(models, hard_weight):
    teacher, student = models
    trainee = Trainee(student, None)
    config = Config(teacher_path="unused", objective="tinybert_prediction", augmented="@augment",
                    temperature=2.0, hard_weight=hard_weight)
    ids = torch.randint(5, 100, (4, 6))
    t_logits = torch.randn(4, 2)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "labels": torch.tensor([0, 1, 1, 0]), "t_logits": t_logits}
    loss = phase_loss("prediction", config, trainee, trainee.forward, teacher, batch, regression=False)

    model_in = {k: v for k, v in batch.items() if k not in ("labels", "t_logits")}
    s_logits = student(**model_in).logits
    expected = ((1 - hard_weight) * L.soft_ce_full(s_logits, t_logits, 2.0)
                + hard_weight * F.cross_entropy(s_logits, batch["labels"]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_hard_weight_outside_zero_one_is_refused_and_its_default_keeps_the_stage_hash():
    with pytest.raises(ValueError, match="hard_weight must be in"):
        Config(teacher_path="unused", hard_weight=1.5)
    assert config_hash(Config(teacher_path="t")) == config_hash(Config(teacher_path="t", hard_weight=0.0))
    assert config_hash(Config(teacher_path="t")) != config_hash(Config(teacher_path="t", hard_weight=0.5))
