"""Teacher-cache shards: one file per corpus shard holding, per masked position, the teacher's top-k.

A shard file is
    MAGIC | uint64 header length | header JSON | zstd(body)
The header (uncompressed, so counts and keys read cheaply) lists the sample keys in corpus order, the
number of masked positions per sample and the body's columns. The body is columnar: each column is the
concatenation over samples, stored byte-plane-shuffled (all first bytes, then all second bytes, ...) because
fp16 log-probabilities and uint16 ids compress far better that way. Bytes are a pure function of the
records, so equal inputs give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import zstandard

from pipeline.manifest import ManifestError, atomic_path

MAGIC = b"DISTILL-CACHE-1\n"
FORMAT_VERSION = 1
SUFFIX = ".cache"
"""Cache shard file suffix: `<teacher_id>/<corpus shard stem>.cache`."""


@dataclass(frozen=True)
class CacheRecord:
    """The teacher's outputs for one sample, at its masked positions only."""

    key: str
    positions: np.ndarray
    """int64 masked positions, ascending (the same as the student's masks)."""
    topk_ids: np.ndarray
    """[n_masked, k] token ids, the smallest unsigned type that holds the vocab."""
    topk_logp: np.ndarray
    """[n_masked, k] float16 log-probabilities, sorted descending along k."""
    tail_logmass: np.ndarray
    """[n_masked] float32: log of the probability mass outside the top-k."""
    sampled_ids: np.ndarray | None = None
    """[n_masked, s] distinct ids drawn from the teacher distribution, padded with id 0 and count 0."""
    sampled_counts: np.ndarray | None = None
    """[n_masked, s] how many of the s draws gave each id (rows sum to s)."""
    cls_hidden: np.ndarray | None = None
    """[layers + 1, hidden] float16 teacher [CLS] states (embeddings first), optional."""
    tail_logmass_t: np.ndarray | None = None
    """[n_masked, len(tail temperatures besides 1)] float32: log sum over ids outside the top-k of p^(1/T),
    one column per temperature in the provenance's `tail_temperatures` after 1.0 (`tail_column`)."""


def ids_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds ids below `vocab_size`."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _shuffle(array: np.ndarray) -> bytes:
    flat = np.ascontiguousarray(array).reshape(-1)
    return flat.view(np.uint8).reshape(-1, flat.dtype.itemsize).T.tobytes()


def _unshuffle(data, dtype: np.dtype, count: int) -> np.ndarray:
    """`_shuffle` undone: plane i holds byte i (little-endian) of every element; the planes are added up as
    unsigned integers, which is many times faster than a transposed byte copy."""
    planes = np.frombuffer(data, dtype=np.uint8).reshape(dtype.itemsize, count)
    if dtype.itemsize == 1:
        return planes[0].copy().view(dtype)
    unsigned = np.dtype(f"<u{dtype.itemsize}")
    out = planes[0].astype(unsigned)
    for i in range(1, dtype.itemsize):
        out |= planes[i].astype(unsigned) << unsigned.type(8 * i)
    return out.view(dtype)


def _columns(records: list[CacheRecord], vocab_size: int, max_seq_len: int) -> dict[str, np.ndarray]:
    """Concatenate the records' arrays column by column, in storage dtypes."""
    ids = ids_dtype(vocab_size)
    cols = {
        "positions": np.concatenate([r.positions for r in records]).astype(ids_dtype(max_seq_len)),
        "topk_ids": np.concatenate([r.topk_ids for r in records]).astype(ids),
        "topk_logp": np.concatenate([r.topk_logp for r in records]).astype(np.float16),
        "tail_logmass": np.concatenate([r.tail_logmass for r in records]).astype(np.float32),
    }
    if records[0].tail_logmass_t is not None:
        cols["tail_logmass_t"] = np.concatenate([r.tail_logmass_t for r in records]).astype(np.float32)
    if records[0].sampled_ids is not None:
        draws = records[0].sampled_ids.shape[1]
        cols["sampled_ids"] = np.concatenate([r.sampled_ids for r in records]).astype(ids)
        cols["sampled_counts"] = np.concatenate([r.sampled_counts for r in records]).astype(ids_dtype(draws + 1))
    if records[0].cls_hidden is not None:
        cols["cls_hidden"] = np.stack([r.cls_hidden for r in records]).astype(np.float16)
    return cols


def encode_shard(records: list[CacheRecord], *, vocab_size: int, max_seq_len: int, level: int = 3,
                 stats: dict | None = None) -> bytes:
    """The bytes of a cache shard holding `records` (in corpus order); `stats` (ints) go into the header."""
    if not records:
        raise ValueError("a cache shard needs at least one record")
    cols = _columns(records, vocab_size, max_seq_len)
    header = {
        "format": FORMAT_VERSION,
        "keys": [r.key for r in records],
        "n_masked": [int(r.positions.size) for r in records],
        "columns": [[name, a.dtype.str, list(a.shape[1:]), int(a.size)] for name, a in cols.items()],
        "stats": stats or {},
    }
    body = b"".join(_shuffle(a) for a in cols.values())
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    packed = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(body)
    return MAGIC + struct.pack("<Q", len(head)) + head + packed


def write_cache_shard(path: Path, records: list[CacheRecord], **encode_kwargs) -> int:
    """Write a cache shard atomically (temporary name, fsync, rename); return its size in bytes."""
    data = encode_shard(records, **encode_kwargs)
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)
    return len(data)


def _split_header(data: bytes, path: Path) -> tuple[dict, int]:
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
        raise ManifestError(f"{path}: not a teacher-cache shard (bad magic); rerun the cache stage with --force")
    (length,) = struct.unpack_from("<Q", data, len(MAGIC))
    start = len(MAGIC) + 8
    try:
        header = json.loads(data[start:start + length])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ManifestError(f"{path}: corrupt cache-shard header; rerun the cache stage with --force") from None
    if header.get("format") != FORMAT_VERSION:
        raise ManifestError(f"{path}: cache format {header.get('format')} is not {FORMAT_VERSION}; rebuild the cache")
    return header, start + length


def read_header(path: Path) -> dict:
    """The header of a cache shard: keys, n_masked per key, columns, stats."""
    path = Path(path)
    with open(path, "rb") as handle:
        prefix = handle.read(len(MAGIC) + 8)
        if not prefix.startswith(MAGIC) or len(prefix) < len(MAGIC) + 8:
            raise ManifestError(f"{path}: not a teacher-cache shard (bad magic); rerun the cache stage with --force")
        (length,) = struct.unpack_from("<Q", prefix, len(MAGIC))
        data = prefix + handle.read(length)
    return _split_header(data, path)[0]


def decode_shard(data: bytes, path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Header and columns (storage dtypes, shaped [rows, ...]) of a shard's bytes."""
    header, start = _split_header(data, path)
    try:
        body = zstandard.ZstdDecompressor().decompress(data[start:])
    except zstandard.ZstdError as err:
        raise ManifestError(f"{path}: corrupt cache-shard body ({err}); rerun the cache stage with --force") from None
    cols, offset, body = {}, 0, memoryview(body)
    for name, dtype_str, tail, size in header["columns"]:
        dtype = np.dtype(dtype_str)
        nbytes = size * dtype.itemsize
        if offset + nbytes > len(body):
            raise ManifestError(f"{path}: cache-shard body is shorter than its header says (truncated)")
        cols[name] = _unshuffle(body[offset:offset + nbytes], dtype, size).reshape(-1, *tail)
        offset += nbytes
    if offset != len(body):
        raise ManifestError(f"{path}: cache-shard body is longer than its header says (altered)")
    return header, cols


def read_cache_shard(path: Path) -> Iterator[CacheRecord]:
    """The records of a cache shard, in corpus order; positions come back as int64."""
    path = Path(path)
    header, cols = decode_shard(path.read_bytes(), path)
    bounds = np.concatenate([[0], np.cumsum(header["n_masked"], dtype=np.int64)])
    for i, key in enumerate(header["keys"]):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        yield CacheRecord(
            key=key,
            positions=cols["positions"][lo:hi].astype(np.int64),
            topk_ids=cols["topk_ids"][lo:hi],
            topk_logp=cols["topk_logp"][lo:hi],
            tail_logmass=cols["tail_logmass"][lo:hi],
            sampled_ids=cols["sampled_ids"][lo:hi] if "sampled_ids" in cols else None,
            sampled_counts=cols["sampled_counts"][lo:hi] if "sampled_counts" in cols else None,
            cls_hidden=cols["cls_hidden"][i] if "cls_hidden" in cols else None,
            tail_logmass_t=cols["tail_logmass_t"][lo:hi] if "tail_logmass_t" in cols else None,
        )


def check_record(record: CacheRecord, path: Path, vocab_size: int) -> None:
    """Raise ManifestError unless the record's rows are sorted, finite and in range."""
    logp = record.topk_logp.astype(np.float32)
    where = f"{path}: sample {record.key!r}"
    tempered = record.tail_logmass_t if record.tail_logmass_t is not None else np.zeros(0, np.float32)
    if not (np.isfinite(logp).all() and np.isfinite(record.tail_logmass).all() and np.isfinite(tempered).all()):
        raise ManifestError(f"{where}: non-finite teacher log-probabilities; rebuild the cache")
    if logp.size and (np.diff(logp, axis=1) > 0).any():
        raise ManifestError(f"{where}: top-k rows are not sorted descending; rebuild the cache")
    if (logp > 0).any() or (record.tail_logmass > 0).any():
        raise ManifestError(f"{where}: log-probabilities above 0; rebuild the cache")
    if record.positions.size and (np.diff(record.positions) <= 0).any():
        raise ManifestError(f"{where}: masked positions are not strictly ascending; rebuild the cache")
    if record.topk_ids.size and int(record.topk_ids.max()) >= vocab_size:
        raise ManifestError(f"{where}: token id beyond the vocab ({vocab_size}); rebuild the cache")
    if record.sampled_counts is not None:
        sums = record.sampled_counts.astype(np.int64).sum(axis=1)
        if sums.size and (sums != record.sampled_counts.shape[1]).any():
            raise ManifestError(f"{where}: sampled counts do not sum to the number of draws; rebuild the cache")


def _manifest_and_sha(where) -> tuple:
    """(Manifest, sha256 of its manifest.json) from a Manifest object or a stage directory."""
    import hashlib

    from pipeline.manifest import Manifest

    manifest = where if isinstance(where, Manifest) else Manifest.load(Path(where))
    # manifest.json is exactly Manifest.to_json(), so hashing the text equals hashing the file.
    return manifest, hashlib.sha256(manifest.to_json().encode()).hexdigest()


def check_provenance(cache_manifest, corpus_manifest, *, tokenizer_sha256: str | None = None,
                     teacher_id: str | None = None) -> None:
    """Refuse (ConfigError) a cache built from another corpus, tokenizer or teacher than the ones given.

    Both manifests may be Manifest objects or stage directories.
    """
    from pipeline.config import ConfigError

    cache, _ = _manifest_and_sha(cache_manifest)
    corpus, corpus_sha = _manifest_and_sha(corpus_manifest)
    prov = cache.extra.get("provenance")
    if cache.stage != "cache" or not isinstance(prov, dict):
        raise ConfigError(f"cache {cache.name!r}: not a teacher-cache manifest (stage {cache.stage!r}); point at a cache stage")
    # The tokenizer first: a corpus re-sharded with another tokenizer also has another manifest hash, and
    # "another tokenizer" is the more useful of the two messages.
    corpus_tok = corpus.extra.get("tokenizer_sha256")
    for label, want in (("the corpus", corpus_tok), ("the given tokenizer", tokenizer_sha256)):
        if want is not None and prov.get("tokenizer_sha256") != want:
            raise ConfigError(f"cache {cache.name!r} used tokenizer {str(prov.get('tokenizer_sha256'))[:12]}, "
                              f"{label} has {want[:12]}; rebuild the cache with the same tokenizer")
    if prov.get("corpus_manifest_sha256") != corpus_sha:
        raise ConfigError(f"cache {cache.name!r} was built from another corpus than {corpus.name!r} "
                          "(corpus manifest hash differs); rebuild the cache on this corpus")
    if teacher_id is not None and prov.get("teacher_id") != teacher_id:
        raise ConfigError(f"cache {cache.name!r} holds teacher {prov.get('teacher_id')!r}, not {teacher_id!r}; "
                          "point at the cache of that teacher")


def _same(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-9)


def tail_column(cache_manifest, temperature: float) -> int | None:
    """The `tail_logmass_t` column holding the top-k tail at `temperature` (None at T=1: `tail_logmass`).

    ConfigError when the cache did not store that temperature. A cache written before `tail_temperatures`
    existed has no such key in its provenance: it holds the exact tail at T=1 only, so it is read at T=1
    and refused at any other temperature.
    """
    from pipeline.config import ConfigError

    prov = cache_manifest.extra["provenance"]
    stored = [float(t) for t in prov.get("tail_temperatures", [1.0])]
    if _same(temperature, 1.0):
        return None
    for column, t in enumerate(stored[1:]):
        if _same(temperature, t):
            return column
    old = "" if "tail_temperatures" in prov else " (it predates tail_temperatures)"
    raise ConfigError(f"temperature {temperature:g}: cache {cache_manifest.name!r} stores the top-k tail at "
                      f"temperatures {stored}{old}; add {temperature:g} to the cache's tail_temperatures and "
                      "rebuild it, or train at one of those")


def check_sample_temperature(cache_manifest, temperature: float) -> None:
    """ConfigError unless the cache's sampled ids were drawn at the training `temperature` (sampled soft CE
    is unbiased only then)."""
    from pipeline.config import ConfigError

    drawn = float(cache_manifest.extra["provenance"].get("sample_temperature", 1.0))
    if not _same(temperature, drawn):
        raise ConfigError(f"temperature {temperature:g}: cache {cache_manifest.name!r} drew its sampled ids at "
                          f"sample_temperature {drawn:g}; set temperature: {drawn:g}, or rebuild the cache with "
                          f"sample_temperature: {temperature:g}")


@dataclass(frozen=True)
class _Decoded:
    """A decoded cache shard as CacheLookup holds it."""

    packed: np.ndarray
    """The row-level columns side by side, uint8 [masked rows, bytes per row]: one copy gathers a shard's rows."""
    cols: dict[str, np.ndarray]
    """Each column: a view into `packed` (`cls_hidden`, one row per sample, is its own array)."""
    bounds: np.ndarray
    """int64 [samples + 1]: sample i's masked rows are bounds[i]:bounds[i + 1]."""
    row_of: dict[str, int]
    """Sample key -> its place in the shard (a shard's keys only: the lookup holds `capacity` shards)."""


class CacheLookup:
    """A split's teacher-cache records found from each sample's key, with a bounded set of decoded shards.

    A corpus key is `<corpus shard stem>-<index>` and a cache shard is `<teacher_id>/<stem>.cache`, so a
    record is found from its key alone: no dict of every key (that was ~94 B a sample), and a header is read
    only when its shard is first needed. Each shard is re-hashed against the manifest before it is trusted.
    """

    def __init__(self, cache_dir: Path, manifest, split: str, *, capacity: int):
        self.cache_dir, self.capacity = Path(cache_dir), max(1, int(capacity))
        self._shards = {Path(rel).name[: -len(SUFFIX)]: rel for rel in manifest.extra["splits"][split]["shards"]}
        self._hashes = {out.path: out.sha256 for out in manifest.outputs}
        self._loaded: dict[str, _Decoded] = {}
        self._verified: set[str] = set()
        self._layout: tuple | None = None
        self._body: np.ndarray | None = None

    def _decoded(self, key: str) -> _Decoded:
        """The decoded cache shard that should hold `key`; ManifestError when the cache has none."""
        stem = key.rpartition("-")[0]
        decoded = self._loaded.get(stem)
        if decoded is not None:
            return decoded
        rel = self._shards.get(stem)
        if rel is None:
            raise ManifestError(f"{self.cache_dir}: no cache record for sample {key!r} (cache and corpus differ)")
        path = self.cache_dir / rel
        data = self._checked_bytes(path, rel)
        if len(self._loaded) >= self.capacity:
            self._loaded.pop(next(iter(self._loaded)))  # oldest first: readers move through shards in order
        header, packed, cols = self._decode(data, path)
        bounds = np.concatenate([[0], np.cumsum(header["n_masked"], dtype=np.int64)])
        decoded = _Decoded(packed=packed, cols=cols, bounds=bounds,
                           row_of={k: i for i, k in enumerate(header["keys"])})
        self._loaded[stem] = decoded
        return decoded

    def _row(self, key: str) -> tuple[_Decoded, int]:
        decoded = self._decoded(key)
        row = decoded.row_of.get(key)
        if row is None:
            raise ManifestError(f"{self.cache_dir / self._shards[key.rpartition('-')[0]]}: no record for sample "
                                f"{key!r} (cache and corpus differ); rebuild the cache")
        return decoded, row

    def _decompressed(self, frame: memoryview) -> memoryview:
        """A shard body decompressed into one buffer reused shard after shard (nothing keeps a view of it): a fresh
        megabyte per shard costs more in page faults than zstd takes to fill it."""
        size = zstandard.frame_content_size(frame)
        if size < 0:  # not recorded in the frame (our writer always records it)
            return memoryview(zstandard.ZstdDecompressor().decompress(frame))
        if self._body is None or len(self._body) < size:
            self._body = np.empty(size, dtype=np.uint8)
        body, filled = memoryview(self._body)[:size], 0
        with zstandard.ZstdDecompressor().stream_reader(frame) as reader:
            while filled < size and (got := reader.readinto(body[filled:])):
                filled += got
            if filled != size or reader.read(1):  # the frame must end here (and its checksum is checked there)
                raise zstandard.ZstdError(f"frame holds other than the {size} bytes its header records")
        return body

    def _decode(self, data: bytes, path: Path) -> tuple[dict, np.ndarray, dict[str, np.ndarray]]:
        """`decode_shard`, each row-level column copied into packed rows as it is unshuffled (not gathered into
        columns and packed afterwards): header, packed rows, and the columns as views of them (plus `cls_hidden`)."""
        header, start = _split_header(data, path)
        try:
            body = self._decompressed(memoryview(data)[start:])
        except zstandard.ZstdError as err:
            raise ManifestError(f"{path}: corrupt cache-shard body ({err}); rerun the cache stage with --force") from None
        columns = [(name, np.dtype(dtype_str), tuple(int(t) for t in tail), int(size))
                   for name, dtype_str, tail, size in header["columns"]]
        layout = tuple((name, dtype.str, tail) for name, dtype, tail, _ in columns if name != "cls_hidden")
        if self._layout is None:
            self._layout = layout
        elif layout != self._layout:
            raise ManifestError(f"{path}: its columns differ from the split's other cache shards; rebuild the cache")
        widths = [int(np.prod(tail, dtype=np.int64)) for name, _, tail, _ in columns if name != "cls_hidden"]
        rows = {size // max(w, 1) for (name, _, _, size), w in zip((c for c in columns if c[0] != "cls_hidden"), widths)}
        if len(rows) > 1:
            raise ManifestError(f"{path}: its columns have different row counts (altered); rerun the cache stage with --force")
        packed = np.empty((rows.pop() if rows else 0, sum(w * d.itemsize for w, (_, d, _, _) in
                                                          zip(widths, (c for c in columns if c[0] != "cls_hidden")))), np.uint8)
        cols, offset, at = {}, 0, 0
        for name, dtype, tail, size in columns:
            nbytes = size * dtype.itemsize
            if offset + nbytes > len(body):
                raise ManifestError(f"{path}: cache-shard body is shorter than its header says (truncated)")
            if name == "cls_hidden":
                cols[name] = _unshuffle(body[offset:offset + nbytes], dtype, size).reshape(-1, *tail)
            else:
                width = dtype.itemsize * (size // max(len(packed), 1))
                column = _unshuffle(body[offset:offset + nbytes], dtype, size)  # contiguous: the fast shifts
                packed[:, at:at + width] = column.view(np.uint8).reshape(len(packed), width)
                at += width
            offset += nbytes
        if offset != len(body):
            raise ManifestError(f"{path}: cache-shard body is longer than its header says (altered)")
        return header, packed, {**self._unpack(packed), **cols}

    def _unpack(self, packed: np.ndarray) -> dict[str, np.ndarray]:
        """The columns of packed rows, as views."""
        out, offset = {}, 0
        for name, dtype_str, tail in self._layout or ():
            dtype = np.dtype(dtype_str)
            width = dtype.itemsize * int(np.prod(tail, dtype=np.int64))
            out[name] = packed[:, offset:offset + width].view(dtype).reshape(len(packed), *tail)
            offset += width
        return out

    def _checked_bytes(self, path: Path, rel: str) -> bytes:
        """A shard's bytes, re-hashed against the cache manifest the first time before they are trusted (a flipped
        byte may still decode); the bytes hashed are the bytes decoded, read once."""
        try:
            data = path.read_bytes()
        except OSError:
            data = None
        if rel not in self._verified:
            if data is None or hashlib.sha256(data).hexdigest() != self._hashes.get(rel):
                raise ManifestError(f"{path}: does not match its sha256 in the cache manifest (altered or corrupt); "
                                    "rerun the cache stage with --force")
            self._verified.add(rel)
        elif data is None:
            raise ManifestError(f"{path}: cache shard missing since it was verified; rerun the cache stage with --force")
        return data

    def record(self, key: str) -> CacheRecord:
        """The cache record of one sample key."""
        decoded, i = self._row(key)
        cols, lo, hi = decoded.cols, int(decoded.bounds[i]), int(decoded.bounds[i + 1])
        return CacheRecord(
            key=key, positions=cols["positions"][lo:hi].astype(np.int64), topk_ids=cols["topk_ids"][lo:hi],
            topk_logp=cols["topk_logp"][lo:hi], tail_logmass=cols["tail_logmass"][lo:hi],
            sampled_ids=cols["sampled_ids"][lo:hi] if "sampled_ids" in cols else None,
            sampled_counts=cols["sampled_counts"][lo:hi] if "sampled_counts" in cols else None,
            cls_hidden=cols["cls_hidden"][i] if "cls_hidden" in cols else None,
            tail_logmass_t=cols["tail_logmass_t"][lo:hi] if "tail_logmass_t" in cols else None)

    def gather(self, keys: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(masked rows per key, row-level columns of all keys concatenated in key order).

        Each key costs two dict look-ups (its shard, its row); the index arithmetic is then done once for the
        keys, and each cache shard they touch costs one copy of its packed rows.
        """
        stems = [key.rpartition("-")[0] for key in keys]
        slot = {stem: i for i, stem in enumerate(dict.fromkeys(stems))}  # shards numbered as first met
        first = dict(zip(reversed(stems), reversed(keys)))  # each shard's first key
        try:
            shards = [self._decoded(first[stem]) for stem in slot]
        except ManifestError:
            for key in keys:
                self._row(key)  # the error of the first key that has one, as a key at a time would find it
            raise
        slot_of = np.fromiter(map(slot.__getitem__, stems), dtype=np.int64, count=len(keys))
        rows = [shards[s].row_of.get(key) for s, key in zip(slot_of.tolist(), keys)]
        if None in rows:
            self._row(keys[rows.index(None)])  # the ManifestError naming the key
        rows = np.array(rows, dtype=np.int64)
        order = np.argsort(slot_of, kind="stable")
        per_slot = np.bincount(slot_of, minlength=len(shards))
        cuts = np.concatenate([[0], np.cumsum(per_slot)]).tolist()
        starts, n = np.empty(len(keys), np.int64), np.empty(len(keys), np.int64)
        for s, decoded in enumerate(shards):  # each key's first masked row and count, a shard at a time
            at, row = order[cuts[s]:cuts[s + 1]], rows[order[cuts[s]:cuts[s + 1]]]
            starts[at] = decoded.bounds[row]
            n[at] = decoded.bounds[row + 1] - starts[at]
        dest_start = np.cumsum(n) - n
        sizes = n[order]
        inner = np.arange(int(n.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        source = np.repeat(starts[order], sizes) + inner
        dest = np.repeat(dest_start[order], sizes) + inner
        row_cuts = np.concatenate([[0], np.cumsum(np.bincount(slot_of, weights=n, minlength=len(shards)).astype(np.int64))])
        width = shards[0].packed.shape[1] if shards else 0
        out = np.empty((int(n.sum()), width), dtype=np.uint8)
        # A packed row as one opaque item: numpy then copies whole rows (twice as fast as a [rows, bytes] gather).
        row = np.dtype((np.void, width)) if width else None
        for decoded, a, b in zip(shards, row_cuts[:-1].tolist(), row_cuts[1:].tolist()):
            if row is None:
                continue
            out.view(row).reshape(-1)[dest[a:b]] = decoded.packed.view(row).reshape(-1)[source[a:b]]
        return n, self._unpack(out)


def decoded_capacity(manifest, split: str, shuffle_buffer: int, windows: int = 1) -> int:
    """Decoded cache shards a reader keeps: as many as `windows` shuffle windows of typical (median) shards span.

    The median, not the smallest: one tiny last shard must not pin hundreds of decoded shards in memory.
    """
    shards = set(manifest.extra["splits"][split]["shards"])
    counts = sorted(int(o.items.get("samples", 0)) for o in manifest.outputs if o.path in shards)
    typical = max(counts[len(counts) // 2] if counts else 1, 1)
    return max(4, windows * (-(-int(shuffle_buffer) // typical) + 1) + 1)


class CachedCorpus:
    """Corpus samples joined by key with their masks and teacher-cache records, for a student to train on.

    Reads corpus samples through `formats.corpus.CorpusReader` (shuffling, ranks and resume are its job),
    re-creates each sample's mask from the cache manifest's `mask` block, and looks the record up by key
    (`CacheLookup`). A cache whose provenance does not match is refused before anything is read. The
    training loader (`formats.loader.TrainLoader`) does the same per batch in DataLoader workers.
    """

    def __init__(self, corpus_dir: Path, cache_dir: Path, split: str = "train", *,
                 tokenizer_sha256: str | None = None, teacher_id: str | None = None, **reader_kwargs):
        from formats import corpus
        from kd.masking import Masker, MaskSpec
        from pipeline.manifest import Manifest

        self.corpus_dir, self.cache_dir = Path(corpus_dir), Path(cache_dir)
        self.manifest = Manifest.load(self.cache_dir)
        check_provenance(self.manifest, self.corpus_dir, tokenizer_sha256=tokenizer_sha256, teacher_id=teacher_id)
        if split not in self.manifest.extra["splits"]:
            from pipeline.config import ConfigError

            raise ConfigError(f"cache {self.manifest.name!r} has no {split!r} split (has: {', '.join(self.manifest.extra['splits'])})")
        self.spec = MaskSpec.from_dict(self.manifest.extra["mask"], f"{self.cache_dir}")
        self.vocab_size = int(self.manifest.extra["provenance"]["teacher_vocab_size"])
        self.masker = Masker(self.spec, corpus.load_tokenizer(self.corpus_dir) if self.spec.whole_word else None)
        self.reader = corpus.CorpusReader(self.corpus_dir, split, **reader_kwargs)
        capacity = decoded_capacity(self.manifest, split, self.reader.shuffle_buffer,
                                    -(-self.reader.partitions // self.reader.world_size))
        self.lookup = CacheLookup(self.cache_dir, self.manifest, split, capacity=capacity)

    def record(self, key: str) -> CacheRecord:
        """The cache record of one sample key (ManifestError when the cache lacks it)."""
        return self.lookup.record(key)

    def __iter__(self) -> Iterator[tuple]:
        for sample in self.reader:
            masked = self.masker(sample)
            record = self.record(sample.key)
            if not np.array_equal(masked.positions, record.positions):
                raise ManifestError(f"{self.cache_dir}: sample {sample.key!r}: cached mask positions differ from "
                                    "the recomputed ones (mask settings or masking code changed); rebuild the cache")
            yield masked, record

    def state_dict(self) -> dict:
        """The corpus reader's resumable state (the cache is looked up by key, so it needs none)."""
        return self.reader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume where `state_dict` was taken."""
        self.reader.load_state_dict(state)
