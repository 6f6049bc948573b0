"""The lab itself: namespaces, a real wireguard-go tunnel, probes, servers, sniffer.

These check the tools the kill-switch tests rely on, without any BPF attached:
every probe here must succeed, and the sniffer must see what really crosses
the physical link.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from ksbpf.errors import KsbpfError
from ksbpf.kernel import netns
from ksbpf.lab.namespaces import Lab, ProbeResult, ProbeStream, Sniffer, new_lab, probe

pytestmark = [  # conftest skips "lab" tests when not root
    pytest.mark.lab,
    pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="needs wireguard-go"),
]


def _client_ifindex(lab: Lab) -> int | None:
    return netns.ifindex(netns.resolve(lab.client_path), lab.wg_client)


def test_tunnel_is_wireguard_go(lab):
    out = subprocess.run(["ip", "-n", lab.client_ns, "-d", "-j", "link", "show", "dev",
                          lab.wg_client], capture_output=True, text=True, check=True).stdout
    assert json.loads(out)[0]["linkinfo"]["info_kind"] == "tun"
    assert probe(lab, None, "icmp", lab.tun4_server).ok


@pytest.mark.parametrize("kind", ["tcp", "udp", "icmp"])
@pytest.mark.parametrize("family", [4, 6])
def test_probes_through_tunnel(lab, servers, kind, family):
    dst = lab.tun4_server if family == 4 else lab.tun6_server
    assert probe(lab, None, kind, dst, servers[kind]) == ProbeResult(True, None)


@pytest.mark.parametrize("family", [4, 6])
def test_internet_goes_through_tunnel_then_falls_back_to_phy(lab, servers, family):
    """The default routes: the tunnel while it exists, else the physical link."""
    dst = lab.net4_server if family == 4 else lab.net6_server
    with Sniffer(lab) as sniffer:
        assert probe(lab, None, "udp", dst, servers["udp"]).ok
    assert sniffer.count == 0 and sniffer.wireguard > 0
    lab.tunnel_down()
    with Sniffer(lab) as sniffer:
        assert probe(lab, None, "udp", dst, servers["udp"]).ok
    assert [(p.proto, p.dst) for p in sniffer.packets] == [("udp", dst)]


def test_probe_failure_is_reported(lab, servers):
    result = probe(lab, None, "udp", lab.tun4_server, 9, timeout=0.5)  # nothing listens
    assert not result.ok and result.error.startswith("ECONNREFUSED")
    with pytest.raises(KsbpfError, match="did not run"):
        probe("ksbpf-no-such-netns", None, "icmp", lab.tun4_server)


@pytest.mark.parametrize("family", [4, 6])
def test_sniffer_counts_plaintext_on_phy(lab, servers, family):
    dst = lab.phy4_server if family == 4 else lab.phy6_server
    with Sniffer(lab) as sniffer:
        assert probe(lab, None, "udp", dst, servers["udp"]).ok
        assert probe(lab, None, "tcp", dst, servers["tcp"]).ok
    assert sniffer.dropped == 0
    assert {(p.proto, p.dst, p.dport) for p in sniffer.packets} == {
        ("udp", dst, servers["udp"]), ("tcp", dst, servers["tcp"])}
    assert sniffer.count == len(sniffer.packets) >= 4  # a datagram; SYN, data, ACKs, FIN


def test_sniffer_ignores_wireguard_transport(lab, servers):
    with Sniffer(lab) as sniffer:
        for dst in (lab.tun4_server, lab.tun6_server):
            for kind in ("tcp", "udp", "icmp"):
                assert probe(lab, None, kind, dst, servers[kind]).ok
    assert sniffer.wireguard >= 6  # the probes really crossed the phy link, encrypted
    assert sniffer.count == 0, sniffer.packets


def test_tunnel_down_and_up_again(lab):
    before = _client_ifindex(lab)
    lab.tunnel_down()
    assert _client_ifindex(lab) is None
    with Sniffer(lab) as sniffer:  # the default route now leads over the physical link
        assert probe(lab, None, "icmp", lab.net4_server).ok
    assert [(p.proto, p.dst) for p in sniffer.packets] == [("icmp", lab.net4_server)]
    lab.tunnel_up()
    after = _client_ifindex(lab)
    assert after is not None and after != before
    assert probe(lab, None, "icmp", lab.tun6_server).ok


def test_probe_stream(lab, servers):
    with ProbeStream(lab, None, lab.tun4_server, servers["udp"], interval_ms=2) as stream:
        time.sleep(0.3)
    result = stream.result
    assert result is not None and result.blocked == 0 and result.errors == {}
    assert result.attempted == result.sent >= 20


def test_probe_in_an_empty_cgroup(lab, servers, make_cgroup):
    empty_cgroup = make_cgroup()  # conftest: unique name, removed by a finalizer
    assert probe(lab, empty_cgroup, "tcp", lab.tun4_server, servers["tcp"]).ok
    assert probe(lab, empty_cgroup, "udp", lab.tun6_server, servers["udp"]).ok
    client_ns = netns.resolve(lab.client_path).inode
    procs = os.path.join(empty_cgroup, "cgroup.procs")
    with ProbeStream(lab, empty_cgroup, lab.tun4_server, servers["udp"]):
        with open(procs) as f:
            members = [int(p) for p in f.read().split()]
        assert len(members) == 1  # the probe itself, already in the client namespace
        assert os.stat(f"/proc/{members[0]}/ns/net").st_ino == client_ns
    with open(procs) as f:
        assert f.read() == ""


def test_destroy_leaves_nothing():
    lab = new_lab("ksbpft")
    try:
        with lab:
            lab.tunnel_up()
            pids = {int(p) for ns in (lab.client_ns, lab.server_ns)
                    for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                            text=True, check=True).stdout.split()}
            assert len(pids) == 2  # one wireguard-go per side
    finally:
        lab.destroy()  # a second call is harmless
    assert not os.path.exists(lab.client_path) and not os.path.exists(lab.server_path)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)
    for ifname in (lab.wg_client, lab.wg_server):
        assert not os.path.exists(f"/var/run/wireguard/{ifname}.sock")
