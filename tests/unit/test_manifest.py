"""Manifests: atomic writes, hashing, verification of tampered files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pipeline.manifest import Manifest, ManifestError, OutputFile, atomic_path


def make_manifest(tmp_path) -> Manifest:
    (tmp_path / "a.bin").write_bytes(b"hello")
    return Manifest(stage="numbers", name="numbers", config_hash="x", config={}, version="0", git_commit=None,
                    inputs=[], outputs=[OutputFile.of(tmp_path, "a.bin", samples=1)])


def test_roundtrip_and_verify(tmp_path):
    make_manifest(tmp_path).write(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded.outputs[0].sha256 == OutputFile.of(tmp_path, "a.bin").sha256
    loaded.verify(tmp_path)
    assert loaded.totals() == {"files": 1, "bytes": 5, "samples": 1}


def test_verify_names_tampered_and_missing_file(tmp_path):
    make_manifest(tmp_path).write(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"jello")
    with pytest.raises(ManifestError, match=r"a\.bin: sha256 does not match"):
        Manifest.load(tmp_path).verify(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"hell")
    with pytest.raises(ManifestError, match=r"a\.bin: size 4 != 5"):
        Manifest.load(tmp_path).verify(tmp_path)
    (tmp_path / "a.bin").unlink()
    with pytest.raises(ManifestError, match=r"a\.bin: listed in the manifest but missing"):
        Manifest.load(tmp_path).verify(tmp_path)


def test_corrupt_manifest_is_named(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"manifest\.json: corrupt manifest"):
        Manifest.load(tmp_path)


def test_exception_inside_atomic_write_leaves_nothing(tmp_path):
    target = tmp_path / "manifest.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_killed_write_leaves_no_manifest(tmp_path):
    """SIGKILL in the middle of an atomic write: the final name never appears, only a temp file."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from pipeline.manifest import atomic_path
        with atomic_path(Path({str(tmp_path)!r}) / "manifest.json") as tmp:
            tmp.write_text('{{"stage": "half')
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -9
    assert not (tmp_path / "manifest.json").exists()
    assert all(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    with pytest.raises(ManifestError, match="no manifest"):
        Manifest.load(tmp_path)

