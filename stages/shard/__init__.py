"""Stage `shard`: raw text to tokenized, packed webdataset shards, split deterministically across workers.

Work split (see scan.py): the input is cut into pieces (files, byte ranges of plain text, parquet row
groups) that do not depend on the worker count; worker w scans pieces w, w + n, ... once (clean, hash, keep
the texts under `.scan/`), one worker dedups over the digests a bucket at a time, and every worker then cuts
each split's surviving documents, in input order, into blocks of `docs_per_shard`; block k becomes shard k,
written by the worker that scanned the piece where the block starts. A shard is a function of its block
alone, so the output is byte-identical for any worker count and any number of interruptions. Start order is
free: a worker scans the pieces of workers that have not started yet and waits only for those that have.
Packing happens within a block: the last sequence of a shard may be shorter than `max_seq_len` (that is the documented boundary; no token is dropped), and shards hold a fixed
number of documents, so their sample counts differ slightly (each is recorded in the manifest).
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from pathlib import Path

import numpy as np

from formats.corpus import write_shard
from formats.tokenizer import load_tokenizer_from, save_tokenizer_dir, tokenizer_sha256
from pipeline import log
from pipeline.assets import resolve_asset
from pipeline.config import ConfigError
from pipeline.manifest import MANIFEST, ManifestError, OutputFile, atomic_write_text, sha256_file
from pipeline.runner import exclusive_lock
from stages.shard import scan
from stages.shard.packing import pack_pairs, pack_plain
from stages.shard.sources import CleaningStats, documents, expand_inputs, plan_pieces
from stages.shard.tokenizer import train_sentencepiece

LAUNCH = "array"
TOKENIZER_DIR = "tokenizer"
DONE_DIR = ".done"
"""Per-shard completion records (counts and sha256), written after the shard is renamed into place."""
SPLITS = ("train", "valid")


from stages.shard.config import Config


def _documents(config: Config, files: list[Path], stats: CleaningStats | None = None):
    docs = documents(files, text_field=config.text_field, separator=config.doc_separator,
                     normalize=config.normalize, max_doc_chars=config.max_doc_chars, dedup=config.dedup,
                     valid_fraction=config.valid_fraction, stats=stats)
    return itertools.islice(docs, config.max_docs)


def _input_files(config: Config, ctx) -> list[Path]:
    """The input files, relative to the upstream `source` stage's folder when one is given."""
    if config.source is None:
        return expand_inputs(config.inputs)
    base = ctx.input_dir("source")
    return expand_inputs([str(base / pattern) for pattern in config.inputs])


def prepare_tokenizer(config: Config, ctx, files: list[Path]):
    """Load (or train) the tokenizer; the first worker to get here writes `tokenizer/`; return it loaded."""
    target = ctx.stage_dir / TOKENIZER_DIR
    # Whichever worker gets the lock first prepares `tokenizer/`; the lock dies with its holder.
    with exclusive_lock(ctx.stage_dir / ".tokenizer.lock", config.wait_timeout_s,
                        "another worker has been preparing the tokenizer (raise wait_timeout_s if training takes longer)"):
        if config.tokenizer is not None:
            tokenizer = load_tokenizer_from(resolve_asset(config.tokenizer), "tokenizer")
            if not target.exists():
                save_tokenizer_dir(tokenizer, target)
            return tokenizer
        if not target.exists():
            log.info(f"training a SentencePiece tokenizer ({config.train_tokenizer.vocab_size} pieces)")
            train_docs = (d.text for d in _documents(config, files) if d.split == "train")
            tmp = target.parent / f".tmp-{TOKENIZER_DIR}"
            shutil.rmtree(tmp, ignore_errors=True)
            train_sentencepiece(train_docs, config.train_tokenizer, tmp)
            tmp.rename(target)
    return load_tokenizer_from(target, "train_tokenizer")


def special_ids(tokenizer) -> dict[str, int]:
    """The ids packing and every later stage need."""
    return {"pad_id": tokenizer.pad_token_id, "cls_id": tokenizer.cls_token_id, "sep_id": tokenizer.sep_token_id,
            "mask_id": tokenizer.mask_token_id}


def _backend(tokenizer):
    """A copy of the fast backend with truncation and padding off: documents are tokenized whole."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def _shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _done_record(stage_dir: Path, name: str) -> dict | None:
    """The completion record of a shard if the shard on disk still matches it, else None (redo it)."""
    record_path = stage_dir / DONE_DIR / f"{name}.json"
    shard = stage_dir / name
    if not (record_path.is_file() and shard.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return None
    if shard.stat().st_size != record.get("bytes") or sha256_file(shard) != record.get("sha256"):
        return None
    return record


def _write_block(config: Config, ctx, backend, ids: dict, split: str, index: int, texts: list[str],
                 kill_after_bytes: int | None = None) -> dict:
    """Tokenize, pack and write one block as shard `index` of `split`; record its counts."""
    name = _shard_name(split, index)
    docs = []
    for start in range(0, len(texts), config.tokenize_batch):
        encodings = backend.encode_batch(texts[start:start + config.tokenize_batch], add_special_tokens=False)
        docs.extend(np.asarray(e.ids, dtype=np.int32) for e in encodings)
    pack = pack_pairs if config.packing == "pairs" else pack_plain
    samples = pack(docs, config.max_seq_len, ids["cls_id"], ids["sep_id"])
    for stale in ctx.stage_dir.glob(f".tmp-{name}.*"):
        stale.unlink(missing_ok=True)  # left by a killed run of this worker's shard
    write_shard(ctx.stage_dir / name, f"{split}-{index:06d}", samples, kill_after_bytes=kill_after_bytes)
    record = {"samples": len(samples), "tokens": int(sum(len(s[0]) for s in samples)),
              "doc_tokens": int(sum(len(d) for d in docs)), "docs": len(texts),
              "bytes": (ctx.stage_dir / name).stat().st_size, "sha256": sha256_file(ctx.stage_dir / name)}
    atomic_write_text(ctx.stage_dir / DONE_DIR / f"{name}.json", json.dumps(record, sort_keys=True))
    return record


def _owner(lay_counts: np.ndarray, first_rank: int, workers: int) -> int:
    """The worker that writes the block starting at surviving-document rank `first_rank`: the one that scanned
    the piece holding it, so each worker mostly reads the scan files of its own pieces."""
    return int(np.searchsorted(np.cumsum(lay_counts), first_rank, side="right")) % workers


def run(config: Config, ctx):
    """Scan this worker's pieces, wait for the others, write this worker's shards; the manifest when all are done."""
    try:
        return _run(config, ctx)
    except (scan.StageComplete, FileNotFoundError, ConfigError) as err:
        # A worker with nothing left to write, or a retried array task, may find the scan cleared under it
        # by the worker that completed the stage.
        if isinstance(err, scan.StageComplete) or (ctx.stage_dir / MANIFEST).is_file():
            log.info(f"worker {ctx.world.worker}: the other workers completed the stage meanwhile")
            return None
        raise


def after_manifest(stage_dir: Path) -> None:
    """The manifest is written: the scan's copy of the cleaned input is no longer needed."""
    scan.clear(stage_dir)


def _run(config: Config, ctx):
    files = _input_files(config, ctx)
    tokenizer = prepare_tokenizer(config, ctx, files)
    ids = special_ids(tokenizer)
    backend = _backend(tokenizer)
    world = ctx.world
    pieces = plan_pieces(files, config.piece_bytes, separator=config.doc_separator)
    scan.mark_started(ctx.stage_dir, world.worker)

    def scan_one(piece) -> None:
        if not scan.scanned(ctx.stage_dir, piece):
            scan.scan_piece(ctx.stage_dir, piece, text_field=config.text_field, separator=config.doc_separator,
                            normalize=config.normalize, max_doc_chars=config.max_doc_chars,
                            valid_fraction=config.valid_fraction, buckets=config.dedup_buckets,
                            worker=world.worker)

    for piece in pieces[world.worker::world.num_workers]:
        scan_one(piece)
    # Array tasks start in any order: the pieces of a worker that has not started yet are scanned here (scan
    # files are written atomically and are the same whoever writes them); a started worker's are waited for.
    for index, piece in enumerate(pieces):
        if not scan.started(ctx.stage_dir, index % world.num_workers):
            scan_one(piece)
    scan.wait_for(list(scan.pieces_of(ctx.stage_dir, len(pieces))), config.wait_timeout_s, "shard scan",
                  complete=(ctx.stage_dir / MANIFEST).is_file)
    dedup_file = ctx.stage_dir / scan.SCAN_DIR / "dedup.npz"
    if not dedup_file.exists():  # any worker: the pass is deterministic and its file is written atomically
        scan.dedup(ctx.stage_dir, len(pieces), buckets=config.dedup_buckets, enabled=config.dedup)
    lay = scan.layout(ctx.stage_dir, len(pieces), config.max_docs)
    counts = {split: lay.counts(split) for split in SPLITS}
    docs_per_split = {split: int(counts[split].sum()) for split in SPLITS}
    if docs_per_split["train"] == 0:
        raise ConfigError(f"inputs: {config.inputs}: no training documents after cleaning ({lay.stats})")
    blocks = {split: -(-docs_per_split[split] // config.docs_per_shard) for split in SPLITS}
    started, written, tokens_written, bytes_written = time.monotonic(), 0, 0, 0
    for split in SPLITS:
        for index in range(blocks[split]):
            lo = index * config.docs_per_shard
            name = _shard_name(split, index)
            if _owner(counts[split], lo, world.num_workers) != world.worker or _done_record(ctx.stage_dir, name):
                continue
            texts = scan.texts(ctx.stage_dir, lay, split, lo, min(lo + config.docs_per_shard, docs_per_split[split]))
            hook = None if config.kill_after_bytes is None else max(1, config.kill_after_bytes - bytes_written)
            record = _write_block(config, ctx, backend, ids, split, index, texts, hook)
            written += 1
            bytes_written += record["bytes"]
            tokens_written += record["tokens"]
            rate = tokens_written / max(time.monotonic() - started, 1e-9)
            log.info(f"{name}: {record['samples']} samples, {record['tokens']} tokens ({rate:,.0f} tokens/s)")
            ctx.tracker.log_metrics({"shard_tokens_per_s": rate, "shard_tokens": tokens_written}, step=written)
    log.info(f"worker {world.worker}: wrote {written} shards, {tokens_written:,} tokens")
    return _manifest_if_complete(config, ctx, tokenizer, ids, blocks, lay.stats, docs_per_split)


def _manifest_if_complete(config, ctx, tokenizer, ids, counts, stats, docs_per_split):
    """Build the manifest when every shard has its completion record (whichever worker gets here last)."""
    records = {}
    for split in SPLITS:
        for index in range(counts[split]):
            name = _shard_name(split, index)
            record = _done_record(ctx.stage_dir, name)
            if record is None:
                return None
            records[name] = record
    tok_dir = ctx.stage_dir / TOKENIZER_DIR
    if not tok_dir.is_dir():
        return None  # written before any shard, so this cannot happen once every shard has its record
    outputs = [OutputFile.of(ctx.stage_dir, name, samples=r["samples"], tokens=r["tokens"]) for name, r in records.items()]
    outputs += [OutputFile.of(ctx.stage_dir, p.relative_to(ctx.stage_dir)) for p in sorted(tok_dir.rglob("*")) if p.is_file()]
    splits = {}
    for split in SPLITS:
        names = [_shard_name(split, i) for i in range(counts[split])]
        splits[split] = {"shards": names, "samples": sum(records[n]["samples"] for n in names),
                         "tokens": sum(records[n]["tokens"] for n in names), "docs": docs_per_split[split],
                         "doc_tokens": sum(records[n]["doc_tokens"] for n in names)}
    extra = {"tokenizer_sha256": tokenizer_sha256(tok_dir), "tokenizer_dir": TOKENIZER_DIR,
             "vocab_size": len(tokenizer), "max_seq_len": config.max_seq_len, **ids, "splits": splits}
    metrics = {**stats, **{f"{s}_{k}": v for s in SPLITS for k, v in splits[s].items() if k != "shards"}}
    return ctx.manifest(config, outputs, metrics=metrics, extra=extra)


def verify(manifest, stage_dir: Path) -> None:
    """Decode every shard: counts match the manifest and every sample is well formed."""
    from formats.corpus import read_shard

    extra = manifest.extra
    if tokenizer_sha256(Path(stage_dir) / extra["tokenizer_dir"]) != extra["tokenizer_sha256"]:
        raise ManifestError(f"{stage_dir}/{extra['tokenizer_dir']}: tokenizer files do not match the manifest hash")
    items = {o.path: o.items for o in manifest.outputs}
    for split, info in extra["splits"].items():
        for name in info["shards"]:
            path = Path(stage_dir) / name
            samples = tokens = 0
            for sample in read_shard(path):
                ids = sample.input_ids
                if not (0 < len(ids) <= extra["max_seq_len"] and ids[0] == extra["cls_id"] and extra["sep_id"] in ids
                        and len(sample.token_type_ids) == len(ids) and int(ids.max()) < extra["vocab_size"]):
                    raise ManifestError(f"{path}: sample {sample.key} is malformed")
                samples += 1
                tokens += len(ids)
            if (samples, tokens) != (items[name]["samples"], items[name]["tokens"]):
                raise ManifestError(f"{path}: holds {samples} samples/{tokens} tokens, manifest says otherwise")
