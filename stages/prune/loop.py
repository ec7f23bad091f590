"""The `prune` stage's rounds: prune, rewind, retrain with the masks held, evaluate; checkpoints and exact resume.

Each round builds a fresh engine (fresh AdamW, the schedule from step 0) on the current weights, as lottery
tickets retrain. Gradients of pruned weights are zeroed as they are computed and, after every optimizer
step (the trainer's `after_step`), the masks are applied again, so a pruned weight is exactly 0 whenever
anything (evaluation, a checkpoint, the export) looks at it. A checkpoint `checkpoints/step-N/` holds the
engine, the round's masks, the rewind weights once taken, the round history and the kept heads/neurons;
batches are a pure function of (seed, round, epoch, step), so a resumed run ends with the same weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from formats.taskdata import pad_batch
from kd import losses, pruning
from pipeline import log
from pipeline.config import ConfigError
from pipeline.manifest import ManifestError
from pipeline.train import checkpoint, dist, trainer
from pipeline.train.engine import build_engine
from stages.prune.config import Config

CKPT = "checkpoints"


def _saved(found: Path | None) -> tuple[dict | None, dict]:
    """(trainer state, kept tensors) of checkpoint `found`, read before an engine exists to load it into."""
    if found is None:
        return None, {}
    path = found / "state-rank0.json"
    try:
        state = json.loads(path.read_text())["state"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise ManifestError(f"{path}: unreadable checkpoint state ({err}); delete {found} to resume from an earlier one") from None
    return state, checkpoint.load_tensors(found)


def _part(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def task_loss(config: Config, logits, labels, teacher_logits, regression: bool) -> torch.Tensor:
    """(1 - distill_alpha) hard loss + distill_alpha soft CE at T against the unpruned model's logits."""
    hard = losses.hard_loss(logits, labels, regression=regression)
    if teacher_logits is None or not config.distill_alpha:
        return hard
    soft = (torch.nn.functional.mse_loss(logits.float(), teacher_logits.float()) if regression
            else losses.task_soft_ce(logits, teacher_logits, config.temperature))
    return (1 - config.distill_alpha) * hard + config.distill_alpha * soft


def _structured(config: Config, model, masks, units, target: float, batch_at, regression: bool):
    """Masks keeping, per layer, the (1 - target) most important of its heads and FFN neurons still alive."""
    from kd.importance import head_neuron_importance, head_size

    batches = [batch_at(i) for i in range(config.importance_batches)]
    heads, neurons = head_neuron_importance(
        model, batches, lambda out, batch: losses.hard_loss(out.logits, batch["labels"], regression=regression))
    alive_heads = units["heads"] if units else [list(range(heads.shape[1]))] * heads.shape[0]
    alive_neurons = units["neurons"] if units else [list(range(neurons.shape[1]))] * neurons.shape[0]
    keep_h = max(1, round((1 - target) * heads.shape[1]))
    keep_n = max(1, round((1 - target) * neurons.shape[1]))
    kept = {"heads": [pruning.keep_most_important(heads[i], keep_h, alive_heads[i]) for i in range(len(heads))],
            "neurons": [pruning.keep_most_important(neurons[i], keep_n, alive_neurons[i]) for i in range(len(neurons))]}
    weights = pruning.prunable(model)
    return pruning.structured_masks(weights, kept["heads"], kept["neurons"], head_size(model)), kept


def train(config: Config, ctx, model, teacher, data, pad_id: int, evaluate, *, regression: bool):
    """Prune and retrain round by round; return (the pruned model: a CPU fp32 copy on rank 0, None elsewhere;
    its masks; the per-round history; the kept heads/neurons (structured) or None; counts)."""
    ids, types, labels = data
    world, n = ctx.world, len(ids)
    per_round = max(1, int(config.epochs * math.ceil(n / config.batch_size)))
    per_round = min(per_round, config.max_steps) if config.max_steps else per_round
    if config.rewind_step is not None and config.rewind_step > per_round:
        raise ConfigError(f"rewind_step {config.rewind_step}: a round has only {per_round} steps (epochs, "
                          f"max_steps); set rewind_step <= {per_round}")
    targets = pruning.round_sparsities(config.sparsity, config.mode, config.rate)
    root = ctx.stage_dir / CKPT
    found = checkpoint.latest(root) if config.resume == "auto" else None
    state, kept_tensors = _saved(found)
    if found is not None:
        log.info(f"prune: resuming from {found.name} (round {state['round'] + 1} of {len(targets)})")
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rewind = initial if config.rewind_step == 0 else _part(kept_tensors, "rewind.")
    history = state["history"] if state else []
    units = state["units"] if state else None
    masks, engine = _part(kept_tensors, "mask."), None
    counts = {"rounds": len(targets), "steps_per_round": per_round, "resumed_from_step": state["global_step"] if state else 0}

    def batch_at(step: int, seed: int):
        pick = trainer.example_indices(step, n, config.batch_size, seed, world)
        batch = pad_batch([ids[i] for i in pick], [types[i] for i in pick], pad_id)
        target = torch.as_tensor(labels[pick.numpy()])
        batch["labels"] = target.float() if regression else target
        return batch

    for index, target in enumerate(targets):
        if state is not None and state["round"] > index:
            continue
        if engine is not None:  # a fresh module per round, holding the last round's trained weights
            model = _fresh(engine)
        seed = ctx.seed * 7919 + index * 101
        fresh_round = state is None or state["round"] != index
        if fresh_round:
            masks, units = _prune(config, model, masks, units, target, lambda i: batch_at(i, seed + 13), regression)
        start_round(model, masks, rewind if fresh_round and config.rewind_step is not None else None)
        settings = config.engine_settings(total_steps=per_round, world=world,
                                          micro_batch_size=-(-config.batch_size // world.world_size))
        engine = build_engine(model, settings=settings, world=world)
        params = pruning.prunable(engine.module)
        hooks = pruning.mask_gradients(params, masks)
        if state is not None and state["round"] == index:
            checkpoint.load(found, engine, world)
        if teacher is not None:
            teacher.to(settings.device)
        engine.module.train()
        offset, sparsity = index * per_round, pruning.sparsity_of(masks)

        def after_step(step: int) -> None:
            pruning.apply_masks(params, masks)
            if config.rewind_step and index == 0 and step == config.rewind_step:
                rewind.update(engine.state_dict_for_export())  # late rewinding: this step's (masked) weights

        def loss(batch):
            batch = dict(batch)
            target_labels = batch.pop("labels")
            share = dist.global_shares(torch.tensor([len(target_labels)], device=target_labels.device))[0]
            t_logits = None
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(**batch).logits
            value = task_loss(config, engine.forward(**batch).logits, target_labels, t_logits, regression) * share
            return value, {"total": value}

        def on_eval(step: int) -> dict:
            scores = evaluate(engine.module, final=step == per_round)
            log.info(f"prune: round {index + 1}/{len(targets)} sparsity {sparsity:.3f} step {step}/{per_round} {scores}")
            if step == per_round:
                history.append({"round": index + 1, "sparsity": sparsity, "target": target,
                                "layers": list(pruning.layer_sparsity(masks).values()), **scores})
            return {f"{split}_{k}": v for split in ("dev", "test") if split in scores for k, v in scores[split].items()}

        trainer.fit(engine, config, total=per_round, next_batch=lambda: batch_at(engine.global_step, seed), loss=loss,
                    ctx=ctx, root=root, desc=f"prune round {index + 1}", step_offset=offset, save_final=True,
                    evaluate=on_eval, eval_every=config.eval_every, eval_final=True, after_step=after_step,
                    state=lambda: {"round": index, "history": list(history), "units": units,
                                   "global_step": offset + engine.global_step},
                    tensors=lambda: {**{f"mask.{k}": v for k, v in masks.items()},
                                     **({f"rewind.{k}": v for k, v in rewind.items()} if config.rewind_step else {})})
        for handle in hooks:
            handle.remove()
        state = None
    pruned = engine.exported(lambda: type(model)(model.config))
    return pruned, masks, history, units, counts


def start_round(model, masks: dict, rewind: dict | None) -> None:
    """A round's starting weights: the rewind point (when given and taken), with this round's masks applied."""
    if rewind:
        model.load_state_dict(rewind, strict=True)
    pruning.apply_masks(pruning.prunable(model), masks)


def _fresh(engine):
    """A new CPU module holding the engine's current weights, on every rank (the next round's engine wraps it)."""
    state, module = engine.state_dict_for_export(), engine.module
    with torch.random.fork_rng(devices=[]):  # building it must not move the training RNG
        fresh = type(module)(module.config)
    fresh.load_state_dict(state, strict=True)
    return fresh.train()


def _prune(config: Config, model, masks, units, target: float, batch_at, regression: bool):
    """This round's masks (and kept units) from the current weights."""
    if config.method == "structured":
        return _structured(config, model, masks, units, target, batch_at, regression)
    return pruning.magnitude_masks(pruning.prunable(model), target, scope=config.scope, masks=masks or None), None
