"""The `task` stage's training: student classifier construction, per-phase losses, checkpoints, exact resume.

Training goes through the shared engine (`pipeline.train.engine`, the torch backend) and checkpoints through
`pipeline.train.checkpoint`, like the `general` stage. Batches are a pure function of (seed, phase, epoch, step), the
learning rate a pure function of the step, and a checkpoint holds weights, optimizer moments and the RNG
state (hashed in its meta.json), so resuming from `ckpt/step-N/` gives bit-identical weights to a run that
never stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from formats.taskdata import pad_batch
from kd import losses
from kd.introspect import AttentionCapture
from pipeline import log
from pipeline.config import ConfigError
from pipeline.manifest import ManifestError
from pipeline.train import checkpoint
from pipeline.train.engine import EngineSettings, build_engine
from stages.task.config import Config

CKPT = "ckpt"


def build_classifier(folder, student_init, teacher, num_labels: int):
    """A sequence-classification student: from a saved model folder, or built from the teacher's layers
    (the teacher's classifier copied when widths allow, since it already separates the task's classes)."""
    from transformers import (
        AutoModelForSequenceClassification,
        BertForSequenceClassification,
    )

    from kd.students import build_student

    if folder is not None:
        student = AutoModelForSequenceClassification.from_pretrained(
            str(folder), num_labels=num_labels, attn_implementation="eager")
    else:
        mlm = build_student(student_init, teacher)
        cfg = mlm.config
        cfg.num_labels = num_labels
        student = BertForSequenceClassification(cfg)
        student.bert.load_state_dict(mlm.bert.state_dict(), strict=False)
        if student.classifier.weight.shape == teacher.classifier.weight.shape:
            student.classifier.load_state_dict(teacher.classifier.state_dict())
        student.bert.pooler.requires_grad_(True)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ConfigError(f"student vocab {student.config.vocab_size} != teacher vocab {teacher.config.vocab_size}; "
                          "use a student built for the teacher's tokenizer")
    return student


def _projection(student, teacher) -> nn.Module:
    """TinyBERT's W_h: a learned map from student to teacher width (identity when they match)."""
    s, t = student.config.hidden_size, teacher.config.hidden_size
    return nn.Identity() if s == t else nn.Linear(s, t)


def _intermediate_loss(config: Config, student, teacher, proj, batch) -> torch.Tensor:
    mask = batch["attention_mask"]
    heads = student.config.num_attention_heads
    if heads > teacher.config.num_attention_heads:
        raise ConfigError(f"TinyBERT attention loss: the student has more heads ({heads}) than the teacher "
                          f"({teacher.config.num_attention_heads})")
    mapping = losses.layer_map(config.layer_map, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    with AttentionCapture(student) as s_cap, AttentionCapture(teacher) as t_cap:
        s_out = student(**batch, output_hidden_states=True)
        with torch.no_grad():
            t_out = teacher(**batch, output_hidden_states=True)
            t_scores = [s.detach() for s in t_cap.scores(mask)]
        s_scores = s_cap.scores(mask)
    loss = losses.hidden_mse(proj(s_out.hidden_states[0]), t_out.hidden_states[0], mask)
    for m, g in enumerate(mapping, start=1):
        loss = loss + losses.hidden_mse(proj(s_out.hidden_states[m]), t_out.hidden_states[g], mask)
        if g > 0:
            # A student with fewer heads (cut with keep_heads) learns the teacher heads it was cut from.
            loss = loss + losses.attention_mse(s_scores[m - 1], t_scores[g - 1][:, :heads], mask)
    return loss


def _teacher_targets(teacher, batch, cached, pick, want_cls: bool, counts: dict):
    """Teacher logits (and [CLS] per layer) for a batch: from the cache when it has them, else a forward."""
    if cached is not None and (not want_cls or "cls" in cached):
        cls = [c for c in cached["cls"][:, pick]] if want_cls else None
        return cached["logits"][pick], cls
    counts["teacher_train_examples"] += len(pick)
    with torch.no_grad():
        out = teacher(**batch, output_hidden_states=want_cls)
    return out.logits, [h[:, 0] for h in out.hidden_states] if want_cls else None


def _soft(config: Config, s_logits, t_logits, regression: bool):
    if regression:
        return nn.functional.mse_loss(s_logits.float(), t_logits.float())
    return losses.task_soft_ce(s_logits, t_logits, config.temperature)


def phase_loss(phase: str, config: Config, student, teacher, proj, batch, labels, cached, pick, counts, regression):
    if phase == "intermediate":
        counts["teacher_train_examples"] += len(pick)
        return _intermediate_loss(config, student, teacher, proj, batch)
    want_cls = phase == "pkd"
    t_logits, t_cls = _teacher_targets(teacher, batch, cached, pick, want_cls, counts)
    s_out = student(**batch, output_hidden_states=want_cls)
    soft = _soft(config, s_out.logits, t_logits, regression)
    if phase == "prediction":
        return soft
    hard = losses.hard_loss(s_out.logits, labels, regression=regression)
    m_count = student.config.num_hidden_layers
    mapping = losses.layer_map(config.pkd_layers, m_count, teacher.config.num_hidden_layers)[:-1]
    loss = (1 - config.alpha) * hard + config.alpha * soft
    if mapping:  # the top layer is already taught by the soft loss (Patient KD, sec. 3)
        s_cls = [s_out.hidden_states[m][:, 0] for m in range(1, m_count)]
        loss = loss + config.beta * losses.pkd_cls_mse(s_cls, [t_cls[g] for g in mapping])
    return loss


class Trainee(nn.Module):
    """Student plus its projection to the teacher's width: one module for the engine and its checkpoints."""

    def __init__(self, student: nn.Module, proj: nn.Module):
        super().__init__()
        self.student, self.proj = student, proj


def _saved_state(found: Path | None) -> dict | None:
    """The trainer state (phase, step) of checkpoint `found`, read before an engine exists to load it into."""
    if found is None:
        return None
    path = found / "state-rank0.json"
    try:
        return json.loads(path.read_text())["state"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise ManifestError(f"{path}: unreadable checkpoint state ({err}); delete {found} to resume from an earlier one") from None


def _settings(config: Config, total: int) -> EngineSettings:
    # Linear warm-up over the first 10% of a phase, then decay to zero: the shared engine's schedule.
    return EngineSettings(backend="torch", lr=config.lr, weight_decay=0.01, warmup_steps=max(1, int(0.1 * total)),
                          total_steps=total, min_lr_ratio=0.0, micro_batch_size=config.batch_size, grad_accum=1,
                          clip_norm=1.0, precision="fp32")


def train(config: Config, ctx, student, teacher, data, cached, pad_id: int, *, regression: bool) -> dict:
    """Run the objective's phases through the shared engine; checkpoint every `checkpoint_every` steps into
    `ckpt/step-N/` (pipeline.train.checkpoint) and resume from the newest complete one."""
    ids, types, labels = data
    n = len(ids)
    per_epoch = math.ceil(n / config.batch_size)
    root = ctx.stage_dir / CKPT
    trainee = Trainee(student, _projection(student, teacher))
    teacher.eval()
    found = checkpoint.latest(root)
    state = _saved_state(found)
    if found is not None:
        log.info(f"task: resuming from {found.name} (phase {state['phase']}, step {state['step']})")
    counts = {"teacher_train_examples": 0, "steps": 0, "resumed_from_step": state["global_step"] if state else 0}
    global_step = 0
    for index, (phase, epochs) in enumerate(config.phases()):
        total = max(1, int(epochs * per_epoch))
        total = min(total, config.max_steps) if config.max_steps else total
        if state is not None and state["phase"] > index:
            global_step += total
            continue
        engine = build_engine(trainee, settings=_settings(config, total), world=ctx.world)
        step = 0
        if state is not None and state["phase"] == index:
            step = checkpoint.load(found, engine, ctx.world)["step"]
        trainee.train()
        while step < total:
            epoch, offset = divmod(step, per_epoch)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.seed * 7919 + index * 101 + epoch))
            pick = order[offset * config.batch_size : (offset + 1) * config.batch_size]
            batch = pad_batch([ids[i] for i in pick], [types[i] for i in pick], pad_id)
            target = torch.as_tensor(labels[pick.numpy()])
            loss = phase_loss(phase, config, trainee.student, teacher, trainee.proj, batch, target, cached, pick,
                              counts, regression)
            engine.backward(loss)
            engine.step()
            step += 1
            counts["steps"] += 1
            ctx.tracker.log_metrics({f"{phase}_loss": loss.item()}, global_step + step)
            if step % config.checkpoint_every == 0 or step == total:
                checkpoint.save(root, global_step + step, engine,
                                {"phase": index, "step": step, "global_step": global_step + step}, ctx.world,
                                keep_last=config.keep_last, meta={"metrics": {f"{phase}_loss": loss.item()}})
            if step % 50 == 0 or step == total:
                log.info(f"task: {phase} step {step}/{total} loss {loss.item():.4f}")
        global_step += total
        state = None
    student.eval()
    return counts
