"""The policy model: what ksbpf's program must decide for a packet, computed
in Python, independently of ebpf/ksbpf.c.

`ksbpf verify` trusts this model as the judge of the programs attached in
the kernel, and `make fuzz` proves that the two agree on millions of random
and mutated packets (ksbpf/verify/fuzz.py).  It follows the README's rule
table, and the program's parsing limits where they decide the outcome: at
most six IPv6 extension headers are followed (a longer chain is malformed),
a header that runs past the end of the packet is malformed, a non-first
fragment has no ports.

Inputs: the bytes as the hook sees them, the egress interface and the scope
(its options, its endpoints, which interfaces are its registered tunnels,
which IPv6 destinations the main routing table puts directly on the link of
an interface, and whether the packet comes from a socket of the node's own
namespace).
Output: the Reason (and the counter family).  Nothing here touches the kernel.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Callable

from ksbpf.policy import LAN_RANGES, AnyEndpoint, Endpoint, Options
from ksbpf.reasons import Family, Reason

# The hooks, by the name of their entry point in ebpf/ksbpf.c.
CGROUP, TC_ETH, TC_L3 = "ksbpf_cg_egress", "ksbpf_tc_eth", "ksbpf_tc_l3"
HOOKS = (CGROUP, TC_ETH, TC_L3)

ETH_P_IP, ETH_P_IPV6, ETH_P_ARP = 0x0800, 0x86DD, 0x0806
ETH_P_8021Q, ETH_P_8021AD = 0x8100, 0x88A8
ETH_P_802_3, ETH_P_802_2 = 0x0001, 0x0004
ETH_HLEN, VLAN_HLEN = 14, 4
TCP, UDP, ICMPV6 = 6, 17, 58
HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS = 0, 43, 44, 51, 60
EXT_HEADERS = frozenset((HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS))
MAX_EXT_HEADERS = 6          # the program follows at most this many, then fails closed
DNS_PORTS = (53, 853)
ND_TYPES = (133, 135, 136)   # router solicitation, neighbour solicitation, advertisement
LOOPBACK_IFINDEX = 1
ND_MAX = 104                 # KSBPF_ND_MAX: an ND packet, from its IPv6 header
DHCP_MAX = 576               # KSBPF_DHCP_MAX: a DHCP packet, from its IP header
ARP_LEN, ARP_MAX = 28, 46    # KSBPF_ARP_LEN, KSBPF_ARP_MAX: an ARP message, padded with zeros at most to 46
ARP_HEAD = (b"\x00\x01\x08\x00\x06\x04\x00\x01", b"\x00\x01\x08\x00\x06\x04\x00\x02")   # Ethernet/IPv4 request, reply
_LINK_LOCAL6 = ipaddress.ip_network("fe80::/10")
_LINK_MCAST6 = ipaddress.ip_network("ff02::/16")
DHCP6_SERVERS = ipaddress.IPv6Address("ff02::1:2").packed
_DHCP4_SERVERS = tuple(ipaddress.ip_network(n) for n in ("255.255.255.255/32", "10.0.0.0/8", "172.16.0.0/12",
                                                        "192.168.0.0/16", "169.254.0.0/16"))

_LAN4 = tuple(n for n in LAN_RANGES if n.version == 4)
_LAN6 = tuple(n for n in LAN_RANGES if n.version == 6)


@dataclass(frozen=True)
class Scope:
    """What the model knows of a scope: its options, its endpoints (address ->
    allowed (port, protocol) pairs), the ifindexes, in the namespace the
    packet leaves from, of its tunnels, and (node mode) whether the packet's
    socket belongs to an exempted cgroup subtree."""

    options: Options = field(default_factory=Options)
    endpoints: tuple[Endpoint, ...] = ()
    tunnels: frozenset[int] = frozenset()
    exempt: bool = False
    # tc: is this IPv6 destination (16 bytes) a neighbour directly connected
    # through interface ifindex (the main table's route to it has no gateway
    # and leaves through it, and the interface forwards IPv6)?  None: never.
    on_link: Callable[[int, bytes], bool] | None = None
    # tc: the packet comes from a socket of the node's own namespace (a test
    # run's always does); False: forwarded
    own_socket: bool = True
    # --vpn-mark / --vpn-cgroup (options.vpn_mark, options.vpn_cgroup): is the
    # packet the VPN client's (its mark, or its socket's cgroup)?  Only then may
    # it reach an endpoint -- a fixed one or any address on a port and protocol
    # of any_endpoints.
    vpn_client: bool = False
    any_endpoints: tuple[AnyEndpoint, ...] = ()
    # --dns (options.dns): the VPN's resolvers, packed (4 bytes IPv4, 16 IPv6)
    resolvers: frozenset[bytes] = frozenset()

    def __post_init__(self) -> None:
        table: dict[bytes, list[tuple[int, int]]] = {}
        for ep in self.endpoints:
            table.setdefault(ep.address.packed, []).append((ep.port, ep.proto_number))
        object.__setattr__(self, "_endpoints", {k: frozenset(v) for k, v in table.items()})

    def endpoint_ports(self, address: bytes) -> frozenset[tuple[int, int]] | None:
        return self._endpoints.get(address)  # type: ignore[attr-defined]

    @property
    def vpn_only(self) -> bool:
        """Does the endpoint exception belong to the VPN client alone?"""
        return self.options.vpn_mark or self.options.vpn_cgroup

    def endpoint_reason(self) -> Reason:
        """A packet to an endpoint (address, port and protocol): the VPN client's, or not."""
        return Reason.ALLOW_ENDPOINT if not self.vpn_only or self.vpn_client else Reason.DROP_ENDPOINT_NOT_VPN


@dataclass(frozen=True)
class Decision:
    reason: Reason
    family: Family

    @property
    def allowed(self) -> bool:
        return self.reason.allowed


class _Truncated(Exception):
    """A header runs past the end of the packet."""


@dataclass
class _Packet:
    v6: bool
    daddr: bytes
    l4proto: int = 0
    fragment: bool = False
    ports: tuple[int, int] | None = None   # (sport, dport) of TCP/UDP
    icmp_type: int | None = None            # tc: the ICMPv6 type
    hop_limit: int = 0
    src64: bytes = b""                      # IPv6: the source's first 64 bits


def _take(data: bytes, off: int, n: int) -> bytes:
    if off + n > len(data):
        raise _Truncated()
    return data[off:off + n]


def _ports(data: bytes, off: int, p: _Packet, tc: bool) -> None:
    if p.fragment:
        return
    if tc and p.v6 and p.l4proto == ICMPV6:   # the program reads the ICMPv6 type at tc, of IPv6 only
        p.icmp_type = _take(data, off, 1)[0]
        return
    if p.l4proto in (TCP, UDP):
        p.ports = struct.unpack("!HH", _take(data, off, 4))


def _parse4(data: bytes, tc: bool) -> _Packet:
    hdr = _take(data, 0, 20)
    if hdr[0] >> 4 != 4 or hdr[0] & 0xF < 5:
        raise _Truncated()
    frag = struct.unpack_from("!H", hdr, 6)[0]
    p = _Packet(False, hdr[16:20], hdr[9], (frag & 0x1FFF) != 0)
    _ports(data, (hdr[0] & 0xF) * 4, p, tc)
    return p


def _parse6(data: bytes, tc: bool) -> _Packet:
    hdr = _take(data, 0, 40)
    if hdr[0] >> 4 != 6:
        raise _Truncated()
    p = _Packet(True, hdr[24:40], hop_limit=hdr[7], src64=hdr[8:16])
    nexthdr, off = hdr[6], 40
    for _ in range(MAX_EXT_HEADERS):
        if nexthdr not in EXT_HEADERS:
            break
        ext = _take(data, off, 2)
        if nexthdr == FRAGMENT:
            if struct.unpack("!H", _take(data, off + 2, 2))[0] & 0xFFF8:
                p.fragment = True
            off += 8
        elif nexthdr == AH:
            off += (ext[1] + 2) * 4
        else:
            off += (ext[1] + 1) * 8
        nexthdr = ext[0]
    if nexthdr in EXT_HEADERS:
        raise _Truncated()   # a longer chain than the program follows: fail closed
    p.l4proto = nexthdr
    _ports(data, off, p, tc)
    return p


def _lan(daddr: bytes, v6: bool) -> bool:
    addr = ipaddress.ip_address(daddr)
    return any(addr in n for n in (_LAN6 if v6 else _LAN4))


def _dhcp(p: _Packet, length: int, scope: Scope, tc: bool) -> bool:
    """The machine's own DHCP client to the link's servers, no bigger than a
    DHCP message."""
    if p.ports is None or p.l4proto != UDP or length > DHCP_MAX:
        return False
    if p.v6:
        if p.ports != (546, 547) or not (p.daddr == DHCP6_SERVERS or ipaddress.IPv6Address(p.daddr) in _LINK_LOCAL6):
            return False
    elif p.ports != (68, 67) or not any(ipaddress.IPv4Address(p.daddr) in n for n in _DHCP4_SERVERS):
        return False
    return scope.own_socket or not tc


def _nd(p: _Packet, length: int, ifindex: int, scope: Scope) -> bool:
    """tc: neighbour discovery toward the link itself, no bigger than ND needs."""
    if not (p.v6 and p.l4proto == ICMPV6 and not p.fragment and p.hop_limit == 255 and p.icmp_type in ND_TYPES):
        return False
    if length > ND_MAX:
        return False
    a = ipaddress.IPv6Address(p.daddr)
    if a in _LINK_LOCAL6 or a in _LINK_MCAST6:
        return True
    # a global neighbour shares the /64 of the address ND is sent from; then the FIB decides
    return p.daddr[:8] == p.src64 and scope.on_link is not None and scope.on_link(ifindex, p.daddr)


def _arp(data: bytes) -> bool:
    """tc: an Ethernet/IPv4 ARP request or reply, 28 bytes or zero-padded to 46."""
    return ARP_LEN <= len(data) <= ARP_MAX and data[:8] in ARP_HEAD and not any(data[ARP_LEN:])


def _exceptions(p: _Packet, scope: Scope, length: int = 0, tc: bool = False) -> Reason:
    """Endpoint, LAN, wildcard endpoint, DHCP -- in that order -- for a packet
    that does not leave through a tunnel."""
    if p.fragment:
        return Reason.DROP_FRAGMENT
    allowed = scope.endpoint_ports(p.daddr)
    if allowed is not None:
        if p.ports is not None and (p.ports[1], p.l4proto) in allowed:
            return scope.endpoint_reason()
        return Reason.DROP_ENDPOINT_MISMATCH
    opts = scope.options
    if opts.dns and _dns(p):   # --dns: DNS outside the tunnel goes nowhere (every hook; a LAN resolver too)
        return Reason.DROP_DNS_NOT_VPN
    if opts.allow_lan and _lan(p.daddr, p.v6):
        if not opts.allow_lan_dns and p.ports is not None and p.ports[1] in DNS_PORTS:
            return Reason.DROP_LAN_DNS
        return Reason.ALLOW_LAN
    if scope.vpn_only and p.ports is not None and \
            any(e.port == p.ports[1] and e.proto_number == p.l4proto for e in scope.any_endpoints):
        return scope.endpoint_reason()
    if opts.allow_dhcp and _dhcp(p, length, scope, tc):
        return Reason.ALLOW_DHCP
    return Reason.DROP_NOT_TUNNEL


def _dns(p: _Packet) -> bool:
    """TCP or UDP to port 53 or 853 (ports read: not a fragment)."""
    return p.ports is not None and p.ports[1] in DNS_PORTS


def _decide_dns(data: bytes, family: Family, ifindex: int, scope: Scope) -> Decision:
    """The cgroup hook with --dns: parsed before the loopback and tunnel
    rules; DNS to anything but the VPN's resolvers is dropped wherever it goes,
    DNS outside the tunnel too (the endpoint rule excepted).  A packet that
    does not parse keeps the rules it had."""
    p = None
    if family != Family.OTHER:
        try:
            p = _parse6(data, False) if family == Family.IPV6 else _parse4(data, False)
        except _Truncated:
            p = None
    if ifindex == LOOPBACK_IFINDEX or ifindex in scope.tunnels:
        if p is not None and _dns(p) and p.daddr not in scope.resolvers:
            return Decision(Reason.DROP_DNS_NOT_VPN, family)
        return Decision(Reason.ALLOW_LOOPBACK if ifindex == LOOPBACK_IFINDEX else Reason.ALLOW_TUNNEL, family)
    if family == Family.OTHER:
        return Decision(Reason.DROP_NOT_IP, family)
    if p is None:
        return Decision(Reason.DROP_MALFORMED, family)
    return Decision(_exceptions(p, scope, len(data), False), family)


def _tunnel_dns(data: bytes, family: Family, scope: Scope) -> Reason:
    """Node mode (tc, netfilter) with --dns, a packet out through a tunnel:
    DNS to anything but the VPN's resolvers is dropped; whatever does not
    parse goes through as without --dns.  (Loopback is not parsed: a local
    stub's upstream queries are judged when they leave.)"""
    if family == Family.OTHER:
        return Reason.ALLOW_TUNNEL
    try:
        p = _parse6(data, True) if family == Family.IPV6 else _parse4(data, True)
    except _Truncated:
        return Reason.ALLOW_TUNNEL
    if _dns(p) and p.daddr not in scope.resolvers:
        return Reason.DROP_DNS_NOT_VPN
    return Reason.ALLOW_TUNNEL


def _family(proto: int) -> Family:
    return {ETH_P_IP: Family.IPV4, ETH_P_IPV6: Family.IPV6}.get(proto, Family.OTHER)


def decide_l3(data: bytes, proto: int, ifindex: int, scope: Scope, tc: bool) -> Decision:
    """The policy for `data` starting at the network header; `proto` is the
    packet's ethertype (the cgroup hook: skb->protocol; tc: read from the frame).
    At tc, a drop of a packet from an exempted cgroup's socket is let through."""
    d = _decide_l3(data, proto, ifindex, scope, tc)
    if tc and scope.exempt and not d.allowed:
        return Decision(Reason.ALLOW_EXEMPT, d.family)
    return d


def _decide_l3(data: bytes, proto: int, ifindex: int, scope: Scope, tc: bool) -> Decision:
    family = _family(proto)
    if scope.options.dns and not tc:
        return _decide_dns(data, family, ifindex, scope)
    if ifindex == LOOPBACK_IFINDEX:
        return Decision(Reason.ALLOW_LOOPBACK, family)
    if ifindex in scope.tunnels:
        if scope.options.dns:
            return Decision(_tunnel_dns(data, family, scope), family)
        return Decision(Reason.ALLOW_TUNNEL, family)
    if family == Family.OTHER:
        return Decision(Reason.ALLOW_NEIGH if tc and proto == ETH_P_ARP and _arp(data) else Reason.DROP_NOT_IP, family)
    try:
        p = _parse6(data, tc) if family == Family.IPV6 else _parse4(data, tc)
    except _Truncated:
        return Decision(Reason.DROP_MALFORMED, family)
    if tc and _nd(p, len(data), ifindex, scope):
        return Decision(Reason.ALLOW_NEIGH, family)
    return Decision(_exceptions(p, scope, len(data), tc), family)


# The netfilter hook of a cgroup scope's tunnel namespace (ebpf/ksbpf.c ksbpf_nf_src).
NF_SRC = "ksbpf_nf_src"


def decide_tunnel_source(data: bytes, ifindex: int, sources: dict[bytes, tuple[int, str]],
                         name: str = "", tunnels: frozenset[int] = frozenset()) -> Reason | None:
    """What ksbpf_nf_src decides for the IP packet `data` leaving through
    the interface (ifindex, name): DROP_TUNNEL_SOURCE when its source address
    is one of the scope's tunnel addresses (sources: packed address -> that
    tunnel's (ifindex, 0 when it is gone; name)) and it does not leave through
    that tunnel -- its ifindex, or its name (re-created) -- nor through
    loopback nor through any registered tunnel of the namespace (`tunnels`);
    None when it is not this hook's business (accepted, uncounted)."""
    if ifindex == LOOPBACK_IFINDEX or ifindex in tunnels or not data:
        return None
    v = data[0] >> 4
    if v == 4 and len(data) >= 20:
        src = data[12:16]
    elif v == 6 and len(data) >= 40:
        src = data[8:24]
    else:
        return None
    tunnel = sources.get(src)
    if tunnel is None or (tunnel[0] and tunnel[0] == ifindex) or (tunnel[1] and tunnel[1] == name):
        return None
    return Reason.DROP_TUNNEL_SOURCE


def eth_type_trans(frame: bytes) -> int:
    """skb->protocol as the kernel sets it for a received Ethernet frame (what a
    cgroup_skb test run sees)."""
    proto = struct.unpack_from("!H", frame, 12)[0]
    if proto >= 0x0600:
        return proto
    return ETH_P_802_3 if frame[14:16] == b"\xff\xff" else ETH_P_802_2


def decide(hook: str, data: bytes, ifindex: int, scope: Scope, protocol: int | None = None) -> Decision:
    """The decision of entry point `hook` on `data` as that hook sees it:
    CGROUP: the IP packet (protocol: skb->protocol, by default from the IP version);
    TC_ETH: the Ethernet frame (one 802.1Q/802.1ad tag looked through);
    TC_L3: the bare IP packet of a device without a link-layer header."""
    if hook == CGROUP:
        if protocol is None:
            v = data[0] >> 4 if data else 0
            protocol = ETH_P_IP if v == 4 else ETH_P_IPV6 if v == 6 else 0
        return decide_l3(data, protocol, ifindex, scope, tc=False)
    if hook == TC_ETH:
        proto, nh = struct.unpack_from("!H", data, 12)[0] if len(data) >= ETH_HLEN else 0, ETH_HLEN
        if proto in (ETH_P_8021Q, ETH_P_8021AD):
            inner = data[ETH_HLEN + 2:ETH_HLEN + 4]
            proto, nh = (struct.unpack("!H", inner)[0] if len(inner) == 2 else 0), ETH_HLEN + VLAN_HLEN
        return decide_l3(data[nh:], proto, ifindex, scope, tc=True)
    if hook == TC_L3:
        v = data[0] >> 4 if data else 0
        proto = ETH_P_IP if v == 4 else ETH_P_IPV6 if v == 6 else 0
        return decide_l3(data, proto, ifindex, scope, tc=True)
    raise ValueError(f"unknown hook {hook!r}")


def decide_test_run(hook: str, buffer: bytes, ifindex: int, scope: Scope) -> Decision:
    """The decision for `buffer` handed to BPF_PROG_TEST_RUN of `hook`: the
    cgroup hook gets what follows the Ethernet header, with skb->protocol from
    it; tc gets the buffer as it is."""
    if hook == CGROUP:
        return decide_l3(buffer[ETH_HLEN:], eth_type_trans(buffer), ifindex, scope, tc=False)
    return decide(hook, buffer, ifindex, scope)


def skb_len(hook: str, buffer: bytes) -> int:
    """skb->len of a test run (what the byte counters add)."""
    return len(buffer) - ETH_HLEN if hook == CGROUP else len(buffer)
