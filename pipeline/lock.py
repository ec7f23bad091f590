"""One writer per stage directory (or per worker of an array stage): an atomic lock file with a heartbeat.

The lock is `RUN_DIR/.locks/<stage>.lock` (`<stage>.worker-<k>.lock` for a worker of an array stage), a small
JSON file holding host, pid, process start time, start time, heartbeat and a random token. It lives beside
the stage directories, not inside them, so clearing a stage directory never drops another worker's lock.

We write our own rather than use flock: flock is not honoured across nodes on many shared filesystems (NFS,
Lustre in some mounts). Creation is a hard link of a fully written temporary file onto the lock name, which
is atomic on POSIX filesystems and NFS alike, and a reader never sees half a lock.

A lock whose holder is gone is taken over, with a log line: on the same host when its pid is dead (or now
belongs to another process), on another host when its heartbeat is older than `lease_s`. Take-over runs
under a second short-lived lock, so two processes that both find a stale lock cannot both win.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline import log
from pipeline.config import ConfigError
from pipeline.manifest import disk_full

LOCKS = ".locks"
"""Folder of the run directory that holds the lock files."""


class LockHeld(ConfigError):
    """Another live process holds the lock: the message names it (host, pid, since, last heartbeat)."""


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), to tell a live holder from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return start is None or _proc_start(pid) in (None, start)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


@dataclass
class Holder:
    """What a lock file says about its holder."""

    host: str
    pid: int
    pid_start: str | None
    started: str
    heartbeat: float
    token: str

    @classmethod
    def me(cls) -> "Holder":
        """This process, now."""
        return cls(host=socket.gethostname(), pid=os.getpid(), pid_start=_proc_start(os.getpid()),
                   started=_now(), heartbeat=time.time(), token=secrets.token_hex(8))

    def describe(self) -> str:
        """`host H pid P since T (heartbeat Ns ago)`."""
        return (f"host {self.host} pid {self.pid} since {self.started} "
                f"(heartbeat {max(0.0, time.time() - self.heartbeat):.0f} s ago)")

    def gone(self, lease_s: float) -> str | None:
        """Why the holder is gone (a reason to take the lock over), or None while it may still be running."""
        if self.host == socket.gethostname():
            return None if _pid_alive(self.pid, self.pid_start) else f"pid {self.pid} on {self.host} is not running"
        age = time.time() - self.heartbeat
        return f"heartbeat {age:.0f} s old, lease {lease_s:g} s" if age > lease_s else None


def _read(path: Path) -> Holder | None:
    """The holder recorded in `path`; None when there is no lock. An unreadable lock reads as long gone."""
    try:
        data = json.loads(path.read_text())
        return Holder(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):  # cut by a crash mid-write on a filesystem without atomic link
        return Holder(host="?", pid=-1, pid_start=None, started="?", heartbeat=0.0, token="")


def _link_new(path: Path, holder: Holder) -> bool:
    """Create `path` holding `holder` if nothing is there; True if we created it."""
    tmp = path.with_name(f".{path.name}.{holder.token}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(holder.__dict__, sort_keys=True))
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise disk_full(err, path) or err from None
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


class StageLock:
    """A held lock; `release()` (or leaving `stage_lock`) removes it. A thread refreshes its heartbeat."""

    def __init__(self, path: Path, holder: Holder, lease_s: float):
        self.path, self.holder, self.lease_s = path, holder, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lock {path.name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        # A quarter of the lease: three heartbeats may be missed (a stalled NFS write) before others take over.
        while not self._stop.wait(max(0.5, self.lease_s / 4)):
            current = _read(self.path)
            if current is None or current.token != self.holder.token:
                log.warn(f"{self.path}: lock lost to {current.describe() if current else 'nobody'}; "
                         "another process may now write this stage directory")
                return
            self.holder.heartbeat = time.time()
            tmp = self.path.with_name(f".{self.path.name}.{self.holder.token}.beat")
            with contextlib.suppress(OSError):  # a missed beat is retried; the lease allows for some
                tmp.write_text(json.dumps(self.holder.__dict__, sort_keys=True))
                os.replace(tmp, self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        self._thread.join()
        current = _read(self.path)
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)


def _take_over(path: Path, stale: Holder, reason: str, lease_s: float) -> bool:
    """Remove a stale lock, unless another process got there first; True if the lock name is free now."""
    guard = path.with_name(path.name + ".takeover")
    me = Holder.me()
    if not _link_new(guard, me):
        other = _read(guard)
        if other is None or other.gone(lease_s) is None:
            return False  # someone else is taking it over right now
        guard.unlink(missing_ok=True)  # a taker killed mid-take-over
        if not _link_new(guard, me):
            return False
    try:
        current = _read(path)
        if current is None or current.token != stale.token:
            return current is None  # released, or already taken over by someone else
        path.unlink(missing_ok=True)
        log.warn(f"{path}: took over the lock of {stale.describe()}: {reason}")
        return True
    finally:
        guard.unlink(missing_ok=True)


def acquire(path: Path, lease_s: float) -> StageLock:
    """Hold the lock at `path`; LockHeld naming the holder if a live process has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(20):  # each pass either wins, is refused, or removed a stale lock (then tries again)
        me = Holder.me()
        if _link_new(path, me):
            return StageLock(path, me, lease_s)
        holder = _read(path)
        if holder is None:
            continue
        reason = holder.gone(lease_s)
        if reason is None:
            raise LockHeld(f"{path.parent.parent}: stage lock {path.name} is held by {holder.describe()}; "
                           "wait for that run to end (or stop it) before starting another on this run directory")
        _take_over(path, holder, reason, lease_s)
        time.sleep(0.01)
    raise LockHeld(f"{path}: could not take the lock (others keep taking it); retry in a moment")


def clear_partial_writes(stage_dir: Path) -> int:
    """Remove the `.tmp-*` files and folders a killed holder left half-written in `stage_dir`; how many.

    Only the holder of the stage's whole lock may call this (not a worker of an array stage): a `.tmp-*`
    there then belongs to no live writer.
    """
    stale = sorted(Path(stage_dir).rglob(".tmp-*"), key=lambda p: len(p.parts), reverse=True)
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return len(stale)


def lock_path(run_dir: Path, name: str, launch: str, num_workers: int, worker: int) -> Path:
    """Where the lock of stage `name` (or of this worker of it, for an array stage) lives."""
    part = f".worker-{worker}" if launch == "array" and num_workers > 1 else ""
    return Path(run_dir) / LOCKS / f"{name}{part}.lock"


@contextlib.contextmanager
def stage_lock(run_dir: Path, name: str, launch: str, world, lease_s: float) -> Iterator[StageLock | None]:
    """Hold this process's lock on stage `name` for the block. Ranks other than 0 of a distributed stage take
    none: they write under the lock their rank 0 holds."""
    if launch != "array" and world.rank != 0:
        yield None
        return
    held = acquire(lock_path(run_dir, name, launch, world.num_workers, world.worker), lease_s)
    try:
        yield held
    finally:
        held.release()
