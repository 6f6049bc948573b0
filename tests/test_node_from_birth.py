"""Node mode "from birth": the netfilter hook (IPv4 and IPv6 POST_ROUTING)
that a one-shot `ksbpf attach --node` puts in the namespace beside the tc
guards judges the IP traffic of interfaces created AFTER attaching -- which
no tc guard can cover before it exists -- without the daemon.

Issue 18, rows 1 and 2 (the IP part): a new uplink appears after a one-shot
attach (veth, address, up) and the host's and a forwarded container's
traffic follow its connected route; a veth is created already up while a
sender is already sending.  The tunnel is down, so every packet must be
dropped: 0 arrive.  Control: the same senders' packets arrive once node mode
is detached (the counting works, the route works).  Every test detaches and
unpins in its finalizer: a pinned netfilter link keeps its namespace alive."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import threading
import time

import pytest
from helpers import ksbpf

from ksbpf.kernel import bpf, nf, tc
from ksbpf.lab.namespaces import UdpEchoServer, new_lab
from ksbpf.kernel import netns
from ksbpf.scopes import node

pytestmark = [pytest.mark.lab,
              pytest.mark.skipif(not nf.supported(), reason="this kernel has no netfilter BPF links (Linux 6.4+)")]
PORT = 47011


@pytest.fixture
def host(request):
    lab = new_lab("ksbpfb")
    request.addfinalizer(lab.destroy)
    lab.create()
    lab.tunnel_up()
    lab.add_containers(1)
    return lab


@pytest.fixture
def one_shot(request, host):
    """A one-shot node attach (no daemon), then the tunnel goes away: every
    non-local packet must be dropped.  Detached (links unpinned) at teardown."""
    def detach() -> None:
        if os.path.exists(host.client_path):
            node.detach(host.client_path)
    request.addfinalizer(detach)
    out = json.loads(ksbpf("attach", "--node", "--netns", host.client_path, "--tunnel", host.wg_client,
                           "--endpoint", host.endpoint4, "--json", check=True).stdout)
    assert out["from_birth"] == "on", out
    host.tunnel_down()
    return out


def _status(lab) -> dict:
    nodes = json.loads(ksbpf("status", "--json", check=True).stdout)["nodes"]
    return [n for n in nodes if n["netns"] == lab.client_path][0]


class Sender:
    """A thread in a namespace sending UDP datagrams to (dst, PORT) as fast
    as a loop goes, until stopped; counts what the kernel refused (EPERM)."""

    def __init__(self, ns_path: str, dst: str):
        self.ns_path, self.dst = ns_path, dst
        self.sent = self.refused = self.other = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=netns.run_in, args=(ns_path, self._loop), daemon=True)

    def _loop(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            while not self._stop.is_set():
                try:
                    s.sendto(b"from-birth", (self.dst, PORT))
                    self.sent += 1
                except OSError as exc:
                    if exc.errno == errno.EPERM:
                        self.refused += 1
                    else:
                        self.other += 1
                    time.sleep(0.0005)
        finally:
            s.close()

    def send_some(self, n: int) -> None:
        """Exactly n sends (after the thread is stopped or never started)."""
        def run() -> None:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                for _ in range(n):
                    try:
                        s.sendto(b"from-birth", (self.dst, PORT))
                        self.sent += 1
                    except OSError as exc:
                        self.refused += exc.errno == errno.EPERM
                        self.other += exc.errno != errno.EPERM
            finally:
                s.close()
        netns.run_in(self.ns_path, run)

    def __enter__(self) -> "Sender":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def _wait_received(server: UdpEchoServer, at_least: int, timeout: float = 10) -> int:
    """Wait (not a timing assertion: the control just must arrive) until the
    server counted at_least datagrams; returns what it counted."""
    end = time.monotonic() + timeout
    while server.received < at_least and time.monotonic() < end:
        time.sleep(0.02)
    return server.received


def _new_uplink(lab, up_at_birth: bool = False) -> tuple[str, str]:
    """A second veth between the host and the far side, on its own subnet;
    returns (its name, the far side's address)."""
    n = int(lab.tag, 16) % 250 + 1
    near, far = f"nu{lab.tag}", f"nus{lab.tag}"
    up = ["up"] if up_at_birth else []
    subprocess.run(["ip", "-n", lab.client_ns, "link", "add", near, *up, "type", "veth",
                    "peer", "name", far, "netns", lab.server_ns], check=True)
    for cmd in (f"ip -n {lab.server_ns} addr add 198.19.{n}.2/24 dev {far}",
                f"ip -n {lab.server_ns} link set {far} up",
                f"ip -n {lab.client_ns} addr add 198.19.{n}.1/24 dev {near}",
                f"ip -n {lab.client_ns} link set {near} up"):
        subprocess.run(cmd.split(), check=True)
    return near, f"198.19.{n}.2"


def test_a_new_uplink_after_a_one_shot_attach_leaks_nothing(host, one_shot):
    """Row 1: a new uplink (veth, address, up) after `ksbpf attach --node`;
    the host's and a forwarded container's traffic follow its connected route."""
    container = host.containers[0]
    with UdpEchoServer(host, PORT) as server:
        near, far = _new_uplink(host)
        st = _status(host)
        new = [i for i in st["interfaces"] if i["name"] == near][0]
        assert new["role"] == "guarded" and not new["guarded"]   # no tc guard: only the netfilter hook
        assert st["from_birth"] == "on"
        drops_before = st["counters"]["not_tunnel"]["packets"]
        from_host = Sender(host.client_path, far)
        from_container = Sender(f"/var/run/netns/{container}", far)
        from_host.send_some(1500)
        from_container.send_some(1500)
        time.sleep(0.3)   # packets in flight, if any, arrive
        leaked = server.received
        drops = _status(host)["counters"]["not_tunnel"]["packets"] - drops_before
        # control: the same route, the same senders, node mode detached: they arrive
        ksbpf("detach", "--node", "--netns", host.client_path, check=True)
        from_host.send_some(20)
        from_container.send_some(20)
        arrived = _wait_received(server, leaked + 40) - leaked
    print(f"node from birth, new uplink: host {from_host.refused}/1500 refused (EPERM), "
          f"container 1500 sent; {leaked} of 3000 arrived; netfilter counted {drops} drops; control {arrived}/40 arrived")
    assert leaked == 0
    assert from_host.refused == 1500                 # a local send is refused at once
    assert drops >= 3000
    assert arrived == 40


def test_a_veth_created_up_while_sending_leaks_no_ip(host, one_shot):
    """Row 2, the IP part: a sender is already sending when the veth is
    created already up and gets its address: not one IP packet gets out."""
    with UdpEchoServer(host, PORT) as server:
        n = int(host.tag, 16) % 250 + 1
        far = f"198.19.{n}.2"
        with Sender(host.client_path, far) as sender:
            _new_uplink(host, up_at_birth=True)
            end = time.monotonic() + 10
            while sender.refused < 2000 and time.monotonic() < end:
                time.sleep(0.01)
            leaked = server.received
            refused = sender.refused
            ksbpf("detach", "--node", "--netns", host.client_path, check=True)
            arrived = _wait_received(server, leaked + 20) - leaked
    print(f"node from birth, veth created up: {refused} sends refused, {leaked} arrived; control {arrived} arrived")
    assert leaked == 0
    assert refused >= 2000
    assert arrived >= 20


def test_links_are_pinned_with_the_scope_and_removed_by_detach(host, one_shot):
    pin_dir = one_shot["pin_dir"]
    state = node.nf_links(pin_dir)
    assert set(state) == {"ipv4", "ipv6"}
    assert all(i is not None and i.alive and i.hooknum == nf.NF_INET_POST_ROUTING for i in state.values())
    assert {i.pf for i in state.values()} == {nf.NFPROTO_IPV4, nf.NFPROTO_IPV6}
    ids = {i.id for i in state.values()}
    assert ids <= set(tc.link_ids())
    # what the hook leaves to others: loopback, the guarded uplink, the bridge and its veths (internal)
    by_name = {i["name"]: i["ifindex"] for i in one_shot["interfaces"]}
    with bpf.ScopeMaps.from_pins(pin_dir) as maps:
        passed = maps.nf_pass()
    assert passed == {by_name["lo"], by_name[host.phy_client], by_name[host.bridge], by_name[f"veth1{host.tag}"]} | (
        {by_name[host.wg_client]} if host.wg_client in by_name else set()), (passed, by_name)
    # re-attach: make-before-break at the other priority
    again = json.loads(ksbpf("attach", "--node", "--netns", host.client_path, "--tunnel", host.wg_client,
                             "--endpoint", host.endpoint4, "--json", check=True).stdout)
    new = node.nf_links(again["pin_dir"])
    assert {i.priority for i in new.values()} != {i.priority for i in state.values()}
    assert not ids & set(tc.link_ids())              # the old links are gone
    ksbpf("detach", "--node", "--netns", host.client_path, check=True)
    assert not {i.id for i in new.values()} & set(tc.link_ids())
    assert not os.path.exists(again["pin_dir"])


def test_status_reports_a_missing_link(host, one_shot):
    pin_dir = one_shot["pin_dir"]
    nf.unpin(os.path.join(pin_dir, node.NF_DIR, "ipv6"))
    st = _status(host)
    assert st["from_birth"].startswith("MISSING") and "ipv6" in st["from_birth"]
    assert any("from-birth layer" in p for p in st["problems"])
    assert "from birth MISSING" in ksbpf("status", check=True).stdout
