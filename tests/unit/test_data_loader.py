"""The training loader: ranks and workers read disjoint whole shards, and a run resumes on another world size
with no sample repeated or skipped within the epoch; on the same world size it continues exactly."""

from __future__ import annotations

import threading

import pytest
import torch

from formats.corpus import CorpusReader, load_tokenizer, shard_manifest
from formats.loader import TrainLoader
from kd.masking import Masker, mask_spec_from_corpus
from tests.unit.test_corpus_reader import shard_dir  # noqa: F401  (the module's corpus fixture)

SEED, BUFFER, BATCH = 4, 1, 2


def masker(shard_dir):
    spec = mask_spec_from_corpus(shard_manifest(shard_dir).extra, load_tokenizer(shard_dir), mask_seed=0, rate=0.15,
                                 whole_word=False)
    return Masker(spec)


def loader(shard_dir, rank=0, world=1, workers=0, loop=False, buffer=BUFFER):
    reader = CorpusReader(shard_dir, seed=SEED, shuffle_buffer=buffer, rank=rank, world_size=world, loop=loop)
    return TrainLoader(reader, masker(shard_dir), BATCH, 0, num_workers=workers)


def batch_keys(batch, tokenizer_ids):
    """A sample's identity inside a batch: its original ids are gone (masked), so use (labels, length) rows."""
    return [tuple(row[:n].tolist()) for row, n in zip(batch["input_ids"], batch["attention_mask"].sum(1))]


def all_samples(shard_dir):
    """Every sample of the train split as its masked ids (masks are a function of the key: unique per sample)."""
    return sorted(k for b in loader(shard_dir) for k in batch_keys(b, None))


class Group:
    """A fake process group for ranks run as threads: all_reduce_sum waits for every rank, then sums."""

    def __init__(self, world: int):
        self.world, self.barrier, self.lock, self.parts = world, threading.Barrier(world), threading.Lock(), []

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.parts.append(value.clone())
        self.barrier.wait()
        total = torch.stack(self.parts).sum(0)
        self.barrier.wait()
        with self.lock:
            self.parts.clear()
        self.barrier.wait()
        return total


def global_states(loaders):
    group, out = Group(len(loaders)), [None] * len(loaders)

    def run(rank):
        out[rank] = loaders[rank].global_state(group.all_reduce_sum, rank, len(loaders))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(loaders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(s == out[0] for s in out), "every rank ends with the same global state"
    return out[0]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_read_disjoint_shards(shard_dir, world, workers):
    everything = all_samples(shard_dir)
    seen, shards = [], []
    for rank in range(world):
        reader = CorpusReader(shard_dir, seed=SEED, shuffle_buffer=BUFFER, rank=rank, world_size=world)
        rank_shards = set()
        for q in range(workers or 1):
            own = {s.key.rpartition("-")[0] for s in (x for _, x in reader.stream(*reader.reader_index(q, workers or 1)))}
            assert not own & rank_shards, "two workers of a rank read the same shard"
            rank_shards |= own
        shards.append(rank_shards)
        seen += [k for b in loader(shard_dir, rank, world, workers) for k in batch_keys(b, None)]
    assert sorted(seen) == everything, "union of the ranks = every sample, none twice"
    for i in range(world):
        for j in range(i):
            assert not shards[i] & shards[j], "two ranks read the same shard"


@pytest.mark.parametrize("world_after", [1, 3])
def test_two_rank_run_resumes_on_another_world_size(shard_dir, world_after):
    everything = all_samples(shard_dir)
    before = [loader(shard_dir, rank, 2) for rank in range(2)]
    consumed = [k for _ in range(3) for l in before for k in batch_keys(next(l), None)]
    state = global_states(before)
    assert state["epoch"] == 0 and sum(b - a for t in state["taken"].values() for i in t.values() for a, b in i) == len(consumed)
    rest = []
    for rank in range(world_after):
        after = loader(shard_dir, rank, world_after, workers=2 if world_after == 1 else 0)
        after.load_state_dict(state)
        rest += [k for b in after for k in batch_keys(b, None)]
    assert sorted(consumed + rest) == everything, "no sample repeated or skipped within the epoch"


def test_same_world_and_workers_resume_exactly(shard_dir):
    straight = loader(shard_dir, workers=2, loop=True)
    expected = [next(straight) for _ in range(7)]
    first = loader(shard_dir, workers=2, loop=True)
    for _ in range(3):
        next(first)
    state = first.state_dict()
    second = loader(shard_dir, workers=2, loop=True)
    second.load_state_dict(state)
    for want in expected[3:]:
        got = next(second)
        assert all(torch.equal(got[k], want[k]) for k in want), "the resumed run continues with the next batch"


def test_two_rank_states_merge_across_epochs(shard_dir):
    loaders = [loader(shard_dir, rank, 2, loop=True) for rank in range(2)]
    total = loaders[0].reader.num_samples
    for _ in range(total // BATCH):  # each rank takes an epoch's worth: its share of epoch 0 is long done
        for l in loaders:
            next(l)
    state = global_states(loaders)
    assert state["epoch"] >= 1 and all(int(e) >= state["epoch"] for e in state["taken"])
    assert loaders[0].reader.epoch == state["epoch"], "the merged state is applied on every rank"


def test_fewer_windows_than_readers_still_deals_every_sample_once(shard_dir):
    """One window (the buffer spans the corpus) and 2 ranks x 2 workers: the window is cut into parts."""
    everything = all_samples(shard_dir)
    seen = [k for rank in range(2) for b in loader(shard_dir, rank, 2, workers=2, buffer=10**6) for k in batch_keys(b, None)]
    assert sorted(seen) == everything
    endless = loader(shard_dir, 1, 2, workers=2, loop=True, buffer=10**6)
    assert len([next(endless) for _ in range(len(everything))]) == len(everything), "loop=True keeps going"
