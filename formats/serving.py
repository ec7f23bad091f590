"""A model served over HTTP, the MLflow scoring protocol: `mlflow models serve` on 127.0.0.1, a client that asks
it politely (rate limit, retries with backoff), and the watermarking deployment in front of it.

Protocol (MLflow's): POST /invocations with `{"inputs": [text, ...]}` (a pair as `{"text", "text_pair"}`)
answers `{"predictions": [{"label": NAME, "score": P}, ...]}`; GET /ping is 200 once the model is loaded.

The watermarking deployment is a small HTTP proxy (a thread of the process that starts it): it forwards each
request to the model server, answers a keyed secret share of queries with a wrong label (kd.defences), keeps
the marked answers in a journal (formats/answers.py), and returns only what the deployment discloses: the
label, or the label and its top-1 probability.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Sequence

import requests

from formats import answers as journal
from kd import defences
from pipeline.config import ConfigError

ANSWERS = ("label", "top1_prob")
"""What a deployment discloses per query."""


def payload(texts: Sequence[tuple[str, ...]]) -> dict:
    """The /invocations body for single texts or pairs."""
    return {"inputs": [t[0] if len(t) == 1 else {"text": t[0], "text_pair": t[1]} for t in texts]}


def _unpack(item) -> tuple[str, ...]:
    return (item,) if isinstance(item, str) else (item["text"], item["text_pair"])


@contextlib.contextmanager
def mlflow_serve(model: str, port: int, log_path: Path, *, env: dict | None = None,
                 timeout_s: float = 300) -> Iterator[str]:
    """Serve MLflow Model `model` (a folder, runs:/ or models:/) with `mlflow models serve --env-manager local`
    on 127.0.0.1:`port` until the block ends; yields its URL. The server runs in its own session, stopped
    with its workers; a server that dies or stays silent past `timeout_s` is an error quoting its log."""
    bin_dir = str(Path(sys.executable).parent)  # mlflow execs uvicorn from PATH: the venv's, as if activated
    full_env = {**os.environ, **(env or {}), "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not _pings(url):
            tail = Path(log_path).read_text(errors="replace")[-400:].strip().replace("\n", " | ")
            if server.poll() is not None:
                raise ConfigError(f"mlflow models serve -m {model} exited with {server.returncode}: {tail}")
            if time.monotonic() > deadline:
                raise ConfigError(f"mlflow models serve -m {model} did not answer /ping in {timeout_s:.0f} s: {tail}")
            time.sleep(0.5)
        yield url
    finally:
        stop_group(server)


def _die_with_parent() -> None:
    """In the server's child process: SIGTERM it when the stage that started it dies, even by SIGKILL (which
    runs no cleanup), so a killed stage leaves no server behind (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _pings(url: str) -> bool:
    try:
        return requests.get(f"{url}/ping", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def stop_group(server: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM a server's process group (it and its workers), SIGKILL what is left after `grace_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        server.poll()
        try:
            os.killpg(server.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()


class Client:
    """Asks a served model for answers: at most `rate_limit` requests per second, a failed request (no
    connection, a timeout, HTTP 429 or 5xx) retried `retries` times after backoff_s, 2*backoff_s, ...; keeps
    only what `answers` discloses (the label, and with top1_prob its probability)."""

    def __init__(self, url: str, *, answers: str = "label", rate_limit: float | None = None, retries: int = 3,
                 backoff_s: float = 0.5, timeout_s: float = 60.0):
        self.url, self.answers, self.retries = url.rstrip("/"), answers, retries
        self.backoff_s, self.timeout_s = backoff_s, timeout_s
        self.interval = 1.0 / rate_limit if rate_limit else 0.0
        self.next_at = 0.0
        self.requests = 0

    def _wait_turn(self) -> None:
        now = time.monotonic()
        if now < self.next_at:
            time.sleep(self.next_at - now)
        self.next_at = max(now, self.next_at) + self.interval

    def ask(self, texts: Sequence[tuple[str, ...]]) -> list[dict]:
        """One answer per text: `{"label": NAME}` (and `"score"` with top1_prob)."""
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            self._wait_turn()
            self.requests += 1
            try:
                reply = requests.post(f"{self.url}/invocations", json=payload(texts), timeout=self.timeout_s)
            except requests.RequestException as err:
                error = type(err).__name__
                continue
            if reply.status_code == 429 or reply.status_code >= 500:
                error = f"HTTP {reply.status_code}"
                continue
            if reply.status_code != 200:
                raise ConfigError(f"{self.url}/invocations refused the queries: HTTP {reply.status_code} "
                                  f"{reply.text[:200]}")
            found = reply.json().get("predictions")
            if not isinstance(found, list) or len(found) != len(texts) or not all("label" in p for p in found):
                raise ConfigError(f"{self.url}/invocations: expected one {{label, score}} per query, "
                                  f"got {str(found)[:200]}")
            keep = ("label", "score") if self.answers == "top1_prob" else ("label",)
            return [{k: p[k] for k in keep} for p in found]
        raise ConfigError(f"{self.url}/invocations did not answer after {self.retries + 1} tries ({error}); "
                          "is the model server up? (retries, backoff_s)")


class WatermarkProxy:
    """The watermarking deployment: an HTTP server on 127.0.0.1 in front of `upstream` (see the module
    docstring). `fraction` 0 makes it a plain deployment that only hides what `answers` does not disclose."""

    def __init__(self, upstream: str, *, key: bytes, fraction: float, label_names: list[str], journal_path: Path,
                 answers: str = "label"):
        self.client = Client(upstream, answers="top1_prob", retries=2)
        self.key, self.fraction, self.names = key, fraction, label_names
        self.journal_path, self.answers = Path(journal_path), answers
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, texts: list[tuple[str, ...]]) -> list[dict]:
        """The deployment's answers: the model's, the marked ones relabelled and journaled."""
        found = self.client.ask(texts)
        index = {n: i for i, n in enumerate(self.names)}
        marked = []
        for text, item in zip(texts, found):
            if defences.is_watermarked(self.key, text, self.fraction):
                wrong = self.names[defences.watermark_label(self.key, text, index[item["label"]], len(self.names))]
                marked.append({"text": list(text), "label": wrong, "model_label": item["label"]})
                item["label"] = wrong
        if marked:
            with self.lock:
                journal.append(self.journal_path, marked)
        return [item if self.answers == "top1_prob" else {"label": item["label"]} for item in found]

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # requests are counted in journals, not printed
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200 if self.path in ("/ping", "/health") else 404, {})

            def do_POST(self):
                if self.path != "/invocations":
                    return self._send(404, {"error": "POST /invocations"})
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    texts = [_unpack(item) for item in body["inputs"]]
                except (ValueError, KeyError, TypeError) as err:
                    return self._send(400, {"error": f"expected {{\"inputs\": [text, ...]}} ({err})"})
                try:
                    self._send(200, {"predictions": proxy.answer(texts)})
                except ConfigError as err:
                    self._send(502, {"error": str(err)})

        return Handler

    def __enter__(self) -> "WatermarkProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
