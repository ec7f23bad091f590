"""The `extract` report as Markdown and as a picture: agreement and test accuracy against query budget per
generator, the independent model and the victim for reference, and the detector's ROC curve."""

from __future__ import annotations

from pathlib import Path

PLOT = "extract.png"


def fmt(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"


def markdown(report: dict) -> str:
    """report.json as a page a person reads."""
    s, ind, det = report["summary"], report["independent"], report["detector"]
    lines = [f"# Model extraction of `{s['victim']}`", "",
             f"Task `{s['task']}`, real training set {s['train_size']} examples, held-out "
             f"{s.get('test_split', 'test split')}: {s['test_size']} scored (never trained on by the victim). The deployment answers `{s['answers']}`; "
             f"{s['queries_asked']} queries asked in {s['requests']} requests.", "",
             "## Extraction", "",
             "| generator | budget | queries | agreement | test accuracy | watermarked | watermark recall | p-value | copy? |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in report["extraction"]:
        lines.append(f"| {row['generator']} | {row['budget']:g}x | {row['queries']} | {fmt(row['agreement'])} | "
                     f"{fmt(row['test_accuracy'])} | {row['watermarked_queries']} | {fmt(row['watermark_recall'])} | "
                     f"{row['watermark_p_value']:.2g} | {'yes' if row['watermark_verdict'] else 'no'} |")
    lines += ["", f"Independent model (same init, {ind['train_examples']} real labelled examples): agreement "
              f"{fmt(ind['agreement'])}, test accuracy {fmt(ind['test_accuracy'])}.",
              f"Victim: test accuracy {fmt(s['victim_test_accuracy'])}.", "",
              "## Defences", "",
              f"- Watermark: {s['watermark_fraction']:g} of queries answered with a keyed wrong label "
              f"({s['watermarked_queries']} marked). Recall on the extracted model "
              f"({s['watermark_suspect']}): {fmt(s['watermark_recall'])}; false-positive rate on the independent "
              f"model: {fmt(s['watermark_fpr'])} (chance {s['watermark_chance']:.3g}; a copy when p < "
              f"{s['watermark_alpha']:g}: extracted {'yes' if s['watermark_verdict'] else 'no'}, independent "
              f"{'yes' if ind['watermark_verdict'] else 'no'}). Cost: the deployment's "
              f"test accuracy is {fmt(s['deployed_test_accuracy'])} against the model's {fmt(s['victim_test_accuracy'])} "
              f"({fmt(s['watermark_cost'])} lost).",
              f"- Detector (logistic regression on the victim's [CLS]; fit on {det['fit']} real training + "
              f"{det['fit']} generated queries): held-out AUC {fmt(det['auc'])} over {det['held_out']} + "
              f"{det['held_out']} queries; by generator: "
              + ", ".join(f"{g} {fmt(a)}" for g, a in det["auc_by_generator"].items()) + ".",
              "", f"![extraction]({PLOT})", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path:
    """Agreement and test accuracy vs budget (one line per generator), and the detector's ROC, as one PNG."""
    from pipeline.tracking.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=100)
    s, ind = report["summary"], report["independent"]
    for generator in s["generators"]:
        rows = sorted((r for r in report["extraction"] if r["generator"] == generator), key=lambda r: r["budget"])
        budgets = [r["budget"] for r in rows]
        axes[0].plot(budgets, [r["agreement"] for r in rows], marker="o", label=generator)
        axes[1].plot(budgets, [r["test_accuracy"] for r in rows], marker="o", label=generator)
    axes[0].axhline(ind["agreement"], color="grey", linestyle="--", label="independent (real labels)")
    axes[1].axhline(ind["test_accuracy"], color="grey", linestyle="--", label="independent (real labels)")
    axes[1].axhline(s["victim_test_accuracy"], color="black", linestyle=":", label="victim")
    budgets = s["budgets"]
    for ax, what in ((axes[0], "agreement with the victim"), (axes[1], "test accuracy")):
        ax.set_xscale("log")
        ax.set_xticks(budgets, [f"{b:g}x" for b in budgets])
        ax.set_xticks([], minor=True)  # the log axis's minor labels would overlap the budgets
        ax.set_xlabel("query budget (x training set size)")
        ax.set_ylabel(what)
        ax.set_title(f"{what} vs query budget")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    roc = report["detector"]["roc"]
    axes[2].plot(roc["fpr"], roc["tpr"], label=f"AUC {report['detector']['auc']:.3f}")
    axes[2].plot([0, 1], [0, 1], color="grey", linestyle="--")
    axes[2].set_xlabel("false-positive rate (real queries flagged)")
    axes[2].set_ylabel("true-positive rate (extraction queries flagged)")
    axes[2].set_title("extraction-query detector (held out)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
