"""scripts/stack.sh for real: exporter + Prometheus + Alertmanager up, then SIGINT stops all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from helpers.binaries import find_binary
from helpers.monitoring import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
ledger: {{path: {ledger}}}
budgets:
  - {{department: engineering, project: ai-features, daily_usd: 10, monthly_usd: 100,
     warning_ratio: 0.8, timezone: UTC}}
"""


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_stack_starts_scrapes_and_stops_on_sigint(tmp_path: Path) -> None:
    for name in ("prometheus", "prometheus-alertmanager"):
        find_binary(name)
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(ledger=tmp_path / "ledger.db"))
    ports = {"EXPORTER_ADDR": free_port(), "PROM_ADDR": free_port(), "AM_ADDR": free_port()}
    bindir = Path(sys.executable).parent
    env = {**os.environ, "STACK_DIR": str(tmp_path / "stack"), "CONFIG": str(config),
           "EXPORTER_BIN": str(bindir / "llm-cost-exporter"), "PYTHON": sys.executable,
           **{k: f"127.0.0.1:{v}" for k, v in ports.items()}}
    log = (tmp_path / "stack.out").open("wb")
    proc = subprocess.Popen([find_binary("bash"), str(ROOT / "scripts" / "stack.sh")], env=env,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    prom = f"http://127.0.0.1:{ports['PROM_ADDR']}"
    try:
        def scraped() -> bool:
            result = httpx.get(f"{prom}/api/v1/query", params={"query": "up"}, timeout=2)
            series = result.json()["data"]["result"]
            return any(s["metric"]["job"] == "llm-cost-exporter" and s["value"][1] == "1"
                       and s["metric"]["instance"] == f"127.0.0.1:{ports['EXPORTER_ADDR']}"
                       for s in series)

        # Prometheus 2.42 discovers new targets only every 5 s.
        wait_for(scraped, 40, f"Prometheus to scrape the exporter (see {tmp_path})")
        managers = httpx.get(f"{prom}/api/v1/alertmanagers", timeout=2).json()
        assert managers["data"]["activeAlertmanagers"] == [
            {"url": f"http://127.0.0.1:{ports['AM_ADDR']}/api/v2/alerts"}]
        rules = httpx.get(f"{prom}/api/v1/rules", timeout=2).json()["data"]["groups"]
        assert {g["name"] for g in rules} >= {"llm-budgets", "llm-cost-budgets"}
        assert "Ctrl-C stops everything" in (tmp_path / "stack.out").read_text()

        # Ctrl-C: the shell's trap must stop all three and exit.
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
        for port in ports.values():
            wait_for(lambda p=port: not _listening(p), 10, f"port {port} to close")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
