"""The `general` stage's trainable module (student + projections), its loss plan, and the student export.

`LossPlan.check` validates everything about the model pairing before compute: a layer map that does not
fit, widths that differ without a projection, head counts the attention losses cannot pair.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from formats import models
from kd import losses as L
from kd import objectives, teachers
from kd.introspect import AttentionCapture
from kd.students import build_student
from pipeline.config import ConfigError
from pipeline.train import dist
from stages.general.config import Config


class Trainee(nn.Module):
    """The student plus the learned projections student width -> teacher width (TinyBERT's W_h for the hidden
    and cosine losses, W_e for the embedding loss), each only when a loss that is on reads it: under DDP a
    parameter no loss reaches fails the second step."""

    def __init__(self, student: nn.Module, teacher_width: int, *, hidden: bool, embed: bool):
        super().__init__()
        self.student = student
        width = student.config.hidden_size
        self.proj_hidden = nn.Linear(width, teacher_width) if hidden and width != teacher_width else None
        self.proj_embed = nn.Linear(width, teacher_width) if embed and width != teacher_width else None

    @classmethod
    def build(cls, config: Config, teacher: nn.Module, batches: list | None = None) -> "Trainee":
        """The student from `config.student` (ValueError there is a ConfigError naming the key); `batches`: the
        training text a keep_by 'importance' cut scores the teacher on."""
        try:
            student = build_student(config.student, teacher, batches)
        except ValueError as err:
            raise ConfigError(f"student: {err}") from None
        weights, on = config.loss, config.projection
        return cls(student, teacher.config.hidden_size, hidden=on and bool(weights.hidden or weights.cosine),
                   embed=on and bool(weights.embedding))

    def trained_parameters(self, weights: dict) -> list[tuple[str, nn.Parameter]]:
        """The parameters the enabled loss terms (`objectives.enabled`) reach, for the engine to train: the MLM
        head only with a logit loss (soft, mlm), the top layer's other weights only when its output is read
        (logits, hidden, cosine), the layers only when more than the embeddings are read. DDP fails the second
        step on a parameter that gets no gradient; the rest keeps its initial values."""
        logits, top = bool({"soft", "mlm"} & set(weights)), bool({"soft", "mlm", "hidden", "cosine"} & set(weights))
        last = f"{self.student.base_model_prefix}.encoder.layer.{self.student.config.num_hidden_layers - 1}."
        qk = {".attention.self.query.", ".attention.self.key."} if {"attention", "minilm_attention"} & set(weights) else set()
        qk |= {".attention.self.value."} if "minilm_value" in weights else set()
        layers = top or bool(qk)

        def reached(name: str) -> bool:
            if name.startswith("student.cls."):
                return logits
            if ".encoder.layer." in name:
                tail = name[len("student."):]
                return layers and (top or not tail.startswith(last) or any(p in tail for p in qk))
            return True

        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and reached(n)]

    def inputs(self, batch: dict[str, torch.Tensor], hidden: bool = False) -> dict:
        """Keyword arguments of `forward` from a batch."""
        types = batch["token_type_ids"] if self.student.config.type_vocab_size > 1 else None
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "token_type_ids": types,
                "rows": batch["rows"], "cols": batch["cols"], "hidden": hidden}

    def forward(self, input_ids, attention_mask, token_type_ids, rows, cols, hidden: bool = False):
        """Logits at the masked positions only (the LM head over every token would cost a full vocab
        projection per token), and every hidden state when asked."""
        out = self.student.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                      token_type_ids=token_type_ids, output_hidden_states=hidden)
        logits = self.student.cls(out.last_hidden_state[rows, cols])
        return logits, (out.hidden_states if hidden else None)


def _project(layer: nn.Module | None, hidden: torch.Tensor) -> torch.Tensor:
    return hidden if layer is None else layer(hidden)


@dataclass
class LossPlan:
    """The enabled losses with their layer map; calling it runs one micro-batch and returns (loss, parts)."""

    config: Config
    layer_map: list[int]
    student_heads: int
    teacher_heads: int
    student_layers: int
    teacher_layers: int

    @classmethod
    def check(cls, config: Config, trainee: Trainee, teacher: nn.Module, *, online: bool) -> "LossPlan":
        """Refuse pairings the losses cannot handle (ConfigError), before any step."""
        weights, s_cfg, t_cfg = config.loss, trainee.student.config, teacher.config
        layers: list[int] = []
        if weights.hidden or weights.attention:  # only these losses pair layers
            try:
                layers = L.layer_map(config.layer_map, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers,
                                     config.layer_map_layers)
            except ValueError as err:
                raise ConfigError(f"layer_map: {err}") from None
        widths_differ = s_cfg.hidden_size != t_cfg.hidden_size
        for name in ("hidden", "embedding", "cosine"):
            layer = trainee.proj_embed if name == "embedding" else trainee.proj_hidden
            if getattr(weights, name) and widths_differ and layer is None:
                raise ConfigError(f"loss.{name}: student width {s_cfg.hidden_size} != teacher width "
                                  f"{t_cfg.hidden_size}; set projection: true or loss.{name}: 0")
        heads_differ = s_cfg.num_attention_heads != t_cfg.num_attention_heads
        for name in ("attention", "minilm_attention", "minilm_value"):
            if getattr(weights, name) and heads_differ:
                raise ConfigError(f"loss.{name}: student has {s_cfg.num_attention_heads} heads, teacher "
                                  f"{t_cfg.num_attention_heads}; they must match (or set loss.{name}: 0)")
        if weights.attention and 0 in layers:
            raise ConfigError(f"loss.attention: layer map {layers} maps a student layer to the embeddings (0)")
        return cls(config, layers, s_cfg.num_attention_heads, t_cfg.num_attention_heads, s_cfg.num_hidden_layers,
                   t_cfg.num_hidden_layers)

    def __call__(self, engine, batch: dict[str, torch.Tensor], setup) -> tuple[torch.Tensor, dict[str, float]]:
        weights = objectives.enabled(self.config.loss)
        need = objectives.needs(weights)
        need_hidden, need_attn = "hidden" in need, "attention" in need
        trainee = engine.module
        t_logits = t_hidden = t_cap = choice = None
        s_layers, t_layers = self.captured_layers(weights)
        if setup.team is not None:  # this step's member: its cached targets, or its logits online
            batch, t_logits, choice = setup.team.targets(batch, engine.global_step)
        elif setup.online:
            capture = AttentionCapture(setup.teacher, keep_qkv=True, layers=t_layers) if need_attn else nullcontext()
            with capture as t_cap:
                t_logits, t_hidden = teachers.masked_forward(setup.teacher, batch, hidden=need_hidden)
        capture = AttentionCapture(trainee.student, keep_qkv=True, layers=s_layers) if need_attn else nullcontext()
        with capture as s_cap:
            s_logits, s_hidden = engine.forward(**trainee.inputs(batch, need_hidden))
        pair = objectives.Pair(
            batch=batch, student_logits=s_logits, student_hidden=s_hidden, student_capture=s_cap,
            teacher_logits=t_logits, teacher_hidden=t_hidden, teacher_capture=t_cap, layer_map=self.layer_map,
            project_hidden=lambda h: _project(trainee.proj_hidden, h), project_embed=lambda h: _project(trainee.proj_embed, h),
            student_heads=self.student_heads, teacher_heads=self.teacher_heads,
            temperature=self.config.temperature, cache_targets=self.config.cache_targets, tail_column=setup.tail_column)
        # Each rank's mean counts its own units; weighting by its share of the global count makes the ranks'
        # averaged gradient the gradient of the global mean (equal to one process on the same global batch).
        # One all-reduce of both counts, on the device, without a host sync.
        counts = torch.stack([torch.tensor(len(batch["labels"]), device=batch["attention_mask"].device),
                              batch["attention_mask"].sum()])
        positions, tokens = dist.global_shares(counts)
        parts = {name: objectives.TERMS[name].fn(pair) for name in weights}
        total, logged = objectives.weighted_sum(parts, weights, {"positions": positions, "tokens": tokens})
        if choice is not None:
            logged.update(setup.team.shares(choice, total))
        return total, logged

    def captured_layers(self, weights: dict) -> tuple[list[int], list[int]]:
        """0-based student and teacher layers whose query/key the enabled terms read: the mapped layers for
        the attention MSE, the last layer for MiniLM."""
        student, teacher = set(), set()
        if "attention" in weights:
            student |= {m - 1 for m in range(1, len(self.layer_map) + 1)}
            teacher |= {g - 1 for g in self.layer_map}
        if "minilm_attention" in weights or "minilm_value" in weights:
            student.add(self.student_layers - 1)
            teacher.add(self.teacher_layers - 1)
        return sorted(student), sorted(teacher)


def export(config: Config, ctx, engine, setup, metrics: dict, layer_map: list[int]):
    """Save the student (HF, safetensors, with the corpus tokenizer) to `model/`; return the manifest."""
    state = engine.state_dict_for_export()  # every rank: ZeRO-3 gathers collectively
    student_cfg = engine.module.student.config
    if ctx.world.rank == 0:
        from transformers import BertForMaskedLM

        weights = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
        model = BertForMaskedLM(student_cfg)
        model.load_state_dict(weights, strict=True)
    clean = {k.replace("/", "_"): v for k, v in metrics.items()}
    if ctx.world.rank == 0:
        models.save_model(model, setup.tokenizer, ctx.stage_dir, task="fill-mask", card=models.card(ctx, clean))
    dist.barrier()
    outputs = models.model_outputs(ctx.stage_dir)
    extra = {"model_dir": models.MODEL_DIR, "student": json.loads(student_cfg.to_json_string()), "layer_map": layer_map,
             "online_teacher": setup.online, "teacher_dir": str(setup.teacher_dir)}
    if setup.team is not None:
        extra["team"] = setup.team.describe()
    return ctx.manifest(config, outputs, clean, extra)
