"""Stage `teacher_adapt`: give a teacher without an MLM head (a sentence encoder) one, so it can be cached from.

Loads the encoder as `AutoModelForMaskedLM` (the head is newly initialised) and fits, on the shard stage's
train split with masks from kd/masking.py, either the head alone (default: the frozen encoder runs once per
batch without gradients, which is cheap on a CPU) or the whole model (continued MLM). Reports MLM accuracy
on the valid split before and after, and saves the model with the corpus tokenizer in `model/`.

Training is the one loop of `pipeline.train.trainer` (any device, torch or DeepSpeed, several ranks each
reading its own share of the corpus) with checkpoints in `checkpoints/step-N/` and exact resume.
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
from pipeline.train import dist, trainer
from pipeline.train.engine import build_engine
from stages.teacher_adapt.config import Config

LAUNCH = "distributed"


def _batch(masked: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Padded CPU model inputs and the (rows, cols, labels) of every masked position."""
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
    return {k: torch.from_numpy(v) for k, v in (("input_ids", ids), ("token_type_ids", types),
                                                  ("attention_mask", attention), ("rows", rows), ("cols", cols),
                                                  ("labels", labels))}


class MaskedLM(torch.nn.Module):
    """The model as the engine trains it: logits at the masked positions; in head mode the encoder runs
    without building a graph."""

    def __init__(self, model, mode: str):
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, input_ids, token_type_ids, attention_mask, rows, cols):
        inputs = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
        if self.mode == "full":
            return teachers.masked_lm_logits(self.model, inputs, rows, cols)[0]
        with torch.no_grad():
            hidden = self.model.base_model(**inputs).last_hidden_state[rows, cols]
        return self.model.cls(hidden)


@torch.no_grad()
def mlm_accuracy(engine, masked: list, pad_id: int, batch_size: int = 64) -> float:
    """Share of masked positions where the model's top-1 prediction is the original token (every rank runs
    the same batches, so ZeRO-3 can gather)."""
    engine.module.eval()
    hits = total = 0
    for start in log.progress(range(0, len(masked), batch_size), desc="teacher_adapt eval", unit="batch"):
        batch = engine.to_device(_batch(masked[start:start + batch_size], pad_id))
        labels = batch.pop("labels")
        hits += int((engine.forward(**batch).argmax(-1) == labels).sum())
        total += int(labels.numel())
    engine.module.train()
    return hits / max(total, 1)


def _trainable(model, mode: str) -> list[tuple[str, torch.nn.Parameter]]:
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
    return [(f"model.{n}", p) for n, p in model.named_parameters() if p.requires_grad]


def run(config: Config, ctx) -> Manifest:
    """Adapt the teacher, save it to `model/`, record MLM accuracy before and after."""
    from formats import corpus

    world = ctx.world
    if config.batch_size % world.world_size:
        raise ConfigError(f"batch_size {config.batch_size} does not split over {world.world_size} ranks")
    settings = config.engine_settings(total_steps=config.steps, micro_batch_size=config.batch_size // world.world_size,
                                      world=world)  # the device is resolved here, before any loading
    torch.manual_seed(config.seed)
    corpus_dir, extra = ctx.input_dir("corpus"), ctx.input_manifest("corpus").extra
    tokenizer = corpus.load_tokenizer(corpus_dir)
    pad_id = int(extra["pad_id"])
    source = models.upstream_model(ctx, config.teacher, config.teacher_path)
    model = teachers.load_masked_lm(source, frozen=False)
    teachers.check_tokenizer(source, tokenizer, model)

    spec = dict(rate=config.mask_rate, whole_word=config.whole_word)
    train_mask = Masker(mask_spec_from_corpus(extra, tokenizer, mask_seed=config.mask_seed, **spec), tokenizer)
    eval_mask = Masker(mask_spec_from_corpus(extra, tokenizer, mask_seed=config.mask_seed + 1, **spec), tokenizer)
    eval_set = [eval_mask(s) for s in itertools.islice(
        corpus.CorpusReader(corpus_dir, "valid", seed=config.seed, shuffle=False), config.eval_samples)]
    params = _trainable(model, config.mode)
    trainee = MaskedLM(model, config.mode)
    engine = build_engine(trainee, settings=settings, world=world, params=params)
    before = mlm_accuracy(engine, eval_set, pad_id)  # the source weights: a resumed run measures them too
    log.info(f"teacher_adapt: MLM accuracy before {before:.4f} on {len(eval_set)} valid sequences")

    reader = corpus.CorpusReader(corpus_dir, "train", seed=config.seed, shuffle=True, loop=True, rank=world.rank,
                                 world_size=world.world_size)
    root = ctx.stage_dir / "checkpoints"
    state, _ = trainer.resume(config, root, engine, world)
    if state is not None:
        reader.load_state_dict(state["reader"])
    stream = iter(reader)

    def next_batch():
        return _batch([train_mask(next(stream)) for _ in range(settings.micro_batch_size)], pad_id)

    def loss(batch):
        labels = batch.pop("labels")
        share = dist.global_shares(torch.tensor([labels.numel()], device=labels.device))[0]
        value = torch.nn.functional.cross_entropy(engine.forward(**batch).float(), labels) * share
        return value, {"total": value}

    started = time.monotonic()
    history = trainer.fit(engine, config, total=config.steps, next_batch=next_batch, loss=loss, ctx=ctx, root=root,
                          desc="teacher_adapt", state=lambda: {"reader": reader.state_dict()})
    after = mlm_accuracy(engine, eval_set, pad_id)
    log.info(f"teacher_adapt: MLM accuracy after {after:.4f} (before {before:.4f})")

    metrics = {"mlm_accuracy_before": before, "mlm_accuracy_after": after,
               "final_loss": history.get("train/total", float("nan")),
               "train_seconds": time.monotonic() - started, "eval_sequences": len(eval_set)}
    adapted = engine.exported(lambda: type(model)(model.config), prefix="model.")  # every rank (ZeRO-3 gathers)
    if world.rank == 0:
        models.save_model(adapted, tokenizer, ctx.stage_dir, task="fill-mask", card=models.card(ctx, metrics))
    dist.barrier()
    extra_out = {"model_dir": models.MODEL_DIR, "source": str(config.teacher or config.teacher_path), "mode": config.mode,
                 "source_weights_sha256": models.weights_sha256(source)}
    return ctx.manifest(config, models.model_outputs(ctx.stage_dir), metrics, extra_out)
