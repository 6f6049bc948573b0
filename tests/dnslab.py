"""A small DNS lab for tests/test_dns_lab.py and benchmarks/dns_cost.py:

- DnsServer: answers every A query with one fixed address, over UDP and
  TCP, on one address of a namespace, and counts the queries it got.
- StubRelay: a stub resolver (what systemd-resolved is on 127.0.0.53): UDP
  queries to it are relayed to an upstream resolver and the answers back.
  It runs in the test process, outside any scope.
- query(): one A query from a fresh process in a cgroup and a namespace
  (`python tests/dnslab.py query ...` prints JSON): the answer's address and
  the address the answer came from, as the application sees it.

Sockets are made inside the namespaces (netns.run_in) and served by threads
of the test process."""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading

from ksbpf.kernel import netns


def build_query(name: str, qid: int = 0x1234) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", 1, 1)


def build_answer(query: bytes, address: str) -> bytes:
    """The answer to an A query: its id and question, one A record."""
    qid = struct.unpack_from("!H", query)[0]
    end = 12
    while end < len(query) and query[end]:
        end += query[end] + 1
    question = query[12:end + 5]
    return (struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question
            + struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(address))


def parse_answer(msg: bytes) -> str | None:
    """The A record's address of an answer (the last 4 bytes, as build_answer writes it)."""
    if len(msg) < 16 or struct.unpack_from("!H", msg, 6)[0] < 1:
        return None
    return socket.inet_ntoa(msg[-4:])


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class _Served:
    """Sockets served by one thread until close()."""

    def __init__(self):
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select(self._socks, [], [], 0.1)
            for s in ready:
                try:
                    self._on(s)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for s in self._socks:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DnsServer(_Served):
    """A resolver on ADDRESS:port (UDP and TCP) of namespace `ns_path` answering every query with `answer`."""

    def __init__(self, ns_path: str, address: str, answer: str, port: int = 53):
        super().__init__()
        self.answer, self.address = answer, address
        self.udp_queries = self.tcp_queries = 0
        fam = socket.AF_INET6 if ":" in address else socket.AF_INET

        def make():
            u = socket.socket(fam, socket.SOCK_DGRAM)
            u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            u.bind((address, port))
            t = socket.socket(fam, socket.SOCK_STREAM)
            t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            t.bind((address, port))
            t.listen(16)
            return u, t
        self._udp, self._tcp = netns.run_in(ns_path, make)
        self._socks = [self._udp, self._tcp]
        self._start()

    @property
    def queries(self) -> int:
        return self.udp_queries + self.tcp_queries

    def _on(self, s: socket.socket) -> None:
        if s is self._udp:
            msg, peer = s.recvfrom(4096)
            self.udp_queries += 1
            s.sendto(build_answer(msg, self.answer), peer)
            return
        conn, _ = s.accept()
        with conn:
            conn.settimeout(2)
            n = struct.unpack("!H", _recv_exact(conn, 2))[0]
            msg = _recv_exact(conn, n)
            self.tcp_queries += 1
            reply = build_answer(msg, self.answer)
            conn.sendall(struct.pack("!H", len(reply)) + reply)


class StubRelay(_Served):
    """A stub resolver on ADDRESS:53 of namespace `ns_path` (UDP), relaying to `upstream`:53."""

    def __init__(self, ns_path: str, address: str, upstream: str):
        super().__init__()
        self.upstream = upstream
        self.relayed = 0

        def make():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((address, 53))
            up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            return s, up
        self._sock, self._up = netns.run_in(ns_path, make)
        self._socks = [self._sock]
        self._start()

    def _on(self, s: socket.socket) -> None:
        msg, client = s.recvfrom(4096)
        self._up.settimeout(2)
        self._up.sendto(msg, (self.upstream, 53))
        self.relayed += 1
        reply, _ = self._up.recvfrom(4096)
        s.sendto(reply, client)


def in_cgroup_and_ns(ns_name: str, cgroup_path: str | None, *cmd: str) -> list[str]:
    """argv that runs cmd in the cgroup (joined first) and then in the namespace."""
    argv = ["ip", "netns", "exec", ns_name, *cmd]
    if cgroup_path is None:
        return argv
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup_path, *argv]


def query(ns_name: str, cgroup_path: str | None, server: str, proto: str = "udp", timeout: float = 2.0,
          port: int = 53) -> dict:
    """One A query from a fresh process in the cgroup and namespace:
    {"ok", "answer", "from", "error"}."""
    argv = in_cgroup_and_ns(ns_name, cgroup_path, sys.executable, os.path.abspath(__file__), "query", server, proto,
                            str(timeout), str(port))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 20, env=env)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"the query did not run (status {proc.returncode}): {proc.stderr.strip()}") from None


def _query_main(server: str, proto: str, timeout: float, port: int) -> dict:
    fam = socket.AF_INET6 if ":" in server else socket.AF_INET
    msg = build_query("vpn.example")
    try:
        if proto == "udp":
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                s.sendto(msg, (server, port))
                reply, peer = s.recvfrom(4096)
                return {"ok": True, "answer": parse_answer(reply), "from": peer[0], "error": None}
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect((server, port))
            s.sendall(struct.pack("!H", len(msg)) + msg)
            n = struct.unpack("!H", _recv_exact(s, 2))[0]
            reply = _recv_exact(s, n)
            return {"ok": True, "answer": parse_answer(reply), "from": s.getpeername()[0], "error": None}
    except OSError as exc:
        return {"ok": False, "answer": None, "from": None, "error": f"{type(exc).__name__}: {exc}"}


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "query":
        print(json.dumps(_query_main(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))))
    else:
        sys.exit("usage: dnslab.py query SERVER udp|tcp TIMEOUT PORT")
