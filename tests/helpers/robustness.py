"""Helpers of the robustness tests: raw HTTP on a socket, process memory, the ledger file.

Raw sockets because some faults cannot be produced with an HTTP client: a request whose body
is still being sent when SIGTERM arrives, or a 100 MB upload that must be answered before
it is sent in full. Every read has a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import json
import select
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def proc_status_kib(pid: int, key: str) -> int:
    """A memory line of /proc/<pid>/status in KiB: VmRSS (now) or VmHWM (peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise AssertionError(f"{key} not in /proc/{pid}/status")


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_response(sock: socket.socket, timeout: float, skip_interim: bool = True
                  ) -> RawResponse:
    """Read one HTTP/1.1 response (Content-Length framed, or until close) within `timeout`."""
    deadline = time.monotonic() + timeout
    buf = b""

    def more() -> bool:
        nonlocal buf
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no complete response within {timeout}s; got {buf[:300]!r}")
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        except TimeoutError:
            raise AssertionError(f"no complete response within {timeout}s; got "
                                 f"{buf[:300]!r}") from None
        buf += data
        return bool(data)

    while True:
        while b"\r\n\r\n" not in buf:
            if not more():
                raise AssertionError(f"connection closed before a response; got {buf[:300]!r}")
        head, _, rest = buf.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        if skip_interim and 100 <= status < 200:  # e.g. 100 Continue: the real answer follows
            buf = rest
            continue
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (h.partition(":") for h in header_lines)}
        buf = rest
        if status < 200 or status in (204, 304):  # never a body
            return RawResponse(status, headers, b"")
        if "content-length" in headers:
            while len(buf) < int(headers["content-length"]):
                if not more():
                    break
            return RawResponse(status, headers, buf[:int(headers["content-length"])])
        while more():
            pass
        return RawResponse(status, headers, buf)


def expect_continue(port: int, path: str, length: int, headers: dict[str, str] | None = None,
                    timeout: float = 20) -> socket.socket:
    """Open a request with `Expect: 100-continue` and return once the server asked for the
    body: uvicorn sends `100 Continue` only when the app starts reading it, so from then on
    the request is certainly in the app's hands (in flight)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(request_head("POST", path, {
        "Content-Type": "application/json", "Content-Length": str(length),
        "Expect": "100-continue", **(headers or {})}))
    interim = read_response(sock, timeout, skip_interim=False)
    assert interim.status == 100, f"expected 100 Continue, got {interim.status}"
    return sock


def stream_until_answered(port: int, path: str, total: int, chunk: int = 64 * 1024,
                          timeout: float = 30) -> tuple[RawResponse, int]:
    """Send a chunked body of up to `total` bytes, stopping as soon as the server answers.

    Returns the answer and how many body bytes were sent before it came. A server that
    read (and kept) the whole body would let us send all of it before answering.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    deadline = time.monotonic() + timeout
    try:
        sock.sendall(request_head("POST", path, {"Content-Type": "application/json",
                                                 "Transfer-Encoding": "chunked"}))
        frame = b"%x\r\n" % chunk + b"[" * chunk + b"\r\n"
        sent = 0
        try:
            while sent < total and time.monotonic() < deadline:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:  # the answer (or a close) is there: stop sending
                    break
                sock.sendall(frame)
                sent += chunk
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the server closed its side after answering: the answer is buffered
        return read_response(sock, max(deadline - time.monotonic(), 1)), sent
    finally:
        sock.close()


def ledger_query(path: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one query on the ledger file with a connection of our own (closed right after)."""
    conn = sqlite3.connect(path, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def integrity_check(path: Path) -> list[str]:
    return [row[0] for row in ledger_query(path, "PRAGMA integrity_check")]


def ledger_bytes(path: Path) -> bytes:
    """The ledger as stored: the database file plus its WAL and shared-memory files."""
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"))
                    if p.exists())
