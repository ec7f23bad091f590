"""Start one node's training ranks as plain processes, as srun does on Slurm: `python -m launch.ranks`.

Kubernetes pods run this instead of torchrun. torchrun's agent reports any failed rank as exit 1, which would
turn a preempted rank's 75 (checkpoint saved, retry me) into a failure; here the pod's exit status is:
  - the first real failure (not 0, not 75) of any rank, after stopping the others (they would hang on it);
  - else 75 when any rank was preempted (the pod is retried and resumes from the checkpoint);
  - else 0.
SIGTERM / SIGUSR1 (Kubernetes deleting or evicting the pod) are passed on to every rank, which checkpoints.

    python -m launch.ranks --nnodes 2 --nproc-per-node 8 [--node-rank R] [--master-addr A --master-port P] -- CMD...

The node rank, master address and port default to what the Kubeflow training operator sets in a PyTorchJob
(PET_NODE_RANK, PET_MASTER_ADDR / MASTER_ADDR, PET_MASTER_PORT / MASTER_PORT), else an Indexed Job's
JOB_COMPLETION_INDEX.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from pipeline.train.preempt import EXIT_PREEMPTED


def combined_status(codes: list[int]) -> int:
    """One exit status for a group of ranks: a failure wins over preempted (75), which wins over success."""
    codes = [128 - c if c < 0 else c for c in codes]  # killed by signal N: the shell's 128 + N
    failed = [c for c in codes if c not in (0, EXIT_PREEMPTED)]
    return failed[0] if failed else (EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0)


def wait_ranks(procs: list[subprocess.Popen], poll_s: float = 0.2) -> list[int]:
    """Wait for every process; when one fails (not 0, not 75), stop the rest: they would wait on it forever."""
    while None in [p.poll() for p in procs]:  # a list, not any(): every process must be polled
        if any(p.returncode not in (None, 0, EXIT_PREEMPTED) for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        time.sleep(poll_s)
    return [p.returncode for p in procs]


def rank_env(node_rank: int, local_rank: int, nnodes: int, nproc: int, addr: str, port: int) -> dict[str, str]:
    """The torch.distributed variables of one rank (what torchrun would set, without its agent)."""
    return {"RANK": str(node_rank * nproc + local_rank), "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(nnodes * nproc), "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": str(node_rank),
            "MASTER_ADDR": addr, "MASTER_PORT": str(port)}


def _first(env: dict, *names: str, default: str | None = None) -> str | None:
    return next((env[n] for n in names if env.get(n, "") != ""), default)


def main(argv: list[str] | None = None) -> int:
    """Parse the node's shape, start its ranks, forward signals, return the combined exit status."""
    parser = argparse.ArgumentParser(prog="python -m launch.ranks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nnodes", type=int, required=True)
    parser.add_argument("--nproc-per-node", type=int, required=True)
    parser.add_argument("--node-rank", type=int, help="default: PET_NODE_RANK or JOB_COMPLETION_INDEX, else 0")
    parser.add_argument("--master-addr", help="default: PET_MASTER_ADDR or MASTER_ADDR, else 127.0.0.1")
    parser.add_argument("--master-port", type=int, help="default: PET_MASTER_PORT or MASTER_PORT, else 29500")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every rank runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    env = dict(os.environ)
    node_rank = args.node_rank if args.node_rank is not None else \
        int(_first(env, "PET_NODE_RANK", "JOB_COMPLETION_INDEX", default="0"))
    addr = args.master_addr or _first(env, "PET_MASTER_ADDR", "MASTER_ADDR", default="127.0.0.1")
    port = args.master_port or int(_first(env, "PET_MASTER_PORT", "MASTER_PORT", default="29500"))
    if not 0 <= node_rank < args.nnodes:
        parser.error(f"node rank {node_rank} is outside --nnodes {args.nnodes}")
    procs: list[subprocess.Popen] = []

    def forward(signum, frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    # Installed before the ranks start, so no signal falls between (and PID 1 ignores unhandled SIGTERM).
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, forward)
    for local_rank in range(args.nproc_per_node):
        extra = rank_env(node_rank, local_rank, args.nnodes, args.nproc_per_node, addr, port)
        procs.append(subprocess.Popen(command, env={**env, **extra}))
    status = combined_status(wait_ranks(procs))
    print(f"distill ranks: node {node_rank}: exit {status}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
