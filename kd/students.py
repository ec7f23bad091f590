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

Width reduction keeps `keep_heads` heads and `keep_intermediate` FFN neurons per layer. Plain BERT ties the
attention width to the hidden width (all heads x head size = hidden), so keeping h heads of size d also keeps
h*d of the hidden (residual) channels everywhere (embeddings, LayerNorms, FFN, LM head). `keep_by` says which:
'first' keeps the first heads, neurons and channels; 'importance' the most important ones by activation
magnitude on a few batches of text (Minitron; `kd.importance.activation_importance`), in ascending index
order, and records them on the student's config as `distill_cut`. Every weight is index-selected along each of
its dimensions (`_DIMS`), so the tied decoder follows the kept columns of the word embeddings.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Iterable, Literal

import torch
from transformers import BertConfig, BertForMaskedLM, PreTrainedModel
from transformers.models.bert.modeling_bert import BertPooler

from kd.importance import activation_importance, head_rows, top_indices
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
    keep_by: Literal["first", "importance"] = field(default="first", metadata={"hash": "unless_default"})
    """Teacher init only: which heads, FFN neurons and hidden channels the cut keeps: 'first', or 'importance'
    (the largest activations on `importance_samples` sequences of the stage's training text: Minitron)."""
    importance_samples: int = field(default=256, metadata={"hash": "unless_default"})
    """With keep_by 'importance': how many training sequences the teacher runs to score its channels."""

    def __post_init__(self):
        if self.keep_by not in ("first", "importance"):
            raise ValueError(f"keep_by must be 'first' or 'importance', got {self.keep_by!r}")
        if self.importance_samples < 1:
            raise ValueError(f"importance_samples must be >= 1, got {self.importance_samples}")
        if self.keep_by == "importance" and self.init != "teacher":
            raise ValueError("keep_by 'importance' chooses what to keep of a teacher: it needs init 'teacher'")
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
    if hasattr(cfg, "distill_cut"):  # a teacher that was itself cut: its record is not this student's
        del cfg.distill_cut
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
    """The leading block of `tensor` with `shape` (the token-type rows of a student with one segment)."""
    return tensor[tuple(slice(0, n) for n in shape)]


# What each dimension of a BERT weight indexes, by name suffix (first match wins): "hidden" the residual
# channels, "heads" the attention features of the kept heads, "neurons" the FFN neurons; None keeps the
# leading block (vocabulary, positions, token types).
_DIMS = (
    (re.compile(r"attention\.self\.(query|key|value)\.weight$"), ("heads", "hidden")),
    (re.compile(r"attention\.self\.(query|key|value)\.bias$"), ("heads",)),
    (re.compile(r"attention\.output\.dense\.weight$"), ("hidden", "heads")),
    (re.compile(r"intermediate\.dense\.weight$"), ("neurons", "hidden")),
    (re.compile(r"intermediate\.dense\.bias$"), ("neurons",)),
    (re.compile(r"output\.dense\.weight$"), ("hidden", "neurons")),
    (re.compile(r"dense\.weight$"), ("hidden", "hidden")),  # the MLM head's transform, the pooler
    (re.compile(r"(dense\.bias|LayerNorm\.(weight|bias))$"), ("hidden",)),
    (re.compile(r"_embeddings\.weight$"), (None, "hidden")),
)


@dataclass(frozen=True)
class Cut:
    """What a teacher-initialised student keeps: hidden channels, and per student layer its heads and neurons
    (ascending teacher indices)."""

    channels: torch.Tensor
    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]

    def describe(self) -> dict:
        """Plain lists, for the student's config (`distill_cut`) and so its manifest."""
        return {"channels": self.channels.tolist(), "heads": [h.tolist() for h in self.heads],
                "neurons": [n.tolist() for n in self.neurons]}


def choose_cut(config: StudentConfig, teacher: PreTrainedModel, student_config: BertConfig, sources: list[int],
               batches: Iterable | None = None) -> Cut:
    """The kept channels, heads and neurons: the first ones, or the teacher's most active on `batches`."""
    hidden, heads, neurons = (student_config.hidden_size, student_config.num_attention_heads,
                              student_config.intermediate_size)
    if config.keep_by == "first":
        return Cut(torch.arange(hidden), [torch.arange(heads)] * len(sources), [torch.arange(neurons)] * len(sources))
    if batches is None:
        raise ValueError("keep_by 'importance' needs batches of training text to score the teacher on")
    scores = activation_importance(teacher, batches)
    return Cut(top_indices(scores.channels, hidden), [top_indices(scores.heads[s - 1], heads) for s in sources],
               [top_indices(scores.neurons[s - 1], neurons) for s in sources])


def _select(name: str, tensor: torch.Tensor, shape: torch.Size, index: dict) -> torch.Tensor:
    """`tensor` cut to `shape`: each dimension index-selected by what it indexes (`_DIMS`), else its lead."""
    dims = next((d for pattern, d in _DIMS if pattern.search(name)), ())
    out = tensor
    for axis, size in enumerate(shape):
        kind = dims[axis] if axis < len(dims) else None
        out = out.narrow(axis, 0, size) if kind is None else out.index_select(axis, index[kind])
    return out


def _copy_from_teacher(student: BertForMaskedLM, teacher: PreTrainedModel, sources: list[int], cut: Cut) -> None:
    """Copy embeddings, the source layers and (when the teacher has one) the MLM head, cut to fit."""
    teacher_base = teacher.base_model.state_dict()
    d = teacher.config.hidden_size // teacher.config.num_attention_heads
    layer_of = {f"encoder.layer.{m}.": (f"encoder.layer.{src - 1}.", m) for m, src in enumerate(sources)}
    outside = {"hidden": cut.channels}  # embeddings and the MLM head
    with torch.no_grad():
        for name, param in student.bert.state_dict().items():
            src_name, index = name, outside
            if name.startswith("encoder.layer."):
                prefix = ".".join(name.split(".")[:3]) + "."
                src_prefix, m = layer_of[prefix]
                src_name = src_prefix + name[len(prefix):]
                index = {"hidden": cut.channels, "heads": head_rows(cut.heads[m], d), "neurons": cut.neurons[m]}
            if src_name in teacher_base:
                param.copy_(_select(name, teacher_base[src_name], param.shape, index))
        head = getattr(teacher, "cls", None)
        if head is not None:  # a teacher without an MLM head leaves the student's head freshly initialised
            teacher_head = head.predictions.state_dict()
            for name, param in student.cls.predictions.state_dict().items():
                if name in teacher_head and not name.startswith("decoder."):
                    param.copy_(_select(name, teacher_head[name], param.shape, outside))


def _fold_token_types(student: BertForMaskedLM, teacher: PreTrainedModel | None, channels: torch.Tensor | None) -> None:
    """Zero and freeze the single token-type row, first adding the teacher's segment-A row to positions."""
    emb = student.bert.embeddings
    with torch.no_grad():
        if teacher is not None:
            segment_a = teacher.base_model.embeddings.token_type_embeddings.weight[0]
            emb.position_embeddings.weight += segment_a.index_select(0, channels)
        emb.token_type_embeddings.weight.zero_()
    emb.token_type_embeddings.weight.requires_grad_(False)


def _attach_pooler(student: BertForMaskedLM, teacher: PreTrainedModel, channels: torch.Tensor) -> None:
    """Carry the teacher's pooler, frozen: the MLM loss never reaches it, a classifier will."""
    teacher_pooler = teacher.base_model.pooler.state_dict()
    pooler = BertPooler(student.config)
    with torch.no_grad():
        for name, param in pooler.state_dict().items():
            param.copy_(_select(name, teacher_pooler[name], param.shape, {"hidden": channels}))
    pooler.requires_grad_(False)
    student.bert.pooler = pooler


def build_student(config: StudentConfig, teacher: PreTrainedModel, batches: Iterable | None = None) -> BertForMaskedLM:
    """A `BertForMaskedLM` student with the teacher's vocabulary, built as `config` says.

    `teacher` is a BERT (`BertModel`, `BertForMaskedLM` or a classifier built on one). `batches` (dicts of
    `input_ids`, `attention_mask`, `token_type_ids`) are the text keep_by 'importance' scores the teacher on.
    Random parts (a scratch student, or the LM head of a teacher without one) come from torch's global RNG:
    seed it before calling.
    """
    teacher_config = teacher.config
    teacher_layers = teacher_config.num_hidden_layers
    sources = student_layer_sources(config, teacher_layers) if config.init == "teacher" else []
    num_layers = len(sources) if sources else (config.num_layers or len(config.layers or []))
    student_config = _student_bert_config(config, teacher_config, num_layers)
    cut = choose_cut(config, teacher, student_config, sources, batches) if config.init == "teacher" else None
    if config.keep_by == "importance":  # saved in config.json, so the manifest's `student` records it too
        student_config.distill_cut = {"keep_by": config.keep_by, **cut.describe()}
    student = BertForMaskedLM(student_config)
    if config.init == "teacher":
        _copy_from_teacher(student, teacher, sources, cut)
    if config.remove_token_type_embeddings:
        _fold_token_types(student, teacher if cut else None, cut.channels if cut else None)
    if config.init == "teacher" and not config.remove_pooler and teacher.base_model.pooler is not None:
        _attach_pooler(student, teacher, cut.channels)
    return student
