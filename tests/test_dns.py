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
                prog = bpf.load(opts, 2, cache=cache, entries=(bpf.ENTRY_CGROUP,))
            prog.maps.add_tunnel(cookie, netns.ifindex(ns, "tnl"), 0)
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


def model_says(env, label: str, pkt: bytes, via: str) -> Reason:
    prog = env["progs"][label]
    opts = {"dns": Options(dns=True), "dns+lan": Options(allow_lan=True, dns=True), "strict": Options()}[label]
    scope = model.Scope(opts, (EP, EP53), frozenset({env["ifindex"]["tnl"]}),
                        resolvers=frozenset(a.packed for a in RESOLVERS) if opts.dns else frozenset())
    del prog
    return model.decide_test_run(model.CGROUP, frame(pkt), env["ifindex"][via], scope).reason


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
    with pytest.raises(KsbpfError, match="node mode"):
        NodePolicy(p)
