"""`distill sweep` over the real teacher_finetune and task stages of the tiny task pipeline (a tiny teacher, 64 SST-2
lines): the teacher is fine-tuned once for both objectives, and the table reads the task stage's scores."""

from __future__ import annotations

import json

from pipeline.cli import main as distill
from tests.e2e.test_task_pipeline import RECIPE, tiny_encoder


def test_sweep_of_task_objectives_fine_tunes_the_teacher_once(tmp_path, shared_data):
    recipe, sweep = tmp_path / "tiny.yaml", tmp_path / "sweep"
    recipe.write_text(RECIPE.format(teacher=tiny_encoder(tmp_path / "teacher", layers=2), sst2=shared_data / "sst2",
                                    run=tmp_path / "unused"))
    assert distill(["sweep", str(recipe), "--vary", "stages.task.objective=tinybert,pkd", "--run-dir", str(sweep),
                    "--stages", "teacher_finetune,task", "--set", "stages.task.augmented=null",
                    "--set", "stages.task.student_init.num_layers=1"]) == 0
    stores = sorted(p.name.split("-")[0] for p in (sweep / "stages").iterdir())
    assert stores == ["task", "task", "teacher_finetune"]
    table = json.loads((sweep / "sweep.json").read_text())
    split = table["split"]  # "test" once the task stage reports a held-out test score, "dev" before
    rows = {r["values"]["stages.task.objective"]: r for r in table["variants"]}
    for objective, row in rows.items():
        manifest = json.loads((sweep / row["stages"]["task"] / "manifest.json").read_text())
        assert manifest["config"]["objective"] == objective and row["score_stage"] == "task"
        assert row["student_score"] == manifest["metrics"][f"student_{split}_score"]
        assert row["teacher_score"] == manifest["metrics"][f"teacher_{split}_score"]
        assert row["speedup"] == manifest["metrics"]["speedup"] > 0
        assert row["student_params"] == manifest["metrics"]["student_params"] < manifest["metrics"]["teacher_params"]
    assert f"| student {split} | teacher {split} |" in (sweep / "sweep.md").read_text()
