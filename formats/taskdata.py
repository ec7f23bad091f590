"""Task data: GLUE-style TSV/CSV/JSONL files or a local Hugging Face `datasets` folder, as labelled examples.

A `TaskData` config names the files, the text columns (one for single sentences, two for pairs), the label
column and the task preset (the GLUE names). Loading gives `Examples`; `encode` and `batches` turn them into
padded tensors. Every user-fixable problem (missing file or column, empty file, a dev label never seen in
train) is a one-line ConfigError naming the file and the fix.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline import log
from pipeline.config import ConfigError


@dataclass(frozen=True)
class Preset:
    """What a GLUE task looks like: its text columns, label column, metrics and label kind."""

    text_columns: tuple[str, ...]
    label_column: str = "label"
    metrics: tuple[str, ...] = ("accuracy",)
    regression: bool = False


PRESETS = {
    "sst2": Preset(("sentence",)),
    "cola": Preset(("sentence",), metrics=("mcc",)),
    "mrpc": Preset(("sentence1", "sentence2"), metrics=("accuracy", "f1")),
    "qqp": Preset(("question1", "question2"), metrics=("accuracy", "f1")),
    "stsb": Preset(("sentence1", "sentence2"), metrics=("pearson", "spearman"), regression=True),
    "mnli": Preset(("sentence1", "sentence2")),
    "qnli": Preset(("question", "sentence")),
    "rte": Preset(("sentence1", "sentence2")),
    "wnli": Preset(("sentence1", "sentence2")),
}
"""GLUE task name -> preset; `task: custom` takes everything from the config."""


@dataclass(kw_only=True)
class TaskData:
    """Where a task's labelled data is and how to read it."""

    task: str = "sst2"
    """GLUE preset (sst2, cola, mrpc, qqp, stsb, mnli, qnli, rte, wnli) or `custom`."""
    source: str | None = field(default=None, metadata={"input": True})
    """An upstream stage (e.g. "@wordnet") whose folder `train` and `dev` are relative to; None: paths as given."""
    train: str = ""
    """Training file (.tsv/.csv/.jsonl) or `hf:DIR[:split]` for a `datasets` folder saved with save_to_disk."""
    dev: str = ""
    """Dev file, same forms as `train` (early stopping and model selection read it)."""
    test: str = ""
    """Labelled test file, same forms as `train`, that nothing selects on; empty: carve one from `train`."""
    test_fraction: float = 0.1
    """Without `test`: share of the train file's rows set aside as the test split, drawn by the run seed
    (`formats.testsplit`); they are removed from train and from everything made from train."""
    text_columns: list[str] = field(default_factory=list)
    """One column (single sentences) or two (sentence pairs); empty = the preset's."""
    label_column: str = ""
    """Label column; empty = the preset's."""
    metrics: list[str] = field(default_factory=list)
    """Metrics to report (accuracy, f1, mcc, pearson, spearman); empty = the preset's."""
    regression: bool | None = None
    """Real-valued labels (STS-B); None = the preset's."""
    max_length: int = 128
    """Longest tokenized input; longer ones are truncated."""
    limit_train: int | None = None
    """Use only the first N training rows (quick runs and tests)."""
    limit_dev: int | None = None
    """Use only the first N dev rows."""
    limit_test: int | None = None
    """Use only the first N test rows (of the file, or of the carved split)."""

    def __post_init__(self):
        if self.task != "custom" and self.task not in PRESETS:
            raise ValueError(f"task must be one of {', '.join(PRESETS)} or custom, got {self.task!r}")
        if self.task == "custom" and not (self.text_columns and self.label_column and self.metrics):
            raise ValueError("task custom needs text_columns, label_column and metrics")
        if len(self.text_columns) > 2:
            raise ValueError(f"text_columns takes one or two columns, got {self.text_columns}")
        from kd.metrics import METRICS

        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise ValueError(f"unknown metrics {bad} (known: {', '.join(METRICS)})")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}")

    @property
    def preset(self) -> Preset:
        """The preset with the config's explicit settings applied."""
        base = PRESETS.get(self.task, Preset(tuple(self.text_columns)))
        return Preset(
            tuple(self.text_columns) or base.text_columns,
            self.label_column or base.label_column,
            tuple(self.metrics) or base.metrics,
            base.regression if self.regression is None else self.regression,
        )


@dataclass
class Examples:
    """Texts (one tuple per example: one or two strings) and labels (class index or float)."""

    texts: list[tuple[str, ...]]
    labels: np.ndarray
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def _read_rows(spec: str) -> tuple[list[dict], list[str]]:
    """Rows as dicts and the column names, from a TSV/CSV/JSONL file or `hf:DIR[:split]`."""
    if spec.startswith("hf:"):
        import datasets

        where, _, split = spec[3:].partition(":")
        if not Path(where).is_dir():
            raise ConfigError(f"{where}: datasets folder not found (save one with Dataset.save_to_disk)")
        data = datasets.load_from_disk(where)
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ConfigError(f"{spec}: no split {split!r} (has: {', '.join(data)}); write hf:DIR:SPLIT")
            data = data[split]
        return [dict(r) for r in data], list(data.column_names)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"{path}: task data file not found (set train/dev to an existing .tsv, .csv or .jsonl)")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return rows, list(rows[0]) if rows else []
    with open(path, newline="") as handle:
        if path.suffix == ".tsv":  # GLUE TSVs hold unbalanced quotes, so no quoting
            reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        elif path.suffix == ".csv":
            reader = csv.DictReader(handle)
        else:
            raise ConfigError(f"{path}: unknown task data format {path.suffix!r} (use .tsv, .csv, .jsonl or hf:DIR)")
        rows = list(reader)
        return rows, list(reader.fieldnames or [])


def read_rows(data: TaskData, which: Literal["train", "dev", "test"]) -> tuple[str, list[dict]]:
    """(file spec, every row) of one split, its columns checked against the preset; no limit applied."""
    spec = getattr(data, which)
    if not spec:
        raise ConfigError(f"data.{which}: no file given")
    preset = data.preset
    rows, columns = _read_rows(spec)
    if not rows:
        raise ConfigError(f"{spec}: no rows (empty {which} file)")
    missing = [c for c in (*preset.text_columns, preset.label_column) if c not in columns]
    if missing:
        raise ConfigError(f"{spec}: missing column(s) {', '.join(missing)} (has: {', '.join(columns)}); "
                          "set data.text_columns / data.label_column")
    return spec, rows


def raw_labels(data: TaskData, rows: list[dict]) -> list[str]:
    """The label column of `rows` as stripped strings."""
    return [str(r[data.preset.label_column]).strip() for r in rows]


def sorted_labels(raw: list[str]) -> list[str]:
    """Label names in index order: integers numerically first, then the rest alphabetically."""
    return sorted(set(raw), key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))


def to_examples(data: TaskData, spec: str, rows: list[dict], label_names: list[str] | None = None,
                known_as: str = "train") -> Examples:
    """Examples from rows; class labels are mapped to indices of `label_names` (from the rows when None)."""
    preset = data.preset
    texts = [tuple(str(r[c] or "").strip() for c in preset.text_columns) for r in rows]
    raw = raw_labels(data, rows)
    if preset.regression:
        try:
            return Examples(texts, np.array([float(v) for v in raw], np.float32), [])
        except ValueError as err:
            raise ConfigError(f"{spec}: label column {preset.label_column}: {err} (regression needs numbers)") from None
    label_names = sorted_labels(raw) if label_names is None else label_names
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(raw) - set(index))
    if unknown:
        raise ConfigError(f"{spec}: labels {unknown[:5]} never seen in {known_as} (known: {label_names}); "
                          "check the label column")
    return Examples(texts, np.array([index[v] for v in raw], np.int64), list(label_names))


LIMITS = {"train": "limit_train", "dev": "limit_dev", "test": "limit_test"}
"""Split -> the TaskData field that caps its rows."""


def load_split(data: TaskData, which: Literal["train", "dev", "test"],
               label_names: list[str] | None = None) -> Examples:
    """Read one split as a file (no carve: see `formats.testsplit.load_splits`); class labels are mapped to
    indices of `label_names` (from train when None)."""
    spec, rows = read_rows(data, which)
    limit = getattr(data, LIMITS[which])
    return to_examples(data, spec, rows[:limit] if limit else rows, label_names)


def with_source(data: TaskData, ctx) -> TaskData:
    """`data` with `train`/`dev`/`test` made absolute under the upstream `data.source` stage's folder, if one is set."""
    if data.source is None:
        return data
    base = ctx.input_dir("data.source")
    join = lambda spec: f"hf:{base / spec[3:]}" if spec.startswith("hf:") else (str(base / spec) if spec else spec)  # noqa: E731
    return dataclasses.replace(data, train=join(data.train), dev=join(data.dev), test=join(data.test))


def load_task(data: TaskData) -> tuple[Examples, Examples]:
    """Train and dev examples sharing one label vocabulary (taken from train)."""
    train = load_split(data, "train")
    return train, load_split(data, "dev", train.label_names or None)


def encode(tokenizer, texts: list[tuple[str, ...]], max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and token type ids per example; sentence pairs are joined the way BERT expects."""
    first = [t[0] for t in texts]
    second = [t[1] for t in texts] if texts and len(texts[0]) > 1 else None
    enc = tokenizer(first, second, truncation=True, max_length=max_length, add_special_tokens=True)
    ids = [list(x) for x in enc["input_ids"]]
    types = enc.get("token_type_ids") or [[0] * len(x) for x in ids]
    return ids, [list(t) for t in types]


def pad_batch(ids: list[list[int]], types: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sequence: input_ids, token_type_ids, attention_mask."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    token_types = torch.zeros((len(ids), width), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, (x, t) in enumerate(zip(ids, types)):
        input_ids[row, : len(x)] = torch.tensor(x)
        token_types[row, : len(t)] = torch.tensor(t)
        mask[row, : len(x)] = 1
    return {"input_ids": input_ids, "token_type_ids": token_types, "attention_mask": mask}


def check_same_vocab(tokenizer, other, what: str) -> None:
    """Refuse a model or tokenizer whose vocabulary differs from the teacher tokenizer's."""
    if tokenizer.get_vocab() != other.get_vocab():
        raise ConfigError(f"{what}: its vocabulary ({len(other)} tokens) differs from the teacher tokenizer's "
                          f"({len(tokenizer)}); use a student built for the teacher's tokenizer")


@torch.no_grad()
def predict(model, ids: list[list[int]], types: list[list[int]], pad_id: int, batch_size: int = 64) -> np.ndarray:
    """Logits of a sequence classifier over encoded examples, in order, in eval mode, on the model's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    order = np.argsort([len(x) for x in ids], kind="stable")  # length-sorted batches pad less
    for start in log.progress(range(0, len(ids), batch_size), desc="predict", unit="batch"):
        pick = order[start : start + batch_size]
        batch = pad_batch([ids[i] for i in pick], [types[i] for i in pick], pad_id)
        out.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu())
    model.train(was_training)
    logits = torch.cat(out).numpy()
    result = np.empty_like(logits)
    result[order] = logits
    return result


def predictions(logits: np.ndarray, regression: bool) -> np.ndarray:
    """Class index per row, or the single regression output."""
    return logits[:, 0] if regression else logits.argmax(axis=1)
