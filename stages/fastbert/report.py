"""The `fastbert` stage's report: the full model and early exit at every speed threshold S, side by side.

Per S, on the held-out test split: accuracy, average layers run, the share of samples exiting at each layer,
and measured CPU latency (ms per example over the first `latency_examples` test rows in length-sorted batches
of `eval_batch_size`, median of `latency_repeats` passes, the full model timed in the same rounds so machine
noise hits both alike). The headline figure is the speed-up that costs at most `max_drop` accuracy points:
its S is the largest whose *dev* accuracy is within `max_drop` of the full model's (so nothing is chosen on
test), and the figure is that S's measured speed-up and test accuracy.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from formats.taskdata import encode, predict
from kd.metrics import accuracy
from pipeline.tracking.plots import _pyplot


def _scores(model, texts, labels, speed: float | None, batch_size: int, max_length: int) -> dict:
    """Accuracy, average layers and exits per layer of the full model (speed None) or early exit at `speed`."""
    ids, types = encode(model.tokenizer, texts, max_length)
    if speed is None:
        logits = predict(model.classifier, ids, types, model.tokenizer.pad_token_id, batch_size)
        layers = np.full(len(ids), model.layers)
    else:
        logits, layers = model.predict(ids, types, speed, batch_size)
    exits = np.bincount(layers, minlength=model.layers + 1)[1:] / max(len(layers), 1)
    return {"accuracy": accuracy(logits.argmax(1), labels), "avg_layers": float(layers.mean()),
            "exit_share": [float(x) for x in exits]}


def _latency(model, texts, speeds: list[float], config) -> tuple[float, list[float]]:
    """ms per example of the full model and of each S, timed in interleaved rounds (median over rounds)."""
    ids, types = encode(model.tokenizer, texts[:config.latency_examples], config.data.max_length)
    pad, size = model.tokenizer.pad_token_id, config.eval_batch_size
    runs = [lambda: predict(model.classifier, ids, types, pad, size)]
    runs += [lambda s=s: model.predict(ids, types, s, size) for s in speeds]
    for run in runs:  # warm-up: first-call allocations stay out of the timings
        run()
    times = [[] for _ in runs]
    for _ in range(config.latency_repeats):
        for spent, run in zip(times, runs):
            start = time.perf_counter()
            run()
            spent.append(time.perf_counter() - start)
    per = [1000 * statistics.median(t) / len(ids) for t in times]
    return per[0], per[1:]


def build(config, model, test: tuple, dev: tuple) -> dict:
    """The report dict: summary, the full model's row, and one row per speed threshold."""
    length, size = config.data.max_length, config.eval_batch_size
    full_test, full_dev = _scores(model, *test, None, size, length), _scores(model, *dev, None, size, length)
    full_ms, grid_ms = _latency(model, test[0], config.speeds, config)
    teacher = {"test_accuracy": full_test["accuracy"], "dev_accuracy": full_dev["accuracy"],
               "avg_layers": float(model.layers), "ms_per_example": full_ms}
    grid = []
    for speed, ms in zip(config.speeds, grid_ms):
        on_test, on_dev = _scores(model, *test, speed, size, length), _scores(model, *dev, speed, size, length)
        grid.append({"speed": speed, "test_accuracy": on_test["accuracy"], "dev_accuracy": on_dev["accuracy"],
                     "avg_layers": on_test["avg_layers"], "dev_avg_layers": on_dev["avg_layers"],
                     "layer_speedup": model.layers / on_test["avg_layers"], "exit_share": on_test["exit_share"],
                     "ms_per_example": ms, "speedup": full_ms / ms,
                     "drop_points": 100 * (teacher["test_accuracy"] - on_test["accuracy"])})
    floor = teacher["dev_accuracy"] - config.max_drop / 100 - 1e-12
    within = [row for row in grid if row["dev_accuracy"] >= floor]
    chosen = max(within, key=lambda row: row["speed"]) if within else None
    summary = {"layers": model.layers, "test_examples": len(test[0]), "dev_examples": len(dev[0]),
               "max_drop": config.max_drop,
               "latency_examples": min(config.latency_examples, len(test[0])),
               "latency_repeats": config.latency_repeats, "batch_size": size,
               "chosen_speed": chosen["speed"] if chosen else 0.0,
               "speedup_at_max_drop": chosen["speedup"] if chosen else 1.0,
               "layer_speedup_at_max_drop": chosen["layer_speedup"] if chosen else 1.0,
               "test_drop_at_chosen": chosen["drop_points"] if chosen else 0.0}
    return {"summary": summary, "teacher": teacher, "grid": grid}


def metrics(report: dict) -> dict:
    """The manifest's (and MLflow's) flat numbers."""
    s, t = report["summary"], report["teacher"]
    return {"teacher_test_accuracy": t["test_accuracy"], "teacher_dev_accuracy": t["dev_accuracy"],
            "teacher_ms_per_example": t["ms_per_example"], "chosen_speed": s["chosen_speed"],
            "speedup_at_max_drop": s["speedup_at_max_drop"], "layer_speedup_at_max_drop": s["layer_speedup_at_max_drop"],
            "test_drop_at_chosen": s["test_drop_at_chosen"], "steps": s.get("steps", 0),
            "resumed_from_step": s.get("resumed_from_step", 0),
            "train_texts": s.get("train_texts", 0), "test_examples": s["test_examples"]}


def markdown(report: dict) -> str:
    """The table a person reads: full model, then each S."""
    s, t = report["summary"], report["teacher"]
    lines = [f"# FastBERT early exit: {s.get('task', '')}", "",
             f"Held-out {s.get('test_split', 'test split')}: {s['test_examples']} rows scored; latency on "
             f"{s['latency_examples']} of them, "
             f"batch {s['batch_size']}, CPU, median of {s['latency_repeats']}.", "",
             "| model | S | test acc | dev acc | avg layers | ms / example | speed-up (measured) | speed-up (layers) |",
             "|---|---|---|---|---|---|---|---|",
             f"| full model | - | {100 * t['test_accuracy']:.2f} | {100 * t['dev_accuracy']:.2f} | {t['avg_layers']:.2f} | "
             f"{t['ms_per_example']:.3f} | 1.00x | 1.00x |"]
    lines += [f"| early exit | {r['speed']:.2f} | {100 * r['test_accuracy']:.2f} | {100 * r['dev_accuracy']:.2f} | "
              f"{r['avg_layers']:.2f} | {r['ms_per_example']:.3f} | {r['speedup']:.2f}x | {r['layer_speedup']:.2f}x |"
              for r in report["grid"]]
    lines += ["", f"**Speed-up at <= {s['max_drop']:g} point(s) accuracy drop: {s['speedup_at_max_drop']:.2f}x measured "
              f"({s['layer_speedup_at_max_drop']:.2f}x in layers) at S = {s['chosen_speed']:g}** (S chosen on dev; "
              f"test drop {s['test_drop_at_chosen']:+.2f} points).", ""]
    return "\n".join(lines)


def plot(report: dict, path) -> None:
    """Accuracy against measured speed-up (each S labelled), and layers and latency against S."""
    plt = _pyplot()
    s, t, grid = report["summary"], report["teacher"], report["grid"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    left.plot([r["speedup"] for r in grid], [100 * r["test_accuracy"] for r in grid], "o-", label="early exit (measured)")
    left.plot([r["layer_speedup"] for r in grid], [100 * r["test_accuracy"] for r in grid], "o--", mfc="none",
              color="tab:gray", label="early exit (layers: L / avg layers)")
    for r in grid:
        left.annotate(f"S={r['speed']:g}", (r["speedup"], 100 * r["test_accuracy"]), fontsize=7,
                      textcoords="offset points", xytext=(3, 3))
    left.plot([1.0], [100 * t["test_accuracy"]], "k*", markersize=12, label="full model")
    left.axhline(100 * t["test_accuracy"] - s["max_drop"], color="tab:red", ls="--", lw=1,
                 label=f"full model - {s['max_drop']:g} pt")
    left.set_xlabel("speed-up over the full model (x)")
    left.set_ylabel("test accuracy (%)")
    left.set_title("accuracy vs speed")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    speeds = [r["speed"] for r in grid]
    right.plot(speeds, [r["avg_layers"] for r in grid], "o-", color="tab:green", label="avg layers")
    right.set_xlabel("speed threshold S")
    right.set_ylabel("average layers run", color="tab:green")
    twin = right.twinx()
    twin.plot(speeds, [r["ms_per_example"] for r in grid], "s--", color="tab:orange", label="ms / example")
    twin.axhline(t["ms_per_example"], color="tab:orange", ls=":", lw=1)
    twin.set_ylabel("ms / example (dotted: full model)", color="tab:orange")
    right.set_title("layers and latency vs S")
    right.grid(alpha=0.3)
    fig.suptitle(f"FastBERT early exit ({s.get('task', '')}, {s['test_examples']} test rows)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def track(ctx, report: dict) -> None:
    """Each S as one step of the `grid/` metrics (step = round(100 S)); the report files as artifacts."""
    for row in report["grid"]:
        ctx.tracker.log_metrics({f"grid/{k}": row[k] for k in ("test_accuracy", "dev_accuracy", "avg_layers",
                                                              "ms_per_example", "speedup")}, round(100 * row["speed"]))
    for name in ("report.json", "report.md", "report.png"):
        ctx.tracker.log_artifact(ctx.stage_dir / name, "report")
