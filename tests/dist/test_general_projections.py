"""Stage `general` on 2 ranks (torchrun, gloo, DDP) with a student narrower than the teacher and only a cosine
or only a hidden-state loss: every trained parameter must get a gradient (an unused projection or MLM head
made DDP fail the second step)."""

from __future__ import annotations

import json

from tests.dist.general_inputs import build, fresh_run, run_torchrun_stages, variants_recipe

# keep_heads 1 of the tiny teacher's 2 heads: a hidden-16 student under a hidden-32 teacher
NARROW = {"student": {"init": "teacher", "num_layers": 1, "keep_heads": 1}, "engine": "torch", "max_steps": 3,
          "eval_every": 0, "checkpoint_every": 3}
VARIANTS = {"cosine_only": {**NARROW, "loss": {"soft": 0.0, "mlm": 0.0, "cosine": 1.0}},
            "hidden_only": {**NARROW, "loss": {"soft": 0.0, "mlm": 0.0, "hidden": 1.0}}}


def test_narrow_student_with_one_intermediate_loss_trains_on_two_ranks(tmp_path):
    recipe, reference = build(tmp_path, lines=120, dropout=0.0, cache=False)
    recipe = variants_recipe(recipe, VARIANTS)
    run_dir = fresh_run(reference, tmp_path / "run")
    result = run_torchrun_stages(recipe, run_dir, list(VARIANTS))
    assert result.returncode == 0, result.stderr[-3000:]
    for name, loss in (("cosine_only", "train_cosine"), ("hidden_only", "train_hidden")):
        manifest = json.loads((run_dir / name / "manifest.json").read_text())
        assert manifest["metrics"]["train_steps"] == 3 and manifest["metrics"][loss] > 0, name
        assert manifest["extra"]["student"]["hidden_size"] == 16
