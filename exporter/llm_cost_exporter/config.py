"""config.yaml -> typed, validated Config. Every problem is reported at once, with its path."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from llm_cost_exporter.config_ledger import LedgerConfig, parse_ledger
from llm_cost_exporter.config_proxy import ProxyConfig, Upstream, parse_proxy, parse_upstreams
from llm_cost_exporter.credentials import read_basic_users, read_tokens
from llm_cost_exporter.price_table import PriceTable, bundled_table_path, load_price_table
from llm_cost_exporter.validation import ConfigError, Problems, resolve_path

DEPARTMENT_WIDE = "*"
MAX_FUTURE_SECONDS = 366 * 86_400
_TOP_KEYS = {"listen", "allow_public_listen", "ledger", "defaults", "pricing", "ingest",
             "labels", "budgets", "log", "upstreams", "proxy", "metrics", "tls"}



@dataclass(frozen=True)
class IngestConfig:
    tokens: tuple[str, ...] = field(default=(), repr=False)
    max_body_bytes: int = 8 * 1024 * 1024
    max_batch_events: int = 10_000
    max_future_seconds: int = 300


@dataclass(frozen=True)
class MetricsAuth:
    """Optional protection of /metrics: bearer tokens and/or basic-auth users."""

    tokens: tuple[str, ...] = field(default=(), repr=False)
    basic_users: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def enabled(self) -> bool:
        return bool(self.tokens or self.basic_users)


@dataclass(frozen=True)
class TLSConfig:
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class LabelConfig:
    max_values_per_label: int = 500
    max_value_length: int = 128
    departments: frozenset[str] = frozenset()
    projects: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Budget:
    department: str
    project: str  # "*" = every project of the department
    daily_usd: Decimal | None
    monthly_usd: Decimal | None
    warning_ratio: Decimal
    timezone: str
    enforce: bool = False

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def limits(self) -> dict[str, Decimal]:
        out: dict[str, Decimal] = {}
        if self.daily_usd is not None:
            out["daily"] = self.daily_usd
        if self.monthly_usd is not None:
            out["monthly"] = self.monthly_usd
        return out


@dataclass(frozen=True)
class Config:
    listen_host: str = "127.0.0.1"
    listen_port: int = 9464
    allow_public_listen: bool = False
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    default_department: str = "unattributed"
    default_project: str = "unattributed"
    pricing_overrides: Path | None = None
    price_table: PriceTable = field(default_factory=PriceTable)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    budgets: tuple[Budget, ...] = ()
    upstreams: tuple[Upstream, ...] = ()
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    metrics: MetricsAuth = field(default_factory=MetricsAuth)
    tls: TLSConfig | None = None
    log_level: str = "INFO"
    source: Path | None = None

    @property
    def known_departments(self) -> frozenset[str]:
        return self.labels.departments | {b.department for b in self.budgets} | {
            self.default_department}

    @property
    def known_projects(self) -> frozenset[str]:
        return self.labels.projects | {b.project for b in self.budgets
                                       if b.project != DEPARTMENT_WIDE} | {self.default_project}


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT with a port in 1-65535")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(path: Path, env: Mapping[str, str] | None = None) -> Config:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from None
    return parse_config(data, base_dir=path.parent, env=os.environ if env is None else env,
                        source=path)


def parse_config(data: Any, base_dir: Path, env: Mapping[str, str],
                 source: Path | None = None) -> Config:
    p = Problems()
    root = p.mapping(data, "config")
    p.unknown_keys(root, _TOP_KEYS, "")

    host, port = "127.0.0.1", 9464
    listen = root.get("listen", "127.0.0.1:9464")
    try:
        host, port = parse_listen(str(listen))
    except ValueError as exc:
        p.add("listen", str(exc))

    ledger = parse_ledger(p.mapping(root.get("ledger"), "ledger"), base_dir, env, p)
    defaults = p.mapping(root.get("defaults"), "defaults")
    p.unknown_keys(defaults, {"department", "project"}, "defaults")
    labels = _labels(p.mapping(root.get("labels"), "labels"), p)
    department = _label(defaults, "department", "defaults", labels, p) or "unattributed"
    project = _label(defaults, "project", "defaults", labels, p) or "unattributed"

    pricing = p.mapping(root.get("pricing"), "pricing")
    p.unknown_keys(pricing, {"overrides"}, "pricing")
    table = load_price_table(bundled_table_path(), p, origin="bundled pricing.yaml")
    overrides_path = None
    if pricing.get("overrides"):
        overrides_path = resolve_path(pricing["overrides"], base_dir)
        table = load_price_table(overrides_path, p, origin="pricing.overrides").merged_over(table)

    ingest = _ingest(p.mapping(root.get("ingest"), "ingest"), base_dir, env, p)
    budgets = _budgets(root.get("budgets"), labels, p)
    upstreams = parse_upstreams(root.get("upstreams"), base_dir, env, p)
    proxy = parse_proxy(p.mapping(root.get("proxy"), "proxy"), base_dir, env, p)
    metrics = _metrics(p.mapping(root.get("metrics"), "metrics"), base_dir, env, p)
    tls = _tls(p.mapping(root.get("tls"), "tls"), base_dir, p)
    log = p.mapping(root.get("log"), "log")
    p.unknown_keys(log, {"level"}, "log")
    level = str(log.get("level", "INFO")).upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        p.add("log.level", "must be one of DEBUG, INFO, WARNING, ERROR")
    allow_public = root.get("allow_public_listen", False)
    if not isinstance(allow_public, bool):
        p.add("allow_public_listen", "must be true or false")
        allow_public = False
    p.raise_if_any()
    return Config(
        listen_host=host, listen_port=port, allow_public_listen=allow_public, ledger=ledger,
        default_department=department, default_project=project,
        pricing_overrides=overrides_path, price_table=table, ingest=ingest, labels=labels,
        budgets=budgets, upstreams=upstreams, proxy=proxy, metrics=metrics, tls=tls,
        log_level=level, source=source,
    )


def _labels(obj: Mapping[str, Any], p: Problems) -> LabelConfig:
    p.unknown_keys(obj, {"max_values_per_label", "max_value_length", "departments", "projects"},
                   "labels")
    names: dict[str, frozenset[str]] = {}
    for key in ("departments", "projects"):
        values = obj.get(key) or []
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            p.add(f"labels.{key}", "must be a list of non-empty strings")
            values = []
        names[key] = frozenset(values)
    return LabelConfig(
        max_values_per_label=p.integer(obj, "max_values_per_label", "labels", 500, minimum=1,
                                       maximum=100_000),
        max_value_length=p.integer(obj, "max_value_length", "labels", 128, minimum=8,
                                   maximum=1024),
        departments=names["departments"], projects=names["projects"],
    )


def _label(obj: Mapping[str, Any], key: str, path: str, labels: LabelConfig,
           p: Problems) -> str | None:
    value = p.string(obj, key, path)
    if value is not None and len(value) > labels.max_value_length:
        p.add(f"{path}.{key}", f"longer than labels.max_value_length ({labels.max_value_length})")
        return None
    return value


def _ingest(obj: Mapping[str, Any], base_dir: Path, env: Mapping[str, str],
            p: Problems) -> IngestConfig:
    p.unknown_keys(obj, {"tokens_env", "tokens_file", "max_body_bytes", "max_batch_events",
                         "max_future_seconds", "tokens"}, "ingest")
    return IngestConfig(
        tokens=read_tokens(obj, "ingest", base_dir, env, p),
        max_body_bytes=p.integer(obj, "max_body_bytes", "ingest", 8 * 1024 * 1024, minimum=1024),
        max_batch_events=p.integer(obj, "max_batch_events", "ingest", 10_000, minimum=1),
        # At most a year: a skew tolerance, and `now + it` must stay a valid datetime.
        max_future_seconds=p.integer(obj, "max_future_seconds", "ingest", 300, minimum=0,
                                     maximum=MAX_FUTURE_SECONDS),
    )


def _metrics(obj: Mapping[str, Any], base_dir: Path, env: Mapping[str, str],
             p: Problems) -> MetricsAuth:
    p.unknown_keys(obj, {"tokens_env", "tokens_file", "tokens", "basic_auth_file"}, "metrics")
    return MetricsAuth(tokens=read_tokens(obj, "metrics", base_dir, env, p),
                       basic_users=read_basic_users(obj, "metrics", base_dir, p))


def _tls(obj: Mapping[str, Any], base_dir: Path, p: Problems) -> TLSConfig | None:
    p.unknown_keys(obj, {"cert_file", "key_file"}, "tls")
    if not obj:
        return None
    files = {}
    for key in ("cert_file", "key_file"):
        if not obj.get(key):
            p.add(f"tls.{key}", "is required when tls is set")
            continue
        files[key] = resolve_path(obj[key], base_dir)
        if not files[key].is_file():
            p.add(f"tls.{key}", f"{files[key]} does not exist")
    if len(files) < 2:
        return None
    return TLSConfig(cert_file=files["cert_file"], key_file=files["key_file"])


def _budgets(value: Any, labels: LabelConfig, p: Problems) -> tuple[Budget, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        p.add("budgets", "must be a list")
        return ()
    out: list[Budget] = []
    seen: set[tuple[str, str]] = set()
    allowed = {"department", "project", "daily_usd", "monthly_usd", "warning_ratio",
               "timezone", "enforce"}
    for i, raw in enumerate(value):
        path = f"budgets[{i}]"
        obj = p.mapping(raw, path)
        p.unknown_keys(obj, allowed, path)
        department = _label(obj, "department", path, labels, p)
        if "department" not in obj:
            p.add(f"{path}.department", "is required")
        project = _label(obj, "project", path, labels, p) or DEPARTMENT_WIDE
        daily = p.decimal(obj, "daily_usd", path, positive=True)
        monthly = p.decimal(obj, "monthly_usd", path, positive=True)
        if "daily_usd" not in obj and "monthly_usd" not in obj:
            p.add(path, "needs daily_usd, monthly_usd or both")
        ratio = p.decimal(obj, "warning_ratio", path, positive=True)
        if ratio is None and "warning_ratio" not in obj:
            ratio = Decimal("0.8")
        if ratio is not None and ratio > 1:
            p.add(f"{path}.warning_ratio", "must be > 0 and <= 1")
        tz = obj.get("timezone", "UTC")
        try:
            ZoneInfo(str(tz))
        except (ZoneInfoNotFoundError, ValueError):
            p.add(f"{path}.timezone", f"unknown IANA time zone {tz!r}")
        enforce = obj.get("enforce", False)
        if not isinstance(enforce, bool):
            p.add(f"{path}.enforce", "must be true or false")
        if department is None or ratio is None:
            continue
        if (department, project) in seen:
            p.add(path, f"duplicate budget for department={department} project={project}")
        seen.add((department, project))
        out.append(Budget(department=department, project=project, daily_usd=daily,
                          monthly_usd=monthly, warning_ratio=ratio, timezone=str(tz),
                          enforce=bool(enforce)))
    return tuple(out)

