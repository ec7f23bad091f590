"""Stage `general`: general distillation of a BERT student on masked LM (TinyBERT stage 1, DistilBERT).

Targets come from the teacher cache (logit losses: soft cross-entropy on top-k with the tail mass, or on
sampled ids) and/or from an online teacher (every loss). Intermediate-layer targets are not cached: one
sequence of 128 tokens from a hidden-768, 12-layer teacher holds 13 x 128 x 768 x 2 B = 2.5 MB of fp16
hidden states plus 12 x 12 x 128 x 128 x 2 B = 4.7 MB of attention scores, about 57 KB per token against
~0.2 KB per token for a top-32 logit cache: a 1B-token corpus would need 57 TB. So hidden, attention,
cosine and MiniLM losses run the teacher online, loaded on every rank in eval mode with no grad (see
pipeline/train/engine.py for the memory trade-off).

Training is the one loop of `pipeline.train.trainer` over `pipeline.train.engine` (torch or DeepSpeed ZeRO
0-3) on the resolved device; checkpoints go through `pipeline.train.checkpoint` (`resume: auto` continues
from the newest complete `checkpoints/step-N/`).
"""

from __future__ import annotations

import torch

from formats import models
from kd import objectives, teachers
from pipeline.train import trainer
from pipeline.train.engine import build_engine, deepspeed_json
from stages.general import data
from stages.general import model as gm
from stages.general import team as general_team
from stages.general.config import Config

LAUNCH = "distributed"


def run(config: Config, ctx):
    """Build student and targets, check everything that can be wrong, train, evaluate, export the student."""
    world = ctx.world
    settings = config.settings_for(world)  # the device is resolved here: a missing GPU fails before any loading
    if settings.backend == "deepspeed":
        deepspeed_json(settings, world.world_size)  # a conflicting DeepSpeed JSON fails before any loading
    setup = data.prepare(config, ctx)  # tokenizer, teacher, cache provenance, masks: all checked here
    torch.manual_seed(ctx.seed)  # the student's random parts are the same on every rank
    scored = (data.importance_batches(config, setup, settings.micro_batch_size)
              if config.student.keep_by == "importance" else None)  # the text a cut by importance scores on
    trainee = gm.Trainee.build(config, setup.teacher, scored)  # from the fp32 CPU teacher, then the teacher moves
    setup.teacher = teachers.place(setup.teacher, settings.device, config.teacher_dtype)
    if setup.members:  # the team's sampler, now that the student's capacity is known
        setup.team = general_team.build(config, ctx, setup, trainee.student, settings, valid=lambda: data.TrainStream(
            config, ctx, setup, settings.micro_batch_size, "valid", shuffle=False))
    losses = gm.LossPlan.check(config, trainee, setup.teacher, online=setup.online)
    torch.manual_seed(ctx.seed * 1000 + world.rank)  # dropout streams differ per rank, fixed per rank
    engine = build_engine(trainee, settings=settings, world=world,
                          params=trainee.trained_parameters(objectives.enabled(config.loss)))
    stream = data.TrainStream(config, ctx, setup, settings.micro_batch_size)
    root = ctx.stage_dir / "checkpoints"
    if world.rank == 0:  # what `distill export` needs to turn any step-N/ into a model folder
        models.save_template(root, trainee.student, setup.tokenizer)
    state, _ = trainer.resume(config, root, engine, world)
    if state is not None:
        stream.load_state_dict(state["reader"])
        if setup.team is not None:
            setup.team.load_state_dict(state.get("team"), world.rank)
    history = trainer.fit(
        engine, config, total=config.max_steps, next_batch=stream.next_batch,
        loss=lambda batch: losses(engine, batch, setup), ctx=ctx, root=root, desc="general",
        state=lambda: {"reader": stream.state_dict(), "step": engine.global_step,
                       **({"team": setup.team.state_dict()} if setup.team is not None else {})},
        evaluate=lambda step: data.evaluate(config, ctx, engine, setup, stream.micro),
        eval_every=config.eval_every)
    final = data.evaluate(config, ctx, engine, setup, settings.micro_batch_size)
    counts = setup.team.counts(config.max_steps) if setup.team is not None else {}
    return gm.export(config, ctx, engine, setup, {**history, **final, **counts}, losses.layer_map)
