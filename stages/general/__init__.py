"""Stage `general`: general distillation of a BERT student on masked LM (TinyBERT stage 1, DistilBERT).

Targets come from the teacher cache (logit losses: soft cross-entropy on top-k with the tail mass, or on
sampled ids) and/or from an online teacher (every loss). Intermediate-layer targets are not cached: one
sequence of 128 tokens from a hidden-768, 12-layer teacher holds 13 x 128 x 768 x 2 B = 2.5 MB of fp16
hidden states plus 12 x 12 x 128 x 128 x 2 B = 4.7 MB of attention scores, about 57 KB per token against
~0.2 KB per token for a top-32 logit cache: a 1B-token corpus would need 57 TB. So hidden, attention,
cosine and MiniLM losses run the teacher online, loaded on every rank in eval mode with no grad (see
pipeline/train/engine.py for the memory trade-off).

Training goes through `pipeline.train.engine` (torch or DeepSpeed ZeRO 0-3) and checkpoints through
`pipeline.train.checkpoint` (`resume: auto` continues from the newest complete `checkpoints/step-N/`).
"""

from __future__ import annotations

import os
import signal
import time

import torch

from formats import models
from pipeline import log
from pipeline.train import checkpoint, dist, preempt
from pipeline.train.engine import build_engine, deepspeed_json
from stages.general import data
from stages.general import model as gm

LAUNCH = "distributed"


from stages.general.config import Config


def _maybe_die(config: Config, step: int) -> None:
    if config.die_after_steps is not None and step >= config.die_after_steps:
        os.kill(os.getpid(), signal.SIGKILL)


def _stop_requested(config: Config, step: int) -> bool:
    """Every rank agrees: a signal on any rank (or the test hook) stops all at this step."""
    if config.preempt_at_step is not None and step == config.preempt_at_step:
        preempt.request()
    return bool(dist.all_reduce_sum(torch.tensor([float(preempt.requested())])).item() > 0)


def run(config: Config, ctx):
    """Build student and targets, check everything that can be wrong, train, evaluate, export the student."""
    world = ctx.world
    settings = config.engine_settings(world.world_size)
    if settings.backend == "deepspeed":
        deepspeed_json(settings, world.world_size)  # a conflicting DeepSpeed JSON fails before any loading
    setup = data.prepare(config, ctx)  # tokenizer, teacher, cache provenance, masks: all checked here
    torch.manual_seed(ctx.seed)  # the student's random parts are the same on every rank
    trainee = gm.Trainee.build(config, setup.teacher)
    losses = gm.LossPlan.check(config, trainee, setup.teacher, online=setup.online)
    torch.manual_seed(ctx.seed * 1000 + world.rank)  # dropout streams differ per rank, fixed per rank
    engine = build_engine(trainee, settings=settings, world=world)
    stream = data.TrainStream(config, ctx, setup, settings.micro_batch_size)
    ckpt_root = ctx.stage_dir / "checkpoints"
    if world.rank == 0:  # what `distill export` needs to turn any step-N/ into a model folder
        models.save_template(ckpt_root, trainee.student, setup.tokenizer)
    last = checkpoint.latest(ckpt_root) if config.resume == "auto" else None
    if last is not None:
        stream.load_state_dict(checkpoint.load(last, engine, world)["reader"])
    preempt.install()
    try:
        history = _train(config, ctx, engine, stream, setup, losses, ckpt_root)
    finally:
        preempt.uninstall()  # restore the handlers and clear the flag for whatever runs next in this process
    final = data.evaluate(config, ctx, engine, setup, settings.micro_batch_size)
    return gm.export(config, ctx, engine, setup, {**history, **final}, losses.layer_map)


def _train(config: Config, ctx, engine, stream, setup, losses, ckpt_root) -> dict:
    world, tokens, started, last_loss = ctx.world, 0, time.perf_counter(), {}
    while engine.global_step < config.max_steps:
        batch = stream.next_batch()
        total, parts = losses(engine, batch, setup)
        engine.backward(total)
        if not engine.step():
            continue
        step = engine.global_step
        tokens += int(batch["attention_mask"].sum()) * config.grad_accum * world.world_size
        last_loss = {f"train/{k}": v for k, v in parts.items()}
        if step % config.log_every == 0 or step == config.max_steps:
            rate = tokens / max(time.perf_counter() - started, 1e-9)
            log.info(f"step {step}/{config.max_steps} loss {parts['total']:.4f} lr {engine.lr:.2e} {rate:,.0f} tok/s")
            ctx.tracker.log_metrics({**last_loss, "train/lr": engine.lr, "train/tokens_per_s": rate}, step)
        evals = {}
        if config.eval_every and step % config.eval_every == 0 and step < config.max_steps:
            evals = data.evaluate(config, ctx, engine, setup, stream.micro)
            ctx.tracker.log_metrics(evals, step)
        stop = _stop_requested(config, step)
        if stop or (config.checkpoint_every and step % config.checkpoint_every == 0):
            # The eval metrics of this step go with its checkpoint, so an exported one can pass promotion gates.
            checkpoint.save(ckpt_root, step, engine, {"reader": stream.state_dict(), "step": step}, world,
                            keep_last=config.keep_last, meta={"metrics": {k.replace("/", "_"): v for k, v in evals.items()}})
        if stop:
            raise preempt.Preempted(f"stopped at step {step} of {config.max_steps}")
        _maybe_die(config, step)
    elapsed = time.perf_counter() - started
    return {**last_loss, "train/steps": engine.global_step, "train/tokens_per_s": tokens / max(elapsed, 1e-9)}
