"""A lost rank in a 2-rank `general` run (2 gloo processes started as a multi-node launcher would, one per
"node", so no torchrun agent tears the survivor down for us): kill -9 of rank 1 makes rank 0 exit 2 within
the collective timeout with one line naming rank 1; a rank that stops answering (SIGSTOP) does the same once
the configured timeout passes; the rerun resumes from the last complete checkpoint and ends where an
uninterrupted run ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO
from tests.dist.general_inputs import _free_port, build, fresh_run, run_inprocess

STEPS = ["max_steps=24", "checkpoint_every=2", "eval_every=0", "log_every=1"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank-loss")
    return build(root, cache=False, dropout=0.0)


def _start_ranks(recipe, run_dir, *overrides: str) -> list[subprocess.Popen]:
    port = _free_port()
    sets = [arg for o in [*STEPS, *overrides] for arg in ("--set", f"stages.general.{o}")]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--run-dir", str(run_dir),
               "--stages", "general", *sets]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _wait_for_checkpoint(run_dir, step: int, proc) -> None:
    meta = run_dir / "general" / "checkpoints" / f"step-{step}" / "meta.json"
    deadline = time.monotonic() + 180
    while not meta.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "rank 0 ended before the checkpoint"
        time.sleep(0.01)


def _lost_line(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("distill: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


def _finish(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)


def test_kill_9_of_rank_1_stops_rank_0_naming_it_and_the_rerun_resumes(inputs, tmp_path):
    recipe, reference = inputs
    run_dir = fresh_run(reference, tmp_path / "run")
    procs = _start_ranks(recipe, run_dir, "collective_timeout_s=60")
    try:
        _wait_for_checkpoint(run_dir, 4, procs[0])
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        waited = time.monotonic() - killed_at
    finally:
        _finish(procs)
    assert procs[0].returncode == 2, err[-3000:]
    assert waited < 60, f"rank 0 took {waited:.0f} s to notice, past the 60 s collective timeout"
    assert _lost_line(err).startswith("distill: error: rank 1 of 2 lost"), err[-2000:]
    assert not (run_dir / "general" / "manifest.json").exists()

    complete = sorted(int(p.parent.name[5:]) for p in (run_dir / "general" / "checkpoints").glob("step-*/meta.json"))
    rerun = _start_ranks(recipe, run_dir)
    errs = [proc.communicate(timeout=300)[1] for proc in rerun]
    assert [p.returncode for p in rerun] == [0, 0], errs[0][-3000:]
    assert f"resumed from {run_dir / 'general' / 'checkpoints' / f'step-{complete[-1]}'}" in errs[0], errs[0][-3000:]

    single = run_inprocess(recipe, fresh_run(reference, tmp_path / "single"), *STEPS)
    from safetensors.torch import load_file

    expected = load_file(str(tmp_path / "single" / "general" / "model" / "model.safetensors"))
    got = load_file(str(run_dir / "general" / "model" / "model.safetensors"))
    assert single is not None and expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_rank_that_stops_answering_fails_rank_0_after_the_timeout(inputs, tmp_path):
    recipe, reference = inputs
    run_dir = fresh_run(reference, tmp_path / "run")
    procs = _start_ranks(recipe, run_dir, "collective_timeout_s=4")
    try:
        _wait_for_checkpoint(run_dir, 2, procs[0])
        procs[1].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        waited = time.monotonic() - stopped_at
    finally:
        _finish(procs)
    assert procs[0].returncode == 2, err[-3000:]
    assert 3 < waited < 4 + 30, f"rank 0 stopped {waited:.1f} s after rank 1 did; the timeout is 4 s"
    assert _lost_line(err).startswith("distill: error: rank 1 of 2 lost"), err[-2000:]
