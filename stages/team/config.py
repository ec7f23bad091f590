"""The `team` stage's typed config: every field documented, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from formats.models import check_model_fields
from formats.taskdata import TaskData
from kd.teams import check_member


@dataclass(kw_only=True)
class TeamMember:
    """One teacher of the team: a fine-tuned classifier, and optionally its cached logits."""

    name: str
    """Short name (letters, digits, `_`, `-`, `.`): it names the member in logs, metrics and errors."""
    teacher: str | None = field(default=None, metadata={"input": True})
    """Fine-tuned teacher stage, e.g. `@teacher_finetune` or a truncated `@teacher_l2`."""
    teacher_path: str | None = None
    """Or a fine-tuned classifier folder / pkg: path (exactly one of teacher, teacher_path)."""
    augmented: str | None = field(default=None, metadata={"input": True})
    """`augment` stage whose cached logits are this member's (its `teacher` is this member); None: online."""
    level: float | None = None
    """Capacity used by the capacity and curriculum laws; None: encoder layers x hidden width."""

    def __post_init__(self):
        check_member(self.name, self.level)
        check_model_fields(self.teacher, self.teacher_path)


@dataclass(kw_only=True)
class Config:
    """Assemble a teacher team for stochastic distillation (SKD): each member scored on dev, its level and
    cache checked; the task stage samples from it (`team: "@team"`)."""

    members: list[TeamMember] = field(default_factory=list)
    """The teachers, in team order (at least one)."""
    data: TaskData = field(default_factory=TaskData)
    """Task data: its dev split scores every member."""
    eval_batch_size: int = field(default=128, metadata={"hash": False})
    """Examples per dev forward."""
    device: str = field(default="auto", metadata={"hash": False})
    """"auto" (cuda:LOCAL_RANK with a GPU, else cpu), "cpu", "cuda" or "cuda:i" for scoring."""
    threads: int | None = field(default=None, metadata={"hash": False})
    """CPU threads for torch (None: torch's default)."""

    def __post_init__(self):
        if not self.members:
            raise ValueError("members: give at least one teacher ({name, teacher or teacher_path})")
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"members: names must be distinct, got {names}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
