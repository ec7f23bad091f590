"""Mistakes a person makes: a broken YAML file, a teacher path that does not exist, a cache built with another
tokenizer. Each is one `distill: error:` line naming the culprit, exit code 2, and no manifest in the stage
directory. The CLI runs in process (`pipeline.cli.main`): an exception other than a user error would
escape it and fail the test, which is what a traceback would be in a subprocess.
"""

from __future__ import annotations

import yaml

from pipeline.cli import main
from tests.fixtures.faults import copy_stages


def _cli(capsys, *args) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("distill: error:")]


def test_broken_yaml_is_one_line_naming_the_file(pipeline_run, tmp_path, capsys):
    recipe, _ = pipeline_run
    broken = tmp_path / "broken.yaml"
    broken.write_text(recipe.read_text().replace("max_seq_len: 48", "max_seq_len: [48"))
    code, errors = _cli(capsys, "run", broken, "--run-dir", tmp_path / "run")
    assert code == 2 and len(errors) == 1 and str(broken) in errors[0], errors
    assert not list((tmp_path / "run").glob("*/manifest.json"))


def test_missing_teacher_path_is_one_line_naming_it(pipeline_run, tmp_path, capsys):
    recipe, reference = pipeline_run
    missing = tmp_path / "no-such-teacher"
    for stage, upstream in (("cache", ["shard"]), ("general", ["shard", "cache"])):
        run_dir = copy_stages(reference, tmp_path / stage, upstream)
        args = ["run", recipe, "--run-dir", run_dir, "--stages", stage]
        code, errors = _cli(capsys, *args, "--set", f"stages.{stage}.teacher_path={missing}")
        assert code == 2 and len(errors) == 1 and str(missing) in errors[0], (stage, errors)
        assert not (run_dir / stage / "manifest.json").exists(), stage


def test_cache_from_another_tokenizer_is_refused_by_general(pipeline_run, tmp_path, capsys):
    """shard_b holds the same text under another tokenizer (cognition's); general gets corpus shard, cache_b."""
    recipe, reference = pipeline_run
    tree = yaml.safe_load(recipe.read_text())
    tree["stages"]["shard_b"] = {**tree["stages"]["shard"], "stage": "shard", "tokenizer": "pkg:cognition/model"}
    tree["stages"]["cache_b"] = {**tree["stages"]["cache"], "stage": "cache", "corpus": "@shard_b"}
    tree["stages"]["general"]["cache"] = "@cache_b"
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(yaml.safe_dump(tree, sort_keys=False))  # stage order is run order
    run_dir = copy_stages(reference, tmp_path / "run", ["shard"])
    assert _cli(capsys, "run", mixed, "--run-dir", run_dir, "--stages", "shard_b,cache_b") == (0, [])

    code, errors = _cli(capsys, "run", mixed, "--run-dir", run_dir, "--stages", "general")
    assert code == 2 and len(errors) == 1, errors
    assert "cache 'cache_b' used tokenizer" in errors[0] and "rebuild the cache with the same tokenizer" in errors[0]
    assert not (run_dir / "general" / "manifest.json").exists() and not (run_dir / "general" / "model").exists()
