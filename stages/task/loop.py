"""The `task` stage's training: student classifier construction, per-phase losses, checkpoints, exact resume.

Training is the one loop of `pipeline.train.trainer` (torch or DeepSpeed ZeRO, any device, several ranks each
taking its slice of every global batch), one engine per phase, checkpoints through `pipeline.train.checkpoint`.
Batches are a pure function of (seed, phase, epoch, step), the learning rate a pure function of the step, and
a checkpoint holds weights, optimizer moments and the RNG state (hashed in its meta.json), so resuming from
`ckpt/step-N/` gives bit-identical weights to a run that never stopped.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from formats.taskdata import pad_batch
from kd import losses
from kd.introspect import AttentionCapture
from kd.teachers import ATTENTION, place
from pipeline.config import ConfigError
from pipeline.train import checkpoint, dist, trainer
from pipeline.train.engine import build_engine
from stages.task.config import Config

CKPT = "ckpt"


def importance_batches(texts: list[tuple[str, ...]], tokenizer, max_length: int, samples: int,
                       batch_size: int) -> list[dict]:
    """The first `samples` training examples, tokenised and padded in batches: the text a keep_by
    'importance' cut scores the teacher on."""
    from formats.taskdata import encode, pad_batch

    ids, types = encode(tokenizer, list(texts[:samples]), max_length)
    return [pad_batch(ids[start:start + batch_size], types[start:start + batch_size], tokenizer.pad_token_id)
            for start in range(0, len(ids), batch_size)]


def build_classifier(folder, student_init, teacher, num_labels: int, batches: list | None = None):
    """A sequence-classification student: from a saved model folder, or built from the teacher's layers
    (the teacher's classifier copied when widths allow, since it already separates the task's classes);
    `batches`: the text a keep_by 'importance' cut scores the teacher on."""
    from transformers import (
        AutoModelForSequenceClassification,
        BertForSequenceClassification,
    )

    from kd.students import build_student

    if folder is not None:
        student = AutoModelForSequenceClassification.from_pretrained(
            str(folder), num_labels=num_labels, attn_implementation=ATTENTION)
    else:
        mlm = build_student(student_init, teacher, batches)
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
    """TinyBERT's W_h, and Patient KD's map of a narrower student's [CLS] states: a learned map from student
    to teacher width (identity when they match)."""
    s, t = student.config.hidden_size, teacher.config.hidden_size
    return nn.Identity() if s == t else nn.Linear(s, t)


class Trainee(nn.Module):
    """Student plus its projection to the teacher's width: one module for the engine and its checkpoints;
    its forward is the student's, so DDP and DeepSpeed see every student forward."""

    def __init__(self, student: nn.Module, proj: nn.Module):
        super().__init__()
        self.student, self.proj = student, proj

    def forward(self, **batch):
        return self.student(**batch)


def _intermediate_loss(config: Config, trainee, forward, teacher, batch) -> torch.Tensor:
    student, proj, mask = trainee.student, trainee.proj, batch["attention_mask"]
    heads = student.config.num_attention_heads
    if heads > teacher.config.num_attention_heads:
        raise ConfigError(f"TinyBERT attention loss: the student has more heads ({heads}) than the teacher "
                          f"({teacher.config.num_attention_heads})")
    mapping = losses.layer_map(config.layer_map, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    pairs = [(m, g) for m, g in enumerate(mapping, start=1) if g > 0]  # attention pairs: scores of these only
    with AttentionCapture(student, layers=[m - 1 for m, _ in pairs]) as s_cap, \
            AttentionCapture(teacher, layers=[g - 1 for _, g in pairs]) as t_cap:
        s_out = forward(**batch, output_hidden_states=True)
        with torch.no_grad():
            t_out = teacher(**batch, output_hidden_states=True)
            t_scores = {g: t_cap.score(g - 1, mask).detach() for _, g in pairs}
    loss = losses.hidden_mse(proj(s_out.hidden_states[0]), t_out.hidden_states[0], mask)
    for m, g in enumerate(mapping, start=1):
        loss = loss + losses.hidden_mse(proj(s_out.hidden_states[m]), t_out.hidden_states[g], mask)
        if g > 0:
            # A student with fewer heads (cut with keep_heads) learns the teacher heads it was cut from.
            loss = loss + losses.attention_mse(s_cap.score(m - 1, mask), t_scores[g][:, :heads], mask)
    return loss


def _soft(config: Config, s_logits, t_logits, regression: bool):
    if regression:
        return nn.functional.mse_loss(s_logits.float(), t_logits.float())
    return losses.task_soft_ce(s_logits, t_logits, config.temperature)


def phase_loss(phase: str, config: Config, trainee, forward, teacher, batch: dict, regression: bool) -> torch.Tensor:
    """One micro-batch's loss of `phase`; `forward` runs the student (the engine's forward), `batch` holds the
    model inputs, `labels` and, when the cache has them, the teacher's `t_logits` (and `t_cls`)."""
    batch = dict(batch)
    labels, t_logits, t_cls = batch.pop("labels"), batch.pop("t_logits", None), batch.pop("t_cls", None)
    if phase == "intermediate":
        return _intermediate_loss(config, trainee, forward, teacher, batch)
    want_cls = phase == "pkd"
    if t_logits is None or (want_cls and t_cls is None):
        with torch.no_grad():
            out = teacher(**batch, output_hidden_states=want_cls)
        t_logits, t_cls = out.logits, ([h[:, 0] for h in out.hidden_states] if want_cls else None)
    elif want_cls:
        t_cls = list(t_cls.unbind(0))
    s_out = forward(**batch, output_hidden_states=want_cls)
    soft = _soft(config, s_out.logits, t_logits, regression)
    if phase == "prediction" and not config.hard_weight:
        return soft
    hard = losses.hard_loss(s_out.logits, labels, regression=regression)
    if phase == "prediction":
        return (1 - config.hard_weight) * soft + config.hard_weight * hard
    student = trainee.student
    m_count = student.config.num_hidden_layers
    mapping = losses.layer_map(config.pkd_layers, m_count, teacher.config.num_hidden_layers)[:-1]
    loss = (1 - config.alpha) * hard + config.alpha * soft
    if mapping:  # the top layer is already taught by the soft loss (Patient KD, sec. 3)
        # A narrower student's states go through the learned projection first (normalised after it).
        s_cls = [trainee.proj(s_out.hidden_states[m][:, 0]) for m in range(1, m_count)]
        loss = loss + config.beta * losses.pkd_cls_mse(s_cls, [t_cls[g] for g in mapping])
    return loss


def _phase_params(trainee: Trainee, phase: str, trainable: set[str]) -> list:
    """What a phase trains: step 1 (hidden states and scores) the student's embeddings and layers and the
    projection; the prediction layer every trainable student parameter; PKD those and the projection. The
    rest gets no gradient in that phase, so leaving it out changes nothing and lets DDP see only parameters
    that are used."""
    student = trainee.student
    proj = [(f"proj.{n}", p) for n, p in trainee.proj.named_parameters()]
    if phase == "intermediate":
        named = [(f"student.{student.base_model_prefix}.{n}", p) for n, p in student.base_model.named_parameters()
                 if not n.startswith("pooler.")] + proj
    else:
        pkd_proj = proj if phase == "pkd" and student.config.num_hidden_layers > 1 else []  # no [CLS] pair: unused
        named = [(f"student.{n}", p) for n, p in student.named_parameters()] + pkd_proj
    return [(n, p) for n, p in named if n in trainable]


def train(config: Config, ctx, student, teacher, data, cached, pad_id: int, *, regression: bool, evaluate=None,
          team=None):
    """Run the objective's phases through the one trainer; checkpoint every `checkpoint_every` steps (and at the
    end of each phase) into `ckpt/step-N/` and resume from the newest complete one. `evaluate(student)` (dev
    metrics of the student being trained) runs every `eval_every` steps and at the end of each phase. With a
    `team` (stages/task/skd.py) the prediction phase's soft targets come from its sampled members. Returns
    (counts with `phases`: name, first global step and steps of each; the trained student: a CPU fp32 copy on
    rank 0, None on the other ranks)."""
    ids, types, labels = data
    n, world = len(ids), ctx.world
    per_epoch = math.ceil(n / config.batch_size)
    root = ctx.stage_dir / CKPT
    trainee = Trainee(student, _projection(student, teacher))
    trainable = {name for name, p in trainee.named_parameters() if p.requires_grad}
    found, state = trainer.resume_point(config, root, "task")
    counts = {"teacher_train_examples": 0, "steps": 0, "resumed_from_step": state["global_step"] if state else 0,
              "phases": []}
    global_step, engine = 0, None
    for index, (phase, epochs) in enumerate(config.phases()):
        total = trainer.phase_steps(epochs, per_epoch, config.max_steps)
        counts["phases"].append({"phase": phase, "first_step": global_step, "steps": total})
        if state is not None and state["phase"] > index:
            global_step += total
            continue
        if engine is not None:  # a fresh module per phase: DeepSpeed (ZeRO-3 above all) wraps a module once
            trainee = _fresh(engine, trainee, teacher)
        settings = config.engine_settings(total_steps=total, micro_batch_size=-(-config.batch_size // world.world_size),
                                          world=world)
        place(teacher, settings.device, "auto")
        engine = build_engine(trainee, settings=settings, world=world, params=_phase_params(trainee, phase, trainable))
        if state is not None and state["phase"] == index:
            checkpoint.load(found, engine, world)
        trainee.train()
        start = engine.global_step
        seed = ctx.seed * 7919 + index * 101
        sampled = team is not None and phase != "intermediate"
        if sampled:
            team.start_phase(seed, total, settings.device)

        def next_batch():
            pick = trainer.example_indices(engine.global_step, n, config.batch_size, seed, world)
            batch = pad_batch([ids[i] for i in pick], [types[i] for i in pick], pad_id)
            batch["labels"] = torch.as_tensor(labels[pick.numpy()])
            want_cls = phase == "pkd"
            if sampled:
                counts["teacher_train_examples"] += team.fill(batch, engine.global_step, pick)
            elif phase != "intermediate" and cached is not None and (not want_cls or "cls" in cached):
                batch["t_logits"] = cached["logits"][pick]
                if want_cls:
                    batch["t_cls"] = cached["cls"][:, pick]
            else:
                counts["teacher_train_examples"] += len(pick)
            return batch

        def loss(batch):
            share = dist.global_shares(torch.tensor([len(batch["labels"])], device=batch["labels"].device))[0]
            source = team.teacher(batch, teacher) if sampled else teacher
            value = phase_loss(phase, config, trainee, engine.forward, source, batch, regression) * share
            return value, {"total": value, **(team.shares(value) if sampled else {})}

        offset = global_step
        trainer.fit(engine, config, total=total, next_batch=next_batch, loss=loss, ctx=ctx, root=root,
                    desc=f"task {phase}", step_offset=offset, save_final=True, loss_metric=f"{phase}_loss",
                    evaluate=(lambda step: evaluate(engine.module.student)) if evaluate else None,
                    eval_every=config.eval_every, eval_final=evaluate is not None,
                    state=lambda: {"phase": index, "step": engine.global_step,
                                   "global_step": offset + engine.global_step})
        counts["steps"] += engine.global_step - start
        global_step += total
        state = None
    counts["teacher_train_examples"] = int(dist.all_reduce_sum(torch.tensor(counts["teacher_train_examples"])))
    trained = engine.exported(lambda: type(student)(student.config), prefix="student.")
    return counts, trained


def _fresh(engine, trainee: Trainee, teacher) -> Trainee:
    """A new CPU Trainee holding the engine's current weights (gathered on every rank)."""
    state = engine.state_dict_for_export()
    student = trainee.student
    with torch.random.fork_rng(devices=[]):
        fresh = Trainee(type(student)(student.config), _projection(student, teacher))
    fresh.load_state_dict(state, strict=True)
    return fresh
