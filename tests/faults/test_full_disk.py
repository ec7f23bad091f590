"""A full disk mid-stage: the stage fails, leaves no manifest claiming completion, and once there is room
again the same command finishes with the outputs of an uninterrupted run.

The run directory is a small tmpfs (we run as root in CI); where mounting is not permitted the stage runs
under RLIMIT_FSIZE instead (each file capped), and the test's id says which one ran.
"""

from __future__ import annotations

import pytest

from pipeline.cli import main
from tests.fixtures.faults import (
    assert_same_tensors,
    copy_stages,
    manifest_outputs,
    model_tensors,
    size_limited_dir,
    spawn_cli,
)

# stage -> (upstream stages copied in, room left for the stage's own files in bytes)
PLANS = {
    "shard": ([], 300_000),  # the shards need ~1 MB
    "general": (["shard", "cache"], 2_000_000),  # one checkpoint needs ~12 MB (weights + two Adam moments)
}


def _bytes(directory) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


@pytest.mark.parametrize("stage", list(PLANS))
def test_full_disk_fails_without_manifest_then_completes(pipeline_run, tmp_path, stage):
    recipe, reference = pipeline_run
    upstream, room = PLANS[stage]
    needed = sum(_bytes(reference / name) for name in upstream) + room
    with size_limited_dir(tmp_path / "disk", needed) as disk:
        run_dir = copy_stages(reference, disk.path / "run", upstream)
        args = ["run", str(recipe), "--run-dir", str(run_dir), "--stages", stage]
        proc = spawn_cli(*args, preexec=disk.preexec())
        _, err = proc.communicate(timeout=600)
        assert proc.returncode != 0, f"{stage} succeeded on a full disk ({disk.how})"
        assert "No space left on device" in err or "File too large" in err, err[-3000:]
        assert not (run_dir / stage / "manifest.json").exists(), "a failed stage left a manifest"

        disk.lift()
        assert main(args[:]) == 0
        if stage == "shard":
            assert manifest_outputs(run_dir / stage) == manifest_outputs(reference / stage)
        else:
            assert_same_tensors(model_tensors(reference / stage / "model"), model_tensors(run_dir / stage / "model"))
