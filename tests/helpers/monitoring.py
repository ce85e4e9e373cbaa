"""Real Prometheus / Alertmanager processes on loopback and a fake Slack + PagerDuty server.

Every wait polls with a deadline; nothing sleeps a fixed time. Processes log into the test's
temporary directory and are stopped (SIGTERM, then SIGKILL) when their context exits.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

from helpers.binaries import find_binary

ROOT = Path(__file__).resolve().parents[2]
ALERTMANAGER_DIR = ROOT / "alertmanager"
SECRETS_PREFIX = "/etc/alertmanager/secrets/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `check` until it returns a truthy value and return that value."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, OSError, KeyError, ValueError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f" (last error: {last_error!r})" if last_error else ""))
        time.sleep(interval)


@dataclass
class Service:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def _process(name: str, argv: list[str], url: str, ready_path: str, log_path: Path,
             timeout: float) -> Iterator[Service]:
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    service = Service(name, url, proc, log_path)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{service.log()}")
            return httpx.get(url + ready_path, timeout=1).status_code == 200

        wait_for(ready, timeout, f"{name} at {url} to be ready")
        yield service
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@contextmanager
def prometheus(workdir: Path, config: dict[str, Any], timeout: float = 20,
               extra_args: tuple[str, ...] = ()) -> Iterator[Service]:
    """A real `prometheus` with `config` (rule_files may be absolute paths)."""
    binary = find_binary("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [binary, f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", f"--web.external-url={url}",
            # Without it the first alert can wait a minute before it is sent.
            "--rules.alert.resend-delay=1s", *extra_args]
    with _process("prometheus", argv, url, "/-/ready", workdir / "prometheus.log",
                  timeout) as service:
        yield service


@contextmanager
def alertmanager(workdir: Path, config_text: str, timeout: float = 20) -> Iterator[Service]:
    """A real `prometheus-alertmanager` (Debian's name) with no cluster port."""
    binary = find_binary("prometheus-alertmanager")
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "alertmanager.yml"
    config_path.write_text(config_text)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [binary, f"--config.file={config_path}", f"--storage.path={workdir / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}", f"--web.external-url={url}",
            "--cluster.listen-address="]
    with _process("alertmanager", argv, url, "/-/ready", workdir / "alertmanager.log",
                  timeout) as service:
        yield service


@dataclass
class Received:
    path: str
    body: dict[str, Any]


@dataclass
class FakeReceivers:
    """One HTTP server standing in for Slack webhooks and the PagerDuty Events API."""

    url: str
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def received(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r.body for r in self.requests if r.path == path]


@contextmanager
def fake_receivers() -> Iterator[FakeReceivers]:
    holder: list[FakeReceivers] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            fake = holder[0]
            with fake.lock:
                fake.requests.append(Received(self.path, body))
            # Slack's incoming webhook answers 200 "ok"; PagerDuty 202 with JSON.
            is_pd = self.path.startswith("/pagerduty")
            reply = b'{"status":"success"}' if is_pd else b"ok"
            self.send_response(202 if is_pd else 200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder.append(FakeReceivers(f"http://127.0.0.1:{server.server_address[1]}"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield holder[0]
    finally:
        server.shutdown()
        server.server_close()


SLACK_PATHS = {"slack_api_url": "/slack/platform",
               "slack_data_science_api_url": "/slack/data-science"}


def runtime_alertmanager_config(secrets_dir: Path, receivers_url: str,
                                group_wait: str = "1s", group_interval: str = "1s") -> str:
    """alertmanager/alertmanager.yml made runnable against `fake_receivers()`.

    Secret files are written into `secrets_dir` (Slack webhooks pointing at the fake server),
    the *_file paths and the template glob are made absolute, PagerDuty's URL is pointed at
    the fake server, and the grouping waits are shortened. Routes, receivers, templates and
    inhibition stay as in the repository.
    """
    secrets_dir.mkdir(parents=True, exist_ok=True)
    for name, path in SLACK_PATHS.items():
        (secrets_dir / name).write_text(receivers_url + path + "\n")
    (secrets_dir / "pagerduty_routing_key").write_text("0123456789abcdef0123456789abcdef\n")
    config = yaml.safe_load((ALERTMANAGER_DIR / "alertmanager.yml").read_text())
    config["templates"] = [str(ALERTMANAGER_DIR / t) for t in config["templates"]]
    config["route"]["group_wait"] = group_wait
    config["route"]["group_interval"] = group_interval
    for receiver in config["receivers"]:
        for slack in receiver.get("slack_configs", []):
            slack["api_url_file"] = _relocate(slack["api_url_file"], secrets_dir)
        for pd in receiver.get("pagerduty_configs", []):
            pd["routing_key_file"] = _relocate(pd["routing_key_file"], secrets_dir)
            pd["url"] = receivers_url + "/pagerduty"
    return yaml.safe_dump(config, sort_keys=False)


def _relocate(path: str, secrets_dir: Path) -> str:
    assert path.startswith(SECRETS_PREFIX), path
    return str(secrets_dir / path.removeprefix(SECRETS_PREFIX))
