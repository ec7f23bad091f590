"""A teacher team: what the `team` stage writes and the `task` stage reads (SKD, docs/skd.md).

`team.json` lists the members in team order, each with its model folder and weights hash, its level
(capacity), dev metrics and, when its targets are cached, the `augment` output holding its logits. A team
cache is the set of member caches over one shared augmentation: every member's cache must hold that
member's teacher's outputs, over the same augmented text (data hash), made with the same tokenizer. A
reader re-checks all of it, member by member, and refuses a mismatch in one line naming the member.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from formats import augmented
from formats.models import weights_sha256
from pipeline.config import ConfigError
from pipeline.manifest import Manifest, ManifestError, OutputFile, atomic_write_text

TEAM_FILE = "team.json"
SHARED_KEYS = ("tokenizer_sha256", "data_sha256")
"""What every member cache shares with the first: the tokenizer and the augmented text (the 'masks')."""


@dataclass(kw_only=True)
class Member:
    """One teacher of the team."""

    name: str
    model_dir: str
    """The member's model folder (in team.json relative to the team stage directory when in the same run)."""
    teacher_sha256: str
    level: float
    """Capacity: layers x width, or the level given in the config."""
    layers: int
    width: int
    params: int
    dev: dict = field(default_factory=dict)
    """Dev metrics of the member (with `score`)."""
    cache: str | None = None
    """The `augment` output with this member's cached logits (None: online only); stored like `model_dir`."""

    @property
    def score(self) -> float:
        """The member's dev score (what the quality law weighs)."""
        return float(self.dev.get("score", 0.0))


def _stored(path: str | None, stage_dir: Path) -> str | None:
    """A path as team.json keeps it: relative to the stage directory when both are in one run directory, so
    a run directory copied or moved whole still reads its own members."""
    if path is None:
        return None
    run_dir = Path(stage_dir).resolve().parent
    full = Path(path).resolve()
    return os.path.relpath(full, Path(stage_dir).resolve()) if full.is_relative_to(run_dir) else str(full)


def write(stage_dir: Path, members: list[Member]) -> OutputFile:
    """Write `team.json` atomically; return its manifest entry."""
    body = {"members": [{**asdict(m), "model_dir": _stored(m.model_dir, stage_dir),
                         "cache": _stored(m.cache, stage_dir)} for m in members]}
    atomic_write_text(Path(stage_dir) / TEAM_FILE, json.dumps(body, indent=2, sort_keys=True) + "\n")
    return OutputFile.of(stage_dir, TEAM_FILE, samples=len(members))


def read(stage_dir: Path) -> list[Member]:
    """The members of a team stage, each checked against its model folder's weights as they are now."""
    path = Path(stage_dir) / TEAM_FILE
    try:
        rows = json.loads(path.read_text())["members"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise ManifestError(f"{path}: unreadable team description ({err}); rerun the team stage") from None
    here = Path(stage_dir).resolve()
    def full(path: str | None) -> str | None:
        return os.path.normpath(here / path) if path else None

    members = [Member(**{**row, "model_dir": full(row["model_dir"]), "cache": full(row.get("cache"))}) for row in rows]
    for m in members:
        if weights_sha256(Path(m.model_dir)) != m.teacher_sha256:
            raise ConfigError(f"team member {m.name!r}: the weights in {m.model_dir} changed since the team was "
                              "assembled; rerun the team stage")
    return members


def check_member_cache(name: str, cache_dir: Path, teacher_dir: Path, first: tuple[str, dict] | None) -> dict:
    """The provenance of member `name`'s cache, refused (ConfigError, one line naming the member) unless it
    holds this member's teacher outputs and shares the tokenizer and augmented text of member `first`."""
    try:
        manifest = Manifest.load(cache_dir)
    except ManifestError as err:
        raise ConfigError(f"team member {name!r}: {err}") from None
    if manifest.stage != "augment" or not manifest.extra.get("has_teacher_outputs"):
        raise ConfigError(f"team member {name!r}: {cache_dir} holds no cached teacher logits; point its "
                          "`augmented` at an augment stage whose `teacher` is this member")
    have = manifest.extra["provenance"]
    parts = [o.sha256 for o in manifest.outputs if o.path.startswith("part-")]
    want = augmented.provenance(teacher_dir, parts)
    for key in ("teacher_sha256", *SHARED_KEYS):
        if have.get(key) != want[key]:
            raise ConfigError(f"team member {name!r}: its cache {cache_dir} was made with another "
                              f"{key.split('_')[0]} than its files say; rerun that augment stage")
    if first is not None:
        other, prov = first
        for key in SHARED_KEYS:
            if have.get(key) != prov.get(key):
                what = "tokenizer" if key.startswith("tokenizer") else "augmented data (data hash)"
                raise ConfigError(f"team member {name!r}: its cache has another {what} than member {other!r} "
                                  f"({have.get(key, '?')[:12]} != {prov.get(key, '?')[:12]}); every member's "
                                  "augment must run on the same data, seed and tokenizer")
    return have


def check_caches(members: list[Member]) -> None:
    """Refuse a team whose caches are not one shared augmentation (or where only some members have one)."""
    cached = [m for m in members if m.cache]
    if cached and len(cached) != len(members):
        missing = next(m.name for m in members if not m.cache)
        raise ConfigError(f"team member {missing!r}: has no cache while others do; give every member its "
                          "`augmented` or none (online teachers)")
    first = None
    for m in cached:
        prov = check_member_cache(m.name, Path(m.cache), Path(m.model_dir), first)
        first = first or (m.name, prov)


def load_caches(members: list[Member], label_names: list[str]):
    """The shared augmented texts and labels, and each member's cached logits [N, C], in team order."""
    check_caches(members)
    logits, texts, labels = [], None, None
    for m in members:
        manifest = Manifest.load(Path(m.cache))
        if manifest.extra.get("label_names") != label_names:
            raise ConfigError(f"team member {m.name!r}: cache labels {manifest.extra.get('label_names')} != task "
                              f"labels {label_names}")
        t, lab, tensors = augmented.load_cache(Path(m.cache), manifest, Path(m.model_dir))
        texts, labels = (t, lab) if texts is None else (texts, labels)
        logits.append(tensors["logits"])
    return texts, labels, torch.stack(logits)
