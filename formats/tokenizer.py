"""The corpus tokenizer folder: saved once by `shard`, loaded and hashed by every stage that reads the corpus."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from pipeline.config import ConfigError


def load_tokenizer_from(path: Path, what: str):
    """Load a fast tokenizer from a local folder; a failure or a missing BERT special is one ConfigError."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad folder
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{what}: {path}: not a loadable tokenizer ({first[:200]})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{what}: {path}: only fast tokenizers are supported (tokenizer.json missing)")
    missing = [name for name in ("pad", "cls", "sep", "mask") if getattr(tokenizer, f"{name}_token_id") is None]
    if missing:
        raise ConfigError(f"{what}: {path}: tokenizer has no {', '.join(missing)} token; BERT-style packing needs them")
    return tokenizer


def tokenizer_sha256(directory: Path) -> str:
    """One hash over every file of a saved tokenizer (names and bytes), independent of listing order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def save_tokenizer_dir(tokenizer, target: Path) -> None:
    """Save `tokenizer` into `target` through a temporary folder and a rename, so `target` is whole or absent."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}.", dir=target.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
