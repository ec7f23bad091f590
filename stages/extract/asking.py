"""The attacker's side of `extract`: the corpus its queries come from, the deployment it asks (the victim served
by `mlflow models serve`, behind the watermarking proxy), and the answer journals that make asking resumable."""

from __future__ import annotations

import contextlib
import gzip
import os
import secrets
import signal
import socket
from pathlib import Path
from typing import Iterator

import numpy as np

from formats import answers as journal
from formats import serving
from formats.corpus import load_tokenizer, read_shard, shard_paths
from pipeline import log
from pipeline.assets import resolve_asset
from pipeline.config import ConfigError
from stages.extract.config import Config


def corpus_sentences(config: Config, ctx) -> list[str]:
    """Up to `corpus_max_sentences` sentences: lines of `corpus_path`, or the documents of a shard stage's
    training shards (decoded, split at [SEP])."""
    limit = config.corpus_max_sentences
    if config.corpus_path:
        path = resolve_asset(config.corpus_path)
        if not path.is_file():
            raise ConfigError(f"{config.corpus_path}: corpus_path is not a file (one sentence a line, .gz allowed)")
        opener = gzip.open if path.suffix == ".gz" else open
        out = []
        with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.strip():
                    out.append(line.strip())
                if len(out) >= limit:
                    break
        return out
    folder = ctx.input_dir("corpus")
    tokenizer = load_tokenizer(folder)
    specials = set(tokenizer.all_special_ids)
    out = []
    for path in shard_paths(folder, "train"):
        for sample in read_shard(path):
            piece: list[int] = []
            for token in sample.input_ids.tolist() + [tokenizer.sep_token_id]:
                if token == tokenizer.sep_token_id and piece:
                    out.append(tokenizer.decode(piece).strip())
                    piece = []
                elif token not in specials:
                    piece.append(token)
            if len(out) >= limit:
                return out[:limit]
    return out


def watermark_key(config: Config, ctx) -> bytes:
    """The secret key (the file's bytes); a missing file is created with 32 random bytes, mode 0600."""
    path = Path(config.watermark_key_file) if config.watermark_key_file else Path(ctx.run_dir) / "watermark.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
            log.info(f"extract: made a new watermark key in {path} (keep it: it proves a copy)")
    key = path.read_bytes().strip()
    if len(key) < 16:
        raise ConfigError(f"{path}: watermark key file holds {len(key)} bytes; it needs at least 16 (or delete it)")
    return key


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def victim_server(config: Config, ctx, folder: Path) -> Iterator[str]:
    """The victim's URL: `victim_url`, or `mlflow models serve` on the victim's folder for the block."""
    if config.victim_url:
        yield config.victim_url
        return
    if not (folder / "MLmodel").is_file():
        raise ConfigError(f"{folder}: the victim is not an MLflow Model folder (no MLmodel); give a stage's model")
    log.info(f"extract: serving {folder} with mlflow models serve on 127.0.0.1")
    with serving.mlflow_serve(folder, _free_port(), ctx.stage_dir / "serve.log", timeout_s=config.serve_timeout_s) as url:
        yield url


class Asker:
    """Asks a deployment for the answers to a query set, journaled batch by batch (formats/answers.py)."""

    def __init__(self, config: Config, client: serving.Client):
        self.config, self.client, self.batches = config, client, 0

    def ask(self, path: Path, texts: list[tuple[str, ...]], names: list[str],
            client: serving.Client | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(label indices into `names`, top-1 probabilities or None) for every text, asking (`client`, by
        default the deployment's) only the ones the journal at `path` has no answer for."""
        client = client or self.client
        found = journal.answered(path, texts)
        todo = [i for i in range(len(texts)) if i not in found]
        if found:
            log.info(f"extract: {path.name}: {len(found)} answers journaled, asking {len(todo)}")
        step = self.config.query_batch
        for start in log.progress(range(0, len(todo), step), desc=f"ask {path.stem}", unit="batch"):
            pick = todo[start:start + step]
            got = client.ask([texts[i] for i in pick])
            records = [{"i": i, "text": list(texts[i]), **answer} for i, answer in zip(pick, got)]
            journal.append(path, records)
            found.update({r["i"]: r for r in records})
            self.batches += 1
            if self.config.die_after_batches is not None and self.batches >= self.config.die_after_batches:
                os.kill(os.getpid(), signal.SIGKILL)  # test hook: a kill right after a journaled batch
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted({found[i]["label"] for i in found} - set(index))
        if unknown:
            raise ConfigError(f"{path}: the victim answered labels {unknown[:3]} that are not its classes {names}")
        labels = np.array([index[found[i]["label"]] for i in range(len(texts))], np.int64)
        scores = (np.array([found[i]["score"] for i in range(len(texts))], np.float32)
                  if client.answers == "top1_prob" else None)
        return labels, scores
