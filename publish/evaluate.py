"""`distill eval MODEL DATA`: score any classifier on any labelled file, optionally beside a teacher.

MODEL (and `--teacher`) is anything `publish.classifier.load` takes: a model folder, a stage or export
directory, `@stage` with `--run-dir`, `runs:/...` or `models:/NAME@ALIAS`. DATA is a labelled TSV/CSV/JSONL
file read as `formats.taskdata` reads the `data` section (`--task`, `--text-column`, `--label-column`,
`--metric`); its labels must be the model's label names. The result: the metrics (with `score`, per-class
precision / recall / F1, macro F1), the confusion matrix, size and CPU latency (`kd.latency`), and with a
teacher its scores, `retention` (student score / teacher score) and `speedup`. An early-exit model (a fastbert
stage) predicts and is timed through its early exit at `--speed S` (default: its saved one), both models then
timed on DATA's first rows (an early exit's cost follows the text), and adds `early_exit` (speed,
avg_exit_layer, exit_share, ...). Printed as a short table;
with `--out DIR` written as `eval.json` and `confusion_matrix.png` (`teacher_confusion_matrix.png` too).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

from formats.taskdata import TaskData, predictions, read_rows, to_examples
from kd.metrics import compute, confusion_matrix, macro_f1, per_class
from pipeline.config import ConfigError
from pipeline.manifest import atomic_write_text
from publish.classifier import Classifier, load
from publish.early_exit_classifier import check_speed

EVAL_JSON = "eval.json"
CONFUSION_PNG = "confusion_matrix.png"


def task_data(args) -> TaskData:
    """The `data` section the flags describe (DATA as its only split); a bad flag is a one-line error."""
    preset = bool(args.task and args.task != "custom")
    try:
        return TaskData(task=args.task or "custom", dev=args.data, max_length=args.max_length, limit_dev=args.limit,
                        text_columns=args.text_column or ([] if preset else ["sentence"]),
                        label_column=args.label_column or ("" if preset else "label"),
                        metrics=args.metric or ([] if preset else ["accuracy"]))
    except ValueError as err:
        raise ConfigError(f"distill eval: {err}") from None


def score(model: Classifier, data: TaskData, *, latency: dict, on_data: bool = False) -> dict:
    """One model's result on `data`: metrics, per-class scores, confusion matrix, size and CPU latency (on
    `data`'s first rows when `on_data`, else on random ids)."""
    spec, rows = read_rows(data, "dev")
    rows = rows[:data.limit_dev] if data.limit_dev else rows
    regression = data.preset.regression
    if regression != (not model.labels):
        kind = "real-valued" if regression else "class"
        raise ConfigError(f"{model.name}: {spec} has {kind} labels but the model is "
                          f"{'a classifier' if model.labels else 'a regression model'}")
    examples = to_examples(data, spec, rows, None if regression else model.labels, known_as=f"{model.name}'s labels")
    model.max_length = data.max_length
    probs, how = model.predict_report(examples.texts)
    preds = predictions(probs, regression)
    result = {"model": model.name, "examples": len(examples),
              "metrics": compute(list(data.preset.metrics), preds, examples.labels), "params": model.parameters(),
              "labels": list(model.labels), **how}
    if not regression:
        result["per_class"] = per_class(preds, examples.labels, model.labels)
        result["metrics"]["macro_f1"] = macro_f1(result["per_class"])
        result["confusion_matrix"] = confusion_matrix(preds, examples.labels, range(len(model.labels))).tolist()
    # an early exit's cost follows the text: then both models are timed on DATA's first rows, not random ids
    result["latency"] = model.latency(**latency, texts=examples.texts if on_data else None)
    return result


def evaluate(model: Classifier, data: TaskData, teacher: Classifier | None = None, *, latency: dict) -> dict:
    """The eval.json content: the model's result and, with a teacher, the teacher's, retention and speed-up."""
    if teacher is not None and teacher.labels != model.labels:
        raise ConfigError(f"--teacher {teacher.name}: its labels {teacher.labels[:5]} differ from "
                          f"{model.name}'s {model.labels[:5]}; give a teacher of the same task")
    on_data = model.cost_follows_input or bool(teacher and teacher.cost_follows_input)
    out = {"data": data.dev, "task": data.task, "student": score(model, data, latency=latency, on_data=on_data)}
    if teacher is not None:
        out["teacher"] = score(teacher, data, latency=latency, on_data=on_data)
        t, s = out["teacher"], out["student"]
        out["retention"] = s["metrics"]["score"] / t["metrics"]["score"] if t["metrics"]["score"] else 0.0
        out["speedup"] = t["latency"]["latency_ms"] / s["latency"]["latency_ms"]
    return out


def table(result: dict) -> str:
    """A short table: metrics, classes predicted, size, latency, and retention / speed-up with a teacher."""
    who = [w for w in ("student", "teacher") if w in result]
    rows = [("", *("model" if w == "student" else "teacher" for w in who))]
    first = result["student"]
    rows.append(("examples", *(str(result[w]["examples"]) for w in who)))
    rows += [(name, *(f"{result[w]['metrics'][name]:.4f}" for w in who)) for name in first["metrics"]]
    if "per_class" in first:
        rows.append(("classes predicted", *(f"{sum(1 for c in result[w]['per_class'] if c['predicted'])} of "
                                            f"{len(result[w]['per_class'])}" for w in who)))
    rows.append(("parameters", *(f"{result[w]['params'] / 1e6:.2f} M" for w in who)))
    if any("early_exit" in result[w] for w in who):
        rows.append(("avg exit layer", *(_exits(result[w].get("early_exit")) for w in who)))
    lat = first["latency"]
    shape = (f"{lat['batch_size']} data rows, <= {lat['seq_len']} tokens" if lat.get("input") == "data rows"
             else f"batch {lat['batch_size']} x {lat['seq_len']}")
    rows.append((f"CPU latency ({shape})",
                 *(_latency(result[w]["latency"]) for w in who)))
    if "teacher" in result:
        rows.append(("retention", f"{result['retention']:.1%} of teacher", ""))
        rows.append(("speed-up", f"{result['speedup']:.2f}x", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _exits(early: dict | None) -> str:
    if early is None:
        return "all layers"
    return f"{early['avg_exit_layer']:.2f} of {early['layers']} (S = {early['speed']:g})"


def _latency(lat: dict) -> str:
    exits = f" (exit at {lat['avg_exit_layer']:.2f})" if "avg_exit_layer" in lat else ""
    return f"{lat['latency_ms']:.1f} ms{exits}"


def write(result: dict, out: Path) -> list[Path]:
    """eval.json and the labelled confusion-matrix heatmap(s) in `out`; return the files written."""
    from pipeline.tracking.plots import confusion_heatmap

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for who, name in (("student", CONFUSION_PNG), ("teacher", f"teacher_{CONFUSION_PNG}")):
        if who in result and result[who].get("confusion_matrix"):
            title = f"{result[who]['model']} on {Path(result['data']).name}"
            written.append(confusion_heatmap(result[who]["confusion_matrix"], result[who]["labels"], out / name, title))
    atomic_write_text(out / EVAL_JSON, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return [out / EVAL_JSON, *written]


def main(args, store_uri: Callable[[], str]) -> int:
    """Run `distill eval` from parsed flags; `store_uri()` gives the MLflow store (asked only for MLflow URIs)."""
    check_speed(args.speed, args.model)  # before anything is downloaded or loaded
    data = task_data(args)
    if not Path(args.data).is_file() and not args.data.startswith("hf:"):
        raise ConfigError(f"{args.data}: labelled data file not found")
    latency = {"batch_size": args.latency_batch_size, "seq_len": args.latency_seq_len, "repeats": args.latency_repeats}
    run_dir = Path(args.run_dir) if args.run_dir else None
    with tempfile.TemporaryDirectory(prefix="distill-eval-") as tmp:
        def get(given: str, sub: str) -> Classifier:
            uri = store_uri() if given.startswith(("runs:/", "models:/")) else None
            model = load(given, run_dir=run_dir, store_uri=uri, workdir=Path(tmp) / sub)
            model.batch_size = args.batch_size
            return model

        model = get(args.model, "model")
        model.with_speed(args.speed)
        teacher = get(args.teacher, "teacher") if args.teacher else None
        result = evaluate(model, data, teacher, latency=latency)
    print(table(result))
    if args.out:
        for path in write(result, Path(args.out)):
            print(f"wrote {path}")
    return 0
