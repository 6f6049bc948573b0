"""The daemon against a real wireguard-go tunnel, in namespaces only."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from helpers import ksbpf, scope_status, toml_config

from ksbpf.kernel import libbpf
from ksbpf.lab.namespaces import ProbeStream, Sniffer, probe

pytestmark = pytest.mark.lab
RESUME_BOUND = 1.0    # seconds from "tunnel is back" to traffic flowing through it again
BLOCKED_TIMEOUT = 1.0


def scope_of(lab, cg: str, **extra) -> dict:
    return {"cgroup": cg, "tunnels": [lab.wg_client], "netns": lab.client_ns,
            "endpoints": [lab.endpoint4], **extra}


def prog_ids(cg: str) -> list[int]:
    fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return libbpf.prog_query(fd, libbpf.BPF_CGROUP_INET_EGRESS)
    finally:
        os.close(fd)


def wait_probe_ok(lab, cg, dst, port, bound: float) -> float:
    """Seconds until a UDP probe from the cgroup gets through; fails past `bound`."""
    start = time.monotonic()
    while True:
        if probe(lab, cg, "udp", dst, port, timeout=0.2).ok:
            return time.monotonic() - start
        assert time.monotonic() - start < bound, f"traffic did not resume within {bound} s"


def test_tunnel_flaps_twenty_times_without_a_leak(lab, servers, make_cgroup, run_daemon):
    cg = make_cgroup()
    d = run_daemon([scope_of(lab, cg)])
    assert d.named("scope_attached")
    resumed, ifindexes = [], set()
    with Sniffer(lab) as sniffer:
        # a datagram every 2 ms to "the internet": via the tunnel when it is up,
        # via the fallback route over the physical link when it is not
        with ProbeStream(lab, cg, lab.net4_server, servers["udp"], interval_ms=2) as stream:
            for i in range(20):
                mark = len(d.events)
                lab.tunnel_down()
                d.wait_for("map_update", after=mark)
                lab.tunnel_up()
                appeared = d.wait_for("tunnel_appeared", after=mark)
                ifindexes.add(appeared["ifindex"])
                resumed.append(wait_probe_ok(lab, cg, lab.net4_server, servers["udp"], RESUME_BOUND))
    assert sniffer.count == 0, sniffer.packets
    assert len(ifindexes) == 20           # a new interface every time
    assert stream.result.sent > 0 and stream.result.blocked > 0
    assert max(resumed) < RESUME_BOUND
    assert d.proc.poll() is None          # the daemon was never restarted
    # control: outside the cgroup, the same tunnel-down moment does leak
    lab.tunnel_down()
    with Sniffer(lab) as control:
        assert probe(lab, None, "udp", lab.net4_server, servers["udp"]).ok
    assert control.count >= 1


def test_a_veth_renamed_to_the_tunnel_name_opens_nothing(lab, servers, make_cgroup, run_daemon):
    cg = make_cgroup()
    d = run_daemon([scope_of(lab, cg)])
    lab.tunnel_down()
    c, s = lab.client_ns, lab.server_ns
    for cmd in (f"ip -n {c} link add imp{lab.tag} type veth peer name imq{lab.tag} netns {s}",
                f"ip -n {c} link set imp{lab.tag} name {lab.wg_client}",
                f"ip -n {c} addr add 192.0.2.1/24 dev {lab.wg_client}",
                f"ip -n {s} addr add 192.0.2.2/24 dev imq{lab.tag}",
                f"ip -n {c} link set {lab.wg_client} up", f"ip -n {s} link set imq{lab.tag} up"):
        subprocess.run(cmd.split(), check=True)
    d.wait_for("impostor_rejected", tunnel=lab.wg_client, kind="veth")
    assert not probe(lab, cg, "udp", "192.0.2.2", servers["udp"], timeout=BLOCKED_TIMEOUT).ok
    assert probe(lab, None, "udp", "192.0.2.2", servers["udp"]).ok   # control: the path itself works
    (t,) = scope_status(cg)["tunnels"]
    assert (t["kind"], t["impostor"], t["registered"]) == ("veth", True, False)
    assert not d.named("tunnel_appeared")[1:]   # only the real tunnel, at start-up


def test_kill9_keeps_enforcement_and_restart_adopts(lab, servers, make_cgroup, run_daemon):
    cg = make_cgroup()
    d = run_daemon([scope_of(lab, cg)])
    (prog,) = prog_ids(cg)
    with Sniffer(lab) as sniffer:
        with ProbeStream(lab, cg, lab.net4_server, servers["udp"], interval_ms=2) as stream:
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait()
            assert not probe(lab, cg, "udp", lab.phy6_server, servers["udp"], timeout=BLOCKED_TIMEOUT).ok
            lab.tunnel_down()          # with nobody watching: the old entry is useless, so closed
            lab.tunnel_up()
            time.sleep(0.2)
            d2 = run_daemon([scope_of(lab, cg)])
            d2.wait_for("scope_adopted", scope=cg)
            assert prog_ids(cg) == [prog]   # adopted: not detached, not re-attached
            wait_probe_ok(lab, cg, lab.net4_server, servers["udp"], RESUME_BOUND)
    assert sniffer.count == 0, sniffer.packets
    assert stream.result.blocked > 0 and stream.result.sent > 0


def test_sigterm_exits_without_detaching(lab, servers, make_cgroup, run_daemon):
    cg = make_cgroup()
    d = run_daemon([scope_of(lab, cg)])
    assert d.stop() == 0
    assert d.named("exiting")
    assert prog_ids(cg)
    assert not probe(lab, cg, "udp", lab.phy6_server, servers["udp"], timeout=BLOCKED_TIMEOUT).ok


def test_scope_attached_by_hand_is_adopted(lab, make_cgroup, run_daemon):
    cg = make_cgroup()
    ksbpf("attach", "--cgroup", cg, "--tunnel", lab.wg_client, "--netns", lab.client_ns,
          "--endpoint", lab.endpoint4, check=True)
    before = prog_ids(cg)
    d = run_daemon([scope_of(lab, cg)])
    d.wait_for("scope_adopted", scope=cg)
    assert prog_ids(cg) == before and len(before) == 1


def test_sighup_applies_a_changed_config_without_a_gap(lab, servers, make_cgroup, run_daemon):
    a, b, c = make_cgroup("-a"), make_cgroup("-b"), make_cgroup("-c")
    d = run_daemon([scope_of(lab, a), scope_of(lab, c)])
    (prog_a,) = prog_ids(a)
    with Sniffer(lab) as sniffer:
        with ProbeStream(lab, a, lab.phy6_server, servers["udp"], interval_ms=2) as stream:
            with open(d.config_path, "w") as f:
                f.write(toml_config([scope_of(lab, a, allow_dhcp=True), scope_of(lab, b)]))
            mark = len(d.events)
            d.proc.send_signal(signal.SIGHUP)
            d.wait_for("reloaded", after=mark)
    assert sniffer.count == 0 and stream.result.sent == 0 and stream.result.blocked > 0
    assert d.wait_for("scope_replaced", scope=a)
    assert len(prog_ids(a)) == 1 and prog_ids(a) != [prog_a]
    assert scope_status(a)["options"]["allow_dhcp"] is True
    d.wait_for("scope_attached", scope=b)
    assert len(prog_ids(b)) == 1
    d.wait_for("scope_removed", scope=c)
    assert prog_ids(c) == []
    assert probe(lab, c, "udp", lab.phy4_server, servers["udp"]).ok


def test_a_bad_reload_keeps_the_running_config(lab, make_cgroup, run_daemon):
    cg = make_cgroup()
    d = run_daemon([scope_of(lab, cg)])
    before = prog_ids(cg)
    with open(d.config_path, "w") as f:
        f.write('[[scope]]\ncgroup = "relative/path"\ntunnels = []\n')
    mark = len(d.events)
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for("reload_rejected", after=mark)
    assert prog_ids(cg) == before and d.proc.poll() is None


def test_route_outside_the_tunnel_raises_an_alert(lab, make_cgroup, run_daemon):
    cg = make_cgroup()
    d = run_daemon([scope_of(lab, cg)])
    c, phy, via = lab.client_ns, lab.phy_client, lab.phy4_server
    quiet = [f"ip -n {c} route add {via}/32 dev {phy}",                # the endpoint itself
             f"ip -n {c} route add 198.51.100.0/24 dev {lab.wg_client}",  # through the tunnel
             f"ip -n {c} route add 192.168.77.0/24 dev {phy} proto kernel scope link"]
    loud = [f"ip -n {c} route add 203.0.113.0/24 via {via} dev {phy}",   # a DHCP option-121 style route
            f"ip -n {c} route add 0.0.0.0/1 via {via} dev {phy}",         # TunnelVision's two /1 routes
            f"ip -n {c} route add 128.0.0.0/1 via {via} dev {phy}",
            f"ip -n {c} route add 198.51.100.7/32 via {via} dev {phy}"]
    for cmd in quiet + loud:
        subprocess.run(cmd.split(), check=True)
    d.wait_for("route_alert", route=f"198.51.100.7/32 via {via}")
    alerts = [(e["route"], e["dev"]) for e in d.named("route_alert")]
    assert alerts == [(f"203.0.113.0/24 via {via}", [phy]), (f"0.0.0.0/1 via {via}", [phy]),
                      (f"128.0.0.0/1 via {via}", [phy]), (f"198.51.100.7/32 via {via}", [phy])]


def test_bad_config_changes_nothing(tmp_path, make_cgroup):
    cg = make_cgroup()
    path = tmp_path / "bad.toml"
    path.write_text(f'[[scope]]\ncgroup = "{cg}"\ntunnels = ["wg0"]\nendpoints = ["203.0.113.5:0/udp"]\nalow_lan = true\n')
    proc = ksbpf("daemon", "--config", str(path), timeout=30)
    assert proc.returncode == 1
    assert f"{path}:4" in proc.stderr and f"{path}:5" in proc.stderr
    assert prog_ids(cg) == []
    proc = ksbpf("apply", "--config", str(path), timeout=30)
    assert proc.returncode == 1 and prog_ids(cg) == []


def test_a_recreated_namespace_is_followed(make_cgroup, run_daemon, tag):
    """A namespace deleted and re-created under the same name is a new one:
    the scope moves to it (make-before-break) and tracks its tunnels."""
    name, tun = f"ksbpf-t{tag}", f"tun{tag}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        cg = make_cgroup()
        d = run_daemon([{"cgroup": cg, "tunnels": [tun], "netns": name}])
        subprocess.run(["ip", "netns", "del", name], check=True)
        subprocess.run(["ip", "netns", "add", name], check=True)
        mark = len(d.events)
        d.wait_for("netns_changed", after=mark, netns=name, timeout=15)
        d.wait_for("scope_replaced", after=mark, scope=cg, timeout=15)
        subprocess.run(["ip", "-n", name, "tuntap", "add", "dev", tun, "mode", "tun"], check=True)
        d.wait_for("tunnel_appeared", after=mark, tunnel=tun, kind="tun")
        deadline = time.monotonic() + 5
        while not scope_status(cg)["tunnels"][0]["registered"]:
            assert time.monotonic() < deadline, scope_status(cg)
            time.sleep(0.05)
        assert not scope_status(cg)["problems"]
    finally:
        subprocess.run(["ip", "netns", "del", name])
