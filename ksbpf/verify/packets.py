"""Crafted frames for BPF_PROG_TEST_RUN: Ethernet + IPv4/IPv6 + TCP/UDP/ICMP.

Shared by `ksbpf verify` (the zero-traffic check), the differential fuzzer
and the tests.  Every builder returns bytes; nothing here sends anything.
"""

from __future__ import annotations

import ipaddress
import struct

ETH_IP, ETH_IPV6, ETH_ARP = 0x0800, 0x86DD, 0x0806
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
HOPOPTS, DSTOPTS, FRAGMENT = 0, 60, 44
ROUTING, AH = 43, 51

__all__ = ["ETH_IP", "ETH_IPV6", "ETH_ARP", "ETH_8021Q", "TCP", "UDP", "ICMP", "ICMPV6", "HOPOPTS", "DSTOPTS",
           "FRAGMENT", "ROUTING", "AH", "eth", "l4", "ipv4", "ipv6", "frame", "vlan_frame"]


def eth(ethertype: int, payload: bytes) -> bytes:
    return b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", ethertype) + payload


def l4(proto: int, sport: int, dport: int, payload: bytes = b"x" * 8, icmp_type: int | None = None) -> bytes:
    if proto == TCP:
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0) + payload
    if proto == UDP:
        return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if icmp_type is None:
        icmp_type = 8 if proto == ICMP else 128   # echo request
    return struct.pack("!BBHHH", icmp_type, 0, 0, 1, 1) + payload


def ipv4(dst: str, proto: int, sport: int = 40000, dport: int = 0, src: str = "192.0.2.10",
         frag_offset: int = 0, more_fragments: bool = False, payload: bytes = b"x" * 8) -> bytes:
    body = l4(proto, sport, dport, payload) if frag_offset == 0 else b"y" * 16
    flags = (0x2000 if more_fragments else 0) | (frag_offset // 8)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, flags, 64, proto, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return hdr + body


def ipv6(dst: str, proto: int, sport: int = 40000, dport: int = 0, src: str = "2001:db8:ffff::10",
         ext: tuple[int, ...] = (), frag_offset: int = 0, hop_limit: int = 64,
         icmp_type: int | None = None, payload: bytes = b"x" * 8) -> bytes:
    """ext: extension headers in order (HOPOPTS, DSTOPTS, FRAGMENT) before the L4 header."""
    body = l4(proto, sport, dport, payload, icmp_type=icmp_type) if frag_offset == 0 else b"y" * 16
    chain = list(ext) + [proto]
    headers = b""
    for kind, nxt in zip(chain, chain[1:]):
        if kind == FRAGMENT:
            headers += struct.pack("!BBHI", nxt, 0, frag_offset & 0xFFF8, 0x1234)
        else:  # 8-byte options header, PadN
            headers += struct.pack("!BB", nxt, 0) + b"\x01\x04\x00\x00\x00\x00"
    first = chain[0]
    payload = headers + body
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(payload), first, hop_limit,
                      ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
    return hdr + payload


def frame(ip_packet: bytes) -> bytes:
    return eth(ETH_IPV6 if ip_packet[0] >> 4 == 6 else ETH_IP, ip_packet)


ETH_8021Q = 0x8100


def vlan_frame(ip_packet: bytes, vid: int = 10) -> bytes:
    """The IP packet in an Ethernet frame with one 802.1Q tag."""
    inner = ETH_IPV6 if ip_packet[0] >> 4 == 6 else ETH_IP
    return eth(ETH_8021Q, struct.pack("!HH", vid, inner) + ip_packet)
