"""What leaves a brand-new interface before its tc guard exists, with node
mode's daemon running (issue 18, row 2): the window that remains for raw
AF_PACKET frames, and the IP traffic the netfilter hook ("from birth")
already judges.

A bench-owned "host" namespace with the daemon guarding it in node mode, and
a "far" namespace.  Each try, two senders in the host are already running
when a veth pair is created ALREADY UP (`ip link add NAME up type veth peer
... netns far`):

- raw: an AF_PACKET socket sending an IPv4/UDP frame (dport 40001) on the
  interface as fast as it can, from the moment the name exists, for 0.3 s
  (a tc drop returns ENOBUFS);
- ip: a UDP socket bound to the interface (SO_BINDTODEVICE) sending to
  255.255.255.255:40002 -- an IP packet that needs no address or route.

A capture in the far namespace (every interface) counts what arrived of
each; for the raw frames also the window, from the first to the last frame
that arrived.  Expected: IP 0 in every try (the netfilter hook); raw frames:
what the daemon's reaction lets through.

    python benchmarks/new_uplink.py [--tries 20] [--out benchmarks/results]
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import report
from reaction import percentile, start_daemon

from ksbpf.kernel import netns, nf, pins
from ksbpf.scopes import node as node_scope

ETH_P_ALL = 0x0003
SO_BINDTODEVICE = 25
RAW_PORT, IP_PORT = 40001, 40002
MARK = b"ksbpf-new-uplink"


def raw_frame(try_id: int) -> bytes:
    payload = MARK + struct.pack("!I", try_id)
    udp = struct.pack("!HHHH", 40000, RAW_PORT, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton("192.0.2.10"), socket.inet_aton("198.51.100.9"))
    return bytes.fromhex("ffffffffffff" "020000000001" "0800") + ip + udp


class Capture:
    """Every frame arriving in the far namespace, on any interface: (time,
    dport, try) of ours."""

    def __init__(self, ns_path: str):
        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
            s.settimeout(0.1)
            return s
        self.sock = netns.run_in(ns_path, make)
        self.got: list[tuple[float, int, int]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.perf_counter()
            i = data.find(MARK)
            if addr[2] == 4 or i < 0 or len(data) < 14 + 20 + 8 or data[12:14] != b"\x08\x00":
                continue
            ihl = (data[14] & 0xF) * 4
            dport = struct.unpack_from("!H", data, 14 + ihl + 2)[0]
            self.got.append((now, dport, struct.unpack_from("!I", data, i + len(MARK))[0]))

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


def _raw_sender(name: str, try_id: int, stop: threading.Event, out: dict) -> None:
    frame = raw_frame(try_id)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sent = refused_in_a_row = 0
    try:
        while not stop.is_set():   # ENOBUFS: dropped by the guard, or by the veth while its far end is down
            try:
                s.sendto(frame, (name, 0))
                sent += 1
                refused_in_a_row = 0
                out.setdefault("first_sent", time.perf_counter())
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:        # the guard drops it
                    refused_in_a_row += 1
                    out.setdefault("first_refused", time.perf_counter())
                elif exc.errno not in (errno.ENODEV, errno.ENXIO, errno.ENETDOWN):
                    raise
    finally:
        s.close()
        out["sent"] = sent


def _ip_sender(name: str, try_id: int, stop: threading.Event, out: dict) -> None:
    payload = MARK + struct.pack("!I", try_id)
    sent = refused = 0
    while not stop.is_set():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, name.encode())
            except OSError:
                continue   # the interface does not exist yet
            while not stop.is_set():
                try:
                    s.sendto(payload, ("255.255.255.255", IP_PORT))
                    sent += 1
                except OSError as exc:
                    if exc.errno == errno.EPERM:      # the netfilter hook drops it
                        refused += 1
                    elif exc.errno not in (errno.ENETUNREACH, errno.ENETDOWN, errno.ENODEV, errno.ENOBUFS):
                        raise
        finally:
            s.close()
    out["sent"], out["refused"] = sent, refused


def _only_loopback(ipr) -> None:
    """A netlink socket must be in the bench's own namespace: refuse to go on otherwise."""
    names = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    if not names <= {"lo"} and not all(n.startswith(("nu", "nf")) or n == "lo" for n in names):
        raise RuntimeError(f"netlink socket outside the bench namespace (sees {sorted(names)}): stopping")


def _create_up(name: str, peer: str, far: str, far_worker: "FarWorker") -> float:
    """Inside the host namespace: the veth created up, its far end (in `far`) set up at once."""
    from pyroute2 import IPRoute
    far_fd = os.open(os.path.join(netns.NETNS_RUN_DIR, far), os.O_RDONLY)
    ipr = IPRoute()
    try:
        _only_loopback(ipr)
        t = time.perf_counter()
        ipr.link("add", ifname=name, kind="veth", state="up", peer={"ifname": peer, "net_ns_fd": far_fd})
        far_worker.up(peer)
        return t
    finally:
        ipr.close()
        os.close(far_fd)


class FarWorker:
    """A thread inside the far namespace that sets an interface up when asked."""

    def __init__(self, far_path: str):
        import queue
        self._q: "queue.Queue[str | None]" = queue.Queue()
        self._done: "queue.Queue[object]" = queue.Queue()
        self._thread = threading.Thread(target=netns.run_in, args=(far_path, self._loop), daemon=True)
        self._thread.start()
        ready = self._done.get(timeout=30)
        if isinstance(ready, Exception):
            raise ready

    def _loop(self) -> None:
        from pyroute2 import IPRoute
        ipr = IPRoute()
        try:
            _only_loopback(ipr)
            self._done.put(True)
        except Exception as exc:
            self._done.put(exc)
            ipr.close()
            return
        try:
            while (name := self._q.get()) is not None:
                try:
                    for _ in range(1000):
                        found = ipr.link_lookup(ifname=name)
                        if found:
                            break
                    ipr.link("set", index=found[0], state="up")
                    self._done.put(True)
                except Exception as exc:
                    self._done.put(exc)
        finally:
            ipr.close()

    def up(self, name: str) -> None:
        self._q.put(name)
        result = self._done.get(timeout=30)
        if isinstance(result, Exception):
            raise result

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(10)


def one_try(ns_path: str, far: str, tag: str, i: int, far_worker: FarWorker) -> dict:
    """Inside the host namespace: the senders, then the veth created up."""
    name = f"nu{i}{tag}"
    stop = threading.Event()
    raw_out: dict = {}
    ip_out: dict = {}
    threads = [threading.Thread(target=netns.run_in, args=(ns_path, _raw_sender, name, i, stop, raw_out)),
               threading.Thread(target=netns.run_in, args=(ns_path, _ip_sender, name, i, stop, ip_out))]
    for t in threads:
        t.start()
    time.sleep(0.05)
    peer = f"nf{i}{tag}"
    t_create = netns.run_in(ns_path, _create_up, name, peer, far, far_worker)
    time.sleep(0.3)   # the daemon guards it meanwhile
    stop.set()
    for t in threads:
        t.join(10)
    return {"created": t_create, "raw": raw_out, "ip": ip_out}


def run(tries: int) -> dict:
    tag = uuid.uuid4().hex[:5]
    host, far = f"ksbpf-nu-{tag}-h", f"ksbpf-nu-{tag}-f"
    workdir = tempfile.mkdtemp(prefix="ksbpf-bench-")
    for n in (host, far):
        subprocess.run(["ip", "netns", "add", n], check=True)
        subprocess.run(["ip", "-n", n, "link", "set", "lo", "up"], check=True)
    host_path = os.path.join(netns.NETNS_RUN_DIR, host)
    daemon = capture = far_worker = None
    rows = []
    try:
        pin_dir = pins.node_dir(netns.cookie(netns.resolve(host)))
        daemon = start_daemon(workdir, f'[node]\nnetns = "{host}"\ntunnels = ["wgb{tag}"]\n'
                                       f'endpoints = ["198.51.100.1:51820/udp"]\n', pin_dir)
        time.sleep(0.5)
        from_birth = node_scope.read_node(pin_dir).from_birth
        capture = Capture(os.path.join(netns.NETNS_RUN_DIR, far))
        far_worker = FarWorker(os.path.join(netns.NETNS_RUN_DIR, far))
        for i in range(tries):
            r = one_try(host_path, far, tag, i, far_worker)
            time.sleep(0.2)
            mine = [(t, d) for t, d, k in capture.got if k == i]
            raw = sorted(t for t, d in mine if d == RAW_PORT)
            rows.append({"raw_arrived": len(raw), "raw_sent": r["raw"].get("sent", 0),
                         "raw_window_ms": round((raw[-1] - raw[0]) * 1000, 3) if raw else 0.0,
                         "raw_window_from_create_ms": round((raw[-1] - r["created"]) * 1000, 3) if raw else 0.0,
                         "ip_arrived": sum(1 for _, d in mine if d == IP_PORT),
                         "ip_sent": r["ip"].get("sent", 0), "ip_refused": r["ip"].get("refused", 0)})
    finally:
        if far_worker is not None:
            far_worker.close()
        if capture is not None:
            capture.close()
        if daemon is not None:
            daemon.terminate()
            daemon.wait()
        try:
            node_scope.detach(host_path)
        except Exception as exc:  # keep cleaning up
            print(f"cleanup: node detach: {exc}", file=sys.stderr)
        for n in (host, far):
            subprocess.run(["ip", "netns", "del", n])
        subprocess.run(["rm", "-rf", workdir])
    windows = [r["raw_window_from_create_ms"] for r in rows]
    return {"benchmark": "new_uplink", "tries": tries, "from_birth": from_birth, "rows": rows,
            "ip_arrived_total": sum(r["ip_arrived"] for r in rows),
            "ip_refused_total": sum(r["ip_refused"] for r in rows),
            "raw_arrived": {"min": min(r["raw_arrived"] for r in rows), "max": max(r["raw_arrived"] for r in rows),
                            "p50": percentile([r["raw_arrived"] for r in rows], 50)},
            "raw_window_ms": {"p50": round(percentile(windows, 50), 3), "max": round(max(windows), 3)},
            "machine_load": "other sessions were running tests on this machine at the same time",
            "machine": report.machine()}


def table(r: dict) -> str:
    lines = ["| try | raw frames arrived | raw window (first→last arrived) ms | last raw frame after creation ms "
             "| IP packets arrived | IP sends refused (EPERM) |", "|---|---|---|---|---|---|"]
    for i, row in enumerate(r["rows"]):
        lines.append(f"| {i + 1} | {row['raw_arrived']} | {row['raw_window_ms']} | {row['raw_window_from_create_ms']} "
                     f"| {row['ip_arrived']} | {row['ip_refused']} |")
    lines.append("")
    lines.append(f"- From-birth layer: {r['from_birth']}. IP packets that got out: **{r['ip_arrived_total']}** "
                 f"({r['ip_refused_total']} sends refused by the netfilter hook before any guard existed).")
    lines.append(f"- Raw AF_PACKET frames (judged only by the tc guard the daemon puts on): "
                 f"{r['raw_arrived']['min']}–{r['raw_arrived']['max']} per try (median {r['raw_arrived']['p50']}); "
                 f"the last one left {r['raw_window_ms']['p50']} ms (median; max {r['raw_window_ms']['max']} ms) "
                 f"after the request that created the interface. Here the far end is set up right after the "
                 f"creation (a thread hop) and the veth drops frames until it is: what a raw sender gets is "
                 f"bounded by the daemon's reaction, measured by node_reaction (new interface → guard in force).")
    lines.append(f"- {r['machine_load']}.")
    return "\n".join(lines)


def main() -> int:
    ap = report.parser(__doc__)
    ap.add_argument("--tries", type=int, default=20)
    a = ap.parse_args()
    if not nf.supported():
        print("new_uplink: this kernel has no netfilter BPF links (Linux 6.4+): IP traffic is not judged from birth")
    result = run(a.tries)
    report.publish(a.out, "new_uplink", result,
                   "A brand-new interface with the daemon: raw frames in its reaction window, IP from birth",
                   f"{a.tries} veth pairs created already up while a raw AF_PACKET sender and a UDP sender bound to "
                   f"the new name were already sending; counted by a capture on the far side.", table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
