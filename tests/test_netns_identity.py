"""How the cgroup hook knows a packet's network namespace, on every kernel.

Linux >= 6.17 lets cgroup_skb programs ask bpf_get_netns_cookie; older
kernels (every distribution's own, 5.15-6.12) do not, and there the scope's
sock_create program records each socket's namespace in socket storage when
the socket is created (ebpf/ksbpf.c, sk_netns).  These tests run the storage
variant on this kernel (KSBPF_NETNS_IDENTITY=storage, which the ksbpf
processes inherit) with real sockets in a lab with a real wireguard-go
tunnel: what a 6.1 or 6.12 kernel runs.  Every "blocked" has a control that
passes.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
from helpers import dropped, ksbpf, packets, scope_status

from ksbpf.kernel import bpf, features, netns
from ksbpf.lab.namespaces import ProbeStream, _in_cgroup_and_ns, probe

pytestmark = pytest.mark.lab


@pytest.fixture(autouse=True)
def storage(monkeypatch):
    monkeypatch.setenv(features.NETNS_ENV, features.NETNS_STORAGE)


def attach(lab, cg: str, *extra: str) -> None:
    ksbpf("attach", "--cgroup", cg, "--tunnel", lab.wg_client, "--netns", lab.client_ns,
          "--endpoint", lab.endpoint4, *extra, check=True)


def test_status_and_pins_show_socket_storage(lab, make_cgroup):
    cg = make_cgroup()
    attach(lab, cg)
    out = ksbpf("status", check=True).stdout
    assert "socket storage" in out


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("kind", ["tcp", "udp", "icmp"])
def test_tunnel_passes_physical_link_blocked(lab, servers, make_cgroup, kind, family):
    cg = make_cgroup()
    attach(lab, cg)
    before = packets(cg, "tunnel")
    tun, phy = getattr(lab, f"tun{family}_server"), getattr(lab, f"phy{family}_server")
    assert probe(lab, cg, kind, tun, servers[kind]).ok
    assert packets(cg, "tunnel") > before
    assert not probe(lab, cg, kind, phy, servers[kind], timeout=1.0).ok
    assert probe(lab, None, kind, phy, servers[kind]).ok   # control: unprotected, it arrives


def test_socket_older_than_the_attach_is_blocked_even_through_the_tunnel(lab, servers, make_cgroup):
    """Fail closed: a socket created before the scope's programs has no recorded
    namespace, so it is never taken for a tunnel's; a new socket of the same
    scope passes."""
    cg = make_cgroup()
    with ProbeStream(lab, cg, lab.tun4_server, servers["udp"], interval_ms=2) as old:
        time.sleep(0.1)
        out = ksbpf("attach", "--cgroup", cg, "--tunnel", lab.wg_client, "--netns", lab.client_ns,
                    "--endpoint", lab.endpoint4, check=True).stdout
        assert "process(es) already in the scope keep sockets opened before now blocked" in out   # said at attach
        with ProbeStream(lab, cg, lab.tun4_server, servers["udp"], interval_ms=2) as new:
            time.sleep(0.3)
    assert old.result.blocked > 0, old.result
    assert new.result.sent > 0 and new.result.blocked == 0, new.result


def test_a_re_attach_keeps_the_sockets_namespaces(lab, servers, make_cgroup):
    """A policy change (make-before-break) shares the old scope's socket storage:
    a stream through the tunnel goes on without a single drop."""
    cg = make_cgroup()
    attach(lab, cg)
    with ProbeStream(lab, cg, lab.tun4_server, servers["udp"], interval_ms=2) as stream:
        time.sleep(0.1)
        attach(lab, cg, "--allow-lan")
        attach(lab, cg, "--allow-dhcp")
        time.sleep(0.1)
    assert stream.result.sent > 0 and stream.result.blocked == 0, stream.result
    assert dropped(cg) == 0


LISTENER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 0))
s.listen()
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
c.sendall(b"x" * 200000)
c.close()
"""


def test_accepted_connections_inherit_the_listeners_namespace(lab, make_cgroup):
    """A server in the scope: the accepted socket is made by the kernel (no
    sock_create), and inherits the listener's recorded namespace (BPF_F_CLONE),
    so its replies go out through the tunnel."""
    cg = make_cgroup()
    attach(lab, cg)
    proc = subprocess.Popen(_in_cgroup_and_ns(lab, cg, sys.executable, "-c", LISTENER, lab.tun4_client),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())

        def fetch() -> int:
            with socket.create_connection((lab.tun4_client, port), timeout=5) as s:
                got = 0
                while chunk := s.recv(65536):
                    got += len(chunk)
                return got
        assert netns.run_in(lab.server_path, fetch) == 200000
    finally:
        proc.kill()
        proc.wait()
    assert dropped(cg) == 0


@contextmanager
def colliding_veth(lab, tag: str):
    """Two namespaces of our own joined by a veth whose end in the first has
    the lab tunnel's ifindex (the ifindex collision): yields (x, y); x sends
    to 192.0.2.2, y's address."""
    wg_index = netns.ifindex(netns.resolve(lab.client_ns), lab.wg_client)
    x, y = f"ksbpf-ix{tag}-x", f"ksbpf-ix{tag}-y"
    try:
        for ns in (x, y):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", x, "link", "add", "vx0", "index", str(wg_index), "type", "veth",
                        "peer", "name", "vy0", "netns", y], check=True)
        for ns, dev, addr in ((x, "vx0", "192.0.2.1/24"), (y, "vy0", "192.0.2.2/24")):
            subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        assert netns.ifindex(netns.resolve(x), "vx0") == wg_index
        yield x, y
    finally:
        for ns in (x, y):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def identities():
    return pytest.mark.parametrize("identity", [features.NETNS_STORAGE, features.NETNS_HELPER])


def use_identity(identity: str, monkeypatch) -> None:
    if identity == features.NETNS_HELPER and not features.has("netns_cookie_cgroup_skb"):
        pytest.skip("this kernel's cgroup_skb programs cannot ask bpf_get_netns_cookie")
    monkeypatch.setenv(features.NETNS_ENV, identity)


@identities()
def test_same_ifindex_in_another_namespace_is_not_the_tunnel(lab, make_cgroup, tag, identity, monkeypatch):
    """A process of the scope in another namespace, whose veth has the tunnel's
    ifindex: it is not the tunnel.  The scope was attached empty, so its
    egress program trusted the tunnel filter (no per-packet namespace check);
    the first socket made in the other namespace ends that, before it sends."""
    use_identity(identity, monkeypatch)
    cg = make_cgroup()
    attach(lab, cg)
    assert scope_status(cg)["netns_fast"] is True
    assert probe(lab, cg, "icmp", lab.tun4_server).ok   # the fast path: the tunnel passes
    with colliding_veth(lab, tag) as (x, _y):
        before = packets(cg, "not_tunnel")
        assert not probe(x, cg, "icmp", "192.0.2.2", timeout=1.0).ok
        assert packets(cg, "not_tunnel") > before
        assert scope_status(cg)["netns_fast"] is False   # for good: every packet is asked from now on
        assert probe(x, None, "icmp", "192.0.2.2").ok        # control: unprotected, it arrives
        assert probe(lab, cg, "icmp", lab.tun4_server).ok   # control: the real tunnel passes


RECEIVER = """
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("192.0.2.2", int(sys.argv[1])))
n = 0
print("ready", flush=True)
while True:
    s.recv(64)
    n += 1
    with open(sys.argv[2] + ".tmp", "w") as f:
        f.write(str(n))
    os.replace(sys.argv[2] + ".tmp", sys.argv[2])
"""


@identities()
def test_same_ifindex_through_a_socket_older_than_the_attach(lab, make_cgroup, tag, identity, monkeypatch, tmp_path):
    """The other door of the ifindex collision: a socket made in the other
    namespace BEFORE the attach, by a process of the cgroup.  No sock_create
    program saw it, so nothing marks the scope foreign: the scope is on the
    per-packet path because it was attached over a running process, and
    that check alone must stop it (socket storage: no record; the helper:
    another namespace).  Control: the same socket reaches its peer until the
    attach, and a new socket of the scope still reaches the real tunnel."""
    use_identity(identity, monkeypatch)
    cg = make_cgroup()
    count = tmp_path / "received"

    def received() -> int:
        return int(count.read_text()) if count.exists() else 0
    with colliding_veth(lab, tag) as (x, y):
        rx = subprocess.Popen(["ip", "netns", "exec", y, sys.executable, "-c", RECEIVER, "9999", str(count)],
                              stdout=subprocess.PIPE, text=True)
        try:
            assert rx.stdout.readline().strip() == "ready"
            with ProbeStream(x, cg, "192.0.2.2", 9999, interval_ms=2) as old:
                deadline = time.monotonic() + 5
                while received() < 20 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert received() >= 20                       # control: before the attach it arrives
                attach(lab, cg)
                st = scope_status(cg)
                assert st["netns_fast"] is False
                with bpf.ScopeMaps.from_pins(st["pin_dir"]) as maps:
                    assert maps.netns_fast() == (False, False)   # not allowed, and no foreign socket seen
                time.sleep(0.2)                               # packets in flight at the attach land
                at_attach, blocked = received(), packets(cg, "not_tunnel")
                time.sleep(0.5)
                assert received() == at_attach                # nothing through the colliding veth
                assert packets(cg, "not_tunnel") > blocked    # the old socket kept sending, blocked
            assert old.result.blocked > 0, old.result
            assert probe(lab, cg, "icmp", lab.tun4_server).ok   # control: the real tunnel passes
        finally:
            rx.kill()
            rx.wait()


def test_a_scope_attached_over_running_processes_checks_every_packet(lab, servers, make_cgroup):
    """Processes that ran before the attach may hold sockets of any namespace:
    no fast path; their new sockets reach the tunnel all the same."""
    cg = make_cgroup()
    sleeper = subprocess.Popen(_in_cgroup_and_ns(lab, cg, "sleep", "60"))
    try:
        time.sleep(0.2)
        attach(lab, cg)
        assert scope_status(cg)["netns_fast"] is False
        assert probe(lab, cg, "udp", lab.tun4_server, servers["udp"]).ok
        assert not probe(lab, cg, "udp", lab.phy4_server, servers["udp"], timeout=1.0).ok
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_fast_path_survives_a_policy_change_but_not_a_namespace_change(lab, servers, make_cgroup):
    cg = make_cgroup()
    attach(lab, cg)
    assert scope_status(cg)["netns_fast"] is True
    attach(lab, cg, "--allow-lan")                 # same namespace: the shared map keeps it
    assert scope_status(cg)["netns_fast"] is True
    ksbpf("attach", "--cgroup", cg, "--tunnel", lab.wg_client, "--netns", lab.server_ns, check=True)
    assert scope_status(cg)["netns_fast"] is False   # sockets of the old namespace are not the new one's
    attach(lab, cg)
    assert scope_status(cg)["netns_fast"] is False
    assert probe(lab, cg, "udp", lab.tun4_server, servers["udp"]).ok
