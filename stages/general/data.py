"""What the `general` stage reads: tokenizer, teacher, cache provenance, masked training batches, evaluation.

Everything a user can get wrong (a cache from another tokenizer or teacher, cached targets the cache does
not hold) is checked in `prepare`, before the student is built or any step runs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from formats import corpus, models
from kd import teachers
from kd.masking import Masker, MaskSpec, mask_spec_from_corpus
from pipeline import log
from pipeline.config import ConfigError
from pipeline.train import dist
from stages.general.config import Config


@dataclass(kw_only=True)
class Setup:
    """Inputs resolved and checked once per run."""

    corpus_dir: Path
    corpus_extra: dict
    tokenizer: Any
    teacher_dir: Path
    teacher: torch.nn.Module
    online: bool
    """True when the teacher runs every step (no cache, or a loss only it can give)."""
    mask: MaskSpec
    cache_dir: Path | None = None
    cache_has_valid: bool = False
    tail_column: int | None = None
    """The cached tempered-tail column of the training temperature (None: T=1, `tail_logmass`)."""
    members: list | None = None
    """With `team`: its checked members (`stages.general.team.Member`)."""
    team: Any = None
    """With `team`: the `stages.general.team.Team` that draws each step's member (built once the student is)."""

    @property
    def team_caches(self) -> list[Path] | None:
        """The members' cache folders, when the team trains from caches."""
        if not self.members or self.members[0].cache_dir is None:
            return None
        return [m.cache_dir for m in self.members]


def prepare(config: Config, ctx) -> Setup:
    """Load and cross-check tokenizer, teacher and cache; ConfigError on any mismatch."""
    corpus_dir = ctx.input_dir("corpus")
    extra = ctx.input_manifest("corpus").extra
    tokenizer = corpus.load_tokenizer(corpus_dir)
    teacher_dir = models.upstream_model(ctx, config.teacher, config.teacher_path)
    teacher = teachers.load_masked_lm(teacher_dir, dtype=config.teacher_dtype)
    teachers.check_tokenizer(teacher_dir, tokenizer, teacher)
    online = config.cache is None or bool(config.loss.online_only)

    def masks_on_the_fly() -> MaskSpec:  # an online teacher (or team): no cache fixes the masks
        return mask_spec_from_corpus(extra, tokenizer, mask_seed=config.mask_seed, rate=config.mask_rate,
                                     whole_word=False)

    if config.team:
        from stages.general import team

        members, spec = team.load(config, ctx, tokenizer, teacher, ctx.input_manifest("corpus"))
        return Setup(corpus_dir=corpus_dir, corpus_extra=extra, tokenizer=tokenizer, teacher_dir=teacher_dir,
                     teacher=teacher, online=False, mask=spec or masks_on_the_fly(), members=members)
    if config.cache is None:
        return Setup(corpus_dir=corpus_dir, corpus_extra=extra, tokenizer=tokenizer, teacher_dir=teacher_dir,
                     teacher=teacher, online=online, mask=masks_on_the_fly())
    from formats.cache import check_provenance, check_sample_temperature, tail_column

    cache = ctx.input_manifest("cache")
    check_provenance(cache, ctx.input_manifest("corpus"), tokenizer_sha256=extra.get("tokenizer_sha256"))
    prov = cache.extra["provenance"]
    if prov.get("teacher_sha256") != models.weights_sha256(teacher_dir):
        raise ConfigError(f"cache {cache.name!r} holds teacher {prov.get('teacher_id')!r}, whose weights differ from "
                          f"{teacher_dir}; point teacher/teacher_path at the cached teacher or rebuild the cache")
    if config.cache_targets == "sampled" and not prov.get("sampled"):
        raise ConfigError(f"cache {cache.name!r} has no sampled targets (sampled: 0); use cache_targets: topk "
                          "or rebuild the cache with sampled > 0")
    column = None
    if config.loss.soft and config.cache_targets == "sampled":
        check_sample_temperature(cache, config.temperature)
    elif config.loss.soft:
        column = tail_column(cache, config.temperature)
    return Setup(corpus_dir=corpus_dir, corpus_extra=extra, tokenizer=tokenizer, teacher_dir=teacher_dir,
                 teacher=teacher, online=online, mask=MaskSpec.from_dict(cache.extra["mask"], f"cache {cache.name!r}"),
                 cache_dir=ctx.input_dir("cache"), cache_has_valid="valid" in cache.extra["splits"],
                 tail_column=column)


def _pad(rows: list[np.ndarray], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.from_numpy(np.asarray(row, dtype=np.int64))
    return out


def make_batch(pairs: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    """Tensors for a list of (MaskedSample, CacheRecord or None): masked inputs, positions, labels, targets."""
    masked = [m for m, _ in pairs]
    input_ids = _pad([m.input_ids for m in masked], pad_id)
    lengths = torch.tensor([len(m.input_ids) for m in masked])
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
    types = [m.token_type_ids if m.token_type_ids is not None else np.zeros(len(m.input_ids)) for m in masked]
    rows = torch.cat([torch.full((len(m.positions),), i, dtype=torch.long) for i, m in enumerate(masked)])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": _pad(types, 0),
             "rows": rows, "cols": torch.from_numpy(np.concatenate([m.positions for m in masked])).long(),
             "labels": torch.from_numpy(np.concatenate([m.labels for m in masked])).long()}
    records = [r for _, r in pairs]
    if records[0] is not None:
        batch["topk_ids"] = torch.from_numpy(np.concatenate([r.topk_ids for r in records]).astype(np.int64))
        batch["topk_logp"] = torch.from_numpy(np.concatenate([r.topk_logp for r in records]).astype(np.float32))
        batch["tail_logmass"] = torch.from_numpy(np.concatenate([r.tail_logmass for r in records]).astype(np.float32))
        if records[0].tail_logmass_t is not None:
            batch["tail_logmass_t"] = torch.from_numpy(np.concatenate([r.tail_logmass_t for r in records]))
        if records[0].sampled_ids is not None:
            batch["sampled_ids"] = torch.from_numpy(np.concatenate([r.sampled_ids for r in records]).astype(np.int64))
            batch["sampled_counts"] = torch.from_numpy(np.concatenate([r.sampled_counts for r in records]).astype(np.float32))
    return batch


def importance_batches(config: Config, setup: Setup, micro: int) -> list[dict[str, torch.Tensor]]:
    """The first `student.importance_samples` training sequences, unmasked and in shard order (the same on every
    rank), in batches of `micro`: the text a keep_by 'importance' cut scores the teacher on."""
    reader = corpus.CorpusReader(setup.corpus_dir, "train", shuffle=False, loop=False,
                                 partitions=config.reader_partitions)
    samples = list(itertools.islice(reader, config.student.importance_samples))
    pad_id = int(setup.corpus_extra["pad_id"])
    return [corpus.collate(samples[start:start + micro], pad_id) for start in range(0, len(samples), micro)]


class TrainStream:
    """This rank's micro-batches, forever: a `formats.loader.TrainLoader` over its own shards, joined with the
    cache (by key, in the loader workers) or masked on the fly; CPU tensors, pinned when asked."""

    def __init__(self, config: Config, ctx, setup: Setup, micro: int, split: str = "train", *, shuffle: bool = True):
        from formats.loader import TrainLoader

        self.micro, self.pad_id = micro, int(setup.corpus_extra["pad_id"])
        reader = corpus.CorpusReader(setup.corpus_dir, split, seed=ctx.seed, shuffle=shuffle,
                                     shuffle_buffer=config.shuffle_buffer, rank=ctx.world.rank,
                                     world_size=ctx.world.world_size, loop=True, partitions=config.reader_partitions)
        self.cached = setup.cache_dir is not None and (split == "train" or setup.cache_has_valid)
        factory = None
        if self.cached:
            factory = _CacheFactory(setup.cache_dir, split, config.shuffle_buffer)
        elif split == "train" and setup.members:  # every member's cache (none online), joined in the workers
            factory = _CacheFactory(setup.team_caches or [], split, config.shuffle_buffer)
        pin = torch.cuda.is_available() if config.pin_memory is None else config.pin_memory
        self.loader = TrainLoader(reader, Masker(setup.mask, setup.tokenizer), micro, self.pad_id,
                                  cache_factory=factory, num_workers=config.loader_workers,
                                  prefetch_factor=config.prefetch_factor, pin_memory=pin)
        self.reader = reader

    @property
    def num_samples(self) -> int:
        """Samples in one epoch of the split."""
        return self.reader.num_samples

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next micro-batch of this rank."""
        return next(self.loader)

    def state_dict(self) -> dict:
        """The reader's world-size-independent position (the same on every rank)."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (before the first batch is drawn)."""
        self.loader.load_state_dict(state)


class _CacheFactory:
    """Builds the cache lookup inside each loader worker (a plain object, so workers can receive it); a list of
    cache folders (a team) builds one lookup per folder."""

    def __init__(self, cache_dir: Path | list[Path], split: str, shuffle_buffer: int):
        self.cache_dir, self.split, self.shuffle_buffer = cache_dir, split, shuffle_buffer

    def _one(self, cache_dir: Path, windows: int):
        from formats.cache import CacheLookup, decoded_capacity
        from pipeline.manifest import Manifest

        manifest = Manifest.load(cache_dir)
        return CacheLookup(cache_dir, manifest, self.split,
                           capacity=decoded_capacity(manifest, self.split, self.shuffle_buffer, windows))

    def __call__(self, windows: int):
        if isinstance(self.cache_dir, list):
            return [self._one(d, windows) for d in self.cache_dir]
        return self._one(self.cache_dir, windows)


@torch.no_grad()
def evaluate(config: Config, ctx, engine, setup: Setup, micro: int) -> dict[str, float]:
    """Student MLM loss/accuracy on the valid split, and its top-1 agreement and KL with the teacher.

    Every rank runs the same number of batches (ZeRO-3 gathers weights collectively).
    """
    stream = TrainStream(config, ctx, setup, micro, "valid", shuffle=False)
    batches = min(config.eval_batches, max(1, stream.num_samples // (micro * ctx.world.world_size)))
    trainee = engine.module
    trainee.eval()
    sums = torch.zeros(6, dtype=torch.float64)  # masked, loss sum, correct, agree, teacher KL sum, teacher correct
    for _ in log.progress(range(batches), desc="general eval", unit="batch"):
        batch = engine.to_device(stream.next_batch())
        logits, _ = engine.forward(**trainee.inputs(batch))
        logits = logits.float()
        t_logits = teachers.masked_logits(setup.teacher, batch)
        logp, t_logp = logits.log_softmax(-1), t_logits.log_softmax(-1)
        sums += torch.tensor([
            len(batch["labels"]), -logp.gather(-1, batch["labels"][:, None]).sum().item(),
            (logits.argmax(-1) == batch["labels"]).sum().item(), (logits.argmax(-1) == t_logits.argmax(-1)).sum().item(),
            (t_logp.exp() * (t_logp - logp)).sum().item(), (t_logits.argmax(-1) == batch["labels"]).sum().item()],
            dtype=torch.float64)
    trainee.train()
    sums = dist.all_reduce_sum(sums)
    n = max(sums[0].item(), 1.0)
    return {"eval/mlm_loss": sums[1].item() / n, "eval/mlm_accuracy": sums[2].item() / n,
            "eval/teacher_top1_agreement": sums[3].item() / n, "eval/teacher_kl": sums[4].item() / n,
            "eval/teacher_mlm_accuracy": sums[5].item() / n,
            "eval/masked_tokens": int(sums[0].item())}
