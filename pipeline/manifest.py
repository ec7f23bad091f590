"""Stage manifests: what a stage produced, written last, so a stage is done if and only if its manifest exists.

Files are written to a temporary name, fsynced and renamed into place; readers re-hash before they trust.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"


class ManifestError(Exception):
    """A manifest or a file it lists is missing, unreadable or does not match its recorded hash."""


FULL_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EFBIG: "file size limit reached"}
"""errno values that mean the disk (or a quota or `ulimit -f`) is full."""
_FULL_TEXT = ("no space left on device", "disk quota exceeded", "file too large", "database or disk is full",
              "file write failed")  # torch.save and sqlite wrap the OSError in their own errors


class DiskFull(OSError):
    """A write failed for want of room: names the path and the free space left."""

    def __init__(self, path: Path, reason: str):
        self.message = f"{path}: {reason} ({_free(Path(path))}); make room or use another --run-dir, then rerun " \
                       "the same command (finished work is kept)"
        super().__init__(errno.ENOSPC, self.message, str(path))

    def __str__(self) -> str:
        return self.message


def _free(path: Path) -> str:
    for where in (path, *path.parents):
        if where.exists():
            try:
                free = shutil.disk_usage(where).free
            except OSError:
                break
            return f"{free / 1e6:.1f} MB free on {where}"
    return "free space unknown"


def disk_full(err: BaseException, path: Path | None = None) -> DiskFull | None:
    """`err` as a DiskFull naming the file it names (else `path`), or None if it is not a full disk.

    Looks through the exception chain: torch.save, safetensors and sqlite raise their own error types.
    """
    seen = err
    while seen is not None:
        if isinstance(seen, DiskFull):
            return seen
        reason = FULL_ERRNOS.get(getattr(seen, "errno", None))
        if reason is None and any(text in str(seen).lower() for text in _FULL_TEXT):
            reason = "no space left on device"
        if reason is not None:
            where = getattr(seen, "filename", None) or path
            return DiskFull(Path(where) if where else Path.cwd(), reason)
        seen = seen.__cause__ or seen.__context__
    return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it to `path`, else delete it.

    A process killed half-way leaves only a `.tmp-*` file, never a file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        tmp_path.unlink(missing_ok=True)
        full = disk_full(err, path) if isinstance(err, OSError) and not isinstance(err, DiskFull) else None
        if full is not None:
            raise full from None
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes to `path` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to `path` through a temporary file and a rename."""
    atomic_write_bytes(path, text.encode())


@dataclass(kw_only=True)
class OutputFile:
    """One file a stage produced, relative to the stage directory."""

    path: str
    bytes: int
    sha256: str
    items: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, stage_dir: Path, rel: str | Path, **items: int) -> "OutputFile":
        """Hash and size a file that already sits under `stage_dir`."""
        full = Path(stage_dir) / rel
        return cls(path=str(Path(rel).as_posix()), bytes=full.stat().st_size, sha256=sha256_file(full), items=items)


@dataclass(kw_only=True)
class InputRef:
    """An upstream manifest this stage read: its reference as written in the config, its path and hash."""

    name: str
    ref: str
    path: str
    sha256: str


@dataclass(kw_only=True)
class Manifest:
    """What a stage produced and from what; `manifest.json` in the stage directory."""

    stage: str
    name: str
    config_hash: str
    config: dict[str, Any]
    version: str
    git_commit: str | None
    inputs: list[InputRef]
    outputs: list[OutputFile]
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    started: str = ""
    finished: str = ""
    digest: str = ""
    """sha256 of the manifest's own canonical JSON (this field left empty): a flipped byte that still parses
    (a metric, a count, a path) is caught on load, not trusted."""

    def totals(self) -> dict[str, int]:
        """Bytes and item counts summed over the outputs."""
        total = {"files": len(self.outputs), "bytes": sum(o.bytes for o in self.outputs)}
        for out in self.outputs:
            for key, count in out.items.items():
                total[key] = total.get(key, 0) + count
        return total

    def to_json(self) -> str:
        """Canonical JSON text of the manifest, with its digest."""
        from pipeline.secrets import scrub

        data = {**scrub(dataclasses.asdict(self)), "digest": ""}
        data["digest"] = _digest(data)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def write(self, stage_dir: Path) -> Path:
        """Write `manifest.json` atomically; call this last, after every output is in place."""
        path = Path(stage_dir) / MANIFEST
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, where: Path) -> "Manifest":
        """Read a manifest from a stage directory or a manifest.json path."""
        path = Path(where)
        if path.is_dir():
            path = path / MANIFEST
        if not path.is_file():
            raise ManifestError(f"{path}: no manifest (the stage has not finished there; run it first)")
        try:
            data = json.loads(path.read_text())
            if data.get("digest") and _digest({**data, "digest": ""}) != data["digest"]:
                raise ManifestError(f"{path}: corrupt manifest (its digest does not match its content: altered "
                                    "after it was written); rerun the stage with --force")
            data["inputs"] = [InputRef(**i) for i in data.get("inputs", [])]
            data["outputs"] = [OutputFile(**o) for o in data.get("outputs", [])]
            return cls(**data)
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError, AttributeError) as err:  # a flip, a cut
            raise ManifestError(f"{path}: corrupt manifest ({err}); rerun the stage with --force") from None

    def verify(self, stage_dir: Path) -> None:
        """Re-hash every listed file; raise ManifestError naming the first missing or altered one."""
        for out in self.outputs:
            full = Path(stage_dir) / out.path
            if not full.is_file():
                raise ManifestError(f"{full}: listed in the manifest but missing")
            if full.stat().st_size != out.bytes:
                raise ManifestError(f"{full}: size {full.stat().st_size} != {out.bytes} in the manifest (truncated or altered)")
            if sha256_file(full) != out.sha256:
                raise ManifestError(f"{full}: sha256 does not match the manifest (altered or corrupt)")


def _digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, indent=2, sort_keys=True).encode()).hexdigest()


def manifest_sha256(stage_dir: Path) -> str:
    """The hash of a stage's manifest.json, used to pin an input."""
    return sha256_file(Path(stage_dir) / MANIFEST)
