"""Node mode's --dns end to end (issue 17 §3, "the same rule for every local
and forwarded packet"), in the namespace lab with a real wireguard-go tunnel.

The lab's client namespace plays a host (node mode guards it, attached from
outside by `ksbpf attach --node --netns ...`) with a container-like namespace
behind a bridge, forwarded and masqueraded.  Resolvers, all in the server
namespace, each answering A queries with its own address and counting what
it gets (UDP and TCP):
- the VPN's resolver, on the tunnel's server address (through the tunnel);
- a "hard-coded" resolver on an address the host routes into the tunnel
  (net4_server, as 8.8.8.8 would be), and its IPv6 twin;
- a LAN resolver (192.168.N.53, in the fixed LAN list) reached over the
  physical link, with --allow-lan.
Queries come from the host namespace itself (local sockets) and from the
container (forwarded: no socket on the host).

Controls that must arrive: without --dns the hard-coded resolver and (with
--allow-lan --allow-lan-dns) the LAN resolver answer both senders; with
--dns the VPN's resolver answers both, and non-DNS traffic to the LAN
address still passes with --allow-lan.  With --dns the others get 0
queries, counted as dns_not_vpn.  The tunnel carries no tc guard: the
netfilter hook judges what goes through it (kernels with netfilter links)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from dnslab import DnsServer, query
from helpers import DaemonProcess, detach_node_at_teardown, ksbpf, toml_config

from ksbpf.kernel import nf
from ksbpf.lab.namespaces import new_lab
from ksbpf.scopes import node

pytestmark = [pytest.mark.lab,
              pytest.mark.skipif(not nf.supported(), reason="DNS through the tunnel is judged by the netfilter "
                                                            "hook: this kernel has no netfilter BPF links (6.4+)")]

VPN_ANSWER, OTHER_ANSWER, OTHER6_ANSWER, LAN_ANSWER = "10.111.0.1", "10.88.8.8", "10.66.6.6", "10.55.5.5"
BLOCKED = 1.2   # a dropped query just times out


@pytest.fixture
def host(request):
    """The lab with one container behind a bridge in its client namespace, and a LAN resolver's address
    (192.168.N.53 on the server, routed over the physical link)."""
    lab = new_lab("ksbpfd")
    request.addfinalizer(lab.destroy)
    lab.create()
    lab.tunnel_up()
    lab.add_containers(1)
    lab.lan4_server = f"192.168.{int(lab.tag, 16) % 250 + 1}.53"
    subprocess.run(["ip", "-n", lab.server_ns, "addr", "add", f"{lab.lan4_server}/32", "dev", "lo"], check=True)
    subprocess.run(["ip", "-n", lab.client_ns, "route", "add", f"{lab.lan4_server}/32", "via", lab.phy4_server,
                    "dev", lab.phy_client], check=True)
    return lab


@pytest.fixture
def dns(host):
    with DnsServer(host.server_path, host.tun4_server, VPN_ANSWER) as vpn, \
            DnsServer(host.server_path, host.net4_server, OTHER_ANSWER) as other, \
            DnsServer(host.server_path, host.net6_server, OTHER6_ANSWER) as other6, \
            DnsServer(host.server_path, host.lan4_server, LAN_ANSWER) as lan:
        yield {"vpn": vpn, "other": other, "other6": other6, "lan": lan}


@pytest.fixture
def detach(request, host):
    detach_node_at_teardown(request, host)


def attach_node(lab, *extra: str) -> dict:
    proc = ksbpf("attach", "--node", "--netns", lab.client_path, "--tunnel", lab.wg_client,
                 "--endpoint", lab.endpoint4, "--endpoint", lab.endpoint6, *extra, check=True)
    return proc.stdout


def node_status(lab) -> dict:
    nodes = json.loads(ksbpf("status", "--json", check=True).stdout)["nodes"]
    (mine,) = [n for n in nodes if n["netns"] == lab.client_path]
    return mine


def dropped_dns(lab) -> int:
    return node_status(lab)["counters"]["dns_not_vpn"]["packets"]


def senders(lab) -> list[str]:
    """The host namespace itself (local sockets) and the container (forwarded)."""
    return [lab.client_ns, lab.containers[0]]


def ask(ns: str, server: str, proto: str, timeout: float = 4.0) -> dict:
    return query(ns, None, server, proto, timeout)


def test_without_dns_other_resolvers_answer(host, dns, detach):
    """The control, and what issue 17 measured: node mode without --dns lets the host's and the container's
    DNS reach a resolver through the tunnel that is not the VPN's, and (with --allow-lan --allow-lan-dns)
    a LAN resolver."""
    attach_node(host, "--allow-lan", "--allow-lan-dns")
    assert node_status(host)["dns"] is None
    for ns in senders(host):
        for proto in ("udp", "tcp"):
            r = ask(ns, host.net4_server, proto)
            assert r["ok"] and r["answer"] == OTHER_ANSWER, (ns, proto, r)
            r = ask(ns, host.lan4_server, proto)
            assert r["ok"] and r["answer"] == LAN_ANSWER, (ns, proto, r)
        r = ask(ns, host.net6_server, "udp")
        assert r["ok"] and r["answer"] == OTHER6_ANSWER, (ns, r)
    assert dns["other"].udp_queries == 2 and dns["other"].tcp_queries == 2
    assert dns["lan"].udp_queries == 2 and dns["lan"].tcp_queries == 2
    assert dns["other6"].queries == 2


def test_dns_only_to_the_vpn_resolver_from_the_node_and_its_containers(host, dns, detach):
    out = attach_node(host, "--allow-lan", "--dns", host.tun4_server)
    (line,) = [ln for ln in out.splitlines() if ln.strip().startswith("dns:")]
    assert host.tun4_server in line and "not redirected in node mode" in line and "netfilter hook" in line, line
    st = node_status(host)
    assert st["dns"] == {"resolvers": [host.tun4_server], "redirect": False, "through_tunnel": True}
    assert st["attached"] and st["from_birth"] == "on"
    text = ksbpf("status", check=True).stdout
    assert f"dns      only to {host.tun4_server} through the tunnel" in text and "not redirected" in text

    # the VPN's resolver answers the host and the container, UDP and TCP (the controls that must arrive)
    for ns in senders(host):
        for proto in ("udp", "tcp"):
            r = ask(ns, host.tun4_server, proto)
            assert r["ok"] and r["answer"] == VPN_ANSWER, (ns, proto, r)
    assert dns["vpn"].udp_queries == 2 and dns["vpn"].tcp_queries == 2

    # a hard-coded resolver through the tunnel, and a LAN resolver despite --allow-lan: 0 queries arrive
    before = dropped_dns(host)
    for ns in senders(host):
        for server in (host.net4_server, host.lan4_server):
            for proto in ("udp", "tcp"):
                r = ask(ns, server, proto, timeout=BLOCKED)
                assert not r["ok"], (ns, server, proto, r)
        r = ask(ns, host.net6_server, "udp", timeout=BLOCKED)
        assert not r["ok"], (ns, r)
    assert dns["other"].queries == 0 and dns["lan"].queries == 0 and dns["other6"].queries == 0
    # counted: at least the 10 first packets (a UDP query, a TCP SYN) of the host's and the container's tries
    assert dropped_dns(host) >= before + 10

    # the tunnel and --allow-lan still carry what is not DNS: the same servers answer on another port
    with DnsServer(host.server_path, host.net4_server, OTHER_ANSWER, port=5353) as other_b, \
            DnsServer(host.server_path, host.lan4_server, LAN_ANSWER, port=5353) as lan_b:
        for ns in senders(host):
            for server, answer in ((host.net4_server, OTHER_ANSWER), (host.lan4_server, LAN_ANSWER)):
                r = query(ns, None, server, "tcp", 4.0, port=5353)
                assert r["ok"] and r["answer"] == answer, (ns, server, r)
        assert other_b.queries == 2 and lan_b.queries == 2
    # and the VPN's resolver still answers after all that
    r = ask(host.containers[0], host.tun4_server, "udp")
    assert r["ok"] and r["answer"] == VPN_ANSWER, r


def test_verify_runs_dns_through_the_tunnel(host, detach):
    """`ksbpf verify` on a node scope with --dns: the crafted frames (DNS to 8.8.8.8 and to the VPN's
    resolver among them) through the guarded uplink and the tunnel, every verdict as the model says."""
    attach_node(host, "--dns", host.tun4_server)
    proc = ksbpf("verify", "--scope", f"node:{host.client_path}", "--json")
    found = {f["check"]: f for f in json.loads(proc.stdout)["findings"]}
    assert found["policy"]["verdict"] == "ok", found["policy"]
    assert host.wg_client in found["policy"]["detail"] and host.phy_client in found["policy"]["detail"]
    assert found["dns"]["verdict"] == "ok" and host.tun4_server in found["dns"]["detail"], found["dns"]


def node_daemon(host, tmp_path, request, dns: str, env: dict | None = None) -> DaemonProcess:
    """A daemon guarding the host namespace by a [node] table with `dns = [DNS]`, ready; stopped and the
    node detached at teardown."""
    path = tmp_path / "ksbpf.toml"
    path.write_text(toml_config([], f"""
[node]
netns = "{host.client_path}"
tunnels = ["{host.wg_client}"]
endpoints = ["{host.endpoint4}", "{host.endpoint6}"]
dns = ["{dns}"]
"""))
    d = DaemonProcess(str(path), **({"env": env} if env else {}))

    def stop_and_detach() -> None:
        d.stop()
        if os.path.exists(host.client_path):
            node.detach(host.client_path)
    request.addfinalizer(stop_and_detach)
    d.wait_for("ready")
    return d


def test_daemon_applies_node_dns(host, dns, tmp_path, request):
    """[node] dns = [...]: the daemon guards the namespace with the resolvers."""
    node_daemon(host, tmp_path, request, host.tun4_server)
    assert node_status(host)["dns"]["resolvers"] == [host.tun4_server]
    r = ask(host.containers[0], host.net4_server, "udp", timeout=BLOCKED)
    assert not r["ok"] and dns["other"].queries == 0, r
    r = ask(host.containers[0], host.tun4_server, "udp")
    assert r["ok"] and r["answer"] == VPN_ANSWER, r


def test_exempt_cgroup_dns(host, dns, detach, make_cgroup):
    """--exempt-cgroup with --dns: outside the tunnel the exempt sockets' DNS passes (the tc guard knows their
    cgroup: the LAN resolver answers them, the control); through the tunnel to another resolver it is dropped
    (the netfilter hook cannot see cgroups: 0 arrive), and the VPN's resolver answers them."""
    cg = make_cgroup()
    attach_node(host, "--allow-lan", "--dns", host.tun4_server, "--exempt-cgroup", cg)
    r = query(host.client_ns, cg, host.lan4_server, "udp", 4.0)
    assert r["ok"] and r["answer"] == LAN_ANSWER, r
    assert dns["lan"].udp_queries == 1
    r = query(host.client_ns, None, host.lan4_server, "udp", BLOCKED)   # not exempt: dropped
    assert not r["ok"] and dns["lan"].udp_queries == 1, r
    r = query(host.client_ns, cg, host.net4_server, "udp", BLOCKED)
    assert not r["ok"] and dns["other"].queries == 0, r
    r = query(host.client_ns, cg, host.tun4_server, "udp", 4.0)
    assert r["ok"] and r["answer"] == VPN_ANSWER, r


def test_daemon_follows_node_dns_auto(host, dns, tmp_path, request):
    """[node] dns = ["auto"]: the daemon reads the tunnel's resolvers (here a wg-quick file's `DNS =`) and
    keeps the node's dns maps in step, in place.  Until one is configured, all DNS of the node and of what
    it forwards is dropped (fails closed), while the tunnel carries everything else (the control)."""
    wg_dir = tmp_path / "wireguard"
    wg_dir.mkdir()
    conf = wg_dir / f"{host.wg_client}.conf"
    d = node_daemon(host, tmp_path, request, "auto", env=dict(os.environ, KSBPF_WG_QUICK_DIR=str(wg_dir)))
    st = node_status(host)
    assert st["dns"] == {"resolvers": [], "redirect": False, "through_tunnel": True, "auto": True}, st["dns"]
    assert "dns      none known yet (auto)" in ksbpf("status", check=True).stdout
    attached_at = st["attached_at"]
    assert attached_at
    before = dropped_dns(host)
    for ns in senders(host):
        r = ask(ns, host.tun4_server, "udp", timeout=BLOCKED)
        assert not r["ok"], (ns, r)
    assert dns["vpn"].queries == 0 and dropped_dns(host) > before
    with DnsServer(host.server_path, host.tun4_server, VPN_ANSWER, port=5353) as other_port:
        for ns in senders(host):   # the control: the tunnel carries the rest, from the host and the container
            r = query(ns, None, host.tun4_server, "udp", 4.0, port=5353)
            assert r["ok"] and r["answer"] == VPN_ANSWER, (ns, r)
        assert other_port.queries == 2

    # the VPN configures its resolver: followed, nothing re-attached
    mark = len(d.events)
    conf.write_text(f"[Interface]\nPrivateKey = (not read)\nDNS = {host.tun4_server}\n\n[Peer]\n")
    ev = d.wait_for("dns_followed", after=mark, timeout=30)
    assert ev["now"] == [host.tun4_server] and ev["source"] == str(conf), ev
    for ns in senders(host):
        r = ask(ns, host.tun4_server, "udp")
        assert r["ok"] and r["answer"] == VPN_ANSWER, (ns, r)
        r = ask(ns, host.net4_server, "udp", timeout=BLOCKED)
        assert not r["ok"], (ns, r)
    assert dns["vpn"].queries == 2 and dns["other"].queries == 0

    # ... and moves it: the new one answers, the old one gets nothing more
    mark = len(d.events)
    conf.write_text(f"[Interface]\nPrivateKey = (not read)\nDNS = {host.net4_server}\n\n[Peer]\n")
    ev = d.wait_for("dns_followed", after=mark, timeout=30)
    assert ev["added"] == [host.net4_server] and ev["removed"] == [host.tun4_server], ev
    assert node_status(host)["dns"]["resolvers"] == [host.net4_server]
    for ns in senders(host):
        for proto in ("udp", "tcp"):
            r = ask(ns, host.net4_server, proto)
            assert r["ok"] and r["answer"] == OTHER_ANSWER, (ns, proto, r)
        r = ask(ns, host.tun4_server, "udp", timeout=BLOCKED)
        assert not r["ok"], (ns, r)
    assert dns["other"].queries == 4 and dns["vpn"].queries == 2
    assert not [e for e in d.events[mark:] if e.get("event", "").startswith("node_")], d.events[mark:]
    assert node_status(host)["attached_at"] == attached_at   # the same attachment, its maps updated in place
    proc = ksbpf("verify", "--scope", f"node:{host.client_path}", "--json")
    found = {f["check"]: f for f in json.loads(proc.stdout)["findings"]}
    assert found["policy"]["verdict"] == "ok" and found["dns"]["verdict"] == "ok", found
    assert host.net4_server in found["dns"]["detail"], found["dns"]
    assert d.proc.poll() is None
