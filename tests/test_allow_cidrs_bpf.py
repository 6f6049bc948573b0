"""allow_cidrs in the kernel (the Kubernetes annotation ksbpf.io/allow-cidrs):
crafted packets through BPF_PROG_TEST_RUN on the real program.  A destination
inside an allowed range passes outside the tunnel (DNS included) and is
counted as `lan`; one prefix bit outside it is dropped as `not_tunnel`; an
endpoint's address keeps its own rule."""

from __future__ import annotations

import ipaddress
import subprocess
import uuid

import pytest
from packets import UDP, frame, ipv4, ipv6

from ksbpf.errors import KsbpfError
from ksbpf.kernel import bpf, libbpf, netns
from ksbpf.policy import Endpoint, Options, Policy, parse_cidr
from ksbpf.reasons import Reason

CIDRS = [parse_cidr(n) for n in ("10.96.0.0/12", "10.244.0.0/16", "fd00:10:96::/112")]


@pytest.fixture(scope="module")
def prog(tmp_path_factory):
    name = f"ksbpf-ct{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "phy", "type", "veth", "peer", "name", "phz"], check=True)
        ns = netns.resolve(name)
        cache = str(tmp_path_factory.mktemp("cache"))
        # as a Policy with allow_cidrs compiles it (-DKSBPF_OPT_CIDRS); and without the option, the same maps
        p = bpf.load(Policy(("wg0",), allow_cidrs=tuple(CIDRS)).options, 1, cache=cache)
        off = bpf.load(Options(), 1, cache=cache)
        for prog_ in (p, off):
            for net in CIDRS:
                prog_.maps.add_cidr(net)
            prog_.maps.add_endpoint(Endpoint.parse("10.96.0.99:51820/udp"))
        p.off = off
        yield p, ns, netns.ifindex(ns, "phy")
        p.close()
        off.close()
    finally:
        subprocess.run(["ip", "netns", "del", name])


def reason_of(prog, packet) -> tuple[int, Reason]:
    p, ns, ifindex = prog
    before = p.maps.counters()
    run = netns.run_in(ns.path, libbpf.prog_test_run, p.prog_fd, packet, ifindex)
    after = p.maps.counters()
    (moved,) = [r for (r, f) in after if after[(r, f)] != before[(r, f)]]
    return run.retval, moved


@pytest.mark.root
@pytest.mark.parametrize("dst,port,allowed", [
    ("10.96.0.10", 53, True),              # cluster DNS (service range), DNS included
    ("10.111.255.255", 443, True),         # last address of 10.96.0.0/12
    ("10.112.0.0", 443, False),            # first address after it
    ("10.244.3.7", 8080, True),            # pod range
    ("10.245.0.1", 8080, False),
    ("192.168.1.1", 53, False),            # the LAN is not allowed by a CIDR elsewhere
    ("fd00:10:96::a", 53, True),
    ("fd00:10:96::1:0", 53, False),
])
def test_allowed_cidrs_pass_outside_the_tunnel(prog, dst, port, allowed):
    ip = ipv6 if ":" in dst else ipv4
    verdict, reason = reason_of(prog, frame(ip(dst, UDP, dport=port)))
    assert (verdict, reason) == ((1, Reason.ALLOW_LAN) if allowed else (0, Reason.DROP_NOT_TUNNEL))


@pytest.mark.root
def test_without_the_compile_time_option_the_tries_are_not_looked_up(prog):
    """A program compiled without allow_cidrs never consults the tries (the drop
    path pays nothing for them), whatever they hold."""
    p, ns, ifindex = prog
    assert reason_of((p.off, ns, ifindex), frame(ipv4("10.96.0.10", UDP, dport=53))) == (0, Reason.DROP_NOT_TUNNEL)
    assert reason_of((p.off, ns, ifindex), frame(ipv4("10.96.0.99", UDP, dport=51820))) == (1, Reason.ALLOW_ENDPOINT)


@pytest.mark.root
def test_an_endpoint_inside_an_allowed_range_keeps_its_rule(prog):
    assert reason_of(prog, frame(ipv4("10.96.0.99", UDP, dport=51820))) == (1, Reason.ALLOW_ENDPOINT)
    assert reason_of(prog, frame(ipv4("10.96.0.99", UDP, dport=53))) == (0, Reason.DROP_ENDPOINT_MISMATCH)


def test_policy_round_trip_and_refusals():
    p = Policy(("wg0",), allow_cidrs=tuple(CIDRS))
    assert Policy.from_dict(p.to_dict()) == p
    assert "allow_cidrs" not in Policy(("wg0",)).to_dict()   # scopes without it read back unchanged
    with pytest.raises(KsbpfError, match="every address"):
        Policy(("wg0",), allow_cidrs=(ipaddress.ip_network("0.0.0.0/0"),))
    with pytest.raises(KsbpfError, match="host bits"):
        parse_cidr("10.96.0.1/12")
