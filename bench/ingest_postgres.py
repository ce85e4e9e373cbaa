"""Ingest throughput on the PostgreSQL ledger, one and two replicas, beside SQLite, in one run.

Targets, each measured with wrk (8 connections per replica) on the bodies of
bench/ingest_throughput.py (one ~300 B event, or a batch of 100 events; a request_id unique
per event):
  sqlite        one exporter, SQLite ledger (WAL, synchronous=NORMAL): the embedded default
  postgres x1   one exporter on the PostgreSQL ledger
  postgres x2   two exporters (two instance names) on the same database, one wrk each, at
                the same time; events/s is their sum
Ratios: postgres x1 / sqlite, and postgres x2 / postgres x1 (how much a second replica adds
on this machine, where the database, both replicas and wrk share the same cores).

PostgreSQL is $BENCH_PG_DSN (a role that may CREATE DATABASE; a fresh database is created and
dropped), else $LLM_EXPORTER_TEST_PG_DSN, else a private cluster started with
scripts/pg-test-cluster.sh in a temp dir (Debian's postgresql package) and stopped after.
The server runs with its defaults (fsync and synchronous_commit on).

After the runs every exporter is stopped gracefully and the ledgers are checked: each event
acknowledged with 202 is stored, and the running totals equal the events stored.

    .venv/bin/python bench/ingest_postgres.py [--seconds 8] [--connections 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from benchlib import (
    HOST,
    REPO,
    Server,
    cpu_seconds,
    exporter_cmd,
    fmt_ratio,
    free_port,
    print_table,
    rmtree,
    write_config,
    wrk,
)
from ingest_throughput import body_pieces, count_ledger, write_lua

SCRIPT = REPO / "scripts" / "pg-test-cluster.sh"


@dataclass
class Result:
    target: str
    kind: str
    events_per_request: int
    runs: list[dict[str, float]]
    cpu_s: float

    @property
    def eps(self) -> float:
        return sum(r["n2xx"] / (r["duration_us"] / 1e6) for r in self.runs) * \
            self.events_per_request

    @property
    def p99_ms(self) -> float:
        return max(r["p99_us"] for r in self.runs) / 1000

    @property
    def errors(self) -> int:
        return int(sum(r["nother"] + r["socket_errors"] for r in self.runs))


class Postgres:
    """A database of our own on the configured server, or on a private throwaway cluster."""

    def __init__(self, tmp: Path) -> None:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        self._data: Path | None = None
        admin = os.environ.get("BENCH_PG_DSN") or os.environ.get("LLM_EXPORTER_TEST_PG_DSN")
        if not admin:
            self._data = tmp / "pg"
            self._data.mkdir()
            out = subprocess.run(["bash", str(SCRIPT), "start", str(self._data),
                                  str(free_port())], capture_output=True, text=True,
                                 timeout=120, check=True).stdout
            admin = next(line.split("=", 1)[1].strip("'") for line in out.splitlines()
                         if line.startswith("export LLM_EXPORTER_TEST_PG_DSN="))
        self.admin = admin
        self.name = f"llm_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
            self.version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            self.settings = {k: conn.execute(f"SHOW {k}").fetchone()[0]  # type: ignore[index]
                             for k in ("fsync", "synchronous_commit", "shared_buffers")}
        params = conninfo_to_dict(admin)
        params["dbname"] = self.name
        self.dsn = make_conninfo(**params)

    def counts(self) -> tuple[int, int, int]:
        import psycopg

        with psycopg.connect(self.dsn) as conn:
            events = conn.execute("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM events"
                                  ).fetchone()
            totals = conn.execute("SELECT COALESCE(SUM(requests), 0) FROM totals").fetchone()
        assert events is not None and totals is not None
        return int(events[0]), int(events[1]), int(totals[0])

    def close(self) -> None:
        import psycopg

        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        if self._data is not None:
            subprocess.run(["bash", str(SCRIPT), "stop", str(self._data)],
                           capture_output=True, timeout=90, check=False)


def pg_config(path: Path, dsn_file: Path, instance: str) -> Path:
    path.write_text(
        f"ledger: {{backend: postgres, dsn_file: {json.dumps(str(dsn_file))}, "
        f"instance: {instance}, pool_size: 4}}\n"
        "labels: {max_values_per_label: 500}\nlog: {level: WARNING}\n"
        "budgets:\n"
        "  - {department: engineering, project: ai-features, daily_usd: 300}\n"
        "  - {department: data-science, project: \"*\", daily_usd: 100}\n")
    return path


def measure(target: str, servers: list[Server], lua: Path, kind: str, n: int,
            args: argparse.Namespace, seconds: int) -> Result:
    """One wrk per server, all at once; events/s summed over them."""
    runs: list[dict[str, float]] = [{} for _ in servers]
    cpu0 = [cpu_seconds(s.pid) for s in servers]

    def one(i: int, server: Server) -> None:
        runs[i] = wrk(f"http://{HOST}:{server.port}/v1/usage", lua,
                      connections=args.connections, seconds=seconds,
                      env={"BENCH_RUN": f"{target.replace(' ', '')}-{i}-{kind}-{time.time()}"})

    threads = [threading.Thread(target=one, args=(i, s)) for i, s in enumerate(servers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = sum(cpu_seconds(s.pid) - c for s, c in zip(servers, cpu0, strict=True))
    return Result(target, kind, n, runs, cpu)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=8, help="wrk duration per measured run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--connections", "-c", type=int, default=8, help="per replica")
    p.add_argument("--batch", type=int, default=100)
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-pg-"))
    tmp.chmod(0o755)  # a private cluster's data dir below it belongs to the postgres user
    lua = {"single": write_lua(tmp / "single.lua", body_pieces(1, True)),
           "batch": write_lua(tmp / "batch.lua", body_pieces(args.batch, True))}
    sizes = {"single": 1, "batch": args.batch}
    pg = Postgres(tmp)
    dsn_file = tmp / "dsn"
    dsn_file.write_text(pg.dsn)
    db = tmp / "ledger.db"
    servers: dict[str, list[Server]] = {}
    for name, configs in (
            ("sqlite", [write_config(tmp / "sqlite.yaml", db)]),
            ("postgres x1", [pg_config(tmp / "pg-solo.yaml", dsn_file, "solo")]),
            ("postgres x2", [pg_config(tmp / f"pg-{x}.yaml", dsn_file, f"replica-{x}")
                             for x in ("a", "b")])):
        servers[name] = []
        for i, config in enumerate(configs):
            port = free_port()
            servers[name].append(Server(f"{name}[{i}]", exporter_cmd(config, port), port,
                                        tmp / f"{config.stem}.log", ready_path="/readyz"))
    print(f"# ingest on PostgreSQL vs SQLite: wrk -c{args.connections} per replica, "
          f"{args.seconds}s per run; batch = {args.batch} events; request_id unique per event")
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; python "
          f"{sys.version.split()[0]}; PostgreSQL {pg.version} "
          f"({', '.join(f'{k}={v}' for k, v in pg.settings.items())}) on loopback, same host")

    results: list[Result] = []
    acked: dict[str, int] = {}
    try:
        for name, group in servers.items():
            for s in group:
                s.start()
            for kind in ("single", "batch"):
                if args.warmup:
                    warm = measure(name, group, lua[kind], kind, sizes[kind], args,
                                   args.warmup)
                    acked[name] = acked.get(name, 0) + _accepted(warm)
                r = measure(name, group, lua[kind], kind, sizes[kind], args, args.seconds)
                acked[name] = acked.get(name, 0) + _accepted(r)
                results.append(r)
                print(f"  {name:<12} {kind:<6} {r.eps:>10,.0f} events/s  "
                      f"errors {r.errors}", flush=True)
            time.sleep(0.5)  # commits of requests wrk abandoned at its deadline
            for s in group:
                s.stop()
        checks = _durability(servers, acked, db, pg)
    finally:
        for group in servers.values():
            for s in group:
                s.stop()
        pg.close()

    by = {(r.target, r.kind): r for r in results}
    print()
    print_table(["target", "kind", "events/s", "req/s", "p99 ms", "CPU us/event (exporters)",
                 "errors"],
                [[r.target, r.kind, r.eps, r.eps / r.events_per_request, r.p99_ms,
                  1e6 * r.cpu_s / max(1.0, r.eps * args.seconds), r.errors] for r in results])
    print("\nratios (same run):")
    rows = []
    for kind in ("single", "batch"):
        s, p1, p2 = (by[(t, kind)].eps for t in ("sqlite", "postgres x1", "postgres x2"))
        rows.append([kind, fmt_ratio(p1, s), fmt_ratio(p2, p1), fmt_ratio(p2, s)])
    print_table(["kind", "postgres x1 / sqlite", "postgres x2 / postgres x1",
                 "postgres x2 / sqlite"], rows)
    print("\ndurability (ledgers read after a graceful stop):")
    print_table(["ledger", "acknowledged", "events stored", "distinct ids", "totals.requests",
                 "verdict"], checks)
    rmtree_quiet(tmp)
    return 0 if all(row[-1] == "OK" for row in checks) else 1


def _accepted(r: Result) -> int:
    return int(sum(run["accepted"] for run in r.runs))


def _durability(servers: dict[str, list[Server]], acked: dict[str, int], db: Path,
                pg: Postgres) -> list[list[object]]:
    # Acknowledged events must all be stored; extra ones can only be requests wrk sent but
    # had not seen answered when its timer ran out (committed, never acknowledged).
    events, totals, distinct = count_ledger(db)
    rows: list[list[object]] = [["sqlite", acked["sqlite"], events, distinct, totals,
                                 "OK" if acked["sqlite"] <= events == totals == distinct
                                 else "FAILED"]]
    pg_acked = acked["postgres x1"] + acked["postgres x2"]
    events, distinct, totals = pg.counts()
    rows.append(["postgres", pg_acked, events, distinct, totals,
                 "OK" if pg_acked <= events == totals == distinct else "FAILED"])
    return rows


def rmtree_quiet(path: Path) -> None:
    try:
        rmtree(path)
    except OSError as exc:  # a private cluster's files belong to another user
        print(f"(temp dir {path} left behind: {exc})", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
