"""`distill bench`: parts are combined into the promised keys; missing figures are reported, not invented."""

import json
import sys
import types

from bench import suite


def test_suite_combines_parts_and_reports_missing(monkeypatch, tmp_path, capsys):
    from tests.fixtures import fake_bench

    monkeypatch.setitem(sys.modules, "bench.fake_bench", fake_bench)
    result = suite.run_suite(quick=True, parts=("fake_bench",))
    assert result["reader_vs_trainer"] == 40.0
    assert result["cache_bytes_per_token"] == 13.5
    assert result["details"]["quick_seen"] == 1.0
    assert set(result["machine"]) >= {"cpu", "threads", "torch", "gpu"}
    table = suite.format_table(result)
    assert "reader_vs_trainer" in table and "missing" in table  # e.g. student_cpu_speedup was not measured

    monkeypatch.setattr(suite, "PARTS", ("fake_bench",))
    monkeypatch.setattr(suite, "run_suite", lambda quick, parts=("fake_bench",): result)
    out = tmp_path / "bench.json"
    assert suite.main(True, str(out)) == 1  # some promised keys are missing: non-zero
    assert json.loads(out.read_text())["reader_vs_trainer"] == 40.0


def test_bench_verb_is_wired_into_the_cli():
    import pipeline.cli as cli
    from pipeline.cli import _extra_commands, build_parser

    cli.COMMANDS[:] = _extra_commands()
    args = build_parser().parse_args(["bench", "--quick", "--out", "x.json"])
    assert args.quick and args.out == "x.json" and isinstance(args.func, types.FunctionType)


def test_bench_gpu_without_a_gpu_is_one_line_and_exit_2(repo):
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(repo), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "--gpu"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("distill: error:")]
    assert len(errors) == 1 and "no CUDA GPU is visible" in errors[0] and "Traceback" not in done.stderr
