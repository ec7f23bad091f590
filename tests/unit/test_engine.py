"""The engine seam: LR schedule, DeepSpeed JSON merging, and torch vs DeepSpeed ZeRO-0 training the same way."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.train.engine import EngineSettings, build_engine, deepspeed_json, lr_at
from pipeline.world import World


def test_lr_schedule_warmup_then_cosine_to_floor():
    kw = dict(lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == pytest.approx(1.0)
    # Half-way through the decay: 0.1 + 0.9 * (1 + cos(pi / 2)) / 2 = 0.55.
    assert lr_at(9, **kw) == pytest.approx(0.55)
    assert lr_at(14, **kw) == pytest.approx(0.1) and lr_at(100, **kw) == pytest.approx(0.1)
    assert lr_at(0, lr=2.0, warmup_steps=0, total_steps=1, min_lr_ratio=0.0) == pytest.approx(2.0)
    assert math.isclose(lr_at(5, lr=1.0, warmup_steps=0, total_steps=10, min_lr_ratio=0.0), 0.5)


def test_deepspeed_json_fills_our_values(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": "auto", "overlap_comm": True},
                                "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 0.5}))
    settings = EngineSettings(micro_batch_size=4, grad_accum=3, clip_norm=0.5, precision="bf16", zero_stage=2,
                              deepspeed_config=str(user))
    cfg = deepspeed_json(settings, world_size=2)
    assert cfg["train_batch_size"] == 24 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3 and cfg["bf16"] == {"enabled": True}
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert cfg["zero_allow_untested_optimizer"] is True


@pytest.mark.parametrize("content, key", [
    ({"train_micro_batch_size_per_gpu": 16}, "train_micro_batch_size_per_gpu"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
    ({"bf16": {"enabled": True}}, "bf16.enabled"),
    ({"optimizer": {"type": "Adam"}}, "optimizer"),
    ({"fp16": {"enabled": True}}, "fp16"),
])
def test_deepspeed_json_conflicts_are_config_errors(tmp_path, content, key):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        deepspeed_json(EngineSettings(micro_batch_size=8, zero_stage=2, deepspeed_config=str(user)), 1)
    assert str(user) in str(err.value) and "\n" not in str(err.value)


def test_shipped_deepspeed_configs_merge(repo):
    paths = sorted((repo / "configs" / "deepspeed").glob("*.json"))
    assert paths
    for path in paths:
        for offload in (False, True):
            cfg = deepspeed_json(EngineSettings(zero_stage=2, deepspeed_config=str(path), offload_optimizer=offload), 2)
            assert "auto" not in json.dumps(cfg), path
    offloaded = deepspeed_json(EngineSettings(zero_stage=2, offload_optimizer=True), 1)
    assert offloaded["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.2), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _train(engine, micro_steps: int, first: int = 0) -> list[float]:
    losses = []
    for i in range(first, first + micro_steps):
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(4, 6, generator=gen)
        torch.manual_seed(1000 + i)  # the dropout mask of micro step i, whatever the engine
        loss = (engine.forward(x).float().squeeze(-1) - x.sum(-1)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


SETTINGS = dict(lr=0.05, warmup_steps=2, total_steps=4, grad_accum=2, micro_batch_size=4, clip_norm=0.5)


def test_torch_and_deepspeed_zero0_train_identically():
    ours = build_engine(_model(), settings=EngineSettings(backend="torch", **SETTINGS), world=World())
    theirs = build_engine(_model(), settings=EngineSettings(backend="deepspeed", zero_stage=0, **SETTINGS), world=World())
    a, b = _train(ours, 8), _train(theirs, 8)
    assert ours.global_step == theirs.global_step == 4 and ours.micro_step == 8
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    exported = theirs.state_dict_for_export()
    for name, tensor in ours.state_dict_for_export().items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-6)


def test_torch_engine_save_load_continues_bit_equal(tmp_path):
    settings = EngineSettings(backend="torch", **SETTINGS)
    straight = build_engine(_model(), settings=settings, world=World())
    expected = _train(straight, 8)
    first = build_engine(_model(), settings=settings, world=World())
    _train(first, 4)
    first.save(tmp_path / "engine")
    second = build_engine(_model(), settings=settings, world=World())
    second.load(tmp_path / "engine")
    assert second.global_step == 2 and second.lr == first.lr
    assert _train(second, 4, first=4) == expected[4:]
    for name, tensor in straight.state_dict_for_export().items():
        assert torch.equal(second.state_dict_for_export()[name], tensor), name


def test_torch_engine_refuses_zero_settings():
    with pytest.raises(ConfigError, match="deepspeed"):
        build_engine(_model(), settings=EngineSettings(backend="torch", zero_stage=2), world=World())


def test_linear_and_constant_schedules():
    kw = dict(lr=1.0, warmup_steps=2, total_steps=6, min_lr_ratio=0.0)
    assert [lr_at(s, schedule="linear", **kw) for s in range(7)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])
    assert [lr_at(s, schedule="constant", **kw) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_at(4, schedule="linear", lr=2.0, warmup_steps=0, total_steps=8, min_lr_ratio=0.5) == pytest.approx(1.5)


def test_param_groups_decay_only_matrices_and_skip_frozen():
    from pipeline.train.optim import param_groups

    model = _model()
    model[0].bias.requires_grad_(False)
    decay, no_decay = param_groups(model.named_parameters(), 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [(16, 6), (1, 16)]
    assert [p.shape for p in no_decay["params"]] == [(1,)]


def test_zero_offload_trains_and_resumes_bit_equal(tmp_path):
    settings = EngineSettings(backend="deepspeed", zero_stage=2, offload_optimizer=True, **SETTINGS)
    assert deepspeed_json(settings, 1)["zero_force_ds_cpu_optimizer"] is False  # torch AdamW, no JIT build
    straight = build_engine(_model(), settings=settings, world=World())
    expected = _train(straight, 8)
    plain = _train(build_engine(_model(), settings=EngineSettings(backend="torch", **SETTINGS), world=World()), 8)
    assert straight.global_step == 4 and expected == pytest.approx(plain, rel=1e-5, abs=1e-6)  # it trains, the same way
    first = build_engine(_model(), settings=settings, world=World())
    _train(first, 4)
    first.save(tmp_path / "engine")
    second = build_engine(_model(), settings=settings, world=World())
    second.load(tmp_path / "engine")
    assert second.global_step == 2
    assert _train(second, 4, first=4) == expected[4:]
    for name, tensor in straight.state_dict_for_export().items():
        assert torch.equal(second.state_dict_for_export()[name], tensor), name


TRAINING_STAGES = ("teacher_adapt", "general", "teacher_finetune", "task", "prune", "fastbert", "dynabert", "extract")


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_every_training_stage_uses_the_one_trainer(repo, stage):
    """One definition: every training stage's Config is a TrainConfig, and no stage builds its own optimizer,
    schedule, clipping or backward pass (the trainer and engine own those)."""
    import importlib

    from pipeline.train.optim import TrainConfig

    assert issubclass(importlib.import_module(f"stages.{stage}.config").Config, TrainConfig)
    source = "\n".join(p.read_text() for p in sorted((repo / "stages" / stage).glob("*.py")))
    for own in ("torch.optim", "lr_scheduler", "AdamW(", "clip_grad_norm_", ".backward(", "optimizer.step"):
        assert own not in source, f"stages/{stage} has {own!r}: use pipeline.train (trainer.fit, build_engine)"
    assert "trainer.fit(" in source and "build_engine(" in source


def test_torch_engine_autocasts_on_the_device_type():
    settings = EngineSettings(backend="torch", precision="bf16", **SETTINGS)
    engine = build_engine(_model(), settings=settings, world=World())
    assert engine.device == torch.device("cpu")
    assert engine.forward(torch.randn(4, 6)).dtype == torch.bfloat16


def test_compiled_engine_trains_like_the_eager_one():
    def model():  # no dropout: compiled code draws its masks from another RNG stream
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    settings = dict(backend="torch", **SETTINGS)
    eager = _train(build_engine(model(), settings=EngineSettings(**settings), world=World()), 4)
    compiled = build_engine(model(), settings=EngineSettings(compile=True, **settings), world=World())
    assert compiled.wrapped is not compiled.module  # the forward runs through torch.compile
    assert _train(compiled, 4) == pytest.approx(eager, rel=1e-4, abs=1e-5)


def test_activation_checkpointing_recomputes_and_keeps_the_gradients():
    from transformers import BertConfig, BertModel

    def bert():
        torch.manual_seed(0)
        return BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))

    ids = torch.randint(0, 50, (2, 7))
    grads = []
    for checkpointing in (False, True):
        engine = build_engine(bert(), settings=EngineSettings(backend="torch", activation_checkpointing=checkpointing),
                              world=World())
        assert engine.module.is_gradient_checkpointing == checkpointing
        engine.backward(engine.forward(input_ids=ids).last_hidden_state.pow(2).mean())
        grads.append(engine.module.encoder.layer[0].attention.self.query.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        build_engine(_model(), settings=EngineSettings(backend="torch", activation_checkpointing=True), world=World())
