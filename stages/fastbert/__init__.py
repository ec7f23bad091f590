"""Stage `fastbert`: FastBERT's self-distilled branches on a fine-tuned classifier, and the speed report.

A small classifier (a branch, kd/early_exit.py) goes after every layer but the last of a fine-tuned BERT
classifier; the backbone and the final classifier stay frozen. The branches learn, without labels, to predict
what the model's own final classifier predicts (KL at a temperature, summed over branches) on the task's
training text and, when given, the augmented text. Then the report: accuracy, average layers run and measured
CPU latency on the task's held-out test split (`formats.testsplit`: `data.test`, or carved from train by
the run seed: the split teacher_finetune and augment held out too, which this stage checks) for each speed
threshold S in `speeds`, the full model beside them, and the speed-up that costs at most `max_drop` points,
its S chosen on dev (stages/fastbert/report.py).

Training is the one loop of `pipeline.train.trainer`: the engine holds only the branches (the frozen model
is placed beside it, like an online teacher), batches are a pure function of (seed, epoch, step), and a
checkpoint (`checkpoints/step-N/`) holds branch weights, optimizer moments and RNG state, so a resumed run
ends with bit-identical branches. The output (formats/early_exit.py) is the classifier's model folder plus
`branches.safetensors` and `branches.json`; `distill predict STAGE_DIR --speed S` serves it.
"""

from __future__ import annotations

import json
import math

import torch

from formats import augmented, early_exit, models
from formats.taskdata import encode, pad_batch, with_source
from formats.testsplit import check_inputs, describe, load_splits
from kd.early_exit import Branches, check_backbone, self_distillation_loss, spec_of
from kd.teachers import ATTENTION, place
from pipeline import log
from pipeline.config import ConfigError
from pipeline.manifest import OutputFile, atomic_write_text
from pipeline.train import dist, trainer
from pipeline.train import device as devices
from pipeline.train.engine import build_engine
from stages.fastbert import report as grid_report
from stages.fastbert.config import Config

LAUNCH = "distributed"
CKPT = "checkpoints"


def _training_texts(config: Config, ctx, train) -> tuple[list, int]:
    """The unlabeled training text: the train rows, then the augmented rows (the augment stage removed the same
    test split before augmenting, checked in `run`, so no row is made from a test row)."""
    if not config.augmented:
        return list(train.texts), 0
    extra, _ = augmented.read_examples(ctx.input_dir("augmented"), ctx.input_manifest("augmented"))
    return list(train.texts) + extra, len(extra)


def train_branches(config: Config, ctx, classifier, branches: Branches, ids, types,
                   pad_id: int) -> tuple[Branches, dict]:
    """Self-distil `branches` from `classifier`'s final classifier through the one trainer; return (the trained
    branches on rank 0, None elsewhere; {steps, resumed_from_step})."""
    world, n = ctx.world, len(ids)
    per_epoch = math.ceil(n / config.batch_size)
    total = max(1, int(config.epochs * per_epoch))
    total = min(total, config.max_steps) if config.max_steps else total
    settings = config.engine_settings(total_steps=total, micro_batch_size=-(-config.batch_size // world.world_size),
                                      world=world)
    place(classifier, settings.device, "fp32")  # frozen, eval, fp32: saved as given, targets without dropout
    engine = build_engine(branches, settings=settings, world=world)
    root = ctx.stage_dir / CKPT
    state, _ = trainer.resume(config, root, engine, world)
    resumed = engine.global_step
    if state is not None:
        log.info(f"fastbert: resuming at step {engine.global_step}/{total}")
    branches.train()

    def next_batch():
        pick = trainer.example_indices(engine.global_step, n, config.batch_size, ctx.seed * 7919, world)
        return pad_batch([ids[i] for i in pick], [types[i] for i in pick], pad_id)

    def loss(batch):
        share = dist.global_shares(torch.tensor([len(batch["input_ids"])], device=batch["input_ids"].device))[0]
        with torch.no_grad():
            out = classifier(**batch, output_hidden_states=True)
        hidden = [h.detach() for h in out.hidden_states[1:-1]]  # after layers 1..L-1
        value = self_distillation_loss(engine.forward(hidden, batch["attention_mask"]), out.logits,
                                       config.temperature) * share
        return value, {"total": value}

    trainer.fit(engine, config, total=total, next_batch=next_batch, loss=loss, ctx=ctx, root=root, desc="fastbert",
                save_final=True, loss_metric="distill_loss", state=lambda: {"step": engine.global_step})
    trained = engine.exported(lambda: Branches(branches.spec))
    return trained, {"steps": engine.global_step, "resumed_from_step": resumed}


def run(config: Config, ctx):
    """Load the classifier and the task's splits, train the branches (resuming), report on test, save."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    devices.resolve(config.device, ctx.world)  # a missing GPU fails here, before any loading
    torch.manual_seed(ctx.seed)
    folder = models.upstream_model(ctx, config.teacher, config.teacher_path)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    splits = load_splits(with_source(config.data, ctx), ctx.seed)
    train, dev = splits.train, splits.dev
    check_inputs(ctx, splits.test_split, "teacher", "augmented")  # a teacher trained on test rows inflates test
    log.info(f"fastbert: {describe(splits.test_split)}")
    classifier = AutoModelForSequenceClassification.from_pretrained(str(folder), attn_implementation=ATTENTION)
    try:
        check_backbone(classifier)
    except ValueError as err:
        raise ConfigError(f"{folder}: {err}") from None
    if classifier.config.num_labels != len(train.label_names):
        raise ConfigError(f"{folder}: the classifier has {classifier.config.num_labels} labels, the task "
                          f"{len(train.label_names)}; fine-tune it on this task first (teacher_finetune)")
    texts, n_aug = _training_texts(config, ctx, train)
    ids, types = encode(tokenizer, texts, config.data.max_length)
    with torch.random.fork_rng(devices=[]):  # the branches' init is seeded apart from the training RNG
        torch.manual_seed(ctx.seed + 1)
        branches = Branches(spec_of(classifier, width=config.branch_width, heads=config.branch_heads,
                                    dropout=config.branch_dropout))
    trained, counts = train_branches(config, ctx, classifier, branches, ids, types, tokenizer.pad_token_id)
    if ctx.world.rank != 0:
        dist.barrier()  # rank 0 evaluates and writes; this rank's manifest is never written
        return ctx.manifest(config, [], {}, {})
    model = early_exit.EarlyExitModel(classifier.float().cpu(), trained, tokenizer, 0.0, config.data.max_length)
    report = grid_report.build(config, model, (splits.test.texts, splits.test.labels), (dev.texts, dev.labels))
    summary = report["summary"]
    summary.update(task=config.data.task, **counts, train_texts=len(ids), augmented_texts=n_aug,
                   test_split=describe(splits.test_split))
    metrics = grid_report.metrics(report)
    outputs = early_exit.save(ctx.stage_dir, classifier, trained, tokenizer, default_speed=summary["chosen_speed"],
                              max_length=config.data.max_length, labels=train.label_names,
                              examples=[t[0] for t in dev.texts[:3]], card=models.card(ctx, metrics))
    atomic_write_text(ctx.stage_dir / "report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    atomic_write_text(ctx.stage_dir / "report.md", grid_report.markdown(report))
    grid_report.plot(report, ctx.stage_dir / "report.png")
    outputs += [OutputFile.of(ctx.stage_dir, name) for name in ("report.json", "report.md", "report.png")]
    grid_report.track(ctx, report)
    dist.barrier()
    extra = {"model_dir": models.MODEL_DIR, "branches": early_exit.SPEC, "report": "report.json",
             "label_names": train.label_names, "default_speed": summary["chosen_speed"],
             "test_split": splits.test_split}
    return ctx.manifest(config, outputs, metrics, extra)


def verify(manifest, stage_dir) -> None:
    """The branch weights hash to what branches.json recorded (`distill verify`)."""
    early_exit.read_spec(stage_dir)
