"""Running the real command line from tests."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Callable, Hashable

KSBPF = [sys.executable, "-m", "ksbpf.cli"]


def ksbpf(*args: str, check: bool = False, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(KSBPF + list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"ksbpf {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def scope_status(cgroup_path: str) -> dict:
    """The `ksbpf status --json` entry of one cgroup."""
    scopes = json.loads(ksbpf("status", "--json", check=True).stdout)["scopes"]
    mine = [s for s in scopes if s["cgroup"] == cgroup_path]
    assert len(mine) == 1, scopes
    return mine[0]


def packets(cgroup_path: str, reason: str) -> int:
    return scope_status(cgroup_path)["counters"][reason]["packets"]


def dropped(cgroup_path: str) -> int:
    return scope_status(cgroup_path)["dropped_packets"]


class DaemonProcess:
    """`ksbpf daemon` as a child process with JSON logs collected from stderr."""

    def __init__(self, config_path: str, prefix: tuple[str, ...] = (), env: dict | None = None,
                 argv: list[str] | None = None):
        """prefix: a command that runs it (setpriv with a capability set, a mount namespace);
        argv: the whole command instead (a container runtime's)."""
        import threading
        argv = argv or [*prefix, *KSBPF, "daemon", "--config", config_path, "--log-format", "json"]
        self.proc = subprocess.Popen(argv,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    pass
                self._cond.notify_all()

    def wait_for(self, event: str, timeout: float = 30, after: int = 0, **match) -> dict:
        """The first `event` (from index `after` on) whose fields include `match`."""
        import time
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events[after:]:
                    if e.get("event") == event and all(e.get(k) == v for k, v in match.items()):
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no {event} {match} in daemon log:\n" + "\n".join(self.lines))
                self._cond.wait(min(left, 0.2))

    def named(self, event: str) -> list[dict]:
        with self._cond:
            return [e for e in self.events if e.get("event") == event]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def detach_node_at_teardown(request, lab) -> None:
    """Remove node mode from the lab's client namespace when the test ends,
    passed or failed (if the namespace is still there)."""
    def undo() -> None:
        from ksbpf.scopes import node
        if os.path.exists(lab.client_path):
            node.detach(lab.client_path)
    request.addfinalizer(undo)


def toml_config(scopes: list[dict], extra: str = "") -> str:
    """A config file's text; each scope a dict of keys."""
    def value(v) -> str:
        return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")
    out = [extra]
    for sc in scopes:
        out.append("[[scope]]")
        out += [f"{k} = {value(v)}" for k, v in sc.items()]
    return "\n".join(out) + "\n"


class UdpCapture:
    """IPv4 UDP datagrams arriving on an interface of a namespace (a real
    capture, AF_PACKET), counted by the key classify(data, ihl, dport)
    returns (None: not counted)."""

    def __init__(self, ns_path: str, ifname: str, classify: Callable[[bytes, int, int], Hashable | None]):
        from ksbpf.kernel import netns

        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
            s.bind((ifname, 0x0800))
            return s
        self.classify = classify
        self.sock = netns.run_in(ns_path, make)
        self.seen: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        self.sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            if len(data) < 28 or data[9] != socket.IPPROTO_UDP:
                continue
            ihl = (data[0] & 0xF) * 4
            key = self.classify(data, ihl, struct.unpack_from("!H", data, ihl + 2)[0])
            if key is not None:
                self.seen[key] = self.seen.get(key, 0) + 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def wait_until(cond, bound: float, what: str) -> None:
    deadline = time.monotonic() + bound
    while not cond():
        assert time.monotonic() < deadline, f"{what} did not happen within {bound} s"
        time.sleep(0.1)
