"""Stage `teacher_finetune`: fine-tune any local HF encoder as a sequence classifier, early-stopped on dev.

TinyBERT's task distillation needs a teacher fine-tuned on the task, and fine-tuned teachers are rarely
released. This stage trains one (AdamW, linear warm-up/decay, evaluation every `eval_every` steps, best dev
score kept, stop after `patience` evaluations without improvement) and saves it in HF format with its dev
metrics. With `finetuned: true` the given model already is the task teacher: nothing is trained, it is
only evaluated and saved, so the rest of the recipe is unchanged. With `num_layers: k` only the encoder's first
k layers are kept before fine-tuning: a smaller member of an SKD teacher team (docs/skd.md).

Training is the one loop of `pipeline.train.trainer` (any device, torch or DeepSpeed ZeRO, several ranks each
taking its slice of every global batch). Batches are a pure function of (seed, epoch, step), and a
checkpoint (`checkpoints/step-N/`) holds the engine, the early-stopping state and the best weights so far,
so a resumed run ends with the same model as one that never stopped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from formats import models
from formats.taskdata import (
    encode,
    pad_batch,
    predict,
    predictions,
    with_source,
)
from formats.testsplit import describe, load_splits
from kd import metrics as task_metrics
from kd.teachers import ATTENTION
from kd.teams import truncate_encoder
from pipeline import log
from pipeline.assets import resolve_asset
from pipeline.config import ConfigError
from pipeline.train import device as devices
from pipeline.train import checkpoint, dist, trainer
from pipeline.train.engine import build_engine
from stages.teacher_finetune.config import Config

LAUNCH = "distributed"


def load_classifier(path: Path, num_labels: int, label_names: list[str]):
    """AutoModelForSequenceClassification from a local folder (SDPA attention: maps are recomputed by hooks)."""
    from transformers import AutoModelForSequenceClassification

    kwargs = {"num_labels": num_labels, "attn_implementation": ATTENTION}
    if label_names:
        kwargs.update(id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    return AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)


def evaluate(model, dev_ids, dev_types, dev_labels, pad_id: int, preset, batch_size: int) -> tuple[dict, np.ndarray]:
    """Dev metrics (with `score`) and the predictions they came from."""
    preds = predictions(predict(model, dev_ids, dev_types, pad_id, batch_size), preset.regression)
    return task_metrics.compute(list(preset.metrics), preds, dev_labels), preds


def train(model, config: Config, train_enc, dev_enc, preset, pad_id: int, ctx) -> tuple[dict, int, torch.nn.Module]:
    """Train with early stopping; return the best dev metrics, the steps run and (rank 0) the best model."""
    ids, types, labels = train_enc
    per_epoch = -(-len(ids) // config.batch_size)
    total = min(config.max_steps or per_epoch * config.epochs, per_epoch * config.epochs)
    world = ctx.world
    settings = config.engine_settings(total_steps=total, micro_batch_size=-(-config.batch_size // world.world_size),
                                      world=world)
    engine = build_engine(model, settings=settings, world=world)
    root = ctx.stage_dir / "checkpoints"
    state, folder = trainer.resume(config, root, engine, world)
    track = state or {"best": None, "bad": 0, "best_step": 0}
    best_weights = checkpoint.load_tensors(folder) if folder is not None else {}

    def next_batch():
        pick = trainer.example_indices(engine.global_step, len(ids), config.batch_size, ctx.seed * 7919, world)
        batch = pad_batch([ids[i] for i in pick], [types[i] for i in pick], pad_id)
        target = torch.as_tensor(labels[pick.numpy()])
        batch["labels"] = target.float() if preset.regression else target
        return batch

    def loss(batch):
        share = dist.global_shares(torch.tensor([len(batch["labels"])], device=batch["labels"].device))[0]
        value = engine.forward(**batch).loss * share
        return value, {"total": value}

    def on_eval(step: int) -> dict:
        scores, _ = evaluate(engine.module, *dev_enc, pad_id, preset, config.eval_batch_size)
        log.info(f"teacher_finetune: step {step}/{total} dev {scores}")
        if track["best"] is None or scores["score"] > track["best"]["score"]:
            track.update(best=scores, bad=0, best_step=step)
            best_weights.clear()
            best_weights.update(engine.state_dict_for_export())
        else:
            track["bad"] += 1
        return {f"dev_{k}": v for k, v in scores.items()}

    trainer.fit(engine, config, total=total, next_batch=next_batch, loss=loss, ctx=ctx, root=root,
                desc="teacher_finetune", state=lambda: dict(track), evaluate=on_eval, eval_every=config.eval_every,
                eval_final=True, stop=lambda _: track["bad"] >= config.patience,
                tensors=lambda: best_weights)
    best = engine.exported(lambda: type(model)(model.config))
    if best is not None and best_weights:
        best.load_state_dict(best_weights, strict=True)
    return track["best"], engine.global_step, best


def run(config: Config, ctx):
    """Fine-tune (or take) the teacher, evaluate it on dev, save it with its metrics."""
    from transformers import AutoTokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    where = devices.resolve(config.device, ctx.world)  # a missing GPU fails here, before any loading
    torch.manual_seed(ctx.seed)
    source = resolve_asset(config.teacher_path)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    # The task stage's held-out test split (data.test, or the seed's carve of train) is kept out of training here.
    splits = load_splits(with_source(config.data, ctx), ctx.seed)
    train_ex, dev_ex = splits.train, splits.dev
    log.info(f"teacher_finetune: {describe(splits.test_split)}, none of it trained on")
    preset = config.data.preset
    num_labels = 1 if preset.regression else len(train_ex.label_names)
    model = load_classifier(source, num_labels, train_ex.label_names)
    if config.num_layers is not None:
        try:
            truncate_encoder(model, config.num_layers)
        except ValueError as err:
            raise ConfigError(f"num_layers: {err} ({config.teacher_path})") from None
    if config.finetuned and getattr(model.config, "num_labels", None) != num_labels:
        raise ConfigError(f"{config.teacher_path}: finetuned: true but its classifier has {model.config.num_labels} "
                          f"labels and the task {num_labels}")
    dev_enc = (*encode(tokenizer, dev_ex.texts, config.data.max_length), dev_ex.labels)
    steps = 0
    if not config.finetuned:
        train_enc = (*encode(tokenizer, train_ex.texts, config.data.max_length), train_ex.labels)
        _, steps, model = train(model, config, train_enc, dev_enc, preset, tokenizer.pad_token_id, ctx)
    if ctx.world.rank != 0:
        dist.barrier()  # rank 0 evaluates and writes; this rank's manifest is never written
        return ctx.manifest(config, models.model_outputs(ctx.stage_dir), {}, {})
    scores, preds = evaluate(model.to(where), *dev_enc, tokenizer.pad_token_id, preset, config.eval_batch_size)
    log.info(f"teacher_finetune: dev {scores} after {steps} steps")
    metrics = {**{f"dev_{k}": v for k, v in scores.items()}, "steps": steps, "train_examples": len(train_ex)}
    outputs = models.save_model(model, tokenizer, ctx.stage_dir, labels=None if preset.regression else train_ex.label_names,
                                examples=[t[0] for t in dev_ex.texts[:3]], card=models.card(ctx, metrics))
    dist.barrier()
    extra = {"model_dir": models.MODEL_DIR, "task": config.data.task, "label_names": train_ex.label_names,
             "num_labels": num_labels, "regression": preset.regression, "finetuned_here": not config.finetuned,
             "test_split": {k: v for k, v in splits.test_split.items() if k != "used"}}
    if not preset.regression:
        extra["confusion_matrix"] = task_metrics.confusion_matrix(preds, dev_ex.labels, range(num_labels)).tolist()
    return ctx.manifest(config, outputs, metrics, extra)
