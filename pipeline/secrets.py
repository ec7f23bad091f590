"""Keep credentials out of everything a run writes: config.yaml, manifests, logs, MLflow params and tags.

A secret is the value of an environment variable whose name contains TOKEN, SECRET, PASSWORD or KEY (MLflow's
MLFLOW_TRACKING_PASSWORD and MLFLOW_TRACKING_TOKEN among them; MLFLOW_TRACKING_USERNAME too), or the password
part of a URI (`https://user:PASSWORD@host`). `scrub` replaces each with `***` in a string, or in every string
of a nested dict or list; the writers above call it on what they write.
"""

from __future__ import annotations

import os
import re
from typing import Any

SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "KEY")
"""An environment variable whose name contains one of these (any case) holds a secret."""
ALSO_SECRET = ("MLFLOW_TRACKING_USERNAME",)
"""Credentials MLflow reads whose names carry none of the words."""
MIN_LENGTH = 6
"""Shorter values ("1", "auto", "true") are settings, not secrets, and would scrub ordinary words."""
MASK = "***"

_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)(?P<password>[^@/\s]+)@")


def secret_values(env: dict[str, str] | None = None) -> list[str]:
    """The values to hide, longest first (so a secret containing another is hidden whole)."""
    env = os.environ if env is None else env
    found = {value for name, value in env.items()
             if (name in ALSO_SECRET or any(word in name.upper() for word in SECRET_WORDS)) and len(value) >= MIN_LENGTH}
    return sorted(found, key=lambda v: (-len(v), v))


def scrub(value: Any, secrets: list[str] | None = None) -> Any:
    """`value` with every secret and URI password replaced by `***` (strings inside dicts and lists too)."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, str):
        value = _URI_PASSWORD.sub(lambda m: m["head"] + MASK + "@", value)
        for secret in secrets:
            value = value.replace(secret, MASK)
        return value
    if isinstance(value, dict):
        return {scrub(k, secrets): scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub(v, secrets) for v in value)
    return value
