"""Raw documents for the `shard` stage: expand inputs, read every format, clean, dedup and split by hash.

Everything here is a pure function of the input list and the cleaning settings, so every worker that
calls `documents` sees the same documents in the same order, each tagged with its split.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.config import ConfigError

TEXT_SUFFIXES = (".txt", ".text", ".tsv", ".csv", "")
"""Suffixes read as plain text (after stripping .gz/.zst); anything unknown is read as text too."""
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
DATASET_SUFFIXES = (".parquet", ".arrow")
"""Files handed to Hugging Face `datasets` (its packaged builders read them offline)."""
SPLIT_BUCKETS = 1_000_000
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Document:
    """One cleaned document and the split its hash puts it in."""

    text: str
    split: str


def expand_inputs(patterns: Iterable[str]) -> list[Path]:
    """Files named by paths, globs and directories, in a fixed order (pattern order, then sorted).

    A directory saved by `datasets.Dataset.save_to_disk` stays one entry; other directories are walked.
    """
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ConfigError(f"inputs: {pattern}: no file matches this glob")
        for match in matches:
            path = Path(match)
            if not path.exists():
                raise ConfigError(f"inputs: {path}: file not found (fix the path in `inputs`)")
            if path.is_dir() and not _is_saved_dataset(path):
                files.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))
            else:
                files.append(path)
    seen: set[Path] = set()
    unique = [p for p in files if not (p.resolve() in seen or seen.add(p.resolve()))]
    if not unique:
        raise ConfigError(f"inputs: {list(patterns)} name no files")
    return unique


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "state.json").is_file()


def _open_text(path: Path) -> io.TextIOBase:
    """Open a text file, decompressing .gz and .zst by suffix; undecodable bytes are replaced, not fatal."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    if path.suffix == ".zst":
        import zstandard

        stream = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.TextIOWrapper(stream, encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _kind(path: Path) -> str:
    if path.is_dir():
        return "dataset"
    suffixes = [s for s in path.suffixes if s not in (".gz", ".zst")]
    last = suffixes[-1] if suffixes else ""
    if last in JSONL_SUFFIXES:
        return "jsonl"
    if last in DATASET_SUFFIXES:
        return "dataset"
    return "text"


def _lines_to_docs(lines: Iterable[str], separator: str | None) -> Iterator[str]:
    """One document per line, or lines joined until a line equal to `separator` ends a document."""
    if separator is None:
        for line in lines:
            yield line.rstrip("\n")
        return
    parts: list[str] = []
    for line in lines:
        line = line.rstrip("\n")
        if line.strip() == separator.strip():
            yield " ".join(parts)
            parts = []
        else:
            parts.append(line)
    if parts:
        yield " ".join(parts)


def _read_dataset(path: Path, text_field: str) -> Iterator[str]:
    import datasets

    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
        else:
            data = datasets.load_dataset(path.suffix.lstrip("."), data_files=[str(path)], split="train")
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the user needs one line
        raise ConfigError(f"inputs: {path}: not loadable with `datasets` ({type(err).__name__}: {err})") from None
    if isinstance(data, datasets.DatasetDict):
        data = data["train"] if "train" in data else next(iter(data.values()))
    if text_field not in data.column_names:
        raise ConfigError(f"inputs: {path}: no column {text_field!r} (has {data.column_names}); set text_field")
    for row in data.select_columns([text_field]):
        yield row[text_field] or ""


def read_raw(path: Path, *, text_field: str, separator: str | None) -> Iterator[str]:
    """Raw documents of one input file, in file order."""
    kind = _kind(path)
    if kind == "dataset":
        yield from _read_dataset(path, text_field)
        return
    try:
        with _open_text(path) as handle:
            if kind == "text":
                yield from _lines_to_docs(handle, separator)
                return
            yield from _json_docs(((f"{path}:{n}", line) for n, line in enumerate(handle, 1)), text_field)
    except (OSError, EOFError) as err:
        raise ConfigError(f"inputs: {path}: unreadable ({err})") from None


def _json_docs(lines: Iterable[tuple[str, str]], text_field: str) -> Iterator[str]:
    """The `text_field` of each JSONL line (blank lines skipped); `where` names the line in errors."""
    for where, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"inputs: {where}: not valid JSON (expected one object a line)") from None
        if not isinstance(record, dict) or text_field not in record:
            raise ConfigError(f"inputs: {where}: no field {text_field!r}; set text_field")
        yield str(record[text_field] or "")


def clean(text: str, normalize: str) -> str:
    """Unicode-normalise and collapse whitespace runs to one space."""
    if normalize != "none":
        text = unicodedata.normalize(normalize, text)
    return _SPACES.sub(" ", text).strip()


def doc_hash(text: str) -> bytes:
    """16-byte digest of a cleaned document: the key for dedup and for the validation split."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def split_of(digest: bytes, valid_fraction: float) -> str:
    """`valid` for a fixed `valid_fraction` of hash space, `train` otherwise; stable whatever else changes."""
    bucket = int.from_bytes(digest[:8], "big") % SPLIT_BUCKETS
    return "valid" if bucket < round(valid_fraction * SPLIT_BUCKETS) else "train"


@dataclass
class CleaningStats:
    """What cleaning dropped, for the manifest's metrics."""

    read: int = 0
    empty: int = 0
    too_long: int = 0
    duplicate: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"docs_read": self.read, "docs_empty": self.empty, "docs_too_long": self.too_long,
                "docs_duplicate": self.duplicate}


def documents(files: list[Path], *, text_field: str = "text", separator: str | None = None,
              normalize: str = "NFKC", max_doc_chars: int = 100_000, dedup: bool = True,
              valid_fraction: float = 0.0, stats: CleaningStats | None = None) -> Iterator[Document]:
    """Cleaned documents of all `files` in order; the first copy of a duplicate wins.

    Dedup keeps every digest seen (16 bytes plus set overhead a document); at billions of documents that
    set belongs in a sharded on-disk index instead.
    """
    stats = stats if stats is not None else CleaningStats()
    seen: set[bytes] = set()
    for path in files:
        for raw in read_raw(path, text_field=text_field, separator=separator):
            stats.read += 1
            text = clean(raw, normalize)
            if not text:
                stats.empty += 1
                continue
            if len(text) > max_doc_chars:
                stats.too_long += 1
                continue
            digest = doc_hash(text)
            if dedup:
                if digest in seen:
                    stats.duplicate += 1
                    continue
                seen.add(digest)
            yield Document(text, split_of(digest, valid_fraction))


@dataclass(frozen=True)
class Piece:
    """A unit of input one worker reads: a whole file, a byte range of a plain-text file, or parquet row groups.

    Pieces depend on the input files and `piece_bytes` only, never on the worker count.
    """

    index: int
    path: Path
    start: int = 0
    """First byte (text range) or row group (parquet)."""
    end: int | None = None
    """One past the last byte or row group; None: to the end (a whole file)."""


def plan_pieces(files: list[Path], piece_bytes: int, *, separator: str | None) -> list[Piece]:
    """Cut the inputs into pieces: uncompressed one-document-a-line text and JSONL by byte range (a line belongs
    to the range it starts in), parquet by row groups.

    Compressed files, `datasets` folders and text with a document separator stay whole (a range cannot start
    mid-stream or mid-document).
    """
    pieces: list[Piece] = []
    for path in files:
        kind, suffixes = _kind(path), [s for s in path.suffixes]
        size = path.stat().st_size if path.is_file() else 0
        compressed = bool(suffixes) and suffixes[-1] in (".gz", ".zst")
        if ((kind == "jsonl" or (kind == "text" and separator is None)) and not compressed
                and size > piece_bytes):
            for start in range(0, size, piece_bytes):
                pieces.append(Piece(len(pieces), path, start, min(start + piece_bytes, size)))
        elif path.is_file() and path.suffix == ".parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            per_piece, groups, acc, first = [], meta.num_row_groups, 0, 0
            for g in range(groups):
                acc += meta.row_group(g).total_byte_size
                if acc >= piece_bytes or g == groups - 1:
                    per_piece.append((first, g + 1))
                    first, acc = g + 1, 0
            pieces += [Piece(len(pieces) + i, path, a, b) for i, (a, b) in enumerate(per_piece or [(0, 0)])]
        else:
            pieces.append(Piece(len(pieces), path))
    return pieces


def _range_lines(path: Path, start: int, end: int) -> Iterator[str]:
    """Lines starting in [start, end) of a file, decoded as `open(path, encoding="utf-8", errors="replace")`
    would (universal newlines: \\n, \\r\\n and \\r all end a line), so ranges give the same documents as the file."""
    with open(path, "rb") as handle:
        handle.seek(max(start - 1, 0))
        if start > 0:
            handle.readline()  # the rest of the line that started before this range (or the "\n" just before it)
        while handle.tell() < end:
            raw = handle.readline()
            if not raw:
                return
            text = raw.decode("utf-8", errors="replace")
            if "\r" not in text:
                yield text
                continue
            parts = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
            yield from [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _parquet_rows(path: Path, text_field: str, first: int, last: int) -> Iterator[str]:
    """Texts of row groups [first, last) of a parquet file, streamed in batches (no Arrow cache copy)."""
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types; the user needs one line
        raise ConfigError(f"inputs: {path}: not readable as parquet ({type(err).__name__}: {err})") from None
    if text_field not in handle.schema_arrow.names:
        raise ConfigError(f"inputs: {path}: no column {text_field!r} (has {handle.schema_arrow.names}); set text_field")
    if last > first:
        for batch in handle.iter_batches(row_groups=list(range(first, last)), columns=[text_field], batch_size=4096):
            for value in batch.column(0).to_pylist():
                yield value or ""


def read_piece(piece: Piece, *, text_field: str, separator: str | None) -> Iterator[str]:
    """Raw documents of one piece, in file order; all pieces of a file in order give `read_raw`'s documents."""
    if piece.end is None:
        yield from read_raw(piece.path, text_field=text_field, separator=separator)
    elif piece.path.suffix == ".parquet":
        yield from _parquet_rows(piece.path, text_field, piece.start, piece.end)
    else:
        try:
            lines = _range_lines(piece.path, piece.start, piece.end)
            if _kind(piece.path) == "jsonl":
                where = f"{piece.path} (a line starting in bytes {piece.start}-{piece.end})"
                yield from _json_docs(((where, line) for line in lines), text_field)
                return
            for line in lines:
                yield line.rstrip("\n")
        except OSError as err:
            raise ConfigError(f"inputs: {piece.path}: unreadable ({err})") from None
