"""The `general` stage's teacher team (SKD, docs/skd.md): masked-LM teachers with a cache each (one shared
corpus, tokenizer and masks, checked member by member) or online, and the soft targets of each step drawn
from one of them by `kd.teams`.

With caches, the loader joins every member's cache to each batch (`formats.loader.team_key`), and
`Team.targets` keeps the drawn member's rows as the plain cached-target keys, so the soft loss is the one
of a single cache. The member of a step is a pure function of (run seed, optimizer step) and, per example, of
the sample's key, so a resumed run on any number of ranks continues the same teacher sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from formats import models
from formats.loader import SAMPLE_IDS, team_key
from kd import teachers, teams
from kd.masking import MaskSpec
from pipeline import log
from pipeline.config import ConfigError
from pipeline.train import dist

TARGETS = ("topk_ids", "topk_logp", "tail_logmass", "tail_logmass_t", "sampled_ids", "sampled_counts")
"""The cached-target keys a member contributes to each batch."""


@dataclass(kw_only=True)
class Member:
    """A team member as the stage uses it."""

    name: str
    teacher_dir: Path
    level: float
    score: float | None
    cache_dir: Path | None = None
    tail_column: int | None = None
    """Its cache's `tail_logmass_t` column at the training temperature (None: T=1)."""
    model: torch.nn.Module | None = None
    """The frozen online teacher (no cache)."""


def _member_name(config, index: int) -> str:
    return f"team member {config.team[index].name!r}"


def check_cache(config, ctx, index: int, teacher_dir: Path, corpus_manifest, first
                ) -> tuple[MaskSpec, dict, int | None, float | None]:
    """Member `index`'s cache: this member's teacher, the corpus and tokenizer, the masks and target layout of
    `first` (the first member's (mask, provenance), None for the first). Returns (masks, provenance, tail
    column, its teacher's masked-LM accuracy)."""
    from formats.cache import check_provenance, check_sample_temperature, tail_column

    who = _member_name(config, index)
    cache = ctx.input_manifest(f"team.{index}.cache")
    try:
        check_provenance(cache, corpus_manifest, tokenizer_sha256=corpus_manifest.extra.get("tokenizer_sha256"))
    except ConfigError as err:
        raise ConfigError(f"{who}: {err}") from None
    prov = cache.extra["provenance"]
    if prov.get("teacher_sha256") != models.weights_sha256(teacher_dir):
        raise ConfigError(f"{who}: cache {cache.name!r} holds teacher {prov.get('teacher_id')!r}, whose weights differ "
                          f"from {teacher_dir}; point the member's cache at its own teacher's cache")
    where = f"{who}: cache {cache.name!r}"
    mask = MaskSpec.from_dict(cache.extra["mask"], where)
    if first is not None:
        first_mask, first_prov = first
        mine, theirs = mask.to_dict(), first_mask.to_dict()
        if mine != theirs:
            diff = ", ".join(f"{k} {mine.get(k)} vs {theirs.get(k)}" for k in sorted(set(mine) | set(theirs))
                             if mine.get(k) != theirs.get(k))
            raise ConfigError(f"{where} has other masks than member {config.team[0].name!r}'s cache ({diff}); "
                              "rebuild it with the same mask settings")
        for key in ("k", "sampled"):
            if prov.get(key) != first_prov.get(key):
                raise ConfigError(f"{where} has {key}={prov.get(key)}, member {config.team[0].name!r}'s cache "
                                  f"{first_prov.get(key)}; build every member's cache with the same k and sampled")
    if config.cache_targets == "sampled" and not prov.get("sampled"):
        raise ConfigError(f"{where} has no sampled targets (sampled: 0); use cache_targets: topk or rebuild it")
    try:
        if config.cache_targets == "sampled":
            check_sample_temperature(cache, config.temperature)
            column = None
        else:
            column = tail_column(cache, config.temperature)
    except ConfigError as err:
        raise ConfigError(f"{who}: {err}") from None
    return mask, prov, column, cache.metrics.get("teacher_mlm_accuracy")


class Team:
    """The members, the law's probabilities and the phase's sampler; each step's soft targets."""

    def __init__(self, config, members: list[Member], student_level: float, seed: int):
        self.config, self.members = config, members
        self.names = [m.name for m in members]
        self.levels = [m.level for m in members]
        scores = [m.score for m in members]
        if config.sampler.law == "quality" and any(s is None for s in scores):
            missing = [m.name for m in members if m.score is None]
            raise ConfigError(f"sampler law quality: team member(s) {', '.join(missing)} have no score; give "
                              "`score` in the member's entry")
        try:
            self.probs = teams.probabilities(config.sampler, names=self.names, levels=self.levels,
                                             scores=[s if s is not None else 0.0 for s in scores],
                                             student_level=student_level)
        except ValueError as err:
            raise ConfigError(f"sampler: {err}") from None
        self.student_level = student_level
        self.sampler = teams.TeamSampler.build(config.sampler, self.probs, self.levels, seed, config.max_steps)
        self.example_counts = torch.zeros(len(members), dtype=torch.float64)

    @property
    def cached(self) -> bool:
        """True when the soft targets come from the member caches (no teacher forward)."""
        return self.members[0].cache_dir is not None

    def choices(self, batch: dict[str, torch.Tensor], step: int) -> np.ndarray:
        """The member teaching each sample of this micro-batch at optimizer step `step` (0-based), on the host."""
        if self.sampler.unit == "example" and self.sampler.law != "curriculum":
            return self.sampler.teachers(step, batch[SAMPLE_IDS].cpu().numpy())
        return np.full(batch["input_ids"].shape[0], self.sampler.step_teacher(step), dtype=np.int64)

    def targets(self, batch: dict[str, torch.Tensor], step: int) -> tuple[dict, torch.Tensor | None, torch.Tensor]:
        """(batch with the drawn members' cached targets under the plain keys, online teacher logits or None,
        each sample's member). The top-k tail at the training temperature is put in `tail_logmass`."""
        picks = self.choices(batch, step)
        self.example_counts += torch.from_numpy(np.bincount(picks, minlength=len(self.members))).double()
        members = np.unique(picks).tolist()
        choice = torch.from_numpy(picks).to(batch["input_ids"].device)
        if not self.cached:
            return batch, self._online_logits(batch, choice, members), choice
        out = {k: v for k, v in batch.items() if not k.startswith("team")}
        per_row = choice[batch["rows"]]
        for key in TARGETS:
            if team_key(0, key) not in batch:
                continue
            stacked = None
            for j in members:
                value = self._target(batch, j, key)
                if stacked is None:
                    stacked = value.clone() if len(members) > 1 else value
                else:
                    rows = per_row == j
                    stacked[rows] = value[rows]
            out[key] = stacked
        out.pop("tail_logmass_t", None)
        return out, None, choice

    def _target(self, batch: dict, j: int, key: str) -> torch.Tensor:
        if key == "tail_logmass" and self.members[j].tail_column is not None:
            return batch[team_key(j, "tail_logmass_t")][:, self.members[j].tail_column]
        return batch[team_key(j, key)]

    @torch.no_grad()
    def _online_logits(self, batch: dict, choice: torch.Tensor, members: list[int]) -> torch.Tensor:
        """Each masked position's logits from its sample's member (of `members`, those drawn); a member runs on
        its own samples only."""
        per_row = choice[batch["rows"]]
        out = None
        for j in members:
            samples = (choice == j).nonzero(as_tuple=True)[0]
            rows = per_row == j
            place = torch.full_like(choice, -1)
            place[samples] = torch.arange(len(samples), device=choice.device)
            sub = {"input_ids": batch["input_ids"][samples], "attention_mask": batch["attention_mask"][samples],
                   "token_type_ids": batch["token_type_ids"][samples], "rows": place[batch["rows"][rows]],
                   "cols": batch["cols"][rows]}
            logits = teachers.masked_logits(self.members[j].model, sub)
            if out is None:
                out = logits.new_empty((len(per_row), logits.shape[1]))
            out[rows] = logits
        return out

    def state_dict(self) -> dict:
        """The examples each member taught so far, summed over ranks (every rank calls this: one all-reduce)."""
        return {"examples": dist.all_reduce_sum(self.example_counts.clone()).tolist()}

    def load_state_dict(self, state: dict | None, rank: int) -> None:
        """Continue the counts of a checkpoint: rank 0 holds the whole run's so far, the others start at 0."""
        if state and rank == 0:
            self.example_counts = torch.tensor(state["examples"], dtype=torch.float64)

    def shares(self, choice: torch.Tensor, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each member's share of this micro-batch's samples, for the per-window log (`train/team_<name>`)."""
        share = torch.bincount(choice, minlength=len(self.names)).to(like.dtype) / max(len(choice), 1)
        return {f"team_{n}": share[i] for i, n in enumerate(self.names)}

    def counts(self, total: int) -> dict[str, float]:
        """Steps (unit step, replayed from the sampler: a resumed run reports the whole run) or examples (unit
        example, counted on every rank and carried by the checkpoints) taught by each member, and each p."""
        if self.sampler.unit == "step" or self.sampler.law == "curriculum":
            per = np.bincount([self.sampler.step_teacher(s) for s in range(total)], minlength=len(self.names))
            out = {f"team_steps_{n}": int(c) for n, c in zip(self.names, per)}
        else:
            per = dist.all_reduce_sum(self.example_counts.clone())
            out = {f"team_examples_{n}": int(c) for n, c in zip(self.names, per.tolist())}
        return {**out, **{f"team_p_{n}": float(p) for n, p in zip(self.names, self.probs)}}

    def describe(self) -> dict:
        """The team, its levels and scores, the law and its probabilities (the manifest's `extra.team`)."""
        s = self.config.sampler
        return {"law": s.law, "unit": s.unit, "temperature": s.temperature, "cached": self.cached,
                "student_level": self.student_level,
                "members": [{"name": m.name, "level": m.level, "score": m.score, "p": float(p),
                             "teacher_dir": str(m.teacher_dir), "cache_dir": str(m.cache_dir) if m.cache_dir else None}
                            for m, p in zip(self.members, self.probs)]}


def load(config, ctx, tokenizer, reference, corpus_manifest) -> tuple[list[Member], MaskSpec | None]:
    """The members of `config.team`, checked: each teacher fits the corpus tokenizer and the reference's
    vocabulary; each cache is its teacher's, over the corpus, with the first member's masks. Returns the
    members and their shared masks (None when they run online)."""
    out, first, spec = [], None, None
    for index, entry in enumerate(config.team):
        who = _member_name(config, index)
        folder = models.upstream_model(ctx, entry.teacher, entry.teacher_path, role=f"team.{index}.teacher")
        model = teachers.load_masked_lm(folder, dtype=config.teacher_dtype)
        try:
            teachers.check_tokenizer(folder, tokenizer, model)
        except ConfigError as err:
            raise ConfigError(f"{who}: {err}") from None
        if model.config.vocab_size != reference.config.vocab_size:
            raise ConfigError(f"{who}: vocabulary of {model.config.vocab_size} ids, the reference teacher's "
                              f"{reference.config.vocab_size}; every member must share the student's vocabulary")
        member = Member(name=entry.name, teacher_dir=folder, level=entry.level or teams.capacity(model.config),
                        score=entry.score)
        if entry.cache is not None:
            mask, prov, member.tail_column, score = check_cache(config, ctx, index, folder, corpus_manifest, first)
            first, spec = first or (mask, prov), spec or mask
            member.cache_dir = ctx.input_dir(f"team.{index}.cache")
            member.score = entry.score if entry.score is not None else score
            del model  # cached: never run
        else:
            member.model = model
        out.append(member)
    return out, spec


@torch.no_grad()
def score_online(members: list[Member], batches: list[dict]) -> None:
    """Masked-LM accuracy on `batches` (the valid split) for each online member without a given score."""
    for m in members:
        if m.model is None or m.score is not None:
            continue
        correct = masked = 0
        for batch in batches:
            correct += int((teachers.masked_logits(m.model, batch).argmax(-1) == batch["labels"]).sum())
            masked += len(batch["labels"])
        m.score = correct / max(masked, 1)


def build(config, ctx, setup, student, settings, valid) -> Team:
    """The run's `Team`: online members placed on the device and, without a given score, scored on
    `eval_batches` batches of `valid()` (a stream of the valid split); one sampler over `max_steps`, seeded
    by the run seed."""
    level = config.sampler.student_level or teams.capacity(student.config)
    members = setup.members
    online = [m for m in members if m.model is not None]
    for m in online:
        teachers.place(m.model, settings.device, config.teacher_dtype)
    if any(m.score is None for m in online):
        stream = valid()
        batches = [{k: v.to(settings.device) for k, v in stream.next_batch().items()}
                   for _ in range(config.eval_batches)]
        score_online(members, batches)
    team = Team(config, members, level, ctx.seed)
    for m, p in zip(members, team.probs):
        score = "no score" if m.score is None else f"score {m.score:.4f}"
        log.info(f"team: {m.name} level {m.level:g} {score} p {p:.3f}")
    ctx.tracker.log_params({f"team_member_{i}": f"{m.name} (level {m.level:g})" for i, m in enumerate(members)})
    return team
