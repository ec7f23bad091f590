"""SIGKILL each stage at a seed-chosen point, rerun the same command, compare with the uninterrupted run.

Data stages (shard, cache) must come back byte-identical (the manifests' output lists, sha256 included);
training stages (general, task) must end with bit-identical weights. Upstream stages are copied from the
reference, so each test kills one stage only.
"""

from __future__ import annotations

import random
import signal

import pytest

from pipeline.cli import main
from tests.fixtures.faults import (
    KillPoint,
    assert_same_tensors,
    copy_stages,
    fault_seeds,
    manifest_outputs,
    model_tensors,
    run_and_kill,
    spawn_cli,
)

# stage -> (upstream stages, files whose count picks the kill point, longest extra delay in seconds).
# Shard writes all its tars within a fraction of a second, faster than a watcher can aim, so it kills itself
# through its test hook at a seed-picked byte count instead (inside a tar write, mostly).
KILL_PLANS = {
    "shard": ([], None, 0.0),
    "cache": (["shard"], "tiny/*.cache", 0.2),
    "general": (["shard", "cache"], "checkpoints/step-*", 1.0),
    "task": (["shard", "cache", "general"], "ckpt/step-*", 1.0),
}


def _model_files(stage_dir) -> list[dict]:
    # The model card (README.md) quotes measured throughput and latency, like the task report.
    return [o for o in manifest_outputs(stage_dir) if o["path"].startswith("model/") and o["path"] != "model/README.md"]


def _files(stage_dir, pattern) -> int:
    return len(list(stage_dir.glob(pattern)))


@pytest.mark.parametrize("seed", fault_seeds())
@pytest.mark.parametrize("stage", list(KILL_PLANS))
def test_kill_9_then_rerun_matches_uninterrupted(pipeline_run, tmp_path, stage, seed):
    recipe, reference = pipeline_run
    upstream, pattern, max_delay = KILL_PLANS[stage]
    run_dir = copy_stages(reference, tmp_path / "run", upstream)
    stage_dir = run_dir / stage
    args = ["run", str(recipe), "--run-dir", str(run_dir), "--stages", stage]
    if pattern is None:
        total = sum(o["bytes"] for o in manifest_outputs(reference / stage) if o["path"].endswith(".tar"))
        point = f"kill_after_bytes={random.Random(f'{seed}:{stage}').randrange(1, total)}"
        proc = spawn_cli(*args, "--set", f"stages.{stage}.{point}")
        _, err = proc.communicate(timeout=600)
        killed = proc.returncode == -signal.SIGKILL
    else:
        # Leave at least two of the files still to come, so the kill lands before the stage can finish.
        point = KillPoint.pick(seed, stage, pattern, _files(reference / stage, pattern) - 1, max_delay)
        killed, err = run_and_kill(args, stage_dir, point)
    assert killed, f"{point}: the process ended before the kill; stderr:\n{err[-2000:]}"
    if (stage_dir / "manifest.json").exists():  # killed after the manifest (while tracking, exiting): done
        assert main(["verify", str(stage_dir)]) == 0, f"{point}: a killed stage left a manifest that does not verify"

    rerun = spawn_cli(*args)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, f"rerun after {point} failed:\n{err[-3000:]}"
    if stage in ("shard", "cache"):
        assert manifest_outputs(stage_dir) == manifest_outputs(reference / stage), f"outputs differ after {point}"
    else:  # the task report holds measured latencies; the weights and model files must match exactly
        assert_same_tensors(model_tensors(reference / stage / "model"), model_tensors(stage_dir / "model"))
        assert _model_files(stage_dir) == _model_files(reference / stage), f"model files differ after {point}"
    assert not list(stage_dir.rglob(".tmp-*")), "temporary files of the killed attempt were left behind"
