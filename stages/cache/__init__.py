"""Stage `cache`: run a frozen teacher once over the sharded corpus and keep its masked-LM outputs on disk.

Per masked position (masks fixed by `mask_seed` and the sample key, see kd/masking.py) a shard stores the
teacher's top-k log-probabilities and ids, the log of the mass outside the top-k, the log tempered tail at
each of `tail_temperatures` (so top-k targets are exact at those T) and, as options, ids drawn from the
teacher distribution at `sample_temperature` with their counts (Anshumann et al. 2025, "Sparse logit
sampling") and the [CLS] state of every layer. One cache shard per corpus shard, `<teacher_id>/<shard>.cache`.

Array-parallel: worker i of n does shards i, i+n, ...; complete shards are skipped on rerun; whichever
worker finds every shard done writes the manifest. Shards depend only on their corpus shard and the
config, so the result is byte-identical for any number of workers.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from formats import cache as fmt
from formats import models
from kd import teachers
from kd.masking import Masker, mask_spec_from_corpus
from pipeline import log
from pipeline.config import ConfigError
from pipeline.manifest import Manifest, ManifestError, OutputFile
from stages.cache.records import shard_records

LAUNCH = "array"


from stages.cache.config import Config


def _jobs(corpus_dir: Path, config: Config) -> list[tuple[str, Path, str]]:
    """(split, corpus shard, cache shard relpath) for every shard, in a fixed order."""
    from formats import corpus

    jobs = []
    for split in config.splits:
        paths = sorted(corpus.shard_paths(corpus_dir, split))
        if not paths:
            raise ConfigError(f"{corpus_dir}: no {split!r} shards (remove {split!r} from splits or reshard)")
        jobs += [(split, p, f"{config.cache_id}/{p.name.split('.')[0]}{fmt.SUFFIX}") for p in paths]
    return jobs


def _provenance(config: Config, ctx, teacher_dir: Path, model) -> dict:
    extra = ctx.input_manifest("corpus").extra
    return {
        "teacher_id": config.cache_id,
        "teacher_sha256": models.weights_sha256(teacher_dir),
        "teacher_vocab_size": int(model.config.vocab_size),
        "tokenizer_sha256": extra.get("tokenizer_sha256"),
        "corpus_manifest_sha256": ctx.inputs["corpus"].sha256,
        "mask_seed": config.mask_seed, "mask_rate": config.mask_rate, "whole_word": config.whole_word,
        "k": config.k, "dtype": config.dtype,
        "sampled": config.sampled, "sample_temperature": float(config.sample_temperature),
        "tail_temperatures": config.stored_tail_temperatures, "cls_hidden": config.cls_hidden,
    }


def run(config: Config, ctx) -> Manifest | None:
    """Cache this worker's shards; return the manifest if every shard is now done, else None."""
    from formats import corpus

    corpus_dir = ctx.input_dir("corpus")
    extra = ctx.input_manifest("corpus").extra
    tokenizer = corpus.load_tokenizer(corpus_dir)
    spec = mask_spec_from_corpus(extra, tokenizer, mask_seed=config.mask_seed, rate=config.mask_rate,
                                 whole_word=config.whole_word)
    masker = Masker(spec, tokenizer)
    teacher_dir = models.upstream_model(ctx, config.teacher, config.teacher_path)
    device = teachers.pick_device(config.device, ctx.world)
    model = teachers.load_masked_lm(teacher_dir, dtype=config.dtype, device=device)
    teachers.check_tokenizer(teacher_dir, tokenizer, model)
    jobs = _jobs(corpus_dir, config)
    mine = jobs[ctx.world.worker::ctx.world.num_workers]
    written = 0

    def finish(pending) -> None:
        nonlocal written
        pending.result()  # re-raises a failed write here, in the stage
        written += 1
        ctx.tracker.log_metrics({"cache/shards_written": written}, written)
        if config.die_after_shards is not None and written >= config.die_after_shards:
            os.kill(os.getpid(), signal.SIGKILL)

    # Encoding, zstd and the atomic write of shard n run on a writer thread while shard n+1 is read, masked
    # and put through the teacher (zstd and file writes release the GIL); at most one shard waits.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer") as writer:
        pending = None
        for split, shard, rel in log.progress(mine, desc=f"cache {config.cache_id}"):
            target = ctx.stage_dir / rel
            if target.is_file():
                continue  # complete: shards only ever appear under their final name
            samples = list(corpus.read_shard(shard))
            records, stats = shard_records(samples, masker, model, config, device=device,
                                           pad_id=int(extra["pad_id"]), vocab_size=int(model.config.vocab_size))
            if pending is not None:
                finish(pending)
            pending = writer.submit(fmt.write_cache_shard, target, records, vocab_size=int(model.config.vocab_size),
                                    max_seq_len=int(extra["max_seq_len"]) + 1, level=config.compression_level,
                                    stats=stats)
        if pending is not None:
            finish(pending)
    if not all((ctx.stage_dir / rel).is_file() for _, _, rel in jobs):
        return None
    return _manifest(config, ctx, jobs, _provenance(config, ctx, teacher_dir, model), spec.to_dict())


def _manifest(config: Config, ctx, jobs, provenance: dict, mask: dict) -> Manifest:
    outputs, splits = [], {}
    totals = {"samples": 0, "tokens": 0, "masked": 0, "top1_correct": 0}
    for split, _, rel in jobs:
        stats = fmt.read_header(ctx.stage_dir / rel)["stats"]
        outputs.append(OutputFile.of(ctx.stage_dir, rel, samples=stats["samples"], tokens=stats["tokens"],
                                     masked=stats["masked"]))
        entry = splits.setdefault(split, {"shards": [], "samples": 0, "tokens": 0, "masked": 0})
        entry["shards"].append(rel)
        for key in ("samples", "tokens", "masked"):
            entry[key] += stats[key]
        for key in totals:
            totals[key] += stats[key]
    size = sum(o.bytes for o in outputs)
    metrics = {**totals, "bytes": size, "bytes_per_token": size / max(totals["tokens"], 1),
               "teacher_mlm_accuracy": totals["top1_correct"] / max(totals["masked"], 1)}
    log.info(f"cache {config.cache_id}: {totals['masked']:,} masked positions, {metrics['bytes_per_token']:.2f} B/token, "
             f"teacher MLM accuracy {metrics['teacher_mlm_accuracy']:.3f}")
    extra = {"teacher_id": config.cache_id, "provenance": provenance, "mask": mask, "splits": splits,
             "format": {"version": fmt.FORMAT_VERSION, "suffix": fmt.SUFFIX}}
    return ctx.manifest(config, outputs, metrics, extra)


def verify(manifest: Manifest, stage_dir: Path) -> None:
    """Beyond hashes: provenance pins the corpus input, counts match, rows are sorted, finite and in range."""
    prov = manifest.extra.get("provenance") or {}
    missing = [k for k in ("teacher_id", "teacher_sha256", "tokenizer_sha256", "corpus_manifest_sha256",
                           "mask_seed", "mask_rate", "k", "dtype") if k not in prov]
    if missing:
        raise ManifestError(f"{stage_dir}/manifest.json: provenance lacks {', '.join(missing)}")
    pinned = {i.name: i.sha256 for i in manifest.inputs}.get("corpus")
    if pinned != prov["corpus_manifest_sha256"]:
        raise ManifestError(f"{stage_dir}/manifest.json: provenance corpus hash differs from the corpus input")
    vocab = int(prov["teacher_vocab_size"])
    for out in manifest.outputs:
        path = Path(stage_dir) / out.path
        records = list(fmt.read_cache_shard(path))
        if len(records) != out.items.get("samples") or len({r.key for r in records}) != len(records):
            raise ManifestError(f"{path}: {len(records)} records (or repeated keys), manifest says {out.items.get('samples')}")
        if sum(r.positions.size for r in records) != out.items.get("masked"):
            raise ManifestError(f"{path}: masked-position count differs from the manifest")
        for record in records:
            if record.topk_ids.shape[1] != prov["k"]:
                raise ManifestError(f"{path}: sample {record.key!r} has k={record.topk_ids.shape[1]}, provenance says {prov['k']}")
            fmt.check_record(record, path, vocab)
            tempered = 0 if record.tail_logmass_t is None else record.tail_logmass_t.shape[1]
            if tempered != len(prov.get("tail_temperatures", [1.0])) - 1:
                raise ManifestError(f"{path}: sample {record.key!r} has {tempered} tempered tails, provenance lists "
                                    f"tail_temperatures {prov.get('tail_temperatures', [1.0])}")
