"""--dns end to end (issue 17 §3 and §4), in the namespace lab with a real
wireguard-go tunnel.

Resolvers, all in the server namespace, each answering A queries with its own
address and counting what it gets:
- the VPN's resolver, on the tunnel's server address (reached through the tunnel);
- an "upstream" resolver on the server's physical address (reached over the
  physical link, where a stub resolver forwards);
- a hard-coded 8.8.8.8-style resolver: an address routed into the tunnel
  that is not the VPN's resolver (IPv4 and IPv6).
A stub resolver (a UDP relay on 127.0.0.53:53 of the client namespace,
OUTSIDE the scope: it runs in the test process) forwards to the upstream over
the physical link, as systemd-resolved would.

Without --dns (the control) the scope's query via the stub reaches the
upstream and a query to the hard-coded resolver reaches it.  With --dns the
upstream and the hard-coded resolver get 0 queries, and the application
still gets answers -- from the VPN's resolver, redirected, with the source
address it asked; where a query cannot be redirected (an IPv6 query with an
IPv4 resolver only) it is dropped and counted as dns_not_vpn."""

from __future__ import annotations

import os

import pytest
from dnslab import DnsServer, StubRelay, query
from helpers import ksbpf, packets, scope_status

from ksbpf.kernel import bpf
from ksbpf.scopes import cgroups

pytestmark = pytest.mark.lab

VPN_ANSWER, UPSTREAM_ANSWER, OTHER_ANSWER, OTHER6_ANSWER = "10.111.0.1", "10.222.0.2", "10.88.8.8", "10.66.6.6"
STUB = "127.0.0.53"


@pytest.fixture
def dns(lab):
    """The resolvers and the stub; closed after the test."""
    with DnsServer(lab.server_path, lab.tun4_server, VPN_ANSWER) as vpn, \
            DnsServer(lab.server_path, lab.phy4_server, UPSTREAM_ANSWER) as upstream, \
            DnsServer(lab.server_path, lab.net4_server, OTHER_ANSWER) as other, \
            DnsServer(lab.server_path, lab.net6_server, OTHER6_ANSWER) as other6, \
            StubRelay(lab.client_path, STUB, lab.phy4_server) as stub:
        yield {"vpn": vpn, "upstream": upstream, "other": other, "other6": other6, "stub": stub}


def attach(lab, cg: str, *extra: str) -> None:
    ksbpf("attach", "--cgroup", cg, "--tunnel", lab.wg_client, "--netns", lab.client_ns,
          "--endpoint", lab.endpoint4, *extra, check=True)


def ask(lab, cg, server: str, proto: str = "udp", timeout: float = 3.0) -> dict:
    return query(lab.client_ns, cg, server, proto, timeout)


def test_without_dns_the_stub_and_other_resolvers_leak(lab, make_cgroup, dns):
    """The control, and issue 17's measurement: the scope's query to the stub is relayed upstream over the
    physical link, a hard-coded resolver through the tunnel answers."""
    cg = make_cgroup()
    attach(lab, cg)
    r = ask(lab, cg, STUB)
    assert r["ok"] and r["answer"] == UPSTREAM_ANSWER, r
    assert dns["upstream"].queries >= 1 and dns["stub"].relayed >= 1
    r = ask(lab, cg, lab.net4_server)
    assert r["ok"] and r["answer"] == OTHER_ANSWER, r
    assert dns["other"].queries >= 1


def test_dns_goes_only_to_the_vpn_resolver(lab, make_cgroup, dns):
    cg = make_cgroup()
    attach(lab, cg, "--dns", lab.tun4_server)
    st = scope_status(cg)
    assert st["dns"] == {"resolvers": [lab.tun4_server], "redirect": True}

    # the VPN's resolver itself: answers (the control that must arrive)
    for proto in ("udp", "tcp"):
        r = ask(lab, cg, lab.tun4_server, proto)
        assert r["ok"] and r["answer"] == VPN_ANSWER and r["from"] == lab.tun4_server, (proto, r)
    vpn_before = dns["vpn"].queries

    # the stub on 127.0.0.53, UDP and TCP: answered by the VPN's resolver, seen as the stub's answer
    for proto in ("udp", "tcp"):
        r = ask(lab, cg, STUB, proto)
        assert r["ok"], (proto, r)
        assert r["answer"] == VPN_ANSWER and r["from"] == STUB, (proto, r)
    # a hard-coded resolver routed into the tunnel, UDP and TCP
    for proto in ("udp", "tcp"):
        r = ask(lab, cg, lab.net4_server, proto)
        assert r["ok"] and r["answer"] == VPN_ANSWER and r["from"] == lab.net4_server, (proto, r)
    assert dns["vpn"].queries == vpn_before + 4
    assert dns["vpn"].tcp_queries >= 3
    assert dns["upstream"].queries == 0 and dns["stub"].relayed == 0
    assert dns["other"].queries == 0

    # IPv6 DNS with an IPv4 resolver only: nothing to redirect to -- dropped at egress and counted
    dropped = packets(cg, "dns_not_vpn")
    r = ask(lab, cg, lab.net6_server, "udp", timeout=1.5)
    assert not r["ok"], r
    assert dns["other6"].queries == 0
    assert packets(cg, "dns_not_vpn") > dropped
    # ... while other IPv6 traffic through the tunnel still flows: the same server answers on another port
    with DnsServer(lab.server_path, lab.net6_server, OTHER6_ANSWER, port=5353) as other6b:
        r = query(lab.client_ns, cg, lab.net6_server, "udp", 3.0, port=5353)
        assert r["ok"] and r["answer"] == OTHER6_ANSWER, r
        assert other6b.queries == 1


def test_drop_only_without_redirection(lab, make_cgroup, dns):
    """A query that is not redirected (the redirect programs detached, as on a kernel without cgroup
    sock_addr programs) is dropped as dns_not_vpn: 0 arrive at the stub's upstream or the other resolver,
    the VPN's resolver still answers."""
    cg = make_cgroup()
    attach(lab, cg, "--dns", lab.tun4_server)
    fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert len(cgroups._detach_dns(fd)) == len(bpf.DNS_ENTRIES)   # one on every hook
    finally:
        os.close(fd)
    assert scope_status(cg)["dns"]["redirect"] is False
    dropped = packets(cg, "dns_not_vpn")
    for server in (STUB, lab.net4_server):
        r = ask(lab, cg, server, "udp", timeout=1.0)
        assert not r["ok"], (server, r)
    assert dns["upstream"].queries == 0 and dns["stub"].relayed == 0 and dns["other"].queries == 0
    assert packets(cg, "dns_not_vpn") >= dropped + 2
    r = ask(lab, cg, lab.tun4_server)
    assert r["ok"] and r["answer"] == VPN_ANSWER, r


def test_detach_removes_the_redirect_programs(lab, make_cgroup, dns):
    cg = make_cgroup()
    attach(lab, cg, "--dns", lab.tun4_server)
    assert scope_status(cg)["dns"]["redirect"] is True
    # re-attached without --dns: the redirect programs go, the stub leaks again (as the user asked)
    attach(lab, cg)
    assert not cgroups.dns_redirect_in_force(cg)
    r = ask(lab, cg, STUB)
    assert r["ok"] and r["answer"] == UPSTREAM_ANSWER, r
    ksbpf("detach", "--cgroup", cg, check=True)
    assert not cgroups.dns_redirect_in_force(cg)


def test_daemon_scope_with_dns(lab, make_cgroup, dns, run_daemon):
    """config dns = [...]: the daemon attaches the scope with the resolvers and the redirect programs."""
    cg = make_cgroup()
    d = run_daemon([{"cgroup": cg, "tunnels": [lab.wg_client], "netns": lab.client_ns,
                     "endpoints": [lab.endpoint4], "dns": [lab.tun4_server]}])
    assert d.named("scope_attached")
    assert scope_status(cg)["dns"] == {"resolvers": [lab.tun4_server], "redirect": True}
    r = ask(lab, cg, STUB)
    assert r["ok"] and r["answer"] == VPN_ANSWER and r["from"] == STUB, r
    assert dns["upstream"].queries == 0 and dns["stub"].relayed == 0
