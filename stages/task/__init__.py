"""Stage `task`: task distillation of a student classifier from a fine-tuned teacher, then a side-by-side report.

Objectives:
  tinybert               TinyBERT's two steps in order: intermediate layers, then prediction layer
  tinybert_intermediate  step 1 only: embedding + attention (pre-softmax scores) + hidden MSE, online teacher
  tinybert_prediction    step 2 only: soft CE at T against the teacher logits cached by `augment`
                         (mixed with the hard CE when hard_weight > 0)
  pkd                    Patient KD: (1-alpha) hard CE + alpha soft CE at T + beta normalised [CLS] MSE,
                         over PKD-skip or PKD-last layers
The student comes from an upstream model stage (`student: "@general"`, or an earlier `task` stage, so the
two TinyBERT steps can also be two stages) or a folder, or is built from the teacher's layers. Training
state (student, projections, optimizer, RNG, phase and step) is checkpointed under `ckpt/step-N/`; a rerun
resumes from the newest complete one and, because batches are a function of (seed, phase, epoch, step),
ends with the same weights as an uninterrupted run.

Dev gives the evaluation points drawn on the loss curves; the published scores (`*_test_*`,
`student_test_share_of_teacher`) come from the held-out test split (`formats.testsplit`: `data.test`, or
carved from train by the run seed, the same carve the teacher_finetune and augment stages made, which this
stage checks). The report is `stages.task.report`.
"""

from __future__ import annotations

import dataclasses

import torch

from formats import augmented, models
from formats.taskdata import (
    check_same_vocab,
    encode,
    predict,
    predictions,
    with_source,
)
from formats.testsplit import check_same_split, describe, load_splits
from kd.latency import compare, parameter_count
from kd.teachers import ATTENTION
from kd.metrics import compute, confusion_matrix, macro_f1, per_class
from pipeline import log
from pipeline.config import ConfigError
from pipeline.tracking.base import Recording
from pipeline.train import device as devices
from pipeline.train import dist
from stages.task import loop, skd
from stages.task import report as task_report

LAUNCH = "distributed"
OBJECTIVES = ("tinybert", "tinybert_intermediate", "tinybert_prediction", "pkd")


from stages.task.config import Config


def _student_dir(config: Config, ctx):
    if config.student or config.student_path:
        return models.upstream_model(ctx, config.student, config.student_path, role="student")
    return None


def _training_set(config: Config, ctx, train, teacher_folder, label_names, test_split: dict):
    """Texts, labels and cached teacher tensors (None: teacher runs online) of the training set."""
    if not config.augmented:
        return train.texts, train.labels, None
    folder, manifest = ctx.input_dir("augmented"), ctx.input_manifest("augmented")
    check_same_split(test_split, manifest.extra.get("test_split"), f"augmented {folder}")
    if manifest.extra.get("label_names") != label_names:
        raise ConfigError(f"{folder}: augmented labels {manifest.extra.get('label_names')} != task labels {label_names}")
    if manifest.extra.get("has_teacher_outputs"):
        return augmented.load_cache(folder, manifest, teacher_folder)
    if config.objective in ("tinybert", "tinybert_prediction"):
        raise ConfigError(f"{folder}: no cached teacher logits for the prediction step; set teacher on the augment stage")
    return (*augmented.read_examples(folder, manifest), None)


def _scores(config: Config, model, tokenizer, examples, preset) -> tuple[dict, object]:
    """(metrics with `score`, predictions) of `model` over `examples`."""
    ids, types = encode(tokenizer, examples.texts, config.data.max_length)
    preds = predictions(predict(model, ids, types, tokenizer.pad_token_id, config.eval_batch_size), preset.regression)
    return compute(list(preset.metrics), preds, examples.labels), preds


def _evaluate(config: Config, models: dict, tokenizer, splits, preset, label_names: list[str], device) -> dict:
    """Dev and test metrics on `device` (with confusion matrices and, on test, per-class scores); latency on the
    CPU (`latency_ms`) and, off the CPU, on `device` too."""
    out = {}
    for name, model in models.items():
        model.to(device)
        out[name] = {"params": parameter_count(model)}
        for split, examples in (("dev", splits.dev), ("test", splits.test)):
            out[name][split], preds = _scores(config, model, tokenizer, examples, preset)
            if preset.regression:
                continue
            key = "confusion_matrix" if split == "dev" else "test_confusion_matrix"
            out[name][key] = confusion_matrix(preds, examples.labels, range(len(label_names))).tolist()
            if split == "test":
                out[name]["test_per_class"] = per_class(preds, examples.labels, label_names)
                out[name]["test"]["macro_f1"] = macro_f1(out[name]["test_per_class"])
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
    """The teacher as its own run beside the student's, and both with dev and test scores, size and latency under
    the same names (`dev_*`, `test_*`, `params`, `latency_ms`), so MLflow's run comparison shows them side by side."""
    same = {name: {**{f"{split}_{k}": v for split in ("dev", "test") for k, v in results[name][split].items()},
                   "params": results[name]["params"], "latency_ms": results[name]["latency_ms"]}
            for name in ("teacher", "student")}
    ctx.tracker.log_metrics(same["student"])
    ctx.tracker.log_model_run("teacher", folder, same["teacher"], {"role": "teacher", "task": summary["task"]})


def _dev_evaluation(config: Config, tokenizer, dev, preset):
    """What the trainer calls at the evaluation points: the student's dev metrics as `eval/dev_*`."""
    def evaluate(student) -> dict:
        scores, _ = _scores(config, student, tokenizer, dev, preset)
        return {f"{task_report.EVAL_PREFIX}{k}": v for k, v in scores.items()}
    return evaluate


def _metrics(summary: dict, results: dict) -> dict:
    """The manifest's scalar metrics: the summary's, then every dev and test metric, size and latency of both."""
    metrics = {**summary}
    for who in ("teacher", "student"):
        for split in ("dev", "test"):
            metrics[f"{who}_{split}_score"] = results[who][split]["score"]
            metrics.update({f"{who}_{split}_{k}": v for k, v in results[who][split].items()})
        metrics[f"{who}_params"], metrics[f"{who}_latency_ms"] = results[who]["params"], results[who]["latency_ms"]
        if "device_latency_ms" in results[who]:
            metrics[f"{who}_device_latency_ms"] = results[who]["device_latency_ms"]
    return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict, str))}


def run(config: Config, ctx):
    """Build teacher and student, train the objective's phases (resuming), evaluate, save and report."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    device = devices.resolve(config.device, ctx.world)  # a missing GPU fails here, before any loading
    torch.manual_seed(ctx.seed)
    teacher_folder = models.upstream_model(ctx, config.teacher, config.teacher_path)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_folder))
    splits = load_splits(with_source(config.data, ctx), ctx.seed)
    train, dev = splits.train, splits.dev
    if config.teacher:  # a teacher fine-tuned on test rows would inflate the teacher's test score
        check_same_split(splits.test_split, ctx.input_manifest("teacher").extra.get("test_split"),
                         f"teacher {ctx.input_dir('teacher')}")
    log.info(f"task: {describe(splits.test_split)}")
    preset = config.data.preset
    num_labels = 1 if preset.regression else len(train.label_names)
    teacher = AutoModelForSequenceClassification.from_pretrained(str(teacher_folder), attn_implementation=ATTENTION)
    if teacher.config.num_labels != num_labels:
        raise ConfigError(f"{teacher_folder}: teacher has {teacher.config.num_labels} labels, the task {num_labels}; "
                          "fine-tune it on this task first (teacher_finetune)")
    student_folder = _student_dir(config, ctx)
    if student_folder is not None:
        check_same_vocab(tokenizer, AutoTokenizer.from_pretrained(str(student_folder)), f"student {student_folder}")
    init = config.student_init
    scored = (loop.importance_batches(train.texts, tokenizer, config.data.max_length, init.importance_samples,
                                      config.batch_size)
              if student_folder is None and init.keep_by == "importance" else None)
    student = loop.build_classifier(student_folder, init, teacher, num_labels, scored)
    team = skd.load(config, ctx, tokenizer, train.label_names, student)  # None without `team`
    if team is not None and team.cached:  # the members' caches are the training set
        texts, labels, cached = team.texts, team.labels, None
    else:
        texts, labels, cached = _training_set(config, ctx, train, teacher_folder, train.label_names,
                                              splits.test_split)
    ids, types = encode(tokenizer, texts, config.data.max_length)
    labels_out = None if preset.regression else train.label_names
    if ctx.world.rank == 0:  # what `distill export` needs to turn any ckpt/step-N/ into a model folder
        models.save_template(ctx.stage_dir / loop.CKPT, student, tokenizer, labels=labels_out)
    recording = Recording(ctx.tracker)  # the loss and dev points the report draws
    counts, student = loop.train(config, dataclasses.replace(ctx, tracker=recording), student, teacher,
                                 (ids, types, labels), cached, tokenizer.pad_token_id, regression=preset.regression,
                                 evaluate=_dev_evaluation(config, tokenizer, dev, preset), team=team)
    if team is not None:
        counts.update(team.counts(len(ids), config.batch_size))
    if ctx.world.rank != 0:
        dist.barrier()  # rank 0 evaluates and writes; this rank's manifest is never written
        return ctx.manifest(config, [], {}, {})
    results = _evaluate(config, {"teacher": teacher, "student": student}, tokenizer, splits, preset,
                        train.label_names, device)
    t_score, s_score = results["teacher"]["dev"]["score"], results["student"]["dev"]["score"]
    t_test, s_test = results["teacher"]["test"]["score"], results["student"]["test"]["score"]
    phases = counts.pop("phases")
    summary = {
        "task": config.data.task, "objective": config.objective, "train_examples": len(ids),
        "test_examples": len(splits.test), **counts,
        "student_share_of_teacher": s_score / t_score if t_score else 0.0,
        "student_test_share_of_teacher": s_test / t_test if t_test else 0.0,
        "speedup": results["teacher"]["latency_ms"] / results["student"]["latency_ms"],
        "latency_shape": [config.latency_batch_size, config.latency_seq_len], "device": str(device),
        "test_split": describe(splits.test_split),
    }
    if "device_latency_ms" in results["student"]:
        summary["device_speedup"] = results["teacher"]["device_latency_ms"] / results["student"]["device_latency_ms"]
    report = {"summary": summary, "teacher": results["teacher"], "student": results["student"]}
    share = summary["student_test_share_of_teacher"]
    log.info(f"task: test teacher {t_test:.4f} student {s_test:.4f} share {share:.3f} "
             f"(dev {t_score:.4f} / {s_score:.4f}) speedup {summary['speedup']:.2f}x")
    metrics = _metrics(summary, results)
    outputs = models.save_model(student, tokenizer, ctx.stage_dir, labels=labels_out,
                                examples=[t[0] for t in dev.texts[:3]], card=models.card(ctx, metrics))
    outputs += task_report.write(ctx, report, train.label_names,
                                 task_report.phase_histories(phases, recording.history))
    _log_side_by_side(ctx, teacher_folder, results, summary)
    dist.barrier()
    extra = {"model_dir": models.MODEL_DIR, "report": "report.json", "label_names": train.label_names,
             "test_split": splits.test_split,
             "confusion_matrix": {n: results[n].get("confusion_matrix") for n in results},
             "test_confusion_matrix": {n: results[n].get("test_confusion_matrix") for n in results}}
    if team is not None:
        extra["team"] = team.describe()
    return ctx.manifest(config, outputs, metrics, extra)
