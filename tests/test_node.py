"""Node mode end to end: the lab's client namespace plays a host with two
containers behind a bridge (forwarded and masqueraded out of its physical
link), a real wireguard-go tunnel whose default routes fall back to the
physical link, and IPv6.  ksbpf guards the host namespace from outside
(`ksbpf attach --node --netns ...`, a separate process that exits before any
traffic is sent).  What leaks is counted on the far side of the physical
link, and every "must not arrive" has a control that does arrive."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
import threading
import time

import pytest
from helpers import DaemonProcess, detach_node_at_teardown, ksbpf, toml_config

from ksbpf.kernel import bpf, netns, tc
from ksbpf.lab.namespaces import ProbeStream, Sniffer, TcpEchoServer, UdpEchoServer, new_lab, probe
from ksbpf.observability.events import stream
from ksbpf.scopes import node

pytestmark = pytest.mark.lab
BLOCKED = 0.6   # a dropped TCP SYN or datagram just times out


@pytest.fixture
def host(request):
    """The lab with two containers behind a bridge in its client namespace."""
    lab = new_lab("ksbpfn")
    request.addfinalizer(lab.destroy)
    lab.create()
    lab.tunnel_up()
    lab.add_containers(2)
    return lab


@pytest.fixture
def servers(host):
    with TcpEchoServer(host) as tcp, UdpEchoServer(host) as udp:
        yield {"tcp": tcp.port, "udp": udp.port, "icmp": 0, "udp_server": udp}


def attach_node(lab, *extra: str) -> dict:
    proc = ksbpf("attach", "--node", "--netns", lab.client_path, "--tunnel", lab.wg_client,
                 "--endpoint", lab.endpoint4, "--endpoint", lab.endpoint6, *extra, "--json", check=True)
    return json.loads(proc.stdout)


@pytest.fixture
def guarded(request, host):
    """Node mode in force on the host namespace; removed at teardown."""
    detach_node_at_teardown(request, host)
    return attach_node(host)


def node_status(lab) -> dict:
    nodes = json.loads(ksbpf("status", "--json", check=True).stdout)["nodes"]
    mine = [n for n in nodes if n["netns"] == lab.client_path]
    assert len(mine) == 1, nodes
    return mine[0]


def counted(lab, reason: str) -> int:
    return node_status(lab)["counters"][reason]["packets"]


def ipv4_counted(lab, reason: str) -> int:
    """IPv4 only: the kernel's own IPv6 chatter (MLD, router solicitations) is not the test's."""
    return node_status(lab)["counters"][reason]["by_family"]["ipv4"]["packets"]


def addr(lab, where: str, family: int) -> str:
    return getattr(lab, f"{where}{family}_server")


def test_attach_guards_the_uplink_only(host, guarded):
    roles = {i["name"]: (i["role"], i["guarded"]) for i in guarded["interfaces"]}
    assert roles[host.phy_client] == ("guarded", True)
    assert roles[host.wg_client] == ("tunnel", False)
    assert roles[host.bridge] == ("internal", False)
    assert roles[f"veth1{host.tag}"] == ("internal", False)
    assert roles["lo"] == ("loopback", False)
    assert guarded["tc_mode"] == "tcx"
    ifindex = netns.ifindex(netns.resolve(host.client_path), host.phy_client)
    chain = netns.run_in(host.client_path, tc.tcx_query, ifindex)
    assert chain and chain[0][0] == guarded["prog_ids"][bpf.ENTRY_TC_ETH]   # first in the chain
    st = node_status(host)
    assert st["attached"] and not st["problems"]
    text = ksbpf("status", check=True).stdout
    assert f"{host.phy_client} (ifindex" in text and "guarded" in text and "internal" in text


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("kind", ["tcp", "udp", "icmp"])
def test_container_traffic_through_the_tunnel_passes(host, servers, guarded, kind, family):
    k1 = host.containers[0]
    assert probe(k1, None, kind, addr(host, "net", family), servers[kind]).ok
    assert probe(k1, None, kind, addr(host, "tun", family), servers[kind]).ok


def test_tunnel_deleted_nothing_leaks(host, servers, guarded):
    host.tunnel_down()   # every default route now falls back to the physical link
    k1, k2 = host.containers
    results = []
    with Sniffer(host) as sniffer:
        for who in (k1, k2, host):
            for family in (4, 6):
                for kind in ("tcp", "udp", "icmp"):
                    results.append(probe(who, None, kind, addr(host, "net", family), servers[kind], timeout=BLOCKED))
        # control: the VPN endpoint stays reachable from a container (it carries the tunnel)
        probe(k1, None, "udp", host.phy4_server, host.wg_port, timeout=0.3)
        probe(k1, None, "udp", host.phy6_server, host.wg_port, timeout=0.3)
    print(f"node, tunnel deleted: {sum(r.ok for r in results)}/{len(results)} probes got through, "
          f"{sniffer.count} packets leaked, {sniffer.wireguard} endpoint packets arrived (control)")
    assert not any(r.ok for r in results)
    assert sniffer.count == 0, sniffer.packets
    assert sniffer.wireguard >= 2
    st = node_status(host)
    assert st["counters"]["not_tunnel"]["by_family"]["ipv4"]["packets"] >= 9
    assert st["counters"]["not_tunnel"]["by_family"]["ipv6"]["packets"] >= 9
    assert st["counters"]["endpoint"]["packets"] >= 2


def test_endpoint_address_on_another_port_is_dropped(host, servers, guarded):
    k1 = host.containers[0]
    before = counted(host, "endpoint_mismatch")
    with Sniffer(host) as sniffer:
        assert not probe(k1, None, "udp", host.phy4_server, servers["udp"], timeout=BLOCKED).ok
        assert not probe(k1, None, "tcp", host.phy6_server, servers["tcp"], timeout=BLOCKED).ok
        probe(k1, None, "udp", host.phy4_server, host.wg_port, timeout=0.3)   # control
    assert sniffer.count == 0, sniffer.packets
    assert sniffer.wireguard >= 1
    assert counted(host, "endpoint_mismatch") >= before + 2
    # reaching the gateway and the endpoint needs ARP and IPv6 neighbour discovery: they passed
    assert node_status(host)["counters"]["neigh"]["packets"] >= 1


@pytest.mark.parametrize("family", [4, 6])
def test_bridge_traffic_is_untouched(host, servers, guarded, family):
    host.tunnel_down()
    k1, k2 = host.containers
    for kind in ("icmp",):
        assert probe(k1, None, kind, host.container_addr(2, family)).ok        # container <-> container
        assert probe(host, None, kind, host.container_addr(1, family)).ok      # host -> container
        assert probe(k2, None, kind, host.bridge4 if family == 4 else host.bridge6).ok   # container -> host


ETH_P_IP, ETH_P_ARP = 0x0800, 0x0806
PACKET_QDISC_BYPASS = 20


def _mac(ns: str, dev: str) -> bytes:
    out = json.loads(subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", dev],
                                    capture_output=True, text=True, check=True).stdout)
    return bytes.fromhex(out[0]["address"].replace(":", ""))


def _udp_frame(lab, port: int, payload: bytes) -> bytes:
    src, dst = socket.inet_aton(lab.phy4_client), socket.inet_aton(lab.phy4_server)
    udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 7, 0, 64, 17, 0, src, dst)
    csum = sum(struct.unpack("!10H", hdr))
    csum = (csum & 0xFFFF) + (csum >> 16)
    hdr = hdr[:10] + struct.pack("!H", ~((csum & 0xFFFF) + (csum >> 16)) & 0xFFFF) + hdr[12:]
    return (_mac(lab.server_ns, lab.phy_server) + _mac(lab.client_ns, lab.phy_client)
            + struct.pack("!H", ETH_P_IP) + hdr + udp)


def _send_raw(lab, frame: bytes, sll_protocol: int, bypass: bool, count: int = 5) -> int:
    """Send the frame `count` times on the physical link; how many sends the
    kernel refused (ENOBUFS: what a packet socket hears of a tc drop)."""
    def send() -> int:
        refused = 0
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as s:
            if bypass:
                s.setsockopt(263, PACKET_QDISC_BYPASS, 1)   # SOL_PACKET
            for _ in range(count):
                try:
                    s.sendto(frame, (lab.phy_client, sll_protocol))
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    refused += 1
        return refused
    return netns.run_in(lab.client_path, send)


def test_raw_af_packet_frames(host, servers, guarded):
    """tc egress sees AF_PACKET frames: dropped, even when the sender lies about
    the protocol (sll_protocol ARP around an IPv4 frame).  PACKET_QDISC_BYPASS
    skips tc altogether: that bypass is real, which is why the README says to
    deny CAP_NET_RAW."""
    udp = servers["udp_server"]
    before = udp.received
    refused = _send_raw(host, _udp_frame(host, servers["udp"], b"raw"), ETH_P_IP, bypass=False)
    refused += _send_raw(host, _udp_frame(host, servers["udp"], b"liar"), ETH_P_ARP, bypass=False)
    time.sleep(0.3)
    blocked = udp.received - before
    assert refused == 10
    assert _send_raw(host, _udp_frame(host, servers["udp"], b"bypass"), ETH_P_IP, bypass=True) == 0
    deadline = time.monotonic() + 2
    while udp.received - before < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    bypassed = udp.received - before - blocked
    print(f"node, raw frames: {blocked}/10 arrived through tc, {bypassed}/5 arrived with PACKET_QDISC_BYPASS")
    assert blocked == 0
    assert bypassed == 5   # the documented bypass (and the control that the frames are well formed)


def test_exempted_cgroup_reaches_the_server_others_do_not(host, servers, make_cgroup, request):
    request.addfinalizer(lambda: node.detach(host.client_path) if os.path.exists(host.client_path) else None)
    exempt, other = make_cgroup("-mgmt"), make_cgroup("-other")
    attach_node(host, "--exempt-cgroup", exempt)
    host.tunnel_down()
    assert probe(host, exempt, "tcp", host.net4_server, servers["tcp"]).ok
    assert probe(host, exempt, "udp", host.net6_server, servers["udp"]).ok
    assert not probe(host, other, "tcp", host.net4_server, servers["tcp"], timeout=BLOCKED).ok
    assert not probe(host, other, "udp", host.net6_server, servers["udp"], timeout=BLOCKED).ok
    # forwarded packets have no socket: a container is never exempt
    assert not probe(host.containers[0], None, "tcp", host.net4_server, servers["tcp"], timeout=BLOCKED).ok
    st = node_status(host)
    assert st["exempt_cgroups"] == [exempt]
    assert st["counters"]["exempt"]["packets"] >= 2


def test_node_mode_and_a_cgroup_scope_together(host, servers, guarded, make_cgroup):
    cg = make_cgroup()
    ksbpf("attach", "--cgroup", cg, "--tunnel", host.wg_client, "--netns", host.client_path, check=True)
    try:
        # through the tunnel: both allow (UDP: no TCP state whose kernel-sent answers the guard
        # would count later, when the tunnel is gone)
        assert probe(host, cg, "udp", host.net4_server, servers["udp"]).ok
        host.tunnel_down()
        before = ipv4_counted(host, "not_tunnel")
        assert not probe(host, cg, "udp", host.net4_server, servers["udp"], timeout=BLOCKED).ok
        assert ipv4_counted(host, "not_tunnel") == before   # the cgroup hook dropped it before tc saw it
        assert not probe(host, None, "udp", host.net4_server, servers["udp"], timeout=BLOCKED).ok
        assert ipv4_counted(host, "not_tunnel") >= before + 1   # the node guard dropped this one
        ksbpf("detach", "--node", "--netns", host.client_path, check=True)
        assert probe(host, None, "udp", host.net4_server, servers["udp"]).ok    # node mode gone
        assert not probe(host, cg, "udp", host.net4_server, servers["udp"], timeout=BLOCKED).ok   # the scope stays
    finally:
        ksbpf("detach", "--cgroup", cg)


def test_detach_restores_everything(host, servers, guarded):
    host.tunnel_down()
    assert not probe(host, None, "udp", host.net4_server, servers["udp"], timeout=BLOCKED).ok
    ifindex = netns.ifindex(netns.resolve(host.client_path), host.phy_client)
    guard_links = {link for _prog, link in netns.run_in(host.client_path, tc.tcx_query, ifindex)}
    assert guard_links
    out = json.loads(ksbpf("detach", "--node", "--netns", host.client_path, "--json", check=True).stdout)
    assert out["removed_pins"] and not os.path.exists(out["removed_pins"][0])
    assert guard_links <= set(out["detached_link_ids"])   # what it removed, by link id
    for who in (host, host.containers[0]):
        for kind in ("tcp", "udp", "icmp"):
            assert probe(who, None, kind, host.net4_server, servers[kind]).ok
    assert netns.run_in(host.client_path, tc.tcx_query, ifindex) == []
    assert "nothing to remove" in ksbpf("detach", "--node", "--netns", host.client_path, check=True).stdout


def test_reattach_is_make_before_break(host, servers, guarded):
    """A flood out of the physical link while the policy is replaced twice:
    nothing arrives, and the counters carry over."""
    host.tunnel_down()
    with Sniffer(host) as sniffer:
        with ProbeStream(host, None, host.net4_server, servers["udp"], interval_ms=1) as flood:
            for extra in (("--allow-lan",), ()):
                attach_node(host, *extra)
    assert flood.result.sent > 100
    assert sniffer.count == 0, sniffer.packets[:5]
    assert counted(host, "not_tunnel") >= flood.result.sent * 0.9
    st = node_status(host)
    assert st["attached"]


def test_clsact_fallback(host, servers, request):
    """Kernels without tcx get a clsact qdisc with a direct-action filter."""
    request.addfinalizer(lambda: node.detach(host.client_path) if os.path.exists(host.client_path) else None)
    out = attach_node(host, "--tc-mode", "clsact")
    assert out["tc_mode"] == "clsact"
    filters = tc.clsact_filters(host.client_path, host.phy_client)
    assert [f.prog_id for f in filters] == [out["prog_ids"][bpf.ENTRY_TC_ETH]]
    host.tunnel_down()
    with Sniffer(host) as sniffer:
        assert not probe(host.containers[0], None, "udp", host.net4_server, servers["udp"], timeout=BLOCKED).ok
        probe(host, None, "udp", host.phy4_server, host.wg_port, timeout=0.3)   # control
    assert sniffer.count == 0 and sniffer.wireguard >= 1
    again = attach_node(host, "--tc-mode", "clsact")   # replaced: the other preference, then the old one removed
    assert [f.prog_id for f in tc.clsact_filters(host.client_path, host.phy_client)] == [again["prog_ids"][bpf.ENTRY_TC_ETH]]
    ksbpf("detach", "--node", "--netns", host.client_path, check=True)
    assert tc.clsact_filters(host.client_path, host.phy_client) == []
    assert probe(host, None, "udp", host.net4_server, servers["udp"]).ok


def test_a_second_vpn_tun_device_is_guarded_too(host, guarded):
    """A tun device that is not the configured tunnel is an uplink like any
    other, judged by the entry point for devices without a link header."""
    c = host.client_ns
    n = int(host.tag, 16) % 250 + 1
    for cmd in (f"ip -n {c} tuntap add mode tun name tx{host.tag}", f"ip -n {c} addr add 192.0.2.{n}/32 dev tx{host.tag}",
                f"ip -n {c} link set tx{host.tag} up", f"ip -n {c} route add 198.51.100.0/24 dev tx{host.tag}"):
        subprocess.run(cmd.split(), check=True)
    attach_node(host)   # one-shot: guards what exists now
    roles = {i["name"]: (i["role"], i["guarded"]) for i in node_status(host)["interfaces"]}
    assert roles[f"tx{host.tag}"] == ("guarded", True)
    def v4_drops() -> int:
        return node_status(host)["counters"]["not_tunnel"]["by_family"]["ipv4"]["packets"]
    before = v4_drops()
    probe(host, None, "udp", f"198.51.100.{n}", 9, timeout=0.2)
    assert v4_drops() == before + 1


def test_metrics_and_events_carry_the_tc_hook(host, servers, guarded):
    host.tunnel_down()
    name = f"node:{host.client_path}"
    seen: list = []
    done = threading.Event()
    reader = threading.Thread(target=stream, args=([name], seen.append, done.is_set), daemon=True)
    reader.start()
    time.sleep(0.3)
    probe(host.containers[0], None, "udp", host.net4_server, servers["udp"], timeout=BLOCKED)
    def mine() -> list[dict]:   # the probe's datagram (not, say, an ICMP error to the endpoint)
        return [e.to_dict() for e in list(seen) if e.dst == host.net4_server]
    deadline = time.monotonic() + 5
    while not mine() and time.monotonic() < deadline:
        time.sleep(0.05)
    done.set()
    reader.join(5)
    assert mine(), f"no event of the probe from the node scope: {seen}"
    ev = mine()[0]
    assert (ev["scope"], ev["hook"], ev["reason"], ev["ifname"], ev["proto"]) == (
        name, "tc", "not_tunnel", host.phy_client, "udp")
    assert ev["src"] == host.phy4_client   # masqueraded: judged after NAT
    text = ksbpf("metrics", check=True).stdout
    assert f'ksbpf_dropped_packets_total{{family="ipv4",hook="tc",reason="not_tunnel",scope="{name}"}}' in text
    assert f'ksbpf_scope_attached{{scope="{name}"}} 1.0' in text
    assert f'ksbpf_unguarded_interfaces{{scope="{name}"}} 0.0' in text


# -- the daemon --------------------------------------------------------------------

def new_uplink_endpoint(lab) -> str:
    """An endpoint behind the veth the daemon test adds: the control that
    traffic allowed by the policy does get through that new uplink."""
    return f"198.19.{int(lab.tag, 16) % 250 + 1}.2:4790/udp"


@pytest.fixture
def node_daemon(host, tmp_path, request):
    def stop_and_detach() -> None:
        d.stop()
        if os.path.exists(host.client_path):
            node.detach(host.client_path)
    path = tmp_path / "ksbpf.toml"
    path.write_text(toml_config([], f"""
[node]
netns = "{host.client_path}"
tunnels = ["{host.wg_client}"]
endpoints = ["{host.endpoint4}", "{host.endpoint6}", "{new_uplink_endpoint(host)}"]
"""))
    d = DaemonProcess(str(path))
    d.config_path = str(path)
    request.addfinalizer(stop_and_detach)
    d.wait_for("ready")
    return d


def test_daemon_guards_a_new_interface_before_it_carries_a_packet(host, node_daemon):
    """A sender in the host keeps trying to reach an address behind a veth
    that does not exist yet; the veth is created, addressed and brought up
    (as a network manager would, one step at a time).  Nothing arrives."""
    c, s, t = host.client_ns, host.server_ns, host.tag
    n = int(t, 16) % 250 + 1
    received: list = []

    def listen() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", 4789))
        sock.settimeout(0.1)
        return sock
    srv = netns.run_in(host.server_path, listen)
    stop = threading.Event()

    def count() -> None:   # what came over the new veth (until it exists, the flood goes through the tunnel)
        while not stop.is_set():
            try:
                data, (src, _port) = srv.recvfrom(64)
            except OSError:
                continue
            if src == f"198.19.{n}.1":
                received.append(data)
    counter = threading.Thread(target=count, daemon=True)
    counter.start()
    control = UdpEchoServer(host, port=4790, host="0.0.0.0")
    try:
        with ProbeStream(host, None, f"198.19.{n}.2", 4789, interval_ms=0.5) as flood:
            time.sleep(0.2)
            for cmd in (f"ip -n {c} link add up{t} type veth peer name uq{t} netns {s}",
                        f"ip -n {s} addr add 198.19.{n}.2/24 dev uq{t}", f"ip -n {s} link set uq{t} up",
                        f"ip -n {c} addr add 198.19.{n}.1/24 dev up{t}", f"ip -n {c} link set up{t} up"):
                subprocess.run(cmd.split(), check=True)
            ev = node_daemon.wait_for("interface_guarded", interface=f"up{t}", timeout=10)
            time.sleep(1.0)
        assert flood.result.sent > 100
        print(f"node, new veth: {len(received)} of {flood.result.sent} datagrams arrived; "
              f"guarded at ifindex {ev['ifindex']}")
        assert received == []
        ifindex = netns.ifindex(netns.resolve(host.client_path), f"up{t}")
        assert netns.run_in(host.client_path, tc.tcx_query, ifindex)
        # control: what the policy allows (an endpoint behind the new uplink) does get through it
        assert probe(host, None, "udp", f"198.19.{n}.2", 4790).ok
    finally:
        stop.set()
        counter.join(2)
        srv.close()
        control.close()


def test_daemon_puts_back_a_guard_removed_by_hand(host, node_daemon):
    nst = node_status(host)
    pin = os.path.join(nst["pin_dir"], "links", str(netns.ifindex(netns.resolve(host.client_path), host.phy_client)))
    from ksbpf.kernel import libbpf
    after = len(node_daemon.events)
    fd = libbpf.obj_get(pin)
    try:
        tc.link_detach(fd)
    finally:
        os.close(fd)
    node_daemon.wait_for("interface_guarded", interface=host.phy_client, after=after, timeout=10)
    assert node_status(host)["attached"]


def test_daemon_adopts_and_readyz(host, node_daemon):
    (adopted_or_attached,) = [e for e in node_daemon.events if e.get("event", "").startswith("node_")]
    assert adopted_or_attached["event"] == "node_attached"
    assert host.phy_client in adopted_or_attached["guarded"]
    node_daemon.stop()
    d2 = DaemonProcess(node_daemon.config_path)
    try:
        d2.wait_for("ready")
        assert d2.named("node_adopted"), d2.lines
    finally:
        d2.stop()


def test_apply_puts_node_mode_in_force_and_exits(host, servers, tmp_path, request):
    """`ksbpf apply` (the boot unit) guards the namespace and exits; it fails,
    with nothing half-applied, when the namespace does not exist."""
    request.addfinalizer(lambda: node.detach(host.client_path) if os.path.exists(host.client_path) else None)
    path = tmp_path / "ksbpf.toml"
    path.write_text(toml_config([], f'[node]\nnetns = "{host.client_path}"\ntunnels = ["{host.wg_client}"]\n'))
    ksbpf("apply", "--config", str(path), "--log-format", "json", check=True)
    st = node_status(host)
    assert st["attached"] and {i["name"] for i in st["interfaces"] if i["guarded"]} == {host.phy_client}
    host.tunnel_down()
    assert not probe(host.containers[0], None, "udp", host.net4_server, servers["udp"], timeout=BLOCKED).ok
    missing = tmp_path / "missing.toml"
    missing.write_text(toml_config([], '[node]\nnetns = "ksbpf-no-such-netns"\ntunnels = ["wg0"]\n'))
    proc = ksbpf("apply", "--config", str(missing), "--log-format", "json")
    assert proc.returncode == 1 and '"node_failed"' in proc.stderr and "does not exist" in proc.stderr
