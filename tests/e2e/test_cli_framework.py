"""The CLI surface on two toy stages: run, skip on rerun, --force, status, verify, config, stage."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

RECIPE = """
run: {{name: toy, seed: 1}}
stages:
  numbers: {{count: {count}}}
  total: {{numbers: "@numbers"}}
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(count=4))
    return path


def test_run_wires_stages_and_skips_on_rerun(tmp_path, recipe):
    run_dir = tmp_path / "run"
    first = run_cli("run", str(recipe), "--run-dir", str(run_dir))
    assert first.returncode == 0, first.stderr
    total = json.loads((run_dir / "total" / "manifest.json").read_text())
    assert total["metrics"]["total"] == 0 + 1 + 2 + 3
    assert total["inputs"][0]["name"] == "numbers" and len(total["inputs"][0]["sha256"]) == 64
    assert (run_dir / "config.yaml").is_file() and (run_dir / "numbers" / "config.yaml").is_file()
    stamp = (run_dir / "numbers" / "manifest.json").stat().st_mtime_ns

    again = run_cli("run", str(recipe), "--run-dir", str(run_dir))
    assert again.returncode == 0 and again.stderr.count("skipping") == 2
    assert (run_dir / "numbers" / "manifest.json").stat().st_mtime_ns == stamp

    # A field that does not change the output does not force a rerun.
    quiet = run_cli("run", str(recipe), "--run-dir", str(run_dir), "--set", "stages.numbers.verbose=true")
    assert quiet.stderr.count("skipping") == 2

    forced = run_cli("run", str(recipe), "--run-dir", str(run_dir), "--stages", "numbers", "--force")
    assert forced.returncode == 0 and "skipping" not in forced.stderr
    assert (run_dir / "numbers" / "manifest.json").stat().st_mtime_ns != stamp

    # Changing upstream config changes its manifest hash, so the downstream stage reruns too.
    changed = run_cli("run", str(recipe), "--run-dir", str(run_dir), "--set", "stages.numbers.count=2")
    assert changed.returncode == 0 and "skipping" not in changed.stderr
    assert json.loads((run_dir / "total" / "manifest.json").read_text())["metrics"]["total"] == 1
    assert not (run_dir / "numbers" / "n-3.txt").exists(), "stale output of the old config was kept"


def test_killed_stage_is_partial_then_completes(tmp_path, recipe):
    run_dir = tmp_path / "run"
    killed = run_cli("run", str(recipe), "--run-dir", str(run_dir), "--set", "stages.numbers.die_after=2")
    assert killed.returncode == -9
    assert not (run_dir / "numbers" / "manifest.json").exists()
    status = run_cli("status", str(run_dir))
    assert status.returncode == 0
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()[1:]}
    assert rows["numbers"][2] == "partial" and rows["total"][2] == "missing"

    resumed = run_cli("run", str(recipe), "--run-dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    status = run_cli("status", str(run_dir), "--json")
    states = {row["stage"]: row for row in json.loads(status.stdout)}
    assert states["numbers"]["state"] == "done" and states["numbers"]["items"] == {"numbers": 4}
    assert states["total"]["state"] == "done"


def test_verify_ok_and_tampered(tmp_path, recipe):
    run_dir = tmp_path / "run"
    assert run_cli("run", str(recipe), "--run-dir", str(run_dir)).returncode == 0
    ok = run_cli("verify", str(run_dir))
    assert ok.returncode == 0 and sum(line.endswith("files ok") for line in ok.stdout.splitlines()) == 2
    (run_dir / "numbers" / "n-2.txt").write_text("7\n")
    bad = run_cli("verify", str(run_dir / "numbers"))
    assert bad.returncode == 2
    assert "n-2.txt" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_config_prints_resolved(tmp_path, recipe):
    out = run_cli("config", str(recipe), "--set", "stages.numbers.count=9")
    assert out.returncode == 0
    assert "count: 9" in out.stdout and "stage: numbers" in out.stdout


def test_stage_verb_with_own_config(tmp_path):
    config = tmp_path / "numbers.yaml"
    config.write_text("count: 2\nlabel: k\n")
    out = run_cli("stage", "numbers", str(config), "--run-dir", str(tmp_path / "run"), "--set", "count=3")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "numbers").glob("k-*.txt")) == ["k-0.txt", "k-1.txt", "k-2.txt"]


@pytest.mark.parametrize("body, expect", [
    ("stages:\n  numbers: {count: lots}\n", "stages.numbers.count: expected int"),
    ("stages:\n  numbers: {cuont: 2}\n", "stages.numbers.cuont: unknown key"),
    ("runn: {}\nstages:\n  numbers: {}\n", "runn: unknown key"),
    ("stages:\n  total: {}\n", "run stage 'numbers' first"),
])
def test_errors_are_one_line_exit_2(tmp_path, body, expect):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    out = run_cli("run", str(path), "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 2
    assert expect in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_nested_input_field_is_resolved_and_pinned(tmp_path):
    recipe = tmp_path / "nested.yaml"
    recipe.write_text("stages:\n  numbers: {count: 2}\n  nested: {data: {source: '@numbers'}}\n")
    out = run_cli("run", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "run" / "nested" / "manifest.json").read_text())
    assert manifest["metrics"]["count"] == 2
    assert manifest["inputs"][0]["name"] == "data.source" and manifest["inputs"][0]["ref"] == "@numbers"
