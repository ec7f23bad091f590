"""The `general` stage's trainable module (student + projections), its loss plan, and the student export.

`LossPlan.check` validates everything about the model pairing before compute: a layer map that does not
fit, widths that differ without a projection, head counts the attention losses cannot pair.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.train import dist
from pipeline.config import ConfigError
from pipeline.manifest import OutputFile
from stages import losses as L
from stages.general_data import teacher_forward
from stages.introspect import AttentionCapture
from stages.student import build_student

MODEL_DIR = "model"


class Trainee(nn.Module):
    """The student plus the learned projections student width -> teacher width (TinyBERT's W_e, W_h)."""

    def __init__(self, student: nn.Module, teacher_width: int, projection: bool):
        super().__init__()
        self.student = student
        width = student.config.hidden_size
        self.proj_hidden = nn.Linear(width, teacher_width) if projection and width != teacher_width else None
        self.proj_embed = nn.Linear(width, teacher_width) if projection and width != teacher_width else None

    @classmethod
    def build(cls, config, teacher: nn.Module) -> "Trainee":
        """The student from `config.student` (ValueError there is a ConfigError naming the key)."""
        try:
            student = build_student(config.student, teacher)
        except ValueError as err:
            raise ConfigError(f"student: {err}") from None
        wants = config.loss.hidden or config.loss.embedding or config.loss.cosine
        return cls(student, teacher.config.hidden_size, config.projection and bool(wants))

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

    config: object
    layer_map: list[int]
    student_heads: int
    teacher_heads: int

    @classmethod
    def check(cls, config, trainee: Trainee, teacher: nn.Module, *, online: bool) -> "LossPlan":
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
            if getattr(weights, name) and widths_differ and trainee.proj_hidden is None:
                raise ConfigError(f"loss.{name}: student width {s_cfg.hidden_size} != teacher width "
                                  f"{t_cfg.hidden_size}; set projection: true or loss.{name}: 0")
        heads_differ = s_cfg.num_attention_heads != t_cfg.num_attention_heads
        for name in ("attention", "minilm_attention", "minilm_value"):
            if getattr(weights, name) and heads_differ:
                raise ConfigError(f"loss.{name}: student has {s_cfg.num_attention_heads} heads, teacher "
                                  f"{t_cfg.num_attention_heads}; they must match (or set loss.{name}: 0)")
        if weights.attention and 0 in layers:
            raise ConfigError(f"loss.attention: layer map {layers} maps a student layer to the embeddings (0)")
        return cls(config, layers, s_cfg.num_attention_heads, t_cfg.num_attention_heads)

    def _scale(self, local: torch.Tensor, world_size: int) -> float:
        # Each rank's mean counts its own units; weighting by local/global share makes the ranks' averaged
        # gradient the gradient of the global mean (equal to one process on the same global batch).
        if world_size == 1:
            return 1.0
        total = dist.all_reduce_sum(local.float()).item()
        return float(local) * world_size / max(total, 1.0)

    def __call__(self, engine, batch: dict[str, torch.Tensor], setup) -> tuple[torch.Tensor, dict[str, float]]:
        w, cfg = self.config.loss, self.config
        trainee, world_size = engine.module, engine.world.world_size
        need_hidden = bool(w.hidden or w.embedding or w.cosine)
        need_attn = bool(w.attention or w.minilm_attention or w.minilm_value)
        t_logits = t_hidden = t_cap = None
        if setup.online:
            if need_attn:
                with AttentionCapture(setup.teacher, keep_qkv=True) as t_cap:
                    t_logits, t_hidden = teacher_forward(setup.teacher, batch, hidden=need_hidden)
            else:
                t_logits, t_hidden = teacher_forward(setup.teacher, batch, hidden=need_hidden)
        if need_attn:
            with AttentionCapture(trainee.student, keep_qkv=True) as s_cap:
                s_logits, s_hidden = engine.forward(**trainee.inputs(batch, need_hidden))
        else:
            s_cap = None
            s_logits, s_hidden = engine.forward(**trainee.inputs(batch, need_hidden))
        mask = batch["attention_mask"]
        pos_scale = self._scale(torch.tensor(len(batch["labels"])), world_size)
        tok_scale = self._scale(mask.sum(), world_size) if (need_hidden or need_attn) else 1.0
        parts: dict[str, torch.Tensor] = {}
        if w.soft:
            if "topk_ids" in batch and cfg.cache_targets == "sampled":
                soft = L.soft_ce_sampled(s_logits, batch["sampled_ids"], batch["sampled_counts"], cfg.temperature)
            elif "topk_ids" in batch:
                soft = L.soft_ce_topk(s_logits, batch["topk_ids"], batch["topk_logp"], batch["tail_logmass"],
                                      cfg.temperature)
            else:
                soft = L.soft_ce_full(s_logits, t_logits, cfg.temperature)
            parts["soft"] = w.soft * pos_scale * soft
        if w.mlm:
            parts["mlm"] = w.mlm * pos_scale * L.mlm_loss(s_logits, batch["labels"])
        if w.cosine:
            last = _project(trainee.proj_hidden, s_hidden[-1])
            parts["cosine"] = w.cosine * tok_scale * L.cosine_hidden(last, t_hidden[-1], mask)
        if w.embedding:
            emb = _project(trainee.proj_embed, s_hidden[0])
            parts["embedding"] = w.embedding * tok_scale * L.hidden_mse(emb, t_hidden[0], mask)
        if w.hidden:
            terms = [L.hidden_mse(_project(trainee.proj_hidden, s_hidden[m]), t_hidden[g], mask)
                     for m, g in enumerate(self.layer_map, start=1)]
            parts["hidden"] = w.hidden * tok_scale * torch.stack(terms).sum()
        if w.attention:
            s_scores, t_scores = s_cap.scores(mask), t_cap.scores(mask)
            terms = [L.attention_mse(s_scores[m - 1], t_scores[g - 1], mask) for m, g in enumerate(self.layer_map, 1)]
            parts["attention"] = w.attention * tok_scale * torch.stack(terms).sum()
        if w.minilm_attention or w.minilm_value:
            (sq, sk, sv), (tq, tk, tv) = s_cap.qkv[-1], t_cap.qkv[-1]
            heads = dict(student_heads=self.student_heads, teacher_heads=self.teacher_heads, mask=mask)
            if w.minilm_attention:
                parts["minilm_attention"] = w.minilm_attention * tok_scale * L.minilm_attention_kl(sq, sk, tq, tk, **heads)
            if w.minilm_value:
                parts["minilm_value"] = w.minilm_value * tok_scale * L.minilm_value_kl(sv, tv, **heads)
        total = torch.stack(list(parts.values())).sum()
        report = {k: v.item() / (pos_scale if k in ("soft", "mlm") else tok_scale) for k, v in parts.items()}
        return total, {**report, "total": sum(report.values())}


def export(config, ctx, engine, setup, metrics: dict, layer_map: list[int]):
    """Save the student (HF, safetensors, with the corpus tokenizer) to `model/`; return the manifest."""
    state = engine.state_dict_for_export()  # every rank: ZeRO-3 gathers collectively
    student_cfg = engine.module.student.config
    target = ctx.stage_dir / MODEL_DIR
    if ctx.world.rank == 0:
        from transformers import BertForMaskedLM

        weights = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
        model = BertForMaskedLM(student_cfg)
        model.load_state_dict(weights, strict=True)
        tmp = ctx.stage_dir / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        setup.tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)  # the folder appears complete or not at all
    dist.barrier()
    outputs = [OutputFile.of(ctx.stage_dir, p.relative_to(ctx.stage_dir)) for p in sorted(target.rglob("*")) if p.is_file()]
    extra = {"model_dir": MODEL_DIR, "student": json.loads(student_cfg.to_json_string()), "layer_map": layer_map,
             "online_teacher": setup.online, "teacher_dir": str(setup.teacher_dir)}
    clean = {k.replace("/", "_"): v for k, v in metrics.items()}
    return ctx.manifest(config, outputs, clean, extra)
