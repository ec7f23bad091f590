"""A full disk mid-stage: the stage fails with one line naming the file and the free space (exit 2, no
traceback), leaves no manifest claiming completion, and once there is room again the same command finishes
with the outputs of an uninterrupted run.

The run directory is a small tmpfs (we run as root in CI); where mounting is not permitted the stage runs
under RLIMIT_FSIZE instead (each file capped), and the test's id says which one ran.
"""

from __future__ import annotations

import shutil

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
        assert proc.returncode == 2, f"{stage} on a full disk ({disk.how}): exit {proc.returncode}\n{err[-3000:]}"
        errors = [line for line in err.splitlines() if line.startswith("distill: error:")]
        assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
        assert str(run_dir / stage) in errors[0] and " MB free on " in errors[0], errors[0]
        reason = "no space left on device" if disk.mounted else "file size limit reached"
        assert reason in errors[0], errors[0]
        assert not (run_dir / stage / "manifest.json").exists(), "a failed stage left a manifest"

        disk.lift()
        assert main(args[:]) == 0
        if stage == "shard":
            assert manifest_outputs(run_dir / stage) == manifest_outputs(reference / stage)
        else:
            assert_same_tensors(model_tensors(reference / stage / "model"), model_tensors(run_dir / stage / "model"))


def test_disk_full_at_every_write_of_a_stage_is_one_line(tmp_path, capsys):
    """The toy `numbers` stage on a tmpfs left with 0, 1, 2, ... pages of room: whichever write fails first
    (run config, lock, start marker, stage config, an output, the manifest) it is one line naming a path
    under the run directory with the free space, exit 2 and no manifest; with room again the rerun finishes."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages:\n  numbers: {count: 12}\n")
    with size_limited_dir(tmp_path / "disk", 1 << 20) as disk:
        if not disk.mounted:
            pytest.fail("this test needs a tmpfs (mount permitted); the stage tests above fall back, it cannot")
        run_dir, filler = disk.path / "run", disk.path / "filler"
        outcomes = set()
        for pages in range(0, 20):
            shutil.rmtree(run_dir, ignore_errors=True)
            filler.unlink(missing_ok=True)
            filler.write_bytes(b"\0" * max(0, shutil.disk_usage(disk.path).free - pages * 4096))
            capsys.readouterr()
            code = main(["run", str(recipe), "--run-dir", str(run_dir)])
            err = capsys.readouterr().err
            if code == 0:
                outcomes.add("finished")
                break
            errors = [line for line in err.splitlines() if line.startswith("distill: error:")]
            assert code == 2 and len(errors) == 1, (pages, err)
            assert str(run_dir) in errors[0] and "no space left on device" in errors[0] and "free on" in errors[0]
            assert not (run_dir / "numbers" / "manifest.json").exists(), pages
            outcomes.add(errors[0].split(": no space")[0].removeprefix("distill: error: ").replace(str(run_dir), "RUN"))
        assert "finished" in outcomes and len(outcomes) >= 4, outcomes  # failures landed on several writes
        assert "RUN/numbers/manifest.json" in outcomes, outcomes  # even the last write fails cleanly
        filler.unlink()
        assert main(["run", str(recipe), "--run-dir", str(run_dir)]) == 0
        assert len(manifest_outputs(run_dir / "numbers")) == 12
