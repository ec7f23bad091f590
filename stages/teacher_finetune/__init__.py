"""Stage `teacher_finetune`: fine-tune any local HF encoder as a sequence classifier, early-stopped on dev.

TinyBERT's task distillation needs a teacher fine-tuned on the task, and fine-tuned teachers are rarely
released. This stage trains one (AdamW, linear warm-up/decay, evaluation every `eval_every` steps, best dev
score kept, stop after `patience` evaluations without improvement) and saves it in HF format with its dev
metrics. With `finetuned: true` the given model already is the task teacher: nothing is trained, it is
only evaluated and saved, so the rest of the recipe is unchanged.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from formats import models
from formats.taskdata import (
    encode,
    load_task,
    pad_batch,
    predict,
    predictions,
    with_source,
)
from kd import metrics as task_metrics
from pipeline import log
from pipeline.assets import resolve_asset
from pipeline.config import ConfigError

LAUNCH = "single"


from stages.teacher_finetune.config import Config


def load_classifier(path: Path, num_labels: int, label_names: list[str]):
    """AutoModelForSequenceClassification from a local folder, with eager attention (maps are needed later)."""
    from transformers import AutoModelForSequenceClassification

    kwargs = {"num_labels": num_labels, "attn_implementation": "eager"}
    if label_names:
        kwargs.update(id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    return AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)


def evaluate(model, dev_ids, dev_types, dev_labels, pad_id: int, preset, batch_size: int) -> tuple[dict, np.ndarray]:
    """Dev metrics (with `score`) and the predictions they came from."""
    preds = predictions(predict(model, dev_ids, dev_types, pad_id, batch_size), preset.regression)
    return task_metrics.compute(list(preset.metrics), preds, dev_labels), preds


def _optimizer(model, config: Config, total_steps: int):
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    warmup = max(1, int(config.warmup_ratio * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup))))
    return opt, sched


def train(model, config: Config, train_enc, dev_enc, preset, pad_id: int, seed: int, tracker=None) -> tuple[dict, int]:
    """Train with early stopping; load the best dev state back into `model`; return its metrics and steps run."""
    ids, types, labels = train_enc
    per_epoch = -(-len(ids) // config.batch_size)
    total = min(config.max_steps or per_epoch * config.epochs, per_epoch * config.epochs)
    opt, sched = _optimizer(model, config, total)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, bad, step = None, None, 0, 0
    model.train()
    while step < total and bad < config.patience:
        for pick in torch.randperm(len(ids), generator=gen).split(config.batch_size):
            batch = pad_batch([ids[i] for i in pick], [types[i] for i in pick], pad_id)
            target = torch.as_tensor(labels[pick.numpy()])
            out = model(**batch, labels=target.float() if preset.regression else target)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
            step += 1
            if step % config.eval_every == 0 or step == total:
                scores, _ = evaluate(model, *dev_enc, pad_id, preset, config.eval_batch_size)
                log.info(f"teacher_finetune: step {step}/{total} loss {out.loss.item():.4f} dev {scores}")
                if tracker is not None:
                    tracker.log_metrics({"loss": out.loss.item(), **{f"dev_{k}": v for k, v in scores.items()}}, step)
                if best is None or scores["score"] > best["score"]:
                    best, best_state, bad = scores, copy.deepcopy(model.state_dict()), 0
                else:
                    bad += 1
                model.train()
            if step >= total or bad >= config.patience:
                break
    model.load_state_dict(best_state)
    return best, step


def run(config: Config, ctx):
    """Fine-tune (or take) the teacher, evaluate it on dev, save it with its metrics."""
    from transformers import AutoTokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(ctx.seed)
    source = resolve_asset(config.teacher_path)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    train_ex, dev_ex = load_task(with_source(config.data, ctx))
    preset = config.data.preset
    num_labels = 1 if preset.regression else len(train_ex.label_names)
    model = load_classifier(source, num_labels, train_ex.label_names)
    if config.finetuned and getattr(model.config, "num_labels", None) != num_labels:
        raise ConfigError(f"{config.teacher_path}: finetuned: true but its classifier has {model.config.num_labels} "
                          f"labels and the task {num_labels}")
    dev_enc = (*encode(tokenizer, dev_ex.texts, config.data.max_length), dev_ex.labels)
    steps = 0
    if not config.finetuned:
        train_enc = (*encode(tokenizer, train_ex.texts, config.data.max_length), train_ex.labels)
        _, steps = train(model, config, train_enc, dev_enc, preset, tokenizer.pad_token_id, ctx.seed, ctx.tracker)
    scores, preds = evaluate(model, *dev_enc, tokenizer.pad_token_id, preset, config.eval_batch_size)
    log.info(f"teacher_finetune: dev {scores} after {steps} steps")
    metrics = {**{f"dev_{k}": v for k, v in scores.items()}, "steps": steps, "train_examples": len(train_ex)}
    outputs = models.save_model(model, tokenizer, ctx.stage_dir, labels=None if preset.regression else train_ex.label_names,
                                examples=[t[0] for t in dev_ex.texts[:3]], card=models.card(ctx, metrics))
    extra = {"model_dir": models.MODEL_DIR, "task": config.data.task, "label_names": train_ex.label_names,
             "num_labels": num_labels, "regression": preset.regression, "finetuned_here": not config.finetuned}
    if not preset.regression:
        extra["confusion_matrix"] = task_metrics.confusion_matrix(preds, dev_ex.labels, range(num_labels)).tolist()
    return ctx.manifest(config, outputs, metrics, extra)


