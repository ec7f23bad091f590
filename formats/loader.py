"""The training input path: a `torch.utils.data.DataLoader` over a rank's disjoint shards, batches built in workers.

Each DataLoader worker reads its own partitions of the rank's share (disjoint whole shards), masks its part
of each batch at once (`kd.masking.mask_batch`: the same masks as per sample, so caches stay valid), joins
the teacher cache (`formats.cache.CacheLookup`, found from each key) and collates CPU tensors; the
DataLoader prefetches and pins them when asked, and the main process merges the workers' parts of a batch
(a cheap concatenation). The batches are the rank's samples in the reader's order whatever the worker count,
and the state advances only when a batch is handed on, so prefetched batches never count.

Why torch's DataLoader and not torchdata's StatefulDataLoader: its state is per worker, so it resumes only
on the same worker count, while ours is one global offset (the reader's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from formats.corpus import CorpusReader
from kd.masking import Masker, MaskedBatch, key_hashes
from pipeline.config import ConfigError
from pipeline.manifest import ManifestError

SLOTS, BATCH, LAST, ERROR, MESSAGE = "_slots", "_batch", "_last", "_error", "_message"
"""Keys of a worker's part of a batch: the samples' places in the batch, the batch number, and the (epoch,
global position) of its last sample; removed when the parts are merged. A worker that meets a ManifestError
or ConfigError sends its name and message instead."""


def _cells(lengths: np.ndarray) -> np.ndarray:
    """Flat indices, in a [rows, longest] grid, of the cells that concatenated rows of `lengths` fill."""
    width = int(lengths.max())
    return np.arange(int(lengths.sum())) + np.repeat(np.arange(len(lengths)) * width - (np.cumsum(lengths) - lengths),
                                                     lengths)


def _padded(flat: np.ndarray, lengths: np.ndarray, value: int, cells: np.ndarray) -> np.ndarray:
    """Concatenated rows of `lengths` as a [rows, longest] int64 array padded with `value`."""
    out = np.full(len(lengths) * int(lengths.max()), value, dtype=np.int64)
    out[cells] = flat
    return out.reshape(len(lengths), -1)


def _target_tensors(cols: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The trainer's cached-target tensors from `CacheLookup.gather`'s row-level columns."""
    out = {"topk_ids": torch.from_numpy(cols["topk_ids"].astype(np.int64)),
           "topk_logp": torch.from_numpy(cols["topk_logp"].astype(np.float32)),
           "tail_logmass": torch.from_numpy(cols["tail_logmass"].astype(np.float32))}
    if "tail_logmass_t" in cols:
        out["tail_logmass_t"] = torch.from_numpy(cols["tail_logmass_t"].astype(np.float32))
    if "sampled_ids" in cols:
        out["sampled_ids"] = torch.from_numpy(cols["sampled_ids"].astype(np.int64))
        out["sampled_counts"] = torch.from_numpy(cols["sampled_counts"].astype(np.float32))
    return out


SAMPLE_IDS = "sample_ids"
"""With a team: each sample's int64 id (a hash of its key), per sample, for per-example teacher draws."""


def team_key(member: int, key: str) -> str:
    """The batch key of team member `member`'s cached target `key` (e.g. `team1/topk_ids`)."""
    return f"team{member}/{key}"


def collate_masked(masked: MaskedBatch, pad_id: int, cache: tuple | None = None,
                   team: list[tuple] | None = None) -> dict[str, torch.Tensor]:
    """The trainer's batch: masked inputs, (rows, cols, labels) of masked positions and cached targets if given.

    `cache` is `CacheLookup.gather`'s (rows per sample, columns); the same tensors as
    `stages.general.data.make_batch`. `team` is one such gather per team member: member j's targets go
    under `team_key(j, ...)`, with `SAMPLE_IDS`.
    """
    lengths = masked.lengths
    cells = _cells(lengths)  # one index for the three padded tensors
    attention_mask = np.zeros(len(lengths) * int(lengths.max()), dtype=np.int64)
    attention_mask[cells] = 1
    batch = {"input_ids": torch.from_numpy(_padded(masked.input_ids, lengths, pad_id, cells)),
             "attention_mask": torch.from_numpy(attention_mask.reshape(len(lengths), -1)),
             "token_type_ids": torch.from_numpy(_padded(masked.token_type_ids, lengths, 0, cells)),
             "rows": torch.from_numpy(np.repeat(np.arange(len(lengths)), masked.n_masked)),
             "cols": torch.from_numpy(masked.positions.astype(np.int64)),
             "labels": torch.from_numpy(masked.labels.astype(np.int64))}
    if cache is not None:
        batch.update(_target_tensors(cache[1]))
    if team is not None:
        batch[SAMPLE_IDS] = torch.from_numpy(key_hashes(0, masked.keys).view(np.int64))
        for member, (_, cols) in enumerate(team):
            batch.update({team_key(member, k): v for k, v in _target_tensors(cols).items()})
    return batch


def check_join(masked: MaskedBatch, cache: tuple, where: Path) -> None:
    """ManifestError unless the cached positions are the recomputed masks (the same samples, the same masks)."""
    n, cols = cache
    if not (np.array_equal(n, masked.n_masked) and np.array_equal(cols["positions"], masked.positions)):
        bad = next((k for k, a, b in zip(masked.keys, n, masked.n_masked) if a != b), masked.keys[0])
        raise ManifestError(f"{where}: sample {bad!r}: cached mask positions differ from the recomputed ones "
                            "(mask settings or masking code changed); rebuild the cache")


class BatchStream(IterableDataset):
    """What runs in each DataLoader worker: its part of every batch of this rank, masked, joined and collated.

    Worker j of J reads the partitions p with (p // world_size) % J == j: with J x world_size dividing the
    partition count, the workers of all ranks read disjoint whole shards. Every worker walks the rank's
    positions, so it knows each sample's place in the batch; the main process merges the J parts of a batch.
    """

    def __init__(self, reader: CorpusReader, masker: Masker, batch_size: int, pad_id: int, *,
                 cache_factory: Callable[[int], object] | None = None):
        self.reader, self.masker, self.batch_size, self.pad_id = reader, masker, batch_size, pad_id
        self.cache_factory = cache_factory

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self._parts()
        except (ManifestError, ConfigError) as err:
            # Crossing the process boundary, torch would wrap it as "Caught ... in DataLoader worker process 0":
            # hand the one-line message to the main process instead, which raises it as it was.
            yield {ERROR: type(err).__name__, MESSAGE: str(err)}

    def _parts(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        world = self.reader.world_size
        owned = -(-self.reader.partitions // (world * workers))  # partitions whose window this worker holds
        lookup = self.cache_factory(owned) if self.cache_factory is not None else None
        samples, slots, last, batch = [], [], None, 0
        stream = self.reader.stream((lambda p: (p // world) % workers == worker) if workers > 1 else None)
        for i, (epoch, position, sample) in enumerate(stream):
            if i // self.batch_size != batch:
                yield self._part(batch, samples, slots, last, lookup)
                samples, slots, last, batch = [], [], None, i // self.batch_size
            if sample is not None:
                samples.append(sample)
                slots.append(i % self.batch_size)
                last = (epoch, position)
        if slots or last is None:
            yield self._part(batch, samples, slots, last, lookup)

    def _part(self, batch: int, samples: list, slots: list, last, lookup) -> dict:
        part = {BATCH: batch, SLOTS: torch.tensor(slots, dtype=torch.long),
                LAST: torch.tensor(last if last is not None else (-1, -1), dtype=torch.long)}
        if not samples:
            return part
        masked = self.masker.batch(samples)
        if lookup is None:
            return {**collate_masked(masked, self.pad_id), **part}
        joined = []
        for one in lookup if isinstance(lookup, list) else [lookup]:  # a list: one per team member (none online)
            joined.append(one.gather(masked.keys))
            check_join(masked, joined[-1], one.cache_dir)
        if isinstance(lookup, list):
            return {**collate_masked(masked, self.pad_id, team=joined), **part}
        return {**collate_masked(masked, self.pad_id, joined[0]), **part}


def merge_parts(parts: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch from the workers' parts: samples back in their places, padded to the longest, masked rows
    ordered by sample (the same tensors one worker would have made)."""
    full = [p for p in parts if len(p[SLOTS])]
    if len(full) == 1:
        return {k: v for k, v in full[0].items() if k not in (SLOTS, BATCH, LAST)}
    width = max(p["input_ids"].shape[1] for p in full)
    slots = torch.cat([p[SLOTS] for p in full])
    order = torch.argsort(slots)
    out = {}
    for key, value in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
        padded = [torch.nn.functional.pad(p[key], (0, width - p[key].shape[1]), value=value) for p in full]
        out[key] = torch.cat(padded)[order]
    if SAMPLE_IDS in full[0]:  # per sample, like the padded tensors
        out[SAMPLE_IDS] = torch.cat([p[SAMPLE_IDS] for p in full])[order]
    place = torch.empty_like(order)
    place[order] = torch.arange(len(order))
    rows = torch.cat([place[offset + p["rows"]] for offset, p in zip(_offsets(full), full)])
    by_row = torch.argsort(rows, stable=True)  # sample order; each sample's positions stay ascending
    out["rows"] = rows[by_row]
    for key in full[0]:
        if key not in out and key not in (SLOTS, BATCH, LAST, "rows"):
            out[key] = torch.cat([p[key] for p in full])[by_row]
    return out


def _offsets(parts: list[dict]) -> list[int]:
    sizes = [len(p[SLOTS]) for p in parts]
    return [sum(sizes[:i]) for i in range(len(sizes))]


class TrainLoader:
    """A rank's batches through a DataLoader (workers, prefetch, pinned memory), with a world-size-free state.

    `reader` is the rank's CorpusReader (its rank and world size, seed, shuffle, loop); `cache_factory(n)`
    builds a `CacheLookup` inside each worker, holding the shards of n windows (None: masks only), or a list
    of them (a teacher team: each member's targets under `team_key`, and the samples' ids; an empty list for
    an online team).
    `num_workers=0` runs in this process. The batches do not depend on `num_workers`.
    """

    def __init__(self, reader: CorpusReader, masker: Masker, batch_size: int, pad_id: int, *,
                 cache_factory: Callable[[int], object] | None = None, num_workers: int = 0,
                 prefetch_factor: int = 2, pin_memory: bool = False):
        if batch_size < 1 or num_workers < 0 or prefetch_factor < 1:
            raise ValueError("batch_size and prefetch_factor must be >= 1, num_workers >= 0")
        self.reader, self.masker, self.batch_size, self.pad_id = reader, masker, batch_size, pad_id
        self.cache_factory, self.num_workers = cache_factory, num_workers
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self._iter = None

    def _start(self) -> Iterator[dict]:
        stream = BatchStream(self.reader, self.masker, self.batch_size, self.pad_id, cache_factory=self.cache_factory)
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
        parts = [next(self._iter) for _ in range(max(self.num_workers, 1))]
        for part in parts:
            if ERROR in part:
                raise (ManifestError if part[ERROR] == "ManifestError" else ConfigError)(part[MESSAGE])
        if len({int(p[BATCH]) for p in parts}) != 1:
            raise RuntimeError("loader workers fell out of step")  # a bug, not a user error
        if not any(len(p[SLOTS]) for p in parts):
            raise StopIteration
        epoch, position = max(tuple(p[LAST].tolist()) for p in parts)
        self.reader.advance(epoch, position)
        return merge_parts(parts, self.pad_id)

    def state_dict(self) -> dict:
        """The reader's world-size-independent state: epoch, global offset, seed."""
        return self.reader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (before the first batch is drawn)."""
        self.reader.load_state_dict(state)
        self._iter = None
