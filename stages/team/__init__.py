"""Stage `team`: assemble a teacher team for stochastic knowledge distillation (SKDBERT; docs/skd.md).

Each member is a fine-tuned task classifier (a `teacher_finetune` stage, e.g. the full teacher and its
first-k-layer truncations fine-tuned with `num_layers: k`, an earlier `task` student, or a folder) with a
level (its capacity: layers x width, or given). The stage checks that every member speaks the task (its
labels) and the first member's vocabulary, scores each on dev, checks the member caches are one shared
augmentation (member by member), and writes `team.json` (formats/team.py), whose members, levels and scores
also go to the manifest and to MLflow. The `task` stage reads it through `team: "@team"` and draws one
member per step by `sampler.law`.
"""

from __future__ import annotations

import torch

from formats import models
from formats import team as team_format
from formats.taskdata import check_same_vocab, encode, load_task, predict, predictions, with_source
from kd import teams
from kd.latency import parameter_count
from kd.metrics import compute
from kd.teachers import ATTENTION, pick_device
from pipeline import log
from pipeline.config import ConfigError
from stages.team.config import Config, TeamMember

LAUNCH = "single"


def _folder(ctx, index: int, member: TeamMember):
    if member.teacher:
        return models.upstream_model(ctx, member.teacher, None, role=f"members.{index}.teacher")
    return models.upstream_model(ctx, None, member.teacher_path)


def _score(config: Config, model, tokenizer, dev, device) -> dict:
    ids, types = encode(tokenizer, dev.texts, config.data.max_length)
    logits = predict(model.to(device), ids, types, tokenizer.pad_token_id, config.eval_batch_size)
    return compute(list(config.data.preset.metrics), predictions(logits, config.data.preset.regression), dev.labels)


def run(config: Config, ctx):
    """Load, check and score every member; write team.json."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device, ctx.world)
    train, dev = load_task(with_source(config.data, ctx))
    num_labels = 1 if config.data.preset.regression else len(train.label_names)
    members, first_tokenizer = [], None
    for index, member in enumerate(config.members):
        folder = _folder(ctx, index, member)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        first_tokenizer = first_tokenizer or tokenizer
        check_same_vocab(first_tokenizer, tokenizer, f"team member {member.name!r} ({folder})")
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), attn_implementation=ATTENTION)
        if model.config.num_labels != num_labels:
            raise ConfigError(f"team member {member.name!r}: {folder} has {model.config.num_labels} labels, the task "
                              f"{num_labels}; fine-tune it on this task first (teacher_finetune)")
        dev_metrics = _score(config, model, tokenizer, dev, device)
        cache = str(ctx.input_dir(f"members.{index}.augmented").resolve()) if member.augmented else None
        members.append(team_format.Member(
            name=member.name, model_dir=str(folder.resolve()), teacher_sha256=models.weights_sha256(folder),
            level=member.level or teams.capacity(model.config), layers=model.config.num_hidden_layers,
            width=model.config.hidden_size, params=parameter_count(model), dev=dev_metrics, cache=cache))
        log.info(f"team: {member.name} level {members[-1].level:g} dev score {dev_metrics['score']:.4f}")
    team_format.check_caches(members)
    outputs = [team_format.write(ctx.stage_dir, members)]
    metrics = {"members": len(members)}
    for m in members:
        metrics.update({f"{m.name}_level": m.level, f"{m.name}_dev_score": m.score, f"{m.name}_params": m.params})
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_params({f"member_{i}": f"{m.name} (level {m.level:g})" for i, m in enumerate(members)})
    extra = {"team": team_format.TEAM_FILE, "cached": bool(members[0].cache), "label_names": train.label_names,
             "members": [{"name": m.name, "level": m.level, "dev_score": m.score} for m in members]}
    return ctx.manifest(config, outputs, metrics, extra)
