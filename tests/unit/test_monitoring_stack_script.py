"""scripts/stack.sh --render-config: the runtime configs it writes are valid and local."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from helpers.binaries import find_binary

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "stack.sh"


def render(stack_dir: Path) -> tuple[dict[str, Any], dict[str, Any], Path, Path]:
    env = {**os.environ, "STACK_DIR": str(stack_dir), "EXPORTER_ADDR": "127.0.0.1:19464",
           "PROM_ADDR": "127.0.0.1:19090", "AM_ADDR": "127.0.0.1:19093"}
    result = subprocess.run([find_binary("bash"), str(SCRIPT), "--render-config"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    prom_path, am_path = stack_dir / "prometheus.yml", stack_dir / "alertmanager.yml"
    return (yaml.safe_load(prom_path.read_text()), yaml.safe_load(am_path.read_text()),
            prom_path, am_path)


def test_rendered_prometheus_config(tmp_path: Path) -> None:
    prom, _, prom_path, _ = render(tmp_path)
    assert prom["rule_files"] == [f"{ROOT}/prometheus/rules/*.yml"]
    assert prom["scrape_configs"][0]["static_configs"] == [{"targets": ["127.0.0.1:19464"]}]
    alerting = prom["alerting"]["alertmanagers"][0]["static_configs"]
    assert alerting == [{"targets": ["127.0.0.1:19093"]}]
    result = subprocess.run([find_binary("promtool"), "check", "config", str(prom_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


def test_rendered_alertmanager_config(tmp_path: Path) -> None:
    _, am, _, am_path = render(tmp_path)
    original = yaml.safe_load((ROOT / "alertmanager" / "alertmanager.yml").read_text())
    secrets = f"{ROOT}/alertmanager/secrets/"
    assert am["templates"] == [f"{ROOT}/alertmanager/templates/*.tmpl"]
    files = [c.get("api_url_file") or c.get("routing_key_file") for r in am["receivers"]
             for c in r.get("slack_configs", []) + r.get("pagerduty_configs", [])]
    assert len(files) == 3 and all(f.startswith(secrets) for f in files), files
    # Only the paths differ: routes, inhibition and receivers are the repository's.
    assert am["route"] == original["route"]
    assert am["inhibit_rules"] == original["inhibit_rules"]
    assert [r["name"] for r in am["receivers"]] == [r["name"] for r in original["receivers"]]
    result = subprocess.run([find_binary("amtool"), "check-config", str(am_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
