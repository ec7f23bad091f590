"""SIGKILL teacher_adapt, teacher_finetune, augment, register and report at seed-chosen points, rerun the same
command, compare with the uninterrupted run (the tests of test_kill_rerun.py for the other stages).

teacher_adapt and teacher_finetune must end with bit-identical weights, augment with byte-identical chunks;
register killed right after it created the model version must leave exactly one version; report must write
the same summary. The killed run is a `distill` subprocess; the rerun runs in process (it is a plain run).
"""

from __future__ import annotations

import json
import signal

import pytest
from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.tracking.store import sqlite_uri
from tests.fixtures.faults import (
    EXTRA_STAGES,
    KillPoint,
    assert_same_tensors,
    copy_stages,
    fault_seeds,
    manifest_outputs,
    model_tensors,
    run_and_kill,
    spawn_cli,
)

# stage -> (files whose count picks the kill point, how many of them, longest extra delay in seconds).
# teacher_adapt and teacher_finetune write their model only at the end: the kill lands at a delay after start.
KILL_PLANS = {
    "teacher_adapt": (".started.json", 1, 2.0),
    "teacher_finetune": (".started.json", 1, 1.5),
    "augment": ("part-*.jsonl", 5, 0.2),
    "report": (".started.json", 1, 0.1),
}


def _summary(stage_dir) -> dict:
    summary = json.loads((stage_dir / "summary.json").read_text())
    summary.pop("tracking_uri")  # the run directory's own store
    return summary


@pytest.mark.parametrize("seed", fault_seeds())
@pytest.mark.parametrize("stage", [*KILL_PLANS, "register"])
def test_kill_9_then_rerun_matches_uninterrupted(extra_run, tmp_path, capsys, stage, seed):
    recipe, reference = extra_run
    run_dir = copy_stages(reference, tmp_path / "run", EXTRA_STAGES[stage])
    stage_dir = run_dir / stage
    args = ["run", str(recipe), "--run-dir", str(run_dir), "--stages", stage]
    if stage == "register":  # the one point that could double a version: created, not yet recorded anywhere
        point = "die_after_version"
        proc = spawn_cli(*args, "--set", f"stages.{stage}.die_after_version=true")
        _, err = proc.communicate(timeout=600)
        killed = proc.returncode == -signal.SIGKILL
    else:
        pattern, total, max_delay = KILL_PLANS[stage]
        point = KillPoint.pick(seed, stage, pattern, total, max_delay)
        point = KillPoint(pattern, max(point.count, 1), point.delay)
        killed, err = run_and_kill(args, stage_dir, point)
    assert killed, f"{point}: the process ended before the kill; stderr:\n{err[-2000:]}"
    if (stage_dir / "manifest.json").exists():  # killed after the manifest (while tracking): the stage is done
        assert main(["verify", str(stage_dir)]) == 0, f"{point}: a killed stage left a manifest that does not verify"

    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    if stage in ("teacher_adapt", "teacher_finetune"):
        assert_same_tensors(model_tensors(reference / stage / "model"), model_tensors(stage_dir / "model"))
        # The model card (README.md) quotes measured times; every other model file must be byte-identical.
        def model_files(folder):
            return [o for o in manifest_outputs(folder) if o["path"].startswith("model/") and o["path"] != "model/README.md"]

        assert model_files(stage_dir) == model_files(reference / stage)
    elif stage == "augment":
        assert manifest_outputs(stage_dir) == manifest_outputs(reference / stage), f"outputs differ after {point}"
    elif stage == "register":
        uri = sqlite_uri(run_dir)
        versions = MlflowClient(uri, registry_uri=uri).search_model_versions("name='faults-teacher'")
        assert len(versions) == 1, f"{len(versions)} versions registered after a kill and a rerun"
        assert json.loads((stage_dir / "registered.json").read_text())["version"] == "1"
    else:
        assert _summary(stage_dir) == _summary(reference / stage)
        assert (run_dir / "summary.json").read_text() == (stage_dir / "summary.json").read_text()
    assert not list(stage_dir.rglob(".tmp-*")), "temporary files of the killed attempt were left behind"
