"""Truncate or flip bytes in a shard, a cache shard, a manifest and a checkpoint: `distill verify` and the next
stage that reads the file must fail with one error line naming it, and the next stage must leave no manifest.

The CLI runs in process here (`pipeline.cli.main`, the same entry point as the console script): these runs
stop at the damaged file, and a fresh interpreter per case would cost more than the checks themselves.
"""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.cli import main
from tests.fixtures.faults import (
    assert_same_tensors,
    copy_stages,
    flip_byte,
    model_tensors,
    truncate,
)

# What is damaged: (stage, which file, how), and the stage that reads it next.
NEXT = {"shard": "cache", "cache": "general"}


def _data_file(stage_dir, index: int) -> str:
    outputs = [o["path"] for o in json.loads((stage_dir / "manifest.json").read_text())["outputs"]]
    data = [p for p in outputs if p.endswith((".tar", ".cache"))]
    return data[index]


def _damage(path, how: str) -> None:
    if how == "truncate":
        truncate(path, 0.5)
    elif how == "flip":
        flip_byte(path, path.stat().st_size // 2)
    elif how == "flip_hash":  # a manifest that still parses, its first listed sha256 one hex digit off
        data = bytearray(path.read_bytes())
        at = data.index(b'"sha256": "', data.index(b'"outputs"')) + len(b'"sha256": "')
        data[at] ^= 0x01  # still valid JSON and UTF-8
        path.write_bytes(bytes(data))
    else:
        raise ValueError(how)


def _cli(capsys, *args) -> tuple[int, list[str]]:
    """Run `distill ARGS` in process; (exit code, its `distill: error:` lines)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("distill: error:")]


@pytest.mark.parametrize("stage, index, how", [
    ("shard", 1, "flip"),
    ("shard", 2, "truncate"),
    ("cache", 1, "flip"),
    ("cache", 0, "truncate"),
    ("shard", None, "truncate"),
    ("shard", None, "flip"),
    ("cache", None, "flip_hash"),
])
def test_damaged_file_is_named_by_verify_and_by_the_next_stage(pipeline_run, tmp_path, capsys, stage, index, how):
    recipe, reference = pipeline_run
    run_dir = copy_stages(reference, tmp_path / "run", ["shard", "cache"] if stage == "cache" else ["shard"])
    rel = "manifest.json" if index is None else _data_file(run_dir / stage, index)
    damaged = run_dir / stage / rel
    _damage(damaged, how)
    # A hash flipped inside the manifest still parses; the manifest's own digest names the manifest.
    named = rel

    code, errors = _cli(capsys, "verify", run_dir / stage)
    assert code == 2 and len(errors) == 1 and named in errors[0], errors

    reader = NEXT[stage]
    code, errors = _cli(capsys, "run", recipe, "--run-dir", run_dir, "--stages", reader)
    assert code == 2 and len(errors) == 1 and named in errors[0], errors
    assert not (run_dir / reader / "manifest.json").exists()


@pytest.mark.parametrize("target, how", [("engine/model.safetensors", "flip"), ("engine/optimizer.pt", "truncate")])
def test_damaged_checkpoint_is_named_on_resume(pipeline_run, tmp_path, capsys, target, how):
    """General was killed after its last checkpoint (no model, no manifest); its newest checkpoint is damaged."""
    recipe, reference = pipeline_run
    run_dir = copy_stages(reference, tmp_path / "run", ["shard", "cache", "general"])
    stage_dir = run_dir / "general"
    (stage_dir / "manifest.json").unlink()
    shutil.rmtree(stage_dir / "model")
    newest = max((stage_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))
    _damage(newest / target, how)

    code, errors = _cli(capsys, "run", recipe, "--run-dir", run_dir, "--stages", "general")
    assert code == 2 and len(errors) == 1 and str(newest / target) in errors[0], errors
    assert f"delete {newest}" in errors[0]
    assert not (stage_dir / "manifest.json").exists()
    if how == "flip":  # following the advice resumes from the previous checkpoint and ends where it should
        shutil.rmtree(newest)
        code, errors = _cli(capsys, "run", recipe, "--run-dir", run_dir, "--stages", "general")
        assert code == 0, errors
        assert_same_tensors(model_tensors(reference / "general" / "model"), model_tensors(stage_dir / "model"))
