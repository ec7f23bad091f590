"""Stage `dynabert`: one width- and depth-adaptive BERT classifier (DynaBERT, Hou et al. 2020) and its grid.

1. Importance: |d task loss / d mask| of every attention head and FFN neuron of the fine-tuned teacher,
   summed over `importance_batches` training batches (`kd.importance`).
2. Rewiring: the student starts as a copy of the teacher with heads and neurons reordered most important
   first, so the sub-network at width w is simply the leading heads and neurons (`kd.dynabert`).
3. Width-adaptive training over `widths` (full depth), distilled from the fine-tuned teacher: soft
   cross-entropy of the logits plus MSE of the embeddings and every layer's hidden state.
4. Depth-adaptive training over `widths` x `depths`, distilled from the width-adaptive model at the same
   width and full depth; depth d keeps layers floor(i / d), i < round(d L) (the paper's pattern).
5. The grid: dev and test (a seeded `test_fraction` of train) scores, parameters and CPU latency of every
   (width, depth), report.json / report.md / grid.png (logged to MLflow), and the smallest sub-network
   within `tolerance` of the full model. `model/` is the adaptive model (a plain BERT: its full network);
   `distill export --width W --depth D` cuts any sub-network into a plain Hugging Face folder.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from formats import augmented, models
from formats.taskdata import Examples, encode, load_task, with_source
from kd.teachers import ATTENTION
from pipeline import log
from pipeline.config import ConfigError
from pipeline.manifest import OutputFile, atomic_write_text
from pipeline.train import device as devices
from pipeline.train import dist
from stages.dynabert import grid, loop
from stages.dynabert.config import Config

LAUNCH = "distributed"


def split_test(train: Examples, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, test) training-row indices: a `fraction` of the rows, drawn by `seed`, held out as the test split."""
    n = len(train)
    count = max(1, int(round(fraction * n)))
    if count >= n:
        raise ConfigError(f"test_fraction {fraction}: {n} training rows leave nothing to train on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return np.sort(order[count:]), np.sort(order[:count])


def _training_set(config: Config, ctx, train: Examples, kept: np.ndarray):
    """Texts and labels to train on: the kept training rows, or the augmented rows made from them."""
    if not config.augmented:
        return [train.texts[i] for i in kept], train.labels[kept]
    folder, manifest = ctx.input_dir("augmented"), ctx.input_manifest("augmented")
    if manifest.extra.get("label_names") != train.label_names:
        raise ConfigError(f"{folder}: augmented labels {manifest.extra.get('label_names')} != task labels "
                          f"{train.label_names}; augment the same task data")
    texts, labels = augmented.read_examples(folder, manifest)
    source = augmented.read_source_ids(folder, manifest)
    if source.size and source.max() >= len(train):
        raise ConfigError(f"{folder}: made from {source.max() + 1}+ training rows, this task has {len(train)}; "
                          "give augment and dynabert the same data (and limit_train)")
    keep = np.isin(source, kept)  # variants of held-out test sentences would leak the test split
    return [t for t, k in zip(texts, keep) if k], labels[keep]


def _load_teacher(config: Config, ctx, num_labels: int):
    from transformers import AutoModelForSequenceClassification

    folder = models.upstream_model(ctx, config.teacher, config.teacher_path)
    teacher = AutoModelForSequenceClassification.from_pretrained(str(folder), attn_implementation=ATTENTION)
    if teacher.config.model_type != "bert":
        raise ConfigError(f"{folder}: a {teacher.config.model_type} model; DynaBERT slices BERT heads and FFNs")
    if teacher.config.num_labels != num_labels:
        raise ConfigError(f"{folder}: teacher has {teacher.config.num_labels} labels, the task {num_labels}; "
                          "fine-tune it on this task first (teacher_finetune)")
    return folder, teacher.eval().requires_grad_(False)


def _log(ctx, report: dict, plot_path) -> None:
    for row in report["rows"]:
        name = grid.key(row["width"], row["depth"])
        ctx.tracker.log_metrics({f"grid/{name}/dev_score": row["dev"]["score"],
                                 f"grid/{name}/test_score": row["test"]["score"], f"grid/{name}/params": row["params"],
                                 f"grid/{name}/latency_ms": row["latency_ms"]})
    ctx.tracker.log_artifact(plot_path, "plots")


def run(config: Config, ctx):
    """Importance, rewiring, width then depth training (resuming), the grid report, the adaptive model."""
    from transformers import AutoTokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    device = devices.resolve(config.device, ctx.world)  # a missing GPU fails here, before any loading
    torch.manual_seed(ctx.seed)
    train, dev = load_task(with_source(config.data, ctx))
    preset = config.data.preset
    num_labels = 1 if preset.regression else len(train.label_names)
    teacher_folder, teacher = _load_teacher(config, ctx, num_labels)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_folder))
    kept, test_rows = split_test(train, config.test_fraction, ctx.seed)
    texts, labels = _training_set(config, ctx, train, kept)
    ids, types = encode(tokenizer, texts, config.data.max_length)
    student = loop.frozen_copy(teacher).requires_grad_(True).to(device)
    importance = loop.rewire(config, student, (ids, types, labels), tokenizer.pad_token_id, preset.regression,
                             ctx.seed * 7919 + 17)
    student = student.cpu()
    labels_out = None if preset.regression else train.label_names
    if ctx.world.rank == 0:  # what `distill export --checkpoint` needs to turn a ckpt/step-N/ into a model folder
        models.save_template(ctx.stage_dir / loop.CKPT, student, tokenizer, labels=labels_out)
    counts, student = loop.train(config, ctx, student, teacher, (ids, types, labels), tokenizer.pad_token_id,
                                 regression=preset.regression)
    if ctx.world.rank != 0:
        dist.barrier()  # rank 0 evaluates and writes; this rank's manifest is never written
        return ctx.manifest(config, [], {}, {})
    dev_enc = (*encode(tokenizer, dev.texts, config.data.max_length), dev.labels)
    test_enc = (*encode(tokenizer, [train.texts[i] for i in test_rows], config.data.max_length),
                train.labels[test_rows])
    report = grid.evaluate(config, student.float().cpu(), teacher.float().cpu(), dev_enc, test_enc, preset,
                           tokenizer.pad_token_id, tokenizer.vocab_size)
    report.update(task=config.data.task, widths=config.widths, depths=config.depths, train_examples=len(ids),
                  test_examples=len(test_rows), importance=importance, **counts)
    best = report["smallest_within"]
    log.info(f"dynabert: full test {best['full_test_score']:.4f}; smallest within {config.tolerance:g}: "
             f"w{best['width']:g} d{best['depth']:g} ({100 * best['params_share']:.1f}% params, "
             f"{best['speedup']:.2f}x) test {best['test_score']:.4f}")
    atomic_write_text(ctx.stage_dir / "report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    atomic_write_text(ctx.stage_dir / "report.md", grid.markdown(report))
    plot_path = grid.plot(report, ctx.stage_dir / grid.PLOT)
    metrics = {"full_test_score": best["full_test_score"], "full_dev_score": best["full_dev_score"],
               "teacher_test_score": report["teacher"]["test"]["score"],
               "teacher_dev_score": report["teacher"]["dev"]["score"], "smallest_width": best["width"],
               "smallest_depth": best["depth"], "smallest_params": best["params"],
               "smallest_params_share": best["params_share"], "smallest_speedup": best["speedup"],
               "smallest_test_score": best["test_score"], "steps": counts["steps"], "train_examples": len(ids)}
    outputs = models.save_model(student, tokenizer, ctx.stage_dir, labels=labels_out,
                                examples=[t[0] for t in dev.texts[:3]], card=models.card(ctx, metrics))
    outputs += [OutputFile.of(ctx.stage_dir, name) for name in ("report.json", "report.md", grid.PLOT)]
    outputs += models.model_outputs(ctx.stage_dir, loop.WIDTH_ADAPTIVE)
    _log(ctx, report, plot_path)
    dist.barrier()
    extra = {"model_dir": models.MODEL_DIR, "report": "report.json", "label_names": train.label_names,
             "widths": config.widths, "depths": config.depths, "adaptive": "dynabert"}
    return ctx.manifest(config, outputs, metrics, extra)
