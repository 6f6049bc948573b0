"""Differential fuzzing: the real programs (BPF_PROG_TEST_RUN) and the policy
model (ksbpf/verify/model.py) must decide every packet alike.

Random and mutated packets -- every field of the IPv4/IPv6/TCP/UDP/ICMP
headers, extension-header chains, fragments, truncations, VLAN tags, odd
ethertypes, endpoint and LAN edges -- go through every entry point
(ksbpf_cg_egress on the frame, ksbpf_tc_eth on the frame, ksbpf_tc_l3 on the
bare IP packet), leaving through every kind of interface (loopback, a
registered tunnel, others; ifindexes below and above the program's ifindex
filter), under every option set.

Batching: each test run costs a syscall, so the verdict is compared per
packet (the return value), and the reason per batch: the model's histogram
of (reason, family) -> (packets, bytes) against one read of the counters.
A batch whose histogram differs is replayed packet by packet, reading the
counters after each, to name the packet.  One packet in sixteen carries the
scope's verify nonce in skb->cb: it must be decided alike and counted not at
all.  Workers (one per core) each load their own programs and maps, so their
counters do not mix.

Every disagreement is reported with its packet and saved as a regression
case (a JSON file that tests/test_verify_fuzz.py replays).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import multiprocessing
import os
import random
import struct
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field

from ksbpf.kernel import bpf, features, netns
from ksbpf.policy import LAN_RANGES, AnyEndpoint, Endpoint, Options
from ksbpf.reasons import Family, Reason
from ksbpf.verify import model
from ksbpf.verify.nonce import set_nonce
from ksbpf.verify.testrun import Runner, allowed, new_nonce, refused

OPTION_SETS = {
    "strict": Options(),
    "lan": Options(allow_lan=True),
    "lan+dns": Options(allow_lan=True, allow_lan_dns=True),
    "dhcp": Options(allow_dhcp=True),
    "lan+dhcp": Options(allow_lan=True, allow_dhcp=True),
    "exempt": Options(),   # node mode: the root cgroup exempted, so every test-run socket is (tc drops pass)
    # the cgroup hook reading each socket's namespace from socket storage (kernels < 6.17) instead of the helper
    "strict/storage": Options(),
    "lan+dhcp/storage": Options(allow_lan=True, allow_dhcp=True),
    # --vpn-mark: a mark no test run carries (its skb->mark is 0): the endpoints are not the runs'
    "vpn-mark": Options(vpn_mark=True),
    # --vpn-cgroup: the root cgroup, an ancestor of every test run's socket: the runs are the VPN client
    "vpn-cgroup+lan": Options(vpn_cgroup=True, allow_lan=True),
    # both, neither matching (a cgroup id no socket has), with socket storage
    "vpn+dhcp/storage": Options(vpn_mark=True, vpn_cgroup=True, allow_dhcp=True),
    # --dns: DNS only to RESOLVERS, through the tunnel (the cgroup hook parses every packet)
    "dns": Options(dns=True),
    "lan+dhcp+dns": Options(allow_lan=True, allow_dhcp=True, dns=True),
    # both: DNS to a wildcard endpoint on port 53 (the VPN client's) and to other resolvers
    "vpn-cgroup+dns": Options(vpn_cgroup=True, dns=True),
    # node mode (DHCP on, its default) with --dns (tc: DNS through a tunnel parsed, to other resolvers dropped) and an exempted
    # cgroup: the DNS drops of the tc hooks become exempt, the cgroup hook's stay
    "exempt+lan+dhcp+dns": Options(allow_lan=True, allow_dhcp=True, dns=True),
}
EXEMPT_SETS = {"exempt", "exempt+lan+dhcp+dns"}
VPN_CLIENT_SETS = {"vpn-cgroup+lan"}
VPN_MARK = (0x1234, 0xFFFF)
NO_CGROUP_ID = (1 << 63) + 12345   # no cgroup has it
STORAGE_SETS = {"strict/storage", "lan+dhcp/storage", "vpn+dhcp/storage"}
# wildcard endpoints of the vpn sets: any address on these (port, protocol) pairs
ANY_ENDPOINTS = tuple(AnyEndpoint.parse(e) for e in ("*:51820/udp", "*:4500/udp", "*:443/tcp", "*:53/udp"))

ENDPOINTS = tuple(Endpoint.parse(e) for e in (
    "203.0.113.5:51820/udp", "203.0.113.5:443/tcp",
    # a full address: KSBPF_EP_PORTS pairs
    *(f"198.51.100.7:{p}/{proto}" for p, proto in ((1, "udp"), (53, "udp"), (53, "tcp"), (443, "tcp"),
                                                      (1194, "udp"), (51820, "udp"), (65535, "tcp"), (67, "udp"))),
    "[2001:db8:5::5]:51820/udp",
    "[::ffff:198.51.100.9]:4500/udp",     # an IPv4-mapped address as an IPv6 endpoint
    "10.9.8.7:53/udp", "[fd00::1]:853/tcp",   # endpoints inside LAN ranges: the endpoint rule comes first
    # sharing an ep_slots slot with 203.0.113.5 and 2001:db8:5::5: the hash decides
    "192.0.116.0:500/udp", "[2001:db8:6::5]:4500/udp",
))

# --dns: the VPN's resolvers (one inside a LAN range, one an endpoint's address too)
RESOLVERS = tuple(ipaddress.ip_address(a) for a in ("10.64.0.1", "100.64.0.7", "198.51.100.7", "fd00:64::1"))

# Interfaces of the fuzz namespace: name -> registered as a tunnel?
IFACES = {
    "tnl": True, "phy": False, "tn0": False, "tnh": True, "phh": False,
}
# IPv6 prefixes on the link of an interface of the fuzz namespace (connected
# routes), and one reached through a gateway on phy's link: neighbour
# discovery goes to the first, not the second (the program asks the kernel's
# FIB, the model these).
ON_LINK6 = {"phy": ipaddress.IPv6Network("2001:db8:1::/64"), "phh": ipaddress.IPv6Network("2001:db8:2::/64")}
ROUTED6 = ipaddress.IPv6Network("2001:db8:99::/48")
ROOT_CGROUP_ID = 1    # the cgroup v2 root: an ancestor (level 0) of every socket
HIGH_IFINDEX = 5000   # above KSBPF_IFINDEX_FILTER (4096): the hash alone decides

ENTRIES = model.HOOKS
NONCE_EVERY = 16
REGRESSION_DIR_DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                      "tests", "fuzz_regressions")


# -- the namespace and the programs --------------------------------------------------

@dataclass
class FuzzEnv:
    """A throwaway namespace holding the interfaces packets "leave" through."""

    name: str = field(default_factory=lambda: f"ksbpf-fz{uuid.uuid4().hex[:6]}")
    ifindex: dict[str, int] = field(default_factory=dict)
    path: str = ""

    def __enter__(self) -> "FuzzEnv":
        def ip(*args: str) -> None:
            subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True)
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        try:
            ip("link", "add", "tnl", "type", "veth", "peer", "name", "phy")
            ip("tuntap", "add", "mode", "tun", "name", "tn0")
            ip("link", "add", "tnh", "index", str(HIGH_IFINDEX), "type", "veth",
               "peer", "name", "phh", "index", str(HIGH_IFINDEX + 1))
            for name in ("tnl", "phy", "tnh", "phh"):
                ip("link", "set", name, "up")
            for name, net in ON_LINK6.items():
                ip("-6", "addr", "add", f"{net[1]}/{net.prefixlen}", "dev", name, "nodad")
            ip("-6", "route", "add", str(ROUTED6), "via", str(ON_LINK6["phy"][0xff]), "dev", "phy")
            # the kernel's FIB helper answers only for interfaces that forward IPv6
            subprocess.run(["ip", "netns", "exec", self.name, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
                           check=True, capture_output=True)
            ns = netns.resolve(self.name)
            self.path = ns.path
            self.ifindex = {n: netns.ifindex(ns, n) for n in IFACES}
            self.ifindex["lo"] = 1
            self.cookie = netns.cookie(ns)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tunnels(self) -> frozenset[int]:
        return frozenset(self.ifindex[n] for n, tunnel in IFACES.items() if tunnel)

    def on_link(self, ifindex: int, daddr: bytes) -> bool:
        """Does the namespace's main table put this IPv6 destination directly on
        the link of interface ifindex?"""
        a = ipaddress.IPv6Address(daddr)
        return any(self.ifindex[name] == ifindex and a in net for name, net in ON_LINK6.items())


def programs(env: "FuzzEnv", name: str, cache: str) -> "Programs":
    """The programs of option set `name`, as the fuzzer and the saved cases load them."""
    return Programs(env, OPTION_SETS[name], cache, name in EXEMPT_SETS,
                    features.NETNS_STORAGE if name in STORAGE_SETS else features.NETNS_HELPER,
                    vpn_client=name in VPN_CLIENT_SETS)


class Programs:
    """One option set's three entry points and their maps, set up like a scope
    with the fuzz namespace's tunnels and ENDPOINTS."""

    def __init__(self, env: FuzzEnv, options: Options, cache: str, exempt: bool = False,
                 identity: str = features.NETNS_HELPER, vpn_client: bool = False):
        self.identity = identity
        with features.forced_netns_identity(identity):
            self.prog = bpf.load(options, len(ENDPOINTS), cache=cache, entries=ENTRIES)
        for name, tunnel in IFACES.items():
            if tunnel:
                self.prog.maps.add_tunnel(env.cookie, env.ifindex[name], 0)
        self.prog.maps.set_netns_cookie(env.cookie)   # tc: the namespace of the guarded interfaces
        for ep in ENDPOINTS:
            self.prog.maps.add_endpoint(ep)
        resolvers = RESOLVERS if options.dns else ()
        self.prog.maps.set_dns(resolvers)
        self.nonce = new_nonce()
        set_nonce(self.prog.maps, self.nonce, env.cookie)   # a verify run stands for a socket of env's namespace
        vpn = options.vpn_mark or options.vpn_cgroup
        if options.vpn_mark:
            self.prog.maps.set_vpn_mark(*VPN_MARK)
        if options.vpn_cgroup:
            self.prog.maps.set_vpn_cgroups([(ROOT_CGROUP_ID, 0)] if vpn_client else [(NO_CGROUP_ID, 1)])
        for ep in ANY_ENDPOINTS if vpn else ():
            self.prog.maps.add_any_endpoint(ep)
        self.scope = model.Scope(options, ENDPOINTS, env.tunnels, exempt=exempt, on_link=env.on_link,
                                 vpn_client=vpn_client, any_endpoints=ANY_ENDPOINTS if vpn else (),
                                 resolvers=frozenset(a.packed for a in resolvers))
        # a counted test run's socket has no storage: its namespace is unknown, never a tunnel's
        self._unknown_netns = dataclasses.replace(self.scope, tunnels=frozenset())
        if exempt:
            self.prog.maps.set_exempt([(ROOT_CGROUP_ID, 0)])
        self.runners = {e: Runner(self.prog.progs[e]) for e in ENTRIES}
        self.nonce_runners = {e: Runner(self.prog.progs[e], self.nonce) for e in ENTRIES}

    def scope_for(self, hook: str, use_nonce: bool) -> model.Scope:
        """What the model must assume of a test run: with socket storage, the
        cgroup hook knows a run's namespace only from the verify nonce."""
        if self.identity == features.NETNS_STORAGE and hook == model.CGROUP and not use_nonce:
            return self._unknown_netns
        return self.scope

    def counters(self) -> dict[tuple[Reason, Family], tuple[int, int]]:
        return self.prog.maps.counters()

    def close(self) -> None:
        self.prog.close()


def compile_all(cache: str) -> None:
    """Compile every option set once (bcc), so workers load cached images."""
    for name, opts in OPTION_SETS.items():
        identity = features.NETNS_STORAGE if name in STORAGE_SETS else features.NETNS_HELPER
        with features.forced_netns_identity(identity):
            bpf.load(opts, len(ENDPOINTS), cache=cache, entries=ENTRIES).close()


# -- packets ---------------------------------------------------------------------------

def _edges() -> tuple[list[bytes], list[bytes]]:
    v4: set[bytes] = set()
    v6: set[bytes] = set()
    for ep in ENDPOINTS:
        a = ep.address
        for d in (-1, 0, 1):
            (v4 if a.version == 4 else v6).add((a + d).packed)
        if a.version == 4:
            v6.add(ipaddress.IPv6Address(f"::ffff:{a}").packed)   # IPv4-mapped IPv6 of an IPv4 endpoint
    for net in LAN_RANGES:
        first, last = int(net.network_address), int(net.broadcast_address)
        top = (1 << net.max_prefixlen) - 1
        for x in (first - 1, first, first + 1, last - 1, last, last + 1):
            if 0 <= x <= top:
                (v4 if net.version == 4 else v6).add(ipaddress.ip_address(x).packed if net.version == 4
                                                     else ipaddress.IPv6Address(x).packed)
    for a in RESOLVERS:   # --dns: the resolvers and their neighbours
        for d in (-1, 0, 1):
            (v4 if a.version == 4 else v6).add((a + d).packed)
    for text in ("0.0.0.0", "127.0.0.53", "8.8.8.8", "127.0.0.1", "100.64.0.1", "239.1.1.1", "224.0.1.1", "93.184.216.34", "9.9.9.9",
                 "192.0.2.1"):
        v4.add(ipaddress.IPv4Address(text).packed)
    for text in ("::", "::1", "ff01::1", "ff05::1:3", "fec0::1", "2606:2800:220:1::1", "64:ff9b::808:808",
                 "::ffff:93.184.216.34", "2001:db8:5::5:0", "ff02::1:2", "ff02::1:3", "ff02::2", "ff02::1:ff00:1"):
        v6.add(ipaddress.IPv6Address(text).packed)
    for net in (*ON_LINK6.values(), ROUTED6):   # neighbours on a link, and beyond a gateway
        for x in (-1, 0, 1, 2, 0xff):
            v6.add((net.network_address + x).packed)
        v6.add((net.broadcast_address + 1).packed)
    return sorted(v4), sorted(v6)


ADDR4, ADDR6 = _edges()
ND_DESTS = tuple(ipaddress.IPv6Address(a).packed for a in (
    "ff02::1:ff00:1", "ff02::2", "ff02::1", "fe80::1", "febf::1", "fec0::1", "ff05::2", "2001:db8:1::2",
    "2001:db8:2::5", "2001:db8:99::2", "2606:2800:220:1::1"))
DHCP_DESTS4 = tuple(ipaddress.IPv4Address(a).packed for a in (
    "255.255.255.255", "192.168.1.1", "169.254.1.1", "10.0.0.1", "172.31.255.255", "224.0.0.1", "9.9.9.9", "192.0.2.1"))
DHCP_DESTS6 = tuple(ipaddress.IPv6Address(a).packed for a in (
    "ff02::1:2", "fe80::1", "ff02::1:3", "ff05::1:3", "fd00::1", "2001:db8:1::2", "2606:2800:220:1::1"))
ARP_HEADS = (b"\x00\x01\x08\x00\x06\x04\x00\x01", b"\x00\x01\x08\x00\x06\x04\x00\x02")
# sizes of the DHCP and ND payloads around the programs' bounds (model.DHCP_MAX, model.ND_MAX), and far past them
DHCP_PAYLOADS = (0, 8, 300, 520, 527, 528, 529, 547, 548, 549, 1400)
ND_PAYLOADS = (0, 8, 16, 40, 48, 55, 56, 57, 64, 1200)
PORTS = sorted({(ep.port + d) & 0xFFFF for ep in ENDPOINTS for d in (-1, 0, 1)}
               | {0, 53, 853, 67, 68, 546, 547, 80, 65535})
L4_PROTOS = (6, 17, 1, 58, 6, 17, 58, 0, 50, 132, 255)
EXT = (0, 43, 60, 44, 51)
ETHERTYPES = (0x0806, 0x88CC, 0x8100, 0x88A8, 0x0000, 0x05DC, 0x0600, 0x8847, 0xFFFF)


class Generator:
    """Random and mutated packets.  gen() -> (frame, ip_packet)."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self.target: Endpoint | None = None   # this packet aims at an endpoint: its address, port, protocol
        self.dhcp = False
        self.nd = False                       # this packet is (nearly) neighbour discovery

    def _addr(self, v6: bool) -> bytes:
        r = self.r
        t = self.target
        if t is not None and t.address.version == (6 if v6 else 4):
            return t.address.packed
        if r.random() < 0.85:
            return r.choice(ADDR6 if v6 else ADDR4)
        return r.randbytes(16 if v6 else 4)

    def _port(self) -> int:
        return self.r.choice(PORTS) if self.r.random() < 0.8 else self.r.randrange(65536)

    def _l4(self, proto: int) -> bytes:
        r = self.r
        sport = r.choice((68, 546, 40000)) if r.random() < 0.3 else self._port()
        dport = self.target.port if self.target and r.random() < 0.8 else self._port()
        payload = r.randbytes(r.choice((0, 1, 8, 32)))
        if self.dhcp and r.random() < 0.9:
            sport, dport = r.choice(((68, 67), (546, 547)))
            payload = r.randbytes(r.choice(DHCP_PAYLOADS) if r.random() < 0.5 else r.choice((0, 8, 300)))
        if proto == 6:
            doff = 5 if r.random() < 0.8 else r.randrange(16)
            return struct.pack("!HHIIBBHHH", sport, dport, r.getrandbits(32), r.getrandbits(32), doff << 4,
                               r.getrandbits(8), r.getrandbits(16), 0, 0) + r.randbytes(max(0, doff * 4 - 20) if doff > 5 else 0) + payload
        if proto == 17:
            return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        if proto in (1, 58):
            t = r.choice((8, 0, 3, 128, 129, 133, 134, 135, 136, 137, 1)) if r.random() < 0.9 else r.getrandbits(8)
            if self.nd:
                t = r.choice((133, 135, 136, 134))
                payload = r.randbytes(r.choice(ND_PAYLOADS))
            return struct.pack("!BBHHH", t, r.choice((0, 0, 1)), 0, 1, 1) + payload
        return r.randbytes(r.choice((0, 4, 8, 20)))

    def _proto(self) -> int:
        r = self.r
        if self.dhcp and r.random() < 0.9:
            return 17
        if self.nd and r.random() < 0.9:
            return 58
        if self.target and r.random() < 0.8:
            return self.target.proto_number
        return r.choice(L4_PROTOS) if r.random() < 0.9 else r.getrandbits(8)

    def ipv4(self) -> bytes:
        r = self.r
        proto = self._proto()
        ihl = 5 if r.random() < 0.8 else r.randrange(16)
        opts = r.randbytes(max(0, ihl - 5) * 4)
        frag = 0
        x = r.random()
        if x < 0.1:
            frag = r.getrandbits(13)
        elif x < 0.2:
            frag = 0x2000           # MF, first fragment
        elif x < 0.3:
            frag = 0x4000 | (r.getrandbits(13) if r.random() < 0.3 else 0)   # DF
        elif x < 0.33:
            frag = r.getrandbits(16)
        body = self._l4(proto)
        version = 4 if r.random() < 0.95 else r.randrange(16)
        dst = r.choice(DHCP_DESTS4) if self.dhcp and r.random() < 0.7 else self._addr(False)
        hdr = struct.pack("!BBHHHBBH4s4s", version << 4 | ihl, r.getrandbits(8), 20 + len(opts) + len(body),
                          r.getrandbits(16), frag, r.getrandbits(8), proto, 0, r.randbytes(4), dst)
        return hdr + opts + body

    def _ext(self, kind: int, nxt: int) -> bytes:
        r = self.r
        if kind == 44:
            off = 0 if r.random() < 0.5 else r.getrandbits(13)
            return struct.pack("!BBHI", nxt, r.getrandbits(8) if r.random() < 0.1 else 0,
                               off << 3 | r.getrandbits(3), r.getrandbits(32))
        hlen = r.choice((0, 0, 1, 2)) if r.random() < 0.95 else r.getrandbits(8)
        size = (hlen + 2) * 4 if kind == 51 else (hlen + 1) * 8
        size = min(size, 256 + r.randrange(64))   # a header longer than the packet is a truncation
        return (struct.pack("!BB", nxt, hlen) + r.randbytes(max(0, size - 2)))[:max(2, size)]

    def ipv6(self) -> bytes:
        r = self.r
        proto = self._proto()
        n = r.choice((0, 0, 0, 1, 1, 2, 3, 5, 6, 7, 8)) if not self.nd or r.random() < 0.2 else 0
        chain = [r.choice(EXT) for _ in range(n)] + [proto]
        if r.random() < 0.05 and n:
            chain[r.randrange(n)] = r.getrandbits(8)
        headers = b"".join(self._ext(k, nxt) for k, nxt in zip(chain, chain[1:]) if k in EXT)
        # a non-extension value in the chain ends it: what follows is its payload
        body = self._l4(chain[-1])
        payload = headers + body
        version = 6 if r.random() < 0.95 else r.randrange(16)
        hop = r.choice((255, 64, 1, 255)) if r.random() < 0.9 else r.getrandbits(8)
        dst = r.choice(DHCP_DESTS6) if self.dhcp and r.random() < 0.7 else self._addr(True)
        if self.nd:
            hop = 255 if r.random() < 0.9 else hop
            dst = r.choice(ND_DESTS) if r.random() < 0.7 else dst
        src = r.randbytes(16)
        if self.nd and r.random() < 0.6:   # a global neighbour is ND's only from an address in its /64
            src = dst[:8] + r.randbytes(8)
        hdr = struct.pack("!IHBB16s16s", version << 28 | r.getrandbits(28), len(payload), chain[0], hop,
                          src, dst)
        return hdr + payload

    def arp(self) -> bytes:
        """An ARP message (request or reply, maybe padded), or something else
        under the ARP ethertype: a mutated header, a wrong length, data in the
        padding, an IPv4 packet."""
        r = self.r
        x = r.random()
        if x < 0.15:
            return self.ipv4()
        body = bytearray(r.choice(ARP_HEADS) + r.randbytes(20))
        if x < 0.35:
            body[r.randrange(8)] = r.getrandbits(8) if r.random() < 0.7 else body[r.randrange(8)] ^ 1
        pad = r.choice((0, 0, 0, 1, 5, 17, 18, 18, 19, 30))
        body += bytes(pad)
        if pad and r.random() < 0.3:
            body[28 + r.randrange(pad)] = r.getrandbits(8) | 1
        if r.random() < 0.1:
            body = body[:r.randrange(len(body))]
        return bytes(body)

    def gen(self) -> tuple[bytes, bytes]:
        r = self.r
        self.target = r.choice(ENDPOINTS) if r.random() < 0.25 else None
        self.dhcp = self.target is None and r.random() < 0.15   # DHCP client ports, either family
        self.nd = self.target is None and not self.dhcp and r.random() < 0.06
        dst_mac, src_mac = b"\x02\x00\x00\x00\x00\x02", b"\x02\x00\x00\x00\x00\x01"
        if self.target is None and not self.dhcp and not self.nd and r.random() < 0.04:
            body = self.arp()   # the ARP ethertype, maybe behind a tag; tc_l3 gets the body as it is
            if r.random() < 0.2:
                frame = dst_mac + src_mac + struct.pack("!HHH", r.choice((0x8100, 0x88A8)), r.getrandbits(16), 0x0806) + body
            else:
                frame = dst_mac + src_mac + struct.pack("!H", 0x0806) + body
            return frame, body
        x = r.random()
        ip = (self.ipv6() if x < 0.5 or self.nd else self.ipv4() if x < 0.97
              else r.randbytes(r.randrange(64)))
        m = r.random()
        if m < 0.15 and ip:
            ip = ip[:r.randrange(len(ip))]                       # truncated
        elif m < 0.30 and ip:
            b = bytearray(ip)
            for _ in range(r.randint(1, 3)):
                b[r.randrange(len(b))] = r.getrandbits(8)          # mutated
            ip = bytes(b)
        v = ip[0] >> 4 if ip else 0
        ethertype = 0x86DD if v == 6 else 0x0800
        e = r.random()
        if e < 0.08:
            tag = r.choice((0x8100, 0x88A8))
            inner = ethertype if r.random() < 0.8 else r.choice(ETHERTYPES)
            frame = dst_mac + src_mac + struct.pack("!HHH", tag, r.getrandbits(16), inner) + ip
        elif e < 0.14:
            frame = dst_mac + src_mac + struct.pack("!H", r.choice(ETHERTYPES + (0x0800, 0x86DD))) + ip
        else:
            frame = dst_mac + src_mac + struct.pack("!H", ethertype) + ip
        return frame, ip


# -- the loop --------------------------------------------------------------------------

@dataclass
class Disagreement:
    options: str
    hook: str
    iface: str
    buffer: str          # hex of the test-run data
    nonce: bool
    model: str           # "reason/family"
    kernel: str          # "allow"/"drop" verdict, or "reason/family" of the counter that moved
    what: str


@dataclass
class Result:
    packets: int = 0
    refused: int = 0     # buffers the kernel will not test-run (a sample is checked to be refused)
    seconds: float = 0.0
    disagreements: list[Disagreement] = field(default_factory=list)
    by_reason: Counter = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.packets / self.seconds if self.seconds else 0.0


def _moved(before, after) -> dict:
    return {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after if after[k] != before[k]}


def _label(k) -> str:
    return f"{k[0].label}/{k[1].label}"


def _runs(runner: Runner, data: bytes, ifindex: int) -> bool:
    try:
        runner.run(data, ifindex)
        return True
    except OSError:
        return False


def check_one(progs: Programs, hook: str, data: bytes, ifindex: int, use_nonce: bool) -> str | None:
    """Run one buffer alone, reading the counters around it: why the kernel and
    the model disagree on it (verdict, reason, family, bytes, nonce), or None."""
    want = model.decide_test_run(hook, data, ifindex, progs.scope_for(hook, use_nonce))
    before = progs.counters()
    runner = (progs.nonce_runners if use_nonce else progs.runners)[hook]
    try:
        verdict = allowed(hook != model.CGROUP, runner.run(data, ifindex))
    except OSError as exc:
        return None if refused(data) else f"the test run failed: {exc}"
    if refused(data):
        return "the kernel ran a buffer it is expected to refuse"
    moved = _moved(before, progs.counters())
    expect = {} if use_nonce else {(want.reason, want.family): (1, model.skb_len(hook, data))}
    problems = []
    if verdict != want.allowed:
        problems.append(f"verdict {'allow' if verdict else 'drop'}")
    if moved != expect:
        problems.append("counters " + (", ".join(f"{_label(k)} {v}" for k, v in moved.items()) or "unchanged"))
    return f"model {_label((want.reason, want.family))}, kernel " + "; ".join(problems) if problems else None


def _replay(progs: Programs, options: str, batch, iface_of: dict[int, str], result: Result) -> None:
    """Run a batch one packet at a time, reading the counters after each."""
    for hook, data, ifindex, use_nonce, want in batch:
        problem = check_one(progs, hook, data, ifindex, use_nonce)
        if problem:
            result.disagreements.append(Disagreement(options, hook, iface_of[ifindex], data.hex(), use_nonce,
                                                     _label((want.reason, want.family)), problem, "counters"))


def load_cases(directory: str = REGRESSION_DIR_DEFAULT) -> list[tuple[str, dict]]:
    """The saved regression cases: (file name, case)."""
    if not os.path.isdir(directory):
        return []
    out = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".json"):
            with open(os.path.join(directory, name)) as f:
                out.append((name, json.load(f)))
    return out


def fuzz_loop(env: FuzzEnv, cache: str, n: int, seed: int, batch_size: int = 2048) -> Result:
    """Fuzz n test runs (inside env's namespace); runs in the calling thread.
    Each batch uses one option set: at least 40 batches, so a short run sees them all."""
    batch_size = max(64, min(batch_size, n // 40))
    gen = Generator(seed)
    rnd = random.Random(seed ^ 0x5EED)
    progs = {name: programs(env, name, cache) for name in OPTION_SETS}
    iface_of = {v: k for k, v in env.ifindex.items()}
    weights = [("phy", 8), ("tnl", 2), ("lo", 1), ("tn0", 2), ("tnh", 1), ("phh", 2)]
    ifaces = [env.ifindex[name] for name, w in weights for _ in range(w)]
    result = Result()
    start = time.monotonic()
    names = list(OPTION_SETS)
    try:
        while result.packets < n:
            name = names[rnd.randrange(len(names))]
            p = progs[name]
            batch = []
            expected: Counter = Counter()
            before = p.counters()
            while len(batch) < batch_size and result.packets + len(batch) < n:
                frame, ip = gen.gen()
                ifindex = ifaces[rnd.randrange(len(ifaces))]
                for hook, data in ((model.CGROUP, frame), (model.TC_ETH, frame), (model.TC_L3, ip)):
                    if len(data) > 3000 or refused(data):
                        result.refused += 1   # the kernel refuses to test-run it: check one in 64
                        if len(data) >= 14 and rnd.randrange(64) == 0 and _runs(p.runners[hook], data, ifindex):
                            result.disagreements.append(Disagreement(
                                name, hook, iface_of[ifindex], data.hex(), False, "refused by the kernel",
                                "ran", "test-run refusal"))
                        continue
                    use_nonce = rnd.randrange(NONCE_EVERY) == 0
                    want = model.decide_test_run(hook, data, ifindex, p.scope_for(hook, use_nonce))
                    runner = (p.nonce_runners if use_nonce else p.runners)[hook]
                    verdict = allowed(hook != model.CGROUP, runner.run(data, ifindex))
                    if verdict != want.allowed:
                        result.disagreements.append(Disagreement(
                            name, hook, iface_of[ifindex], data.hex(), use_nonce,
                            _label((want.reason, want.family)), "allow" if verdict else "drop", "verdict"))
                    if not use_nonce:
                        k = (want.reason, want.family)
                        pk, by = expected[k] if k in expected else (0, 0)
                        expected[k] = (pk + 1, by + model.skb_len(hook, data))
                        result.by_reason[want.reason.label] += 1
                    batch.append((hook, data, ifindex, use_nonce, want))
            if _moved(before, p.counters()) != dict(expected):
                _replay(p, name, batch, iface_of, result)
            result.packets += len(batch)
            if len(result.disagreements) > 50:
                break
    finally:
        for p in progs.values():
            p.close()
    result.seconds = time.monotonic() - start
    return result


def _worker(args) -> Result:
    env, cache, n, seed = args
    return netns.run_in(env.path, fuzz_loop, env, cache, n, seed)


def save_regressions(disagreements: list[Disagreement], directory: str) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    paths = []
    for d in disagreements:
        key = f"{d.options}-{d.hook}-{d.iface}-{d.buffer}"
        name = f"{d.hook}-{d.options}-{uuid.uuid5(uuid.NAMESPACE_OID, key).hex[:12]}.json"
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            json.dump(asdict(d), f, indent=1)
            f.write("\n")
        paths.append(path)
    return paths


def run(n: int, seed: int | None = None, workers: int | None = None, cache: str | None = None,
        regressions: str | None = REGRESSION_DIR_DEFAULT) -> tuple[Result, list[str]]:
    """Fuzz n test runs spread over `workers` processes (default: one per CPU);
    save what disagrees under `regressions`.  Compiled images go to `cache`
    (default: ksbpf's image cache, else a temporary directory)."""
    seed = random.SystemRandom().getrandbits(32) if seed is None else seed
    workers = workers or max(1, min(os.cpu_count() or 1, 4))
    with tempfile.TemporaryDirectory(prefix="ksbpf-fuzz-") as tmp, FuzzEnv() as env:
        cache = cache or bpf.cache_dir() or tmp
        compile_all(cache)
        share = [n // workers + (1 if i < n % workers else 0) for i in range(workers)]
        jobs = [(env, cache, share[i], seed + i) for i in range(workers)]
        start = time.monotonic()
        if workers == 1:
            parts = [_worker(jobs[0])]
        else:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                parts = pool.map(_worker, jobs)
        total = Result(seconds=time.monotonic() - start)
        for part in parts:
            total.packets += part.packets
            total.refused += part.refused
            total.disagreements += part.disagreements
            total.by_reason.update(part.by_reason)
    saved = save_regressions(total.disagreements, regressions) if regressions and total.disagreements else []
    return total, saved


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m ksbpf.verify.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--packets", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--regressions", default=REGRESSION_DIR_DEFAULT)
    a = ap.parse_args(argv)
    seed = a.seed if a.seed is not None else random.SystemRandom().getrandbits(32)
    print(f"fuzz: {a.packets} test runs, seed {seed}, model vs. kernel (every hook, {len(OPTION_SETS)} option sets)")
    result, saved = run(a.packets, seed, a.workers, regressions=a.regressions)
    print(f"fuzz: {result.packets} packets in {result.seconds:.1f} s = {result.rate:,.0f} packets/s; "
          f"{len(result.disagreements)} disagreement(s); {result.refused} buffers the kernel refuses to test-run "
          f"(short IP headers) skipped")
    print("fuzz: decisions by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(result.by_reason.items())))
    for d in result.disagreements[:20]:
        print(f"  DISAGREE {d.options} {d.hook} via {d.iface}{' (nonce)' if d.nonce else ''}: model {d.model}, "
              f"kernel {d.kernel} ({d.what}); packet {d.buffer}")
    for path in saved:
        print(f"  saved {path}")
    return 1 if result.disagreements else 0


if __name__ == "__main__":
    raise SystemExit(main())
