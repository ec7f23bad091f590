"""The `cache` stage's typed config: every field documented, validated at construction."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from formats import models


@dataclass(kw_only=True)
class Config:
    """Cache one teacher's masked-LM outputs for a sharded corpus."""

    corpus: str = field(default="@shard", metadata={"input": True})
    """The shard stage whose output is cached."""
    teacher: str | None = field(default=None, metadata={"input": True})
    """An upstream stage holding the teacher (e.g. "@teacher_adapt"); or set teacher_path."""
    teacher_path: str | None = None
    """A local or pkg: folder with a masked-LM teacher; or set teacher."""
    teacher_id: str | None = None
    """Name of this teacher's cache folder; default: the teacher stage name or model package name."""
    splits: list[str] = field(default_factory=lambda: ["train", "valid"])
    """Corpus splits to cache."""
    k: int = 32
    """Top-k log-probabilities kept per masked position."""
    mask_seed: int = 0
    """Seed that, with each sample key, fixes its mask; the student reuses it from this manifest."""
    mask_rate: float = 0.15
    """Share of maskable tokens masked (BERT: 0.15)."""
    whole_word: bool = False
    """Mask whole words (a word start and its ## pieces) instead of single tokens."""
    sampled: int = 0
    """Draws per masked position from the teacher distribution (sampled-logit KD); 0 = off."""
    sample_temperature: float = 2.0
    """Temperature T of the distribution the draws come from, softmax(logits / T); recorded in the provenance,
    and the general stage trains `cache_targets: sampled` at this temperature only (the estimate is unbiased
    only there)."""
    tail_temperatures: list[float] = field(default_factory=lambda: [2.0])
    """Temperatures besides 1 at which the exact tempered top-k tail, log sum over the other ids of p^(1/T), is
    stored (one fp32 per masked position each); the general stage trains `cache_targets: topk` at 1 (always
    stored) or one of these, and refuses any other."""
    cls_hidden: bool = False
    """Also keep the teacher's [CLS] state of every layer (fp16), for Patient-KD-style losses."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Teacher precision."""
    batch_tokens: int = 8192
    """Padded tokens per teacher batch (samples are length-sorted within a shard)."""
    compression_level: int = 3
    """zstd level of the shard bodies."""
    device: str = field(default="auto", metadata={"hash": False})
    """"auto", "cpu" or "cuda[:i]"."""
    die_after_shards: int | None = field(default=None, metadata={"hash": False})
    """Test hook: SIGKILL this process after writing this many shards."""

    def __post_init__(self):
        models.check_model_fields(self.teacher, self.teacher_path)
        if self.teacher_id is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.teacher_id):
            raise ValueError(f"teacher_id {self.teacher_id!r}: use letters, digits, '_', '.', '-' only")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 0 < self.mask_rate < 1:
            raise ValueError(f"mask_rate must be in (0, 1), got {self.mask_rate}")
        if not 0 <= self.sampled <= 65535:
            raise ValueError(f"sampled must be in [0, 65535], got {self.sampled}")
        for name, temps in (("sample_temperature", [self.sample_temperature]), ("tail_temperatures", self.tail_temperatures)):
            if not all(isinstance(t, (int, float)) and math.isfinite(t) and t > 0 for t in temps):
                raise ValueError(f"{name} must be finite and > 0, got {temps}")
        if len(set(map(float, self.tail_temperatures))) != len(self.tail_temperatures):
            raise ValueError(f"tail_temperatures has a repeated value: {self.tail_temperatures}")
        if self.batch_tokens < 1 or not self.splits:
            raise ValueError("batch_tokens must be >= 1 and splits non-empty")
        if not 1 <= self.compression_level <= 22:
            raise ValueError(f"compression_level must be in [1, 22], got {self.compression_level}")

    @property
    def stored_tail_temperatures(self) -> list[float]:
        """Every temperature whose top-k tail the cache holds: 1.0 (`tail_logmass`), then the columns of
        `tail_logmass_t` in order."""
        return [1.0] + [float(t) for t in self.tail_temperatures if float(t) != 1.0]

    @property
    def cache_id(self) -> str:
        """The folder name of this teacher's shards."""
        return self.teacher_id or models.default_teacher_id(self.teacher, self.teacher_path)
