"""Start-up time (spawn -> /readyz 200) with big ledgers, and RSS while ingesting 1M events.

Ledgers are generated quickly with SQL inside SQLite (a recursive CTE, no Python per row):
the schema comes from the exporter's own migrations (SQLiteLedger creates the file), the
`events` columns are read with PRAGMA table_info (a column this script does not know gets its
default, or 0), and `totals`, `spend_slots` and `latency_totals` are then aggregated from
`events` exactly as the ledger would have kept them. Events: --projects x 10 departments x
5 models x 2 outcomes label sets (10,000 series by default) spread over the last 35 days.
The generated ledger is checked through the ledger API (its running totals must count every
event) before it is timed.

For each size (0 = an empty ledger, the baseline) the exporter is started --repeat times and
the median time from spawn to the first /readyz 200 is reported, with its RSS then. The
shared no-op FastAPI app (../shared/bench/noop_api.py) is started the same way as the
"bare Python web service" floor. Then, on the server started on the first non-empty
ledger, --ingest-events events with unique request_ids are posted through POST /v1/usage
(batches of --batch, --clients connections) and RSS is sampled as they go: memory must not
grow with the number of events.

    .venv/bin/python bench/startup.py [--sizes 0 1000000] [--repeat 3]
        [--ingest-events 1000000]
    .venv/bin/python bench/startup.py --sizes 0 1000000 10000000   # 10M: ~2-4 min more
Big ledger files are deleted at the end (--keep to keep them).
"""

from __future__ import annotations

import argparse
import http.client
import json
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import (
    HOST,
    Server,
    exporter_cmd,
    fmt_ratio,
    free_port,
    http_get,
    noop_cmd,
    print_table,
    pss_mb,
    rmtree,
    rss_mb,
    verdict,
    write_config,
)

TARGET_STARTUP_S = 2.0
TARGET_STARTUP_AT = 10_000_000
TARGET_RSS_MB = 150.0
SPAN_S = 35 * 86400
MODELS = [("openai", "gpt-4o-2024-08-06"), ("openai", "gpt-4o-mini-2024-07-18"),
          ("anthropic", "claude-sonnet-4-5"), ("gemini", "gemini-2.5-pro"),
          ("deepseek", "deepseek-chat")]
# pico-USD per token: $2.50 / $1.25 / $10.00 per 1M input / cache-read / output tokens.
COST_PICO = "({input} * 2500000 + {cache_read} * 1250000 + {output} * 10000000)"
COST_PICO_COLS = COST_PICO.format(input="input", cache_read="cache_read", output="output")
BUDGETS = (
    "  - {department: dept-00, project: project-000, daily_usd: 300, monthly_usd: 5000}\n"
    "  - {department: dept-01, project: \"*\", daily_usd: 100, monthly_usd: 2000,"
    " timezone: Asia/Ho_Chi_Minh}\n"
)


# -- ledger generation ------------------------------------------------------------------------
def event_exprs(n: int, projects: int, t0: float) -> dict[str, str]:
    """SQL expression per events column, in terms of the row number i (1..n)."""
    models = " ".join(f"WHEN {k} THEN '{p}'" for k, (p, _) in enumerate(MODELS))
    names = " ".join(f"WHEN {k} THEN '{m}'" for k, (_, m) in enumerate(MODELS))
    ts = f"({t0} + (i * {SPAN_S}.0 / {n}))"
    return {
        "request_id": "printf('g-%012d', i)",
        "ts": ts,
        "department": "printf('dept-%02d', i % 10)",
        "project": f"printf('project-%03d', (i / 10) % {projects})",
        "provider": f"CASE (i / 7) % {len(MODELS)} {models} END",
        "model": f"CASE (i / 7) % {len(MODELS)} {names} END",
        "user_name": "printf('user-%04d', i % 1000)",
        "outcome": "CASE WHEN (i / 3) % 20 = 0 THEN 'error' ELSE 'success' END",
        "input": "1000 + i % 5000",
        "cache_read": "CASE WHEN i % 2 = 0 THEN 512 ELSE 0 END",
        "cache_write": "0",
        "cache_write_1h": "0",
        "output": "100 + i % 400",
        "reasoning": "CASE WHEN i % 4 = 0 THEN 50 ELSE 0 END",
        "priced": "1",
        "price_source": "'bench: generated'",
        "latency_seconds": "0.1 + (i % 100) / 10.0",
        "source": "'ingest'",
        "recorded_at": ts,
    }


def generate(path: Path, n: int, projects: int) -> tuple[float, float]:
    """Write a ledger of n events; (seconds to write it, seconds its upgrade took).

    The events are written in the layout of schema version 4, one wide `events` table, by
    SQL alone; opening the file with SQLiteLedger then runs the later migrations (version 5
    moves the strings into label_sets), as an exporter upgraded on an old ledger would.
    """
    from llm_cost_exporter.ledger.migrations import migrate
    from llm_cost_exporter.ledger.sqlite import SQLiteLedger

    t_start = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, target=4)
    conn.close()
    t0 = time.time() - SPAN_S
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")
    exprs = event_exprs(n, projects, t0)
    pico = COST_PICO.format(**{k: f"({exprs[k]})" for k in ("input", "cache_read", "output")})
    exprs["cost_usd"] = f"printf('%d.%012d', {pico} / 1000000000000, {pico} % 1000000000000)"
    cols, values = [], []
    for _, name, _type, notnull, default, pk in conn.execute("PRAGMA table_info(events)"):
        if pk:
            continue
        if name in exprs:
            cols.append(name)
            values.append(exprs[name])
        elif notnull and default is None:
            cols.append(name)
            values.append("0")  # a column added after this script was written
    conn.execute("BEGIN")
    conn.execute(
        f"WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {n}) "
        f"INSERT INTO events ({', '.join(cols)}) SELECT {', '.join(values)} FROM c")
    _aggregate(conn)
    conn.execute("COMMIT")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    t_upgrade = time.perf_counter()
    SQLiteLedger(path).close()  # migrates to the current schema
    upgrade = time.perf_counter() - t_upgrade
    ledger = SQLiteLedger(path)  # must open, and its totals must count every event
    counted = sum(t.requests for t in ledger.totals().series.values())
    ledger.close()
    if counted != n:
        raise SystemExit(f"generated ledger counts {counted} events in totals, wanted {n}")
    return time.perf_counter() - t_start, upgrade


def _aggregate(conn: sqlite3.Connection) -> None:
    from llm_cost_exporter.ledger.base import LATENCY_BUCKETS

    event_cols = {r[1] for r in conn.execute("PRAGMA table_info(events)")}
    known = {
        "department": "department", "project": "project", "provider": "provider",
        "model": "model", "outcome": "outcome", "requests": "COUNT(*)",
        "input": "SUM(input)", "cache_read": "SUM(cache_read)",
        "cache_write": "SUM(cache_write)", "output": "SUM(output)",
        "reasoning": "SUM(reasoning)", "unpriced": "SUM(1 - priced)",
        "cost_usd": f"printf('%d.%012d', SUM({COST_PICO_COLS}) / 1000000000000, "
                    f"SUM({COST_PICO_COLS}) % 1000000000000)",
    }
    cols, values = [], []
    for _, name, _type, notnull, default, _pk in conn.execute("PRAGMA table_info(totals)"):
        if name in known:
            cols.append(name)
            values.append(known[name])
        elif name in event_cols:
            cols.append(name)
            values.append(f"SUM({name})")
        elif notnull and default is None:
            cols.append(name)
            values.append("0")
    conn.execute(f"INSERT INTO totals ({', '.join(cols)}) SELECT {', '.join(values)} FROM events"
                 " GROUP BY department, project, provider, model, outcome")
    conn.execute(f"INSERT INTO spend_slots (department, project, slot, cost_pico) "
                 f"SELECT department, project, CAST(ts AS INTEGER) / 900 * 900,"
                 f" SUM({COST_PICO_COLS}) FROM events GROUP BY 1, 2, 3")
    hist: dict[tuple[str, str], tuple[list[int], float, int]] = {}
    for provider, model, latency, count in conn.execute(
            "SELECT provider, model, latency_seconds, COUNT(*) FROM events"
            " WHERE latency_seconds IS NOT NULL GROUP BY 1, 2, 3"):
        counts, total, n = hist.setdefault((provider, model),
                                           ([0] * (len(LATENCY_BUCKETS) + 1), 0.0, 0))
        index = next((k for k, b in enumerate(LATENCY_BUCKETS) if latency <= b),
                     len(LATENCY_BUCKETS))
        counts[index] += count
        hist[(provider, model)] = (counts, total + latency * count, n + count)
    conn.executemany("INSERT INTO latency_totals (provider, model, counts, total, count)"
                     " VALUES (?,?,?,?,?)",
                     [(p, m, json.dumps(c), t, k) for (p, m), (c, t, k) in hist.items()])


# -- ingest through the API ------------------------------------------------------------------
def batch_body(run: str, start: int, size: int, ts: float) -> bytes:
    parts = []
    for k in range(start, start + size):
        parts.append(
            f'{{"request_id":"{run}-{k}","timestamp":{ts},"department":"dept-{k % 10:02d}",'
            f'"project":"project-{(k // 10) % 100:03d}","provider":"openai",'
            f'"model":"gpt-4o-mini-2024-07-18","usage":{{"prompt_tokens":{1200 + k % 500},'
            f'"completion_tokens":321,"prompt_tokens_details":{{"cached_tokens":1024}}}},'
            f'"latency_seconds":0.8}}')
    return ("[" + ",".join(parts) + "]").encode()


def ingest(server: Server, total: int, batch: int, clients: int,
           samples: int = 10) -> list[tuple[int, float, float, float, float]]:
    """Post `total` events; returns (events acked, seconds, RSS MB, peak MB) samples."""
    run = f"i{int(time.time())}"
    ts = time.time() - 60
    next_start = [0]
    acked = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
        try:
            while not errors:
                with lock:
                    start = next_start[0]
                    if start >= total:
                        return
                    next_start[0] += batch
                size = min(batch, total - start)
                conn.request("POST", "/v1/usage", batch_body(run, start, size, ts),
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                answer = resp.read()
                if resp.status != 202:
                    errors.append(f"{resp.status} {answer[:200]!r}")
                    return
                with lock:
                    acked[0] += int(json.loads(answer)["accepted"])
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    t0 = time.perf_counter()
    timeline = [(0, 0.0, *rss_mb(server.pid), pss_mb(server.pid))]
    for t in threads:
        t.start()
    step = max(1, total // samples)
    next_mark = step
    deadline = time.monotonic() + 900
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.05)
        done = acked[0]
        if next_mark <= done < total:
            timeline.append((done, time.perf_counter() - t0, *rss_mb(server.pid),
                             pss_mb(server.pid)))
            next_mark = (done // step + 1) * step
    for t in threads:
        t.join(5)
    if errors:
        raise SystemExit(f"ingest failed: {errors[0]}")
    timeline.append((acked[0], time.perf_counter() - t0, *rss_mb(server.pid),
                     pss_mb(server.pid)))
    return timeline


# -- main -------------------------------------------------------------------------------------
def time_start(name: str, cmd: list[str], port: int, log: Path, ready: str,
               repeat: int, scrape: bool = False) -> tuple[list[float], float, float]:
    """Start `repeat` times; (ready times, RSS at the last ready, its first /metrics seconds)."""
    times, rss, first_scrape = [], float("nan"), float("nan")
    for _ in range(repeat):
        server = Server(name, cmd, port, log, ready_path=ready)
        try:
            times.append(server.start(timeout=120))
            rss = rss_mb(server.pid)[0]
            if scrape:
                t0 = time.perf_counter()
                status, _ = http_get(port, "/metrics", timeout=120)
                first_scrape = time.perf_counter() - t0 if status == 200 else float("nan")
        finally:
            server.stop()
    return times, rss, first_scrape


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[0, 1_000_000],
                   help="events per ledger (0 = empty ledger baseline)")
    p.add_argument("--projects", type=int, default=100,
                   help="projects per department (series = 10 x projects x 5 models x 2)")
    p.add_argument("--repeat", type=int, default=3, help="starts per ledger (median)")
    p.add_argument("--ingest-events", type=int, default=1_000_000,
                   help="events to post through the API after start (0: skip)")
    p.add_argument("--batch", type=int, default=1000, help="events per POST when ingesting")
    p.add_argument("--clients", type=int, default=4, help="concurrent connections when ingesting")
    p.add_argument("--dir", help="where to put the ledgers (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the generated ledgers")
    args = p.parse_args()

    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-startup-"))
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"# start-up: sizes {args.sizes}, median of {args.repeat} starts; python "
          f"{sys.version.split()[0]}; dir {tmp}", flush=True)
    rows: list[list[object]] = []
    results: dict[int, float] = {}
    timeline: list[tuple[int, float, float, float, float]] = []
    try:
        port = free_port()
        floor_times, floor_rss, _ = time_start("noop-floor", noop_cmd(port), port,
                                            tmp / "noop.log", "/docs", args.repeat)
        floor_med = statistics.median(floor_times)
        rows.append(["no-op FastAPI floor", "-", "-", "-", "-", floor_med, min(floor_times),
                     max(floor_times), "1.000", floor_rss, "-"])
        base_med = float("nan")
        for n in args.sizes:
            db = tmp / f"ledger-{n}.db"
            gen_s, upgrade_s = generate(db, n, args.projects) if n else (_empty(db), 0.0)
            size_mb = sum(f.stat().st_size for f in tmp.glob(f"ledger-{n}.db*")) / 1e6
            with sqlite3.connect(db) as conn:
                series = int(conn.execute("SELECT COUNT(*) FROM totals").fetchone()[0])
            config = write_config(tmp / f"config-{n}.yaml", db, budgets=BUDGETS)
            port = free_port()
            cmd = exporter_cmd(config, port)
            times, rss, first_scrape = time_start("exporter", cmd, port,
                                                  tmp / f"exporter-{n}.log", "/readyz",
                                                  args.repeat, scrape=True)
            med = statistics.median(times)
            results[n] = med
            if n == 0:
                base_med = med
            rows.append([f"exporter, {n:,} events", series, f"{size_mb:,.0f}", gen_s,
                         fmt_ratio(med, base_med), med, min(times), max(times),
                         fmt_ratio(med, floor_med), rss, first_scrape])
            print(f"  {n:,} events: generated in {gen_s:.1f} s (of which the one-time upgrade "
                  f"to the current schema: {upgrade_s:.1f} s), ready in {med:.3f} s "
                  "(median)", flush=True)
            if n and args.ingest_events and not timeline:
                server = Server("exporter", cmd, port, tmp / f"exporter-{n}.log",
                                ready_path="/readyz")
                try:
                    server.start(timeout=120)
                    timeline = ingest(server, args.ingest_events, args.batch, args.clients)
                finally:
                    server.stop()
            if n >= 5_000_000 and not args.keep:
                _remove_ledger(tmp, n)  # free the disk before the next size
    finally:
        if not args.keep and not args.dir:
            rmtree(tmp)
        elif not args.keep:
            for f in tmp.glob("ledger-*.db*"):
                f.unlink()

    print()
    print_table(["what", "series", "file MB", "generate s", "vs empty", "ready s (med)", "min",
                 "max", "vs floor", "RSS MB at ready", "1st /metrics s"], rows)
    print("(ready s = spawn of the process to the first 200 of /readyz, polled every 5 ms; "
          "vs empty = ratio to the exporter on an empty ledger; vs floor = ratio to the no-op "
          "FastAPI app's spawn to first 200; 1st /metrics s = the first scrape after the last "
          "start, budget spend included)")
    if timeline:
        print(f"\nRSS while ingesting {args.ingest_events:,} events through POST /v1/usage "
              f"(batches of {args.batch}, {args.clients} connections), on the "
              f"{min(n for n in args.sizes if n):,}-event ledger:")
        print_table(["events acked", "seconds", "events/s", "RSS MB", "peak MB", "PSS MB"],
                    [[a, s, a / s if s else float("nan"), r, h, pss]
                     for a, s, r, h, pss in timeline])
        print("(the exporter's processes summed: the server and its ledger writer; RSS counts "
              "pages they share twice, PSS once)")
    print("\ntargets:")
    checks: list[list[object]] = []
    for n, med in results.items():
        if n >= TARGET_STARTUP_AT or (n and n == max(results)):
            checks.append([f"start-up at {n:,} events", f"{med:.3f} s",
                           f"<= {TARGET_STARTUP_S} s at {TARGET_STARTUP_AT:,}",
                           verdict(med <= TARGET_STARTUP_S)])
    if timeline:
        start_rss, end_rss = timeline[0][2], timeline[-1][2]
        warm = timeline[1][2] if len(timeline) > 2 else start_rss  # after the first ~10%
        peak = max(h for _, _, _, h, _ in timeline)
        checks.append(["RSS after start / after ingest (peak)",
                       f"{start_rss:.1f} / {end_rss:.1f} ({peak:.1f}) MB",
                       f"< {TARGET_RSS_MB:.0f} MB", verdict(max(end_rss, peak) < TARGET_RSS_MB)])
        checks.append([f"RSS growth from {timeline[1][0]:,} to {timeline[-1][0]:,} events",
                       f"{end_rss - warm:+.1f} MB", "~0 (flat; < 5% of RSS)",
                       verdict(end_rss - warm < 0.05 * warm)])
    print_table(["measure", "value", "target", "verdict"], checks)
    return 0


def _empty(db: Path) -> float:
    from llm_cost_exporter.ledger.sqlite import SQLiteLedger

    t0 = time.perf_counter()
    SQLiteLedger(db).close()
    return time.perf_counter() - t0


def _remove_ledger(folder: Path, n: int) -> None:
    for f in folder.glob(f"ledger-{n}.db*"):
        f.unlink()


if __name__ == "__main__":
    raise SystemExit(main())
