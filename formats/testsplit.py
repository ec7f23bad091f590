"""The held-out test split of a task: a labelled `data.test` file, or a share of the train file carved by the run seed.

Dev is for early stopping and model selection; the test split is what nothing selected on, so its scores are
the ones to publish. Without `data.test`, `round(test_fraction * N)` of the train file's N rows are set
aside: the first of a permutation of 0..N-1 drawn from the run seed (numpy's PCG64), taken in file order.
The carve is over the whole file, before `limit_train`, so every stage that reads the same train file with
the same seed (teacher_finetune, augment, task, fastbert, dynabert, prune) removes the same rows, whatever its
limits. Its provenance (`test_split`: source, size, sha256 of the carved rows) goes into each stage's
manifest, and a stage reading another's output refuses one that carved a different split (`check_inputs`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from formats.taskdata import Examples, TaskData, raw_labels, read_rows, sorted_labels, to_examples
from pipeline.config import ConfigError


def carve(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the test rows among `n` train rows: a deterministic function of (n, fraction, seed)."""
    size = int(round(fraction * n))
    if size < 1 or size >= n:
        raise ConfigError(f"data.test_fraction {fraction} of {n} train rows leaves no test or no train row; "
                          "give a labelled data.test file or more train rows")
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def rows_sha256(rows: list[dict], columns: list[str]) -> str:
    """sha256 of the rows' values in `columns` (one JSON list per row, in order): what the split contains."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update((json.dumps([str(row[c]) for c in columns]) + "\n").encode())
    return digest.hexdigest()


@dataclass
class TaskSplits:
    """Train (test rows removed), dev, test, and the test split's provenance (for manifests)."""

    train: Examples
    dev: Examples
    test: Examples
    test_split: dict[str, Any]


def _rows(data: TaskData, seed: int) -> tuple[tuple[str, list[dict]], tuple[str, list[dict]], list[str] | None, dict]:
    """((train spec, train rows), (test spec, test rows), label names of the whole train file, test provenance)."""
    columns = [*data.preset.text_columns, data.preset.label_column]
    spec, rows = read_rows(data, "train")
    if data.test:
        test_spec, test = read_rows(data, "test")
        info = {"source": "file", "size": len(test), "sha256": rows_sha256(test, columns)}
        every = rows
    else:
        picked = carve(len(rows), data.test_fraction, seed)
        chosen = np.zeros(len(rows), dtype=bool)
        chosen[picked] = True
        test_spec, test = f"{spec} (carved test split)", [r for r, c in zip(rows, chosen) if c]
        every, rows = rows, [r for r, c in zip(rows, chosen) if not c]
        info = {"source": "carved", "fraction": data.test_fraction, "seed": seed, "size": len(test),
                "train_file_rows": len(every), "sha256": rows_sha256(test, columns)}
    names = None if data.preset.regression else sorted_labels(raw_labels(data, every))
    return (spec, rows), (test_spec, test), names, info


def _limited(rows: list[dict], limit: int | None) -> list[dict]:
    return rows[:limit] if limit else rows


def load_train(data: TaskData, seed: int) -> tuple[Examples, dict[str, Any]]:
    """The training examples (test rows removed, `limit_train` applied) and the test split's provenance."""
    (spec, rows), _, names, info = _rows(data, seed)
    return to_examples(data, spec, _limited(rows, data.limit_train), names), info


def load_splits(data: TaskData, seed: int) -> TaskSplits:
    """Train, dev and test sharing one label vocabulary (the train file's labels)."""
    (spec, rows), (test_spec, test_rows), names, info = _rows(data, seed)
    train = to_examples(data, spec, _limited(rows, data.limit_train), names)
    dev_spec, dev_rows = read_rows(data, "dev")
    dev = to_examples(data, dev_spec, _limited(dev_rows, data.limit_dev), names)
    test = to_examples(data, test_spec, _limited(test_rows, data.limit_test), names)
    return TaskSplits(train, dev, test, {**info, "used": len(test)})


def check_same_split(mine: dict[str, Any], other: dict[str, Any] | None, where: str) -> None:
    """Refuse an upstream output whose training data held out a different test split (so test rows could
    have been trained on); outputs written before test splits existed carry none and are let through."""
    if other is None:
        return
    if other.get("sha256") != mine.get("sha256"):
        raise ConfigError(f"{where}: it held out a different test split ({other.get('source')}, {other.get('size')} "
                          f"rows) than this stage ({mine.get('source')}, {mine.get('size')} rows); give both stages "
                          "the same data.train, data.test, data.test_fraction and run seed")


def check_inputs(ctx, mine: dict[str, Any], *fields: str) -> None:
    """`check_same_split` for each upstream input among `fields` (e.g. "teacher", "augmented") this run has."""
    for name in fields:
        if name in ctx.inputs:
            check_same_split(mine, ctx.input_manifest(name).extra.get("test_split"), f"{name} {ctx.input_dir(name)}")


def describe(info: dict[str, Any]) -> str:
    """One line for logs: where the test split came from and its size."""
    if info.get("source") == "file":
        return f"test split: the data.test file, {info['size']} rows"
    return (f"test split: {info['size']} of {info['train_file_rows']} train rows carved by seed {info['seed']} "
            f"(test_fraction {info['fraction']})")

