"""Corpus shards: what the `shard` stage writes and every later stage reads.

A shard is a webdataset tar of `.npy` members (fixed names, mtimes, owners and modes, so the same samples
always give the same bytes), written to a temporary name, fsynced and renamed. Reading gives a
deterministic, resumable sample stream.

Reading is split by whole shards: each epoch a seeded permutation of the shards is cut into shuffle
windows (consecutive shards holding at least `shuffle_buffer` samples), dealt to a fixed number of
partitions; the global order interleaves the partitions, and rank r of w takes every w-th position, which
(when w divides the partition count) touches only its own partitions' shards. The order, and so the
resumable state (one offset), does not depend on the world size (see CorpusReader).
"""

from __future__ import annotations

import ast
import io
import os
import signal
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from formats.tokenizer import load_tokenizer_from, tokenizer_sha256
from pipeline.config import ConfigError
from pipeline.manifest import Manifest, ManifestError, atomic_path, sha256_file

Sequence = tuple[np.ndarray, np.ndarray]
"""(input_ids int32, token_type_ids uint8) of one packed sample."""
MEMBERS = ("input_ids.npy", "token_type_ids.npy")
"""The tar members of each sample, in order."""


@dataclass(frozen=True)
class Sample:
    """One packed sequence: `input_ids` int32 starting with [CLS], `token_type_ids` uint8 of the same length."""

    key: str
    input_ids: np.ndarray
    token_type_ids: np.ndarray


def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy encoding of an array (never pickled)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _KillAfter(io.RawIOBase):
    """Test hook: a file wrapper that SIGKILLs the process once `limit` bytes were written, mid-shard."""

    def __init__(self, handle, limit: int):
        self.handle, self.limit, self.count = handle, limit, 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.handle.tell()

    def write(self, data) -> int:
        self.count += len(data)
        if self.count >= self.limit:
            self.handle.write(bytes(data)[: max(0, len(data) - (self.count - self.limit))])
            self.handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.handle.write(data)


def write_shard(path: Path, prefix: str, samples: list[Sequence], *, kill_after_bytes: int | None = None) -> None:
    """Write `samples` to the tar `path` (temporary name, fsync, rename); keys are `{prefix}-{i:06d}`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        handle = _KillAfter(raw, kill_after_bytes) if kill_after_bytes is not None else raw
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, (ids, types) in enumerate(samples):
                key = f"{prefix}-{i:06d}"
                for member, array in zip(MEMBERS, (ids.astype(np.int32), types.astype(np.uint8))):
                    data = npy_bytes(array)
                    tar.addfile(_member(f"{key}.{member}", len(data)), io.BytesIO(data))


def shard_manifest(shard_dir: Path) -> Manifest:
    """The manifest of a finished shard stage; anything else is a ConfigError naming the folder."""
    manifest = Manifest.load(Path(shard_dir))
    if "splits" not in manifest.extra or "tokenizer_dir" not in manifest.extra:
        raise ConfigError(f"{shard_dir}: not the output of a `shard` stage (stage {manifest.stage!r})")
    return manifest


def load_tokenizer(shard_dir: Path):
    """The tokenizer the shards were made with, checked against the manifest's hash."""
    manifest = shard_manifest(shard_dir)
    tok_dir = Path(shard_dir) / manifest.extra["tokenizer_dir"]
    if not tok_dir.is_dir() or tokenizer_sha256(tok_dir) != manifest.extra["tokenizer_sha256"]:
        raise ManifestError(f"{tok_dir}: tokenizer missing or altered since the shards were written; rerun shard")
    return load_tokenizer_from(tok_dir, "shard tokenizer")


def shard_paths(shard_dir: Path, split: str = "train") -> list[Path]:
    """Paths of a split's shards, in manifest order."""
    splits = shard_manifest(shard_dir).extra["splits"]
    if split not in splits:
        raise ConfigError(f"{shard_dir}: no split {split!r} (has {', '.join(splits)})")
    return [Path(shard_dir) / name for name in splits[split]["shards"]]


_NPY_HEADERS: dict[bytes, tuple[np.dtype, int]] = {}
"""Parsed .npy headers by their bytes: every sample of a given length shares one, so each is parsed once."""
_END = b"\0" * 512


def _npy(data: memoryview, member: str, dtype) -> np.ndarray:
    """A 1-D array from .npy bytes, without pickle; the header must say exactly `dtype`, C order."""
    if bytes(data[:6]) != b"\x93NUMPY":
        raise ValueError(f"{member}: not a .npy array")
    size_bytes = 2 if data[6] == 1 else 4
    header_end = 8 + size_bytes + int.from_bytes(data[8:8 + size_bytes], "little")
    header = bytes(data[8 + size_bytes:header_end])
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        fields = ast.literal_eval(header.decode("latin1"))  # a dict literal; never unpickled
        shape = fields["shape"]
        if np.dtype(fields["descr"]) != np.dtype(dtype) or fields["fortran_order"] or len(shape) != 1:
            raise ValueError(f"{member}: {fields['descr']} with shape {shape}, expected 1-D {np.dtype(dtype)}")
        parsed = _NPY_HEADERS.setdefault(header, (np.dtype(dtype), shape[0]))
    kind, count = parsed
    if len(data) - header_end != count * kind.itemsize:
        raise ValueError(f"{member}: {len(data) - header_end} data bytes for {count} items")
    return np.frombuffer(data, dtype=kind, count=count, offset=header_end).copy()


def _members(data: bytes) -> Iterator[tuple[str, memoryview]]:
    """(name, bytes) of each regular file of a ustar archive, checking header checksums and truncation."""
    view, pos = memoryview(data), 0
    while pos + 512 <= len(data):
        header = data[pos:pos + 512]
        if header == _END:
            return
        checksum = int(header[148:156].strip(b"\0 ") or b"-1", 8)
        if checksum != sum(header) - sum(header[148:156]) + 8 * 32:
            raise ValueError(f"bad tar header checksum at byte {pos}")
        if header[156:157] not in (b"0", b"\0"):
            raise ValueError(f"unexpected tar member type {header[156:157]!r} at byte {pos}")
        name = header[:100].split(b"\0", 1)[0].decode()
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        body = pos + 512
        if body + size > len(data):
            raise ValueError(f"{name} is truncated")
        yield name, view[body:body + size]
        pos = body + (size + 511) // 512 * 512
    raise ValueError("archive ends without its end-of-archive block (truncated)")


def read_shard(path: Path) -> Iterator[Sample]:
    """The samples of one tar shard in file order; a corrupt or truncated shard is a ManifestError naming it."""
    path = Path(path)
    try:
        pending: dict[str, memoryview] = {}
        current = None
        for name, body in _members(path.read_bytes()):
            key, _, member = name.partition(".")
            if member not in MEMBERS:
                raise ValueError(f"unexpected member {name!r}")
            if current is not None and key != current:
                yield _sample(current, pending)
                pending = {}
            current = key
            pending[member] = body
        if current is not None:
            yield _sample(current, pending)
    except (ValueError, OSError, KeyError, SyntaxError, TypeError) as err:
        raise ManifestError(f"{path}: corrupt shard ({err}); rerun the shard stage with --force") from None


def _sample(key: str, members: dict[str, memoryview]) -> Sample:
    ids = _npy(members[MEMBERS[0]], MEMBERS[0], np.int32)
    types = _npy(members[MEMBERS[1]], MEMBERS[1], np.uint8)
    if len(ids) != len(types):
        raise ValueError(f"{key}: input_ids and token_type_ids differ in length")
    return Sample(key, ids, types)


def epoch_windows(counts: list[int], *, seed: int, epoch: int, shuffle: bool, buffer: int) -> list[list[int]]:
    """The shuffle windows of (seed, epoch): consecutive shards of a seeded shard permutation, grouped until a
    window holds at least `buffer` samples (one shard per window, in manifest order, without shuffling).

    A function of the manifest's sample counts alone, never of the world size: windows are the unit that
    readers own, and the unit a resumable state counts in.
    """
    if not shuffle:
        return [[s] for s in range(len(counts))]
    windows, current, held = [], [], 0
    for s in np.random.default_rng([seed, epoch, 0]).permutation(len(counts)):
        current.append(int(s))
        held += counts[s]
        if held >= buffer:
            windows.append(current)
            current, held = [], 0
    return windows + ([current] if current else [])


def window_order(size: int, *, seed: int, epoch: int, window: int, shuffle: bool) -> np.ndarray:
    """The order in which a window's samples (its shards' samples, one shard after another) are read."""
    if not shuffle:
        return np.arange(size)
    return np.random.default_rng([seed, epoch, 1, window]).permutation(size)


class EpochPlan:
    """Where every sample of one epoch sits: the windows' samples cut into `partitions` equal ranges, and the
    global order that interleaves the partitions round-robin.

    The epoch's samples, window after window (each window in its (seed, epoch, window) order), are cut into
    P contiguous ranges of equal length (the first N % P one longer); global position g is sample g // P of
    partition g % P (the last, short round takes partitions 0, 1, ...). A partition spans whole windows except
    at its two ends, so readers of different partitions share at most the P - 1 boundary windows. Everything
    is a function of the manifest's counts, the seed, the epoch and P: never of the world size.
    """

    def __init__(self, counts: list[int], *, seed: int, epoch: int, shuffle: bool, buffer: int, partitions: int):
        self.seed, self.epoch, self.shuffle, self.counts = seed, epoch, shuffle, counts
        self.windows = epoch_windows(counts, seed=seed, epoch=epoch, shuffle=shuffle, buffer=buffer)
        self.sizes = [sum(counts[s] for s in shards) for shards in self.windows]
        self.window_starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.total = int(self.window_starts[-1])
        self.partitions = partitions if shuffle else 1  # unshuffled: plain file order (small splits, evaluation)
        self.per, self.longer = divmod(self.total, self.partitions)

    def partition_start(self, p: int) -> int:
        """Position, in the window-after-window sequence, of partition p's first sample."""
        return p * self.per + min(p, self.longer)

    def place(self, g: int) -> tuple[int, int]:
        """(partition, index in it) of global position g."""
        full = self.per * self.partitions
        return (g % self.partitions, g // self.partitions) if g < full else (g - full, self.per)

    def locate(self, partition: int, k: int) -> tuple[int, int]:
        """(window, position in the window's order) of the k-th sample of a partition."""
        at = self.partition_start(partition) + k
        window = int(np.searchsorted(self.window_starts, at, side="right")) - 1
        return window, at - int(self.window_starts[window])


class CorpusReader(IterableDataset):
    """Samples of one split in a global order fixed by (seed, epoch, partitions), this rank's share, resumable.

    Each epoch the shards' seeded permutation is cut into shuffle windows, their samples into `partitions`
    equal contiguous ranges, and the global order interleaves the partitions round-robin (`EpochPlan`).
    Rank r of w takes global positions r, r + w, ... of that order, so when w divides P it only ever opens
    the shards of partitions p = r (mod w): ranks read disjoint whole shards, but for the P - 1 windows at
    partition boundaries, which two readers share. The order itself does not depend on w, so the
    state is one global offset: a state saved on 2 ranks resumes on 1 or 3 with nothing repeated or skipped,
    and a run on 1 process and on 2 sees the same samples (mosaicml-streaming's canonical nodes, kept here
    because its resumable sampling needs its own MDS shards and ours stay plain webdataset tars).
    """

    def __init__(self, shard_dir: Path, split: str = "train", *, seed: int = 0, shuffle: bool = True,
                 shuffle_buffer: int = 1024, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 loop: bool = False, verify: bool = True, partitions: int = 48):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if shuffle_buffer < 1 or partitions < 1:
            raise ValueError(f"shuffle_buffer and partitions must be >= 1, got {shuffle_buffer}, {partitions}")
        self.shard_dir, self.split = Path(shard_dir), split
        self.paths = shard_paths(self.shard_dir, split)
        outputs = {o.path: o for o in shard_manifest(self.shard_dir).outputs}
        self.counts = [outputs[p.name].items["samples"] for p in self.paths]
        self.hashes = [outputs[p.name].sha256 for p in self.paths]
        self.seed, self.shuffle, self.shuffle_buffer, self.partitions = seed, shuffle, shuffle_buffer, partitions
        self.rank, self.world_size, self.loop, self.verify = rank, world_size, loop, verify
        self.epoch, self.offset = epoch, 0
        self._plans: dict[int, EpochPlan] = {}
        self._verified: set[int] = set()

    @property
    def num_samples(self) -> int:
        """Samples in one epoch of the split (all ranks together)."""
        return sum(self.counts)

    def plan(self, epoch: int) -> EpochPlan:
        """The EpochPlan of one epoch (the last two are kept)."""
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = EpochPlan(self.counts, seed=self.seed, epoch=epoch, shuffle=self.shuffle,
                                           buffer=self.shuffle_buffer, partitions=self.partitions)
        return self._plans[epoch]

    def state_dict(self) -> dict:
        """Where the stream stands: epoch, global samples consumed in it, seed; independent of world size."""
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state (possibly saved at another world size)."""
        if state["seed"] != self.seed:
            raise ConfigError(f"reader state has seed {state['seed']}, this reader {self.seed}: resume with the same seed")
        if not 0 <= state["offset"] <= self.num_samples:
            raise ConfigError(f"reader state offset {state['offset']} is outside this split's {self.num_samples} samples")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def advance(self, epoch: int, position: int) -> None:
        """Record that this rank took global `position` of `epoch`: every rank has then taken its sample of
        that round, so the global offset is the round's end."""
        self.epoch, self.offset = epoch, min(position - self.rank + self.world_size, self.num_samples)

    def _load(self, s: int) -> list[Sample]:
        path = self.paths[s]
        if self.verify and s not in self._verified:
            if not path.is_file() or sha256_file(path) != self.hashes[s]:
                raise ManifestError(f"{path}: missing or does not match its sha256 in the manifest; rerun shard")
            self._verified.add(s)
        samples = list(read_shard(path))
        if len(samples) != self.counts[s]:
            raise ManifestError(f"{path}: {len(samples)} samples, the manifest says {self.counts[s]}")
        return samples

    def stream(self, owns=None) -> Iterator[tuple[int, int, Sample | None]]:
        """(epoch, global position, sample) of this rank from the saved state on; the state is not changed.

        `owns(partition) -> bool` picks the partitions whose samples are read (others come as None, so a
        DataLoader worker can skip its siblings' shards yet still count positions).
        """
        if self.loop and self.rank >= self.num_samples:
            raise ConfigError(f"{self.shard_dir}: the {self.split} split has {self.num_samples} samples, fewer than "
                              f"the {self.world_size} ranks reading it; use fewer ranks or a larger corpus")
        epoch, start = self.epoch, self.offset
        while True:
            if start >= self.num_samples:
                epoch, start = epoch + 1, 0
                if not self.loop:
                    return
                continue
            plan = self.plan(epoch)
            held: dict[int, tuple[list[Sample], np.ndarray]] = {}  # window -> (samples, order)
            current: dict[int, int] = {}  # partition -> the window it is in
            for position in range(start + self.rank, self.num_samples, self.world_size):
                partition, k = plan.place(position)
                if owns is not None and not owns(partition):
                    yield epoch, position, None
                    continue
                window, at = plan.locate(partition, k)
                if current.get(partition) != window:
                    left = current.get(partition)
                    current[partition] = window
                    if left is not None and left not in current.values():
                        del held[left]  # a window at a time per partition: memory is P windows at most
                    if window not in held:
                        samples = [x for s in plan.windows[window] for x in self._load(s)]
                        held[window] = (samples, window_order(plan.sizes[window], seed=self.seed, epoch=epoch,
                                                              window=window, shuffle=self.shuffle))
                samples, order = held[window]
                yield epoch, position, samples[order[at]]
            epoch, start = epoch + 1, 0
            if not self.loop:
                return

    def __iter__(self) -> Iterator[Sample]:
        """One epoch from the saved position (or forever with loop=True); the state advances as samples are taken.

        In DataLoader workers (one sample at a time, `batch_size=None`) worker i of n takes this rank's
        samples i, i + n, ..., so the DataLoader's round-robin gives the rank's order unchanged;
        `formats.loader.TrainLoader` splits by partition instead, so its workers read disjoint shards.
        """
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        for i, (epoch, position, sample) in enumerate(self.stream()):
            if i % workers == worker:
                self.advance(epoch, position)
                yield sample
        self.epoch, self.offset = self.epoch + 1, 0  # the epoch ran out (loop=False)


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of samples to the longest: input_ids, token_type_ids and attention_mask, all int64."""
    length = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((len(samples), length), dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.from_numpy(sample.input_ids.astype(np.int64))
        token_type_ids[row, :n] = torch.from_numpy(sample.token_type_ids.astype(np.int64))
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
