"""Corpus shards: what the `shard` stage writes and every later stage reads.

A shard is a webdataset tar of `.npy` members (fixed names, mtimes, owners and modes, so the same samples
always give the same bytes), written to a temporary name, fsynced and renamed. Reading gives a
deterministic, resumable sample stream.

Reading is split by whole shards: each epoch a seeded permutation of the shards is cut into shuffle
windows (consecutive shards holding at least `shuffle_buffer` samples), window i belongs to reader i % R of
the R = ranks x DataLoader workers readers, and a reader reads only its own shards, one window at a time,
in an order fixed by (seed, epoch, window). The resumable state counts samples taken per window, so it does
not depend on the world size (see CorpusReader).
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


Cursor = tuple[int, int, int, int]
"""(epoch, window, a, b): the samples at positions [a, b) of the window's order have been taken."""


def epoch_units(sizes: list[int], readers: int) -> list[tuple[int, int, int]]:
    """(window, start, end) pieces of work of one epoch: whole windows, dealt unit i to reader i % readers.

    Only when an epoch has fewer windows than readers (a corpus of a few shards) is each window cut into equal
    parts, so that every reader has work; those readers then share shards.
    """
    parts = 1 if len(sizes) >= readers else -(-readers // max(len(sizes), 1))
    units = []
    for window, size in enumerate(sizes):
        bounds = [size * k // parts for k in range(parts + 1)]
        units += [(window, a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    return units


def _add(intervals: list[list[int]], a: int, b: int) -> list[list[int]]:
    """Sorted disjoint intervals with [a, b) added (merged with any it touches)."""
    out, placed = [], False
    for lo, hi in intervals:
        if hi < a or lo > b:
            if lo > b and not placed:
                out.append([a, b])
                placed = True
            out.append([lo, hi])
        else:
            a, b = min(a, lo), max(b, hi)
    if not placed:
        out.append([a, b])
    return sorted(out)


def _missing(intervals: list[list[int]], a: int, b: int) -> list[tuple[int, int]]:
    """The parts of [a, b) that no interval covers, in order."""
    gaps, at = [], a
    for lo, hi in intervals:
        if hi <= at or lo >= b:
            continue
        if lo > at:
            gaps.append((at, lo))
        at = max(at, hi)
    return gaps + ([(at, b)] if at < b else [])


class CorpusReader(IterableDataset):
    """Samples of one split for (seed, epoch): this rank's (and DataLoader worker's) disjoint windows of shards.

    Reader q of R (R = world_size x DataLoader workers, q = rank + world_size x worker) owns every window
    whose index i has i % R == q, reads only those shards and shuffles within each window. The state lists,
    per window, which positions of its (seed, epoch, window)-fixed order were taken, as intervals; it does
    not mention the world size, so a state saved on 2 ranks resumes on 1 or 3: what was taken is skipped,
    the rest is dealt to the new readers, and nothing is repeated or skipped.

    Why our own code and not webdataset's split_by_node/split_by_worker with its shuffle: those deal shards
    the same way but keep no state, and a resumed run would see samples twice; mosaicml-streaming resumes
    elastically but only from its own MDS shards, and the corpus must stay plain webdataset tars.
    """

    def __init__(self, shard_dir: Path, split: str = "train", *, seed: int = 0, shuffle: bool = True,
                 shuffle_buffer: int = 1024, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 loop: bool = False, verify: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.shard_dir, self.split = Path(shard_dir), split
        self.paths = shard_paths(self.shard_dir, split)
        outputs = {o.path: o for o in shard_manifest(self.shard_dir).outputs}
        self.counts = [outputs[p.name].items["samples"] for p in self.paths]
        self.hashes = [outputs[p.name].sha256 for p in self.paths]
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.rank, self.world_size, self.loop, self.verify = rank, world_size, loop, verify
        self.epoch = epoch
        self.taken: dict[int, dict[int, list[list[int]]]] = {}
        """epoch -> window -> taken [a, b) intervals of its order, for started epochs from `epoch` on."""
        self._totals: dict[int, int] = {}
        self._windows: dict[int, list[list[int]]] = {}
        self._verified: set[int] = set()

    @property
    def num_samples(self) -> int:
        """Samples in one epoch of the split (all ranks together)."""
        return sum(self.counts)

    def windows(self, epoch: int) -> list[list[int]]:
        """The shuffle windows of one epoch (shard indices), cached."""
        if epoch not in self._windows:
            self._windows = {e: w for e, w in self._windows.items() if e >= epoch - 1}
            self._windows[epoch] = epoch_windows(self.counts, seed=self.seed, epoch=epoch, shuffle=self.shuffle,
                                                 buffer=self.shuffle_buffer)
        return self._windows[epoch]

    def window_sizes(self, epoch: int) -> list[int]:
        """Samples per window of one epoch."""
        return [sum(self.counts[s] for s in shards) for shards in self.windows(epoch)]

    # -- state -------------------------------------------------------------------------------------------------

    def advance(self, cursor: Cursor, *, prune: bool = True) -> None:
        """Record that positions [a, b) of a window were taken; with `prune`, finished epochs leave the state."""
        epoch, window, a, b = (int(c) for c in cursor)
        if epoch < self.epoch:
            return
        per_window = self.taken.setdefault(epoch, {})
        before = per_window.get(window, [])
        after = _add(before, a, b)
        per_window[window] = after
        self._totals[epoch] = self._totals.get(epoch, 0) + sum(h - l for l, h in after) - sum(h - l for l, h in before)
        while prune and self._totals.get(self.epoch, 0) >= self.num_samples:
            self.taken.pop(self.epoch, None)
            self._totals.pop(self.epoch)
            self.epoch += 1

    def state_dict(self) -> dict:
        """Where the stream stands: the first unfinished epoch and, per started epoch and window, the taken
        intervals. Independent of the world size, and a few numbers per window whatever the corpus size."""
        taken = {str(e): {str(w): [list(i) for i in t] for w, t in sorted(per.items())}
                 for e, per in sorted(self.taken.items())}
        return {"seed": self.seed, "epoch": self.epoch, "taken": taken}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state (possibly saved at another world size)."""
        if state.get("seed") != self.seed:
            raise ConfigError(f"reader state has seed {state.get('seed')}, this reader {self.seed}: "
                              "resume with the same seed")
        if "taken" not in state:
            raise ConfigError("reader state is from an older reader (no per-window intervals); start the stage afresh")
        taken = {int(e): {int(w): [[int(a), int(b)] for a, b in t] for w, t in per.items()}
                 for e, per in state["taken"].items()}
        for epoch, per_window in taken.items():
            sizes = self.window_sizes(epoch)
            for window, intervals in per_window.items():
                if not (0 <= window < len(sizes) and all(0 <= a < b <= sizes[window] for a, b in intervals)):
                    raise ConfigError(f"reader state: epoch {epoch} window {window} {intervals} does not fit this "
                                      "split's shards; resume on the same corpus")
        self.epoch, self.taken = int(state["epoch"]), taken
        self._totals = {e: sum(b - a for t in per.values() for a, b in t) for e, per in taken.items()}

    # -- reading -----------------------------------------------------------------------------------------------

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

    def stream(self, reader: int, readers: int) -> Iterator[tuple[Cursor, Sample]]:
        """(cursor, sample) of reader `reader` of `readers`, from the current state on; the state is not changed."""
        epoch, taken = self.epoch, {e: dict(t) for e, t in self.taken.items()}
        while True:
            sizes = self.window_sizes(epoch)
            mine = epoch_units(sizes, readers)[reader::readers]
            if not mine and self.loop:
                raise ConfigError(f"{self.shard_dir}: {self.split} has too few samples for {readers} readers "
                                  "(ranks x loader workers); use fewer loader workers or ranks")
            loaded: tuple[int, list[Sample], np.ndarray] | None = None
            for window, a, b in mine:
                for lo, hi in _missing(taken.get(epoch, {}).get(window, []), a, b):
                    if loaded is None or loaded[0] != window:
                        loaded = None  # one window at a time: memory is a window, whatever the corpus size
                        samples = [sample for s in self.windows(epoch)[window] for sample in self._load(s)]
                        order = window_order(sizes[window], seed=self.seed, epoch=epoch, window=window,
                                             shuffle=self.shuffle)
                        loaded = (window, samples, order)
                    for k in range(lo, hi):
                        yield (epoch, window, lo, k + 1), loaded[1][loaded[2][k]]
            epoch += 1
            if not self.loop:
                return

    def reader_index(self, worker: int = 0, workers: int = 1) -> tuple[int, int]:
        """(q, R) of this rank's DataLoader worker `worker` of `workers`."""
        return self.rank + self.world_size * worker, self.world_size * workers

    def __iter__(self) -> Iterator[Sample]:
        """This rank's samples from the saved position (forever with loop=True).

        Without DataLoader workers the state advances as samples are taken. Inside workers each process has
        its own copy: `formats.loader.TrainLoader` carries cursors back to the main process instead.
        """
        info = get_worker_info()
        q, readers = self.reader_index(*((info.id, info.num_workers) if info is not None else (0, 1)))
        for cursor, sample in self.stream(q, readers):
            self.advance(cursor)
            yield sample


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
