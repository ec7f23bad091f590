"""Checkpoint folders: RNG round trip, newest complete wins, retention, compatibility errors."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.train import checkpoint
from pipeline.train.engine import EngineSettings, build_engine
from pipeline.world import World


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_round_trip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = json.loads(json.dumps(checkpoint.rng_state()))
    expected = _draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(saved)
    assert _draws() == expected


def _engine(backend="torch", zero_stage=0):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return build_engine(model, settings=EngineSettings(backend=backend, zero_stage=zero_stage, micro_batch_size=2),
                        world=World())


def test_save_latest_prune_and_load(tmp_path):
    engine, world = _engine(), World()
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        checkpoint.save(root, step, engine, {"step": step, "reader": {"offset": step * 8}}, world, keep_last=2)
    assert [n for n, _, _ in checkpoint.steps(root)] == [4, 6]
    # A newer folder without meta.json (killed while saving) is ignored by resume: auto.
    (root / "step-8" / "engine").mkdir(parents=True)
    assert checkpoint.latest(root) == root / "step-6"
    random.seed(5)
    expected = random.random()
    random.seed(5)
    checkpoint.save(root, 10, engine, {"step": 10}, world, keep_last=2)
    random.seed(77)
    state = checkpoint.load(root / "step-10", _engine(), world)
    assert state == {"step": 10} and random.random() == expected
    assert [n for n, _, _ in checkpoint.steps(root)] == [6, 10], "step-8 leftover was not pruned"


def test_incompatible_checkpoints_are_config_errors(tmp_path):
    root = tmp_path / "checkpoints"
    folder = checkpoint.save(root, 1, _engine(), {}, World(), keep_last=1)
    # check_compatible reads only the engine's settings, so plain settings stand in for built engines.
    deepspeed = SimpleNamespace(settings=EngineSettings(backend="deepspeed"))
    with pytest.raises(ConfigError, match="engine torch"):
        checkpoint.check_compatible(folder, deepspeed, World())
    meta = json.loads((folder / checkpoint.META).read_text())
    (folder / checkpoint.META).write_text(json.dumps({**meta, "backend": "deepspeed", "zero_stage": 2, "world_size": 2}))
    with pytest.raises(ConfigError, match="ZeRO-2 on 2 ranks"):
        checkpoint.check_compatible(folder, SimpleNamespace(settings=EngineSettings(zero_stage=2)), World())
