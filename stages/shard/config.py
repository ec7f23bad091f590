"""The `shard` stage's typed config: every field documented, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from stages.shard.tokenizer import TrainTokenizer


@dataclass(kw_only=True)
class Config:
    """Tokenize and pack a text corpus into webdataset shards."""

    inputs: list[str]
    """Files, globs or directories (.txt/.jsonl/.parquet/.arrow, optionally .gz/.zst, or a saved `datasets` folder)."""
    source: str | None = field(default=None, metadata={"input": True})
    """An upstream stage (e.g. "@wordnet") whose output folder `inputs` are relative to; None: paths as given."""
    max_docs: int | None = None
    """Keep only the first this many documents after cleaning (a deterministic prefix); None keeps all."""
    text_field: str = "text"
    """JSONL field or `datasets` column holding the text."""
    doc_separator: str | None = None
    """None: one document per line; else a line equal to this (e.g. "") ends a document."""
    tokenizer: str | None = None
    """Local path or pkg: path of a Hugging Face fast tokenizer (exclusive with train_tokenizer)."""
    train_tokenizer: TrainTokenizer | None = None
    """Train a SentencePiece tokenizer on the corpus instead (exclusive with tokenizer)."""
    max_seq_len: int = 128
    """Tokens per packed sequence, [CLS] and [SEP] included."""
    packing: Literal["plain", "pairs"] = "plain"
    """plain: [CLS] text [SEP], documents joined by [SEP]; pairs: [CLS] A [SEP] B [SEP] split at a document boundary."""
    docs_per_shard: int = 4096
    """Documents per shard; also the unit of work handed to a worker."""
    valid_fraction: float = 0.01
    """Share of documents, chosen by hash, that go to the `valid` split."""
    dedup: bool = True
    """Drop exact duplicates (after normalisation); the first copy wins."""
    normalize: Literal["NFKC", "NFC", "NFKD", "NFD", "none"] = "NFKC"
    """Unicode normalisation applied before hashing and tokenizing."""
    max_doc_chars: int = 100_000
    """Documents longer than this (characters, after cleaning) are dropped as junk."""
    tokenize_batch: int = field(default=1024, metadata={"hash": False})
    """Documents per tokenizer call."""
    piece_bytes: int = field(default=64 << 20, metadata={"hash": False})
    """Bytes of plain text (or parquet row groups) per input piece, the unit of reading handed to a worker."""
    dedup_buckets: int = field(default=256, metadata={"hash": False})
    """Digest buckets the dedup pass holds one at a time (memory ~24 B x documents / buckets)."""
    wait_timeout_s: float = field(default=600.0, metadata={"hash": False})
    """How long a worker waits for the others: worker 0's tokenizer and dedup, every worker's scans."""
    kill_after_bytes: int | None = field(default=None, metadata={"hash": False})
    """Test hook: SIGKILL this process once it has written this many shard bytes (mid-shard)."""

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("inputs must name at least one file, glob or directory")
        if (self.tokenizer is None) == (self.train_tokenizer is None):
            raise ValueError("give exactly one of tokenizer (a path) or train_tokenizer (settings)")
        if not 8 <= self.max_seq_len <= 65536:
            raise ValueError(f"max_seq_len must be in [8, 65536], got {self.max_seq_len}")
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError(f"max_docs must be >= 1 or null, got {self.max_docs}")
        if self.docs_per_shard < 1:
            raise ValueError(f"docs_per_shard must be >= 1, got {self.docs_per_shard}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.piece_bytes < 1 or not 1 <= self.dedup_buckets <= 65536:
            raise ValueError("piece_bytes must be >= 1 and dedup_buckets in [1, 65536]")
        if self.max_doc_chars < 1 or self.tokenize_batch < 1:
            raise ValueError("max_doc_chars and tokenize_batch must be >= 1")
