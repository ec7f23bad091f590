"""Stage `prune`: lottery-ticket pruning of a fine-tuned classifier, exported as a plain Hugging Face model.

Magnitude pruning removes single encoder weights by |w| (one ranking over all encoder matrices, or each
matrix on its own); structured pruning removes attention heads and FFN neurons by importance (|d loss / d
mask|, Michel et al. 2019, through `kd.importance`). Either prunes once to `sparsity` or `rate` of the rest
per round; after each pruning the kept weights rewind to `rewind_step` (Frankle & Carbin 2019; Chen et al.
2020 for BERT) and retrain with the masks held, optionally distilling from the unpruned model. The export
is a normal model folder (zeros in place, or smaller FFN matrices through `kd.importance.shrink`), with
`sparsity.json` and a report of sparsity against the test score and the measured CPU speed-up. The test score
is on the task's held-out test split (`formats.testsplit`: `data.test`, or carved from train by the run seed,
the split the upstream `teacher_finetune` held out too, which this stage checks).
"""

from __future__ import annotations

import copy
import json

import torch

from formats import models
from formats.taskdata import encode, predict, predictions, with_source
from formats.testsplit import check_inputs, describe, load_splits
from kd import metrics as task_metrics
from kd.latency import compare, parameter_count
from kd.teachers import ATTENTION
from pipeline import log
from pipeline.config import ConfigError
from pipeline.manifest import OutputFile, atomic_write_text
from pipeline.train import device as devices
from pipeline.train import dist
from stages.prune import loop, report
from stages.prune.config import Config

LAUNCH = "distributed"


def _load(folder, num_labels: int):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(folder), attn_implementation=ATTENTION)
    if model.config.num_labels != num_labels:
        raise ConfigError(f"{folder}: the model has {model.config.num_labels} labels and the task {num_labels}; "
                          "prune a classifier fine-tuned on this task (e.g. model: \"@teacher_finetune\")")
    return model


def run(config: Config, ctx):
    """Prune and retrain in rounds (resuming), evaluate, export the model with its sparsity and a report."""
    from transformers import AutoTokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    where = devices.resolve(config.device, ctx.world)  # a missing GPU fails here, before any loading
    torch.manual_seed(ctx.seed)
    folder = models.upstream_model(ctx, config.model, config.model_path, role="model")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    splits = load_splits(with_source(config.data, ctx), ctx.seed)
    train_ex, dev_ex, test_ex = splits.train, splits.dev, splits.test
    check_inputs(ctx, splits.test_split, "model")  # a model fine-tuned on test rows inflates the test score
    log.info(f"prune: {describe(splits.test_split)}")
    preset = config.data.preset
    num_labels = 1 if preset.regression else len(train_ex.label_names)
    model = _load(folder, num_labels)
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if config.distill_alpha else None
    length, pad = config.data.max_length, tokenizer.pad_token_id
    enc = {name: (*encode(tokenizer, ex.texts, length), ex.labels) for name, ex in
           (("train", train_ex), ("dev", dev_ex), ("test", test_ex))}

    def evaluate(module, final: bool = True) -> dict:
        out = {}
        for split in ("dev", "test") if final else ("dev",):
            ids, types, labels = enc[split]
            preds = predictions(predict(module, ids, types, pad, config.eval_batch_size), preset.regression)
            out[split] = task_metrics.compute(list(preset.metrics), preds, labels)
        return out

    pruned, masks, history, units, counts = loop.train(config, ctx, model, teacher, enc["train"], pad, evaluate,
                                                       regression=preset.regression)
    if ctx.world.rank != 0:
        dist.barrier()  # rank 0 evaluates and writes; this rank's manifest is never written
        return ctx.manifest(config, [], {}, {})
    exported = pruned
    if units is not None:
        from kd.importance import shrink

        exported = shrink(pruned, units["heads"], units["neurons"])
    unpruned = _load(folder, num_labels).to(where)
    baseline = evaluate(unpruned)
    # The magnitude export is the last round's weights, scored at its end; a shrunk one is scored again.
    final = evaluate(exported.to(where)) if units is not None else {k: history[-1][k] for k in ("dev", "test")}
    speed = compare({"unpruned": unpruned.float(), "pruned": exported.float()}, vocab_size=tokenizer.vocab_size,
                    batch_size=config.latency_batch_size, seq_len=config.latency_seq_len, repeats=config.latency_repeats)
    sparsity = report.sparsity_record(config, masks, exported, units)
    summary = {
        "task": config.data.task, "method": config.method, "mode": config.mode, "target": config.sparsity,
        "sparsity": sparsity["sparsity"], "seed": ctx.seed,
        "test_split": describe(splits.test_split),
        "test_examples": len(test_ex), "train_examples": len(train_ex), "dev_examples": len(dev_ex), **counts,
        "dev_score": final["dev"]["score"], "test_score": final["test"]["score"],
        "unpruned_dev_score": baseline["dev"]["score"], "unpruned_test_score": baseline["test"]["score"],
        "test_share_of_unpruned": final["test"]["score"] / baseline["test"]["score"] if baseline["test"]["score"] else 0.0,
        "latency_ms": speed["pruned"]["latency_ms"], "unpruned_latency_ms": speed["unpruned"]["latency_ms"],
        "speedup": speed["unpruned"]["latency_ms"] / speed["pruned"]["latency_ms"],
        "latency_shape": [config.latency_batch_size, config.latency_seq_len],
        "params": parameter_count(exported), "unpruned_params": parameter_count(unpruned),
    }
    full = {"summary": summary, "unpruned": baseline, "final": final, "rounds": history, "sparsity": sparsity}
    log.info(f"prune: sparsity {summary['sparsity']:.3f} test {summary['test_score']:.4f} (unpruned "
             f"{summary['unpruned_test_score']:.4f}) speed-up {summary['speedup']:.2f}x")
    metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics.update({f"test_{k}": v for k, v in final["test"].items()},
                   **{f"dev_{k}": v for k, v in final["dev"].items()},
                   **{f"sparsity_layer_{e['layer']}": e["sparsity"] for e in sparsity["layers"]})
    labels = None if preset.regression else train_ex.label_names
    outputs = models.save_model(exported, tokenizer, ctx.stage_dir, labels=labels,
                                examples=[t[0] for t in dev_ex.texts[:3]], card=models.card(ctx, metrics))
    for name, text in (("sparsity.json", json.dumps(sparsity, indent=2) + "\n"),
                       ("report.json", json.dumps(full, indent=2, sort_keys=True) + "\n"),
                       ("report.md", report.markdown(full))):
        atomic_write_text(ctx.stage_dir / name, text)
        outputs.append(OutputFile.of(ctx.stage_dir, name))
    picture = report.plot(full, ctx.stage_dir / "sparsity_vs_score.png")
    outputs.append(OutputFile.of(ctx.stage_dir, picture.name))
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_artifact(picture, "plots")
    dist.barrier()
    extra = {"model_dir": models.MODEL_DIR, "report": "report.json", "sparsity": sparsity, "task": config.data.task,
             "label_names": train_ex.label_names, "num_labels": num_labels, "regression": preset.regression,
             "test_split": splits.test_split}
    return ctx.manifest(config, outputs, metrics, extra)
