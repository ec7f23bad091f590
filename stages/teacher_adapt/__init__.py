"""Stage `teacher_adapt`: give a teacher without an MLM head (a sentence encoder) one, so it can be cached from.

Loads the encoder as `AutoModelForMaskedLM` (the head is newly initialised) and fits, on the shard stage's
train split with masks from kd/masking.py, either the head alone (default: the frozen encoder runs once per
batch without gradients, which is cheap on a CPU) or the whole model (continued MLM). Reports MLM accuracy
on the valid split before and after, and saves the model with the corpus tokenizer in `model/`.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import torch

from formats import models
from kd import teachers
from kd.masking import Masker, mask_spec_from_corpus
from pipeline import log
from pipeline.config import ConfigError
from pipeline.manifest import Manifest

LAUNCH = "single"


from stages.teacher_adapt.config import Config


def _batch(masked: list, pad_id: int, device) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded model inputs and the (row, col, label) of every masked position."""
    longest = max(m.input_ids.size for m in masked)
    ids = np.full((len(masked), longest), pad_id, np.int64)
    types = np.zeros_like(ids)
    attention = np.zeros_like(ids)
    for r, m in enumerate(masked):
        ids[r, :m.input_ids.size], attention[r, :m.input_ids.size] = m.input_ids, 1
        if m.token_type_ids is not None:
            types[r, :m.input_ids.size] = m.token_type_ids
    rows = np.concatenate([np.full(m.positions.size, r) for r, m in enumerate(masked)])
    cols = np.concatenate([m.positions for m in masked])
    labels = np.concatenate([m.labels for m in masked])
    inputs = {k: torch.from_numpy(v).to(device) for k, v in
              (("input_ids", ids), ("token_type_ids", types), ("attention_mask", attention))}
    return inputs, *(torch.from_numpy(a).to(device) for a in (rows, cols, labels))


def _head_logits(model, inputs, rows, cols, mode: str) -> torch.Tensor:
    """Logits at the masked positions; in head mode the encoder runs without building a graph."""
    if mode == "full":
        return teachers.masked_lm_logits(model, inputs, rows, cols)[0]
    with torch.no_grad():
        hidden = model.base_model(**inputs).last_hidden_state[rows, cols]
    return model.cls(hidden)


@torch.no_grad()
def mlm_accuracy(model, masked: list, pad_id: int, device, batch_size: int = 64) -> float:
    """Share of masked positions where the model's top-1 prediction is the original token."""
    model.eval()
    hits = total = 0
    for start in range(0, len(masked), batch_size):
        inputs, rows, cols, labels = _batch(masked[start:start + batch_size], pad_id, device)
        logits = teachers.masked_lm_logits(model, inputs, rows, cols)[0]
        hits += int((logits.argmax(-1) == labels).sum())
        total += int(labels.numel())
    return hits / max(total, 1)


def _trainable(model, mode: str) -> list[torch.nn.Parameter]:
    if mode == "full":
        model.requires_grad_(True)
    else:
        if getattr(model, "cls", None) is None or getattr(model, "base_model", None) is None:
            raise ConfigError(f"{type(model).__name__}: head-only adaptation needs a BERT-style "
                                       "model with a `cls` head; use mode: full")
        model.requires_grad_(False)
        model.cls.requires_grad_(True)
        # The decoder is usually tied to the word embeddings: those stay frozen with the encoder.
        model.get_input_embeddings().weight.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def _schedule(step: int, total: int) -> float:
    warmup = max(1, total // 10)
    return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def run(config: Config, ctx) -> Manifest:
    """Adapt the teacher, save it to `model/`, record MLM accuracy before and after."""
    from formats import corpus

    torch.manual_seed(config.seed)
    corpus_dir, extra = ctx.input_dir("corpus"), ctx.input_manifest("corpus").extra
    tokenizer = corpus.load_tokenizer(corpus_dir)
    pad_id = int(extra["pad_id"])
    source = models.upstream_model(ctx, config.teacher, config.teacher_path)
    device = teachers.pick_device(config.device)
    model = teachers.load_masked_lm(source, device=device, frozen=False)
    teachers.check_tokenizer(source, tokenizer, model)

    spec = dict(rate=config.mask_rate, whole_word=config.whole_word)
    train_mask = Masker(mask_spec_from_corpus(extra, tokenizer, mask_seed=config.mask_seed, **spec), tokenizer)
    eval_mask = Masker(mask_spec_from_corpus(extra, tokenizer, mask_seed=config.mask_seed + 1, **spec), tokenizer)
    eval_set = [eval_mask(s) for s in itertools.islice(
        corpus.CorpusReader(corpus_dir, "valid", seed=config.seed, shuffle=False), config.eval_samples)]
    before = mlm_accuracy(model, eval_set, pad_id, device)
    log.info(f"teacher_adapt: MLM accuracy before {before:.4f} on {len(eval_set)} valid sequences")

    params = _trainable(model, config.mode)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, config.steps))
    reader = iter(corpus.CorpusReader(corpus_dir, "train", seed=config.seed, shuffle=True, loop=True))
    model.train()
    started, loss_value = time.monotonic(), float("nan")
    for step in range(config.steps):
        masked = [train_mask(next(reader)) for _ in range(config.batch_size)]
        inputs, rows, cols, labels = _batch(masked, pad_id, device)
        loss = torch.nn.functional.cross_entropy(_head_logits(model, inputs, rows, cols, config.mode).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = float(loss.detach())
        ctx.tracker.log_metrics({"teacher_adapt/loss": loss_value}, step)
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            log.info(f"teacher_adapt: step {step + 1}/{config.steps} loss {loss_value:.4f}")
    after = mlm_accuracy(model, eval_set, pad_id, device)
    log.info(f"teacher_adapt: MLM accuracy after {after:.4f} (before {before:.4f})")

    metrics = {"mlm_accuracy_before": before, "mlm_accuracy_after": after, "final_loss": loss_value,
               "train_seconds": time.monotonic() - started, "eval_sequences": len(eval_set)}
    outputs = models.save_model(model, tokenizer, ctx.stage_dir, task="fill-mask", card=models.card(ctx, metrics))
    extra_out = {"model_dir": models.MODEL_DIR, "source": str(config.teacher or config.teacher_path), "mode": config.mode,
                 "source_weights_sha256": models.weights_sha256(source)}
    return ctx.manifest(config, outputs, metrics, extra_out)


