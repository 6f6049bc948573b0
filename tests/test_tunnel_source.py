"""Cgroup scopes: packets the kernel sends for a scope WITHOUT the scope's
socket (issue 18, row 7) -- a TIME_WAIT socket's ACKs and the RSTs of TCP's
control socket, whose cgroup is the root, so the cgroup hook never sees
them.  The scope's netfilter hook in the tunnel's namespace (ksbpf_nf_src)
drops every packet whose source address is the tunnel's when it leaves
through another interface (reason tunnel_source).

Each case: the answers carrying the tunnel address are counted on the far
side of the physical link (0 must arrive while the scope is attached), with
a control that arrives (the same exchange on the physical address, and the
same exchange once the scope is detached).  The scope is detached in the
finalizer (its pinned links would keep the namespace alive)."""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import time

import pytest
from helpers import ksbpf, scope_status

from ksbpf.kernel import netns, nf
from ksbpf.scopes import cgroups

pytestmark = [pytest.mark.lab,
              pytest.mark.skipif(not nf.supported(), reason="this kernel has no netfilter BPF links (Linux 6.4+)")]
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
CLOSED_PORT = 47999


@pytest.fixture
def scope(request, lab, make_cgroup):
    path = make_cgroup()
    request.addfinalizer(lambda: cgroups.detach(path))
    ksbpf("attach", "--cgroup", path, "--tunnel", lab.wg_client, "--netns", lab.client_ns,
          "--endpoint", lab.endpoint4, check=True)
    st = scope_status(path)
    assert st["tunnel_source"] == "on", st
    return path


class FromSniffer:
    """IPv4 packets arriving at the server's physical interface, by source address."""

    def __init__(self, lab):
        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind((lab.phy_server, ETH_P_IP))
            return s
        self.sock = netns.run_in(lab.server_path, make)
        self.seen: dict[str, list[int]] = {}   # source -> TCP flags of each packet

    def read(self, settle: float = 0.3) -> None:
        time.sleep(settle)   # packets in flight arrive
        while True:
            try:
                data, addr = self.sock.recvfrom(256, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            if addr[2] == PACKET_OUTGOING or len(data) < 20 or data[9] != socket.IPPROTO_TCP:
                continue
            ihl = (data[0] & 0xF) * 4
            flags = data[ihl + 13] if len(data) > ihl + 13 else 0
            self.seen.setdefault(socket.inet_ntoa(data[12:16]), []).append(flags)

    def count(self, src: str) -> int:
        self.read()
        return len(self.seen.get(src, []))

    def close(self) -> None:
        self.sock.close()


def _run(cmd: str) -> None:
    subprocess.run(cmd.split(), check=True)


def _connects(lab, dst: str, port: int, n: int) -> dict[str, int]:
    """n TCP connects from the server namespace: outcome -> count."""
    def run() -> dict[str, int]:
        out: dict[str, int] = {}
        for _ in range(n):
            s = socket.socket()
            s.settimeout(0.3)
            try:
                s.connect((dst, port))
                key = "connected"
            except ConnectionRefusedError:
                key = "refused"
            except (TimeoutError, socket.timeout):
                key = "timeout"
            finally:
                s.close()
            out[key] = out.get(key, 0) + 1
        return out
    return netns.run_in(lab.server_path, run)


def test_rst_to_a_closed_port_of_the_tunnel_address_stays_in(lab, scope):
    """The tunnel is up; the far side reaches the tunnel address over the
    physical link (a /32 route on its side) and knocks on a closed port: the
    RST comes from TCP's control socket with the tunnel's source address."""
    _run(f"ip -n {lab.server_ns} route add {lab.tun4_client}/32 via {lab.phy4_client} dev {lab.phy_server}")
    sniffer = FromSniffer(lab)
    try:
        before = scope_status(scope)["counters"]["tunnel_source"]["packets"]
        blocked = _connects(lab, lab.tun4_client, CLOSED_PORT, 10)
        leaked = sniffer.count(lab.tun4_client)
        dropped = scope_status(scope)["counters"]["tunnel_source"]["packets"] - before
        control = _connects(lab, lab.phy4_client, CLOSED_PORT, 10)   # the physical address: RSTs arrive
        control_seen = sniffer.count(lab.phy4_client)
        ksbpf("detach", "--cgroup", scope, check=True)
        after = _connects(lab, lab.tun4_client, CLOSED_PORT, 5)       # without the hook: the RSTs leak
        after_seen = sniffer.count(lab.tun4_client)
    finally:
        sniffer.close()
    print(f"tunnel source, RST to a closed port: {leaked} arrived of 10 knocks ({blocked}); {dropped} dropped "
          f"as tunnel_source; control: {control_seen} RSTs from the physical address ({control}); "
          f"detached: {after_seen} RSTs from the tunnel address ({after})")
    assert leaked == 0 and blocked.get("refused", 0) == 0
    assert dropped >= 10
    assert control.get("refused") == 10 and control_seen >= 10
    assert after.get("refused") == 5 and after_seen >= 5


TIME_WAIT_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"hello")
print(s.getsockname()[1], flush=True)
s.shutdown(socket.SHUT_WR)      # we close first: this side ends in TIME_WAIT
s.settimeout(5)
while s.recv(100):
    pass
s.close()
"""


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _segment(src: str, dst: str, sport: int, dport: int, seq: int) -> bytes:
    """A TCP ACK with one byte of data, out of the TIME_WAIT socket's window."""
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, 1, 5 << 4, 0x10, 65535, 0, 0) + b"x"
    pseudo = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + struct.pack("!BBH", 0, 6, len(hdr))
    csum = _checksum(pseudo + hdr)
    return hdr[:16] + struct.pack("!H", csum) + hdr[18:]


def _time_wait(lab, scope_path: str) -> tuple[int, int]:
    """A connection of the scope through the tunnel, closed by the scope's side
    first: (the scope's port, the server's port) of its TIME_WAIT socket."""
    listener = netns.run_in(lab.server_path, lambda: socket.create_server(("0.0.0.0", 0)))
    port = listener.getsockname()[1]
    argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', scope_path,
            "ip", "netns", "exec", lab.client_ns, sys.executable, "-c", TIME_WAIT_CLIENT, lab.tun4_server, str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    listener.settimeout(10)
    conn, _ = listener.accept()
    conn.settimeout(10)
    while conn.recv(100):
        pass
    conn.close()
    listener.close()
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    cport = int(out.split()[0])
    end = time.monotonic() + 10
    while time.monotonic() < end:
        ss = subprocess.run(["ip", "netns", "exec", lab.client_ns, "ss", "-Htan", "state", "time-wait"],
                            capture_output=True, text=True).stdout
        if f"{lab.tun4_client}:{cport}" in ss:
            return cport, port
        time.sleep(0.05)
    raise AssertionError(f"no TIME_WAIT socket on {lab.tun4_client}:{cport}")


def _knock(lab, cport: int, sport: int, n: int) -> None:
    """n out-of-window segments from the server's tunnel address to the TIME_WAIT socket, over the physical link."""
    def run() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
        try:
            s.bind((lab.tun4_server, 0))
            for i in range(n):
                s.sendto(_segment(lab.tun4_server, lab.tun4_client, sport, cport, 1000 + i), (lab.tun4_client, 0))
        finally:
            s.close()
    netns.run_in(lab.server_path, run)


@pytest.mark.parametrize("how", ["tunnel up, /32 route via the physical link", "tunnel link down"])
def test_time_wait_answers_stay_in(lab, scope, how):
    cport, sport = _time_wait(lab, scope)
    # every out-of-window segment is answered (not one per half second)
    _run(f"ip netns exec {lab.client_ns} sysctl -q -w net.ipv4.tcp_invalid_ratelimit=0")
    _run(f"ip -n {lab.client_ns} route add {lab.tun4_server}/32 via {lab.phy4_server} dev {lab.phy_client}")
    _run(f"ip -n {lab.server_ns} route add {lab.tun4_client}/32 via {lab.phy4_client} dev {lab.phy_server}")
    if how == "tunnel link down":
        _run(f"ip -n {lab.client_ns} link set {lab.wg_client} down")
    sniffer = FromSniffer(lab)
    try:
        before = scope_status(scope)["counters"]["tunnel_source"]["packets"]
        _knock(lab, cport, sport, 10)
        leaked = sniffer.count(lab.tun4_client)
        dropped = scope_status(scope)["counters"]["tunnel_source"]["packets"] - before
        ksbpf("detach", "--cgroup", scope, check=True)
        _knock(lab, cport, sport, 10)   # control: the same knocks without the hook are answered
        answered = sniffer.count(lab.tun4_client)
    finally:
        sniffer.close()
    print(f"tunnel source, TIME_WAIT ({how}): {leaked} of 10 answers arrived, {dropped} dropped as "
          f"tunnel_source; detached (control): {answered} answers arrived")
    assert leaked == 0
    assert dropped >= 10
    assert answered >= 10


def test_the_daemon_follows_the_tunnels_addresses(lab, make_cgroup, run_daemon, request):
    """The scope is attached while its tunnel does not exist: no address is
    known, no hook.  The tunnel comes up: the daemon records its addresses and
    attaches the hook; the tunnel is deleted: its last-known addresses stay
    (ifindex 0), and so does the hook."""
    from ksbpf.kernel import bpf
    lab.tunnel_down()
    cg = make_cgroup()
    request.addfinalizer(lambda: cgroups.detach(cg))
    d = run_daemon([{"cgroup": cg, "tunnels": [lab.wg_client], "netns": lab.client_ns,
                     "endpoints": [lab.endpoint4]}])
    st = scope_status(cg)
    assert st["tunnel_source"].startswith("waiting"), st["tunnel_source"]
    mark = len(d.events)
    lab.tunnel_up()
    d.wait_for("tunnel_source_hook", after=mark)
    sources = d.named("tunnel_sources")
    assert any(lab.tun4_client in e["added"] for e in sources), sources
    assert scope_status(cg)["tunnel_source"] == "on"
    _run(f"ip -n {lab.server_ns} route add {lab.tun4_client}/32 via {lab.phy4_client} dev {lab.phy_server}")
    sniffer = FromSniffer(lab)
    try:
        knocks = _connects(lab, lab.tun4_client, CLOSED_PORT, 5)
        leaked = sniffer.count(lab.tun4_client)
        control = _connects(lab, lab.phy4_client, CLOSED_PORT, 5)
        control_seen = sniffer.count(lab.phy4_client)
    finally:
        sniffer.close()
    assert leaked == 0 and knocks.get("timeout") == 5
    assert control.get("refused") == 5 and control_seen >= 5
    mark = len(d.events)
    lab.tunnel_down()
    d.wait_for("map_update", after=mark)
    with bpf.ScopeMaps.from_pins(st["pin_dir"]) as maps:
        kept = {str(a): v for (_c, a), v in maps.tunnel_sources().items()}
    assert kept.get(lab.tun4_client) == (0, lab.wg_client), kept   # the tunnel is gone, its address is remembered
    assert scope_status(cg)["tunnel_source"] == "on"
