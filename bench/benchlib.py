"""Helpers shared by the bench/ scripts: start servers, wait for them, read RSS/CPU, run wrk.

Everything binds to and talks to 127.0.0.1 only; every wait loop has a deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def venv_python() -> str:
    """The interpreter running this script (normally .venv/bin/python)."""
    return sys.executable


def exporter_cmd(config: Path, port: int) -> list[str]:
    return [venv_python(), "-m", "llm_cost_exporter", "serve", "--config", str(config),
            "--listen", f"{HOST}:{port}"]


def noop_cmd(port: int) -> list[str]:
    script = SHARED_BENCH / "noop_api.py"
    if not script.is_file():
        raise SystemExit(f"reference floor not found: {script}")
    return [venv_python(), str(script), "--port", str(port)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


DEFAULT_BUDGETS = (
    "  - {department: engineering, project: ai-features, daily_usd: 300, monthly_usd: 5000}\n"
    "  - {department: data-science, project: \"*\", daily_usd: 100, monthly_usd: 2000,"
    " timezone: Asia/Ho_Chi_Minh}\n"
)


def write_config(path: Path, ledger: Path, *, max_values: int = 500,
                 budgets: str = DEFAULT_BUDGETS, writer_process: bool = True) -> Path:
    """A minimal exporter config: a temp SQLite ledger and a couple of budgets (YAML items).
    writer_process: commit in the ledger writer process (the default) or on the loop."""
    path.write_text(
        f"ledger: {{backend: sqlite, path: {json.dumps(str(ledger))}, synchronous: NORMAL, "
        f"writer_process: {'true' if writer_process else 'false'}}}\n"
        f"labels: {{max_values_per_label: {max_values}}}\n"
        "log: {level: WARNING}\n"
        "budgets:\n" + budgets
    )
    return path


class Server:
    """A child server process on 127.0.0.1:port; stopped (SIGINT, then SIGKILL) on exit."""

    def __init__(self, name: str, cmd: Sequence[str], port: int, log: Path,
                 ready_path: str = "/healthz") -> None:
        self.name = name
        self.cmd = list(cmd)
        self.port = port
        self.log = log
        self.ready_path = ready_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> float:
        """Start and wait for ready_path to answer 200; returns seconds from spawn to ready."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.started_at = time.perf_counter()
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT,
                                         env=env, cwd=REPO)
        return self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}; "
                                 f"log:\n{self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, _ = http_get(self.port, self.ready_path, timeout=1.0)
                if status == 200:
                    return time.perf_counter() - self.started_at
            time.sleep(0.005)
        raise SystemExit(f"{self.name} not ready within {timeout} s; "
                         f"log:\n{self.log.read_text()[-2000:]}")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running(*servers: Server) -> Iterator[None]:
    try:
        for s in servers:
            s.start()
        yield
    finally:
        for s in reversed(servers):
            s.stop()


def http_get(port: int, path: str, headers: dict[str, str] | None = None,
             timeout: float = 60.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def process_tree(pid: int) -> list[int]:
    """The process and its live descendants (the exporter's ledger writer process)."""
    pids, i = [pid], 0
    while i < len(pids):
        try:
            with open(f"/proc/{pids[i]}/task/{pids[i]}/children") as f:
                pids.extend(int(c) for c in f.read().split())
        except OSError:
            pass
        i += 1
    return pids


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB of a process plus its live children: what it costs in memory
    (the exporter's writer process included). Shared pages count twice: an upper bound."""
    rss = hwm = 0.0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) / 1024
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1]) / 1024
        except OSError:
            continue
    return rss, hwm


def pss_mb(pid: int) -> float:
    """Proportional set size in MB of a process plus its live children: shared pages (the
    Python library, SQLite) divided among the processes that map them, so the sum counts
    them once."""
    pss = 0.0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) / 1024
                        break
        except OSError:
            continue
    return pss


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process and its live children (all their threads)."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def wrk(url: str, lua: Path, *, connections: int, seconds: int, threads: int = 1,
        env: dict[str, str] | None = None) -> dict[str, float]:
    """Run wrk with a Lua script whose done() prints one `WRKRESULT {json}` line."""
    if not url.startswith(f"http://{HOST}:"):
        raise SystemExit(f"refusing non-loopback target {url!r}")
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
           "-s", str(lua), url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60,
                          env=dict(os.environ, **(env or {})), check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("WRKRESULT "):
            return dict(json.loads(line[len("WRKRESULT "):]))
    raise SystemExit(f"wrk gave no result for {url}:\n{proc.stdout[-1500:]}\n"
                     f"{proc.stderr[-1500:]}")


def fmt_ratio(num: float, den: float) -> str:
    return f"{num / den:.3f}" if den else "n/a"


def verdict(ok: bool) -> str:
    return "MEETS" if ok else "MISSES"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _cell(v: object) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def py_spy_record(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes] | None:
    """Start `py-spy record` on a pid (raw collapsed stacks); None when py-spy is missing."""
    exe = Path(sys.executable).with_name("py-spy")
    if not exe.exists():
        print(f"(py-spy not found beside {sys.executable}: no profile)", file=sys.stderr)
        return None
    return subprocess.Popen([str(exe), "record", "-p", str(pid), "-d", str(seconds), "-r", "200",
                             "--threads", "--format", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# Leaf frames where py-spy still counts a thread that waits (GIL released in C).
IDLE_HINTS = ("CommitQueue._run (commit_queue.py:", "Runner.run (runners.py:118)",
              "Condition.wait", "select (selectors.py", "_worker (thread.py")


def summarize_collapsed(path: Path, top: int = 25) -> list[tuple[str, float, float]]:
    """Top functions of a py-spy raw (collapsed) profile, per function (lines merged):
    (function, self %, inclusive %) of all samples, sorted by self time."""
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf = _short(frames[-1], keep_line=True)
        if any(h in leaf for h in IDLE_HINTS):
            frames = [*frames[:-1], "(waiting: " + leaf + ")"]
        names = [_short(f) for f in frames]
        self_n[names[-1]] = self_n.get(names[-1], 0) + n
        for f in set(names):
            incl_n[f] = incl_n.get(f, 0) + n
    if not total:
        return []
    ranked = sorted(self_n, key=lambda f: -self_n[f])[:top]
    return [(f, 100 * self_n[f] / total, 100 * incl_n[f] / total) for f in ranked]


def _short(frame: str, keep_line: bool = False) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py)" (or "module.py:123")
    if frame.startswith("(waiting: "):
        return frame
    name, _, where = frame.partition(" (")
    if not where:
        return name
    where = Path(where.rstrip(")")).name
    return f"{name} ({where if keep_line else where.rsplit(':', 1)[0]})"


def rmtree(path: Path) -> None:
    """Remove a temp dir made by a bench script (bounded: only what rglob finds)."""
    for child in sorted(path.rglob("*"), reverse=True):
        if child.is_dir() and not child.is_symlink():
            child.rmdir()
        else:
            # missing_ok: SQLite deletes a -wal file itself when its last connection closes.
            child.unlink(missing_ok=True)
    path.rmdir()
