"""`python -m launch.ranks`: a pod's training ranks as plain processes, keeping a preempted rank's exit 75."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO

# A rank: writes its torch.distributed variables, then exits as RANK_EXIT_<rank> says (default 0), or, with
# WAIT_FOR_SIGNAL set, waits for SIGTERM and exits 75 as a trainer does after its checkpoint.
RANK = """
import json, os, signal, sys, time
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
with open(os.path.join(sys.argv[1], f"rank-{os.environ['RANK']}.json"), "w") as f:
    json.dump({k: os.environ[k] for k in keys}, f)
if os.environ.get("WAIT_FOR_SIGNAL"):
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))
    time.sleep(120)
sys.exit(int(os.environ.get(f"RANK_EXIT_{os.environ['RANK']}", "0")))
"""


def _launch(tmp_path, *args, env=None):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    full = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "launch.ranks", *args, "--", sys.executable, str(script),
                             str(tmp_path)], env=full, stderr=subprocess.PIPE, text=True)


def test_ranks_get_torch_distributed_variables_from_the_operator(tmp_path):
    # What the Kubeflow training operator sets on the second pod of a 2-node PyTorchJob.
    proc = _launch(tmp_path, "--nnodes", "2", "--nproc-per-node", "2",
                   env={"PET_NODE_RANK": "1", "PET_MASTER_ADDR": "job-master-0", "PET_MASTER_PORT": "23456"})
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    ranks = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in tmp_path.glob("rank-*.json")}
    assert sorted(ranks) == [2, 3]
    assert ranks[3] == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"}


def test_indexed_job_node_rank_and_explicit_master(tmp_path):
    proc = _launch(tmp_path, "--nnodes", "3", "--nproc-per-node", "1", "--master-addr", "train-0.train",
                   "--master-port", "29500", env={"JOB_COMPLETION_INDEX": "2"})
    assert proc.wait(timeout=60) == 0
    (only,) = [json.loads(p.read_text()) for p in tmp_path.glob("rank-*.json")]
    assert (only["RANK"], only["WORLD_SIZE"], only["MASTER_ADDR"]) == ("2", "3", "train-0.train")


def test_a_preempted_rank_keeps_exit_75(tmp_path):
    proc = _launch(tmp_path, "--nnodes", "1", "--nproc-per-node", "2", env={"RANK_EXIT_1": "75"})
    assert proc.wait(timeout=60) == 75


def test_a_failed_rank_wins_over_a_preempted_one(tmp_path):
    proc = _launch(tmp_path, "--nnodes", "1", "--nproc-per-node", "2", env={"RANK_EXIT_0": "75", "RANK_EXIT_1": "3"})
    assert proc.wait(timeout=60) == 3


def test_sigterm_reaches_every_rank_and_the_pod_exits_75(tmp_path):
    """Kubernetes deleting or evicting the pod: SIGTERM to PID 1 (the launcher), the ranks checkpoint, exit 75."""
    proc = _launch(tmp_path, "--nnodes", "1", "--nproc-per-node", "2", env={"WAIT_FOR_SIGNAL": "1"})
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("rank-*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # the ranks' handlers are installed right after they write their file
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75, proc.stderr.read()


def test_bad_node_rank_is_a_usage_error(tmp_path):
    proc = _launch(tmp_path, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", "5")
    assert proc.wait(timeout=60) == 2 and "outside --nnodes 2" in proc.stderr.read()
