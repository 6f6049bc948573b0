"""`ksbpf verify` on a node scope: every non-internal interface guarded, the
tc programs' verdicts on each interface as the policy says (Ethernet and
link-header-less devices, ARP and neighbour discovery), counters untouched;
a guard removed by hand is found."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from helpers import KSBPF, ksbpf

from ksbpf.kernel import libbpf, netns, nf, pins, rawsock, tc
from ksbpf.scopes import node

pytestmark = pytest.mark.root


@pytest.fixture
def guarded(tag):
    """A namespace with eth0 (veth, guarded), tun9 (tun, guarded), tun0 (the
    tunnel), docker0 (internal), guarded in node mode."""
    name = f"ksbpf-vn{tag}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for args in (("link", "add", "eth0", "type", "veth", "peer", "name", "eth1"),
                     ("tuntap", "add", "mode", "tun", "name", "tun0"), ("tuntap", "add", "mode", "tun", "name", "tun9"),
                     ("link", "add", "docker0", "type", "bridge")):
            subprocess.run(["ip", "-n", name, *args], check=True)
        yield name
    finally:
        if os.path.exists(f"/run/netns/{name}"):
            node.detach(f"/run/netns/{name}")
        subprocess.run(["ip", "netns", "del", name])


def attach(ns: str, *extra: str) -> None:
    ksbpf("attach", "--node", "--netns", ns, "--tunnel", "tun0", "--endpoint", "203.0.113.5:51820/udp", *extra,
          check=True)


def verify_node(ns: str, *argv_prefix: str) -> tuple[int, dict[str, dict]]:
    proc = subprocess.run([*argv_prefix, *KSBPF, "verify", "--scope", f"node:{ns}", "--json"],
                          capture_output=True, text=True, timeout=120)
    out = json.loads(proc.stdout)
    return proc.returncode, {f["check"]: f for f in out["findings"]}


def node_counters(ns: str) -> dict:
    nodes = json.loads(ksbpf("status", "--json", check=True).stdout)["nodes"]
    (mine,) = [n for n in nodes if n["netns"].endswith(ns)]
    return {"counters": mine["counters"], "events": mine["events"]}


def test_clean_node_scope(guarded):
    attach(guarded)
    before = node_counters(guarded)
    rc, found = verify_node(guarded)
    assert rc == 0, found
    assert set(found) == {"guarded", "first", "pins", "tunnels", "policy", "routes", "ipv6", "raw_sockets"} | (
        {"from_birth"} if nf.supported() else set())
    raw = found.pop("raw_sockets")   # the BPF LSM layer: ok where the kernel runs it, else a warning saying why
    if rawsock.node_available():
        assert raw["verdict"] == "ok", raw
    else:
        assert raw["verdict"] == "warn" and rawsock.node_why_not() in raw["detail"], raw
    assert all(f["verdict"] == "ok" for f in found.values()), found
    assert "eth0" in found["guarded"]["detail"] and "tun9" in found["guarded"]["detail"]
    assert "docker0 internal" in found["guarded"]["detail"] and "tun0 tunnel" in found["guarded"]["detail"]
    assert "crafted frames through the tc programs on" in found["policy"]["detail"]
    assert node_counters(guarded) == before     # the nonce: neither counted nor streamed


@pytest.mark.skipif(not nf.supported(), reason="this kernel has no netfilter BPF links (Linux 6.4+)")
def test_a_missing_netfilter_link_fails(guarded):
    attach(guarded)
    pin_dir = pins.node_dir(netns.cookie(netns.resolve(guarded)))
    nf.unpin(os.path.join(pin_dir, node.NF_DIR, "ipv4"))
    rc, found = verify_node(guarded)
    assert rc != 0
    assert found["from_birth"]["verdict"].lower() == "fail" and "ipv4" in found["from_birth"]["detail"], found


def test_guard_removed_by_hand(guarded):
    attach(guarded)
    ns = netns.resolve(guarded)
    pin_dir = pins.node_dir(netns.cookie(ns))
    eth0 = netns.ifindex(ns, "eth0")
    link_fd = libbpf.obj_get(os.path.join(pin_dir, node.LINKS_DIR, str(eth0)))
    try:
        tc.link_detach(link_fd)
    finally:
        os.close(link_fd)
    rc, found = verify_node(guarded)
    assert rc == 1
    assert found["guarded"]["verdict"] == "fail" and f"eth0 (ifindex {eth0})" in found["guarded"]["detail"]


def test_exempted_cgroup_is_judged_as_exempt(guarded, make_cgroup):
    """A verify run from inside an exempted cgroup: its test runs' sockets are
    exempt, drops pass -- and the model knows it, so they still agree."""
    cg = make_cgroup()
    attach(guarded, "--exempt-cgroup", cg)
    rc, found = verify_node(guarded, "sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cg)
    assert rc == 0 and found["policy"]["verdict"] == "ok", found["policy"]
