"""The `dynabert` stage's training: importance and rewiring, then the width phase and the depth phase.

Both phases are the one loop of `pipeline.train.trainer` (torch or DeepSpeed ZeRO 0-2, any device, ranks each
taking a slice of every global batch), one engine per phase, checkpoints in `ckpt/step-N/` (global step
numbering across phases). Each step runs every sub-network of the phase's grid on the same batch and sums
their losses before one backward. The width phase learns from the fine-tuned teacher; at its end the model
is saved as `width_adaptive/` (DynaBERT_W), the frozen teacher of the depth phase, so a run resumed inside
the depth phase uses exactly the teacher an uninterrupted one would. Batches are a pure function of (seed,
phase, epoch, step), so resuming gives the same weights as never stopping.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from formats.taskdata import pad_batch
from kd import dynabert
from kd.importance import head_neuron_importance, reorder
from kd.losses import hard_loss
from kd.teachers import place
from pipeline.manifest import ManifestError
from pipeline.train import checkpoint, dist, trainer
from pipeline.train.engine import build_engine
from stages.dynabert.config import Config

CKPT = "ckpt"
WIDTH_ADAPTIVE = "width_adaptive"
"""The width-adaptive model (end of the width phase): the depth phase's teacher, and a model folder of its own."""


class Trainee(nn.Module):
    """The adaptive student as the engine's module: its forward is the summed loss of a grid of sub-networks,
    so DDP and DeepSpeed see one forward (and every parameter used) per micro-batch."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, grid, targets, temperature: float, regression: bool, **inputs):
        return dynabert.grid_loss(self.student, grid, targets, temperature=temperature, regression=regression,
                                  **inputs)


def rewire(config: Config, student, data, pad_id: int, regression: bool, seed: int) -> dict:
    """Importance of every head and FFN neuron from the task loss on training batches, then reorder in place
    (most important first). Returns the scores (as lists) for the report."""
    ids, types, labels = data
    batches = []
    for step in range(config.importance_batches):
        pick = trainer.example_indices(step, len(ids), config.batch_size, seed, _one_rank())
        batch = pad_batch([ids[i] for i in pick], [types[i] for i in pick], pad_id)
        batch["labels"] = torch.as_tensor(labels[pick.numpy()])
        batches.append(batch)
    heads, neurons = head_neuron_importance(
        student, batches, lambda out, b: hard_loss(out.logits, b["labels"], regression=regression))
    reorder(student, heads, neurons)
    return {"heads": heads.cpu().tolist(), "neurons": neurons.cpu().tolist()}


def _one_rank():
    from pipeline.world import World

    return World(rank=0, world_size=1, local_rank=0)


def _save_width_adaptive(stage_dir: Path, model: nn.Module) -> None:
    """Write `width_adaptive/` atomically (safetensors + config): complete or absent."""
    final, tmp = stage_dir / WIDTH_ADAPTIVE, stage_dir / f".tmp-{WIDTH_ADAPTIVE}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _load_width_adaptive(stage_dir: Path, like: nn.Module) -> nn.Module:
    from safetensors.torch import load_model

    folder = stage_dir / WIDTH_ADAPTIVE
    if not (folder / "model.safetensors").is_file():
        raise ManifestError(f"{folder}: missing, but a depth-phase checkpoint exists; delete {stage_dir / CKPT} "
                            "to retrain from the start")
    with torch.random.fork_rng(devices=[]):
        model = type(like)(like.config)
    load_model(model, str(folder / "model.safetensors"))
    return model.eval()


def _fresh(engine, student: nn.Module) -> nn.Module:
    """A new CPU student holding the engine's current weights (gathered on every rank)."""
    state = {k[len("student."):]: v for k, v in engine.state_dict_for_export().items()}
    with torch.random.fork_rng(devices=[]):
        fresh = type(student)(student.config)
    fresh.load_state_dict(state, strict=True)
    return fresh


def train(config: Config, ctx, student, teacher, data, pad_id: int, *, regression: bool):
    """Run the width phase and the depth phase; return (counts, the trained student on rank 0, else None)."""
    ids, types, labels = data
    n, world = len(ids), ctx.world
    per_epoch = math.ceil(n / config.batch_size)
    root = ctx.stage_dir / CKPT
    found, state = trainer.resume_point(config, root, "dynabert")
    counts = {"steps": 0, "resumed_from_step": state["global_step"] if state else 0}
    global_step, engine = 0, None
    for index, (phase, epochs) in enumerate(config.phases()):
        total = trainer.phase_steps(epochs, per_epoch, config.max_steps)
        if state is not None and state["phase"] > index:
            global_step += total
            continue
        if engine is not None:  # a fresh module per phase: DeepSpeed wraps a module once
            student = _fresh(engine, student)
        if phase == "depth":
            teacher = _load_width_adaptive(ctx.stage_dir, student)
        widths = sorted(config.widths, reverse=True)
        depths = sorted(config.depths, reverse=True) if phase == "depth" else [1.0]
        grid = [(w, d) for w in widths for d in depths]
        settings = config.engine_settings(total_steps=total, micro_batch_size=-(-config.batch_size // world.world_size),
                                          world=world)
        place(teacher, settings.device, "auto")
        trainee = Trainee(student)
        engine = build_engine(trainee, settings=settings, world=world)
        if state is not None and state["phase"] == index:
            checkpoint.load(found, engine, world)
        trainee.train()
        start, seed = engine.global_step, ctx.seed * 7919 + index * 101

        def next_batch():
            pick = trainer.example_indices(engine.global_step, n, config.batch_size, seed, world)
            batch = pad_batch([ids[i] for i in pick], [types[i] for i in pick], pad_id)
            batch["labels"] = torch.as_tensor(labels[pick.numpy()])
            return batch

        def loss(batch, teacher=teacher, grid=grid, phase=phase):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            share = dist.global_shares(torch.tensor([len(batch["labels"])], device=batch["labels"].device))[0]
            if phase == "width":  # one fine-tuned teacher for every width
                full = dynabert.teacher_targets(teacher, 1.0, **inputs)
                targets = {w: full for w in widths}
            else:  # DynaBERT_W at the same width and full depth
                targets = {w: dynabert.teacher_targets(teacher, w, **inputs) for w in widths}
            parts = engine.forward(grid, targets, config.temperature, regression, **inputs)
            return parts["total"] * share, {k: v.detach() for k, v in parts.items()}

        offset = global_step
        trainer.fit(engine, config, total=total, next_batch=next_batch, loss=loss, ctx=ctx, root=root,
                    desc=f"dynabert {phase}", step_offset=offset, save_final=True, loss_metric=f"{phase}_loss",
                    state=lambda index=index, offset=offset: {"phase": index, "step": engine.global_step,
                                                              "global_step": offset + engine.global_step})
        counts["steps"] += engine.global_step - start
        global_step += total
        state = None
        if phase == "width":
            width_model = _fresh(engine, student)
            if world.rank == 0:
                _save_width_adaptive(ctx.stage_dir, width_model)
            dist.barrier()
    trained = engine.exported(lambda: type(student)(student.config), prefix="student.")
    return counts, trained


def frozen_copy(model: nn.Module) -> nn.Module:
    """An independent, gradient-free copy (the student starts as the teacher; the teacher must not move)."""
    twin = copy.deepcopy(model).eval()
    return twin.requires_grad_(False)
