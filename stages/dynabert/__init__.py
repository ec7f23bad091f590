"""Stage `dynabert`: one width- and depth-adaptive BERT classifier (DynaBERT, Hou et al. 2020) and its grid.

1. Importance: |d task loss / d mask| of every attention head and FFN neuron of the fine-tuned teacher,
   summed over `importance_batches` training batches (`kd.importance`).
2. Rewiring: the student starts as a copy of the teacher with heads and neurons reordered most important
   first, so the sub-network at width w is simply the leading heads and neurons (`kd.dynabert`).
3. Width-adaptive training over `widths` (full depth), distilled from the fine-tuned teacher: soft
   cross-entropy of the logits plus MSE of the embeddings and every layer's hidden state.
4. Depth-adaptive training over `widths` x `depths`, distilled from the width-adaptive model at the same
   width and full depth; depth d keeps layers floor(i / d), i < round(d L) (the paper's pattern).
5. The grid: dev and test (the task's held-out test split, `formats.testsplit`) scores, parameters and CPU
   latency of every (width, depth), report.json / report.md / grid.png (logged to MLflow), and the smallest
   sub-network within `tolerance` of the full model. `model/` is the adaptive model (a plain BERT: its full network);
   `distill export --width W --depth D` cuts any sub-network into a plain Hugging Face folder.
"""

from __future__ import annotations

import json

import torch

from formats import augmented, models
from formats.taskdata import Examples, encode, with_source
from formats.testsplit import check_inputs, describe, load_splits
from kd.teachers import ATTENTION
from pipeline import log
from pipeline.config import ConfigError
from pipeline.manifest import OutputFile, atomic_write_text
from pipeline.train import device as devices
from pipeline.train import dist
from stages.dynabert import grid, loop
from stages.dynabert.config import Config

LAUNCH = "distributed"


def _training_set(config: Config, ctx, train: Examples):
    """Texts and labels to train on: the training rows, or the augmented rows made from them (the augment stage
    removed the same test split before augmenting, checked in `run`)."""
    if not config.augmented:
        return train.texts, train.labels
    folder, manifest = ctx.input_dir("augmented"), ctx.input_manifest("augmented")
    if manifest.extra.get("label_names") != train.label_names:
        raise ConfigError(f"{folder}: augmented labels {manifest.extra.get('label_names')} != task labels "
                          f"{train.label_names}; augment the same task data")
    return augmented.read_examples(folder, manifest)


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
    splits = load_splits(with_source(config.data, ctx), ctx.seed)
    train, dev = splits.train, splits.dev
    check_inputs(ctx, splits.test_split, "teacher", "augmented")  # a teacher trained on test rows inflates test
    log.info(f"dynabert: {describe(splits.test_split)}")
    preset = config.data.preset
    num_labels = 1 if preset.regression else len(train.label_names)
    teacher_folder, teacher = _load_teacher(config, ctx, num_labels)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_folder))
    texts, labels = _training_set(config, ctx, train)
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
    test_enc = (*encode(tokenizer, splits.test.texts, config.data.max_length), splits.test.labels)
    report = grid.evaluate(config, student.float().cpu(), teacher.float().cpu(), dev_enc, test_enc, preset,
                           tokenizer.pad_token_id, tokenizer.vocab_size)
    report.update(task=config.data.task, widths=config.widths, depths=config.depths, train_examples=len(ids),
                  test_examples=len(splits.test), test_split=describe(splits.test_split), importance=importance,
                  **counts)
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
             "widths": config.widths, "depths": config.depths, "adaptive": "dynabert",
             "test_split": splits.test_split}
    return ctx.manifest(config, outputs, metrics, extra)
