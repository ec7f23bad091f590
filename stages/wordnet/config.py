"""The `wordnet` stage's typed config: every field documented, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class Config:
    """Where WordNet is and how to split it."""

    source: str = "/usr/share/wordnet"
    """Folder holding WordNet 3.0's data.noun, data.verb, data.adj, data.adv (Debian: apt-get install wordnet-base)."""
    dev_fraction: float = 0.1
    """Share of synsets held out for dev, chosen by a hash of (pos, offset): stable across runs."""
    max_train: int | None = None
    """Keep at most this many training examples (the first by hash order); None keeps all."""
    max_dev: int | None = None
    """Keep at most this many dev examples; None keeps all."""
    test_fraction: float = 0.1
    """Share of synsets held out as a test split (test.tsv) that nothing trains or selects on: the numbers a
    run publishes; disjoint from dev by the same hash."""
    max_test: int | None = None
    """Keep at most this many test examples; None keeps all."""
    split_seed: int = 0
    """Salt of the split hash."""

    def __post_init__(self):
        if not 0 < self.dev_fraction < 1:
            raise ValueError(f"dev_fraction must be in (0, 1), got {self.dev_fraction}")
        if not 0 < self.test_fraction < 1 or self.dev_fraction + self.test_fraction >= 1:
            raise ValueError(f"test_fraction must be in (0, 1) with dev_fraction + test_fraction < 1, got "
                             f"{self.test_fraction} (dev_fraction {self.dev_fraction})")
        for name in ("max_train", "max_dev", "max_test"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {value}")
