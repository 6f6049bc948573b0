"""Issue 18, row 6: a program put in front of node mode's guard on an
interface's egress (tcx BPF_F_BEFORE, or a clsact filter at a lower
preference) can pass every packet before the guard sees it.  `verify` must
FAIL naming it, `status` must show it, `ksbpf attach --node` and the daemon
must put the guard first again -- make before break, nothing leaking while
they do.  Everything happens in the lab's namespaces; what leaks is counted
on the far side of the physical link, each "nothing" paired with a control
that arrives."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import time

import pytest
from helpers import DaemonProcess, ksbpf, toml_config
from test_observability import free_port, get

from ksbpf.kernel import bpf, libbpf, netns, tc
from ksbpf.lab.namespaces import ProbeStream, Sniffer, UdpEchoServer, new_lab, probe
from ksbpf.scopes import node

pytestmark = pytest.mark.lab
TCX_PASS, TCX_NEXT = 0, -1
SENT = 20


def tc_program(verdict: int, name: str) -> int:
    """A two-instruction tc program: r0 = verdict; exit."""
    insns = struct.pack("=BBhi", 0xB7, 0, 0, verdict) + struct.pack("=BBhi", 0x95, 0, 0, 0)
    return libbpf.prog_load(libbpf.BPF_PROG_TYPE_SCHED_CLS, name, "GPL", insns)


@pytest.fixture
def host(request):
    lab = new_lab("ksfirst")
    request.addfinalizer(lab.destroy)
    lab.create()
    lab.tunnel_up()
    request.addfinalizer(lambda: node.detach(lab.client_path) if os.path.exists(lab.client_path) else None)
    return lab


@pytest.fixture
def server(host):
    with UdpEchoServer(host) as udp:
        yield udp.port


class Front:
    """A program attached in front of everything on the uplink's tcx egress
    (what an attacker with CAP_BPF + CAP_NET_ADMIN in the namespace can do)."""

    def __init__(self, lab, verdict: int, name: str):
        self.lab = lab
        self.ifindex = netns.ifindex(netns.resolve(lab.client_path), lab.phy_client)
        prog = tc_program(verdict, name)
        try:
            self.prog_id = libbpf.prog_info(prog).id
            self.link = netns.run_in(lab.client_path, tc.tcx_attach, prog, self.ifindex)
        finally:
            os.close(prog)
        self.link_id = tc.link_info(self.link).id

    def close(self) -> None:
        if self.link >= 0:
            tc.link_detach(self.link)
            os.close(self.link)
            self.link = -1


@pytest.fixture
def front(host):
    made = []

    def make(verdict: int = TCX_PASS, name: str = "passall") -> Front:
        made.append(Front(host, verdict, name))
        return made[-1]
    yield make
    for f in made:
        f.close()


def send_burst(lab, port: int, count: int = SENT) -> int:
    """`count` datagrams from the host namespace to a server beyond the
    physical link (the tunnel is down: the route falls back to it)."""
    def send() -> int:
        sent = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(count):
                try:
                    s.sendto(b"row6-%d" % i, (lab.net4_server, port))
                    sent += 1
                except OSError:
                    sent += 1   # dropped at tc: the kernel may say so (ENOBUFS/EPERM)
        return sent
    return netns.run_in(lab.client_path, send)


def leaked(lab, port: int) -> tuple[int, int, int]:
    """(datagrams of the burst that arrived, WireGuard control packets that
    arrived, plaintext packets of any kind that arrived -- with a pass-all
    program in front, also the ICMP errors about the echo replies)."""
    with Sniffer(lab) as sniffer:
        assert send_burst(lab, port) == SENT
        probe(lab, None, "udp", lab.phy4_server, lab.wg_port, timeout=0.3)   # control: the endpoint is allowed
    burst = [p for p in sniffer.packets if p.proto == "udp" and p.dport == port and p.dst == lab.net4_server]
    return len(burst), sniffer.wireguard, sniffer.count


def attach_node(lab, *extra: str) -> dict:
    return json.loads(ksbpf("attach", "--node", "--netns", lab.client_path, "--tunnel", lab.wg_client,
                            "--endpoint", lab.endpoint4, *extra, "--json", check=True).stdout)


def verify_node(lab) -> tuple[int, dict]:
    proc = ksbpf("verify", "--scope", f"node:{lab.client_path}", "--json")
    return proc.returncode, {f["check"]: f for f in json.loads(proc.stdout)["findings"]}


def node_status(lab) -> dict:
    (mine,) = [n for n in json.loads(ksbpf("status", "--json", check=True).stdout)["nodes"]
               if n["netns"] == lab.client_path]
    return mine


def uplink(st: dict, lab) -> dict:
    (i,) = [i for i in st["interfaces"] if i["name"] == lab.phy_client]
    return i


def test_pass_all_in_front_is_named_and_attach_puts_the_guard_first(host, server, front):
    host.tunnel_down()
    attach_node(host)                          # the tunnel is gone: none registered, verify clean
    n, wg, total = leaked(host, server)
    assert (n, total, wg >= 1) == (0, 0, True)   # the guard holds, the endpoint (control) passes
    rc, found = verify_node(host)
    assert rc == 0 and found["first"]["verdict"] == "ok", found

    rogue = front(TCX_PASS, "passall")
    n, _, _ = leaked(host, server)
    print(f"row 6, pass-all tcx program in front of the guard: {n} of {SENT} arrived")
    assert n == SENT                           # the attack works: the guard never sees them
    rc, found = verify_node(host)
    assert rc == 1 and found["first"]["verdict"] == "fail", found
    detail = found["first"]["detail"]
    assert f"program {rogue.prog_id} (passall; tcx, link {rogue.link_id})" in detail and host.phy_client in detail
    assert f"bpftool link detach id {rogue.link_id}" in found["first"]["fix"]
    assert "ksbpf attach --node" in found["first"]["fix"]
    st = node_status(host)
    assert not st["attached"]
    assert [p["prog_id"] for p in uplink(st, host)["in_front"]] == [rogue.prog_id]
    assert any(p.startswith("NOT FIRST") for p in st["problems"])
    assert "NOT FIRST" in ksbpf("status", check=True).stdout

    out = attach_node(host)                    # one-shot: the new guard goes in front of everything
    chain = netns.run_in(host.client_path, tc.tcx_query, rogue.ifindex)
    assert chain[0][0] == out["prog_ids"][bpf.ENTRY_TC_ETH] and rogue.prog_id in [p for p, _ in chain]
    n, wg, total = leaked(host, server)
    print(f"row 6, after `ksbpf attach --node`: {n} of {SENT} arrived, {wg} endpoint packets (control)")
    assert n == 0 and total == 0 and wg >= 1
    rc, found = verify_node(host)
    assert rc == 0 and found["first"]["verdict"] == "ok", found
    assert node_status(host)["attached"]


def test_put_first_is_make_before_break(host, server, front):
    """The repair itself under a flood: a program that hands every packet on
    (TCX_NEXT) sits in front; the guard is put first again ten times while
    datagrams stream out at 1 kHz.  None arrives (the guard is in the chain
    all along), and every one of them was judged and counted."""
    attach_node(host)
    host.tunnel_down()
    ns = netns.resolve(host.client_path)
    pin_dir = node_status(host)["pin_dir"]
    (link,) = [li for li in node.links.links(ns) if li.name == host.phy_client]
    rogue = front(TCX_NEXT, "nextall")
    assert [p.prog_id for p in node.programs_in_front(pin_dir, ns, link, "tcx")] == [rogue.prog_id]
    ids = set()
    with Sniffer(host) as sniffer:
        with ProbeStream(host, None, host.net4_server, server, interval_ms=1) as flood:
            for _ in range(10):
                assert node.put_first(pin_dir, ns, link, "tcx")
                ids.add(netns.run_in(host.client_path, tc.tcx_query, rogue.ifindex)[0][0])
                front(TCX_NEXT, "nextall")     # and in front again, for the next round
        probe(host, None, "udp", host.phy4_server, host.wg_port, timeout=0.3)   # control
    print(f"put first 10 times under a flood: {sniffer.count} of {flood.result.sent} leaked")
    assert flood.result.sent > 100
    assert sniffer.count == 0, sniffer.packets[:5]
    assert sniffer.wireguard >= 1
    assert len(ids) == 10                      # a new twin of the guard each time, first each time
    chain = netns.run_in(host.client_path, tc.tcx_query, rogue.ifindex)
    assert len([1 for pid, _ in chain if pid in ids]) == 1   # the old twins were detached
    st = node_status(host)
    assert st["counters"]["not_tunnel"]["packets"] >= flood.result.sent * 0.9


def test_clsact_fallback_names_what_runs_before_it(host, server, front):
    """clsact: a tcx program runs before every clsact filter, and a filter at
    a lower preference before ours.  Both are named; neither can be got
    ahead of, so verify keeps failing until they are removed."""
    attach_node(host, "--tc-mode", "clsact")
    attach_node(host, "--tc-mode", "clsact")   # ours now at preference 2
    host.tunnel_down()
    assert leaked(host, server)[2] == 0
    pin = f"/sys/fs/bpf/ksbpf-test-{host.tag}"
    prog = tc_program(TCX_PASS, "passall_cls")
    try:
        libbpf.obj_pin(prog, pin)
        prog_id = libbpf.prog_info(prog).id
    finally:
        os.close(prog)
    try:
        subprocess.run(["nsenter", f"--net={host.client_path}", "tc", "filter", "add", "dev", host.phy_client,
                        "egress", "pref", "1", "handle", "1", "bpf", "direct-action", "object-pinned", pin],
                       check=True)
        assert leaked(host, server)[0] == SENT
        rc, found = verify_node(host)
        assert rc == 1 and f"program {prog_id} (passall_cls; clsact pref 1)" in found["first"]["detail"], found
        assert f"tc filter del dev {host.phy_client} egress pref 1" in found["first"]["fix"]
        subprocess.run(["nsenter", f"--net={host.client_path}", "tc", "filter", "del", "dev", host.phy_client,
                        "egress", "pref", "1"], check=True)
        assert leaked(host, server)[2] == 0
        rogue = front(TCX_PASS, "passall")    # tcx runs before clsact
        assert leaked(host, server)[0] == SENT
        rc, found = verify_node(host)
        assert rc == 1 and f"program {rogue.prog_id} (passall; tcx, link {rogue.link_id})" in found["first"]["detail"]
        assert uplink(node_status(host), host)["in_front"][0]["prog_id"] == rogue.prog_id
    finally:
        os.unlink(pin)


def run_daemon(host, tmp_path, request, *extra: str) -> tuple[DaemonProcess, str]:
    path = tmp_path / "ksbpf.toml"
    port = free_port()
    lines = "\n".join(extra)
    path.write_text(toml_config([], f"""
[node]
netns = "{host.client_path}"
tunnels = ["{host.wg_client}"]
endpoints = ["{host.endpoint4}"]
{lines}

[metrics]
listen = "127.0.0.1:{port}"
"""))
    d = DaemonProcess(str(path))
    request.addfinalizer(d.stop)
    d.wait_for("ready")
    return d, f"http://127.0.0.1:{port}/metrics"


def metric(url: str, line_start: str, timeout: float = 90) -> str:
    """The first sample line of the daemon's /metrics that starts with line_start (waited for)."""
    deadline = time.monotonic() + timeout
    while True:
        _, text = get(url)
        found = [ln for ln in text.splitlines() if ln.startswith(line_start)]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {line_start} in:\n{text}"
        time.sleep(0.2)


def test_daemon_puts_its_guard_first_again(host, server, front, tmp_path, request):
    d, url = run_daemon(host, tmp_path, request)
    host.tunnel_down()
    after = len(d.events)
    rogue = front(TCX_PASS, "passall")
    ev = d.wait_for("guard_not_first", after=after, interface=host.phy_client, timeout=15)
    assert ev["in_front"][0]["prog_id"] == rogue.prog_id and "bpftool link detach" in ev["fix"]
    d.wait_for("guard_put_first", after=after, interface=host.phy_client, timeout=15)
    chain = netns.run_in(host.client_path, tc.tcx_query, rogue.ifindex)
    first = libbpf.prog_fd_by_id(chain[0][0])
    try:
        assert libbpf.prog_info(first).name == bpf.ENTRY_TC_ETH
    finally:
        os.close(first)
    n, wg, total = leaked(host, server)
    print(f"row 6 with the daemon: after it put its guard first, {n} of {SENT} arrived ({wg} endpoint packets)")
    assert n == 0 and total == 0 and wg >= 1
    assert node_status(host)["attached"]
    assert metric(url, "ksbpf_guards_displaced_total ") == "ksbpf_guards_displaced_total 1.0"


def test_daemon_clsact_reports_what_it_cannot_get_ahead_of(host, server, front, tmp_path, request):
    """clsact: a tcx program runs before every clsact filter.  The daemon
    cannot put its filter in front of it: it says so once, and its
    zero-traffic check exports the failure until the program is removed."""
    d, url = run_daemon(host, tmp_path, request, 'tc_mode = "clsact"')
    host.tunnel_down()
    scope = f'scope="node:{host.client_path}"'
    deadline = time.monotonic() + 90
    while metric(url, "ksbpf_verify_runs_total ").endswith(" 0.0"):   # until a check ran
        assert time.monotonic() < deadline, "the daemon's zero-traffic check never ran"
        time.sleep(0.3)
    # "first" passed: a series only while a check fails
    assert f'ksbpf_verify_failures{{check="first",{scope}}}' not in get(url)[1]
    after = len(d.events)
    rogue = front(TCX_PASS, "passall")
    ev = d.wait_for("guard_not_first_kept", after=after, interface=host.phy_client, timeout=30)
    assert f"bpftool link detach id {rogue.link_id}" in ev["fix"]
    assert leaked(host, server)[0] == SENT      # still in front: the failure is real
    deadline = time.monotonic() + 90   # the daemon's zero-traffic check runs on its own thread: slow on a loaded machine
    while not metric(url, f'ksbpf_verify_failures{{check="first",{scope}}}').endswith(" 1.0"):
        assert time.monotonic() < deadline, "ksbpf_verify_failures{check=first} never became 1"
        time.sleep(0.3)
    assert len([e for e in d.events[after:] if e.get("event") == "guard_not_first"]) == 1   # said once
    rogue.close()
    n, wg, total = leaked(host, server)
    assert n == 0 and total == 0 and wg >= 1    # the filter judges again once it is removed
