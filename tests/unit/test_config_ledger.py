"""The ledger section: backends, the DSN as a secret that never shows, instance names."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from llm_cost_exporter.cli import main
from llm_cost_exporter.config import parse_config
from llm_cost_exporter.validation import ConfigError

DSN = "postgresql://exporter:s3cret-pw@db.internal:5432/llm"


def problems(data: dict[str, object], tmp_path: Path,
             env: dict[str, str] | None = None) -> set[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(data, tmp_path, env=env or {})
    return set(err.value.problems)


def test_postgres_from_a_dsn_file_or_env(tmp_path: Path) -> None:
    (tmp_path / "dsn").write_text(DSN + "\n")
    cfg = parse_config({"ledger": {"backend": "postgres", "dsn_file": "dsn",
                                   "instance": "exporter-a", "pool_size": 6}}, tmp_path, env={})
    assert (cfg.ledger.backend, cfg.ledger.dsn, cfg.ledger.instance, cfg.ledger.pool_size) == (
        "postgres", DSN, "exporter-a", 6)
    cfg = parse_config({"ledger": {"backend": "postgres", "dsn_env": "PG"}}, tmp_path,
                       env={"PG": DSN, "LLM_EXPORTER_INSTANCE": "from-env"})
    assert (cfg.ledger.dsn, cfg.ledger.instance) == (DSN, "from-env")
    # Neither in config nor in the environment: the host name (a pod's name).
    cfg = parse_config({"ledger": {"backend": "postgres", "dsn_env": "PG"}}, tmp_path,
                       env={"PG": DSN})
    assert cfg.ledger.instance == socket.gethostname()


def test_the_password_never_shows(tmp_path: Path) -> None:
    cfg = parse_config({"ledger": {"backend": "postgres", "dsn_env": "PG",
                                   "instance": "a"}}, tmp_path, env={"PG": DSN})
    for text in (repr(cfg), repr(cfg.ledger), cfg.ledger.describe()):
        assert "s3cret-pw" not in text
    assert cfg.ledger.describe() == "postgres db.internal:5432/llm as exporter (instance a)"
    # A malformed DSN is reported without echoing it (psycopg's own message would).
    bad = problems({"ledger": {"backend": "postgres", "dsn_env": "PG"}}, tmp_path,
                   env={"PG": "host=db password=s3cret-pw oops"})
    assert bad == {"ledger.dsn_env: not a valid PostgreSQL connection string (key=value pairs "
                   "or a postgresql:// URI)"}


def test_every_ledger_problem_is_reported_with_its_path(tmp_path: Path) -> None:
    assert problems({"ledger": {"backend": "postgres", "dsn": DSN, "path": "x.db",
                                "pool_size": 1, "instance": "has space"}}, tmp_path) == {
        "ledger.dsn: inline secrets are not allowed: use dsn_env or dsn_file",
        "ledger: backend postgres needs dsn_env or dsn_file (a libpq connection string or "
        "postgresql:// URI; never inline, it holds a password)",
        "ledger.path: only used with backend: sqlite",
        "ledger.pool_size: must be >= 2 and <= 100",
        "ledger.instance: must be 1-128 characters of [A-Za-z0-9._:@-], starting with a "
        "letter or digit",
    }
    assert problems({"ledger": {"backend": "postgres", "dsn_env": "NOPE",
                                "dsn_file": "missing"}}, tmp_path,
                    env={"LLM_EXPORTER_INSTANCE": "-bad"}) == {
        "ledger: set only one of dsn_env and dsn_file",
        "ledger.dsn_env: environment variable NOPE is not set",
        "ledger.instance (from $LLM_EXPORTER_INSTANCE): must be 1-128 characters of "
        "[A-Za-z0-9._:@-], starting with a letter or digit",
    }
    assert problems({"ledger": {"dsn_file": "dsn", "pool_size": 3}}, tmp_path) == {
        "ledger.dsn_file: only used with backend: postgres",
        "ledger.pool_size: only used with backend: postgres",
    }


def test_check_config_shows_the_ledger_without_secrets(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "dsn").write_text(DSN)
    config = tmp_path / "c.yaml"
    config.write_text("ledger: {backend: postgres, dsn_file: dsn, instance: replica-1}\n")
    assert main(["check-config", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "ledger: postgres db.internal:5432/llm as exporter (instance replica-1)" in out
    assert "s3cret" not in out


def test_sqlite_writer_process_switch(tmp_path: Path) -> None:
    assert parse_config({}, tmp_path, env={}).ledger.writer_process is True
    cfg = parse_config({"ledger": {"writer_process": False}}, tmp_path, env={})
    assert cfg.ledger.writer_process is False
    assert problems({"ledger": {"writer_process": "no"}}, tmp_path) == {
        "ledger.writer_process: must be true or false"}
    assert problems({"ledger": {"backend": "postgres", "dsn_env": "PG",
                                "writer_process": True}}, tmp_path, env={"PG": DSN}) == {
        "ledger.writer_process: only used with backend: sqlite"}
