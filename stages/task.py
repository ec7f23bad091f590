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
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from pipeline import log
from pipeline.assets import resolve_asset
from pipeline.config import ConfigError
from pipeline.manifest import OutputFile, atomic_write_text
from stages import task_loop
from stages.latency import compare, parameter_count
from stages.metrics import compute, confusion_matrix, report_markdown
from stages.student import StudentConfig
from stages.taskdata import TaskData, check_same_vocab, encode, load_task, predict, predictions, with_source
from stages.teacher_finetune import save_model, teacher_dir

LAUNCH = "single"
OBJECTIVES = ("tinybert", "tinybert_intermediate", "tinybert_prediction", "pkd")


@dataclass(kw_only=True)
class Config:
    """Distil a student classifier from a fine-tuned teacher, then evaluate both side by side."""

    data: TaskData = field(default_factory=TaskData)
    """Task data: dev always; train unless `augmented` is given."""
    teacher: str | None = field(default=None, metadata={"input": True})
    """Fine-tuned teacher stage, e.g. `@teacher_finetune`."""
    teacher_path: str | None = None
    """Or a fine-tuned teacher classifier folder / pkg: path (exactly one of teacher, teacher_path)."""
    student: str | None = field(default=None, metadata={"input": True})
    """Student model stage (`@general`, or a `task` stage for TinyBERT's second step)."""
    student_path: str | None = None
    """Or a student folder / pkg: path; with neither, the student is built from the teacher's layers."""
    student_init: StudentConfig = field(default_factory=lambda: StudentConfig(num_layers=4))
    """How to build a student from the teacher's layers (used without student / student_path)."""
    augmented: str | None = field(default=None, metadata={"input": True})
    """`augment` stage whose examples (and cached teacher logits) replace the training set."""
    objective: Literal["tinybert", "tinybert_intermediate", "tinybert_prediction", "pkd"] = "tinybert"
    """What to train (see the module docstring)."""
    intermediate_epochs: float = 10.0
    """Epochs of TinyBERT step 1."""
    prediction_epochs: float = 3.0
    """Epochs of TinyBERT step 2, or of Patient KD."""
    max_steps: int | None = None
    """Cap on optimizer steps per phase (quick runs)."""
    batch_size: int = 32
    """Examples per step."""
    lr: float = 5e-5
    """Peak learning rate (linear warm-up for 10% of a phase, then linear decay)."""
    temperature: float = 1.0
    """Softmax temperature T of the soft cross-entropy."""
    alpha: float = 0.5
    """Patient KD: weight of the soft loss (the hard loss gets 1 - alpha)."""
    beta: float = 100.0
    """Patient KD: weight of the normalised [CLS] MSE."""
    pkd_layers: Literal["skip", "last"] = "skip"
    """Patient KD: PKD-skip (every N/M-th teacher layer) or PKD-last (the last M)."""
    layer_map: Literal["uniform", "last", "skip"] = "uniform"
    """TinyBERT step 1: teacher layer per student layer (g(m) = m N / M for uniform)."""
    checkpoint_every: int = field(default=200, metadata={"hash": False})
    """Save resumable training state every N steps."""
    keep_last: int = field(default=2, metadata={"hash": False})
    """Checkpoints kept."""
    eval_batch_size: int = field(default=128, metadata={"hash": False})
    """Examples per dev forward."""
    latency_batch_size: int = 32
    """Batch size of the inference-speed comparison."""
    latency_seq_len: int = 64
    """Sequence length of the inference-speed comparison."""
    latency_repeats: int = field(default=10, metadata={"hash": False})
    """Timed repeats per model (median reported)."""
    threads: int | None = field(default=None, metadata={"hash": False})
    """CPU threads for torch (None: torch's default)."""

    def __post_init__(self):
        if bool(self.teacher) == bool(self.teacher_path):
            raise ValueError("give exactly one of teacher (e.g. '@teacher_finetune') or teacher_path")
        if self.student and self.student_path:
            raise ValueError("give student or student_path, not both")
        if self.objective == "tinybert_prediction" and not self.augmented:
            raise ValueError("objective tinybert_prediction reads cached teacher logits: set augmented: '@augment'")
        for name in ("batch_size", "latency_batch_size", "latency_seq_len", "checkpoint_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError("temperature and lr must be > 0")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def phases(self) -> list[tuple[str, float]]:
        """(phase, epochs) in training order."""
        if self.objective == "tinybert":
            return [("intermediate", self.intermediate_epochs), ("prediction", self.prediction_epochs)]
        if self.objective == "tinybert_intermediate":
            return [("intermediate", self.intermediate_epochs)]
        return [(self.objective.replace("tinybert_", ""), self.prediction_epochs)]


def _student_dir(config: Config, ctx):
    if config.student:
        return ctx.input_dir("student") / ctx.input_manifest("student").extra.get("model_dir", "model")
    return resolve_asset(config.student_path) if config.student_path else None


def _training_set(config: Config, ctx, train, teacher_folder, label_names):
    """Texts, labels and cached teacher tensors (None: teacher runs online) of the training set."""
    if not config.augmented:
        return train.texts, train.labels, None
    from stages.augment import load_cache, read_part

    folder, manifest = ctx.input_dir("augmented"), ctx.input_manifest("augmented")
    if manifest.extra.get("label_names") != label_names:
        raise ConfigError(f"{folder}: augmented labels {manifest.extra.get('label_names')} != task labels {label_names}")
    if manifest.extra.get("has_teacher_outputs"):
        return load_cache(folder, manifest, teacher_folder)
    if config.objective in ("tinybert", "tinybert_prediction"):
        raise ConfigError(f"{folder}: no cached teacher logits for the prediction step; set teacher on the augment stage")
    texts, labels = [], []
    for c in range(manifest.extra["chunks"]):
        t, lab = read_part(folder / f"part-{c:05d}.jsonl")
        texts, labels = texts + t, labels + [lab]
    return texts, np.concatenate(labels), None


def _evaluate(config: Config, models: dict, tokenizer, dev, preset, num_labels: int) -> dict:
    dev_ids, dev_types = encode(tokenizer, dev.texts, config.data.max_length)
    out = {}
    for name, model in models.items():
        preds = predictions(predict(model, dev_ids, dev_types, tokenizer.pad_token_id, config.eval_batch_size),
                            preset.regression)
        out[name] = {"dev": compute(list(preset.metrics), preds, dev.labels), "params": parameter_count(model)}
        if not preset.regression:
            out[name]["confusion_matrix"] = confusion_matrix(preds, dev.labels, range(num_labels)).tolist()
    speed = compare(models, vocab_size=tokenizer.vocab_size, batch_size=config.latency_batch_size,
                    seq_len=config.latency_seq_len, repeats=config.latency_repeats)
    for name in models:
        out[name].update(speed[name])
    return out


def run(config: Config, ctx):
    """Build teacher and student, train the objective's phases (resuming), evaluate, save and report."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(ctx.seed)
    teacher_folder = teacher_dir(ctx, config.teacher, config.teacher_path)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_folder))
    train, dev = load_task(with_source(config.data, ctx))
    preset = config.data.preset
    num_labels = 1 if preset.regression else len(train.label_names)
    teacher = AutoModelForSequenceClassification.from_pretrained(str(teacher_folder), attn_implementation="eager")
    if teacher.config.num_labels != num_labels:
        raise ConfigError(f"{teacher_folder}: teacher has {teacher.config.num_labels} labels, the task {num_labels}; "
                          "fine-tune it on this task first (teacher_finetune)")
    student_folder = _student_dir(config, ctx)
    if student_folder is not None:
        check_same_vocab(tokenizer, AutoTokenizer.from_pretrained(str(student_folder)), f"student {student_folder}")
    student = task_loop.build_classifier(student_folder, config.student_init, teacher, num_labels)
    texts, labels, cached = _training_set(config, ctx, train, teacher_folder, train.label_names)
    ids, types = encode(tokenizer, texts, config.data.max_length)
    counts = task_loop.train(config, ctx, student, teacher, (ids, types, labels), cached, tokenizer.pad_token_id,
                             regression=preset.regression)
    results = _evaluate(config, {"teacher": teacher, "student": student}, tokenizer, dev, preset, num_labels)
    t_score, s_score = results["teacher"]["dev"]["score"], results["student"]["dev"]["score"]
    summary = {
        "task": config.data.task, "objective": config.objective, "train_examples": len(ids), **counts,
        "student_share_of_teacher": s_score / t_score if t_score else 0.0,
        "speedup": results["teacher"]["latency_ms"] / results["student"]["latency_ms"],
        "latency_shape": [config.latency_batch_size, config.latency_seq_len], "device": "cpu",
    }
    report = {"summary": summary, "teacher": results["teacher"], "student": results["student"]}
    log.info(f"task: teacher {t_score:.4f} student {s_score:.4f} share {summary['student_share_of_teacher']:.3f} "
             f"speedup {summary['speedup']:.2f}x")
    outputs = save_model(student, tokenizer, ctx.stage_dir)
    atomic_write_text(ctx.stage_dir / "report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    atomic_write_text(ctx.stage_dir / "report.md", report_markdown(report))
    outputs += [OutputFile.of(ctx.stage_dir, "report.json"), OutputFile.of(ctx.stage_dir, "report.md")]
    metrics = {**summary, "teacher_dev_score": t_score, "student_dev_score": s_score,
               **{f"student_dev_{k}": v for k, v in results["student"]["dev"].items()},
               **{f"teacher_dev_{k}": v for k, v in results["teacher"]["dev"].items()},
               "teacher_params": results["teacher"]["params"], "student_params": results["student"]["params"],
               "teacher_latency_ms": results["teacher"]["latency_ms"],
               "student_latency_ms": results["student"]["latency_ms"]}
    metrics = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict, str))}
    extra = {"model_dir": "model", "report": "report.json", "label_names": train.label_names,
             "confusion_matrix": {n: results[n].get("confusion_matrix") for n in results}}
    return ctx.manifest(config, outputs, metrics, extra)
