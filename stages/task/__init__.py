"""Stage `task`: task distillation of a student classifier from a fine-tuned teacher, then a side-by-side report.

Objectives:
  tinybert               TinyBERT's two steps in order: intermediate layers, then prediction layer
  tinybert_intermediate  step 1 only: embedding + attention (pre-softmax scores) + hidden MSE, online teacher
  tinybert_prediction    step 2 only: soft CE at T against the teacher logits cached by `augment`
  pkd                    Patient KD: (1-alpha) hard CE + alpha soft CE at T + beta normalised [CLS] MSE,
                         over PKD-skip or PKD-last layers
The student comes from an upstream model stage (`student: "@general"`, or an earlier `task` stage, so the
two TinyBERT steps can also be two stages) or a folder, or is built from the teacher's layers. Training
state (student, projections, optimizer, RNG, phase and step) is checkpointed under `ckpt/step-N/`; a rerun
resumes from the newest complete one and, because batches are a function of (seed, phase, epoch, step),
ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json

import torch

from formats import augmented, models
from formats.taskdata import (
    check_same_vocab,
    encode,
    load_task,
    predict,
    predictions,
    with_source,
)
from kd.latency import compare, parameter_count
from kd.teachers import ATTENTION
from kd.metrics import compute, confusion_matrix, report_markdown
from pipeline import log
from pipeline.config import ConfigError
from pipeline.manifest import OutputFile, atomic_write_text
from pipeline.train import device as devices
from pipeline.train import dist
from stages.task import loop, skd

LAUNCH = "distributed"
OBJECTIVES = ("tinybert", "tinybert_intermediate", "tinybert_prediction", "pkd")


from stages.task.config import Config


def _student_dir(config: Config, ctx):
    if config.student or config.student_path:
        return models.upstream_model(ctx, config.student, config.student_path, role="student")
    return None


def _training_set(config: Config, ctx, train, teacher_folder, label_names):
    """Texts, labels and cached teacher tensors (None: teacher runs online) of the training set."""
    if not config.augmented:
        return train.texts, train.labels, None
    folder, manifest = ctx.input_dir("augmented"), ctx.input_manifest("augmented")
    if manifest.extra.get("label_names") != label_names:
        raise ConfigError(f"{folder}: augmented labels {manifest.extra.get('label_names')} != task labels {label_names}")
    if manifest.extra.get("has_teacher_outputs"):
        return augmented.load_cache(folder, manifest, teacher_folder)
    if config.objective in ("tinybert", "tinybert_prediction"):
        raise ConfigError(f"{folder}: no cached teacher logits for the prediction step; set teacher on the augment stage")
    return (*augmented.read_examples(folder, manifest), None)


def _evaluate(config: Config, models: dict, tokenizer, dev, preset, num_labels: int, device) -> dict:
    """Dev metrics on `device`; latency on the CPU (`latency_ms`) and, off the CPU, on `device` too."""
    dev_ids, dev_types = encode(tokenizer, dev.texts, config.data.max_length)
    out = {}
    for name, model in models.items():
        model.to(device)
        preds = predictions(predict(model, dev_ids, dev_types, tokenizer.pad_token_id, config.eval_batch_size),
                            preset.regression)
        out[name] = {"dev": compute(list(preset.metrics), preds, dev.labels), "params": parameter_count(model)}
        if not preset.regression:
            out[name]["confusion_matrix"] = confusion_matrix(preds, dev.labels, range(num_labels)).tolist()
    shape = dict(vocab_size=tokenizer.vocab_size, batch_size=config.latency_batch_size, seq_len=config.latency_seq_len,
                 repeats=config.latency_repeats)
    if device.type != "cpu" and config.latency_device:
        on_device = compare(models, device=str(device), **shape)
        for name in models:
            out[name].update({f"device_{k}": v for k, v in on_device[name].items()})
    speed = compare({n: m.float() for n, m in models.items()}, **shape)  # moves them to the CPU
    for name in models:
        out[name].update(speed[name])
    return out


def _log_side_by_side(ctx, folder, results: dict, summary: dict) -> None:
    """The teacher as its own run beside the student's, and both with dev scores, size and latency under the
    same names (`dev_*`, `params`, `latency_ms`), so MLflow's run comparison shows them side by side."""
    same = {name: {**{f"dev_{k}": v for k, v in results[name]["dev"].items()}, "params": results[name]["params"],
                   "latency_ms": results[name]["latency_ms"]} for name in ("teacher", "student")}
    ctx.tracker.log_metrics(same["student"])
    ctx.tracker.log_model_run("teacher", folder, same["teacher"], {"role": "teacher", "task": summary["task"]})


def run(config: Config, ctx):
    """Build teacher and student, train the objective's phases (resuming), evaluate, save and report."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    device = devices.resolve(config.device, ctx.world)  # a missing GPU fails here, before any loading
    torch.manual_seed(ctx.seed)
    teacher_folder = models.upstream_model(ctx, config.teacher, config.teacher_path)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_folder))
    train, dev = load_task(with_source(config.data, ctx))
    preset = config.data.preset
    num_labels = 1 if preset.regression else len(train.label_names)
    teacher = AutoModelForSequenceClassification.from_pretrained(str(teacher_folder), attn_implementation=ATTENTION)
    if teacher.config.num_labels != num_labels:
        raise ConfigError(f"{teacher_folder}: teacher has {teacher.config.num_labels} labels, the task {num_labels}; "
                          "fine-tune it on this task first (teacher_finetune)")
    student_folder = _student_dir(config, ctx)
    if student_folder is not None:
        check_same_vocab(tokenizer, AutoTokenizer.from_pretrained(str(student_folder)), f"student {student_folder}")
    student = loop.build_classifier(student_folder, config.student_init, teacher, num_labels)
    team = skd.load(config, ctx, tokenizer, train.label_names, student)  # None without `team`
    if team is not None and team.cached:  # the members' caches are the training set
        texts, labels, cached = team.texts, team.labels, None
    else:
        texts, labels, cached = _training_set(config, ctx, train, teacher_folder, train.label_names)
    ids, types = encode(tokenizer, texts, config.data.max_length)
    labels_out = None if preset.regression else train.label_names
    if ctx.world.rank == 0:  # what `distill export` needs to turn any ckpt/step-N/ into a model folder
        models.save_template(ctx.stage_dir / loop.CKPT, student, tokenizer, labels=labels_out)
    counts, student = loop.train(config, ctx, student, teacher, (ids, types, labels), cached, tokenizer.pad_token_id,
                                 regression=preset.regression, team=team)
    if team is not None:
        counts.update(team.counts(len(ids), config.batch_size))
    if ctx.world.rank != 0:
        dist.barrier()  # rank 0 evaluates and writes; this rank's manifest is never written
        return ctx.manifest(config, [], {}, {})
    results = _evaluate(config, {"teacher": teacher, "student": student}, tokenizer, dev, preset, num_labels, device)
    t_score, s_score = results["teacher"]["dev"]["score"], results["student"]["dev"]["score"]
    summary = {
        "task": config.data.task, "objective": config.objective, "train_examples": len(ids), **counts,
        "student_share_of_teacher": s_score / t_score if t_score else 0.0,
        "speedup": results["teacher"]["latency_ms"] / results["student"]["latency_ms"],
        "latency_shape": [config.latency_batch_size, config.latency_seq_len], "device": str(device),
    }
    if "device_latency_ms" in results["student"]:
        summary["device_speedup"] = results["teacher"]["device_latency_ms"] / results["student"]["device_latency_ms"]
    report = {"summary": summary, "teacher": results["teacher"], "student": results["student"]}
    log.info(f"task: teacher {t_score:.4f} student {s_score:.4f} share {summary['student_share_of_teacher']:.3f} "
             f"speedup {summary['speedup']:.2f}x")
    metrics = {**summary, "teacher_dev_score": t_score, "student_dev_score": s_score,
               **{f"student_dev_{k}": v for k, v in results["student"]["dev"].items()},
               **{f"teacher_dev_{k}": v for k, v in results["teacher"]["dev"].items()},
               "teacher_params": results["teacher"]["params"], "student_params": results["student"]["params"],
               "teacher_latency_ms": results["teacher"]["latency_ms"],
               "student_latency_ms": results["student"]["latency_ms"],
               **{f"{n}_device_latency_ms": results[n]["device_latency_ms"] for n in results
                  if "device_latency_ms" in results[n]}}
    metrics = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict, str))}
    outputs = models.save_model(student, tokenizer, ctx.stage_dir, labels=labels_out,
                                examples=[t[0] for t in dev.texts[:3]], card=models.card(ctx, metrics))
    atomic_write_text(ctx.stage_dir / "report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    atomic_write_text(ctx.stage_dir / "report.md", report_markdown(report))
    outputs += [OutputFile.of(ctx.stage_dir, "report.json"), OutputFile.of(ctx.stage_dir, "report.md")]
    _log_side_by_side(ctx, teacher_folder, results, summary)
    dist.barrier()
    extra = {"model_dir": models.MODEL_DIR, "report": "report.json", "label_names": train.label_names,
             "confusion_matrix": {n: results[n].get("confusion_matrix") for n in results}}
    if team is not None:
        extra["team"] = team.describe()
    return ctx.manifest(config, outputs, metrics, extra)
