"""Proxy overhead: direct vs our proxy vs the reference floor proxies, in one run.

Starts the shared instant fake OpenAI upstream, the shared floor proxies (Starlette + one
aiohttp client, and + one httpx client), and our exporter configured with that upstream twice:
`ours` (the default: commits in the ledger writer process) and `ours-inline`
(`ledger.writer_process: false`: one process, commits on the event loop); then runs the
shared load generator (latency, time to first token, CPU per request) at concurrency 1 and
32, streaming and not, and wrk for capacity at concurrency 32. Our proxy
prices and commits every call to its SQLite ledger; the floors do no accounting at all.

    .venv/bin/python bench/proxy_overhead.py [-n 600] [--wrk-seconds 8] [--skip-wrk]

Targets (issue #4): added p50 <= 0.5 ms and p99 <= 2 ms at c=1; added TTFT <= 0.5 ms;
CPU <= 0.6 ms per proxied request; wrk capacity at c=32 >= 60% of the aiohttp floor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import (
    SHARED_BENCH,
    Server,
    cpu_seconds,
    exporter_cmd,
    fmt_ratio,
    free_port,
    print_table,
    process_tree,
    running,
    venv_python,
    verdict,
)

CHAT = "/v1/chat/completions"


def _loadgen(targets: dict[str, str], pids: dict[str, int], n: int, c: int, stream: bool,
             out: Path) -> dict[str, dict[str, float]]:
    label = f"c{c}{' stream' if stream else ''}"
    cmd = [venv_python(), str(SHARED_BENCH / "loadgen.py"), "-n", str(n), "-c", str(c),
           "--max-seconds", "120", "--json-out", str(out), "--label", label]
    for name, url in targets.items():
        cmd += ["--target", f"{name}={url}"]
    for name, pid in pids.items():
        cmd += ["--pids", f"{name}={pid}"]
    if stream:
        cmd.append("--stream")
    # Attributed like a real app's calls, so the budget check runs on a real scope.
    cmd += ["--header", "X-LLM-Department: engineering", "--header", "X-LLM-Project: bench"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    print(proc.stdout)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    line = out.read_text().strip().splitlines()[-1]
    return dict(json.loads(line)["results"])


def _wrk(targets: dict[str, str], seconds: int, body: Path, out: Path) -> dict[str, float]:
    cmd = [venv_python(), str(SHARED_BENCH / "wrk_compare.py"), "-c", "32", "--seconds",
           str(seconds), "--body-file", str(body), "--json-out", str(out), "--label", "c32"]
    for name, url in targets.items():
        cmd += ["--target", f"{name}={url}"]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=len(targets) * (seconds + 60), check=False)
    print(proc.stdout)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    results = json.loads(out.read_text().strip().splitlines()[-1])["results"]
    return {name: float(r["rps"]) for name, r in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=600, help="measured requests per target")
    parser.add_argument("--wrk-seconds", type=int, default=8)
    parser.add_argument("--skip-wrk", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    up, aio, hx, ours = free_port(), free_port(), free_port(), free_port()
    upstream = f"http://127.0.0.1:{up}"
    inline = free_port()
    configs = {}
    for name, writer_process in (("ours", "true"), ("ours-inline", "false")):
        configs[name] = work / f"config-{name}.yaml"
        configs[name].write_text(
            f"ledger: {{path: {json.dumps(str(work / f'{name}.db'))}, "
            f"writer_process: {writer_process}}}\n"
            "log: {level: WARNING}\n"
            f"upstreams: [{{name: openai, base_url: {json.dumps(upstream)}, format: openai}}]\n"
            "budgets: [{department: engineering, project: bench, daily_usd: 100000,"
            " enforce: true}]\n")
    fake = Server("fake-openai", [venv_python(), str(SHARED_BENCH / "fake_openai.py"),
                                  "--port", str(up)], up, work / "fake.log", "/health")
    floor_aio = Server("floor-aiohttp", [venv_python(), str(SHARED_BENCH / "floor_proxy.py"),
                                         "--upstream", upstream, "--port", str(aio),
                                         "--client", "aiohttp"], aio, work / "aio.log",
                       "/health")
    floor_hx = Server("floor-httpx", [venv_python(), str(SHARED_BENCH / "floor_proxy.py"),
                                      "--upstream", upstream, "--port", str(hx),
                                      "--client", "httpx"], hx, work / "httpx.log", "/health")
    # ours: the default, commits in the ledger writer process; ours-inline: the same with
    # ledger.writer_process: false (one process, commits on the event loop).
    exporter = Server("exporter", exporter_cmd(configs["ours"], ours), ours,
                      work / "exporter.log")
    exporter_inline = Server("exporter-inline", exporter_cmd(configs["ours-inline"], inline),
                             inline, work / "exporter-inline.log")
    targets = {"direct": upstream + CHAT, "floor-aiohttp": f"http://127.0.0.1:{aio}{CHAT}",
               "floor-httpx": f"http://127.0.0.1:{hx}{CHAT}",
               "ours": f"http://127.0.0.1:{ours}/openai{CHAT}",
               "ours-inline": f"http://127.0.0.1:{inline}/openai{CHAT}"}
    with running(fake, floor_aio, floor_hx, exporter, exporter_inline):
        pids = {"direct": fake.pid, "floor-aiohttp": floor_aio.pid, "floor-httpx": floor_hx.pid,
                "ours": exporter.pid, "ours-inline": exporter_inline.pid}
        results = {}
        for c, stream in ((1, False), (1, True), (32, False), (32, True)):
            # The loadgen reads the CPU of the pid it is given; the writer process's share
            # is read here (it works only for the ours target) and added per request.
            writers = process_tree(exporter.pid)[1:]
            cpu0 = sum(cpu_seconds(p) for p in writers)
            results[(c, stream)] = _loadgen(targets, pids, args.n, c, stream,
                                            work / "loadgen.jsonl")
            writer_ms = (sum(cpu_seconds(p) for p in writers) - cpu0) * 1000 / args.n
            results[(c, stream)]["ours"]["server_cpu_ms_per_req"] += writer_ms
        capacity: dict[str, float] = {}
        if not args.skip_wrk:
            body = work / "body.json"
            body.write_text(json.dumps({"model": "gpt-4o-mini", "messages": [
                {"role": "user", "content": "Say hello to the benchmark in five words."}]}))
            capacity = _wrk(targets, args.wrk_seconds, body, work / "wrk.jsonl")
    _summary(results, capacity)
    print(f"(logs and raw JSON in {work})")


def _summary(results: dict[tuple[int, bool], dict[str, dict[str, float]]],
             capacity: dict[str, float]) -> None:
    print("== summary: added latency vs direct (ms), CPU ms per request of the proxy process"
          " (upstream's own CPU excluded)")
    rows = []
    for (c, stream), res in results.items():
        base = res["direct"]
        for name in ("floor-aiohttp", "floor-httpx", "ours", "ours-inline"):
            r = res[name]
            rows.append([f"c={c}{' stream' if stream else ''}", name,
                         f"{r['p50_ms'] - base['p50_ms']:+.3f}",
                         f"{r['p99_ms'] - base['p99_ms']:+.3f}",
                         f"{r['ttft_p50_ms'] - base['ttft_p50_ms']:+.3f}" if stream else "-",
                         f"{r['server_cpu_ms_per_req']:.3f}", f"{r['rps']:.0f}"])
    print_table(["scenario", "target", "add p50", "add p99", "add TTFT p50", "CPU ms/req",
                 "req/s"], rows)
    c1 = results[(1, False)]
    c1s = results[(1, True)]
    for name in ("ours", "ours-inline"):
        added_p50 = c1[name]["p50_ms"] - c1["direct"]["p50_ms"]
        added_p99 = c1[name]["p99_ms"] - c1["direct"]["p99_ms"]
        added_ttft = c1s[name]["ttft_p50_ms"] - c1s["direct"]["ttft_p50_ms"]
        cpu = c1[name]["server_cpu_ms_per_req"]
        print(f"{name}: target added p50 <= 0.5 ms at c=1: {added_p50:.3f} ms -> "
              f"{verdict(added_p50 <= 0.5)}")
        print(f"{name}: target added p99 <= 2 ms at c=1: {added_p99:.3f} ms -> "
              f"{verdict(added_p99 <= 2)}")
        print(f"{name}: target added TTFT <= 0.5 ms at c=1: {added_ttft:.3f} ms -> "
              f"{verdict(added_ttft <= 0.5)}")
        print(f"{name}: target CPU <= 0.6 ms per proxied request (c=1): {cpu:.3f} ms -> "
              f"{verdict(cpu <= 0.6)}")
    if capacity:
        ratio = capacity["ours"] / capacity["floor-aiohttp"]
        print("wrk c=32 req/s: " + ", ".join(f"{k} {v:.0f}" for k, v in capacity.items()))
        print(f"target capacity >= 60% of aiohttp floor: ours/floor-aiohttp = "
              f"{fmt_ratio(capacity['ours'], capacity['floor-aiohttp'])} -> "
              f"{verdict(ratio >= 0.6)}; ours-inline/floor-aiohttp = "
              f"{fmt_ratio(capacity['ours-inline'], capacity['floor-aiohttp'])}; "
              "ours/floor-httpx = "
              f"{fmt_ratio(capacity['ours'], capacity['floor-httpx'])}; "
              f"ours vs LiteLLM's 147 req/s measured here: x{capacity['ours'] / 147:.1f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
