"""Parsing and validating what the user types."""

import ipaddress

import pytest

from ksbpf.errors import KsbpfError
from ksbpf.policy import Endpoint, Options, Policy


@pytest.mark.parametrize("text,address,port,proto", [
    ("203.0.113.5:51820/udp", "203.0.113.5", 51820, "udp"),
    ("203.0.113.5:443/TCP", "203.0.113.5", 443, "tcp"),
    ("[2001:db8::5]:51820/udp", "2001:db8::5", 51820, "udp"),
    (" 198.51.100.1:1/udp ", "198.51.100.1", 1, "udp"),
    ("198.51.100.1:65535/tcp", "198.51.100.1", 65535, "tcp"),
])
def test_endpoint_parse(text, address, port, proto):
    ep = Endpoint.parse(text)
    assert (ep.address, ep.port, ep.proto) == (ipaddress.ip_address(address), port, proto)
    assert Endpoint.parse(str(ep)) == ep


@pytest.mark.parametrize("text,says", [
    ("203.0.113.5:0/udp", "not in 1-65535"),
    ("203.0.113.5:65536/udp", "not in 1-65535"),
    ("203.0.113.5:-1/udp", "not in 1-65535"),
    ("203.0.113.5:abc/udp", "not in 1-65535"),
    ("203.0.113.5/udp", "has no port"),
    ("203.0.113.5:/udp", "has no port"),
    ("203.0.113.5:51820", "has no protocol"),
    ("203.0.113.5:51820/icmp", "unknown protocol"),
    ("203.0.113.5:51820/", "unknown protocol"),
    ("vpn.example.com:51820/udp", "is not an IP address"),
    ("203.0.113.256:51820/udp", "is not an IP address"),
    ("2001:db8::5:51820/udp", "needs brackets"),
    ("[2001:db8::zz]:51820/udp", "is not an IP address"),
    ("0.0.0.0:51820/udp", "cannot be a VPN server"),
    ("[ff02::1]:51820/udp", "cannot be a VPN server"),
])
def test_endpoint_errors(text, says):
    with pytest.raises(KsbpfError) as err:
        Endpoint.parse(text)
    assert says in str(err.value)
    assert "\n" not in str(err.value)


def test_policy_requires_a_tunnel():
    with pytest.raises(KsbpfError, match="no tunnel"):
        Policy(())


@pytest.mark.parametrize("name", ["", "a" * 16, "wg/0", "wg 0", ".."])
def test_policy_rejects_bad_interface_names(name):
    with pytest.raises(KsbpfError, match="not a valid interface name"):
        Policy((name,))


def test_policy_rejects_duplicate_tunnels():
    with pytest.raises(KsbpfError, match="twice"):
        Policy(("wg0", "wg0"))


def test_lan_dns_needs_lan():
    with pytest.raises(KsbpfError, match="--allow-lan-dns"):
        Policy(("wg0",), options=Options(allow_lan_dns=True))


def test_policy_dedups_and_orders_endpoints():
    a, b = Endpoint.parse("[2001:db8::5]:1/udp"), Endpoint.parse("203.0.113.5:1/udp")
    p = Policy(("wg0",), (a, b, a))
    assert p.endpoints == (b, a)
    assert p.to_dict()["endpoints"] == ["203.0.113.5:1/udp", "[2001:db8::5]:1/udp"]


def test_at_most_eight_endpoints_per_address():
    eight = tuple(Endpoint.parse(f"203.0.113.5:{p}/udp") for p in range(1, 9))
    assert len(Policy(("wg0",), eight).endpoints) == 8
    with pytest.raises(KsbpfError, match="more than 8 endpoints on 203.0.113.5"):
        Policy(("wg0",), eight + (Endpoint.parse("203.0.113.5:9/tcp"),))


def test_allow_cidrs_is_a_compile_time_option_that_follows_the_policy():
    """The LPM tries are compiled in only when the policy has allowed CIDRs
    (-DKSBPF_OPT_CIDRS): a policy without them never pays for the lookups,
    whatever Options the caller passed; the scope's description is unchanged."""
    from ksbpf.kernel import bpf
    cidr = ipaddress.ip_network("10.96.0.0/12")
    with_cidrs = Policy(("wg0",), allow_cidrs=(cidr,))
    without = Policy(("wg0",), options=Options(allow_cidrs=True))
    assert with_cidrs.options.allow_cidrs and not without.options.allow_cidrs
    assert "-DKSBPF_OPT_CIDRS" in bpf.cflags(with_cidrs.options, 0)
    assert "-DKSBPF_OPT_CIDRS" not in bpf.cflags(without.options, 0)
    assert "allow_cidrs" not in with_cidrs.to_dict()["options"]
    assert Policy.from_dict(with_cidrs.to_dict()) == with_cidrs
    assert Policy.from_dict(without.to_dict()) == without


def test_model_tunnel_source():
    """ksbpf_nf_src: a tunnel's source address leaves only through that tunnel."""
    import struct as _struct

    from ksbpf.reasons import Reason
    from ksbpf.verify import model

    def v4(src: str, dst: str) -> bytes:
        return _struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20, 0, 0, 64, 6, 0,
                            ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)

    def v6(src: str, dst: str) -> bytes:
        return (_struct.pack("!IHBB", 6 << 28, 0, 6, 64) + ipaddress.ip_address(src).packed
                + ipaddress.ip_address(dst).packed)

    tun4, tun6 = ipaddress.ip_address("100.64.1.1").packed, ipaddress.ip_address("2001:db8:100::1").packed
    sources = {tun4: (7, "wg0"), tun6: (7, "wg0")}
    assert model.decide_tunnel_source(v4("100.64.1.1", "198.18.1.2"), 3, sources) == Reason.DROP_TUNNEL_SOURCE
    assert model.decide_tunnel_source(v6("2001:db8:100::1", "2001:db8::2"), 3, sources) == Reason.DROP_TUNNEL_SOURCE
    assert model.decide_tunnel_source(v4("100.64.1.1", "198.18.1.2"), 7, sources) is None      # through the tunnel
    assert model.decide_tunnel_source(v4("100.64.1.1", "100.64.1.1"), 1, sources) is None      # loopback
    assert model.decide_tunnel_source(v4("198.18.1.1", "198.18.1.2"), 3, sources) is None      # another source
    assert model.decide_tunnel_source(v4("100.64.1.1", "198.18.1.2"), 3, sources, "eth0") == Reason.DROP_TUNNEL_SOURCE
    gone = {tun4: (0, "wg0")}
    assert model.decide_tunnel_source(v4("100.64.1.1", "198.18.1.2"), 7, gone, "eth0") == Reason.DROP_TUNNEL_SOURCE
    # out through another registered tunnel of the namespace: the hot path lets it go
    assert model.decide_tunnel_source(v4("100.64.1.1", "198.18.1.2"), 3, sources, "wg1", frozenset({3})) is None
    # the tunnel re-created by its name (a new ifindex) before the daemon followed it
    assert model.decide_tunnel_source(v4("100.64.1.1", "198.18.1.2"), 9, gone, "wg0") is None
    assert not Reason.DROP_TUNNEL_SOURCE.allowed and Reason.DROP_TUNNEL_SOURCE.label == "tunnel_source"
