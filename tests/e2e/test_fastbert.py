"""The fastbert stage end to end on a tiny fine-tuned teacher and 96 SST-2 lines: branches trained through the
one trainer, exact resume after a preemption mid-training, the saved early-exit folder, the report, and
`distill predict --speed` (run in this process: the CLI's own `main`, to keep interpreter starts out of it); the
test split is the teacher's (the same seed's carve of the train file), and a different one is refused."""

from __future__ import annotations

import json
import re

import pytest
import torch

from formats import early_exit
from formats.taskdata import encode, pad_batch
from pipeline.cli import main
from pipeline.manifest import Manifest
from pipeline.train.preempt import EXIT_PREEMPTED
from tests.e2e.test_task_pipeline import tiny_encoder

RECIPE = """
run: {{name: tiny-fastbert, seed: 0}}
tracking: {{enabled: false}}
stages:
  teacher_finetune:
    teacher_path: {teacher}
    data: &data {{train: {sst2}/train.tsv, dev: {sst2}/dev.tsv, test_fraction: 0.25, limit_train: 96, limit_dev: 32,
                  limit_test: 24, max_length: 24}}
    epochs: 1
    batch_size: 16
    eval_every: 3
    lr: 1.0e-3
    device: cpu
  fastbert: &fastbert
    data: *data
    teacher: "@teacher_finetune"
    branch_width: 16
    max_steps: 6
    batch_size: 8
    lr: 5.0e-3
    checkpoint_every: 2
    keep_last: 10
    device: cpu
    speeds: [0.0, 0.5, 0.9, 1.0]
    latency_examples: 8
    latency_repeats: 1
    eval_batch_size: 8
  fastbert_killed:
    <<: *fastbert
    stage: fastbert
  fastbert_other_split:
    <<: *fastbert
    stage: fastbert
"""


@pytest.fixture(scope="module")
def fastbert_run(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    root = tmp_path_factory.mktemp("fastbert")
    run_dir, recipe = root / "run", root / "recipe.yaml"
    recipe.write_text(RECIPE.format(teacher=tiny_encoder(root / "teacher", layers=3), sst2=SHARED_DATA / "sst2"))
    assert main(["run", str(recipe), "--run-dir", str(run_dir), "--stages", "teacher_finetune,fastbert"]) == 0
    stopped = main(["run", str(recipe), "--run-dir", str(run_dir), "--stages", "fastbert_killed",
                    "--set", "stages.fastbert_killed.preempt_at_step=4"])
    assert stopped == EXIT_PREEMPTED and not (run_dir / "fastbert_killed" / "manifest.json").exists()
    assert (run_dir / "fastbert_killed" / "checkpoints" / "step-4" / "meta.json").is_file()
    assert main(["run", str(recipe), "--run-dir", str(run_dir), "--stages", "fastbert_killed"]) == 0
    return root, run_dir


def test_resume_mid_training_gives_bit_identical_branches(fastbert_run):
    _, run_dir = fastbert_run
    assert Manifest.load(run_dir / "fastbert_killed").metrics["resumed_from_step"] == 4
    assert Manifest.load(run_dir / "fastbert").metrics["resumed_from_step"] == 0
    whole = (run_dir / "fastbert" / early_exit.BRANCHES).read_bytes()
    assert whole == (run_dir / "fastbert_killed" / early_exit.BRANCHES).read_bytes()


def test_saved_folder_holds_the_unchanged_classifier_and_its_branches(fastbert_run):
    from safetensors.torch import load_file

    _, run_dir = fastbert_run
    stage = run_dir / "fastbert"
    manifest = Manifest.load(stage)
    manifest.verify(stage)
    spec = json.loads((stage / early_exit.SPEC).read_text())
    assert spec["spec"]["layers"] == 3 and spec["model_dir"] == "model" and spec["max_length"] == 24
    teacher = load_file(str(run_dir / "teacher_finetune/model/model.safetensors"))
    saved = load_file(str(stage / "model/model.safetensors"))
    assert teacher.keys() == saved.keys() and all(torch.equal(teacher[k], saved[k]) for k in teacher)
    assert {k.split(".")[1] for k in load_file(str(stage / early_exit.BRANCHES))} == {"0", "1"}
    # the folder loads (for `distill eval` too) and S = 0 gives the full model's logits
    model = early_exit.load(stage)
    ids, types = encode(model.tokenizer, [("a fine film",), ("dull , dull , dull",)], model.max_length)
    logits, layers = model.predict(ids, types, speed=0.0)
    with torch.no_grad():
        full = model.classifier(**pad_batch(ids, types, model.tokenizer.pad_token_id)).logits
    assert layers.tolist() == [3, 3] and torch.allclose(torch.from_numpy(logits), full, atol=1e-5)
    assert model.predict(ids, types, speed=1.0)[1].tolist() == [1, 1]


def test_report_scores_the_held_out_rows_for_every_speed(fastbert_run):
    _, run_dir = fastbert_run
    stage = run_dir / "fastbert"
    report = json.loads((stage / "report.json").read_text())
    s, teacher, grid = report["summary"], report["teacher"], report["grid"]
    assert s["test_examples"] == 24 and s["dev_examples"] == 32 and s["train_texts"] == 96 and s["steps"] == 6
    assert [r["speed"] for r in grid] == [0.0, 0.5, 0.9, 1.0]
    assert grid[0]["test_accuracy"] == teacher["test_accuracy"] and grid[0]["avg_layers"] == 3
    assert grid[-1]["avg_layers"] == 1 and grid[-1]["layer_speedup"] == 3
    assert [r["avg_layers"] for r in grid] == sorted((r["avg_layers"] for r in grid), reverse=True)
    assert all(abs(sum(r["exit_share"]) - 1) < 1e-9 and r["ms_per_example"] > 0 for r in grid)
    chosen = next(r for r in grid if r["speed"] == s["chosen_speed"])
    assert chosen["dev_accuracy"] >= teacher["dev_accuracy"] - 0.01 - 1e-12
    assert s["speedup_at_max_drop"] == chosen["speedup"]
    assert "Speed-up at <= 1 point" in (stage / "report.md").read_text()
    assert (stage / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    split = Manifest.load(stage).extra["test_split"]
    assert split["source"] == "carved" and split["size"] == round(0.25 * 67349) and split["used"] == 24
    assert split == Manifest.load(run_dir / "fastbert_killed").extra["test_split"]
    teacher = Manifest.load(run_dir / "teacher_finetune").extra["test_split"]
    assert teacher["sha256"] == split["sha256"] and "carved by seed 0" in s["test_split"]


def test_a_teacher_that_held_out_another_split_is_refused(fastbert_run, capsys):
    _, run_dir = fastbert_run
    recipe = run_dir.parent / "recipe.yaml"
    capsys.readouterr()
    status = main(["run", str(recipe), "--run-dir", str(run_dir), "--stages", "fastbert_other_split",
                   "--set", "stages.fastbert_other_split.data.test_fraction=0.3"])
    err = capsys.readouterr().err
    assert status == 2 and "held out a different test split" in err and "Traceback" not in err, err[-2000:]
    assert not (run_dir / "fastbert_other_split" / "manifest.json").exists()


def _predict(capsys, *args: str) -> tuple[int, list[dict], str]:
    capsys.readouterr()
    status = main(["predict", *args])
    out = capsys.readouterr()
    return status, [json.loads(line) for line in out.out.splitlines() if line.startswith("{")], out.err


def test_distill_predict_with_a_speed(fastbert_run, tmp_path, capsys):
    _, run_dir = fastbert_run
    lines = tmp_path / "lines.txt"
    lines.write_text("a gripping , beautifully acted film\n\nthe plot never comes together\n")
    status, rows, err = _predict(capsys, str(run_dir / "fastbert"), str(lines), "--speed", "1.0")
    assert status == 0, err[-2000:]
    assert [r["exit_layer"] for r in rows] == [1, 1] and {r["label"] for r in rows} <= {"0", "1"}
    status, exact, err = _predict(capsys, str(run_dir / "fastbert" / "model"), str(lines), "--speed", "0")
    assert status == 0 and [r["exit_layer"] for r in exact] == [3, 3], err[-2000:]
    status, served, err = _predict(capsys, str(run_dir / "fastbert"), str(lines))  # the MLflow Model: full model
    assert status == 0 and [r["label"] for r in exact] == [r["label"] for r in served], err[-2000:]
    status, _, err = _predict(capsys, str(run_dir / "teacher_finetune"), str(lines), "--speed", "0.2")
    assert status == 2 and "branches.json" in err and "Traceback" not in err


def _eval(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(["eval", *args, "--limit", "32", "--max-length", "24", "--latency-repeats", "1",
                   "--latency-batch-size", "2", "--latency-seq-len", "8"])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_distill_eval_with_a_speed(fastbert_run, tmp_path, capsys):
    from tests.conftest import SHARED_DATA

    _, run_dir = fastbert_run
    data, stage = str(SHARED_DATA / "sst2" / "dev.tsv"), str(run_dir / "fastbert")
    # S = 0 is the full model: the same accuracy as the fine-tuned teacher's plain folder, scored beside it
    status, out, err = _eval(capsys, stage, data, "--speed", "0", "--teacher", "@teacher_finetune",
                             "--run-dir", str(run_dir), "--out", str(tmp_path / "s0"))
    assert status == 0, err[-2000:]
    result = json.loads((tmp_path / "s0" / "eval.json").read_text())
    student, teacher = result["student"], result["teacher"]
    assert student["early_exit"]["speed"] == 0 and student["early_exit"]["avg_exit_layer"] == 3
    assert student["metrics"] == teacher["metrics"] and student["confusion_matrix"] == teacher["confusion_matrix"]
    assert "early_exit" not in teacher and student["params"] > teacher["params"]  # the branches count too
    assert student["latency"]["avg_exit_layer"] == 3 and "avg_exit_layer" not in teacher["latency"]
    # an early exit's cost follows the text: both are timed on DATA's first rows, not random ids
    assert student["latency"]["input"] == teacher["latency"]["input"] == "data rows"
    assert re.search(r"avg exit layer +3\.00 of 3 \(S = 0\) +all layers", out), out
    # a high S exits earlier; without --speed the stage's saved default is used (its model/ folder loads too)
    status, out, err = _eval(capsys, stage, data, "--speed", "1.0", "--out", str(tmp_path / "s1"))
    assert status == 0, err[-2000:]
    fast = json.loads((tmp_path / "s1" / "eval.json").read_text())["student"]["early_exit"]
    assert fast["avg_exit_layer"] == 1 < student["early_exit"]["avg_exit_layer"] and fast["exit_share"][0] == 1
    assert re.search(r"CPU latency \(2 data rows, <= 8 tokens\) +[\d.]+ ms \(exit at 1\.00\)", out), out
    status, out, err = _eval(capsys, stage + "/model", data, "--out", str(tmp_path / "default"))
    chosen = json.loads((run_dir / "fastbert" / early_exit.SPEC).read_text())["default_speed"]
    assert status == 0, err[-2000:]
    assert json.loads((tmp_path / "default" / "eval.json").read_text())["student"]["early_exit"]["speed"] == chosen
    # --speed on a model without branches, on a registry URI, or outside [0, 1]: one line, exit 2
    for model, speed, message in ((str(run_dir / "teacher_finetune"), "0.5", "needs an early-exit model"),
                                  ("models:/tiny@champion", "0.5", "not a registry URI"),
                                  (stage, "1.5", "a speed threshold is in [0, 1]")):
        status, _, err = _eval(capsys, model, data, "--speed", speed)
        assert status == 2 and message in err and "\n" not in err.strip() and "Traceback" not in err, err
