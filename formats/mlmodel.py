"""The MLflow Model inside a model folder, and its model card.

A model folder is at once a Hugging Face folder (what the next stage loads with `from_pretrained`) and an
MLflow Model with the transformers flavor (what `mlflow.pyfunc.load_model`, `mlflow models serve` and
`mlflow.evaluate` load): `MLmodel`, a signature, an input example, pinned requirements and `README.md`, the
model card. MLflow's own writer saves the weights a second time under `model/`; we drop that copy and point
the flavor's `model_binary` at the folder itself, so the weights exist once and one artifact is both.

The files are deterministic for given weights (the model uuid is derived from them, no creation time), so a
stage killed and rerun writes the same folder; only the card's measured latencies may differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

TASKS = ("text-classification", "fill-mask", "feature-extraction")
"""Pipelines a model folder can be served as: a classifier with its label names, or an MLM student."""
CARD = "README.md"
PINNED = ("mlflow", "torch", "transformers", "tokenizers", "safetensors")
"""What a serving environment needs; versions of this environment, as published on PyPI."""


def requirements() -> list[str]:
    """`pkg==version` for each of PINNED, with local build labels dropped (`2.13.0+cpu` -> `2.13.0`).

    A local label (`+cpu`, `+cu121`) names a wheel that only the PyTorch index has; PyPI has the plain
    version, and it picks the right build for the machine that installs it.
    """
    from packaging.version import Version

    pins = []
    for package in PINNED:
        try:
            pins.append(f"{package}=={Version(version(package)).public}")
        except PackageNotFoundError:
            continue
    return pins


def task_of(model: Any) -> str:
    """The pipeline a model class serves: sequence classifiers classify, masked LMs fill masks, else features."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "text-classification"
    if name.endswith("ForMaskedLM"):
        return "fill-mask"
    return "feature-extraction"


def default_examples(task: str, tokenizer: Any) -> list[str]:
    """An input example when the stage gave none: two short sentences (one with the mask token for fill-mask)."""
    if task == "fill-mask":
        return [f"The film was {tokenizer.mask_token}.", f"A {tokenizer.mask_token} of the body."]
    return ["a gripping, beautifully acted film", "the plot never comes together"]


@dataclass(kw_only=True)
class ModelCard:
    """What README.md says about a model: where it came from, how it was made, how good and how fast it is."""

    title: str
    """Heading: `run/stage (stage type)`."""
    task: str = "feature-extraction"
    """The pipeline the model is served as."""
    labels: list[str] = field(default_factory=list)
    """Class names of a classifier, in logit order."""
    distilled_from: list[str] = field(default_factory=list)
    """One line per teacher or source model: the config field, its reference and where it resolved."""
    recipe: dict[str, Any] = field(default_factory=dict)
    """The stage's config as run (its config.yaml)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Scores and counts; `speedup`, `teacher_latency_ms`, `student_latency_ms` feed the speed-up section."""
    lineage: list[dict] = field(default_factory=list)
    """Upstream outputs nearest first (pipeline.tracking.lineage.lineage_chain rows)."""

    def markdown(self) -> str:
        """The card as Markdown with Hugging Face front matter."""
        import yaml

        lines = ["---", "library_name: transformers", f"pipeline_tag: {self.task}", "tags: [distill, distillation]",
                 "---", "", f"# {self.title}", "", f"A `{self.task}` model saved by distill."]
        if self.labels:
            lines += ["", "Labels, in logit order: " + ", ".join(f"`{n}`" for n in self.labels) + "."]
        lines += ["", "## Distilled from", ""] + [f"- {s}" for s in self.distilled_from or ["(no teacher input)"]]
        lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(self.recipe, sort_keys=False).rstrip(), "```"]
        scores = {k: v for k, v in self.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        lines += ["", "## Scores", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(scores.items())] or ["| (none recorded) | |"]
        lines += ["", "## Speed-up", ""]
        if "speedup" in scores:
            lines.append(f"{scores['speedup']:.2f}x faster than its teacher on CPU "
                         f"({scores.get('teacher_latency_ms', float('nan')):.2f} ms -> "
                         f"{scores.get('student_latency_ms', float('nan')):.2f} ms per batch).")
        else:
            lines.append("Not measured by this stage (the task stage measures it).")
        lines += ["", "## Lineage", ""]
        lines += [f"- `{c['name']}` ({c['stage']}), manifest sha256 `{c['manifest_sha256'][:12]}`"
                  + (f", MLflow run `{c['run_id']}`" if c.get("run_id") else "") for c in self.lineage]
        lines += ["", "## Use", "", "```python", "import mlflow",
                  "model = mlflow.pyfunc.load_model(\"THIS_FOLDER\")  # or runs:/ID/model, models:/NAME@ALIAS",
                  "model.predict([\"a sentence\"])", "```", ""]
        return "\n".join(lines)


def _model_uuid(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.suffix == ".safetensors"):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


def write(folder: Path, model: Any, tokenizer: Any, *, task: str, examples: list[str] | None,
          card: ModelCard) -> None:
    """Make the saved Hugging Face folder `folder` an MLflow Model (transformers flavor) with `card` as README.md."""
    import mlflow.transformers
    import yaml
    from mlflow.models import Model
    from transformers import pipeline

    folder = Path(folder)
    staging = folder.with_name(f"{folder.name}-mlflow")
    shutil.rmtree(staging, ignore_errors=True)
    was_training = model.training
    pipe = pipeline(task, model=model, tokenizer=tokenizer)
    # MLflow looks the folder's name up as a Hub repo for a card and a license; a local folder has neither,
    # and our card replaces Hub's, so its warnings about them would only mislead.
    quiet = logging.getLogger("mlflow.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        example = list(examples or default_examples(task, tokenizer))
        mlflow.transformers.save_model(pipe, str(staging), input_example=example, pip_requirements=requirements())
    finally:
        model.train(was_training)
        quiet.setLevel(level)
    shutil.rmtree(staging / "model")  # MLflow's copy of the weights: the folder holds ours
    for path in staging.iterdir():
        target = folder / path.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)
    staging.rmdir()
    # MLflow's LICENSE.txt points at huggingface.co/<our local path>: wrong, and a path differs between runs.
    (folder / "LICENSE.txt").unlink(missing_ok=True)
    spec = Model.load(str(folder)).to_dict()
    spec["flavors"]["transformers"]["model_binary"] = "."
    spec["flavors"]["transformers"]["source_model_name"] = ""  # a local path, not a Hub repo: nothing to name
    spec["model_uuid"] = _model_uuid(folder)
    # MLflow measured its staging folder (its weights copy, the license text); measure what is here, but the
    # card and MLmodel (both written below).
    spec["model_size_bytes"] = sum(f.stat().st_size for f in folder.rglob("*")
                                   if f.is_file() and f.name not in (CARD, "MLmodel"))
    spec.pop("utc_time_created", None)  # a rerun of the same weights writes the same MLmodel
    (folder / "MLmodel").write_text(yaml.safe_dump(spec, sort_keys=True))
    (folder / CARD).write_text(card.markdown())


def is_mlflow_model(folder: Path) -> bool:
    """Whether `folder` holds an MLmodel file."""
    return (Path(folder) / "MLmodel").is_file()


def read_labels(folder: Path) -> list[str]:
    """A classifier folder's label names in logit order (from config.json's id2label)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    id2label = config.get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)]
