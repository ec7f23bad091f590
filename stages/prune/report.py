"""The `prune` stage's outputs besides the model: sparsity per layer, the report (JSON, Markdown) and its plot."""

from __future__ import annotations

from pathlib import Path

import torch

from kd import pruning


def sparsity_record(config, masks: dict, exported: torch.nn.Module, units: dict | None) -> dict:
    """What `sparsity.json` says: the target, the share pruned overall and per encoder layer (from the masks),
    the zeros measured in the exported weights (magnitude) or the kept heads, neurons and matrix shapes
    (structured)."""
    planned = pruning.layer_sparsity(masks)
    measured = pruning.zeros_per_layer(exported.state_dict())
    layers = []
    for layer, share in planned.items():
        entry = {"layer": layer, "sparsity": share}
        if units is None:
            entry["zeros"] = measured[layer]
        else:
            block = exported.base_model.encoder.layer[layer]
            entry.update(heads=units["heads"][layer], neurons=len(units["neurons"][layer]),
                         shapes={name: list(p.shape) for name, p in block.named_parameters()
                                 if name.endswith("dense.weight")})
        layers.append(entry)
    return {"method": config.method, "scope": config.scope, "mode": config.mode, "target": config.sparsity,
            "sparsity": pruning.sparsity_of(masks), "tensors": "encoder Linear weights (query, key, value, "
            "attention output, intermediate, output dense of every layer)", "layers": layers}


def markdown(report: dict) -> str:
    """The report as a page: sparsity vs score per round, the unpruned baseline, speed."""
    s, base = report["summary"], report["unpruned"]
    lines = [f"# Pruning report: {s['task']} ({s['method']}, {s['mode']}, target {s['target']:.0%})", "",
             f"Held-out {s['test_split']}: {s['test_examples']} examples scored; "
             "dev is what choices are made on.", "",
             "| round | sparsity | dev score | test score |", "|---:|---:|---:|---:|",
             f"| unpruned | 0.000 | {base['dev']['score']:.4f} | {base['test']['score']:.4f} |"]
    for row in report["rounds"]:
        lines.append(f"| {row['round']} | {row['sparsity']:.3f} | {row['dev']['score']:.4f} | {row['test']['score']:.4f} |")
    lines += ["", f"Pruned test score {s['test_score']:.4f} = {s['test_share_of_unpruned']:.3f} of the unpruned "
              f"{base['test']['score']:.4f}.", "",
              f"CPU latency at batch {s['latency_shape'][0]} x {s['latency_shape'][1]} tokens: unpruned "
              f"{s['unpruned_latency_ms']:.1f} ms, pruned {s['latency_ms']:.1f} ms, speed-up {s['speedup']:.2f}x "
              f"({'smaller matrices' if s['method'] == 'structured' else 'zeros in dense matrices: no speed-up expected'}); "
              f"parameters {s['unpruned_params']} -> {s['params']}.", "", "## Sparsity per layer", "",
              "| layer | sparsity |", "|---:|---:|"]
    lines += [f"| {e['layer']} | {e['sparsity']:.3f} |" for e in report["sparsity"]["layers"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path:
    """Dev and test score against sparsity, the unpruned model at 0."""
    from pipeline.tracking.plots import _pyplot

    plt = _pyplot()
    rows = [{"sparsity": 0.0, **report["unpruned"]}] + report["rounds"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for split, style in (("test", "o-"), ("dev", "s--")):
        ax.plot([r["sparsity"] for r in rows], [r[split]["score"] for r in rows], style, label=split)
    s = report["summary"]
    ax.set_xlabel("sparsity (share of encoder Linear weights pruned)")
    ax.set_ylabel("score")
    ax.set_title(f"{s['task']}: {s['method']} pruning, {s['mode']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
