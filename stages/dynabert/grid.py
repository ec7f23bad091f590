"""The `dynabert` stage's grid report: every (width, depth) sub-network's dev and test scores, parameters and
CPU latency, as report.json, report.md and a labelled PNG; and the smallest sub-network within `tolerance`.

Two sizes per sub-network, because plain BERT cannot hold fewer heads at an unchanged hidden size
(`kd.importance`): `params` / `latency_ms` are the sub-network as DynaBERT runs it (sliced weights, real
smaller matrices everywhere), `export_params` / `export_latency_ms` the plain Hugging Face folder `distill
export --width W --depth D` writes (FFN and layers cut, dropped heads zeroed in place).
"""

from __future__ import annotations

from pathlib import Path

from formats.taskdata import predict, predictions
from kd import dynabert
from kd.latency import compare, parameter_count
from kd.metrics import compute

PLOT = "grid.png"


def key(width: float, depth: float) -> str:
    """The grid row's name, e.g. `w0.5_d0.75` (also the MLflow metric prefix)."""
    return f"w{width:g}_d{depth:g}"


def _scores(model, enc, preset, batch_size: int, pad_id: int) -> dict:
    ids, types, labels = enc
    preds = predictions(predict(model, ids, types, pad_id, batch_size), preset.regression)
    return compute(list(preset.metrics), preds, labels)


def evaluate(config, student, teacher, dev_enc, test_enc, preset, pad_id: int, vocab_size: int) -> dict:
    """{rows: [...], teacher: {...}, smallest_within: {...}} over the grid of `config` (CPU latency)."""
    grid = [(w, d) for d in sorted(config.depths, reverse=True) for w in sorted(config.widths, reverse=True)]
    subs = {key(w, d): dynabert.SubNetwork(student, w, d) for w, d in grid}
    cuts = {key(w, d): dynabert.cut(student, w, d).eval() for w, d in grid}
    rows = []
    for w, d in grid:
        name = key(w, d)
        rows.append({"width": w, "depth": d, "layers": len(dynabert.kept_layers(student.config.num_hidden_layers, d)),
                     "dev": _scores(subs[name], dev_enc, preset, config.eval_batch_size, pad_id),
                     "test": _scores(subs[name], test_enc, preset, config.eval_batch_size, pad_id),
                     "params": dynabert.active_parameters(student, w, d), "export_params": parameter_count(cuts[name])})
    teacher_row = {"dev": _scores(teacher, dev_enc, preset, config.eval_batch_size, pad_id),
                   "test": _scores(teacher, test_enc, preset, config.eval_batch_size, pad_id),
                   "params": parameter_count(teacher)}
    shape = dict(vocab_size=vocab_size, batch_size=config.latency_batch_size, seq_len=config.latency_seq_len,
                 repeats=config.latency_repeats)
    speed = compare({"teacher": teacher.float(), **{n: s.float() for n, s in subs.items()},
                     **{f"export:{n}": c for n, c in cuts.items()}}, **shape)
    for row in rows:
        row["latency_ms"] = speed[key(row["width"], row["depth"])]["latency_ms"]
        row["export_latency_ms"] = speed[f"export:{key(row['width'], row['depth'])}"]["latency_ms"]
    teacher_row["latency_ms"] = speed["teacher"]["latency_ms"]
    return {"rows": rows, "teacher": teacher_row, "smallest_within": smallest_within(rows, config.tolerance),
            "latency_shape": [config.latency_batch_size, config.latency_seq_len], "tolerance": config.tolerance}


def smallest_within(rows: list[dict], tolerance: float) -> dict:
    """The sub-network with the fewest parameters whose DEV score is within `tolerance` of the full model's
    (chosen on dev, so its test score is an unselected estimate), with both scores beside the full model's."""
    full = next(r for r in rows if r["width"] == 1.0 and r["depth"] == 1.0)
    ok = [r for r in rows if r["dev"]["score"] >= full["dev"]["score"] - tolerance]
    best = min(ok, key=lambda r: (r["params"], r["latency_ms"]))
    return {"width": best["width"], "depth": best["depth"], "params": best["params"],
            "params_share": best["params"] / full["params"], "speedup": full["latency_ms"] / best["latency_ms"],
            "dev_score": best["dev"]["score"], "test_score": best["test"]["score"],
            "full_dev_score": full["dev"]["score"], "full_test_score": full["test"]["score"], "chosen_on": "dev"}


def markdown(report: dict) -> str:
    """report.md: the grid table, the teacher, and the headline figure."""
    t, s = report["teacher"], report["smallest_within"]
    b, seq = report["latency_shape"]
    lines = ["# DynaBERT grid", "",
             f"Held-out {report.get('test_split', 'test split')}: {report['test_examples']} rows scored.", "",
             f"CPU latency per batch of {b} x {seq} tokens (median); params and latency of the sliced sub-network, "
             "export_* of the plain Hugging Face folder `distill export` writes (dropped heads zeroed in place).", "",
             "| width | depth | layers | dev | test | params | latency ms | export params | export latency ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['width']:g} | {r['depth']:g} | {r['layers']} | {r['dev']['score']:.4f} | "
                     f"{r['test']['score']:.4f} | {r['params']:,} | {r['latency_ms']:.1f} | {r['export_params']:,} | "
                     f"{r['export_latency_ms']:.1f} |")
    lines += ["", f"Teacher: dev {t['dev']['score']:.4f}, test {t['test']['score']:.4f}, {t['params']:,} params, "
              f"{t['latency_ms']:.1f} ms.", "",
              f"Smallest sub-network within {100 * report['tolerance']:g} point(s) of the full model (chosen on dev): "
              f"width {s['width']:g}, depth {s['depth']:g}: {s['params']:,} params ({100 * s['params_share']:.1f}%), "
              f"{s['speedup']:.2f}x faster; test {s['test_score']:.4f} vs full {s['full_test_score']:.4f} "
              f"(dev {s['dev_score']:.4f} vs {s['full_dev_score']:.4f}).", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    """Test score against parameters and against CPU latency, one line per depth, points labelled by width."""
    from pipeline.tracking.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    depths = sorted({r["depth"] for r in report["rows"]}, reverse=True)
    for depth in depths:
        rows = sorted((r for r in report["rows"] if r["depth"] == depth), key=lambda r: r["params"])
        for ax, field, scale in ((axes[0], "params", 1e6), (axes[1], "latency_ms", 1.0)):
            xs = [r[field] / scale for r in rows]
            ax.plot(xs, [r["test"]["score"] for r in rows], marker="o", label=f"depth {depth:g}")
            for x, r in zip(xs, rows):
                ax.annotate(f"w{r['width']:g}", (x, r["test"]["score"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    teacher = report["teacher"]
    axes[0].axhline(teacher["test"]["score"], color="gray", ls="--", label="teacher")
    axes[1].axhline(teacher["test"]["score"], color="gray", ls="--", label="teacher")
    axes[0].set_xlabel("parameters (millions)")
    axes[1].set_xlabel(f"CPU latency per batch (ms, {report['latency_shape'][0]} x {report['latency_shape'][1]})")
    for ax in axes:
        ax.set_ylabel("test score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("DynaBERT sub-networks: test score vs size and speed")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
