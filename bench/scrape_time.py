"""GET /metrics time for 1,000 / 10,000 / 50,000 series, beside the render floor.

A *series* is what Prometheus means by it, and what ../shared/bench/prom_render.py counts:
one exported time series, i.e. one sample line of /metrics (`--unit samples`, the default).
The ledger keeps one row of `totals` per *label set* (department, project, provider, model,
outcome), and each label set is exported as about 7.4 series (requests by outcome; tokens x 4
token types, reasoning, cost, ... per 4-label set). With the default unit the script sizes
the ledger so that /metrics has the asked number of sample lines in all (it measures two
small ledgers first to find how many label sets that takes); `--unit labelsets` sizes it in
label sets instead (50,000 label sets are about 370,000 series: the much harder case).

For each size a fresh temp SQLite ledger is filled through the ledger API (SQLiteLedger.record
with PricedEvents, one event per series, timestamps "now" so that the budgets have spend),
the exporter is started on it (labels.max_values_per_label raised, two budgets on the
generated departments), and /metrics is fetched: one first (cold) scrape, then --repeat
scrapes in the classic text format and --repeat with `Accept: application/openmetrics-text`
(what Prometheus asks for); the median is reported, with the exporter's CPU seconds per scrape
and its RSS after the scrapes.

Baseline in the same run: ../shared/bench/prom_render.py (custom-collector variant:
generate_latest() of one CounterMetricFamily built from a dict; no HTTP) at the same number
of *series* and at the same number of exported *samples*.

    .venv/bin/python bench/scrape_time.py [--sizes 1000 10000 50000] [--repeat 5]
        [--error-every 10] [--profile DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from benchlib import (
    SHARED_BENCH,
    Server,
    cpu_seconds,
    exporter_cmd,
    fmt_ratio,
    free_port,
    http_get,
    print_table,
    py_spy_record,
    rmtree,
    rss_mb,
    summarize_collapsed,
    verdict,
    write_config,
)

TARGET_SECONDS = 0.3
TARGET_SERIES = 50_000
DEPARTMENTS = [f"dept-{i:02d}" for i in range(10)]
MODELS = [("openai", "gpt-4o-2024-08-06"), ("openai", "gpt-4o-mini-2024-07-18"),
          ("anthropic", "claude-sonnet-4-5"), ("gemini", "gemini-2.5-pro"),
          ("deepseek", "deepseek-chat")]
OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
BUDGETS = (
    "  - {department: dept-00, project: project-00000, daily_usd: 300, monthly_usd: 5000}\n"
    "  - {department: dept-01, project: \"*\", daily_usd: 100, monthly_usd: 2000,"
    " timezone: America/New_York}\n"
)


def label_sets(n: int, error_every: int) -> list[tuple[str, str, str, str, str]]:
    """n distinct (department, project, provider, model, outcome); every error_every-th
    (department, project, provider, model) also has an `error` series."""
    out: list[tuple[str, str, str, str, str]] = []
    i = 0
    while len(out) < n:
        project = f"project-{i // (len(DEPARTMENTS) * len(MODELS)):05d}"
        department = DEPARTMENTS[i % len(DEPARTMENTS)]
        provider, model = MODELS[(i // len(DEPARTMENTS)) % len(MODELS)]
        out.append((department, project, provider, model, "success"))
        if error_every and i % error_every == 0 and len(out) < n:
            out.append((department, project, provider, model, "error"))
        i += 1
    return out


def build_ledger(path: Path, n: int, error_every: int, chunk: int = 5000) -> float:
    """One priced event per series through the ledger API. Returns seconds taken."""
    from llm_cost_exporter.events import (
        Attribution,
        PricedEvent,
        SeriesLabels,
        TokenCounts,
        UsageEvent,
    )
    from llm_cost_exporter.ledger.sqlite import SQLiteLedger

    t0 = time.perf_counter()
    ledger = SQLiteLedger(path)
    now = datetime.now(UTC)
    events = []
    for i, (dep, proj, prov, model, outcome) in enumerate(label_sets(n, error_every)):
        tokens = TokenCounts(input=1000 + i, cache_read=512, output=300, reasoning=100)
        event = UsageEvent(attribution=Attribution(dep, proj, user="bench"), provider=prov,
                           model=model, tokens=tokens, timestamp=now, outcome=outcome,
                           latency_seconds=0.1 + (i % 50) / 10, request_id=f"s{n}-{i}")
        events.append(PricedEvent(event=event, labels=SeriesLabels(dep, proj, prov, model),
                                  cost=Decimal(1000 + i) / 400_000 + Decimal("0.003"),
                                  price_source="bench"))
    for start in range(0, len(events), chunk):
        ledger.record([events[start:start + chunk]])
    series = len(ledger.totals().series)
    ledger.close()
    if series != n:
        raise SystemExit(f"ledger has {series} series, wanted {n}")
    return time.perf_counter() - t0


def count_samples(body: bytes) -> tuple[int, int, Counter[str]]:
    """(all sample lines, usage sample lines, samples per family)."""
    per_family: Counter[str] = Counter()
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            per_family[name] += 1
    usage = sum(v for k, v in per_family.items()
                if k.startswith(("llm_requests", "llm_tokens", "llm_reasoning", "llm_cost",
                                 "llm_estimated", "llm_unpriced")))
    return sum(per_family.values()), usage, per_family


def scrape(server: Server, accept: str | None) -> tuple[float, float, bytes]:
    headers = {"Accept": accept} if accept else {}
    cpu0 = cpu_seconds(server.pid)
    t0 = time.perf_counter()
    status, body = http_get(server.port, "/metrics", headers, timeout=120)
    wall = time.perf_counter() - t0
    if status != 200:
        raise SystemExit(f"/metrics answered {status}")
    return wall, cpu_seconds(server.pid) - cpu0, body


def floor_render(n: int, repeat: int, out: Path) -> dict[str, float]:
    script = SHARED_BENCH / "prom_render.py"
    out.unlink(missing_ok=True)
    subprocess.run([sys.executable, str(script), "--sizes", str(n), "--variants", "collector",
                    "--repeat", str(repeat), "--json-out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    return dict(json.loads(out.read_text().splitlines()[-1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000],
                   help="series per ledger (in --unit)")
    p.add_argument("--unit", choices=["samples", "labelsets"], default="samples",
                   help="samples: exported series (sample lines of /metrics, as the floor "
                        "counts them); labelsets: ledger label sets (~7.4 series each)")
    p.add_argument("--repeat", type=int, default=5, help="timed scrapes per format (median)")
    p.add_argument("--error-every", type=int, default=10,
                   help="every Nth 4-label set also gets an outcome=error series (0: none)")
    p.add_argument("--no-floor", action="store_true", help="skip prom_render.py")
    p.add_argument("--profile", metavar="DIR",
                   help="py-spy the exporter during extra scrapes of the largest size")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-scrape-"))
    print(f"# scrape time: sizes {args.sizes}, median of {args.repeat}; python "
          f"{sys.version.split()[0]}; temp dir {tmp}", flush=True)
    rows, floor_rows, verdicts = [], [], []
    sizes = {size: size for size in args.sizes}
    if args.unit == "samples":
        sizes = label_sets_for(args.sizes, args.error_every, tmp)
    for size, n in sizes.items():
        db = tmp / f"ledger-{n}.db"
        build_s = build_ledger(db, n, args.error_every)
        config = write_config(tmp / f"config-{n}.yaml", db, max_values=100_000, budgets=BUDGETS)
        port = free_port()
        server = Server("exporter", exporter_cmd(config, port), port, tmp / f"exporter-{n}.log",
                        ready_path="/readyz")
        try:
            ready_s = server.start()
            first, _, body = scrape(server, None)
            samples, usage_samples, _ = count_samples(body)
            text = [scrape(server, None) for _ in range(args.repeat)]
            om = [scrape(server, OPENMETRICS) for _ in range(args.repeat)]
            rss, hwm = rss_mb(server.pid)
            if args.profile and n == max(args.sizes):
                profile(server, Path(args.profile), n)
        finally:
            server.stop()
        text_med = statistics.median(t[0] for t in text)
        om_med = statistics.median(t[0] for t in om)
        rows.append([n, samples, usage_samples, f"{len(body) / 1e6:.2f}", build_s, ready_s,
                     first, text_med, statistics.median(t[1] for t in text), om_med,
                     statistics.median(t[1] for t in om), rss, hwm])
        print(f"  {n:,} label sets: {samples:,} series, text median {text_med:.3f} s, "
              f"openmetrics median {om_med:.3f} s, RSS {rss:.1f} MB", flush=True)
        if not args.no_floor:
            same_series = floor_render(n, args.repeat, tmp / "floor.jsonl")
            same_samples = floor_render(samples, args.repeat, tmp / "floor.jsonl")
            f1, f2 = same_series["render_median_s"], same_samples["render_median_s"]
            floor_rows.append([n, samples, f1, f2, text_med, fmt_ratio(text_med, f2),
                               fmt_ratio(om_med, f2),
                               f"{1e6 * text_med / samples:.2f}",
                               f"{1e6 * f2 / samples:.2f}"])
        if size == TARGET_SERIES or size == max(args.sizes):
            verdicts.append([f"{samples:,} series ({n:,} label sets)", text_med, om_med,
                             f"<= {TARGET_SECONDS} s",
                             verdict(max(text_med, om_med) <= TARGET_SECONDS), rss])

    print()
    print_table(["label sets", "series", "usage series", "MB", "build s", "start s",
                 "first s", "text s (med)", "text CPU s", "OM s (med)", "OM CPU s", "RSS MB",
                 "peak MB"], rows)
    print("(label sets = ledger totals rows; series = exported sample lines; first = the first "
          "scrape after start; text/OM = median wall time of GET /metrics in the classic text "
          "format / OpenMetrics, incl. HTTP on loopback; CPU s = exporter CPU per scrape; "
          "RSS after all scrapes)")
    if floor_rows:
        print("\nbaseline ../shared/bench/prom_render.py, custom collector, same run "
              "(generate_latest only, no HTTP):")
        print_table(["label sets", "series", "floor s @label sets", "floor s @series",
                     "ours text s", "ratio text/floor", "ratio OM/floor", "ours us/series",
                     "floor us/series"], floor_rows)
    print("\ntarget (issue): 50,000 series scraped in <= 0.3 s; RSS after it < 150 MB")
    print_table(["size", "text s", "OM s", "target", "verdict", "RSS MB"], verdicts)
    rmtree(tmp)
    return 0


def label_sets_for(sizes: list[int], error_every: int, tmp: Path) -> dict[int, int]:
    """Label sets needed for each asked number of exported series: series grow linearly with
    label sets (plus a fixed part: budgets, histograms, exporter health), so two small
    ledgers give the line."""
    points = []
    for n in (600, 1200):
        db = tmp / f"calibrate-{n}.db"
        build_ledger(db, n, error_every)
        config = write_config(tmp / f"calibrate-{n}.yaml", db, max_values=100_000,
                              budgets=BUDGETS)
        port = free_port()
        server = Server("exporter", exporter_cmd(config, port), port,
                        tmp / f"calibrate-{n}.log", ready_path="/readyz")
        try:
            server.start()
            points.append((n, count_samples(scrape(server, None)[2])[0]))
        finally:
            server.stop()
        db.unlink()
    (n1, s1), (n2, s2) = points
    slope = (s2 - s1) / (n2 - n1)
    return {size: max(1, round(n1 + (size - s1) / slope)) for size in sizes}


def profile(server: Server, out: Path, n: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"scrape-{n}.txt"
    spy = py_spy_record(server.pid, 8, raw)
    if spy is None:
        return
    time.sleep(0.5)
    deadline = time.monotonic() + 7
    while time.monotonic() < deadline:
        scrape(server, OPENMETRICS)
    spy.wait(60)
    print(f"\npy-spy profile of the exporter during scrapes of {n:,} series ({raw}):")
    print_table(["frame", "self %", "incl %"], summarize_collapsed(raw, 30))


if __name__ == "__main__":
    raise SystemExit(main())
