"""The one place that turns settings into a reachable MLflow client.

Which store: a URI given explicitly (`tracking.uri`, `--tracking-uri`, `--run-dir`'s database), else
`MLFLOW_TRACKING_URI`, else an embedded sqlite database in the run directory. Every user (the tracker,
`runs:/`/`models:/` references, `distill promote`) goes through `store_uri` and `connect`, so the order is one.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from pipeline import log
from pipeline.config import ConfigError
from pipeline.secrets import scrub


class StoreUnreachable(ConfigError):
    """The tracking server did not answer in time."""


def sqlite_uri(run_dir: Path) -> str:
    """The embedded store of a run directory."""
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def store_uri(given: str | None, run_dir: Path | None) -> str:
    """The store to use: `given`, else MLFLOW_TRACKING_URI, else sqlite in `run_dir`."""
    uri = given or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if run_dir is None:
        raise ConfigError("no tracking store: give --tracking-uri URI, --run-dir DIR or set MLFLOW_TRACKING_URI")
    return sqlite_uri(run_dir)


_SET_HERE: set[str] = set()
"""MLflow HTTP settings this process chose (a user's own environment values are left alone)."""


def bound_retries(timeout_s: float) -> None:
    """Keep MLflow's HTTP client from retrying for minutes (its defaults: 7 retries, 120 s each).

    Reaching the server at all is bounded by `timeout_s` through `reachable`; once it answered, a request
    may take longer (a model upload on a busy server), so each gets max(30 s, 3 x timeout_s) and 2 retries.
    """
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(30, math.ceil(3 * timeout_s)))}
    for key, value in wanted.items():
        if key not in os.environ or key in _SET_HERE:
            os.environ[key] = value
            _SET_HERE.add(key)


def reachable(uri: str, timeout_s: float) -> bool:
    """Whether an http(s) tracking server answers within `timeout_s`; other stores count as reachable."""
    if not uri.startswith(("http://", "https://")):
        return True
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=max(0.2, min(left, 3.0)))
            return True  # any HTTP answer means something listens; auth errors surface on real calls
        except requests.RequestException:
            if deadline - time.monotonic() <= 0.5:
                return False
            time.sleep(0.5)


def prepare_sqlite(uri: str) -> None:
    """Create a missing sqlite store from a cached empty one: MLflow's own schema migrations take ~10 s on disk."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///"):])
    if db.exists():
        return
    import mlflow
    from mlflow import MlflowClient

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distill"
    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    if not template.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            MlflowClient(f"sqlite:///{tmp}/empty.db").search_experiments()  # runs the migrations
            os.replace(Path(tmp) / "empty.db", template)
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, db)


class StoreLocked(ConfigError):
    """A sqlite store stayed locked by another writer past the retry budget; the message advises a server."""


def _is_locked(err: BaseException) -> bool:
    while err is not None:
        if "database is locked" in str(err) or "database table is locked" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def retry_locked(call, uri: str, budget_s: float, what: str = "tracking call"):
    """`call()`, retried with exponential backoff (0.1 s doubling, at most 5 s a wait) while sqlite answers
    "database is locked", for at most `budget_s`; then StoreLocked advising a tracking server.

    sqlite lets one writer in at a time and makes others wait only its busy timeout (5 s in Python); two
    runs sharing one file (a team's default before it has a server) collide on long transactions.
    """
    started, wait, tries = time.monotonic(), 0.1, 0
    while True:
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - only the lock error is retried; others go up unchanged
            if not _is_locked(err):
                raise
            tries += 1
            left = budget_s - (time.monotonic() - started)
            if left <= 0:
                db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else uri
                raise StoreLocked(
                    f"tracking store {uri}: {what} failed: database is locked after {tries} tries over "
                    f"{time.monotonic() - started:.0f} s (another run is writing it); runs that share a store "
                    f"need a tracking server: `mlflow server --backend-store-uri sqlite:///{db}` and tracking.uri: "
                    "http://HOST:5000") from None
            if tries == 1:
                log.warn(f"tracking store {uri}: database is locked (another run is writing it); retrying {what} "
                         f"for up to {budget_s:g} s")
            time.sleep(min(wait, left))
            wait = min(wait * 2, 5.0)


def connect(uri: str, timeout_s: float):
    """An MlflowClient for `uri`, after bounding retries and probing a server; StoreUnreachable if it is silent."""
    bound_retries(timeout_s)
    if scrub(uri) != uri:  # MLflow prints "View run at: URI..." to stdout, password and all
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    if not reachable(uri, timeout_s):
        raise StoreUnreachable(f"tracking server {uri}: no answer within {timeout_s:g} s")
    from mlflow import MlflowClient

    prepare_sqlite(uri)
    # The registry is this store too: never a registry URI set globally elsewhere in the process.
    return MlflowClient(uri, registry_uri=uri)
