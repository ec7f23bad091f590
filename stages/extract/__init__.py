"""Stage `extract`: how stealable a served classifier is, and what defends it (Krishna et al. 2020).

1. Serve the victim (`mlflow models serve` on 127.0.0.1, or `victim_url`) behind the watermarking deployment
   (formats/serving.py), which answers labels only (or with the top-1 probability) and a keyed secret share
   of queries with a wrong label, journaling those.
2. Ask it queries made without its training data (kd/extraction.py: random words by corpus unigram
   frequency, corpus sentences; pairs by word replacement), as many as the largest budget, a multiple of the
   real training set's size; every answered batch is journaled (formats/answers.py), so a killed run asks
   only what it had not asked. The victim's own labels on the test set come from the model server directly.
3. Train a student from a pretrained init on each (generator, budget) prefix of the answers, and an
   independent one on real labels, through the one trainer (students.py).
4. Measure agreement and test accuracy per budget and generator, the watermark's recall on each student and
   its false-positive rate on the independent one, its cost in the deployment's accuracy, and a detector of
   extraction queries on the victim's [CLS] (AUC on held-out queries). Report: report.json/md, extract.png.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

from formats import answers as journal
from formats import models, serving
from formats.mlmodel import read_labels
from formats.taskdata import with_source
from formats.testsplit import check_inputs, describe, load_splits
from kd import defences
from kd.extraction import Vocabulary, agreement, answer_targets, budget_sizes, drop_known, queries
from pipeline import log
from pipeline.config import ConfigError
from pipeline.manifest import OutputFile, atomic_write_text
from pipeline.train import device as devices
from stages.extract import asking
from stages.extract import report as reporting
from stages.extract import students
from stages.extract.config import Config

LAUNCH = "single"
WATERMARKS = "watermark.jsonl"


def _task(config: Config, ctx, names: list[str]):
    """Train and test examples (labels as indices into the victim's label names) and the test split's
    provenance: the held-out split every task stage uses (`formats.testsplit`: data.test, or data.test_fraction
    of train carved by the run seed and removed from train), so a victim from teacher_finetune never trained on it."""
    splits = load_splits(with_source(config.data, ctx), ctx.seed)
    if config.data.preset.regression or set(splits.train.label_names) != set(names):
        raise ConfigError(f"data: task labels {splits.train.label_names} are not the victim's classes {names}; "
                          "point data at the task the victim was trained on")
    check_inputs(ctx, splits.test_split, "victim")  # a victim trained on the test rows would inflate agreement
    order = np.array([names.index(n) for n in splits.train.label_names], np.int64)
    relabel = lambda ex: dataclasses.replace(ex, labels=order[ex.labels], label_names=list(names))  # noqa: E731
    return relabel(splits.train), relabel(splits.test), splits.test_split


def _ask_all(config: Config, ctx, victim, names, sizes, vocab, sentences, test, pairs: bool):
    """Serve, ask every generator's queries through the deployment and the test set of the model server."""
    key = asking.watermark_key(config, ctx)
    asked = {}
    with asking.victim_server(config, ctx, victim) as url, \
            serving.WatermarkProxy(url, key=key, fraction=config.watermark_fraction, label_names=names,
                                   journal_path=ctx.stage_dir / WATERMARKS, answers=config.answers) as deployment:
        client = serving.Client(deployment.url, answers=config.answers, rate_limit=config.rate_limit,
                                retries=config.retries, backoff_s=config.backoff_s)
        asker = asking.Asker(config, client)
        for index, generator in enumerate(config.generators):
            texts = queries(generator, max(sizes.values()), ctx.seed * 1009 + index, vocab=vocab, sentences=sentences,
                            pairs=pairs, min_words=config.min_words, max_words=config.max_words,
                            pair_replace=config.pair_replace)
            asked[generator] = (texts, *asker.ask(ctx.stage_dir / "answers" / f"{generator}.jsonl", texts, names))
        model_client = serving.Client(url, retries=config.retries, backoff_s=config.backoff_s)
        test_labels, _ = asker.ask(ctx.stage_dir / "answers" / "test.jsonl", test.texts, names, model_client)
    return asked, test_labels, key, client.requests + model_client.requests


def _evaluate(model, tokenizer, config, device, test, victim_test, marked: dict, texts) -> dict:
    """Test accuracy, agreement with the victim, and the watermark test on the marked ones of `texts`."""
    preds = students.labels_of(model, tokenizer, test.texts, config, device)
    hits = [t for t in dict.fromkeys(texts) if t in marked]
    found = students.labels_of(model, tokenizer, hits, config, device) if hits else np.array([], np.int64)
    wanted = np.array([marked[t] for t in hits], np.int64)
    matches = int((found == wanted).sum())
    p_value = defences.watermark_p_value(matches, len(hits), model.config.num_labels)
    return {"test_accuracy": float((preds == test.labels).mean()), "agreement": agreement(preds, victim_test),
            "watermarked_queries": len(hits), "watermark_matches": matches,
            "watermark_recall": matches / len(hits) if hits else None, "watermark_p_value": p_value,
            "watermark_verdict": bool(hits) and p_value < config.watermark_alpha}


def _detector(config, ctx, victim, names, train, test, asked, device) -> dict:
    """Fit real-vs-generated on the victim's [CLS] (training texts and half the queries), AUC on the rest."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(victim))
    model = AutoModelForSequenceClassification.from_pretrained(str(victim), attn_implementation="eager")
    rng = np.random.default_rng(ctx.seed)
    per = max(1, min(config.detector_samples // 2, len(train), len(test)))
    real_fit = [train.texts[i] for i in rng.permutation(len(train))[:per]]
    real_eval = [test.texts[i] for i in rng.permutation(len(test))[:per]]
    gen_fit, gen_eval = [], {}
    for generator in config.generators:
        texts = asked[generator][0]
        order = rng.permutation(len(texts))
        half = max(1, min(per // len(config.generators), len(texts) // 2))
        gen_fit += [texts[i] for i in order[:half]]
        gen_eval[generator] = [texts[i] for i in order[half:2 * half]] or [texts[order[0]]]
    feats = lambda texts: students.cls_features(model, tokenizer, texts, config, device)  # noqa: E731
    fit_x = torch.cat([feats(real_fit), feats(gen_fit)])
    fit_y = torch.cat([torch.zeros(len(real_fit)), torch.ones(len(gen_fit))])
    score = defences.fit_logistic(fit_x, fit_y, seed=ctx.seed)
    real_scores = score(feats(real_eval)).numpy()
    by_gen = {g: score(feats(t)).numpy() for g, t in gen_eval.items()}
    all_gen = np.concatenate(list(by_gen.values()))
    scores = np.concatenate([real_scores, all_gen])
    positive = np.concatenate([np.zeros(len(real_scores), bool), np.ones(len(all_gen), bool)])
    fpr, tpr = defences.roc_curve(scores, positive)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 200)).astype(int))
    return {"auc": defences.roc_auc(scores, positive), "fit": len(real_fit), "held_out": len(real_scores),
            "auc_by_generator": {g: defences.roc_auc(np.concatenate([real_scores, s]),
                                                     np.r_[np.zeros(len(real_scores), bool), np.ones(len(s), bool)])
                                 for g, s in by_gen.items()},
            "roc": {"fpr": fpr[keep].round(4).tolist(), "tpr": tpr[keep].round(4).tolist()}}


def run(config: Config, ctx):
    """Serve and ask the victim, train students on its answers, measure extraction and defences, report."""
    from transformers import AutoTokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    device = devices.resolve(config.device, ctx.world)
    torch.manual_seed(ctx.seed)
    victim = models.upstream_model(ctx, config.victim, config.victim_path, role="victim")
    names = read_labels(victim)
    if len(names) < 2:
        raise ConfigError(f"{victim}: the victim has no class labels (id2label); extraction needs a classifier")
    train, test, test_split = _task(config, ctx, names)
    log.info(f"extract: {describe(test_split)}")
    init = models.upstream_model(ctx, config.student, None if config.student else config.student_path, role="student")
    tokenizer = AutoTokenizer.from_pretrained(str(init))
    task_texts = [part for t in train.texts + test.texts for part in t]
    sentences = drop_known(asking.corpus_sentences(config, ctx), task_texts)
    if not sentences:
        raise ConfigError("corpus: every sentence is a task example; extraction queries need other text")
    vocab = Vocabulary.from_texts(sentences, config.vocab_size)
    sizes = budget_sizes(config.budgets, len(train))
    pairs = len(train.texts[0]) > 1
    asked, victim_test, key, requests = _ask_all(config, ctx, victim, names, sizes, vocab, sentences, test, pairs)
    marked = {tuple(r["text"]): names.index(r["label"]) for r in journal.read(ctx.stage_dir / WATERMARKS)}
    rows, offset, chosen = [], 0, (config.generators[0], max(config.budgets))
    for index, generator in enumerate(config.generators):
        texts, labels, scores = asked[generator]
        for budget in sorted(config.budgets):
            name, n = f"{generator}-{budget:g}x", sizes[budget]
            result = students.finished(ctx, name)
            if result is None:
                targets = answer_targets(labels[:n], None if scores is None else scores[:n], len(names))
                model, steps = students.train(config, ctx, name, init, tokenizer, texts[:n], targets, names,
                                              seed=ctx.seed * 7919 + len(rows) * 101, step_offset=offset)
                result = {"generator": generator, "budget": budget, "queries": n, "steps": steps,
                          **_evaluate(model, tokenizer, config, device, test, victim_test, marked, texts[:n])}
                if (generator, budget) == chosen:
                    models.save_model(model, tokenizer, ctx.stage_dir, labels=names, examples=[t[0] for t in texts[:3]])
                students.save_result(ctx, name, result)
            log.info(f"extract: {name}: agreement {result['agreement']:.4f} test {result['test_accuracy']:.4f} "
                     f"watermark recall {reporting.fmt(result['watermark_recall'])}")
            rows.append(result)
            offset += result["steps"]
    independent = students.finished(ctx, "independent")
    if independent is None:
        n = min(len(train), max(sizes.values()))
        model, steps = students.train(config, ctx, "independent", init, tokenizer, train.texts[:n],
                                      answer_targets(train.labels[:n], None, len(names)), names,
                                      seed=ctx.seed * 7919 + 97, step_offset=offset)
        independent = {"train_examples": n, "steps": steps,
                       **_evaluate(model, tokenizer, config, device, test, victim_test, marked, list(marked))}
        students.save_result(ctx, "independent", independent)
    detector = _detector(config, ctx, victim, names, train, test, asked, device)
    deployed = defences.deployed_labels(key, test.texts, victim_test, config.watermark_fraction, len(names))
    suspect = next(r for r in rows if (r["generator"], r["budget"]) == chosen)
    summary = {
        "task": config.data.task, "victim": config.victim or config.victim_path, "answers": config.answers,
        "train_size": len(train), "test_size": len(test), "test_split": describe(test_split), "generators": list(config.generators),
        "budgets": sorted(config.budgets), "queries_asked": sum(len(a[0]) for a in asked.values()) + len(test),
        "requests": requests, "watermark_fraction": config.watermark_fraction, "watermarked_queries": len(marked),
        "watermark_alpha": config.watermark_alpha, "watermark_chance": defences.chance_match(len(names)),
        "watermark_suspect": f"{chosen[0]}-{chosen[1]:g}x",
        "victim_test_accuracy": float((victim_test == test.labels).mean()),
        "deployed_test_accuracy": float((deployed == test.labels).mean()),
        "watermark_recall": suspect["watermark_recall"], "watermark_fpr": independent["watermark_recall"],
        "watermark_verdict": suspect["watermark_verdict"],
        "detector_auc": detector["auc"]}
    summary["watermark_cost"] = summary["victim_test_accuracy"] - summary["deployed_test_accuracy"]
    return _write(config, ctx, {"summary": summary, "extraction": rows, "independent": independent,
                                "detector": detector}, test_split)


def _write(config: Config, ctx, report: dict, test_split: dict):
    """report.json/md and the plot (logged to MLflow beside the metrics), then the manifest."""
    s = report["summary"]
    atomic_write_text(ctx.stage_dir / "report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    atomic_write_text(ctx.stage_dir / "report.md", reporting.markdown(report))
    reporting.plot(report, ctx.stage_dir / reporting.PLOT)
    metrics = {k: v for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
    for row in report["extraction"]:
        tag = f"{row['generator']}_{row['budget']:g}x"
        metrics.update({f"{tag}_agreement": row["agreement"], f"{tag}_test_accuracy": row["test_accuracy"]})
        if row["watermark_recall"] is not None:
            metrics[f"{tag}_watermark_recall"] = row["watermark_recall"]
    metrics.update(independent_agreement=report["independent"]["agreement"],
                   independent_test_accuracy=report["independent"]["test_accuracy"])
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_artifact(ctx.stage_dir / reporting.PLOT, "plots")
    log.info(f"extract: detector AUC {s['detector_auc']:.3f}, watermark recall {reporting.fmt(s['watermark_recall'])} "
             f"fpr {reporting.fmt(s['watermark_fpr'])} cost {s['watermark_cost']:.4f}")
    outputs = models.model_outputs(ctx.stage_dir) + [
        OutputFile.of(ctx.stage_dir, name) for name in ("report.json", "report.md", reporting.PLOT, WATERMARKS)
        if (ctx.stage_dir / name).is_file()]
    outputs += [OutputFile.of(ctx.stage_dir, p.relative_to(ctx.stage_dir), lines=len(journal.read(p)))
                for p in sorted((ctx.stage_dir / "answers").glob("*.jsonl"))]
    return ctx.manifest(config, outputs, metrics, {"model_dir": models.MODEL_DIR, "report": "report.json",
                                                   "label_names": list(read_labels(ctx.stage_dir / models.MODEL_DIR)),
                                                   "test_split": test_split})
