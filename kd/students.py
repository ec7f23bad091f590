"""Build a student BERT: from a size, or initialised from a teacher's layers (DistilBERT, Patient KD).

The student is always a plain Hugging Face `BertForMaskedLM` sharing the teacher's vocabulary, so
`save_pretrained` writes safetensors that `AutoModelForMaskedLM` and `AutoModelForSequenceClassification`
load with nothing of ours installed.

Two options change the architecture in a way plain `transformers` must still load:
- `remove_token_type_embeddings` (DistilBERT): the config gets `type_vocab_size=1` and that single row is
  zero and frozen (`requires_grad=False`). When initialising from a teacher, its segment-A row is first
  folded into the position embeddings, so single-segment inputs give exactly the teacher's embeddings.
  Such a student accepts only `token_type_ids` of 0 (or none).
- `remove_pooler`: a masked-LM model has no pooler; when it is kept (the default) and the teacher has one,
  the teacher's pooler is attached frozen, so it is saved and a sequence classifier built from the saved
  folder starts from it. Removed, the classifier's pooler starts random.

Width reduction slices the first `keep_heads` heads and the first `keep_intermediate` FFN neurons. Plain
BERT ties the attention width to the hidden width (all heads x head size = hidden), so keeping h heads of
size d also keeps the first h*d hidden features everywhere (embeddings, LayerNorms, FFN, LM head).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import BertConfig, BertForMaskedLM, PreTrainedModel
from transformers.models.bert.modeling_bert import BertPooler

from kd.losses import layer_map


@dataclass(kw_only=True)
class StudentConfig:
    """What the student looks like and where its weights start."""

    init: Literal["scratch", "teacher"] = "teacher"
    """'teacher': copy embeddings, the selected layers and the LM head from the teacher; 'scratch': random."""
    num_layers: int | None = None
    """Transformer layers; default: half the teacher's (rounded up), or len(layers) for 'explicit'."""
    hidden_size: int | None = None
    """Hidden width. Scratch: default the teacher's. Teacher init: must equal the (sliced) teacher width."""
    num_heads: int | None = None
    """Attention heads. Scratch: default the teacher's. Teacher init: use keep_heads to change it."""
    intermediate_size: int | None = None
    """FFN width. Scratch: default 4 x hidden. Teacher init: use keep_intermediate to change it."""
    layer_selection: Literal["every_other", "first", "last", "uniform", "explicit"] = "uniform"
    """Which teacher layers initialise the student: every_other (1, 3, 5, ...: DistilBERT), first k
    (Patient KD), last k, uniform (g(m) = m*N/M, TinyBERT's map) or the explicit `layers`."""
    layers: list[int] | None = None
    """Teacher layer indices (1-based), one per student layer, for layer_selection 'explicit'."""
    remove_token_type_embeddings: bool = False
    """DistilBERT: type_vocab_size=1 with a frozen zero row (segment A folded into positions)."""
    remove_pooler: bool = False
    """Drop the [CLS] pooler instead of carrying the teacher's (frozen) into the saved student."""
    keep_heads: int | None = None
    """Teacher init only: keep the first this many heads per layer (hidden width shrinks with them)."""
    keep_intermediate: int | None = None
    """Teacher init only: keep the first this many FFN neurons per layer."""

    def __post_init__(self):
        if self.init not in ("scratch", "teacher"):
            raise ValueError(f"init must be 'scratch' or 'teacher', got {self.init!r}")
        if self.layer_selection not in ("every_other", "first", "last", "uniform", "explicit"):
            raise ValueError(f"layer_selection must be one of every_other, first, last, uniform, explicit, "
                             f"got {self.layer_selection!r}")
        for name in ("num_layers", "hidden_size", "num_heads", "intermediate_size", "keep_heads", "keep_intermediate"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if (self.layer_selection == "explicit") != (self.layers is not None):
            raise ValueError("layers is required with layer_selection 'explicit' and only then")
        if self.layers is not None:
            if self.num_layers is not None and self.num_layers != len(self.layers):
                raise ValueError(f"num_layers {self.num_layers} != len(layers) {len(self.layers)}")
            if any(i < 1 for i in self.layers):
                raise ValueError(f"layers are 1-based teacher layer indices, got {self.layers}")
        if self.init == "scratch":
            if self.keep_heads is not None or self.keep_intermediate is not None:
                raise ValueError("keep_heads / keep_intermediate slice a teacher: they need init 'teacher'")
            if self.num_layers is None:
                raise ValueError("init 'scratch' needs num_layers")
        if self.init == "teacher" and (self.num_heads is not None or self.intermediate_size is not None):
            raise ValueError("with init 'teacher' the widths come from the teacher: use keep_heads / "
                             "keep_intermediate instead of num_heads / intermediate_size")
        if self.hidden_size is not None and self.num_heads is not None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


def student_layer_sources(config: StudentConfig, teacher_layers: int) -> list[int]:
    """For student layer m = 1..M, the teacher layer (1-based) it is initialised from."""
    if config.layer_selection == "explicit":
        sources = layer_map("explicit", len(config.layers), teacher_layers, config.layers)
        return sources
    count = config.num_layers or (teacher_layers + 1) // 2
    if config.layer_selection == "every_other":
        if 2 * count - 1 > teacher_layers:
            raise ValueError(f"every_other: {count} student layers need a teacher with >= {2 * count - 1} "
                             f"layers, it has {teacher_layers}")
        return [2 * m - 1 for m in range(1, count + 1)]
    return layer_map(config.layer_selection, count, teacher_layers)


def _student_bert_config(config: StudentConfig, teacher_config: BertConfig, num_layers: int) -> BertConfig:
    """The teacher's config with the student's depth, widths and token types."""
    cfg = copy.deepcopy(teacher_config)
    cfg.num_hidden_layers = num_layers
    cfg.architectures = ["BertForMaskedLM"]
    cfg.is_decoder = False
    if config.init == "scratch":
        cfg.hidden_size = config.hidden_size or teacher_config.hidden_size
        cfg.num_attention_heads = config.num_heads or teacher_config.num_attention_heads
        cfg.intermediate_size = config.intermediate_size or 4 * cfg.hidden_size
    else:
        head_size = teacher_config.hidden_size // teacher_config.num_attention_heads
        heads = config.keep_heads or teacher_config.num_attention_heads
        if heads > teacher_config.num_attention_heads:
            raise ValueError(f"keep_heads {heads} > the teacher's {teacher_config.num_attention_heads} heads")
        cfg.num_attention_heads, cfg.hidden_size = heads, heads * head_size
        cfg.intermediate_size = config.keep_intermediate or teacher_config.intermediate_size
        if cfg.intermediate_size > teacher_config.intermediate_size:
            raise ValueError(f"keep_intermediate {cfg.intermediate_size} > the teacher's "
                             f"{teacher_config.intermediate_size}")
        if config.hidden_size is not None and config.hidden_size != cfg.hidden_size:
            raise ValueError(f"hidden_size {config.hidden_size} does not match the teacher-initialised width "
                             f"{cfg.hidden_size} (teacher {teacher_config.hidden_size}, keep_heads {config.keep_heads})")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_attention_heads}")
    if config.remove_token_type_embeddings:
        cfg.type_vocab_size = 1
    return cfg


def _leading(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The leading block of `tensor` with `shape`: keeps the first heads / neurons / features."""
    return tensor[tuple(slice(0, n) for n in shape)]


def _copy_from_teacher(student: BertForMaskedLM, teacher: PreTrainedModel, sources: list[int]) -> None:
    """Copy embeddings, the source layers and (when the teacher has one) the MLM head, sliced to fit."""
    teacher_base = teacher.base_model.state_dict()
    layer_of = {f"encoder.layer.{m}.": f"encoder.layer.{src - 1}." for m, src in enumerate(sources)}
    with torch.no_grad():
        for name, param in student.bert.state_dict().items():
            src_name = name
            if name.startswith("encoder.layer."):
                prefix = ".".join(name.split(".")[:3]) + "."
                src_name = layer_of[prefix] + name[len(prefix):]
            if src_name in teacher_base:
                param.copy_(_leading(teacher_base[src_name], param.shape))
        head = getattr(teacher, "cls", None)
        if head is not None:  # a teacher without an MLM head leaves the student's head freshly initialised
            teacher_head = head.predictions.state_dict()
            for name, param in student.cls.predictions.state_dict().items():
                if name in teacher_head and not name.startswith("decoder."):
                    param.copy_(_leading(teacher_head[name], param.shape))


def _fold_token_types(student: BertForMaskedLM, teacher: PreTrainedModel | None) -> None:
    """Zero and freeze the single token-type row, first adding the teacher's segment-A row to positions."""
    emb = student.bert.embeddings
    with torch.no_grad():
        if teacher is not None:
            segment_a = teacher.base_model.embeddings.token_type_embeddings.weight[0]
            emb.position_embeddings.weight += _leading(segment_a, emb.position_embeddings.weight.shape[1:])
        emb.token_type_embeddings.weight.zero_()
    emb.token_type_embeddings.weight.requires_grad_(False)


def _attach_pooler(student: BertForMaskedLM, teacher: PreTrainedModel) -> None:
    """Carry the teacher's pooler, frozen: the MLM loss never reaches it, a classifier will."""
    teacher_pooler = teacher.base_model.pooler
    pooler = BertPooler(student.config)
    with torch.no_grad():
        for name, param in pooler.state_dict().items():
            param.copy_(_leading(teacher_pooler.state_dict()[name], param.shape))
    pooler.requires_grad_(False)
    student.bert.pooler = pooler


def build_student(config: StudentConfig, teacher: PreTrainedModel) -> BertForMaskedLM:
    """A `BertForMaskedLM` student with the teacher's vocabulary, built as `config` says.

    `teacher` is a BERT (`BertModel` or `BertForMaskedLM`). Random parts (a scratch student, or the LM head
    of a teacher without one) come from torch's global RNG: seed it before calling.
    """
    teacher_config = teacher.config
    teacher_layers = teacher_config.num_hidden_layers
    sources = student_layer_sources(config, teacher_layers) if config.init == "teacher" else []
    num_layers = len(sources) if sources else (config.num_layers or len(config.layers or []))
    student = BertForMaskedLM(_student_bert_config(config, teacher_config, num_layers))
    if config.init == "teacher":
        _copy_from_teacher(student, teacher, sources)
    if config.remove_token_type_embeddings:
        _fold_token_types(student, teacher if config.init == "teacher" else None)
    if config.init == "teacher" and not config.remove_pooler and teacher.base_model.pooler is not None:
        _attach_pooler(student, teacher)
    return student
