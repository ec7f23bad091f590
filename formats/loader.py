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


CHUNK_SAMPLES = 256
"""Samples a worker masks, joins and collates in one pass (whole batches, at least one). Every step is a few
numpy calls whatever the sample count, so at batch 32 those calls cost as much as the work: on the data
bench's corpus, mask + join + collate took ~17 us a sample in passes of 32 and ~11 in passes of 256."""


MAX_RUNS = 64
"""Up to this many contiguous runs of cells, the padded tensors are filled a run at a time (else scattered)."""


def _floats(array: np.ndarray) -> torch.Tensor:
    """float32 tensor of a float column (torch converts float16 ~10x faster than numpy's astype)."""
    if array.dtype == np.float16:
        return torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32)
    return torch.from_numpy(array.astype(np.float32))


def _target_tensors(cols: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The trainer's cached-target tensors from `CacheLookup.gather`'s row-level columns."""
    out = {"topk_ids": torch.from_numpy(cols["topk_ids"].astype(np.int64)), "topk_logp": _floats(cols["topk_logp"]),
           "tail_logmass": _floats(cols["tail_logmass"])}
    if "tail_logmass_t" in cols:
        out["tail_logmass_t"] = _floats(cols["tail_logmass_t"])
    if "sampled_ids" in cols:
        out["sampled_ids"] = torch.from_numpy(cols["sampled_ids"].astype(np.int64))
        out["sampled_counts"] = _floats(cols["sampled_counts"])
    return out


SAMPLE_IDS = "sample_ids"
"""With a team: each sample's int64 id (a hash of its key), per sample, for per-example teacher draws."""


def team_key(member: int, key: str) -> str:
    """The batch key of team member `member`'s cached target `key` (e.g. `team1/topk_ids`)."""
    return f"team{member}/{key}"


def collate_batches(masked: MaskedBatch, pad_id: int, cache: tuple | None = None,
                    sizes: list[int] | None = None, team: list[tuple] | None = None) -> list[dict[str, torch.Tensor]]:
    """The trainer's batches from consecutive runs of `sizes` samples (all of them when None), each collated as
    `collate_masked` would: the padding, index and type conversions are done once for all of them, and each
    batch's tensors are views of the shared arrays."""
    lengths = masked.lengths
    sizes = np.asarray([len(lengths)] if sizes is None else sizes, dtype=np.int64)
    if sizes.size == 0 or sizes.min() < 1 or int(sizes.sum()) != len(lengths):
        raise ValueError(f"batch sizes {sizes.tolist()} do not split {len(lengths)} samples")
    first = np.cumsum(sizes) - sizes  # each batch's first sample
    batch_of = np.repeat(np.arange(len(sizes)), sizes)
    width = np.maximum.reduceat(lengths, first)  # each batch pads to its own longest sample
    grid = np.concatenate([[0], np.cumsum(sizes * width)])
    row = np.arange(len(lengths)) - first[batch_of]  # each sample's row in its batch
    # One flat index, into all batches' padded grids side by side, for every token: shared by the three tensors.
    cells = np.repeat(grid[batch_of] + row * width[batch_of] - (np.cumsum(lengths) - lengths), lengths)
    cells += np.arange(len(cells))
    # Packed corpora fill most rows to the longest: the cells are then a few contiguous runs, each one copy.
    runs = np.concatenate([[0], np.flatnonzero(np.diff(cells) != 1) + 1, [len(cells)]]).tolist()
    runs = list(zip(runs[:-1], runs[1:])) if len(runs) <= MAX_RUNS else None
    grids = {}
    for key, flat, value in (("input_ids", masked.input_ids, pad_id), ("attention_mask", 1, 0),
                             ("token_type_ids", masked.token_type_ids, 0)):
        out = np.full(int(grid[-1]), value, dtype=np.int64)
        if runs is None:
            out[cells] = flat
        else:
            for a, b in runs:
                out[cells[a]:cells[a] + b - a] = flat if np.isscalar(flat) else flat[a:b]
        grids[key] = torch.from_numpy(out)
    flat_rows = {"rows": torch.from_numpy(np.repeat(row, masked.n_masked)),
                 "cols": torch.from_numpy(masked.positions.astype(np.int64)),
                 "labels": torch.from_numpy(masked.labels.astype(np.int64))}
    if cache is not None:
        flat_rows.update(_target_tensors(cache[1]))
    for member, (_, cols) in enumerate(team or []):
        flat_rows.update({team_key(member, k): v for k, v in _target_tensors(cols).items()})
    ids = torch.from_numpy(key_hashes(0, masked.keys).view(np.int64)) if team is not None else None
    masked_cut = np.concatenate([[0], np.cumsum(np.add.reduceat(masked.n_masked, first))]).tolist()
    batches = []
    for b, (n, w) in enumerate(zip(sizes.tolist(), width.tolist())):
        lo, hi = int(grid[b]), int(grid[b + 1])
        batch = {key: value[lo:hi].view(n, w) for key, value in grids.items()}
        batch.update({key: value[masked_cut[b]:masked_cut[b + 1]] for key, value in flat_rows.items()})
        if ids is not None:
            batch[SAMPLE_IDS] = ids[int(first[b]):int(first[b]) + n]
        batches.append(batch)
    return batches


def collate_masked(masked: MaskedBatch, pad_id: int, cache: tuple | None = None,
                   team: list[tuple] | None = None) -> dict[str, torch.Tensor]:
    """The trainer's batch: masked inputs, (rows, cols, labels) of masked positions and cached targets if given.

    `cache` is `CacheLookup.gather`'s (rows per sample, columns); the same tensors as
    `stages.general.data.make_batch`. `team` is one such gather per team member: member j's targets go
    under `team_key(j, ...)`, with `SAMPLE_IDS`.
    """
    return collate_batches(masked, pad_id, cache, team=team)[0]


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
        per_chunk = max(1, CHUNK_SAMPLES // self.batch_size)
        pending, samples, slots, last, batch = [], [], [], None, 0  # pending: finished (batch, samples, slots, last)
        stream = enumerate(self.reader.stream((lambda p: (p // world) % workers == worker) if workers > 1 else None))
        while True:
            try:
                i, (epoch, position, sample) = next(stream)
            except StopIteration:
                break
            except (ManifestError, ConfigError):
                yield from self._chunk(pending, lookup)  # the batches finished before a bad shard come first
                raise
            if i // self.batch_size != batch:
                pending.append((batch, samples, slots, last))
                samples, slots, last, batch = [], [], None, i // self.batch_size
                if len(pending) == per_chunk:
                    yield from self._chunk(pending, lookup)
                    pending = []
            if sample is not None:
                samples.append(sample)
                slots.append(i % self.batch_size)
                last = (epoch, position)
        if slots or last is None:
            pending.append((batch, samples, slots, last))
        yield from self._chunk(pending, lookup)

    def _chunk(self, pending: list[tuple], lookup) -> Iterator[dict]:
        """The parts of finished batches, masked, joined and collated in one pass (`CHUNK_SAMPLES`)."""
        if not pending:
            return
        try:
            parts = self._collated(pending, lookup)
        except (ManifestError, ConfigError):
            if len(pending) == 1:
                raise
            for one in pending:  # batch by batch: the error comes after the batches before the one that has it
                yield from self._chunk([one], lookup)
            return
        yield from parts

    def _collated(self, pending: list[tuple], lookup) -> list[dict]:
        # Through numpy: torch.tensor from a list costs ~5x more, twice a batch.
        parts = [{BATCH: batch, SLOTS: torch.from_numpy(np.array(slots, dtype=np.int64)),
                  LAST: torch.from_numpy(np.array(last if last is not None else (-1, -1), dtype=np.int64))}
                 for batch, _, slots, last in pending]
        sizes = [len(samples) for _, samples, _, _ in pending if samples]
        if not sizes:
            return parts
        masked = self.masker.batch([s for _, samples, _, _ in pending for s in samples])
        cache = team = None
        if isinstance(lookup, list):  # a team: one lookup per member (none online)
            team = [one.gather(masked.keys) for one in lookup]
            for one, joined in zip(lookup, team):
                check_join(masked, joined, one.cache_dir)
        elif lookup is not None:
            cache = lookup.gather(masked.keys)
            check_join(masked, cache, lookup.cache_dir)
        collated = iter(collate_batches(masked, self.pad_id, cache, sizes, team=team))
        return [{**next(collated), **part} if samples else part for part, (_, samples, _, _) in zip(parts, pending)]


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
