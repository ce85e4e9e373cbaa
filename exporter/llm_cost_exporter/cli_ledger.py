"""Ledger commands: `migrate` and `copy-ledger` (SQLite -> PostgreSQL)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llm_cost_exporter.validation import ConfigError


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate = sub.add_parser("migrate", help="bring the configured ledger's schema up to date "
                                             "(serve also does this at start)")
    migrate.add_argument("--config", type=Path, required=True)
    copy = sub.add_parser("copy-ledger", help="copy a SQLite ledger's events into the "
                                              "configured PostgreSQL ledger (idempotent)")
    copy.add_argument("--from-sqlite", type=Path, required=True, metavar="PATH")
    copy.add_argument("--config", type=Path, required=True,
                      help="config with ledger.backend: postgres; its instance name receives "
                           "the copied running totals")


def migrate(path: Path) -> int:
    from llm_cost_exporter.config import load_config
    from llm_cost_exporter.ledger.factory import migrate_ledger

    cfg = load_config(path)
    # Before, not only after: SQLite's upgrade to schema 5 copies the events, 4-7 s per
    # million of them; a big ledger would otherwise sit silent for minutes.
    print(f"{cfg.ledger.describe()}: checking the schema; an upgrade of a big ledger can "
          "take minutes", flush=True)
    try:
        before, after = migrate_ledger(cfg.ledger)
    except RuntimeError as exc:  # a schema newer than this exporter
        print(f"error: {exc}", file=sys.stderr)
        return 1
    where = cfg.ledger.describe()
    if before == after:
        print(f"{where}: schema version {after}, up to date")
    else:
        print(f"{where}: schema version {before} -> {after} "
              f"({after - before} migration(s) applied)")
    return 0


def copy_ledger(source: Path, path: Path) -> int:
    from llm_cost_exporter.config import load_config
    from llm_cost_exporter.ledger.factory import open_ledger
    from llm_cost_exporter.ledger.pg_copy import copy_sqlite_ledger

    cfg = load_config(path)
    if cfg.ledger.backend != "postgres":
        raise ConfigError([f"ledger.backend: copy-ledger copies into PostgreSQL; {path} uses "
                           f"{cfg.ledger.backend}"])
    if not source.is_file():
        print(f"error: {source}: no such file", file=sys.stderr)
        return 2
    # Opening claims the instance name: refused while a replica with that name runs, whose
    # in-memory counters would not see the copied totals.
    ledger = open_ledger(cfg.ledger, claim_timeout=2.0)
    try:
        report = copy_sqlite_ledger(source, ledger, progress=lambda r: print(
            f"  {r.read} events read", file=sys.stderr))
    finally:
        ledger.close()
    print(f"copied {source} into {cfg.ledger.describe()}: {report.read} events read, "
          f"{report.copied} copied (${report.cost_copied.normalize():f}), "
          f"{report.already_present} already present, {report.keys_copied} Idempotency-Keys "
          "copied")
    return 0
