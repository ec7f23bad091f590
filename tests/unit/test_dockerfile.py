"""The Dockerfile cannot be built here (no engine): parse it and check what matters."""

from __future__ import annotations

import json
import re


def instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_non_root_entrypoint_and_copies(repo):
    ops = instructions((repo / "Dockerfile").read_text())
    users = [rest for op, rest in ops if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the final USER must be non-root"
    entry = [rest for op, rest in ops if op == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["distill"]
    assert any(op == "FROM" for op, _ in ops)
    copied = " ".join(rest for op, rest in ops if op == "COPY")
    import tomllib

    packages = [p.rstrip("*") for p in tomllib.loads((repo / "pyproject.toml").read_text())
                ["tool"]["setuptools"]["packages"]["find"]["include"]]
    assert "kd" in packages and "formats" in packages
    copied_dirs = {rest.split()[0].rstrip("/") for op, rest in ops if op == "COPY"}
    for package in [*packages, "configs"]:
        assert package in copied_dirs, f"{package} is not copied into the image (the installed package needs it)"
    assert "pyproject.toml" in copied
    torch_first = [i for i, (op, rest) in enumerate(ops) if op == "RUN" and "torch==" in rest]
    install = [i for i, (op, rest) in enumerate(ops) if op == "RUN" and "pip install ." in rest]
    assert torch_first and install and torch_first[0] < install[0], "torch must be installed before the package"
    # Every package directory the image copies must exist in the repo.
    for op, rest in ops:
        if op == "COPY":
            src = rest.split()[0]
            assert (repo / src).exists(), f"COPY {src}: not in the repo"
