"""The packets `ksbpf verify` runs through a scope's attached program: every
kind of traffic the policy has a rule for, built for this scope's endpoints.

Nothing here is sent: these bytes only go through BPF_PROG_TEST_RUN.
"""

from __future__ import annotations

import ipaddress

from ksbpf.policy import AnyEndpoint, Endpoint
from ksbpf.verify.packets import (
    DSTOPTS,
    ETH_8021Q,
    ETH_ARP,
    FRAGMENT,
    HOPOPTS,
    ICMP,
    ICMPV6,
    ROUTING,
    TCP,
    UDP,
    eth,
    frame,
    ipv4,
    ipv6,
    vlan_frame,
)

PUBLIC4, PUBLIC6 = "93.184.216.34", "2606:2800:220:1::1"
LAN4, LAN6 = "192.168.1.1", "fd00::53"
OTHER = {"udp": TCP, "tcp": UDP}


def packets(endpoints: tuple[Endpoint, ...], any_endpoints: tuple[AnyEndpoint, ...] = (),
            resolvers: tuple = ()) -> list[tuple[str, bytes]]:
    """(label, IP packet) of every crafted case for a scope with these endpoints
    (and wildcard endpoints: any address on a port and protocol; and these
    --dns resolvers)."""
    out: list[tuple[str, bytes]] = []

    def add(label: str, pkt: bytes) -> None:
        out.append((label, pkt))

    # --dns: to the VPN's resolvers (allowed through the tunnel only), to a loopback stub and to another
    # resolver (dropped wherever they go)
    for r in resolvers:
        build = ipv4 if r.version == 4 else ipv6
        for proto, name, port in ((UDP, "udp", 53), (TCP, "tcp", 53), (TCP, "tls", 853)):
            add(f"dns/{name} to the VPN's resolver {r}", build(str(r), proto, dport=port))
    if resolvers:
        add("dns/udp to the stub resolver 127.0.0.53", ipv4("127.0.0.53", UDP, dport=53))
        add("dns/tcp to the stub resolver 127.0.0.53", ipv4("127.0.0.53", TCP, dport=53))
        add("dns/udp to 8.8.8.8", ipv4("8.8.8.8", UDP, dport=53))
        add("dns/udp to ::1", ipv6("::1", UDP, dport=53))

    for v, build, dst in ((4, ipv4, PUBLIC4), (6, ipv6, PUBLIC6)):
        add(f"tcp/ipv{v} to a public address", build(dst, TCP, dport=443))
        add(f"udp/ipv{v} to a public address", build(dst, UDP, dport=443))
        add(f"icmp/ipv{v} to a public address", build(dst, ICMP if v == 4 else ICMPV6))
        add(f"dns/udp/ipv{v} to a public resolver", build(dst, UDP, dport=53))
    for ep in endpoints:
        build = ipv4 if ep.address.version == 4 else ipv6
        a = str(ep.address)
        add(f"endpoint {ep}", build(a, ep.proto_number, dport=ep.port))
        add(f"endpoint {a} on port {ep.port % 65535 + 1}/{ep.proto}", build(a, ep.proto_number, dport=ep.port % 65535 + 1))
        add(f"endpoint {a} port {ep.port} over {'tcp' if ep.proto == 'udp' else 'udp'}",
            build(a, OTHER[ep.proto], dport=ep.port))
        add(f"icmp to endpoint {a}", build(a, ICMP if ep.address.version == 4 else ICMPV6))
        if ep.address.version == 4:
            mapped = str(ipaddress.IPv6Address(f"::ffff:{a}"))
            add(f"IPv4-mapped IPv6 {mapped} to endpoint {ep}", ipv6(mapped, ep.proto_number, dport=ep.port))
        if ep.address.version == 6:
            add(f"endpoint {ep} behind hop-by-hop, routing and destination options",
                ipv6(a, ep.proto_number, dport=ep.port, ext=(HOPOPTS, ROUTING, DSTOPTS)))
            add(f"endpoint {ep} as a first fragment", ipv6(a, ep.proto_number, dport=ep.port, ext=(FRAGMENT,)))
        add(f"non-first fragment to endpoint {a}", build(a, ep.proto_number, dport=ep.port, frag_offset=1480)
            if ep.address.version == 4 else ipv6(a, ep.proto_number, dport=ep.port, ext=(FRAGMENT,), frag_offset=1448))
    for ep in any_endpoints:
        for v, build, dst in ((4, ipv4, PUBLIC4), (6, ipv6, PUBLIC6)):
            add(f"wildcard endpoint {ep}: ipv{v} {dst}", build(dst, ep.proto_number, dport=ep.port))
            add(f"wildcard endpoint {ep}: ipv{v} {dst} on port {ep.port % 65535 + 1}",
                build(dst, ep.proto_number, dport=ep.port % 65535 + 1))
            add(f"wildcard endpoint {ep}: ipv{v} {dst} over {'tcp' if ep.proto == 'udp' else 'udp'}",
                build(dst, OTHER[ep.proto], dport=ep.port))
    for proto, name in ((UDP, "udp"), (TCP, "tcp")):
        add(f"dns/{name} to LAN {LAN4}", ipv4(LAN4, proto, dport=53))
        add(f"dns/{name} to LAN {LAN6}", ipv6(LAN6, proto, dport=53))
    add(f"dns-over-tls to LAN {LAN4}", ipv4(LAN4, TCP, dport=853))
    add("LAN tcp to 10.1.2.3:22", ipv4("10.1.2.3", TCP, dport=22))
    add("LAN udp to 172.16.0.1", ipv4("172.16.0.1", UDP, dport=5000))
    add("LAN mDNS to 224.0.0.251", ipv4("224.0.0.251", UDP, sport=5353, dport=5353))
    add("LAN link-local fe80::1", ipv6("fe80::1", TCP, dport=22))
    add("LAN multicast ff02::fb", ipv6("ff02::fb", UDP, sport=5353, dport=5353))
    add("not LAN: 172.32.0.1 (just outside 172.16/12)", ipv4("172.32.0.1", TCP, dport=22))
    add("not LAN: 100.64.0.1 (CGNAT)", ipv4("100.64.0.1", TCP, dport=22))
    add("DHCPv4 discover", ipv4("255.255.255.255", UDP, sport=68, dport=67, src="0.0.0.0"))
    add("DHCPv4 renewal to a LAN server", ipv4("192.168.1.1", UDP, sport=68, dport=67))
    add("DHCPv6 solicit", ipv6("ff02::1:2", UDP, sport=546, dport=547, src="fe80::2"))
    # DHCP that carries data: to a routed server, or bigger than a DHCP message (dropped)
    add(f"DHCPv4 client port to a routed address {PUBLIC4}", ipv4(PUBLIC4, UDP, sport=68, dport=67))
    add("DHCPv4 broadcast carrying 1,400 bytes", ipv4("255.255.255.255", UDP, sport=68, dport=67, src="0.0.0.0",
                                                      payload=b"d" * 1400))
    add(f"DHCPv6 client port to a routed address {PUBLIC6}", ipv6(PUBLIC6, UDP, sport=546, dport=547))
    add("DHCPv6 solicit carrying 1,400 bytes", ipv6("ff02::1:2", UDP, sport=546, dport=547, src="fe80::2",
                                                    payload=b"d" * 1400))
    add("non-first IPv4 fragment to a public address", ipv4(PUBLIC4, UDP, frag_offset=8))
    add("non-first IPv6 fragment to a public address", ipv6(PUBLIC6, UDP, ext=(FRAGMENT,), frag_offset=8))
    add("IPv6 extension-header chain to a public address", ipv6(PUBLIC6, UDP, dport=53, ext=(HOPOPTS, ROUTING, DSTOPTS)))
    add("IPv6 chain longer than the program follows", ipv6(PUBLIC6, UDP, dport=53, ext=(HOPOPTS,) + (DSTOPTS,) * 6))
    ihl = bytearray(ipv4(PUBLIC4, UDP, dport=53))
    ihl[0] = 0x4F
    add("truncated: IPv4 header length past the end", bytes(ihl))
    ext = bytearray(ipv6(PUBLIC6, UDP, dport=53, ext=(DSTOPTS,)))
    ext[41] = 200
    add("truncated: IPv6 extension header past the end", bytes(ext))
    add("truncated: TCP ports cut off", ipv4(PUBLIC4, TCP, dport=443)[:22])
    bad = bytearray(ipv4(PUBLIC4, TCP, dport=443))
    bad[0] = 0x44
    add("malformed: IPv4 header length 4", bytes(bad))
    return out



def tc_frames(endpoints: tuple[Endpoint, ...], ethernet: bool,
              any_endpoints: tuple[AnyEndpoint, ...] = (), resolvers: tuple = ()) -> list[tuple[str, bytes]]:
    """What a node scope's tc program gets: the same packets, as Ethernet
    frames (with ARP, neighbour discovery and an 802.1Q-tagged frame), or bare
    on a device without a link-layer header.  With --dns resolvers, the DNS
    cases too (to the resolvers, to 8.8.8.8 and over TCP to another resolver:
    `verify` runs them through the tunnel as well)."""
    out = [(label, frame(p) if ethernet else p) for label, p in packets(endpoints, any_endpoints, resolvers)]
    if resolvers:
        out.append(("dns/tcp to 8.8.8.8", frame(ipv4("8.8.8.8", TCP, dport=53)) if ethernet
                    else ipv4("8.8.8.8", TCP, dport=53)))
    big = b"n" * 1200
    nd = [("IPv6 neighbour solicitation", ipv6("ff02::1:ff00:1", ICMPV6, hop_limit=255, icmp_type=135)),
          ("IPv6 router solicitation", ipv6("ff02::2", ICMPV6, hop_limit=255, icmp_type=133)),
          ("IPv6 neighbour advertisement to fe80::1", ipv6("fe80::1", ICMPV6, hop_limit=255, icmp_type=136)),
          ("IPv6 router advertisement (not let through)", ipv6("ff02::1", ICMPV6, hop_limit=255, icmp_type=134)),
          # neighbour discovery that carries data: beyond the link, or bigger than ND (dropped)
          *((f"ICMPv6 type {t} with hop limit 255 to a routed address {PUBLIC6}",
             ipv6(PUBLIC6, ICMPV6, hop_limit=255, icmp_type=t, payload=big)) for t in (133, 135, 136)),
          ("IPv6 neighbour solicitation carrying 1.2 KB", ipv6("ff02::1:ff00:1", ICMPV6, hop_limit=255, icmp_type=135,
                                                               payload=big)),
          (f"IPv4 protocol 58 to {PUBLIC4} (no ICMPv6)", ipv4(PUBLIC4, ICMPV6))]
    out += [(label, frame(p) if ethernet else p) for label, p in nd]
    if ethernet:
        arp = b"\x00\x01\x08\x00\x06\x04\x00\x01" + bytes.fromhex("020000000001c0000201") + bytes(6) + bytes.fromhex("c0000202")
        carried = ipv4(PUBLIC4, UDP, dport=443)
        out.append(("ARP request", eth(ETH_ARP, b"\x00\x01\x08\x00\x06\x04\x00\x01" + bytes(20))))
        out.append(("ARP reply padded to 60 bytes", eth(ETH_ARP, arp[:7] + b"\x02" + arp[8:] + bytes(18))))
        # the ARP ethertype around something that is not an ARP message (dropped)
        out.append(("an IPv4 packet under the ARP ethertype", eth(ETH_ARP, carried)))
        out.append(("an IPv4 packet under an 802.1Q tag and the ARP ethertype",
                    eth(ETH_8021Q, b"\x00\x0a\x08\x06" + carried)))
        out.append(("ARP request with data in its padding", eth(ETH_ARP, arp + b"data" + bytes(14))))
        out.append((f"802.1Q-tagged udp to {PUBLIC4}", vlan_frame(ipv4(PUBLIC4, UDP, dport=443))))
        out.append(("LLDP (not IP)", eth(0x88CC, b"\x02\x07\x04" + bytes(40))))
    return out
