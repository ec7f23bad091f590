"""Array stages do not care which worker starts first: worker 1 may run to its end before worker 0 starts.

Slurm array tasks and Kubernetes Indexed pods are scheduled independently, so a late task 0 is normal.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

from pipeline.recipe import load_stage_file
from pipeline.runner import STARTED, run_recipe
from pipeline.world import World
from tests.conftest import REPO

WORDS = ("gloss noun verb tree river stone light water green small house quick bird sound cold warm "
         "field music paper glass table voice north winter summer garden letter number circle").split()


def _run(config, run_dir, stage, worker, num_workers):
    recipe = load_stage_file(stage, config)
    return run_recipe(recipe, run_dir, stages=[stage], world=World(worker=worker, num_workers=num_workers))[stage]


def _outputs(manifest) -> dict[str, str]:
    return {o.path: o.sha256 for o in manifest.outputs}


def test_worker_one_finishes_before_worker_zero_starts(tmp_path):
    from pipeline import registry

    registry.register("toy_array", "tests.fixtures.toy_array")
    config = tmp_path / "items.yaml"
    config.write_text("items: 5\n")
    # Earlier output under another config: the first worker to arrive (worker 1) must clear it, once.
    stale = tmp_path / "run" / "toy_array"
    stale.mkdir(parents=True)
    (stale / STARTED).write_text(json.dumps({"config_hash": "old", "inputs": {}}))
    (stale / "item-0.txt").write_text("stale\n")
    start = time.monotonic()
    assert _run(config, tmp_path / "run", "toy_array", worker=1, num_workers=2) is None
    assert time.monotonic() - start < 30, "worker 1 waited for worker 0"
    assert not (stale / "item-0.txt").exists() and (stale / "item-1.txt").read_text() == "1\n"
    manifest = _run(config, tmp_path / "run", "toy_array", worker=0, num_workers=2)
    assert manifest is not None and manifest.metrics == {"items": 5, "workers": 2}
    assert (stale / "item-1.txt").is_file(), "worker 0 wiped what worker 1 wrote"
    whole = _run(config, tmp_path / "one", "toy_array", worker=0, num_workers=1)
    assert _outputs(manifest) == _outputs(whole)


def test_late_worker_zero_in_separate_processes(tmp_path):
    """Worker 1 as its own `distill` process runs to completion; only then does worker 0's process start."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages:\n  items: {stage: toy_array, items: 7}\n")
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}

    def worker(i: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tests.fixtures.launch_main", "run", str(recipe), "--run-dir",
                               str(tmp_path / "run"), "--worker", str(i), "--num-workers", "2"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    first = worker(1)
    assert first.returncode == 0, first.stderr
    assert not (tmp_path / "run" / "items" / "manifest.json").exists()
    second = worker(0)
    assert second.returncode == 0, second.stderr
    manifest = json.loads((tmp_path / "run" / "items" / "manifest.json").read_text())
    assert sorted(o["path"] for o in manifest["outputs"]) == [f"item-{i}.txt" for i in range(7)]


def test_shard_worker_one_trains_the_tokenizer_when_it_starts_first(tmp_path):
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) + f" {i}\n"
                              for i in range(240)))
    config = tmp_path / "shard.yaml"
    config.write_text(f"inputs: [{corpus}]\ntrain_tokenizer: {{vocab_size: 120, sample_lines: 200}}\n"
                      "max_seq_len: 32\ndocs_per_shard: 40\nvalid_fraction: 0.1\nwait_timeout_s: 5\n")
    start = time.monotonic()
    assert _run(config, tmp_path / "two", "shard", worker=1, num_workers=2) is None
    assert time.monotonic() - start < 60
    assert (tmp_path / "two" / "shard" / "tokenizer").is_dir(), "worker 1 did not prepare the tokenizer"
    two = _run(config, tmp_path / "two", "shard", worker=0, num_workers=2)
    one = _run(config, tmp_path / "one", "shard", worker=0, num_workers=1)
    assert two is not None and _outputs(two) == _outputs(one), "split run differs from a one-worker run"
