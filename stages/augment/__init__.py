"""Stage `augment`: TinyBERT data augmentation of a task's training set, plus the teacher's outputs over it.

The training set is cut into chunks of `chunk_size` sentences; array workers take chunks round-robin and
each chunk becomes `part-NNNNN.jsonl` (one augmented example a line: id of the source row, texts, label).
With a `teacher` the stage also caches the fine-tuned teacher's class logits (and optionally its [CLS]
state after every layer) per chunk in `logits-NNNNN.safetensors`, with provenance (teacher weights,
tokenizer and augmented-data hashes) in the manifest, so every student and every epoch reads the teacher
from disk instead of running it. A chunk file exists only when complete, so a rerun redoes only missing
chunks; the worker that finds every chunk present writes the manifest. For sentence pairs, the first
text is augmented and the second kept, as in TinyBERT's script.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from formats import augmented, models
from formats.taskdata import encode, pad_batch, with_source
from formats.testsplit import load_train
from kd import teachers
from kd.augmentation import GloveTable, augment_sentences, banned_token_mask
from pipeline import log
from pipeline.assets import resolve_asset
from pipeline.manifest import OutputFile

LAUNCH = "array"


from stages.augment.config import Config


def _chunk_texts(config: Config, train, chunk: int) -> tuple[list[tuple[str, ...]], np.ndarray, int]:
    start = chunk * config.chunk_size
    end = min(start + config.chunk_size, len(train))
    return train.texts[start:end], train.labels[start:end], start


def _write_part(config: Config, ctx, chunk: int, train, tokenizer, mlm, glove, banned) -> int:
    texts, labels, start = _chunk_texts(config, train, chunk)
    variants = augment_sentences(
        [t[0] for t in texts], tokenizer, mlm, glove, n_aug=config.n_aug, p_t=config.p_t, top_k=config.top_k,
        max_length=config.data.max_length, batch_size=config.batch_size, seed=ctx.seed,
        banned=banned, keep_original=config.keep_original, first_index=start, device=next(mlm.parameters()).device)
    rows = [{"id": start + offset, "text": [v, *orig[1:]], "label": label.item()}
            for offset, (orig, label, vs) in enumerate(zip(texts, labels, variants)) for v in vs]
    augmented.write_part(ctx.stage_dir, chunk, rows)
    return len(rows)


@torch.no_grad()
def teacher_outputs(model, ids, types, pad_id: int, batch_size: int, with_cls: bool) -> dict[str, torch.Tensor]:
    """Class logits [N, C] and optionally [CLS] states [L+1, N, H] of a classifier over encoded examples."""
    model.eval()
    device = next(model.parameters()).device
    logits, cls = [], []
    for start in log.progress(range(0, len(ids), batch_size), desc="augment teacher", unit="batch"):
        batch = pad_batch(ids[start : start + batch_size], types[start : start + batch_size], pad_id)
        out = model(**{k: v.to(device) for k, v in batch.items()}, output_hidden_states=with_cls)
        logits.append(out.logits.float().cpu())
        if with_cls:
            cls.append(torch.stack([h[:, 0] for h in out.hidden_states]).float().cpu())
    result = {"logits": torch.cat(logits)}
    if with_cls:
        result["cls"] = torch.cat(cls, dim=1)
    return result


def _write_logits(config: Config, ctx, chunk: int, teacher, tokenizer) -> None:
    texts, _ = augmented.read_part(ctx.stage_dir / augmented.part_name(chunk))
    ids, types = encode(tokenizer, texts, config.data.max_length)
    tensors = teacher_outputs(teacher, ids, types, tokenizer.pad_token_id, config.batch_size, config.cache_cls)
    augmented.write_logits(ctx.stage_dir, chunk, tensors)


def run(config: Config, ctx):
    """Augment this worker's chunks (and score them with the teacher); the worker that finishes last writes the manifest."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    device = teachers.pick_device(config.device, ctx.world)  # cuda:LOCAL_RANK; a missing GPU fails here
    # The train file without the task's test split (the same seed's carve), so no test row is augmented.
    train, test_split = load_train(with_source(config.data, ctx), ctx.seed)
    chunks = -(-len(train) // config.chunk_size)
    mine = [c for c in range(chunks) if c % ctx.world.num_workers == ctx.world.worker]
    mlm_dir = resolve_asset(config.mlm_path)
    tokenizer = AutoTokenizer.from_pretrained(str(mlm_dir))
    teacher_folder = models.upstream_model(ctx, config.teacher, config.teacher_path) if (config.teacher or config.teacher_path) else None
    if teacher_folder is not None:
        from formats.taskdata import check_same_vocab

        check_same_vocab(AutoTokenizer.from_pretrained(str(teacher_folder)), tokenizer, f"mlm_path {config.mlm_path}")
    todo = [c for c in mine if not (ctx.stage_dir / augmented.part_name(c)).is_file()]
    started, made = time.perf_counter(), 0
    if todo:
        mlm = AutoModelForMaskedLM.from_pretrained(str(mlm_dir)).eval().to(device)
        glove, banned = GloveTable.load(resolve_asset(config.glove_path)), banned_token_mask(tokenizer)
        for c in log.progress(todo, desc="augment", unit="chunk"):
            made += _write_part(config, ctx, c, train, tokenizer, mlm, glove, banned)
            log.info(f"augment: chunk {c + 1}/{chunks} done")
    seconds = time.perf_counter() - started
    sentences = sum(len(_chunk_texts(config, train, c)[0]) for c in todo)
    if teacher_folder is not None:
        from transformers import AutoModelForSequenceClassification

        left = [c for c in mine if not (ctx.stage_dir / augmented.logits_name(c)).is_file()]
        if left:
            teacher = AutoModelForSequenceClassification.from_pretrained(str(teacher_folder)).to(device)
            for c in left:
                _write_logits(config, ctx, c, teacher, tokenizer)
    if todo:
        ctx.tracker.log_metrics({"augment_sentences_per_s": sentences / max(seconds, 1e-9)})
    names = [augmented.part_name(c) for c in range(chunks)]
    if teacher_folder is not None:
        names += [augmented.logits_name(c) for c in range(chunks)]
    if not all((ctx.stage_dir / n).is_file() for n in names):
        return None
    counts = {c: sum(1 for _ in open(ctx.stage_dir / augmented.part_name(c))) for c in range(chunks)}
    outputs = [OutputFile.of(ctx.stage_dir, augmented.part_name(c), samples=counts[c]) for c in range(chunks)]
    extra = {"chunks": chunks, "label_names": train.label_names, "source_sentences": len(train),
             "test_split": test_split, "has_teacher_outputs": teacher_folder is not None,
             "has_cls": bool(teacher_folder and config.cache_cls)}
    if teacher_folder is not None:
        outputs += [OutputFile.of(ctx.stage_dir, augmented.logits_name(c)) for c in range(chunks)]
        extra["provenance"] = augmented.provenance(teacher_folder, [o.sha256 for o in outputs if o.path.startswith("part-")])
    metrics = {"examples": sum(counts.values()), "source_sentences": len(train),
               "variants_per_sentence": sum(counts.values()) / max(len(train), 1)}
    if todo:
        metrics["sentences_per_s_this_worker"] = sentences / max(seconds, 1e-9)
    return ctx.manifest(config, outputs, metrics, extra)


verify = augmented.verify
"""`distill verify` re-reads every chunk and checks the cached logits cover its rows."""
