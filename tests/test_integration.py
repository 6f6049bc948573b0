"""The kill switch end to end, in namespaces with a real wireguard-go tunnel.

The protected processes live in a fresh cgroup and in the lab's client
namespace; `ksbpf` itself runs as a separate process that exits before any
traffic is sent.  Every "must not arrive" check is paired with a control
that does arrive, so a broken capture cannot pass as "no leak"."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
from helpers import dropped, ksbpf, packets, scope_status

from ksbpf.kernel import bpf, cgroup, netns, tc
from ksbpf.lab.namespaces import ProbeStream, Sniffer, probe
from ksbpf.policy import Options
from ksbpf.scopes import cgroups

pytestmark = pytest.mark.lab
BLOCKED_TIMEOUT = 1.0  # a blocked TCP connect just times out


def attach(lab, cg: str, *extra: str) -> str:
    proc = ksbpf("attach", "--cgroup", cg, "--tunnel", lab.wg_client, "--netns", lab.client_ns,
                 "--endpoint", lab.endpoint4, *extra, check=True)
    return proc.stdout


@pytest.fixture
def cg(lab, make_cgroup):
    """A cgroup protected by ksbpf; the attaching process has exited."""
    path = make_cgroup()
    attach(lab, path)
    return path


def addresses(lab, family: int, where: str) -> str:
    return getattr(lab, f"{where}{family}_server")


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("kind", ["tcp", "udp", "icmp"])
def test_traffic_through_tunnel_passes(lab, servers, cg, kind, family):
    before = packets(cg, "tunnel")
    result = probe(lab, cg, kind, addresses(lab, family, "tun"), servers[kind])
    assert result.ok, result.error
    # default routes lead into the tunnel too
    assert probe(lab, cg, kind, addresses(lab, family, "net"), servers[kind]).ok
    assert packets(cg, "tunnel") >= before + 2


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("kind", ["tcp", "udp", "icmp"])
def test_physical_link_is_blocked_and_counted(lab, servers, cg, kind, family):
    dst = addresses(lab, family, "phy")  # the IPv4 one is also the endpoint's address
    before = dropped(cg)
    with Sniffer(lab) as sniffer:
        result = probe(lab, cg, kind, dst, servers[kind], timeout=BLOCKED_TIMEOUT)
    assert not result.ok
    if kind == "udp":  # TCP retries its dropped SYN and times out; ping reports no reply
        assert result.error.startswith("EPERM")
    assert sniffer.count == 0, sniffer.packets
    assert dropped(cg) >= before + 1
    # control: the same from a process outside the cgroup arrives
    with Sniffer(lab) as control:
        assert probe(lab, None, kind, dst, servers[kind]).ok
    assert control.count >= 1


def test_endpoint_is_reachable_only_on_its_port(lab, servers, cg):
    """The VPN server's address is not an open door (TunnelCrack ServerIP)."""
    before = packets(cg, "endpoint_mismatch")
    assert not probe(lab, cg, "udp", lab.phy4_server, servers["udp"], timeout=BLOCKED_TIMEOUT).ok
    assert packets(cg, "endpoint_mismatch") == before + 1


def test_tunnel_deleted_nothing_leaks(lab, servers, cg):
    lab.tunnel_down()  # the default route now falls back to the physical link
    status = scope_status(cg)
    assert [(t["present"], t["registered"]) for t in status["tunnels"]] == [(False, False)]
    before = packets(cg, "not_tunnel")
    with Sniffer(lab) as sniffer:
        for family in (4, 6):
            for kind in ("tcp", "udp", "icmp"):
                dst = addresses(lab, family, "net")
                assert not probe(lab, cg, kind, dst, servers[kind], timeout=BLOCKED_TIMEOUT).ok, (kind, dst)
    assert sniffer.count == 0, sniffer.packets
    assert packets(cg, "not_tunnel") >= before + 6
    with Sniffer(lab) as control:  # outside the cgroup the fallback route is used
        assert probe(lab, None, "udp", lab.net4_server, servers["udp"]).ok
    assert control.count >= 1


def test_enforcement_persists_after_ksbpf_exits(lab, servers, make_cgroup):
    path = make_cgroup()
    proc = ksbpf("attach", "--cgroup", path, "--tunnel", lab.wg_client, "--netns", lab.client_ns,
                 "--json", check=True)
    assert proc.returncode == 0  # ksbpf has exited: nothing of it runs
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert cgroups.ksbpf_programs(fd)
    finally:
        os.close(fd)
    with Sniffer(lab) as sniffer:
        assert not probe(lab, path, "udp", lab.phy4_server, servers["udp"], timeout=BLOCKED_TIMEOUT).ok
    assert sniffer.count == 0
    assert probe(lab, path, "udp", lab.tun4_server, servers["udp"]).ok


def test_processes_outside_are_unaffected(lab, servers, cg, make_cgroup):
    sibling = make_cgroup("-sibling")
    for kind in ("tcp", "udp", "icmp"):
        assert probe(lab, sibling, kind, lab.phy4_server, servers[kind]).ok
        assert probe(lab, None, kind, lab.phy6_server, servers[kind]).ok


def test_child_cgroups_are_covered(lab, servers, cg):
    child = os.path.join(cg, "child")
    os.mkdir(child)  # removed with its parent by the make_cgroup finalizer
    assert not probe(lab, child, "udp", lab.phy4_server, servers["udp"], timeout=BLOCKED_TIMEOUT).ok
    assert probe(lab, child, "udp", lab.tun4_server, servers["udp"]).ok


def test_reattach_has_no_unprotected_moment(lab, servers, cg):
    """A datagram every 2 ms over the physical link while the policy is
    replaced again and again: not one may get out."""
    with Sniffer(lab) as sniffer:
        with ProbeStream(lab, cg, lab.phy4_server, servers["udp"], interval_ms=2) as stream:
            for extra in ((), ("--allow-dhcp",), ("--allow-lan",), ()):
                out = attach(lab, cg, *extra)
                assert "re-attached" in out
    result = stream.result
    assert result.sent == 0 and result.blocked == result.attempted > 100, result
    assert sniffer.count == 0, sniffer.packets
    assert scope_status(cg)["attached"]
    fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    try:  # exactly one ksbpf program remains
        assert len(cgroups.ksbpf_programs(fd)) == 1
    finally:
        os.close(fd)
    # control: the same stream, once detached, gets through and is seen
    ksbpf("detach", "--cgroup", cg, check=True)
    with Sniffer(lab) as sniffer:
        with ProbeStream(lab, cg, lab.phy4_server, servers["udp"], interval_ms=2) as stream:
            time.sleep(0.2)
    assert stream.result.sent > 0 and sniffer.count > 0


def test_detach_restores_traffic(lab, servers, cg):
    assert not probe(lab, cg, "udp", lab.phy4_server, servers["udp"], timeout=BLOCKED_TIMEOUT).ok
    out = ksbpf("detach", "--cgroup", cg, check=True).stdout
    # the egress program, and the sock_create one (each socket's namespace, and the fast path's end)
    assert "detached 2 program" in out
    for kind in ("tcp", "udp", "icmp"):
        assert probe(lab, cg, kind, lab.phy4_server, servers[kind]).ok
    assert not os.path.exists(f"/sys/fs/bpf/ksbpf/cgroup/{cgroup.cgroup_id(cg)}")
    assert "nothing to remove" in ksbpf("detach", "--cgroup", cg, check=True).stdout


def test_detach_all_is_the_escape_hatch(lab, servers, cg, make_cgroup):
    """Every cgroup scope and node scope goes, and so does a tcx guard whose
    pins were removed by hand."""
    other = make_cgroup("-other")
    attach(lab, other)
    ksbpf("attach", "--node", "--netns", lab.client_path, "--tunnel", lab.wg_client, check=True)
    phy = netns.ifindex(netns.resolve(lab.client_path), lab.phy_client)
    assert netns.run_in(lab.client_path, tc.tcx_query, phy)
    assert not probe(lab, None, "udp", lab.phy4_server, servers["udp"], timeout=BLOCKED_TIMEOUT).ok
    out = json.loads(ksbpf("detach", "--all", "--json", check=True).stdout)
    assert len(out["detached_prog_ids"]) >= 2
    for path in (cg, other, None):
        assert probe(lab, path, "udp", lab.phy4_server, servers["udp"]).ok
    assert netns.run_in(lab.client_path, tc.tcx_query, phy) == []
    st = json.loads(ksbpf("status", "--json", check=True).stdout)
    assert st["scopes"] == [] and st["nodes"] == []


def test_detach_all_finds_guards_without_pins(lab, servers):
    """The escape hatch finds a tcx guard of ksbpf whose pins are gone (an
    attachment held by something else than our pins)."""
    prog = bpf.load(Options(), 0, entries=bpf.TC_ENTRIES)
    phy = netns.ifindex(netns.resolve(lab.client_path), lab.phy_client)
    link = netns.run_in(lab.client_path, tc.tcx_attach, prog.progs[bpf.ENTRY_TC_ETH], phy)
    try:
        assert not probe(lab, None, "udp", lab.phy4_server, servers["udp"], timeout=BLOCKED_TIMEOUT).ok
        out = json.loads(ksbpf("detach", "--all", "--json", check=True).stdout)
        assert out["detached_link_ids"]
        assert probe(lab, None, "udp", lab.phy4_server, servers["udp"]).ok
    finally:
        os.close(link)
        prog.close()


def test_missing_tunnel_is_fail_closed_until_registered(lab, servers, make_cgroup):
    path = make_cgroup()
    lab.tunnel_down()
    out = attach(lab, path)
    assert "NOTICE: tunnel" in out and "does not exist" in out
    lab.tunnel_up()  # the tunnel is back, but not registered yet: still closed
    assert not probe(lab, path, "udp", lab.tun4_server, servers["udp"], timeout=BLOCKED_TIMEOUT).ok
    attach(lab, path)
    assert probe(lab, path, "udp", lab.tun4_server, servers["udp"]).ok


def test_exec_runs_inside_the_scope(lab, servers, cg):
    proc = ksbpf("exec", "--cgroup", cg, "--", "ip", "netns", "exec", lab.client_ns,
                 sys.executable, "-m", "ksbpf.lab.probe", "udp", lab.phy4_server, str(servers["udp"]),
                 "--timeout", "1", check=True)
    assert '"ok": false' in proc.stdout and "EPERM" in proc.stdout
    proc = ksbpf("exec", "--cgroup", cg, "--", "ip", "netns", "exec", lab.client_ns,
                 sys.executable, "-m", "ksbpf.lab.probe", "udp", lab.tun4_server, str(servers["udp"]), check=True)
    assert '"ok": true' in proc.stdout


def test_counters_survive_reattach(lab, servers, cg):
    for _ in range(2):
        probe(lab, cg, "udp", lab.phy6_server, servers["udp"], timeout=BLOCKED_TIMEOUT)
    before = scope_status(cg)["counters"]
    assert before["not_tunnel"]["packets"] >= 2
    attach(lab, cg, "--allow-lan")
    after = scope_status(cg)["counters"]
    assert after["not_tunnel"] == before["not_tunnel"]


def test_status_reports_drops_by_reason(lab, servers, cg):
    for _ in range(3):
        probe(lab, cg, "udp", lab.phy6_server, servers["udp"], timeout=BLOCKED_TIMEOUT)
    probe(lab, cg, "udp", lab.tun4_server, servers["udp"])
    s = scope_status(cg)
    assert s["attached"] and not s["problems"]
    assert s["counters"]["not_tunnel"]["packets"] >= 3 and s["counters"]["not_tunnel"]["allowed"] is False
    assert s["counters"]["tunnel"]["packets"] >= 1 and s["counters"]["tunnel"]["bytes"] > 0
    assert s["dropped_packets"] >= 3
    assert s["endpoints"] == [lab.endpoint4]
    (t,) = s["tunnels"]
    assert (t["name"], t["netns"], t["present"], t["registered"]) == (lab.wg_client, lab.client_ns, True, True)
    assert t["ifindex"] > 1
    text = ksbpf("status", check=True).stdout
    assert cg in text and "not_tunnel" in text and "enforced" in text
