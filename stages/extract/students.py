"""Students trained on a victim's answers (and the independent one, on real labels) through the one trainer,
their evaluation, and the victim's [CLS] representations the query detector reads.

Each student has its own checkpoints (`ckpt/<name>/step-N/`) and, once trained and evaluated, its result
(`students/<name>.json`), so a rerun resumes the student it was training and skips the finished ones.
Batches are a pure function of (seed, student, step), so a resumed student ends as an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from formats.taskdata import encode, pad_batch, predict
from kd.extraction import soft_cross_entropy
from kd.teachers import ATTENTION
from pipeline.manifest import atomic_write_text
from pipeline.train import dist, trainer
from pipeline.train.engine import build_engine
from stages.extract.config import Config

CKPT = "ckpt"
RESULTS = "students"


def load_init(folder: Path, label_names: list[str]):
    """A sequence classifier from a pretrained encoder folder (a fresh classifier head over its encoder)."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        str(folder), num_labels=len(label_names), id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)}, attn_implementation=ATTENTION)


def train(config: Config, ctx, name: str, init: Path, tokenizer, texts, targets: torch.Tensor,
          label_names: list[str], *, seed: int, step_offset: int):
    """Train a student from `init` on `targets` (one distribution per text); return it (CPU, fp32)."""
    model = load_init(init, label_names)
    ids, types = encode(tokenizer, texts, config.data.max_length)
    per_epoch = -(-len(ids) // config.batch_size)
    total = max(1, int(config.epochs * per_epoch))
    total = min(total, config.max_steps) if config.max_steps else total
    world = ctx.world
    settings = config.engine_settings(total_steps=total, micro_batch_size=-(-config.batch_size // world.world_size),
                                      world=world)
    engine = build_engine(model, settings=settings, world=world)
    root = ctx.stage_dir / CKPT / name
    trainer.resume(config, root, engine, world)

    def next_batch():
        pick = trainer.example_indices(engine.global_step, len(ids), config.batch_size, seed, world)
        batch = pad_batch([ids[i] for i in pick], [types[i] for i in pick], tokenizer.pad_token_id)
        batch["targets"] = targets[pick]
        return batch

    def loss(batch):
        batch = dict(batch)
        wanted = batch.pop("targets")
        share = dist.global_shares(torch.tensor([len(wanted)], device=wanted.device))[0]
        value = soft_cross_entropy(engine.forward(**batch).logits, wanted) * share
        return value, {"total": value}

    trainer.fit(engine, config, total=total, next_batch=next_batch, loss=loss, ctx=ctx, root=root,
                desc=f"extract {name}", step_offset=step_offset, save_final=True, loss_metric=f"{name}_loss")
    return engine.exported(lambda: type(model)(model.config)), total


def labels_of(model, tokenizer, texts, config: Config, device) -> np.ndarray:
    """The model's label index per text."""
    ids, types = encode(tokenizer, texts, config.data.max_length)
    return predict(model.to(device), ids, types, tokenizer.pad_token_id, config.eval_batch_size).argmax(axis=1)


def result_path(ctx, name: str) -> Path:
    """Where a finished student's result is kept."""
    return ctx.stage_dir / RESULTS / f"{name}.json"


def finished(ctx, name: str) -> dict | None:
    """A student's result when it was trained and evaluated already."""
    path = result_path(ctx, name)
    return json.loads(path.read_text()) if path.is_file() else None


def save_result(ctx, name: str, result: dict) -> None:
    """Record a student's result (written last, atomically: a result means the student is done)."""
    atomic_write_text(result_path(ctx, name), json.dumps(result, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def cls_features(model, tokenizer, texts, config: Config, device) -> torch.Tensor:
    """The victim's last-layer [CLS] vector per text: what the deployment itself sees of a query."""
    ids, types = encode(tokenizer, texts, config.data.max_length)
    model = model.to(device).eval()
    out = []
    for start in range(0, len(ids), config.eval_batch_size):
        batch = pad_batch(ids[start:start + config.eval_batch_size], types[start:start + config.eval_batch_size],
                          tokenizer.pad_token_id)
        hidden = model(**{k: v.to(device) for k, v in batch.items()}, output_hidden_states=True).hidden_states[-1]
        out.append(hidden[:, 0].float().cpu())
    return torch.cat(out)
