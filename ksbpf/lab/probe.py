"""Try to reach a destination once, or send a steady UDP stream; report as JSON.

Run by ksbpf.lab inside a cgroup and a network namespace (stdlib only):

    python -m ksbpf.lab.probe tcp|udp|icmp DST [PORT] [--timeout S]
        one attempt; prints {"ok": bool, "error": str|null}; exit status 0 either way
    python -m ksbpf.lab.probe stream DST PORT [--interval-ms MS]
        prints {"ready": true} once its socket exists, then sends one datagram every
        MS ms until SIGTERM/SIGINT, then prints
        {"attempted": n, "sent": n, "blocked": n, "errors": {"ENAME": n}}
        ("blocked" counts EPERM, what a cgroup BPF drop returns to the sender)

tcp expects its b"ping" echoed back, udp its unique token; icmp runs `ping -c1`.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time


def _describe(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if exc.errno:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {os.strerror(exc.errno)}"
    return str(exc)


def _family(dst: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in dst else socket.AF_INET


def _tcp(dst: str, port: int, timeout: float) -> None:
    with socket.socket(_family(dst), socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((dst, port))
        s.sendall(b"ping")
        got = b""
        while len(got) < 4:
            chunk = s.recv(4 - len(got))
            if not chunk:
                raise OSError(f"connection closed after {got!r}")
            got += chunk
        if got != b"ping":
            raise OSError(f"echo mismatch: {got!r}")


def _udp(dst: str, port: int, timeout: float) -> None:
    token = os.urandom(8).hex().encode()
    deadline = time.monotonic() + timeout
    with socket.socket(_family(dst), socket.SOCK_DGRAM) as s:
        s.connect((dst, port))
        s.send(token)
        while True:
            s.settimeout(max(deadline - time.monotonic(), 0.001))
            if s.recv(2048) == token:
                return


def _icmp(dst: str, timeout: float) -> None:
    proc = subprocess.run(["ping", "-n", "-q", "-c1", f"-W{timeout:g}", dst],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or "no reply").splitlines()
        raise OSError(lines[-1])


def once(kind: str, dst: str, port: int, timeout: float) -> dict:
    try:
        if kind == "tcp":
            _tcp(dst, port, timeout)
        elif kind == "udp":
            _udp(dst, port, timeout)
        else:
            _icmp(dst, timeout)
    except OSError as exc:
        return {"ok": False, "error": _describe(exc)}
    return {"ok": True, "error": None}


def stream(dst: str, port: int, interval_ms: float) -> dict:
    stop = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    counts = {"attempted": 0, "sent": 0, "blocked": 0, "errors": {}}
    with socket.socket(_family(dst), socket.SOCK_DGRAM) as s:
        print(json.dumps({"ready": True}), flush=True)
        while not stop:
            counts["attempted"] += 1
            try:
                s.sendto(b"x%d" % counts["attempted"], (dst, port))
                counts["sent"] += 1
            except OSError as exc:
                if exc.errno == errno.EPERM:
                    counts["blocked"] += 1
                else:
                    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                    counts["errors"][name] = counts["errors"].get(name, 0) + 1
            time.sleep(interval_ms / 1000)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ksbpf.lab.probe")
    ap.add_argument("kind", choices=["tcp", "udp", "icmp", "stream"])
    ap.add_argument("dst")
    ap.add_argument("port", type=int, nargs="?", default=0)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--interval-ms", type=float, default=2.0)
    a = ap.parse_args(argv)
    if a.kind == "stream":
        result = stream(a.dst, a.port, a.interval_ms)
    else:
        result = once(a.kind, a.dst, a.port, a.timeout)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
