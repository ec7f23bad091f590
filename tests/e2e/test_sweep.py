"""`distill sweep` on the toy stages: shared upstream stages run once, a killed variant resumes, a rerun skips
everything, one MLflow parent run over the variants' runs, the comparison table; and its one-line refusals."""

from __future__ import annotations

import json

import pytest
import yaml
from mlflow import MlflowClient

from pipeline.cli import main as distill
from pipeline.sweep import split_values
from tests.conftest import run_cli

VARY = ["--vary", "stages.score.objective=soft,pkd", "--vary", "stages.score.width=1,2"]


def write_recipe(path, tracking: bool = True):
    path.write_text(yaml.safe_dump({"run": {"name": "toy", "seed": 1}, "tracking": {"enabled": tracking},
                                    "stages": {"numbers": {"count": 3}, "total": {"numbers": "@numbers"},
                                               "score": {"total": "@total"}}}, sort_keys=False))
    return path


def test_sweep_shares_upstream_resumes_a_killed_variant_and_skips_on_rerun(tmp_path):
    recipe, sweep = write_recipe(tmp_path / "toy.yaml"), tmp_path / "sweep"
    killed = run_cli("sweep", str(recipe), *VARY, "--run-dir", str(sweep), "--set", "stages.score.die_on=pkd")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (sweep / "sweep.json").exists() and not (sweep / "sweep.md").exists()
    variants = sorted(p.name for p in (sweep / "variants").iterdir())
    assert variants == ["01-objective-soft_width-1", "02-objective-soft_width-2", "03-objective-pkd_width-1"]
    partial = run_cli("status", str(sweep / "variants" / variants[2]), "--json")
    assert {r["stage"]: r["state"] for r in json.loads(partial.stdout)} == {
        "numbers": "done", "total": "done", "score": "partial"}
    whole = json.loads(run_cli("status", str(sweep), "--json").stdout)  # every planned variant, linked or not yet
    assert {v: [r["state"] for r in rows] for v, rows in whole.items()} == {
        variants[0]: ["done"] * 3, variants[1]: ["done"] * 3, variants[2]: ["done", "done", "partial"]}

    resumed = run_cli("sweep", str(recipe), *VARY, "--run-dir", str(sweep))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "numbers: start" not in resumed.stderr and resumed.stderr.count("score: start") == 2
    assert killed.stderr.count("numbers: start") == 1 and killed.stderr.count("total: start") == 1
    stores = sorted(p.name.split("-")[0] for p in (sweep / "stages").iterdir())
    assert stores == ["numbers", "score", "score", "score", "score", "total"]
    links = {p.name: (p / "numbers").resolve() for p in (sweep / "variants").iterdir()}
    assert len(links) == 4 and len(set(links.values())) == 1

    table = json.loads((sweep / "sweep.json").read_text())
    assert table["split"] == "test" and len(table["variants"]) == 4
    row = next(r for r in table["variants"] if r["values"] == {"stages.score.objective": "pkd", "stages.score.width": "2"})
    assert row["student_score"] == pytest.approx(0.5 + 0.05 + 0.1 + 0.003)
    assert row["retention"] == pytest.approx(row["student_score"] / 0.9) and row["speedup"] == 4.0
    assert row["student_params"] == 2000 and row["score_stage"] == "score"
    markdown = (sweep / "sweep.md").read_text()
    assert "| variant | objective | width | student test | teacher test |" in markdown
    assert "| 04-objective-pkd_width-2 | `pkd` | `2` | 0.6530 | 0.9000 | 72.6% | 4.00x | 2,000 |" in markdown
    assert (sweep / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("distill").experiment_id])
    by_name: dict[str, list] = {}
    for run in runs:
        by_name.setdefault(run.info.run_name, []).append(run)
    parent = by_name["toy-sweep"][0]
    assert len(by_name["toy-sweep"]) == 1 and parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == [f"toy/{v}" for v in sorted(links)]
    assert all(r.info.status == "FINISHED" for r in children)
    pkd2 = next(r for r in children if r.info.run_name == "toy/04-objective-pkd_width-2")
    assert pkd2.data.tags["distill.sweep.stages.score.objective"] == "pkd"
    assert pkd2.data.tags["distill.sweep.stages.score.width"] == "2"
    assert pkd2.data.metrics["sweep/retention"] == pytest.approx(0.653 / 0.9) and pkd2.data.metrics["sweep/speedup"] == 4
    assert len(by_name["numbers"]) == 1 and len(by_name["total"]) == 1 and len(by_name["score"]) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in by_name["score"]} == {r.info.run_id for r in children}
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep.md", "sweep.json", "sweep.png"}

    stamps = {p.name: (p / "manifest.json").stat().st_mtime_ns for p in (sweep / "stages").iterdir()}
    again = run_cli("sweep", str(recipe), *VARY, "--run-dir", str(sweep))
    assert again.returncode == 0 and ": start" not in again.stderr and again.stderr.count("skipping") == 12
    assert stamps == {p.name: (p / "manifest.json").stat().st_mtime_ns for p in (sweep / "stages").iterdir()}
    assert json.loads((sweep / "sweep.json").read_text())["variants"] == table["variants"]
    checked = run_cli("verify", str(sweep / "variants" / "04-objective-pkd_width-2"))
    assert checked.returncode == 0 and checked.stdout.count("files ok") == 3
    checked = run_cli("verify", str(sweep))
    assert checked.returncode == 0 and checked.stdout.count("files ok") == 6


def test_bundle_axis_and_a_sweep_without_test_scores_compares_on_dev_and_says_so(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "toy.yaml", tracking=False)
    bundle = ("setup={label: small, stages.score.width: 1, stages.score.objective: soft},"
              "{label: big, stages.score.width: 3, stages.score.objective: tinybert}")
    code = distill(["sweep", str(recipe), "--vary", bundle, "--run-dir", str(tmp_path / "sweep"),
                    "--set", "stages.score.test_split=false"])
    assert code == 0
    table = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert table["split"] == "dev" and table["vary"] == {"setup": ["small", "big"]}
    assert [(r["values"], r["student_score"]) for r in table["variants"]] == [
        ({"setup": "small"}, pytest.approx(0.563)), ({"setup": "big"}, pytest.approx(0.763))]
    markdown = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| variant | setup | student dev | teacher dev |" in markdown and "| 02-setup-big | `big` |" in markdown
    assert "**dev** split" in markdown and "optimistic" in markdown
    assert "compared on dev" in capsys.readouterr().err


def test_dry_run_plans_and_keep_going_tables_a_failed_variant_until_a_rerun_fixes_it(tmp_path, capsys):
    recipe, sweep = write_recipe(tmp_path / "toy.yaml", tracking=False), tmp_path / "sweep"
    args = ["sweep", str(recipe), "--vary", "stages.score.objective=soft,pkd", "--run-dir", str(sweep)]
    assert distill([*args, "--dry-run"]) == 0
    assert "2 variants, 4 stage runs (numbers 1, total 1, score 2), 0 done already" in capsys.readouterr().out
    assert not sweep.exists()

    assert distill([*args, "--keep-going", "--set", "stages.score.fail_on=pkd"]) == 1
    table = json.loads((sweep / "sweep.json").read_text())
    assert table["failed"] == ["02-objective-pkd"] and [r["state"] for r in table["variants"]] == ["done", "failed"]
    assert table["variants"][1]["error"] == "objective pkd failed on purpose"
    assert "| 02-objective-pkd (failed: objective pkd failed on purpose) | `pkd` | n/a |" in (sweep / "sweep.md").read_text()
    assert "RuntimeError" in (sweep / "variants" / "02-objective-pkd" / "sweep_error.txt").read_text()
    assert distill([*args, "--dry-run"]) == 0 and "3 done already" in capsys.readouterr().out

    assert distill(args) == 0
    table = json.loads((sweep / "sweep.json").read_text())
    assert table["failed"] == [] and table["variants"][1]["student_score"] == pytest.approx(0.653)
    assert not (sweep / "variants" / "02-objective-pkd" / "sweep_error.txt").exists()


@pytest.mark.parametrize("vary, message", [
    ("stages.score.objectiv=soft,pkd", "--vary stages.score.objectiv: unknown key (stages.score has "),
    ("stages.nope.width=1,2", "--vary stages.nope.width: unknown key (stages has numbers, score, total)"),
    ("stages.score.width=", "--vary stages.score.width=: empty value list"),
    ("stages.score.width=1,,2", "empty value list (or an empty value between commas)"),
    ("stages.score.width", "expected KEY=V1,V2"),
    ("stages.numbers.verbose=true,false", "--vary stages.numbers.verbose: values true and false give the same "
                                          "config to every stage run (numbers, total, score): the key changes nothing"),
    ("tracking.experiment=a,b", "--vary tracking.experiment: values a and b give the same config"),
    ("stages.score.objective=soft,bogus", "--vary stages.score.objective=bogus: stages.score.objective: expected one of"),
    ("setup=soft,pkd", "--vary setup=soft: a bundle (a name without dots) takes mappings of dotted keys"),
    ("setup={stages.score.objectiv: soft},{stages.score.width: 3}",
     "--vary setup: stages.score.objectiv: unknown key (stages.score has "),
])
def test_sweep_refusals_are_one_line(tmp_path, capsys, vary, message):
    code = distill(["sweep", str(write_recipe(tmp_path / "toy.yaml")), "--vary", vary, "--run-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists(), "a refused sweep left a directory behind"


def test_stages_that_read_an_unselected_unfinished_stage_are_refused(tmp_path, capsys):
    code = distill(["sweep", str(write_recipe(tmp_path / "toy.yaml")), "--vary", "stages.score.width=1,2",
                    "--stages", "numbers,score", "--run-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "--stages: score reads @total, which is not among the stages run" in err, err
    assert not (tmp_path / "s").exists()


def test_vary_values_split_outside_brackets_and_quotes():
    assert split_values("tinybert,pkd") == ["tinybert", "pkd"]
    assert split_values("{soft: 1, mlm: 0.5}, {hidden: 1}") == ["{soft: 1, mlm: 0.5}", "{hidden: 1}"]
    assert split_values("'a,b',don't,[1, 2],@general,null") == ["'a,b'", "don't", "[1, 2]", "@general", "null"]
