"""Cache shards and teacher targets: round trip, corruption, top-k reconstruction, unbiased sampled targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from formats.cache import (
    CacheRecord,
    check_record,
    encode_shard,
    ids_dtype,
    read_cache_shard,
    read_header,
    write_cache_shard,
)
from kd.teachers import teacher_targets
from pipeline.manifest import ManifestError
from stages.cache.records import _length_batches

VOCAB = 30522


def records(n: int = 5, k: int = 4, sampled: int = 0, cls: bool = False, seed: int = 0,
            temps: tuple = ()) -> list[CacheRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        m = int(rng.integers(1, 6))
        logits = torch.from_numpy(rng.normal(size=(m, VOCAB)).astype(np.float32) * 3)
        t = teacher_targets(logits, k, rng.random((m, sampled)) if sampled else None, tail_temperatures=temps)
        out.append(CacheRecord(key=f"s{i}", positions=np.sort(rng.choice(100, m, replace=False)).astype(np.int64),
                               cls_hidden=rng.normal(size=(3, 8)).astype(np.float16) if cls else None, **t))
    return out


def test_round_trip_is_exact_and_bytes_deterministic(tmp_path):
    recs = records(sampled=16, cls=True, temps=(2.0, 4.0))
    path = tmp_path / "train-000000.cache"
    size = write_cache_shard(path, recs, vocab_size=VOCAB, max_seq_len=128, stats={"samples": 5})
    assert size == path.stat().st_size
    assert encode_shard(records(sampled=16, cls=True, temps=(2.0, 4.0)), vocab_size=VOCAB, max_seq_len=128, stats={"samples": 5}) == path.read_bytes()
    back = list(read_cache_shard(path))
    assert [r.key for r in back] == [r.key for r in recs] and read_header(path)["stats"] == {"samples": 5}
    for a, b in zip(recs, back):
        assert b.topk_ids.dtype == np.uint16 and b.topk_logp.dtype == np.float16 and b.positions.dtype == np.int64
        for name in ("positions", "topk_ids", "topk_logp", "tail_logmass", "sampled_ids", "sampled_counts", "cls_hidden",
                     "tail_logmass_t"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        check_record(b, path, VOCAB)
    assert ids_dtype(200) == np.uint8 and ids_dtype(65536) == np.uint16 and ids_dtype(65537) == np.uint32


def test_corrupt_and_truncated_shards_are_refused(tmp_path):
    path = tmp_path / "x.cache"
    write_cache_shard(path, records(), vocab_size=VOCAB, max_seq_len=128)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ManifestError, match="corrupt cache-shard body"):
        list(read_cache_shard(path))
    path.write_bytes(b"junk" + data)
    with pytest.raises(ManifestError, match="bad magic"):
        read_header(path)


def test_check_record_catches_unsorted_and_nonfinite(tmp_path):
    rec = records(n=1)[0]
    bad = CacheRecord(key="b", positions=rec.positions, topk_ids=rec.topk_ids, topk_logp=rec.topk_logp[:, ::-1].copy(),
                      tail_logmass=rec.tail_logmass)
    with pytest.raises(ManifestError, match="not sorted"):
        check_record(bad, tmp_path, VOCAB)
    nan = CacheRecord(key="n", positions=rec.positions, topk_ids=rec.topk_ids, topk_logp=rec.topk_logp,
                      tail_logmass=np.full_like(rec.tail_logmass, np.nan))
    with pytest.raises(ManifestError, match="non-finite"):
        check_record(nan, tmp_path, VOCAB)


def test_topk_and_tail_reconstruct_the_teacher_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0], [0.0, 0.0, 0.0, 0.0, 5.0]])
    t = teacher_targets(logits, 2)
    p = torch.softmax(logits, -1).numpy()
    # Hand check of row 0: ids 0 and 1 lead; the tail is the mass of ids 2, 3, 4.
    assert t["topk_ids"][0].tolist() == [0, 1] and t["topk_ids"][1][0] == 4
    np.testing.assert_allclose(np.exp(t["topk_logp"][0].astype(np.float64)), p[0, :2], rtol=1e-3)
    np.testing.assert_allclose(np.exp(t["tail_logmass"][0]), p[0, 2:].sum(), rtol=1e-5)
    total = np.exp(t["topk_logp"].astype(np.float64)).sum(1) + np.exp(t["tail_logmass"].astype(np.float64))
    np.testing.assert_allclose(total, 1.0, atol=2e-3)  # fp16 top-k: relative error 2^-11 per entry


def test_tail_is_accurate_when_topk_holds_nearly_all_mass():
    logits = torch.tensor([[30.0, 0.0, 0.0, 0.0]])
    t = teacher_targets(logits, 1)
    expected = np.log(3.0) - 30.0 - np.log1p(3 * np.exp(-30.0))  # log(3 e^0 / (e^30 + 3))
    assert abs(t["tail_logmass"][0] - expected) < 1e-4


def test_sampled_targets_are_unbiased():
    """counts / s estimates p without bias: over many draws the mean is within a few standard errors of p."""
    logits = torch.tensor([[1.5, 0.3, -0.2, 0.9, -2.0, 0.0]])
    p = torch.softmax(logits, -1).numpy()[0]
    rng = np.random.default_rng(0)
    draws, rounds = 8, 4000
    t = teacher_targets(logits.repeat(rounds, 1), 2, rng.random((rounds, draws)))
    freq = np.zeros(6)
    for ids, counts in zip(t["sampled_ids"], t["sampled_counts"]):
        np.add.at(freq, ids, counts)
        assert counts.sum() == draws
    estimate = freq / (draws * rounds)
    stderr = np.sqrt(p * (1 - p) / (draws * rounds))
    assert np.all(np.abs(estimate - p) < 4 * stderr), (estimate, p)
    # The plain top-k estimate is biased: it puts no mass on the tail ids 4 and 5.
    assert estimate[4] > 0 and estimate[5] > 0


def test_length_batches_respect_token_budget():
    lengths = np.array([10, 50, 12, 49, 100, 5])
    batches = _length_batches(lengths, 120)
    assert sorted(np.concatenate(batches).tolist()) == list(range(6))
    assert all(len(b) * lengths[b].max() <= 120 or len(b) == 1 for b in batches)


def test_lookup_finds_records_from_keys_and_names_a_missing_one(tmp_path):
    """CacheLookup: no key dict; a key's shard comes from its prefix, its row from its index."""
    from types import SimpleNamespace

    from formats.cache import CacheLookup, CacheRecord, SUFFIX, write_cache_shard
    from pipeline.manifest import ManifestError, sha256_file

    rng = np.random.default_rng(0)
    outputs, rels = [], []
    for shard in range(2):
        records = []
        for i in range(3):
            n = int(rng.integers(1, 4))
            records.append(CacheRecord(key=f"train-{shard:06d}-{i:06d}", positions=np.sort(rng.choice(20, n, replace=False)),
                                       topk_ids=rng.integers(0, 50, (n, 2)), topk_logp=-np.sort(rng.random((n, 2)), 1),
                                       tail_logmass=np.full(n, -2.0, np.float32)))
        rel = f"t/train-{shard:06d}{SUFFIX}"
        write_cache_shard(tmp_path / rel, records, vocab_size=50, max_seq_len=21)
        rels.append(rel)
        outputs.append(SimpleNamespace(path=rel, sha256=sha256_file(tmp_path / rel), items={"samples": 3}))
    manifest = SimpleNamespace(extra={"splits": {"train": {"shards": rels}}}, outputs=outputs)
    lookup = CacheLookup(tmp_path, manifest, "train", capacity=1)  # capacity 1: shards are re-decoded as needed
    keys = ["train-000001-000002", "train-000000-000000", "train-000001-000000"]
    n, cols = lookup.gather(keys)
    expected = [lookup.record(k) for k in keys]
    assert n.tolist() == [r.positions.size for r in expected]
    assert np.array_equal(cols["positions"], np.concatenate([r.positions for r in expected]))
    assert np.array_equal(cols["topk_ids"], np.concatenate([r.topk_ids for r in expected]))
    for bad in ("train-000001-000007", "train-000009-000000", "valid-000000-x"):
        with pytest.raises(ManifestError, match=f"no (cache )?record for sample {bad!r}"):
            lookup.gather(["train-000000-000001", bad])
