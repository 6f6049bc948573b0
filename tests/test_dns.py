"""--dns, the drop rule (issue 17 §3): crafted packets through BPF_PROG_TEST_RUN
on the real cgroup egress program compiled with KSBPF_OPT_DNS.  DNS (TCP/UDP to
53 or 853) to anything but the VPN's resolvers is dropped as dns_not_vpn
wherever it goes -- a loopback stub, another resolver through the tunnel --
and so is DNS to a resolver outside the tunnel; everything else keeps its
rule (the controls).  Each case checks the verdict, that exactly the expected
counter moved, and that the policy model agrees.  The redirection itself
(the sock_addr programs) needs real sockets: tests/test_dns_lab.py."""

from __future__ import annotations

import ipaddress
import subprocess
import uuid

import pytest
from packets import FRAGMENT, ICMP, TCP, UDP, frame, ipv4, ipv6

from ksbpf.errors import KsbpfError
from ksbpf.kernel import bpf, features, libbpf, netns
from ksbpf.policy import Endpoint, NodePolicy, Options, Policy
from ksbpf.reasons import Family, Reason
from ksbpf.verify import crafted, model
from ksbpf.verify.testrun import Runner, allowed

pytestmark = pytest.mark.root

RESOLVERS = (ipaddress.ip_address("10.64.0.1"), ipaddress.ip_address("fd00:64::1"))
EP53 = Endpoint.parse("198.51.100.7:53/udp")   # a VPN server on UDP 53 (evading firewalls): still its endpoint
EP = Endpoint.parse("203.0.113.5:51820/udp")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    name = f"ksbpf-dn{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    progs = {}
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "tnl", "type", "veth", "peer", "name", "phy"], check=True)
        ns = netns.resolve(name)
        cookie = netns.cookie(ns)
        cache = str(tmp_path_factory.mktemp("cache"))
        for label, opts in (("dns", Options(dns=True)), ("dns+lan", Options(allow_lan=True, dns=True)),
                            ("strict", Options())):
            with features.forced_netns_identity(features.NETNS_HELPER):
                prog = bpf.load(opts, 2, cache=cache, entries=(bpf.ENTRY_CGROUP, *bpf.TC_ENTRIES))
            prog.maps.add_tunnel(cookie, netns.ifindex(ns, "tnl"), 0)
            prog.maps.set_netns_cookie(cookie)   # tc: the node scope's namespace
            for ep in (EP, EP53):
                prog.maps.add_endpoint(ep)
            prog.maps.set_dns(RESOLVERS if opts.dns else ())
            progs[label] = prog
        yield {"ns": ns, "cookie": cookie, "progs": progs,
               "ifindex": {"tnl": netns.ifindex(ns, "tnl"), "phy": netns.ifindex(ns, "phy"), "lo": 1}}
    finally:
        for prog in progs.values():
            prog.close()
        subprocess.run(["ip", "netns", "del", name])


def run(env, label: str, pkt: bytes, via: str) -> tuple[bool, Reason, Family]:
    """One IP packet through the cgroup egress program: (allowed, the one reason counted, its family)."""
    prog = env["progs"][label]
    before = prog.maps.counters()
    # a counted test run has a socket of no namespace the program knows -- except with the helper, which
    # answers the namespace the run happens in (netns.run_in): the tunnel is the tunnel
    r = netns.run_in(env["ns"].path, libbpf.prog_test_run, prog.progs[bpf.ENTRY_CGROUP], frame(pkt),
                     env["ifindex"][via])
    after = prog.maps.counters()
    moved = [k for k in after if after[k] != before[k]]
    assert len(moved) == 1, moved
    (reason, family), = moved
    return bool(r.retval & 1), reason, family


def model_says(env, label: str, pkt: bytes, via: str, hook: str = model.CGROUP) -> Reason:
    opts = {"dns": Options(dns=True), "dns+lan": Options(allow_lan=True, dns=True), "strict": Options()}[label]
    scope = model.Scope(opts, (EP, EP53), frozenset({env["ifindex"]["tnl"]}),
                        resolvers=frozenset(a.packed for a in RESOLVERS) if opts.dns else frozenset())
    buf = pkt if hook == model.TC_L3 else frame(pkt)
    return model.decide_test_run(hook, buf, env["ifindex"][via], scope).reason


def run_tc(env, label: str, pkt: bytes, via: str, entry: str) -> tuple[bool, Reason, Family]:
    """One packet through a node scope's tc program (an Ethernet frame, or the bare IP packet of a device
    without a link layer): (allowed, the one reason counted, its family)."""
    prog = env["progs"][label]
    before = prog.maps.counters()
    r = netns.run_in(env["ns"].path, libbpf.prog_test_run, prog.progs[entry],
                     frame(pkt) if entry == bpf.ENTRY_TC_ETH else pkt, env["ifindex"][via])
    after = prog.maps.counters()
    moved = [k for k in after if after[k] != before[k]]
    assert len(moved) == 1, moved
    (reason, family), = moved
    return allowed(True, r.retval), reason, family


CASES = [
    # (label, packet, via, expected reason)
    ("dns", ipv4("10.64.0.1", UDP, dport=53), "tnl", Reason.ALLOW_TUNNEL),
    ("dns", ipv4("10.64.0.1", TCP, dport=53), "tnl", Reason.ALLOW_TUNNEL),
    ("dns", ipv4("10.64.0.1", TCP, dport=853), "tnl", Reason.ALLOW_TUNNEL),
    ("dns", ipv6("fd00:64::1", UDP, dport=53), "tnl", Reason.ALLOW_TUNNEL),
    # another resolver through the tunnel (a hard-coded 8.8.8.8)
    ("dns", ipv4("8.8.8.8", UDP, dport=53), "tnl", Reason.DROP_DNS_NOT_VPN),
    ("dns", ipv4("8.8.8.8", TCP, dport=53), "tnl", Reason.DROP_DNS_NOT_VPN),
    ("dns", ipv4("8.8.8.8", TCP, dport=853), "tnl", Reason.DROP_DNS_NOT_VPN),
    ("dns", ipv6("2001:4860:4860::8888", UDP, dport=53), "tnl", Reason.DROP_DNS_NOT_VPN),
    # the loopback stub (systemd-resolved) that would forward it outside the scope
    ("dns", ipv4("127.0.0.53", UDP, dport=53), "lo", Reason.DROP_DNS_NOT_VPN),
    ("dns", ipv4("127.0.0.53", TCP, dport=53), "lo", Reason.DROP_DNS_NOT_VPN),
    ("dns", ipv6("::1", UDP, dport=53), "lo", Reason.DROP_DNS_NOT_VPN),
    # the VPN's resolver, but not through the tunnel
    ("dns", ipv4("10.64.0.1", UDP, dport=53), "phy", Reason.DROP_DNS_NOT_VPN),
    ("dns+lan", ipv4("10.64.0.1", UDP, dport=53), "phy", Reason.DROP_DNS_NOT_VPN),
    ("dns+lan", ipv4("192.168.1.1", UDP, dport=53), "phy", Reason.DROP_DNS_NOT_VPN),
    # controls: what is not DNS keeps its rule
    ("dns", ipv4("127.0.0.53", UDP, dport=5353), "lo", Reason.ALLOW_LOOPBACK),
    ("dns", ipv4("127.0.0.1", TCP, dport=8080), "lo", Reason.ALLOW_LOOPBACK),
    ("dns", ipv4("8.8.8.8", TCP, dport=443), "tnl", Reason.ALLOW_TUNNEL),
    ("dns", ipv4("8.8.8.8", ICMP), "tnl", Reason.ALLOW_TUNNEL),
    ("dns", ipv4("8.8.8.8", UDP, sport=53, dport=40000), "tnl", Reason.ALLOW_TUNNEL),   # a server's answer
    ("dns", ipv4("8.8.8.8", UDP, dport=53, frag_offset=1480), "tnl", Reason.ALLOW_TUNNEL),   # no ports to see
    ("dns", ipv4("8.8.8.8", TCP, dport=443), "phy", Reason.DROP_NOT_TUNNEL),
    ("dns", ipv4("8.8.8.8", UDP, dport=53, frag_offset=1480), "phy", Reason.DROP_FRAGMENT),
    ("dns", ipv6("2001:db8::1", UDP, dport=53, ext=(FRAGMENT,), frag_offset=1448), "phy", Reason.DROP_FRAGMENT),
    ("dns", ipv4("203.0.113.5", UDP, dport=51820), "phy", Reason.ALLOW_ENDPOINT),
    ("dns", ipv4("198.51.100.7", UDP, dport=53), "phy", Reason.ALLOW_ENDPOINT),   # the VPN itself on port 53
    ("dns", ipv4("198.51.100.7", TCP, dport=53), "phy", Reason.DROP_ENDPOINT_MISMATCH),
    ("dns+lan", ipv4("192.168.1.1", TCP, dport=22), "phy", Reason.ALLOW_LAN),
    # without --dns: the loopback stub and 8.8.8.8 through the tunnel pass (what issue 17 measured)
    ("strict", ipv4("127.0.0.53", UDP, dport=53), "lo", Reason.ALLOW_LOOPBACK),
    ("strict", ipv4("8.8.8.8", UDP, dport=53), "tnl", Reason.ALLOW_TUNNEL),
]


@pytest.mark.parametrize("label,pkt,via,want", CASES,
                         ids=[f"{c[0]}-{i}-{c[2]}-{c[3].label}" for i, c in enumerate(CASES)])
def test_dns_rule(env, label, pkt, via, want):
    ok, reason, family = run(env, label, pkt, via)
    assert reason == want
    assert ok == want.allowed
    assert family == (Family.IPV6 if pkt[0] >> 4 == 6 else Family.IPV4)
    assert model_says(env, label, pkt, via) == want


# Node mode (tc; the netfilter hook runs the same function: tests/test_dns_node_lab.py): the node's and
# its containers' DNS.  Loopback is not judged there (a local stub's upstream queries are, when they leave).
NODE_CASES = [
    ("dns", ipv4("10.64.0.1", UDP, dport=53), "tnl", Reason.ALLOW_TUNNEL),
    ("dns", ipv4("10.64.0.1", TCP, dport=853), "tnl", Reason.ALLOW_TUNNEL),
    ("dns", ipv6("fd00:64::1", TCP, dport=53), "tnl", Reason.ALLOW_TUNNEL),
    # a hard-coded resolver through the tunnel
    ("dns", ipv4("8.8.8.8", UDP, dport=53), "tnl", Reason.DROP_DNS_NOT_VPN),
    ("dns", ipv4("8.8.8.8", TCP, dport=53), "tnl", Reason.DROP_DNS_NOT_VPN),
    ("dns", ipv4("8.8.8.8", TCP, dport=853), "tnl", Reason.DROP_DNS_NOT_VPN),
    ("dns", ipv6("2001:4860:4860::8888", UDP, dport=53), "tnl", Reason.DROP_DNS_NOT_VPN),
    # outside the tunnel: the VPN's resolver, a LAN resolver with --allow-lan
    ("dns", ipv4("10.64.0.1", UDP, dport=53), "phy", Reason.DROP_DNS_NOT_VPN),
    ("dns+lan", ipv4("192.168.1.1", UDP, dport=53), "phy", Reason.DROP_DNS_NOT_VPN),
    ("dns+lan", ipv4("192.168.1.1", TCP, dport=853), "phy", Reason.DROP_DNS_NOT_VPN),
    ("dns+lan", ipv6("fd00::53", UDP, dport=53), "phy", Reason.DROP_DNS_NOT_VPN),
    # controls: what is not DNS keeps its rule
    ("dns", ipv4("127.0.0.53", UDP, dport=53), "lo", Reason.ALLOW_LOOPBACK),
    ("dns", ipv4("8.8.8.8", TCP, dport=443), "tnl", Reason.ALLOW_TUNNEL),
    ("dns", ipv4("8.8.8.8", UDP, sport=53, dport=40000), "tnl", Reason.ALLOW_TUNNEL),
    ("dns", ipv4("8.8.8.8", UDP, dport=53, frag_offset=1480), "tnl", Reason.ALLOW_TUNNEL),
    ("dns", ipv6("2001:db8::1", 58), "tnl", Reason.ALLOW_TUNNEL),   # ICMPv6
    ("dns+lan", ipv4("192.168.1.1", TCP, dport=22), "phy", Reason.ALLOW_LAN),
    ("dns", ipv4("198.51.100.7", UDP, dport=53), "phy", Reason.ALLOW_ENDPOINT),   # the VPN itself on port 53
    ("dns", ipv4("8.8.8.8", TCP, dport=443), "phy", Reason.DROP_NOT_TUNNEL),
    # without --dns: 8.8.8.8 through the tunnel passes (what issue 17 measured), a LAN resolver is lan_dns
    ("strict", ipv4("8.8.8.8", UDP, dport=53), "tnl", Reason.ALLOW_TUNNEL),
]


@pytest.mark.parametrize("entry", (bpf.ENTRY_TC_ETH, bpf.ENTRY_TC_L3))
@pytest.mark.parametrize("label,pkt,via,want", NODE_CASES,
                         ids=[f"{c[0]}-{i}-{c[2]}-{c[3].label}" for i, c in enumerate(NODE_CASES)])
def test_node_dns_rule(env, entry, label, pkt, via, want):
    ok, reason, family = run_tc(env, label, pkt, via, entry)
    assert reason == want
    assert ok == want.allowed
    assert family == (Family.IPV6 if pkt[0] >> 4 == 6 else Family.IPV4)
    hook = model.TC_ETH if entry == bpf.ENTRY_TC_ETH else model.TC_L3
    assert model_says(env, label, pkt, via, hook) == want


def test_node_verify_crafted_frames_agree(env):
    """`ksbpf verify`'s crafted frames for a node scope with resolvers, through the tunnel and the uplink:
    kernel and model agree on each, and DNS to 8.8.8.8 through the tunnel is among them, dropped."""
    for entry, hook, ethernet in ((bpf.ENTRY_TC_ETH, model.TC_ETH, True), (bpf.ENTRY_TC_L3, model.TC_L3, False)):
        cases = crafted.tc_frames((EP, EP53), ethernet, resolvers=RESOLVERS)
        assert any(label == "dns/tcp to 8.8.8.8" for label, _ in cases)
        seen = {}
        runner = Runner(env["progs"]["dns"].progs[entry])
        scope = model.Scope(Options(dns=True), (EP, EP53), frozenset({env["ifindex"]["tnl"]}),
                            resolvers=frozenset(a.packed for a in RESOLVERS))
        for label, buf in cases:
            for via in ("tnl", "phy"):
                want = model.decide_test_run(hook, buf, env["ifindex"][via], scope)
                got = allowed(True, netns.run_in(env["ns"].path, runner.run, buf, env["ifindex"][via]))
                assert got == want.allowed, (label, via, want)
                seen[(label, via)] = want.reason
        assert seen[("dns/udp to 8.8.8.8", "tnl")] == seen[("dns/tcp to 8.8.8.8", "tnl")] == Reason.DROP_DNS_NOT_VPN
        assert seen[("dns/udp to the VPN's resolver 10.64.0.1", "tnl")] == Reason.ALLOW_TUNNEL
        assert seen[("dns/udp to the VPN's resolver 10.64.0.1", "phy")] == Reason.DROP_DNS_NOT_VPN


def test_malformed_keeps_its_rule(env):
    """A packet that does not parse: loopback and the tunnel still let it go (as without --dns)."""
    bad = ipv4("8.8.8.8", UDP, dport=53)[:22]   # the UDP header cut short
    for via, want in (("lo", Reason.ALLOW_LOOPBACK), ("tnl", Reason.ALLOW_TUNNEL), ("phy", Reason.DROP_MALFORMED)):
        ok, reason, _ = run(env, "dns", bad, via)
        assert (ok, reason) == (want.allowed, want)
        assert model_says(env, "dns", bad, via) == want


def test_verify_crafted_packets_agree(env):
    """`ksbpf verify`'s crafted packets for a scope with resolvers: kernel and model agree on every one, and
    the DNS cases are there (to the resolvers, the stub, 8.8.8.8)."""
    cases = crafted.packets((EP, EP53), resolvers=RESOLVERS)
    labels = [c[0] for c in cases]
    assert any("127.0.0.53" in x for x in labels) and any("VPN's resolver 10.64.0.1" in x for x in labels)
    seen = set()
    for _label, pkt in cases:
        for via in ("lo", "tnl", "phy"):
            ok, reason, _ = run(env, "dns", pkt, via)
            assert reason == model_says(env, "dns", pkt, via), (_label, via)
            seen.add(reason)
    assert {Reason.DROP_DNS_NOT_VPN, Reason.ALLOW_TUNNEL, Reason.ALLOW_LOOPBACK} <= seen


def test_redirect_programs_load_where_probed():
    """The sock_addr entry points are compiled with --dns and load for their attach types (where the probe
    says the kernel has them); without --dns there are none, and the maps are absent."""
    with_dns = bpf.cflags(Options(dns=True), 0)
    assert "-DKSBPF_OPT_DNS" in with_dns and "-DKSBPF_OPT_DNS" not in bpf.cflags(Options(), 0)
    entries = bpf.compiled_entries(with_dns)
    assert set(bpf.DNS_ENTRIES) <= set(entries) if features.has("sock_addr") else not set(bpf.DNS_ENTRIES) & set(entries)
    assert not set(bpf.DNS_ENTRIES) & set(bpf.compiled_entries(bpf.cflags(Options(), 0)))


def test_policy_checks():
    p = Policy(("wg0",), dns=(ipaddress.ip_address("10.64.0.1"), ipaddress.ip_address("10.64.0.1")))
    assert p.dns == (ipaddress.ip_address("10.64.0.1"),) and p.options.dns
    assert Policy.from_dict(p.to_dict()) == p
    assert not Policy(("wg0",)).options.dns and "dns" not in Policy(("wg0",)).to_dict()
    with pytest.raises(KsbpfError, match="contradict"):
        Policy(("wg0",), options=Options(allow_lan=True, allow_lan_dns=True), dns=p.dns)
    with pytest.raises(KsbpfError, match="cannot be a DNS server"):
        Policy(("wg0",), dns=(ipaddress.ip_address("0.0.0.0"),))
    # node mode takes resolvers (the same compile-time switch), and refuses --allow-lan-dns with them as well
    assert NodePolicy(p).policy.options.dns and NodePolicy.from_dict(NodePolicy(p).to_dict()) == NodePolicy(p)


def test_node_netfilter_hook_judges_the_tunnels_only_with_dns():
    """nf_pass (what the netfilter hook passes at once): without --dns the tunnels are in it; with --dns they
    are not (no tc guard sees what goes through them), the rest is as before."""
    from ksbpf.kernel.links import Link
    from ksbpf.scopes import node as node_scope

    present = [Link(1, "lo", None, True), Link(2, "eth0", "veth", True), Link(3, "wg0", "wireguard", True),
               Link(4, "docker0", "bridge", True), Link(5, "usb0", "veth", True)]
    live = {2: True}   # eth0's guard in force, usb0's not yet
    plain = NodePolicy(Policy(("wg0",)))
    assert node_scope.nf_pass_set(plain, present, live) == {1, 2, 3, 4}
    with_dns = NodePolicy(Policy(("wg0",), dns=RESOLVERS))
    assert node_scope.nf_pass_set(with_dns, present, live) == {1, 2, 4}


def test_node_dns_line_says_what_is_not_judged():
    """attach's and status's line: the resolvers, no redirection, and, without the netfilter hook, that DNS
    through the tunnel is not judged."""
    from ksbpf.scopes import node as node_scope

    np = NodePolicy(Policy(("wg0",), dns=RESOLVERS))
    assert node_scope.dns_state(NodePolicy(Policy(("wg0",))), "on") is None
    on = node_scope.dns_state(np, "on")
    assert on == {"resolvers": ["10.64.0.1", "fd00:64::1"], "redirect": False, "through_tunnel": True}
    line = node_scope.dns_line(on)
    assert "only to 10.64.0.1, fd00:64::1 through the tunnel" in line and "not redirected in node mode" in line
    assert "NOT judged" not in line and "\n" not in line
    off = node_scope.dns_state(np, node_scope.NF_ABSENT)
    assert off["through_tunnel"] is False and "DNS through the tunnel NOT judged" in node_scope.dns_line(off)
