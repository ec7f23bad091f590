"""keep_by 'importance': the cut keeps the most active channels, heads and neurons (Minitron), exactly."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM
from transformers import logging as hf_logging

from kd.importance import activation_importance, head_rows, top_indices
from kd.students import StudentConfig, build_student
from pipeline.config import ConfigError, build, config_hash, to_dict

hf_logging.set_verbosity_error()

TINY = dict(vocab_size=200, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, intermediate_size=64,
            max_position_embeddings=32)
D = 8  # head size
CHANNELS = [1, 4, 9, 12, 13, 20, 22, 23, 27, 30, 33, 35, 38, 41, 44, 47]  # 16 = 2 heads x 8
HEADS = [[0, 5], [2, 3], [1, 4]]  # per teacher layer
NEURONS = [[3, 7, 8, 30, 41, 50, 51, 63], [0, 1, 2, 9, 10, 33, 40, 62], [5, 6, 18, 19, 20, 21, 44, 60]]


def _batches(n: int = 2, length: int = 11) -> list[dict]:
    torch.manual_seed(1)
    return [{"input_ids": torch.randint(5, 200, (4, length)), "attention_mask": torch.ones(4, length, dtype=torch.long)}
            for _ in range(n)]


@pytest.fixture(scope="module")
def planted() -> BertForMaskedLM:
    """A teacher whose planted channels, heads and neurons are by far the most active."""
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**TINY)).eval()
    with torch.no_grad():
        norms = [model.bert.embeddings.LayerNorm] + [n for layer in model.bert.encoder.layer
                                                      for n in (layer.attention.output.LayerNorm, layer.output.LayerNorm)]
        for norm in norms:
            norm.weight[CHANNELS] *= 50
        for layer, heads, neurons in zip(model.bert.encoder.layer, HEADS, NEURONS):
            rows = head_rows(torch.tensor(heads), D)
            layer.attention.self.value.weight[rows] *= 50
            layer.attention.self.value.bias[rows] += 5
            layer.intermediate.dense.bias[neurons] = 20.0  # gelu(20 + small) ~ 20, every other neuron ~ 0..1
    return model


def test_activation_importance_finds_the_planted_units(planted):
    scores = activation_importance(planted, _batches())
    assert top_indices(scores.channels, 16).tolist() == CHANNELS
    assert [top_indices(h, 2).tolist() for h in scores.heads] == HEADS
    assert [top_indices(n, 8).tolist() for n in scores.neurons] == NEURONS
    assert planted.training is False


def test_padding_tokens_do_not_count(planted):
    batch = _batches(1)[0]
    padded = {"input_ids": torch.cat([batch["input_ids"], torch.zeros(4, 5, dtype=torch.long)], 1),
              "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(4, 5, dtype=torch.long)], 1)}
    a, b = activation_importance(planted, [batch]), activation_importance(planted, [padded])
    for x, y in ((a.channels, b.channels), (a.heads, b.heads), (a.neurons, b.neurons)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_importance_cut_keeps_and_index_selects_the_planted_units(planted):
    config = StudentConfig(num_layers=2, layer_selection="explicit", layers=[1, 3], keep_heads=2, keep_intermediate=8,
                           keep_by="importance")
    student = build_student(config, planted, _batches())
    cut = student.config.distill_cut
    assert cut["keep_by"] == "importance" and cut["channels"] == CHANNELS
    assert cut["heads"] == [HEADS[0], HEADS[2]] and cut["neurons"] == [NEURONS[0], NEURONS[2]]
    ch = torch.tensor(CHANNELS)
    t, s = planted.bert, student.bert
    torch.testing.assert_close(s.embeddings.word_embeddings.weight, t.embeddings.word_embeddings.weight[:, ch])
    torch.testing.assert_close(s.embeddings.LayerNorm.weight, t.embeddings.LayerNorm.weight[ch])
    rows = head_rows(torch.tensor(HEADS[2]), D)
    src, dst = t.encoder.layer[2], s.encoder.layer[1]
    torch.testing.assert_close(dst.attention.self.query.weight, src.attention.self.query.weight[rows][:, ch])
    torch.testing.assert_close(dst.attention.self.value.bias, src.attention.self.value.bias[rows])
    torch.testing.assert_close(dst.attention.output.dense.weight, src.attention.output.dense.weight[ch][:, rows])
    neurons = torch.tensor(NEURONS[2])
    torch.testing.assert_close(dst.intermediate.dense.weight, src.intermediate.dense.weight[neurons][:, ch])
    torch.testing.assert_close(dst.output.dense.weight, src.output.dense.weight[ch][:, neurons])
    torch.testing.assert_close(dst.output.LayerNorm.bias, src.output.LayerNorm.bias[ch])
    head_t, head_s = planted.cls.predictions, student.cls.predictions
    torch.testing.assert_close(head_s.transform.dense.weight, head_t.transform.dense.weight[ch][:, ch])
    torch.testing.assert_close(head_s.bias, head_t.bias)
    assert head_s.decoder.weight.data_ptr() == s.embeddings.word_embeddings.weight.data_ptr()  # still tied


def test_importance_cut_of_everything_is_the_teacher(planted):
    """All heads and neurons kept in importance order: the sorted indices are the identity, the function the same."""
    config = StudentConfig(num_layers=3, layer_selection="first", keep_heads=6, keep_intermediate=64,
                           keep_by="importance")
    student = build_student(config, planted, _batches()).eval()
    ids = _batches(1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, planted(ids).logits, rtol=0, atol=0)
    assert student.config.distill_cut["channels"] == list(range(48))


def test_first_is_the_default_and_leaves_the_config_hash_alone():
    config = StudentConfig(num_layers=4, keep_heads=4, keep_intermediate=512)
    assert config.keep_by == "first"
    old = {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)
           if f.name not in ("keep_by", "importance_samples")}
    blob = json.dumps(old, sort_keys=True, separators=(",", ":"))
    assert config_hash(config) == hashlib.sha256(blob.encode()).hexdigest()  # stages finished before keep_by
    assert config_hash(dataclasses.replace(config, keep_by="importance")) != config_hash(config)


def test_first_records_nothing(planted):
    student = build_student(StudentConfig(num_layers=2, keep_heads=2, keep_intermediate=8), planted)
    assert not hasattr(student.config, "distill_cut")
    torch.testing.assert_close(student.bert.embeddings.word_embeddings.weight,
                               planted.bert.embeddings.word_embeddings.weight[:, :16])


def test_bad_keep_by_is_one_config_error():
    with pytest.raises(ConfigError, match="keep_by"):
        build(StudentConfig, {"keep_by": "largest"})
    with pytest.raises(ValueError, match="keep_by 'importance'.*init 'teacher'"):
        StudentConfig(init="scratch", num_layers=2, keep_by="importance")
    with pytest.raises(ValueError, match="importance_samples"):
        StudentConfig(importance_samples=0)


def test_importance_without_text_is_refused(planted):
    with pytest.raises(ValueError, match="needs batches"):
        build_student(StudentConfig(num_layers=2, keep_heads=2, keep_by="importance"), planted)
