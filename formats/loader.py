"""The training input path: a `torch.utils.data.DataLoader` over a rank's disjoint shards, batches built in workers.

Each DataLoader worker is one `CorpusReader` reader (its own windows of whole shards), masks a batch at a time
(`kd.masking.mask_batch`: the same masks as per sample, so caches stay valid), joins the teacher cache
(`formats.cache.CacheLookup`, found from each key) and collates CPU tensors; the DataLoader prefetches and
pins them when asked. A batch carries the cursors of the samples in it; the main process applies them only
when it hands the batch on, so prefetched batches never count and the state is exactly what was consumed.

Exact resume on the same world size and worker count: the state also records how many batches were
handed out, and workers are renumbered so that the one whose batch was next is asked first (the DataLoader
always starts at worker 0). On another world size or worker count the windows are dealt afresh; no sample
is repeated or skipped within the epoch.

Why torch's DataLoader and not torchdata's StatefulDataLoader: its state is per worker, so it resumes only
on the same worker count, and the world-size-independent state has to be ours anyway.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from formats.corpus import CorpusReader
from kd.masking import Masker, MaskedBatch

CURSORS = "_cursors"
"""Batch key of the [n, 4] (epoch, window, a, b) cursors; removed before a batch leaves the loader."""


def pad_rows(flat: np.ndarray, lengths: np.ndarray, value: int) -> torch.Tensor:
    """Concatenated rows of `lengths` into a [rows, longest] int64 tensor padded with `value`, vectorised."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out = np.full((len(lengths), int(lengths.max())), value, dtype=np.int64)
    out[rows, cols] = flat
    return torch.from_numpy(out)


def collate_masked(masked: MaskedBatch, pad_id: int, cache: tuple | None = None) -> dict[str, torch.Tensor]:
    """The trainer's batch: masked inputs, (rows, cols, labels) of masked positions and cached targets if given.

    `cache` is `CacheLookup.gather`'s (rows per sample, columns); the same tensors as
    `stages.general.data.make_batch`.
    """
    lengths = masked.lengths
    input_ids = pad_rows(masked.input_ids, lengths, pad_id)
    attention_mask = (torch.arange(input_ids.shape[1])[None, :] < torch.from_numpy(lengths)[:, None]).long()
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "token_type_ids": pad_rows(masked.token_type_ids, lengths, 0),
             "rows": torch.from_numpy(np.repeat(np.arange(len(lengths)), masked.n_masked)),
             "cols": torch.from_numpy(masked.positions.astype(np.int64)),
             "labels": torch.from_numpy(masked.labels.astype(np.int64))}
    if cache is not None:
        _, cols = cache
        batch["topk_ids"] = torch.from_numpy(cols["topk_ids"].astype(np.int64))
        batch["topk_logp"] = torch.from_numpy(cols["topk_logp"].astype(np.float32))
        batch["tail_logmass"] = torch.from_numpy(cols["tail_logmass"].astype(np.float32))
        if "sampled_ids" in cols:
            batch["sampled_ids"] = torch.from_numpy(cols["sampled_ids"].astype(np.int64))
            batch["sampled_counts"] = torch.from_numpy(cols["sampled_counts"].astype(np.float32))
    return batch


def check_join(masked: MaskedBatch, cache: tuple, where: Path) -> None:
    """ManifestError unless the cached positions are the recomputed masks (the same samples, the same masks)."""
    from pipeline.manifest import ManifestError

    n, cols = cache
    if not (np.array_equal(n, masked.n_masked) and np.array_equal(cols["positions"], masked.positions)):
        bad = next((k for k, a, b in zip(masked.keys, n, masked.n_masked) if a != b), masked.keys[0])
        raise ManifestError(f"{where}: sample {bad!r}: cached mask positions differ from the recomputed ones "
                            "(mask settings or masking code changed); rebuild the cache")


class BatchStream(IterableDataset):
    """What runs in each DataLoader worker: this worker's samples, masked, joined and collated `batch_size` at a time."""

    def __init__(self, reader: CorpusReader, masker: Masker, batch_size: int, pad_id: int, *,
                 cache_factory: Callable[[], object] | None = None, first_worker: int = 0):
        self.reader, self.masker, self.batch_size, self.pad_id = reader, masker, batch_size, pad_id
        self.cache_factory, self.first_worker = cache_factory, first_worker

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        q, readers = self.reader.reader_index((worker + self.first_worker) % workers, workers)
        lookup = self.cache_factory() if self.cache_factory is not None else None  # per worker: its own shards
        samples, cursors = [], []
        for cursor, sample in self.reader.stream(q, readers):
            samples.append(sample)
            cursors.append(cursor)
            if len(samples) == self.batch_size:
                yield self._batch(samples, cursors, lookup)
                samples, cursors = [], []
        if samples:
            yield self._batch(samples, cursors, lookup)

    def _batch(self, samples: list, cursors: list, lookup) -> dict:
        masked = self.masker.batch(samples)
        cache = None
        if lookup is not None:
            cache = lookup.gather(masked.keys)
            check_join(masked, cache, lookup.cache_dir)
        batch = collate_masked(masked, self.pad_id, cache)
        furthest: dict[tuple, int] = {}
        for epoch, window, a, b in cursors:  # one cursor per run of positions: [a, b) grows sample by sample
            furthest[(epoch, window, a)] = max(b, furthest.get((epoch, window, a), b))
        batch[CURSORS] = torch.tensor([[*k, b] for k, b in furthest.items()], dtype=torch.long)
        return batch


class TrainLoader:
    """A rank's batches through a DataLoader (workers, prefetch, pinned memory), with a world-size-free state.

    `reader` is the rank's CorpusReader (its rank and world size, seed, shuffle, loop); `cache_factory`
    builds a `CacheLookup` inside each worker (None: masks only). `num_workers=0` runs in this process.
    """

    def __init__(self, reader: CorpusReader, masker: Masker, batch_size: int, pad_id: int, *,
                 cache_factory: Callable[[], object] | None = None, num_workers: int = 0,
                 prefetch_factor: int = 2, pin_memory: bool = False):
        if batch_size < 1 or num_workers < 0 or prefetch_factor < 1:
            raise ValueError("batch_size and prefetch_factor must be >= 1, num_workers >= 0")
        self.reader, self.masker, self.batch_size, self.pad_id = reader, masker, batch_size, pad_id
        self.cache_factory, self.num_workers = cache_factory, num_workers
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.batches = 0
        self._iter = None

    def _start(self) -> Iterator[dict]:
        workers = max(self.num_workers, 1)
        stream = BatchStream(self.reader, self.masker, self.batch_size, self.pad_id,
                             cache_factory=self.cache_factory, first_worker=self.batches % workers)
        extra = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False} if self.num_workers else {}
        # A private generator: the DataLoader draws its workers' base seed from it, and drawing from torch's
        # global one would shift the dropout stream of a resumed run (exact resume compares weights bit for bit).
        generator = torch.Generator().manual_seed(self.reader.seed)
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            generator=generator, **extra)
        return iter(loader)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        """The next batch (CPU tensors, pinned when asked); its samples now count as consumed."""
        if self._iter is None:
            self._iter = self._start()
        batch = next(self._iter)
        for cursor in batch.pop(CURSORS).tolist():
            # Several ranks: only the merged state (global_state) may call an epoch finished.
            self.reader.advance(cursor, prune=self.reader.world_size == 1)
        self.batches += 1
        return batch

    def state_dict(self) -> dict:
        """The reader's world-size-independent state, plus the batch count (which worker is next)."""
        return {**self.reader.state_dict(), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (before the first batch is drawn)."""
        self.reader.load_state_dict(state)
        self.batches = int(state.get("batches", 0))
        self._iter = None

    def global_state(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor], rank: int, world_size: int) -> dict:
        """The state of all ranks together (every rank calls this at the same step; two all-reduces).

        Each rank's taken intervals are gathered (as bytes, summed into its own row) and united; finished epochs
        are dropped and the result is applied here too, so every rank holds the same, small state.
        """
        if world_size == 1:
            return self.state_dict()
        own = json.dumps(self.reader.state_dict(), sort_keys=True).encode()
        sizes = torch.zeros(world_size, dtype=torch.float64)
        sizes[rank] = len(own)
        sizes = all_reduce_sum(sizes)
        rows = torch.zeros(world_size, int(sizes.max().item()), dtype=torch.float64)
        rows[rank, :len(own)] = torch.tensor(list(own), dtype=torch.float64)
        rows = all_reduce_sum(rows).to(torch.uint8)
        states = [json.loads(bytes(rows[r, :int(sizes[r].item())].tolist())) for r in range(world_size)]
        reader = self.reader
        union = CorpusReader.__new__(CorpusReader)  # bookkeeping only: reuse the reader's own interval arithmetic
        union.__dict__.update(reader.__dict__)
        union.taken, union._totals, union.epoch = {}, {}, min(int(st["epoch"]) for st in states)
        for st in states:
            for epoch, per_window in st["taken"].items():
                for window, intervals in per_window.items():
                    for a, b in intervals:
                        union.advance((int(epoch), int(window), a, b))
        state = {**union.state_dict(), "batches": self.batches}
        iterator = self._iter
        self.load_state_dict(state)
        self._iter = iterator  # the stream goes on: only the bookkeeping was replaced
        return state
