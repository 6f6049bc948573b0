"""`ksbpf verify --lab`: the leak matrix with real packets, in throwaway
namespaces, against this machine's kernel and the installed ksbpf.

It builds the demo's lab (ksbpf/lab/namespaces.py: a client and a server
namespace, a veth as the physical link, a real wireguard-go tunnel), protects
a fresh cgroup of the client with `--allow-lan` and `--allow-dhcp` (so
that the LAN and DHCP rules are exercised too), and tries every vector of the matrix from a process of that
cgroup.  What arrives is counted on the far side of the physical link (a
packet socket on the server's end: plaintext from the client, WireGuard's
own transport excepted).  Each cell has a control -- the same vector from a
process outside the cgroup -- that must arrive, so a broken capture cannot
pass as "no leak".  Packets go only between the namespaces it creates; it
removes them, the cgroup and the pins, whatever happens.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import click

from ksbpf.kernel import cgroup, netns, rawsock
from ksbpf.lab.namespaces import Lab, new_lab
from ksbpf.policy import Endpoint, Options, Policy
from ksbpf.scopes import cgroups

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
ICMPV6_CONTROL = range(130, 144)   # MLD, router and neighbour discovery: the kernel's own


class FarSide:
    """Counts the IP packets arriving on an interface of the server side
    (never those it sends), by (protocol, destination port), WireGuard's
    transport and ICMPv6 link control excepted."""

    def __init__(self, ns_path: str, ifname: str, wg_port: int):
        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
            s.bind((ifname, ETH_P_ALL))
            return s
        self.wg_port = wg_port
        self.seen: list[tuple[str, str, int]] = []   # (protocol, destination, destination port)
        self._sock = netns.run_in(ns_path, make)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not select.select([self._sock], [], [], 0.05)[0]:
                continue
            try:
                data, addr = self._sock.recvfrom(2048, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            if addr[2] == PACKET_OUTGOING:
                continue
            got = self._parse(addr[1], data)
            if got is not None:
                with self._lock:
                    self.seen.append(got)

    def _parse(self, ethertype: int, d: bytes) -> tuple[str, str, int] | None:
        if ethertype == 0x0800 and len(d) >= 20:
            proto, off, dst = d[9], (d[0] & 0xF) * 4, socket.inet_ntop(socket.AF_INET, d[16:20])
        elif ethertype == 0x86DD and len(d) >= 40:
            proto, off, dst = d[6], 40, socket.inet_ntop(socket.AF_INET6, d[24:40])
            if proto == 58 and len(d) > 40 and d[40] in ICMPV6_CONTROL:
                return None
        else:
            return None
        name = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}.get(proto, str(proto))
        ports = struct.unpack_from("!HH", d, off) if proto in (6, 17) and len(d) >= off + 4 else (0, 0)
        if proto == 17 and self.wg_port in ports:
            return None   # WireGuard's own transport (the tunnel carrying allowed traffic)
        return name, dst, ports[1]

    def count(self, dst: str | None = None, dport: int | None = None) -> int:
        """Packets to `dst` (any when None) and `dport` (any when None)."""
        with self._lock:
            return sum(1 for _n, d, p in self.seen if (dst is None or d == dst) and (dport is None or p == dport))

    def others(self, dst: str) -> list[tuple[str, str, int]]:
        with self._lock:
            return [x for x in self.seen if x[1] != dst]

    def reset(self) -> None:
        with self._lock:
            self.seen.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()

    def __enter__(self) -> "FarSide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Cell:
    vector: str
    leaked: int          # packets from the protected process that arrived
    control: int         # packets from the unprotected control that arrived
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.leaked:
            return "LEAK"
        if not self.control:
            return "BROKEN"   # the control did not arrive: this cell proves nothing
        return "ok"

    def to_dict(self) -> dict:
        return {"vector": self.vector, "leaked": self.leaked, "control": self.control,
                "verdict": self.verdict.lower(), "note": self.note}


def _argv(ns: str, cg: str | None, *cmd: str, no_raw: bool = False) -> list[str]:
    """cmd in the namespace, in the cgroup (joined first: `ip netns exec` hides cgroupfs)."""
    argv = ["ip", "netns", "exec", ns, *cmd]
    if no_raw:
        argv = ["setpriv", "--bounding-set", "-net_raw", *argv]
    if cg is None:
        return argv
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cg, *argv]


def _send(ns: str, cg: str | None, kind: str, dst: str, port: int = 0, no_raw: bool = False, **opts) -> dict:
    extra = [x for k, v in opts.items() if v is not None for x in (f"--{k}", str(v))]
    proc = subprocess.run(_argv(ns, cg, sys.executable, "-m", "ksbpf.verify.labsend", kind, dst, str(port), *extra,
                                no_raw=no_raw), capture_output=True, text=True, timeout=30)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"sent": 0, "errors": {"did not run": 1}, "stderr": proc.stderr.strip()[-200:]}


class _Stream:
    """A stream-udp sender in the background (a process of the cgroup, or not)."""

    def __init__(self, ns: str, cg: str | None, dst: str, port: int, seconds: float):
        self.proc = subprocess.Popen(_argv(ns, cg, sys.executable, "-m", "ksbpf.verify.labsend", "stream-udp", dst,
                                           str(port), "--seconds", str(seconds)),
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        ready = select.select([self.proc.stdout], [], [], 10)[0]
        if not ready or '"ready"' not in self.proc.stdout.readline():
            self.proc.kill()
            raise RuntimeError("the stream sender did not start")

    def wait(self) -> dict:
        out, _ = self.proc.communicate(timeout=60)
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return {}


@dataclass
class Matrix:
    cells: list[Cell] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.cells) and all(c.verdict == "ok" for c in self.cells)

    def render(self) -> str:
        w = max(len(c.vector) for c in self.cells)
        lines = [f"{'VECTOR':<{w}}  {'LEAKED':>6}  {'CONTROL':>7}  VERDICT"]
        for c in self.cells:
            lines.append(f"{c.vector:<{w}}  {c.leaked:>6}  {c.control:>7}  {c.verdict}" + (f"   ({c.note})" if c.note else ""))
        bad = [c for c in self.cells if c.verdict != "ok"]
        lines.append(f"{len(self.cells)} vectors: " + ("no leak, every control arrived" if not bad else
                     f"{sum(c.verdict == 'LEAK' for c in bad)} leak(s), {sum(c.verdict == 'BROKEN' for c in bad)} "
                     "cell(s) whose control did not arrive"))
        return "\n".join(lines) + "\n"


SETTLE = 0.15


class LeakLab:
    """The lab, the protected cgroup, the far side; one method per kind of cell."""

    def __init__(self, progress: Callable[[str], None]):
        self.progress = progress
        self.lab: Lab = new_lab("ksbpf-vl")
        self.cg = os.path.join(cgroup.cgroup2_root(), f"ksbpf-vl-{self.lab.tag}")
        self.other_ns = f"ksbpf-vl-{self.lab.tag}-x"
        self.matrix = Matrix()
        n = int(self.lab.tag, 16) % 250 + 1
        self.lan4 = (f"192.168.{n}.1", f"192.168.{n}.2")
        self.localnet4 = ("198.51.100.1", "198.51.100.2")   # a public range, handed out as on-link
        self.other4 = (f"198.19.{n}.1", f"198.19.{n}.2")
        self.far: FarSide | None = None
        self.far_other: FarSide | None = None

    # -- building and removing ------------------------------------------------------
    def ip(self, ns: str, *args: str) -> None:
        subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)

    def build(self) -> None:
        lab = self.lab
        lab.create()
        lab.tunnel_up()
        c, s = lab.client_ns, lab.server_ns
        for pair in (self.lan4, self.localnet4):
            self.ip(c, "addr", "add", f"{pair[0]}/24", "dev", lab.phy_client)
            self.ip(s, "addr", "add", f"{pair[1]}/24", "dev", lab.phy_server)
        os.mkdir(self.cg)
        self.policy = Policy((lab.wg_client,), (Endpoint.parse(lab.endpoint4),), lab.client_ns,
                             Options(allow_lan=True, allow_dhcp=True))
        cgroups.attach(self.cg, self.policy)
        self.far = FarSide(lab.server_path, lab.phy_server, lab.wg_port)

    def destroy(self) -> None:
        for f in (self.far, self.far_other):
            if f is not None:
                f.close()
        try:
            cgroups.remove_cgroup_tree(self.cg)
        finally:
            subprocess.run(["ip", "netns", "del", self.other_ns], capture_output=True)
            self.lab.destroy()

    # -- cells ------------------------------------------------------------------------
    def cell(self, vector: str, kind: str, dst: str, port: int = 0, ns: str | None = None,
             far: FarSide | None = None, note: str = "", protected_no_raw: bool = False, **opts) -> Cell:
        ns = ns or self.lab.client_ns
        far = far or self.far
        far.reset()
        attempt = _send(ns, self.cg, kind, dst, port, no_raw=protected_no_raw, **opts)
        time.sleep(SETTLE)
        leaked = far.count(dst)
        background = far.others(dst)
        far.reset()
        _send(ns, None, kind, dst, port, **opts)
        time.sleep(SETTLE)
        control = far.count(dst)
        if background:
            self.progress(f"{vector}: not counted, other traffic from the client meanwhile: {background}")
        errors = ", ".join(f"{k} x{v}" for k, v in attempt.get("errors", {}).items())
        cell = Cell(vector, leaked, control, note or (f"sender: {errors}" if errors else ""))
        self.matrix.cells.append(cell)
        self.progress(f"{vector}: {cell.verdict}")
        return cell

    def run(self) -> Matrix:
        lab = self.lab
        phy = lab.phy_client
        p = 33434
        self.cell("tcp over the physical link", "tcp", lab.phy4_server, p)
        self.cell("udp over the physical link", "udp", lab.phy4_server, p)
        self.cell("icmp over the physical link", "icmp", lab.phy4_server)
        self.cell("IPv6 tcp, global address on-link", "tcp", lab.phy6_server, p)
        self.cell("IPv6 udp, global address on-link", "udp", lab.phy6_server, p)
        self.cell("IPv6 icmp, global address on-link", "icmp", lab.phy6_server)
        self.cell("IPv6 multicast ff05::1:3 (site-local) out of the physical link", "mcast6-udp", "ff05::1:3", 547,
                  dev=phy)
        self.cell("udp with SO_BINDTODEVICE to the physical link", "bind-udp", lab.net4_server, p, dev=phy)
        self.cell("udp with IP_PKTINFO naming the physical link", "pktinfo-udp", lab.net4_server, p, dev=phy)
        self.cell("IPv6 udp with IPV6_PKTINFO naming the physical link", "pktinfo-udp", lab.net6_server, p, dev=phy)
        self.cell("raw IPv4 socket (SOCK_RAW)", "raw-udp", lab.phy4_server, p)
        self.cell("AF_PACKET without CAP_NET_RAW", "packet-udp", lab.phy4_server, p, protected_no_raw=True,
                  dev=phy, src=lab.phy4_client,
                  note="refused: AF_PACKET bypasses cgroup hooks; `ksbpf verify` warns of processes with CAP_NET_RAW")
        if rawsock.available():   # the kernel runs BPF LSM programs: the scope's own is in force
            self.cell("AF_PACKET with CAP_NET_RAW", "packet-udp", lab.phy4_server, p, dev=phy, src=lab.phy4_client,
                      note="the socket is refused by ksbpf's BPF LSM program on the scope (EPERM)")
        self.cell("endpoint address, another udp port", "udp", lab.phy4_server, p)
        self.cell("endpoint address, tcp on the endpoint's port", "tcp", lab.phy4_server, lab.wg_port)
        self.cell("endpoint address, icmp", "icmp", lab.phy4_server)
        self.cell("DNS over udp to a LAN address (--allow-lan)", "udp", self.lan4[1], 53)
        self.cell("DNS over tcp to a LAN address (--allow-lan)", "tcp", self.lan4[1], 53)
        self.cell("a public range handed out as on-link (TunnelCrack LocalNet)", "udp", self.localnet4[1], p)
        self.cell("DHCP client port, 1,400 bytes, to a non-LAN server (--allow-dhcp)", "dhcp-udp",
                  self.localnet4[1], 67)
        self.cell("DHCPv6 client port, 1,400 bytes, to a global address (--allow-dhcp)", "dhcp-udp",
                  lab.phy6_server, 547)
        self._more_specific_route(p)
        self._same_ifindex_elsewhere(p)
        self._reattach_under_load()
        self._tunnel_deleted_mid_stream()
        return self.matrix

    def _more_specific_route(self, port: int) -> None:
        lab = self.lab
        self.ip(lab.client_ns, "route", "add", f"{lab.net4_server}/32", "via", lab.phy4_server, "dev", lab.phy_client)
        try:
            self.cell("a more specific route through the physical link (TunnelVision)", "udp", lab.net4_server, port)
        finally:
            self.ip(lab.client_ns, "route", "del", f"{lab.net4_server}/32")

    def _same_ifindex_elsewhere(self, port: int) -> None:
        """The tunnel's ifindex in another namespace: the scope's processes
        there must not pass as the tunnel (tunnels are keyed by namespace too)."""
        lab = self.lab
        index = netns.ifindex(netns.resolve(lab.client_path), lab.wg_client)
        subprocess.run(["ip", "netns", "add", self.other_ns], check=True, capture_output=True)
        self.ip(self.other_ns, "link", "set", "lo", "up")
        self.ip(self.other_ns, "link", "add", "vx", "index", str(index), "type", "veth", "peer", "name",
                f"vxs{lab.tag}", "netns", lab.server_ns)
        self.ip(self.other_ns, "addr", "add", f"{self.other4[0]}/24", "dev", "vx")
        self.ip(self.other_ns, "link", "set", "vx", "up")
        self.ip(lab.server_ns, "addr", "add", f"{self.other4[1]}/24", "dev", f"vxs{lab.tag}")
        self.ip(lab.server_ns, "link", "set", f"vxs{lab.tag}", "up")
        time.sleep(0.3)   # the link comes up
        self.far_other = FarSide(lab.server_path, f"vxs{lab.tag}", lab.wg_port)
        self.cell(f"the tunnel's ifindex ({index}) in another namespace", "udp", self.other4[1], port,
                  ns=self.other_ns, far=self.far_other)

    def _stream_cell(self, vector: str, dst: str, ports: tuple[int, int], meanwhile: Callable[[], None],
                     note: Callable[[dict], str]) -> None:
        """A 1/ms udp stream from the cgroup (to ports[0]) and a control stream
        from outside it (to ports[1]) while `meanwhile` happens."""
        lab, far = self.lab, self.far
        far.reset()
        protected = _Stream(lab.client_ns, self.cg, dst, ports[0], 1.5)
        control = _Stream(lab.client_ns, None, dst, ports[1], 1.5)
        meanwhile()
        got = protected.wait()
        control.wait()
        time.sleep(SETTLE)
        cell = Cell(vector, far.count(dport=ports[0]), far.count(dport=ports[1]), note(got))
        self.matrix.cells.append(cell)
        self.progress(f"{cell.vector}: {cell.verdict}")

    def _reattach_under_load(self) -> None:
        def reattach() -> None:
            for _ in range(3):
                cgroups.attach(self.cg, self.policy)   # make-before-break, under load
        self._stream_cell("re-attach (3x, make-before-break) under a 1/ms udp stream", self.lab.phy4_server,
                          (33500, 33501), reattach,
                          lambda got: f"{got.get('errors', {}).get('EPERM', 0)} datagrams refused, {got.get('sent', 0)} sent")

    def _tunnel_deleted_mid_stream(self) -> None:
        def delete() -> None:
            time.sleep(0.3)            # both flow through the tunnel ...
            self.lab.tunnel_down()     # ... which is deleted: the default route now leads over the physical link
        self._stream_cell("the tunnel deleted mid-stream (route falls back to the physical link)", self.lab.net4_server,
                          (33600, 33601), delete,
                          lambda got: f"{got.get('sent', 0)} datagrams sent through the tunnel, "
                                      f"{got.get('errors', {}).get('EPERM', 0)} refused after it was deleted")


def run_lab(as_json: bool = False, progress: Callable[[str], None] | None = None) -> bool:
    """Build the lab, run the matrix, print it, remove everything; True when nothing leaked
    and every control arrived."""
    say = progress or (lambda msg: click.echo(f"ksbpf: {msg}", err=True))
    lab = LeakLab(say)
    start = time.monotonic()
    try:
        say(f"building the lab (namespaces {lab.lab.client_ns}, {lab.lab.server_ns}; wireguard-go tunnel)")
        lab.build()
        matrix = lab.run()
    finally:
        lab.destroy()
    if as_json:
        click.echo(json.dumps({"ok": matrix.ok, "seconds": round(time.monotonic() - start, 1),
                               "cells": [c.to_dict() for c in matrix.cells]}, indent=2))
    else:
        click.echo(matrix.render(), nl=False)
        click.echo(f"({time.monotonic() - start:.1f} s; LEAKED: packets from the protected process that reached the "
                   "far side of the physical link; CONTROL: the same from a process outside the cgroup)")
    return matrix.ok
