"""The one training loop every stage that trains runs: batches to the device, loss, backward, step, then at the
right steps progress, evaluation, checkpoints, preemption. A stage supplies its batches and its loss.

    engine = build_engine(module, settings=config.engine_settings(...), world=ctx.world)
    state, _ = trainer.resume(config, root, engine, ctx.world)         # None, or what `state()` returned
    history = trainer.fit(engine, config, total=steps, next_batch=..., loss=..., ctx=ctx, root=root, desc=...)

`next_batch()` returns this rank's next micro-batch on the CPU (the trainer moves it: pinned memory and
non_blocking on CUDA); `loss(batch)` returns (the micro-batch loss, {name: detached tensor}) for the
logs. The parts stay on the device and are summed there; one reduction and one host sync happen every
`log_every` steps, not every step.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable

import torch

from pipeline import log
from pipeline.train import checkpoint, dist, preempt


class Window:
    """Running sums of the loss parts since the last log line, kept on the device (no host sync)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        for name, value in parts.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1

    def flush(self) -> dict[str, float]:
        """Mean of each part over the window and over ranks (one all-reduce, one host sync); then reset."""
        if not self.sums:
            return {}
        names = sorted(self.sums)
        means = dist.all_reduce_mean(torch.stack([self.sums[n] for n in names]) / max(self.count, 1)).tolist()
        self.sums, self.count = {}, 0
        return dict(zip(names, means))


def resume(config, root: Path, engine, world) -> tuple[dict | None, Path | None]:
    """With `resume: auto`, load the newest complete checkpoint under `root` into `engine`; return its trainer
    state and folder, or (None, None)."""
    last = checkpoint.latest(root) if config.resume == "auto" else None
    return (None, None) if last is None else (checkpoint.load(last, engine, world), last)


def resume_point(config, root: Path, desc: str) -> tuple[Path | None, dict | None]:
    """For a stage that trains in phases: the newest complete checkpoint under `root` (with `resume: auto`) and
    its trainer state ({phase, step, global_step}), read before the phase's engine exists; else (None, None)."""
    found = checkpoint.latest(root) if config.resume == "auto" else None
    state = checkpoint.peek_state(found)
    if found is not None:
        log.info(f"{desc}: resuming from {found.name} (phase {state['phase']}, step {state['step']})")
    return found, state


def phase_steps(epochs: float, per_epoch: int, max_steps: int | None) -> int:
    """Optimizer steps of a phase of `epochs` epochs (at least one), capped at `max_steps`."""
    total = max(1, int(epochs * per_epoch))
    return min(total, max_steps) if max_steps else total


def _stop_requested(config, step: int) -> bool:
    """Every rank agrees: a signal on any rank (or the test hook) stops all at this step."""
    if config.preempt_at_step is not None and step == config.preempt_at_step:
        preempt.request()
    return bool(dist.all_reduce_sum(torch.tensor([float(preempt.requested())])).item() > 0)


def _maybe_die(config, step: int) -> None:
    if config.die_after_steps is not None and step >= config.die_after_steps:
        os.kill(os.getpid(), signal.SIGKILL)


def example_indices(step: int, n: int, batch_size: int, seed: int, world) -> torch.Tensor:
    """This rank's indices into `n` examples for optimizer step `step` (0-based) of epoch-wise shuffled global
    batches of `batch_size`: a pure function of (seed, epoch, step), so a resumed run draws what an
    uninterrupted one would, and the ranks split each global batch between them."""
    per_epoch = -(-n // batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return order[offset * batch_size:(offset + 1) * batch_size].tensor_split(world.world_size)[world.rank]


def tokens_in(batch) -> int:
    """Real tokens of a CPU batch (its attention mask), for tokens/s; 0 when it has none."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return int(mask.sum()) if mask is not None else 0


def fit(engine, config, *, total: int, next_batch: Callable[[], dict], loss: Callable, ctx, root: Path, desc: str,
        state: Callable[[], dict] = dict, evaluate: Callable[[int], dict] | None = None, eval_every: int = 0,
        eval_final: bool = False, stop: Callable[[dict], bool] | None = None, step_offset: int = 0,
        save_final: bool = False, tensors: Callable[[], dict] | None = None, loss_metric: str = "train_loss",
        after_step: Callable[[int], None] | None = None) -> dict:
    """Train until `engine.global_step == total`; return the last logged parts (`train/<name>`), steps, tokens/s.

    `evaluate(step)` runs every `eval_every` steps before the last (and at the last with `eval_final`); `stop(metrics)`
    True ends training there (early stopping). Checkpoints (`state()` and the optional `tensors()`) go to
    `root/step-{step_offset + step}` every `config.checkpoint_every` steps, on a preemption signal, and at
    the last step with `save_final`; a signal then raises `preempt.Preempted`. A checkpoint's meta.json carries
    that step's loss (as `loss_metric`) and the evaluation metrics of that step, so `distill export` can hand
    them to promotion gates. `after_step(step)` runs right after every optimizer step, before evaluation and
    checkpoints see the weights (pruning re-applies its masks there).
    """
    world, window, last = ctx.world, Window(), {}
    tokens, started, first = 0, time.perf_counter(), engine.global_step
    progress = log.Progress(desc, total, start=first)
    preempt.install()
    try:
        while engine.global_step < total:
            batch = next_batch()
            tokens += tokens_in(batch)
            micro_loss, parts = loss(engine.to_device(batch))
            engine.backward(micro_loss)
            window.add(parts)
            lr = engine.lr  # the rate this step applies (logged as that step's)
            if not engine.step():
                continue
            step = engine.global_step
            if after_step is not None:
                after_step(step)
            progress.advance()
            if step % config.log_every == 0 or step == total:
                last = window.flush()
                rate = tokens * world.world_size / max(time.perf_counter() - started, 1e-9)
                progress.report(step, {"loss": f"{last.get('total', float('nan')):.4f}", "lr": f"{lr:.2e}",
                                       "tok/s": f"{rate:,.0f}"})
                ctx.tracker.log_metrics({**{f"train/{k}": v for k, v in last.items()}, "train/lr": lr,
                                         "train/tokens_per_s": rate}, step_offset + step)
            halt, metrics = False, {}
            due = (eval_every and step % eval_every == 0 and step < total) or (eval_final and step == total)
            if evaluate is not None and due:
                metrics = evaluate(step)
                ctx.tracker.log_metrics(metrics, step_offset + step)
                halt = stop is not None and stop(metrics)
            preempted = _stop_requested(config, step_offset + step)
            if preempted or (config.checkpoint_every and step % config.checkpoint_every == 0) or \
                    (save_final and step == total):
                step_metrics = {loss_metric: float(parts["total"].detach()), **{k.replace("/", "_"): v for k, v in metrics.items()}}
                checkpoint.save(root, step_offset + step, engine, state(), world, keep_last=config.keep_last,
                                meta={"metrics": step_metrics}, tensors=tensors() if tensors is not None else None)
            if preempted:
                raise preempt.Preempted(f"{desc}: stopped at step {step} of {total}")
            _maybe_die(config, step_offset + step)
            if halt:
                break
    finally:
        progress.close()
        preempt.uninstall()  # restore the handlers and clear the flag for whatever runs next in this process
    elapsed = time.perf_counter() - started
    return {**{f"train/{k}": v for k, v in last.items()}, "train/steps": engine.global_step,
            "train/tokens_per_s": tokens * world.world_size / max(elapsed, 1e-9)}
