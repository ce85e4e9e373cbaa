"""docker-compose.yml and Dockerfile, validated statically (no Docker engine here)."""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()

# Compose Specification keys used by this project; anything else is most likely a typo.
TOP_LEVEL = {"name", "services", "volumes", "networks", "secrets", "configs"}
SERVICE_KEYS = {"build", "image", "command", "environment", "volumes", "ports", "depends_on",
                "healthcheck", "restart", "read_only", "tmpfs", "cap_drop", "security_opt",
                "user", "secrets", "profiles", "networks"}
# The optional `postgres` profile: PostgreSQL and two exporter replicas sharing it.
REPLICAS = ("exporter-a", "exporter-b")
PG_PROFILE = {"postgres", *REPLICAS}


def volumes(service: str) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax volume."""
    out = []
    for spec in SERVICES[service].get("volumes", []):
        parts = spec.split(":")
        assert len(parts) in (2, 3), spec
        out.append((parts[0], parts[1], parts[2] if len(parts) == 3 else "rw"))
    return out


def test_structure() -> None:
    assert set(COMPOSE) <= TOP_LEVEL
    assert set(SERVICES) == {"exporter", "prometheus", "alertmanager", "grafana", *PG_PROFILE}
    for name, service in SERVICES.items():
        assert set(service) <= SERVICE_KEYS, (name, set(service) - SERVICE_KEYS)
        assert service["restart"] == "unless-stopped"
        # Only the PostgreSQL services are optional; the default stack starts without them.
        assert service.get("profiles") == (["postgres"] if name in PG_PROFILE else None), name
        for dep in service.get("depends_on", []):
            assert dep in SERVICES
            assert name in PG_PROFILE or dep not in PG_PROFILE, (name, dep)


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_images_are_pinned(service: str) -> None:
    image = SERVICES[service]["image"]
    if "build" in SERVICES[service]:
        assert image == "llm-cost-exporter:local"
        return
    if image.startswith("postgres:"):  # PostgreSQL versions are major.minor
        assert re.fullmatch(r"postgres:\d+\.\d+-bookworm", image), image
        return
    assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), image


def test_dockerfile_base_is_pinned() -> None:
    [base] = re.findall(r"^FROM\s+(\S+)", DOCKERFILE, re.M)
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), base


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_ports_only_on_loopback(service: str) -> None:
    for port in SERVICES[service].get("ports", []):
        assert isinstance(port, str) and re.fullmatch(r"127\.0\.0\.1:\d+:\d+", port), port


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_bind_mounts_exist_and_named_volumes_are_declared(service: str) -> None:
    for source, target, mode in volumes(service):
        assert PurePosixPath(target).is_absolute(), target
        if source.startswith((".", "/")):
            assert source.startswith("./"), f"{source}: bind mounts must be repo-relative"
            assert (ROOT / source).exists(), f"{source} is not in the repository"
            # Configuration and secrets are mounted read-only.
            assert mode == "ro", f"{source} must be mounted :ro"
        else:
            assert source in COMPOSE["volumes"], f"undeclared volume {source}"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_healthchecks(service: str) -> None:
    check = SERVICES[service]["healthcheck"]
    assert check["test"][0] == "CMD"
    assert any("127.0.0.1" in part for part in check["test"])


def test_exporter_is_read_only_with_a_ledger_volume() -> None:
    exporter = SERVICES["exporter"]
    assert exporter["read_only"] is True
    assert exporter["tmpfs"] == ["/tmp"]
    mounts = {target: source for source, target, _ in volumes("exporter")}
    assert mounts["/etc/llm-cost-exporter/config.yaml"] == "./examples/config.yaml"
    config = yaml.safe_load((ROOT / "examples" / "config.yaml").read_text())
    # The ledger path is relative to the config file: its directory must be the volume.
    ledger = PurePosixPath("/etc/llm-cost-exporter") / config["ledger"]["path"]
    assert mounts[str(ledger.parent)] == "exporter-ledger"
    pricing = config.get("pricing", {}).get("overrides")
    if pricing:
        assert str(PurePosixPath("/etc/llm-cost-exporter") / pricing) in mounts


def test_prometheus_uses_the_compose_config_and_service_names() -> None:
    command = SERVICES["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.compose.yml" in command
    assert ("./prometheus", "/etc/prometheus", "ro") in volumes("prometheus")
    config = yaml.safe_load((ROOT / "prometheus" / "prometheus.compose.yml").read_text())
    [job] = config["scrape_configs"]
    [target] = job["static_configs"][0]["targets"]
    assert target == "exporter:9464" and "9464" in DOCKERFILE
    [am] = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert am == "alertmanager:9093"


def test_alertmanager_mounts_match_its_config_paths() -> None:
    mounts = {target: source for source, target, _ in volumes("alertmanager")}
    assert mounts["/etc/alertmanager/alertmanager.yml"] == "./alertmanager/alertmanager.yml"
    # templates/*.tmpl is relative to the config file; secrets are absolute paths.
    assert mounts["/etc/alertmanager/templates"] == "./alertmanager/templates"
    assert mounts["/etc/alertmanager/secrets"] == "./alertmanager/secrets"
    assert "--cluster.listen-address=" in SERVICES["alertmanager"]["command"]


def test_grafana_provisioning_is_mounted_read_only() -> None:
    mounts = {target: (source, mode) for source, target, mode in volumes("grafana")}
    for kind in ("datasources", "dashboards"):
        assert mounts[f"/etc/grafana/provisioning/{kind}"] == (
            f"./grafana/provisioning/{kind}", "ro")
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    source, _ = mounts[str(PurePosixPath(home).parent)]
    assert (ROOT / source / PurePosixPath(home).name).is_file()


def test_dockerfile() -> None:
    assert "COPY pyproject.toml README.md ./" in DOCKERFILE
    assert "COPY exporter ./exporter" in DOCKERFILE
    assert 'pip install --no-cache-dir ".[postgres]"' in DOCKERFILE
    [user] = re.findall(r"^USER\s+(\S+)", DOCKERFILE, re.M)
    assert not user.startswith(("root", "0"))
    assert re.search(r"^HEALTHCHECK .*\n?.*urllib.*/healthz", DOCKERFILE, re.M)
    [cmd] = re.findall(r"^CMD (\[.*?\])\s*$", DOCKERFILE.replace("\\\n", ""), re.M | re.S)
    assert json.loads(cmd) == ["llm-cost-exporter", "serve", "--config",
                               "/etc/llm-cost-exporter/config.yaml", "--listen", "0.0.0.0:9464",
                               "--allow-public-listen"]


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in ("alertmanager/secrets", ".venv", ".git", "examples/data", ".stack"):
        assert entry in ignored


def test_postgres_profile_secrets_stay_out_of_git_and_images() -> None:
    # The secret files are created by hand (postgres/secrets/README.md): their directory
    # is in the repository, the files are ignored by git and by the build context.
    for name, secret in COMPOSE["secrets"].items():
        source = PurePosixPath(secret["file"])
        assert str(source.parent) == "postgres/secrets" and source.name == name
        assert (ROOT / "postgres" / "secrets" / "README.md").is_file()
        assert name in (ROOT / "postgres" / "secrets" / "README.md").read_text()
    gitignore = (ROOT / ".gitignore").read_text().split()
    assert "postgres/secrets/*" in gitignore and "!postgres/secrets/README.md" in gitignore
    assert "postgres/secrets" in (ROOT / ".dockerignore").read_text().split()
    postgres = SERVICES["postgres"]
    assert postgres["secrets"] == ["postgres_password"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "POSTGRES_PASSWORD" not in postgres["environment"]
    assert ("postgres-data", "/var/lib/postgresql/data", "rw") in volumes("postgres")
    assert "ports" not in postgres  # reached by the replicas on the compose network only


@pytest.mark.parametrize("replica", REPLICAS)
def test_replicas_share_one_config_and_differ_only_in_name_and_port(replica: str,
                                                                    tmp_path: Path) -> None:
    from llm_cost_exporter.config import parse_config

    service = SERVICES[replica]
    assert service["secrets"] == ["ledger_dsn"]
    assert service["environment"] == {"LLM_EXPORTER_INSTANCE": replica}
    assert service["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert service["networks"] == {"default": {"aliases": ["exporter-replica"]}}
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    mounts = {target: source for source, target, _ in volumes(replica)}
    assert mounts["/etc/llm-cost-exporter/config.yaml"] == "./examples/config.postgres.yaml"
    same = {k: v for k, v in service.items() if k not in ("environment", "ports")}
    other = SERVICES[REPLICAS[1 - REPLICAS.index(replica)]]
    assert same == {k: v for k, v in other.items() if k not in ("environment", "ports")}
    assert {k: v for k, v in SERVICES["exporter"].items() if k in (
        "read_only", "tmpfs", "cap_drop", "security_opt")} == {
        k: v for k, v in service.items() if k in ("read_only", "tmpfs", "cap_drop",
                                                  "security_opt")}
    # The config the replicas mount loads, given the secret file compose would mount.
    data = yaml.safe_load((ROOT / "examples" / "config.postgres.yaml").read_text())
    assert data["ledger"]["dsn_file"] == "/run/secrets/ledger_dsn"
    assert "instance" not in data["ledger"]  # one shared file: names come from the env
    dsn_file = tmp_path / "ledger_dsn"
    dsn_file.write_text("postgresql://llm:pw@postgres:5432/llm_cost\n")
    data["ledger"]["dsn_file"] = str(dsn_file)
    cfg = parse_config(data, ROOT / "examples", env={"LLM_EXPORTER_INSTANCE": replica})
    assert (cfg.ledger.backend, cfg.ledger.instance) == ("postgres", replica)
    assert cfg.ledger.describe() == f"postgres postgres:5432/llm_cost as llm (instance {replica})"
