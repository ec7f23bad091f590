"""The `extract` stage's typed config: every field documented, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from formats.taskdata import TaskData
from kd.extraction import GENERATORS
from pipeline.train.optim import TrainConfig


@dataclass(kw_only=True)
class Config(TrainConfig):
    """Steal a served classifier with generated queries, train students on its answers, and measure the
    defences (training keys: `pipeline.train.optim.TrainConfig`)."""

    victim: str | None = field(default=None, metadata={"input": True})
    """Victim model stage, e.g. `@teacher_finetune` or `@task` (its model folder is served)."""
    victim_path: str | None = None
    """Or the victim's MLflow Model folder / pkg: path (exactly one of victim, victim_path)."""
    victim_url: str | None = None
    """An already running server answering MLflow's /invocations protocol; None: the stage serves the victim
    with `mlflow models serve` on 127.0.0.1 itself. The local copy is still needed for the detector."""
    answers: Literal["label", "top1_prob"] = "label"
    """What the deployment discloses: the label only, or the label and its top-1 probability."""
    data: TaskData = field(default_factory=TaskData)
    """The victim's task, as its teacher_finetune had it: train gives the real training set (the budgets are
    multiples of its size, its texts are the detector's real queries, its labels the independent model's);
    the scores are on the task's held-out test split, `data.test` or else `data.test_fraction` of the train
    file carved by the run seed and removed from train (`formats.testsplit`), the rows the victim held out."""
    corpus: str | None = field(default=None, metadata={"input": True})
    """A `shard` stage whose corpus gives the query vocabulary and sentences (e.g. `@shard`)."""
    corpus_path: str | None = None
    """Or a text file, one sentence a line (.gz allowed) (exactly one of corpus, corpus_path)."""
    corpus_max_sentences: int = 20000
    """Sentences read from the corpus at most."""
    vocab_size: int = 10000
    """Most frequent corpus words the random generator draws from."""
    generators: list[str] = field(default_factory=lambda: ["random", "corpus"])
    """Query generators (random, corpus); pairs get Krishna's word-replacement heuristic for the second text."""
    budgets: list[float] = field(default_factory=lambda: [0.1, 1.0])
    """Query budgets as multiples of the real training set's size."""
    min_words: int = 3
    """Shortest random query, in words."""
    max_words: int = 20
    """Longest random query, in words."""
    pair_replace: int = 3
    """Pair tasks: words of the first text replaced to make the second."""
    query_batch: int = 32
    """Queries per HTTP request."""
    rate_limit: float | None = None
    """Requests per second at most (None: as fast as the server answers)."""
    retries: int = 3
    """Retries of a failed request."""
    backoff_s: float = 0.5
    """Wait before the first retry; doubled on each further one."""
    serve_timeout_s: float = field(default=300.0, metadata={"hash": False})
    """Seconds to wait for `mlflow models serve` to answer /ping."""
    student: str | None = field(default=None, metadata={"input": True})
    """Pretrained student stage (e.g. `@general`)."""
    student_path: str = "pkg:cognition/model"
    """Or a pretrained encoder folder / pkg: path (used when student is not set); its own tokenizer is used."""
    watermark_fraction: float = 0.02
    """Share of queries the deployment answers with a wrong label (0 turns the watermark off)."""
    watermark_key_file: str | None = None
    """File holding the secret watermark key; None: RUN_DIR/watermark.key. Created (mode 0600) when missing;
    its content never enters configs, logs or MLflow."""
    watermark_alpha: float = 0.01
    """A suspect is called a copy when matching that many watermark labels by chance has a probability
    (binomial tail at 1/(K-1) per marked query, 0.5 for two classes) below this."""
    detector_samples: int = 2000
    """Real and generated queries each, at most, split half for fitting the detector and half for its AUC."""
    epochs: float = 3.0
    """Passes over each student's answered queries."""
    max_steps: int | None = None
    """Cap on optimizer steps per student (quick runs)."""
    batch_size: int = 32
    """Examples per step."""
    checkpoint_every: int = field(default=200, metadata={"hash": False})
    """Optimizer steps between checkpoints of a student."""
    eval_batch_size: int = field(default=128, metadata={"hash": False})
    """Examples per forward when evaluating."""
    threads: int | None = field(default=None, metadata={"hash": False})
    """CPU threads for torch (None: torch's default)."""
    die_after_batches: int | None = field(default=None, metadata={"hash": False})
    """Test hook: SIGKILL this process after this many answered query batches of this run."""

    def __post_init__(self):
        super().__post_init__()
        if bool(self.victim) == bool(self.victim_path):
            raise ValueError("give exactly one of victim (e.g. '@teacher_finetune') or victim_path")
        if bool(self.corpus) == bool(self.corpus_path):
            raise ValueError("give exactly one of corpus (a shard stage, e.g. '@shard') or corpus_path (a text file)")
        if self.victim_url is not None and not self.victim_url.startswith(("http://", "https://")):
            raise ValueError(f"victim_url must be an http(s):// URL, got {self.victim_url!r}")
        bad = [g for g in self.generators if g not in GENERATORS]
        if not self.generators or bad or len(set(self.generators)) != len(self.generators):
            raise ValueError(f"generators must be distinct names among {', '.join(GENERATORS)}, got {self.generators}")
        if not self.budgets or any(b <= 0 for b in self.budgets) or len(set(self.budgets)) != len(self.budgets):
            raise ValueError(f"budgets must be distinct multiples > 0 of the training set size, got {self.budgets}")
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got {self.min_words} and {self.max_words}")
        for name in ("vocab_size", "query_batch", "batch_size", "corpus_max_sentences", "detector_samples",
                     "eval_batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pair_replace < 0 or self.retries < 0 or self.backoff_s < 0:
            raise ValueError("pair_replace, retries and backoff_s must be >= 0")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ValueError(f"rate_limit must be > 0 requests/s or null, got {self.rate_limit}")
        if not 0 <= self.watermark_fraction < 0.5:
            raise ValueError(f"watermark_fraction must be in [0, 0.5), got {self.watermark_fraction}")
        if not 0 < self.watermark_alpha < 1:
            raise ValueError(f"watermark_alpha must be in (0, 1), got {self.watermark_alpha}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
