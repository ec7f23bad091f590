"""Augmented task data: what the `augment` stage writes and `task` reads.

A stage directory holds `part-NNNNN.jsonl` (one augmented example a line: id of the source row, texts,
label) and, when a teacher scored them, `logits-NNNNN.safetensors` (class logits [N, C], optionally [CLS]
states [L+1, N, H]) per chunk. The manifest's `extra.provenance` records what the logits depend on
(teacher weights, tokenizer, augmented text); a reader recomputes it and refuses a mismatch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from formats.models import weights_sha256
from pipeline.config import ConfigError
from pipeline.manifest import ManifestError, atomic_path, atomic_write_text, sha256_file


def part_name(chunk: int) -> str:
    """File name of chunk `chunk`'s examples."""
    return f"part-{chunk:05d}.jsonl"


def logits_name(chunk: int) -> str:
    """File name of chunk `chunk`'s cached teacher outputs."""
    return f"logits-{chunk:05d}.safetensors"


def write_part(stage_dir: Path, chunk: int, rows: list[dict]) -> None:
    """Write one chunk's examples (`{"id", "text", "label"}` each) atomically."""
    atomic_write_text(Path(stage_dir) / part_name(chunk), "\n".join(json.dumps(r) for r in rows) + "\n")


def read_part(path: Path) -> tuple[list[tuple[str, ...]], np.ndarray]:
    """Texts and labels of one augmented chunk file."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    labels = np.array([r["label"] for r in rows])
    return [tuple(r["text"]) for r in rows], labels


def read_examples(stage_dir: Path, manifest) -> tuple[list[tuple[str, ...]], np.ndarray]:
    """Every chunk's texts and labels, in chunk order."""
    texts, labels = [], []
    for c in range(manifest.extra["chunks"]):
        t, lab = read_part(Path(stage_dir) / part_name(c))
        texts, labels = texts + t, labels + [lab]
    return texts, np.concatenate(labels)


def write_logits(stage_dir: Path, chunk: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write one chunk's teacher outputs atomically."""
    from safetensors.torch import save_file

    with atomic_path(Path(stage_dir) / logits_name(chunk)) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def provenance(teacher_folder: Path, part_hashes: list[str]) -> dict[str, str]:
    """What the cached teacher outputs depend on: teacher weights, tokenizer and the augmented text."""
    tok = Path(teacher_folder) / "tokenizer.json"
    return {"teacher_sha256": weights_sha256(teacher_folder),
            "tokenizer_sha256": sha256_file(tok) if tok.is_file() else "",
            "data_sha256": hashlib.sha256("".join(part_hashes).encode()).hexdigest()}


def verify(manifest, stage_dir: Path) -> None:
    """Every chunk file parses, and cached logits cover exactly the rows of their chunk."""
    from safetensors import safe_open

    for c in range(manifest.extra.get("chunks", 0)):
        texts, _ = read_part(Path(stage_dir) / part_name(c))
        if manifest.extra.get("has_teacher_outputs"):
            path = Path(stage_dir) / logits_name(c)
            with safe_open(str(path), "pt") as handle:
                if handle.get_slice("logits").get_shape()[0] != len(texts):
                    raise ManifestError(f"{path}: row count differs from {part_name(c)}; rerun augment with --force")


def load_cache(stage_dir: Path, manifest, teacher_folder: Path):
    """All augmented texts, labels and cached teacher tensors, refusing a cache made by another teacher."""
    from safetensors.torch import load_file

    if not manifest.extra.get("has_teacher_outputs"):
        raise ConfigError(f"{stage_dir}: this augment output has no teacher outputs; set its `teacher`")
    want = provenance(teacher_folder, [o.sha256 for o in manifest.outputs if o.path.startswith("part-")])
    have = manifest.extra["provenance"]
    for key in ("teacher_sha256", "tokenizer_sha256", "data_sha256"):
        if have.get(key) != want[key]:
            raise ConfigError(f"{stage_dir}: cached teacher outputs were made with a different {key.split('_')[0]} "
                              f"({have.get(key, '?')[:12]} != {want[key][:12]}); rerun augment with this teacher")
    texts, labels = read_examples(stage_dir, manifest)
    tensors: dict[str, list] = {}
    for c in range(manifest.extra["chunks"]):
        for k, v in load_file(str(Path(stage_dir) / logits_name(c))).items():
            tensors.setdefault(k, []).append(v)
    cat = {k: torch.cat(v, dim=1 if k == "cls" else 0) for k, v in tensors.items()}
    return texts, labels, cat
