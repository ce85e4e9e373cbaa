"""A real PostgreSQL server for the tests: under CI an unavailable one fails, never skips.

The server is `$LLM_EXPORTER_TEST_PG_DSN` (a role allowed to CREATE DATABASE; .ci/run starts
one with scripts/pg-test-cluster.sh and also exports `$LLM_EXPORTER_TEST_PG_DATA`, which lets
the fault tests stop and start it). Without the variable, a private cluster is started in a
temp dir with the same script (needs Debian's `postgresql` package) and stopped at exit.
Every test gets its own database, dropped afterwards.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "pg-test-cluster.sh"
DSN_ENV = "LLM_EXPORTER_TEST_PG_DSN"
DATA_ENV = "LLM_EXPORTER_TEST_PG_DATA"


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required under CI: {message} (see .ci/run)")
    pytest.skip(f"PostgreSQL not available: {message}")


@dataclass
class PgServer:
    admin_dsn: str
    data_dir: Path | None  # known: the tests may stop and start the server

    def dsn(self, dbname: str) -> str:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(self.admin_dsn)
        params["dbname"] = dbname
        return make_conninfo(**params)

    def admin(self):  # type: ignore[no-untyped-def]
        import psycopg

        return psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=5)

    def create_database(self) -> str:
        name = f"llm_t_{uuid.uuid4().hex[:12]}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _ctl(self, command: str) -> None:
        if self.data_dir is None:
            _unavailable(f"${DATA_ENV} is not set, so the server cannot be stopped/started")
        assert self.data_dir is not None
        subprocess.run(["bash", str(SCRIPT), command, str(self.data_dir)], check=True,
                       capture_output=True, timeout=90)

    def stop(self) -> None:
        self._ctl("stop")

    def start(self) -> None:
        self._ctl("start")


_SERVER: PgServer | None = None


def _reachable(dsn: str) -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install -e '.[test]')"
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"cannot connect: {exc}"
    return None


def _private_cluster() -> PgServer:
    from conftest import free_port

    # An empty mkdtemp dir is the data dir itself: as root, the script hands it to the
    # postgres user, who could not enter a root-only parent.
    data = Path(tempfile.mkdtemp(prefix="llm-pg-"))
    proc = subprocess.run(["bash", str(SCRIPT), "start", str(data), str(free_port())],
                          capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)
        _unavailable(f"{SCRIPT.name} could not start a cluster: {proc.stderr.strip()[-500:]}")

    def cleanup() -> None:
        subprocess.run(["bash", str(SCRIPT), "stop", str(data)], capture_output=True,
                       timeout=90, check=False)
        shutil.rmtree(data, ignore_errors=True)

    atexit.register(cleanup)
    exports = dict(line.removeprefix("export ").split("=", 1)
                   for line in proc.stdout.splitlines() if line.startswith("export "))
    return PgServer(exports[DSN_ENV].strip("'"), data)


def pg_server() -> PgServer:
    """The one server of this test session (started on first use)."""
    global _SERVER
    if _SERVER is None:
        dsn = os.environ.get(DSN_ENV)
        if dsn:
            problem = _reachable(dsn)
            if problem:
                _unavailable(f"${DSN_ENV}: {problem}")
            data = os.environ.get(DATA_ENV)
            _SERVER = PgServer(dsn, Path(data) if data else None)
        else:
            try:
                import psycopg  # noqa: F401
            except ImportError:
                _unavailable("psycopg is not installed (pip install -e '.[test]')")
            _SERVER = _private_cluster()
    return _SERVER



def replica_config(dsn: str, directory: Path, instance: str, **extra: object) -> dict[str, object]:
    """An exporter config on the PostgreSQL ledger `dsn` (written to a 0600 file, as a
    deployment would mount it), as replica `instance`."""
    dsn_file = directory / "ledger-dsn"
    if not dsn_file.exists():
        dsn_file.write_text(dsn + "\n")
        dsn_file.chmod(0o600)
    config: dict[str, object] = {
        "ledger": {"backend": "postgres", "dsn_file": str(dsn_file), "instance": instance},
        "log": {"level": "WARNING"},
    }
    config.update(extra)
    return config


def count_events(dsn: str, where: str = "true") -> int:
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT COUNT(*) FROM events WHERE {where}").fetchone()
    assert row is not None
    return int(row[0])


def request_ids(dsn: str) -> set[str]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        return {r[0] for r in conn.execute("SELECT request_id FROM events")}
