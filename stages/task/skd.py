"""The `task` stage's teacher team (SKD, docs/skd.md): the members loaded once (their cached logits, or frozen
online models on the device), a sampler per phase, each batch's soft targets, and the counts per member.

The member of a step is a pure function of (seed, phase, step) and, per example, of the example's id
(kd/teams.py), so a resumed run continues the same teacher sequence; the counts are replayed from the
sampler at the end rather than summed while training, so a resumed run reports the whole run's counts.
"""

from __future__ import annotations


import numpy as np
import torch

from formats import team as team_format
from formats.taskdata import check_same_vocab
from kd import teams
from kd.teachers import ATTENTION, place
from pipeline.config import ConfigError
from pipeline.train import trainer
from pipeline.world import World


class TeamTargets:
    """The soft targets of a team: cached logits [K, N, C] or K online teachers, drawn by the sampler."""

    def __init__(self, config, members: list[team_format.Member], student_level: float, *, logits=None,
                 models=None, texts=None, labels=None):
        self.config, self.members = config, members
        self.names = [m.name for m in members]
        self.levels = [m.level for m in members]
        try:
            self.probs = teams.probabilities(config.sampler, names=self.names, levels=self.levels,
                                             scores=[m.score for m in members], student_level=student_level)
        except ValueError as err:
            raise ConfigError(f"sampler: {err}") from None
        self.student_level, self.logits, self.models = student_level, logits, models
        self.texts, self.labels = texts, labels
        self.sampler: teams.TeamSampler | None = None
        self.current: np.ndarray | None = None
        self.phases: list[tuple[teams.TeamSampler, int]] = []

    @property
    def cached(self) -> bool:
        """True when the soft targets come from the member caches (no teacher forward)."""
        return self.logits is not None

    def start_phase(self, seed: int, total: int, device) -> None:
        """A sampler for a phase of `total` steps; online members on `device`."""
        self.sampler = teams.TeamSampler.build(self.config.sampler, self.probs, self.levels, seed, total)
        self.phases.append((self.sampler, seed))
        for model in self.models or []:
            place(model, device, "auto")

    def fill(self, batch: dict, step: int, pick: torch.Tensor) -> int:
        """Draw the members of this step's examples; put cached logits in `batch`. Returns the examples an
        online teacher will run on."""
        self.current = self.sampler.teachers(step, pick.numpy())
        if self.cached:
            batch["t_logits"] = self.logits[torch.from_numpy(self.current), pick]
            return 0
        return len(pick)

    def teacher(self, batch: dict, reference):
        """The teacher `phase_loss` runs online for this batch: the step's member (unit step); per example the
        members' own logits go into `batch` first. With cached targets nothing runs (`reference` is unused)."""
        if self.cached:
            return reference
        if self.sampler.unit == "step" or self.sampler.law == "curriculum":
            return self.models[int(self.current[0])]
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "t_logits", "t_cls")}
        choices = torch.from_numpy(self.current).to(batch["input_ids"].device)
        batch["t_logits"] = teams.routed_logits(self.models, inputs, choices)
        return reference

    def shares(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each member's share of this batch's examples, for the per-window log (`train/team_<name>`)."""
        share = np.bincount(self.current, minlength=len(self.names)) / max(len(self.current), 1)
        return {f"team_{n}": torch.tensor(float(s), device=like.device) for n, s in zip(self.names, share)}

    def counts(self, n: int, batch_size: int) -> dict[str, float]:
        """Steps (unit step) or examples (unit example) taught by each member over every team phase."""
        per, unit = np.zeros(len(self.names), dtype=np.int64), self.config.sampler.unit
        for sampler, seed in self.phases:
            for step in range(sampler.total):
                if unit == "step":
                    per[sampler.step_teacher(step)] += 1
                else:
                    pick = trainer.example_indices(step, n, batch_size, seed, World())
                    per += np.bincount(sampler.teachers(step, pick.numpy()), minlength=len(per))
        out = {f"team_{unit}s_{name}": int(c) for name, c in zip(self.names, per)}
        return {**out, **{f"team_p_{name}": float(p) for name, p in zip(self.names, self.probs)}}

    def describe(self) -> dict:
        """The team, its levels and scores, the law and its probabilities (the manifest's `extra.team`)."""
        return {"law": self.config.sampler.law, "unit": self.config.sampler.unit, "cached": self.cached,
                "student_level": self.student_level,
                "members": [{"name": m.name, "level": m.level, "dev_score": m.score, "p": float(p)}
                            for m, p in zip(self.members, self.probs)]}


def load(config, ctx, tokenizer, label_names: list[str], student) -> TeamTargets | None:
    """The team of `config.team` with its cached logits (every member has a cache) or online teachers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not config.team:
        return None
    members = team_format.read(ctx.input_dir("team"))
    for m in members:
        check_same_vocab(tokenizer, AutoTokenizer.from_pretrained(m.model_dir), f"team member {m.name!r}")
    level = config.sampler.student_level or teams.capacity(student.config)
    if members[0].cache:
        if config.augmented:
            raise ConfigError("team: its members' caches are the training set (one shared augmentation); "
                              "drop `augmented` from this task stage")
        texts, labels, logits = team_format.load_caches(members, label_names)
        return TeamTargets(config, members, level, logits=logits, texts=texts, labels=labels)
    models = []
    for m in members:  # each online teacher loaded once, frozen; placed on the device per phase
        model = AutoModelForSequenceClassification.from_pretrained(m.model_dir, attn_implementation=ATTENTION)
        if model.config.num_labels != len(label_names) and model.config.num_labels != 1:
            raise ConfigError(f"team member {m.name!r}: {model.config.num_labels} labels, the task {len(label_names)}")
        models.append(model.eval().requires_grad_(False))
    return TeamTargets(config, members, level, models=models)
