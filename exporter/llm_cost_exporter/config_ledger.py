"""Config section `ledger`: SQLite (embedded, the default) or PostgreSQL (shared by replicas)."""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_cost_exporter.credentials import read_secret
from llm_cost_exporter.validation import Problems, resolve_path

BACKENDS = ("sqlite", "postgres")
INSTANCE_ENV = "LLM_EXPORTER_INSTANCE"
# Hostnames, pod names and compose service names all fit; the name is stored in every
# event and totals row, so it stays short and printable.
_INSTANCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_SQLITE_ONLY = ("path", "synchronous", "writer_process")
_POSTGRES_ONLY = ("dsn_env", "dsn_file", "pool_size")


@dataclass(frozen=True)
class LedgerConfig:
    backend: str = "sqlite"
    path: Path = Path("data/ledger.db")
    # NORMAL survives a killed process (the case that matters for a sidecar); FULL also
    # survives power loss at a cost in commit latency.
    synchronous: str = "NORMAL"
    # SQLite only: serve commits in a process of its own, on the second core (see
    # ledger/sqlite_process.py); false keeps one process (about 22 MB less memory).
    writer_process: bool = True
    # PostgreSQL only. The DSN usually holds a password: kept out of repr() and logs.
    dsn: str | None = field(default=None, repr=False)
    # Which replica this process is: its counters are the totals recorded under this name.
    instance: str = ""
    pool_size: int = 4

    def describe(self) -> str:
        """Where the ledger is, for logs and check-config: never the password."""
        if self.backend == "postgres":
            return f"postgres {dsn_summary(self.dsn or '')} (instance {self.instance})"
        writer = "writer process" if self.writer_process else "one process"
        return f"sqlite {self.path} (synchronous={self.synchronous}, {writer})"


def dsn_summary(dsn: str) -> str:
    """host:port/dbname as user, read from a DSN; nothing else of it (no password)."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(dsn)
    except Exception:  # not installed, or not a DSN: say nothing about its content
        return "(dsn hidden)"
    host = parts.get("host") or parts.get("hostaddr") or "localhost"
    return (f"{host}:{parts.get('port') or 5432}/{parts.get('dbname') or '?'} "
            f"as {parts.get('user') or '?'}")


def parse_ledger(obj: Mapping[str, Any], base_dir: Path, env: Mapping[str, str],
                 p: Problems) -> LedgerConfig:
    p.unknown_keys(obj, {"backend", "path", "synchronous", "dsn", "dsn_env", "dsn_file",
                         "instance", "pool_size", "writer_process"}, "ledger")
    backend = obj.get("backend", "sqlite")
    if backend not in BACKENDS:
        p.add("ledger.backend", "must be 'sqlite' or 'postgres'")
        backend = "sqlite"
    sync = str(obj.get("synchronous", "NORMAL")).upper()
    if sync not in {"NORMAL", "FULL"}:
        p.add("ledger.synchronous", "must be NORMAL or FULL")
    path = resolve_path(obj.get("path", "data/ledger.db"), base_dir)
    instance = _instance(obj, env, p)
    if backend == "sqlite":
        for key in _POSTGRES_ONLY:
            if key in obj:
                p.add(f"ledger.{key}", "only used with backend: postgres")
        writer_process = obj.get("writer_process", True)
        if not isinstance(writer_process, bool):
            p.add("ledger.writer_process", "must be true or false")
            writer_process = True
        return LedgerConfig(backend="sqlite", path=path, synchronous=sync, instance=instance,
                            writer_process=writer_process)
    for key in _SQLITE_ONLY:
        if key in obj:
            p.add(f"ledger.{key}", "only used with backend: sqlite")
    if obj.get("dsn_env") and obj.get("dsn_file"):
        p.add("ledger", "set only one of dsn_env and dsn_file")
    dsn = read_secret(obj, "dsn", "ledger", base_dir, env, p)
    if dsn is None and not (obj.get("dsn_env") or obj.get("dsn_file")):
        p.add("ledger", "backend postgres needs dsn_env or dsn_file (a libpq connection "
                        "string or postgresql:// URI; never inline, it holds a password)")
    elif dsn is not None:
        _check_dsn(dsn, "ledger.dsn_env" if obj.get("dsn_env") else "ledger.dsn_file", p)
    pool_size = p.integer(obj, "pool_size", "ledger", 4, minimum=2, maximum=100)
    return LedgerConfig(backend="postgres", dsn=dsn, instance=instance, pool_size=pool_size)


def _instance(obj: Mapping[str, Any], env: Mapping[str, str], p: Problems) -> str:
    """ledger.instance, else $LLM_EXPORTER_INSTANCE, else the host name (a pod's name)."""
    if obj.get("instance") is not None:
        value, where = obj["instance"], "ledger.instance"
    elif env.get(INSTANCE_ENV):
        value, where = env[INSTANCE_ENV], f"ledger.instance (from ${INSTANCE_ENV})"
    else:
        value, where = socket.gethostname(), "ledger.instance (from the host name)"
    if not isinstance(value, str) or not _INSTANCE.match(value):
        p.add(where, "must be 1-128 characters of [A-Za-z0-9._:@-], starting with a letter or "
                     "digit")
        return "invalid"
    return value


def _check_dsn(dsn: str, where: str, p: Problems) -> None:
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        p.add("ledger.backend", "postgres needs the psycopg package: "
                                "pip install 'llm-cost-exporter[postgres]'")
        return
    try:
        conninfo_to_dict(dsn)
    except Exception:
        # psycopg's message quotes the string, password included: give our own.
        p.add(where, "not a valid PostgreSQL connection string (key=value pairs or a "
                     "postgresql:// URI)")
