"""Where an ingested event's CPU goes: each pipeline stage timed in-process, per event.

No HTTP: the same 100-event OpenAI-style batches as ingest_throughput.py go through
decode_body (msgspec) -> parse_events -> Recorder.prepare (Pricer.price + LabelGuard.labels_for) ->
SQLiteLedger.record (one batch per commit, and 8 batches per commit as group commit does with
8 connections). By default every event has a unique request_id with a random head (like a
UUID); with --ids key no event has one and each batch carries an Idempotency-Key. The
sum is the single-core ceiling of POST /v1/usage for batches (events/s), before HTTP and
framework costs.

Floor in the same run: ../shared/bench/sqlite_bench.py (WAL, synchronous NORMAL, 100 rows
per transaction, UNIQUE text key) for the ledger stage.

    .venv/bin/python bench/ingest_stages.py [--batches 300] [--batch 100] [--ids random|key]
                                            [--no-floor]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from benchlib import SHARED_BENCH, print_table, rmtree, write_config

TARGET_BATCH_EVENTS_PER_S = 100_000


def body(batch: int, tag: str, ts: str, ids: str) -> bytes:
    # request_id with a random head, as UUIDs have (see ingest_throughput.py --ids); with
    # --ids key none (the batch's Idempotency-Key makes retries safe instead)
    return json.dumps([{
        **({"request_id": f"{random.getrandbits(32):08x}-{tag}-{k}"} if ids == "random"
           else {}), "timestamp": ts,
        "department": "engineering",
        "project": f"checkout-bot-{k % 50:02d}", "user": f"user-{k % 97:04d}",
        "provider": "openai", "model": "gpt-4o-mini-2024-07-18",
        "usage": {"prompt_tokens": 1234 + k, "completion_tokens": 321,
                  "prompt_tokens_details": {"cached_tokens": 1024}},
        "latency_seconds": 0.8125, "status": 200} for k in range(batch)]).encode()


def per_event_us(fn: Callable[[int], object], calls: int, events_per_call: int,
                 rounds: int = 3) -> float:
    """Best-of-rounds mean time of fn(i) for i in range(calls), in us per event."""
    best = []
    for r in range(rounds):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(r * calls + i)
        best.append((time.perf_counter() - t0) / (calls * events_per_call) * 1e6)
    return min(best)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=300, help="batches per timed round")
    p.add_argument("--batch", type=int, default=100, help="events per batch")
    p.add_argument("--no-floor", action="store_true", help="skip sqlite_bench.py")
    p.add_argument("--ids", choices=["random", "key"], default="random",
                   help="random: a request_id per event with a random head (default); key: no "
                        "request_id, an Idempotency-Key per batch")
    args = p.parse_args()

    from llm_cost_exporter.config import load_config
    from llm_cost_exporter.events import Attribution
    from llm_cost_exporter.ingest import IngestLimits, decode_body, parse_events
    from llm_cost_exporter.labels import LabelGuard
    from llm_cost_exporter.ledger.base import BatchKey
    from llm_cost_exporter.ledger.sqlite import SQLiteLedger
    from llm_cost_exporter.price_db import GenAIPricesDB
    from llm_cost_exporter.pricer import Pricer
    from llm_cost_exporter.recorder import Recorder

    tmp = Path(tempfile.mkdtemp(prefix="bench-stages-"))
    # The same config as the HTTP benchmark's exporter (bundled price table, no overrides).
    config = load_config(write_config(tmp / "config.yaml", tmp / "unused.db"))
    ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    n, b = args.batches, args.batch
    rounds = 3
    raws = [body(b, f"st{int(time.time())}-{i}", ts, args.ids) for i in range(n * rounds)]
    # Keys as app.py makes them: the header's key and a digest of the body.
    keys = [BatchKey(f"{random.getrandbits(64):016x}-{i}", hashlib.sha256(r).digest())
            if args.ids == "key" else None for i, r in enumerate(raws)]
    defaults = Attribution("unattributed", "unattributed")
    limits = IngestLimits()
    now = datetime.now(UTC)
    pricer = Pricer(config.price_table, GenAIPricesDB())
    guard = LabelGuard(500)
    recorder = Recorder(pricer, guard, None)  # type: ignore[arg-type]  # prepare() only

    decoded = [decode_body(r) for r in raws]
    parsed = [parse_events(d, defaults=defaults, now=now, limits=limits) for d in decoded]
    prepared = [recorder.prepare(e) for e in parsed]
    for batch in prepared:  # as their commits would: the label values become admitted
        guard.settle(batch.ticket, range(len(batch)))
    stages: list[tuple[str, float]] = [
        ("decode_body (JSON)", per_event_us(lambda i: decode_body(raws[i]), n, b, rounds)),
        ("parse_events", per_event_us(
            lambda i: parse_events(decoded[i], defaults=defaults, now=now, limits=limits),
            n, b, rounds)),
        ("  Pricer.price", per_event_us(
            lambda i: [pricer.price(e) for e in parsed[i]], n, b, rounds)),
        ("  LabelGuard.labels_for", per_event_us(
            lambda i: [guard.labels_for(e) for e in parsed[i]], n, b, rounds)),
        ("Recorder.prepare (price + labels + PricedEvent)", per_event_us(
            lambda i: recorder.prepare(parsed[i]), n, b, rounds)),
    ]
    try:
        ledger = SQLiteLedger(tmp / "one.db")
        one = per_event_us(lambda i: ledger.record([prepared[i]], [keys[i]]), n, b, rounds)
        ledger.close()
        ledger = SQLiteLedger(tmp / "eight.db")
        eight = per_event_us(lambda i: ledger.record(prepared[8 * i:8 * i + 8],
                                                     keys[8 * i:8 * i + 8]),
                             n * rounds // 24, 8 * b, 3)
        ledger.close()
    finally:
        rmtree(tmp)
    stages += [("SQLiteLedger.record, 1 batch per commit", one),
               ("SQLiteLedger.record, 8 batches per commit", eight)]

    main_thread = stages[0][1] + stages[1][1] + stages[4][1]
    total = main_thread + eight
    in_sum = {stages[0][0], stages[1][0], stages[4][0], stages[6][0]}
    print(f"# ingest stages, in-process: {n} batches of {b} events per round, best of "
          f"{rounds} rounds; python {sys.version.split()[0]}; "
          + ("a random request_id per event" if args.ids == "random"
             else "an Idempotency-Key per batch"))
    print_table(["stage", "us/event", "share", "events/s if alone"],
                [[name, us, f"{100 * us / total:.0f}%" if name in in_sum else "", 1e6 / us]
                 for name, us in stages])
    print_table(["sum", "us/event", "events/s on one core", "target", "headroom"], [
        ["decode + parse + prepare (event loop)", main_thread, 1e6 / main_thread, "", ""],
        ["+ ledger, group commit (writer)", total, 1e6 / total,
         f">= {TARGET_BATCH_EVENTS_PER_S:,}/s", f"{1e6 / total / TARGET_BATCH_EVENTS_PER_S:.2f}x"],
    ])
    print("(indented rows are parts of Recorder.prepare; share = part of the sum below; the "
          "event loop and the ledger-writer thread share the GIL, so the sum is close to what "
          "one process can do)")
    if not args.no_floor:
        floor = sqlite_floor()
        print(f"\nSQLite floor (sqlite_bench.py: WAL, NORMAL, 100 rows/txn, UNIQUE key, ~100 B "
              f"rows): {floor:,.0f} rows/s = {1e6 / floor:.2f} us/row; ours "
              f"{eight:.2f} us/event = {eight * floor / 1e6:.1f}x the floor")
    return 0


def sqlite_floor() -> float:
    out = Path(tempfile.mkdtemp(prefix="bench-sqlite-"))
    try:
        subprocess.run([sys.executable, str(SHARED_BENCH / "sqlite_bench.py"), "--dir",
                        str(out / "db"), "--rows", "300000", "--max-seconds", "8", "--sync",
                        "NORMAL", "--batch", "100", "--key", "unique", "--json-out",
                        str(out / "r.jsonl")], check=True, capture_output=True, text=True,
                       timeout=120)
        res = [json.loads(line) for line in (out / "r.jsonl").read_text().splitlines()]
        return statistics.median(float(r["rows_per_s"]) for r in res)
    finally:
        rmtree(out)


if __name__ == "__main__":
    raise SystemExit(main())
