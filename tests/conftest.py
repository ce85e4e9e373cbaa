"""Shared fixtures: a fixed clock, a fresh ledger, an in-process app, a real server process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from llm_cost_exporter.clock import FixedClock

from fixtures.fake_provider import FakeProvider

ROOT = Path(__file__).resolve().parent.parent
PAYLOADS = ROOT / "examples" / "payloads"


def payload(name: str) -> Any:
    text = (PAYLOADS / name).read_text()
    return text if name.endswith(".sse") else json.loads(text)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    """A local OpenAI/Anthropic stand-in, one per test module (tests reset() it as needed)."""
    provider = FakeProvider().start()
    yield provider
    provider.stop()


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(datetime(2026, 3, 14, 12, 0, tzinfo=UTC))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check` until true; fail with `what` after `timeout` seconds (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class ExporterProcess:
    """A real `llm-cost-exporter serve` process on loopback."""

    config_path: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20) -> ExporterProcess:
        assert self.log_path is not None
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llm_cost_exporter", "serve", "--config",
             str(self.config_path), "--listen", f"127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_until(lambda: httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200,
                   timeout, f"exporter on port {self.port} to be ready (log: {self.log_path})")
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def post_usage(self, events: Any, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/usage", json=events, timeout=30, **kwargs)

    def metrics(self) -> str:
        response = httpx.get(f"{self.url}/metrics", timeout=10)
        response.raise_for_status()
        return response.text


@pytest.fixture
def exporter_factory(tmp_path: Path) -> Iterator[Callable[..., ExporterProcess]]:
    started: list[ExporterProcess] = []

    def make(config_yaml: str | dict[str, Any], port: int | None = None) -> ExporterProcess:
        data = yaml.safe_load(config_yaml) if isinstance(config_yaml, str) else dict(config_yaml)
        data = data or {}
        data.setdefault("ledger", {"path": str(tmp_path / f"ledger-{len(started)}.db")})
        config_path = tmp_path / f"config-{len(started)}.yaml"
        config_path.write_text(yaml.safe_dump(data))
        proc = ExporterProcess(config_path, port or free_port(),
                               log_path=tmp_path / f"exporter-{len(started)}.log")
        started.append(proc)
        return proc.start()

    yield make
    for proc in started:
        proc.stop()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text output, matched on all given labels."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


@pytest.fixture
def pg() -> Any:
    """The session's PostgreSQL server (helpers/postgres.py); fails under CI when absent."""
    from helpers.postgres import pg_server

    return pg_server()


@pytest.fixture
def pg_dsn(pg: Any) -> Iterator[str]:
    """A DSN of a fresh, empty PostgreSQL database of this test's own."""
    name = pg.create_database()
    yield pg.dsn(name)
    pg.drop_database(name)
