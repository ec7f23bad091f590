"""Training checkpoints: `step-N/` folders holding the engine state plus our state, metadata written last.

Layout of `<stage_dir>/checkpoints/step-N/`:
  engine/             the engine's files (torch: safetensors + optimizer tensors; DeepSpeed: its ZeRO partitions)
  state-rank{r}.json  per rank: trainer state (reader cursor, epoch, step) and every RNG state
  tensors.safetensors optional, rank 0: tensors a stage keeps beside the engine (e.g. the best weights so far)
  meta.json           written last by rank 0 after a barrier, with a sha256 per file (checked on load): a
                      folder without it is incomplete and ignored

Everything is JSON, safetensors or weights-only tensors: nothing on a load path unpickles. The trainer state
must not depend on the world size (the reader's state_dict is global), so a run stopped on 2 ranks resumes on
1 when the engine state allows it: the torch engine and DeepSpeed ZeRO-0 keep unpartitioned state; ZeRO 1-3
partitions the optimizer per rank, so those resume only on the world size that saved them.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import log
from pipeline.config import ConfigError
from pipeline.manifest import ManifestError, atomic_write_text, sha256_file
from pipeline.train import dist
from pipeline.world import World

META = "meta.json"
_STEP = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU, and CUDA when present) RNG states as JSON-able data."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def generator_state(generator: torch.Generator) -> list[int]:
    """A torch.Generator's state as a list of bytes (for per-rank generators the trainer owns)."""
    return generator.get_state().tolist()


def set_generator_state(generator: torch.Generator, state: list[int]) -> None:
    """Restore what `generator_state` returned."""
    generator.set_state(torch.tensor(state, dtype=torch.uint8))


def steps(root: Path) -> list[tuple[int, Path, bool]]:
    """Every `step-N` folder under `root` as (N, path, complete), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path, (path / META).is_file()))
    return sorted(found)


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file in a checkpoint folder (meta.json aside), by relative path."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != META}


def verify_files(folder: Path, hashes: dict[str, str] | None) -> None:
    """ManifestError naming the first file of `folder` that is missing or differs from `hashes` (from meta.json).

    A flipped byte in a safetensors or optimizer file would otherwise load silently and train on garbage.
    """
    for rel, digest in (hashes or {}).items():
        path = folder / rel
        if not path.is_file() or sha256_file(path) != digest:
            raise ManifestError(f"{path}: checkpoint file missing or altered (sha256 differs from {META}); delete "
                                f"{folder} to resume from the previous checkpoint, or set resume: none")


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    complete = [path for _, path, done in steps(root) if done]
    return complete[-1] if complete else None


TENSORS = "tensors.safetensors"


def save(root: Path, step: int, engine, state: dict[str, Any], world: World, *, keep_last: int,
         meta: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `step-N/` with the engine state, this rank's state and RNG (and rank 0's `tensors`), then
    meta.json last; prune old ones.

    Every rank calls this (DeepSpeed writes one partition per rank).
    """
    folder = Path(root) / f"step-{step}"
    if world.rank == 0 and folder.exists():
        shutil.rmtree(folder)  # an incomplete attempt at this step from a killed run
    dist.barrier()
    folder.mkdir(parents=True, exist_ok=True)
    engine.save(folder / "engine")
    atomic_write_text(folder / f"state-rank{world.rank}.json", json.dumps({"state": state, "rng": rng_state()}))
    if tensors and world.rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / TENSORS))
    dist.barrier()
    if world.rank == 0:
        settings = engine.settings
        record = {"step": step, "world_size": world.world_size, "backend": settings.backend,
                  "zero_stage": settings.zero_stage, "files": file_hashes(folder), **(meta or {})}
        atomic_write_text(folder / META, json.dumps(record, indent=2, sort_keys=True) + "\n")
        prune(Path(root), keep_last)
    dist.barrier()
    log.info(f"checkpoint saved: {folder}")
    return folder


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and incomplete leftovers."""
    found = steps(root)
    complete = [n for n, _, done in found if done]
    keep = set(complete[-keep_last:]) if keep_last > 0 else set(complete)
    newest = complete[-1] if complete else -1
    for n, path, done in found:
        if n not in keep and (done or n < newest):
            shutil.rmtree(path, ignore_errors=True)


def check_compatible(folder: Path, engine, world: World) -> dict[str, Any]:
    """The checkpoint's metadata, or a ConfigError when this engine and world size cannot load it."""
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ManifestError(f"{folder / META}: unreadable checkpoint metadata ({err})") from None
    settings = engine.settings
    if meta["backend"] != settings.backend:
        raise ConfigError(f"{folder}: saved by engine {meta['backend']}, this run uses {settings.backend}; "
                          f"set engine: {meta['backend']} or resume: none")
    partitioned = settings.backend == "deepspeed" and (meta["zero_stage"] > 0 or settings.zero_stage > 0)
    if partitioned and (meta["zero_stage"] != settings.zero_stage or meta["world_size"] != world.world_size):
        raise ConfigError(
            f"{folder}: saved under ZeRO-{meta['zero_stage']} on {meta['world_size']} ranks; ZeRO 1-3 resume only on "
            f"the same stage and world size (this run: ZeRO-{settings.zero_stage}, {world.world_size} ranks)")
    return meta


def load(folder: Path, engine, world: World) -> dict[str, Any]:
    """Restore the engine and RNG from `folder`; return the trainer state saved there.

    On a different world size a rank without its own file takes rank 0's state: the reader cursor is global,
    and dropout streams cannot match across world sizes anyway.
    """
    meta = check_compatible(folder, engine, world)
    verify_files(folder, meta.get("files"))
    engine.load(folder / "engine")
    own = folder / f"state-rank{world.rank}.json"
    path = own if own.is_file() else folder / "state-rank0.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: unreadable checkpoint state ({err})") from None
    set_rng_state(saved["rng"])
    log.info(f"resumed from {folder}")
    return saved["state"]


def peek_state(found: Path | None) -> dict[str, Any] | None:
    """The trainer state of checkpoint `found` (rank 0's), read before an engine exists to load it into (which
    phase a multi-phase stage resumes in); None for no checkpoint."""
    if found is None:
        return None
    path = found / "state-rank0.json"
    try:
        return json.loads(path.read_text())["state"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise ManifestError(f"{path}: unreadable checkpoint state ({err}); delete {found} to resume from an earlier one") from None


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors `save` kept in `folder` (hashed with the rest), or {} when it kept none."""
    from safetensors.torch import load_file

    path = Path(folder) / TENSORS
    return load_file(str(path)) if path.is_file() else {}
