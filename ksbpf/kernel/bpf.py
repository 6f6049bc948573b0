"""The BPF program and its maps: compiling with bcc, and reading/writing the
maps by file descriptor (freshly loaded or opened from pins alike).

Map layouts mirror ebpf/ksbpf.h; tests/test_reasons.py checks the sizes.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import ipaddress
import json
import os
import platform
import struct
from dataclasses import dataclass

from ksbpf.errors import KsbpfError
from ksbpf.kernel import btf, features, libbpf, nf, pins, preflight
from ksbpf.policy import PROTOCOLS, Endpoint, EventSettings, Options
from ksbpf.reasons import FAMILY_MAX, Family, Reason

# The entry points (the kernel shows them as the programs' names), their
# program types and the names they are pinned under.
ENTRY_CGROUP = "ksbpf_cg_egress"   # cgroup_skb/egress
ENTRY_TC_ETH = "ksbpf_tc_eth"      # tc egress, Ethernet interfaces
ENTRY_TC_L3 = "ksbpf_tc_l3"        # tc egress, interfaces without a link-layer header
ENTRY_SOCK_CREATE = "ksbpf_sk_create"  # cgroup/sock_create: records each socket's namespace (socket storage);
                                       # reports sockets of unknown namespaces (--netns each)
ENTRY_NF = "ksbpf_nf"              # netfilter POST_ROUTING of a node scope's namespace (kernels with netfilter links)
ENTRY_NF_SRC = "ksbpf_nf_src"      # netfilter POST_ROUTING where a cgroup scope's tunnel lives: tunnel source addresses
NF_ENTRIES = (ENTRY_NF, ENTRY_NF_SRC)
# --dns: cgroup sock_addr programs that redirect DNS to the VPN's resolvers (compiled with KSBPF_OPT_DNS)
ENTRY_DNS_CONN4, ENTRY_DNS_CONN6 = "ksbpf_dns_conn4", "ksbpf_dns_conn6"
ENTRY_DNS_SEND4, ENTRY_DNS_SEND6 = "ksbpf_dns_send4", "ksbpf_dns_send6"
ENTRY_DNS_RECV4, ENTRY_DNS_RECV6 = "ksbpf_dns_recv4", "ksbpf_dns_recv6"
ENTRY_DNS_PEER4, ENTRY_DNS_PEER6 = "ksbpf_dns_peer4", "ksbpf_dns_peer6"
DNS_ATTACH = {ENTRY_DNS_CONN4: libbpf.BPF_CGROUP_INET4_CONNECT, ENTRY_DNS_CONN6: libbpf.BPF_CGROUP_INET6_CONNECT,
              ENTRY_DNS_SEND4: libbpf.BPF_CGROUP_UDP4_SENDMSG, ENTRY_DNS_SEND6: libbpf.BPF_CGROUP_UDP6_SENDMSG,
              ENTRY_DNS_RECV4: libbpf.BPF_CGROUP_UDP4_RECVMSG, ENTRY_DNS_RECV6: libbpf.BPF_CGROUP_UDP6_RECVMSG,
              ENTRY_DNS_PEER4: libbpf.BPF_CGROUP_INET4_GETPEERNAME, ENTRY_DNS_PEER6: libbpf.BPF_CGROUP_INET6_GETPEERNAME}
DNS_ENTRIES = tuple(DNS_ATTACH)
ENTRIES = {ENTRY_CGROUP: libbpf.BPF_PROG_TYPE_CGROUP_SKB,
           ENTRY_TC_ETH: libbpf.BPF_PROG_TYPE_SCHED_CLS,
           ENTRY_TC_L3: libbpf.BPF_PROG_TYPE_SCHED_CLS,
           ENTRY_SOCK_CREATE: libbpf.BPF_PROG_TYPE_CGROUP_SOCK,
           ENTRY_NF: nf.BPF_PROG_TYPE_NETFILTER,
           ENTRY_NF_SRC: nf.BPF_PROG_TYPE_NETFILTER,
           **{e: libbpf.BPF_PROG_TYPE_CGROUP_SOCK_ADDR for e in DNS_ENTRIES}}
EXPECTED_ATTACH = {ENTRY_NF: nf.BPF_NETFILTER, ENTRY_NF_SRC: nf.BPF_NETFILTER, **DNS_ATTACH}   # entry points that must be loaded for one attach type
PIN_NAMES = {ENTRY_CGROUP: "prog", ENTRY_TC_ETH: "prog_eth", ENTRY_TC_L3: "prog_l3",
             ENTRY_SOCK_CREATE: "prog_sock", ENTRY_NF: "prog_nf", ENTRY_NF_SRC: "prog_nf_src",
             **{e: "prog_" + e[len("ksbpf_"):] for e in DNS_ENTRIES}}
TC_ENTRIES = (ENTRY_TC_ETH, ENTRY_TC_L3)
NODE_ENTRIES = (*TC_ENTRIES, ENTRY_NF)   # what node mode loads (the last where the kernel has netfilter links)
PROG_NAME = ENTRY_CGROUP
MAP_NAMES = ("tunnels", "tunnel_ifindex", "endpoints4", "endpoints6", "counters", "meta", "events", "bucket",
             "exempt", "scope_netns", "verify_nonce", "netns_known", "netns_events",
             "cidrs4", "cidrs6", "sk_netns", "ep_slots", "nf_pass", "tunnel_src", "netns_fast",
             "vpn_mark", "vpn_cgroups", "ep_any",
             "dns4", "dns6", "dns_target", "dns_orig")
# absent from pins of scopes made before them: --netns each's maps; allow_cidrs' tries (those allow none);
# the endpoint slots (those programs look the hashes up without them);
# and from programs that ask the kernel for the namespace instead of reading socket storage (sk_netns);
# nf_pass, tunnel_src: only compiled where the kernel has netfilter links; netns_fast: scopes made before it
# vpn_mark, vpn_cgroups, ep_any: only compiled with --vpn-mark / --vpn-cgroup (KSBPF_OPT_VPN_*);
# dns4, dns6, dns_target, dns_orig: only compiled with --dns (KSBPF_OPT_DNS)
OPTIONAL_MAPS = ("netns_known", "netns_events", "cidrs4", "cidrs6", "sk_netns", "ep_slots", "nf_pass", "tunnel_src",
                 "netns_fast", "vpn_mark", "vpn_cgroups", "ep_any", "dns4", "dns6", "dns_target", "dns_orig")
# maps a scope keeps across a re-attach: each socket's namespace, recorded when it was created; whether
# every socket of the scope is known to be in its namespace (netns_fast)
KEPT_MAPS = ("sk_netns", "netns_fast")
FAST_ALLOWED, FAST_FOREIGN = 0, 1   # netns_fast's keys (ksbpf.h)
IFINDEX_FILTER = 4096  # KSBPF_IFINDEX_FILTER
TUNNEL_SEVERAL = (1 << 64) - 1  # KSBPF_TUNNEL_SEVERAL
META_SIZE = 8192
EP_PORTS = 8  # (port, protocol) pairs per endpoint address
MAX_TUNNELS = 64

_TUNNEL_KEY = struct.Struct("=QII")   # netns_cookie, ifindex, pad
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_COUNTER = struct.Struct("=QQ")       # packets, bytes
_EXEMPT = struct.Struct("=QII")       # cgroup_id, level, pad
_SRC_KEY = struct.Struct("=Q16s")     # struct ksbpf_src_key: netns_cookie, addr
_SRC = struct.Struct("=II16s")        # struct ksbpf_src: ifindex, pad, name
_DNS_TARGET = struct.Struct("=4s16sBB2x")   # struct ksbpf_dns_target: v4, v6, has4, has6
DNS_ORIG = struct.Struct("=16s16sII")       # struct ksbpf_dns_orig: addr, resolver, port, pad
MAX_EXEMPT = 8                        # KSBPF_MAX_EXEMPT
MAX_VPN_CGROUPS = 8                   # KSBPF_MAX_VPN_CGROUPS
_PROTO_NAMES = {v: k for k, v in PROTOCOLS.items()}


def ebpf_dir() -> str:
    """Absolute path of the shipped BPF sources (package data ksbpf.ebpf)."""
    return str(importlib.resources.files("ksbpf.ebpf"))


def source_path() -> str:
    return os.path.join(ebpf_dir(), "ksbpf.c")


# the options that cost per packet: compile-time switches of ebpf/ksbpf.c (in this order)
OPTION_MACROS = (("allow_lan", "KSBPF_OPT_LAN"), ("allow_lan_dns", "KSBPF_OPT_LAN_DNS"),
                 ("allow_dhcp", "KSBPF_OPT_DHCP"), ("allow_cidrs", "KSBPF_OPT_CIDRS"),
                 ("vpn_mark", "KSBPF_OPT_VPN_MARK"), ("vpn_cgroup", "KSBPF_OPT_VPN_CGROUP"), ("dns", "KSBPF_OPT_DNS"))


def cflags(options: Options, n_endpoints: int, events: EventSettings = EventSettings()) -> list[str]:
    flags = [f"-I{ebpf_dir()}",
             f"-DKSBPF_MAX_TUNNELS={MAX_TUNNELS}",
             f"-DKSBPF_MAX_ENDPOINTS={max(64, n_endpoints)}"]
    flags += [f"-D{macro}" for option, macro in OPTION_MACROS if getattr(options, option)]
    if nf.supported():
        try:
            flags += btf.nf_cflags()   # compiles the netfilter entry point, for this kernel's struct layout
        except btf.BtfError:
            pass   # no BTF: no netfilter entry point (compiled_entries() says so)
    if features.netns_identity() == features.NETNS_HELPER:
        flags.append("-DKSBPF_NETNS_HELPER")
    if features.has("netns_cookie_tc"):
        flags.append("-DKSBPF_TC_NETNS_HELPER")
    if not features.has("coarse_clock"):
        flags.append("-DKSBPF_NO_COARSE_CLOCK")
    if events.rate > 0:
        # each CPU gets an equal share of the rate and of the burst
        ncpu = libbpf.num_possible_cpus()
        flags += [f"-DKSBPF_EVENTS_INTERVAL_NS={max(1, round(ncpu * 1e9 / events.rate))}ULL",
                  f"-DKSBPF_EVENTS_BURST={max(1, -(-events.burst // ncpu))}ULL"]
    return flags


def nf_compiled(flags: list[str]) -> bool:
    """Does an image compiled with these flags have the netfilter entry point?"""
    return any(f.startswith("-DKSBPF_OFF_NF_HOOK_STATE_OUT=") for f in flags)


def dns_compiled(flags: list[str]) -> bool:
    """Does an image compiled with these flags have the DNS redirect entry points?"""
    return "-DKSBPF_OPT_DNS" in flags


def compiled_entries(flags: list[str]) -> tuple[str, ...]:
    return tuple(e for e in ENTRIES if (e not in NF_ENTRIES or nf_compiled(flags))
                 and (e not in DNS_ENTRIES or (dns_compiled(flags) and features.has("sock_addr"))))


def nf_available(options: Options = Options(), n_endpoints: int = 0,
                 events: EventSettings = EventSettings()) -> bool:
    """Can node mode add its from-birth layer (the netfilter entry point) here?"""
    return nf_compiled(cflags(options, n_endpoints, events))


# --- key/value codecs -----------------------------------------------------------

def tunnel_key(netns_cookie: int, ifindex: int) -> bytes:
    return _TUNNEL_KEY.pack(netns_cookie, ifindex, 0)


def ep_slot(packed: bytes) -> int:
    """The slot of an endpoint address in ep_slots (struct ksbpf_ep_slot in ksbpf.h)."""
    return packed[2] ^ packed[3] if len(packed) == 4 else 256 + (packed[14] ^ packed[15])


def _endpoint_value(ports: list[tuple[int, int]]) -> bytes:
    """struct ksbpf_endpoint: n, then (port, protocol) pairs."""
    pairs = b"".join(struct.pack("!HBB", port, proto, 0) for port, proto in ports)
    return _U32.pack(len(ports)) + pairs.ljust(4 * EP_PORTS, b"\0")


def _endpoint_ports(value: bytes) -> list[tuple[int, int]]:
    n = _U32.unpack_from(value)[0]
    return [struct.unpack_from("!HB", value, 4 + 4 * i) for i in range(min(n, EP_PORTS))]


@dataclass(frozen=True)
class TunnelEntry:
    netns_cookie: int
    ifindex: int
    index: int  # position of the tunnel's name in the scope's meta


class ScopeMaps:
    """One scope's maps, by file descriptor."""

    def __init__(self, fds: dict[str, int], owned: bool):
        missing = set(MAP_NAMES) - set(OPTIONAL_MAPS) - set(fds)
        if missing:
            raise KsbpfError(f"BPF maps missing: {', '.join(sorted(missing))}",
                             "re-run `ksbpf attach` to rebuild the scope")
        self.fds = fds
        self._owned = owned
        self._value_size = {n: libbpf.map_info(fd).value_size for n, fd in fds.items()}

    @classmethod
    def from_pins(cls, directory: str) -> "ScopeMaps":
        fds: dict[str, int] = {}
        try:
            for name in MAP_NAMES:
                path = os.path.join(directory, name)
                if name in OPTIONAL_MAPS and not os.path.exists(path):
                    continue
                fds[name] = libbpf.obj_get(path)
        except OSError:
            for fd in fds.values():
                os.close(fd)
            raise
        return cls(fds, owned=True)

    def close(self) -> None:
        if self._owned:
            for fd in self.fds.values():
                os.close(fd)
            self.fds = {}

    def __enter__(self) -> "ScopeMaps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # tunnels: the (cookie, ifindex) hash, and the per-ifindex filter in front of it
    def _filter_ifindex(self, ifindex: int, leaving: int | None = None) -> None:
        """tunnel_ifindex[ifindex]: 0 when no namespace has a tunnel with that
        ifindex, the namespace's cookie when exactly one has, TUNNEL_SEVERAL
        when more do (ksbpf.h); `leaving`: a cookie about to be removed.  (A
        scope pinned before the filter held cookies holds a count: kept so.)"""
        if ifindex >= IFINDEX_FILTER:
            return
        cookies = {t.netns_cookie for t in self.tunnels() if t.ifindex == ifindex} - {leaving}
        if self._value_size["tunnel_ifindex"] == _U32.size:
            value = _U32.pack(len(cookies))
        else:
            value = _U64.pack(0 if not cookies else next(iter(cookies)) if len(cookies) == 1 else TUNNEL_SEVERAL)
        libbpf.map_update(self.fds["tunnel_ifindex"], _U32.pack(ifindex), value)

    def add_tunnel(self, netns_cookie: int, ifindex: int, index: int) -> None:
        libbpf.map_update(self.fds["tunnels"], tunnel_key(netns_cookie, ifindex), _U32.pack(index))
        self._filter_ifindex(ifindex)   # after: the filter never says "tunnel" before the hash does

    def remove_tunnel(self, netns_cookie: int, ifindex: int) -> None:
        self._filter_ifindex(ifindex, leaving=netns_cookie)   # before: the filter decides without the hash
        libbpf.map_delete(self.fds["tunnels"], tunnel_key(netns_cookie, ifindex))

    def tunnels(self) -> list[TunnelEntry]:
        fd = self.fds["tunnels"]
        out = []
        for key in libbpf.map_keys(fd, _TUNNEL_KEY.size):
            value = libbpf.map_lookup(fd, key, self._value_size["tunnels"])
            if value is not None:
                cookie, ifindex, _ = _TUNNEL_KEY.unpack(key)
                out.append(TunnelEntry(cookie, ifindex, _U32.unpack(value)[0]))
        return sorted(out, key=lambda t: (t.index, t.ifindex))

    # endpoints
    def add_endpoint(self, ep: Endpoint) -> None:
        name = "endpoints4" if ep.address.version == 4 else "endpoints6"
        key = ep.address.packed
        value = libbpf.map_lookup(self.fds[name], key, self._value_size[name])
        ports = _endpoint_ports(value) if value else []
        if (ep.port, ep.proto_number) in ports:
            return
        if len(ports) >= EP_PORTS:
            raise KsbpfError(f"more than {EP_PORTS} endpoints on {ep.address}",
                             f"give at most {EP_PORTS} port/protocol pairs per address")
        value = _endpoint_value(ports + [(ep.port, ep.proto_number)])
        libbpf.map_update(self.fds[name], key, value)   # first: a shared slot sends the program to the hash
        if "ep_slots" in self.fds:
            self._update_slot(ep.address)

    def _update_slot(self, address) -> None:
        """ep_slots[slot of address] from the hash: how many endpoint addresses
        share the slot, and the one address with its ports when it is alone."""
        name = "endpoints4" if address.version == 4 else "endpoints6"
        slot = ep_slot(address.packed)
        members = getattr(self, "_slot_members", None)
        if members is None:   # once: every endpoint address by slot (then kept up to date here)
            members = self._slot_members = {}
            for n, size in (("endpoints4", 4), ("endpoints6", 16)):
                for k in libbpf.map_keys(self.fds[n], size):
                    members.setdefault(ep_slot(k), set()).add(k)
        members.setdefault(slot, set()).add(address.packed)
        same = sorted(members[slot])
        if len(same) == 1:
            value = libbpf.map_lookup(self.fds[name], same[0], self._value_size[name])
            entry = _U32.pack(1) + same[0].ljust(16, b"\0") + value
        else:
            entry = _U32.pack(len(same)) + bytes(16 + self._value_size[name])
        libbpf.map_update(self.fds["ep_slots"], _U32.pack(slot), entry)

    def remove_endpoint(self, ep: Endpoint) -> None:
        """The endpoint leaves its address's (port, protocol) list; the address
        leaves the map with its last pair."""
        name = "endpoints4" if ep.address.version == 4 else "endpoints6"
        key = ep.address.packed
        value = libbpf.map_lookup(self.fds[name], key, self._value_size[name])
        ports = _endpoint_ports(value) if value else []
        if (ep.port, ep.proto_number) not in ports:
            return
        rest = [p for p in ports if p != (ep.port, ep.proto_number)]
        if rest:
            libbpf.map_update(self.fds[name], key, _endpoint_value(rest))
        else:
            libbpf.map_delete(self.fds[name], key)

    def endpoints(self) -> list[Endpoint]:
        out = []
        for name, size in (("endpoints4", 4), ("endpoints6", 16)):
            for key in libbpf.map_keys(self.fds[name], size):
                value = libbpf.map_lookup(self.fds[name], key, self._value_size[name])
                for port, proto in _endpoint_ports(value or b"\0" * 4):
                    if proto in _PROTO_NAMES:
                        out.append(Endpoint(ipaddress.ip_address(key), port, _PROTO_NAMES[proto]))
        return sorted(out, key=Endpoint.sort_key)

    # allowed CIDRs: LPM tries keyed by (prefix length, address)
    def add_cidr(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        name = "cidrs4" if net.version == 4 else "cidrs6"
        libbpf.map_update(self.fds[name], _U32.pack(net.prefixlen) + net.network_address.packed, b"\x01")

    # --vpn-mark / --vpn-cgroup: the VPN client's identity, and the wildcard endpoints only it may use
    def set_vpn_mark(self, mark: int, mask: int) -> None:
        if "vpn_mark" in self.fds:
            libbpf.map_update(self.fds["vpn_mark"], _U32.pack(0), _U32.pack(mark) + _U32.pack(mask))

    def vpn_mark(self) -> tuple[int, int] | None:
        if "vpn_mark" not in self.fds:
            return None
        raw = libbpf.map_lookup(self.fds["vpn_mark"], _U32.pack(0), 8) or bytes(8)
        mark, mask = struct.unpack("=II", raw)
        return (mark, mask) if mark else None

    def set_vpn_cgroups(self, cgroups: list[tuple[int, int]]) -> None:
        """(cgroup id, level) of each VPN client cgroup; the rest of the slots emptied."""
        if "vpn_cgroups" not in self.fds:
            return
        if len(cgroups) > MAX_VPN_CGROUPS:
            raise KsbpfError(f"more than {MAX_VPN_CGROUPS} vpn cgroups", f"give at most {MAX_VPN_CGROUPS}")
        self._set_cgroup_slots("vpn_cgroups", MAX_VPN_CGROUPS, cgroups)

    def vpn_cgroups(self) -> list[tuple[int, int]]:
        return self._cgroup_slots("vpn_cgroups", MAX_VPN_CGROUPS) if "vpn_cgroups" in self.fds else []

    def _set_cgroup_slots(self, name: str, slots: int, cgroups: list[tuple[int, int]]) -> None:
        """An array of (cgroup id, level) slots (struct ksbpf_exempt): these first, the rest emptied."""
        for i in range(slots):
            cg_id, level = cgroups[i] if i < len(cgroups) else (0, 0)
            libbpf.map_update(self.fds[name], _U32.pack(i), _EXEMPT.pack(cg_id, level, 0))

    def _cgroup_slots(self, name: str, slots: int) -> list[tuple[int, int]]:
        out = []
        for i in range(slots):
            cg_id, level, _ = _EXEMPT.unpack(libbpf.map_lookup(self.fds[name], _U32.pack(i), _EXEMPT.size))
            if not cg_id:
                break
            out.append((cg_id, level))
        return out

    def add_any_endpoint(self, ep) -> None:
        """A wildcard endpoint (policy.AnyEndpoint): any address on its port and protocol."""
        if "ep_any" not in self.fds:
            raise KsbpfError(f"endpoint {ep} needs the VPN client's identity compiled in",
                             "attach with --vpn-mark MARK or --vpn-cgroup PATH")
        libbpf.map_update(self.fds["ep_any"], struct.pack("!HBB", ep.port, ep.proto_number, 0), _U32.pack(1))

    def any_endpoints(self) -> list[tuple[int, str]]:
        if "ep_any" not in self.fds:
            return []
        out = []
        for key in libbpf.map_keys(self.fds["ep_any"], 4):
            port, proto, _ = struct.unpack("!HBB", key)
            if proto in _PROTO_NAMES:
                out.append((port, _PROTO_NAMES[proto]))
        return sorted(out)

    # --dns: the VPN's resolvers, and the first of each family as the redirect target
    def set_dns(self, resolvers) -> None:
        """The resolvers (IP addresses, in the user's order) become dns4/dns6;
        the first of each family the target of redirected DNS (dns_target)."""
        if "dns4" not in self.fds:
            if resolvers:
                raise KsbpfError("this program was compiled without --dns", "attach the scope again with --dns")
            return
        wanted = {4: [a.packed for a in resolvers if a.version == 4], 6: [a.packed for a in resolvers if a.version == 6]}
        # a change in place (dns = ["auto"] followed): the new resolvers in, the redirect target moved to
        # them, and only then the old ones out -- a query is never redirected to a resolver already removed
        for version, name in ((4, "dns4"), (6, "dns6")):
            for key in wanted[version]:
                libbpf.map_update(self.fds[name], key, b"\x01")
        v4, v6 = wanted[4][:1], wanted[6][:1]
        libbpf.map_update(self.fds["dns_target"], _U32.pack(0),
                          _DNS_TARGET.pack(v4[0] if v4 else bytes(4), v6[0] if v6 else bytes(16), bool(v4), bool(v6)))
        for version, name, size in ((4, "dns4", 4), (6, "dns6", 16)):
            for key in set(libbpf.map_keys(self.fds[name], size)) - set(wanted[version]):
                libbpf.map_delete(self.fds[name], key)

    def dns(self) -> list:
        """The resolvers in the maps (IPv4 first)."""
        if "dns4" not in self.fds:
            return []
        return [ipaddress.ip_address(k) for name, size in (("dns4", 4), ("dns6", 16))
                for k in sorted(libbpf.map_keys(self.fds[name], size))]

    def dns_redirects(self) -> int:
        """How many sockets' DNS destinations are recorded as redirected now (dns_orig)."""
        return len(libbpf.map_keys(self.fds["dns_orig"], 8)) if "dns_orig" in self.fds else 0

    # node mode, netfilter hook: the interfaces it leaves to others (tc guard in force, internal, tunnel)
    def set_nf_pass(self, ifindexes: set[int]) -> None:
        """nf_pass[i] = 1 for these interfaces, 0 for every other one it held."""
        if "nf_pass" not in self.fds:
            return
        fd = self.fds["nf_pass"]
        for i in sorted(ifindexes):
            if i < IFINDEX_FILTER:
                libbpf.map_update(fd, _U32.pack(i), _U32.pack(1))
        for i in self.nf_pass() - set(ifindexes):
            libbpf.map_update(fd, _U32.pack(i), _U32.pack(0))

    def nf_pass(self) -> set[int]:
        if "nf_pass" not in self.fds:
            return set()
        keys, values, n = libbpf.map_lookup_batch(self.fds["nf_pass"], 4, 4, IFINDEX_FILTER)
        return {i for i in range(n) if _U32.unpack_from(values, 4 * i)[0]}

    # cgroup scopes: the addresses of their tunnels (tunnel_src), never forgotten while the scope lives
    def tunnel_sources(self) -> dict[tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address], tuple[int, str]]:
        """(netns cookie, address) -> (the tunnel's ifindex (0: gone), its name)."""
        if "tunnel_src" not in self.fds:
            return {}
        fd, out = self.fds["tunnel_src"], {}
        for key in libbpf.map_keys(fd, _SRC_KEY.size):
            value = libbpf.map_lookup(fd, key, _SRC.size)
            if value is None:
                continue
            cookie, raw = _SRC_KEY.unpack(key)
            addr = ipaddress.IPv6Address(raw)
            ifindex, _pad, name = _SRC.unpack(value)
            out[(cookie, addr.ipv4_mapped or addr)] = (ifindex, name.split(b"\0", 1)[0].decode())
        return out

    def set_tunnel_source(self, cookie: int, addr, ifindex: int, name: str) -> None:
        if "tunnel_src" not in self.fds:
            return
        raw = addr.packed if addr.version == 6 else b"\0" * 10 + b"\xff\xff" + addr.packed
        libbpf.map_update(self.fds["tunnel_src"], _SRC_KEY.pack(cookie, raw), _SRC.pack(ifindex, 0, name.encode()))

    # node mode: the namespace of the guarded interfaces
    def set_netns_cookie(self, cookie: int) -> None:
        libbpf.map_update(self.fds["scope_netns"], _U32.pack(0), struct.pack("=Q", cookie))

    # node mode: the cgroup subtrees whose local sockets pass the guard
    def set_exempt(self, cgroups: list[tuple[int, int]]) -> None:
        """(cgroup id, level) of each exempted cgroup; the rest of the slots emptied."""
        if len(cgroups) > MAX_EXEMPT:
            raise KsbpfError(f"more than {MAX_EXEMPT} exempted cgroups", f"exempt at most {MAX_EXEMPT} cgroup subtrees")
        self._set_cgroup_slots("exempt", MAX_EXEMPT, cgroups)

    def exempt(self) -> list[tuple[int, int]]:
        return self._cgroup_slots("exempt", MAX_EXEMPT)

    # counters
    def _percpu(self, name: str, index: int) -> list[bytes]:
        """The value of array `name` at `index`, one bytes per possible CPU."""
        ncpu = libbpf.num_possible_cpus()
        stride = (self._value_size[name] + 7) // 8 * 8
        raw = libbpf.map_lookup(self.fds[name], _U32.pack(index), stride * ncpu) or b""
        return [raw[cpu * stride:(cpu + 1) * stride] for cpu in range(len(raw) // stride)]

    def counters(self) -> dict[tuple[Reason, Family], tuple[int, int]]:
        """(packets, bytes) per (reason, family), summed over CPUs."""
        out = {}
        for reason in Reason:
            for family in Family:
                values = [_COUNTER.unpack_from(v) for v in self._percpu("counters", reason * FAMILY_MAX + family)]
                out[(reason, family)] = (sum(p for p, _ in values), sum(b for _, b in values))
        return out

    def event_stats(self) -> tuple[int, int]:
        """(samples sent to the ring buffer, samples suppressed), summed over CPUs
        (struct ksbpf_bucket: tokens, last_ns, sent, suppressed, last_jiffies)."""
        per_cpu = [struct.unpack_from("=QQQQ", v)[2:] for v in self._percpu("bucket", 0)]
        return sum(s for s, _ in per_cpu), sum(x for _, x in per_cpu)

    # cgroup scopes: may the egress program skip the per-packet namespace check (ksbpf_netns_fast)?
    def netns_fast(self) -> tuple[bool, bool]:
        """(allowed by the loader, forbidden by a socket made in another namespace)."""
        if "netns_fast" not in self.fds:
            return False, False
        return tuple(bool(_U32.unpack(libbpf.map_lookup(self.fds["netns_fast"], _U32.pack(k), 4) or b"\0" * 4)[0])
                     for k in (FAST_ALLOWED, FAST_FOREIGN))

    def allow_netns_fast(self, allowed: bool) -> None:
        if "netns_fast" in self.fds:
            libbpf.map_update(self.fds["netns_fast"], _U32.pack(FAST_ALLOWED), _U32.pack(int(allowed)))

    # meta: the scope's policy as the user gave it
    def write_meta(self, meta: dict) -> None:
        blob = json.dumps(meta, separators=(",", ":")).encode()
        if len(blob) >= META_SIZE:
            raise KsbpfError(f"the scope's description is {len(blob)} bytes, over the {META_SIZE} the meta map holds",
                             "use fewer or shorter tunnel names")
        libbpf.map_update(self.fds["meta"], _U32.pack(0), blob.ljust(META_SIZE, b"\0"))

    def read_meta(self) -> dict:
        raw = libbpf.map_lookup(self.fds["meta"], _U32.pack(0), self._value_size["meta"]) or b""
        text = raw.split(b"\0", 1)[0]
        return json.loads(text) if text else {}


@dataclass(frozen=True)
class MapSpec:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


BPF_LD_IMM64 = 0x18
BPF_PSEUDO_MAP_FD = 1
_INSN = struct.Struct("=BBhi")


@dataclass(frozen=True)
class ProgramImage:
    """Compiled (and once verified) programs that can be loaded again with
    fresh maps, without the compiler: each entry point's type and
    instructions, whose map references hold an index into `maps` instead of
    a file descriptor.  Every entry point shares the same maps."""

    progs: dict[str, tuple[int, bytes]]   # entry point -> (program type, instructions)
    maps: tuple[MapSpec, ...]
    license: str

    @staticmethod
    def _relocate(insns: bytes, fd_of) -> bytes:
        """Rewrite the immediate of every map-loading instruction with fd_of(imm)."""
        out = bytearray(insns)
        for off in range(0, len(out), 8):
            code, regs, o, imm = _INSN.unpack_from(out, off)
            if code == BPF_LD_IMM64 and regs >> 4 == BPF_PSEUDO_MAP_FD:
                _INSN.pack_into(out, off, code, regs, o, fd_of(imm))
        return bytes(out)

    @classmethod
    def from_loaded(cls, progs: dict[str, bytes], fds: dict[str, int], license: str) -> "ProgramImage":
        names = [name for name in MAP_NAMES if name in fds]
        index = {fd: names.index(name) for name, fd in fds.items()}
        specs = []
        for name in names:
            i = libbpf.map_info(fds[name])
            specs.append(MapSpec(name, i.type, i.key_size, i.value_size, i.max_entries, i.flags))
        return cls({entry: (ENTRIES[entry], cls._relocate(insns, index.__getitem__))
                    for entry, insns in progs.items()}, tuple(specs), license)

    def to_json(self) -> str:
        return json.dumps({"progs": {e: {"type": t, "insns": i.hex()} for e, (t, i) in self.progs.items()},
                           "license": self.license, "maps": [vars(m) for m in self.maps]})

    @classmethod
    def from_json(cls, text: str) -> "ProgramImage":
        d = json.loads(text)
        return cls({e: (p["type"], bytes.fromhex(p["insns"])) for e, p in d["progs"].items()},
                   tuple(MapSpec(**m) for m in d["maps"]), d["license"])

    def load(self, entries: tuple[str, ...], keep: dict[str, int] | None = None) -> "LoadedProgram":
        """The entry points, loaded with fresh maps -- except those of `keep`
        (name -> fd of a map of the same layout, from the scope being
        replaced), which the new programs share."""
        fds: dict[str, int] = {}
        progs: dict[str, int] = {}
        kept = {}
        btf_fd = None
        try:
            for m in self.maps:
                if keep and m.name in keep and _same_layout(keep[m.name], m):
                    fds[m.name] = kept[m.name] = os.dup(keep[m.name])
                    continue
                btf = None
                if m.type == libbpf.BPF_MAP_TYPE_SK_STORAGE:   # must name its key and value types
                    if btf_fd is None:
                        btf_fd = libbpf.btf_load(libbpf.int_btf(4, m.value_size))
                    btf = (btf_fd, 1, 2)
                fds[m.name] = libbpf.map_create(m.type, m.name, m.key_size, m.value_size, m.max_entries, m.flags,
                                                btf)
            ordered = [fds[m.name] for m in self.maps]
            for entry in entries:
                if entry not in self.progs:
                    continue   # the netfilter entry point, not compiled for this kernel
                prog_type, insns = self.progs[entry]
                progs[entry] = libbpf.prog_load(prog_type, entry, self.license,
                                                self._relocate(insns, ordered.__getitem__),
                                                EXPECTED_ATTACH.get(entry))
        except OSError:
            for fd in [*fds.values(), *progs.values()]:
                os.close(fd)
            raise
        finally:
            if btf_fd is not None:
                os.close(btf_fd)
        return LoadedProgram(progs, ScopeMaps(fds, owned=True), None, tuple(kept))

    def instance(self, entry: str, map_fds: dict[str, int]) -> int:
        """Another instance of one entry point, on existing maps (a scope's pinned
        ones): the kernel refuses the same program twice in one tcx chain, so a
        guard put in front of its own interface's chain again needs a twin."""
        missing = [m.name for m in self.maps if m.name not in map_fds]
        if missing:
            raise KsbpfError(f"the scope's pins lack map(s) {', '.join(missing)} of this ksbpf's program",
                             "attach the scope again with this ksbpf")
        ordered = [map_fds[m.name] for m in self.maps]
        prog_type, insns = self.progs[entry]
        return libbpf.prog_load(prog_type, entry, self.license, self._relocate(insns, ordered.__getitem__))


def _same_layout(fd: int, spec: MapSpec) -> bool:
    i = libbpf.map_info(fd)
    return (i.type, i.key_size, i.value_size, i.max_entries, i.flags) == \
        (spec.type, spec.key_size, spec.value_size, spec.max_entries, spec.flags)


def kept_maps(pin_dir: str) -> dict[str, int]:
    """The maps of a pinned scope that its replacement shares (KEPT_MAPS), by
    fd (the caller closes them); none when the scope has none."""
    out = {}
    for name in KEPT_MAPS:
        try:
            out[name] = libbpf.obj_get(os.path.join(pin_dir, name))
        except OSError:
            continue
    return out


@dataclass
class LoadedProgram:
    """Programs freshly loaded (one per entry point asked for), sharing their
    (empty) maps."""

    progs: dict[str, int]   # entry point -> program fd
    maps: ScopeMaps
    _bcc_object: object  # bcc's BPF object when bcc loaded it (it owns the fds), else None
    kept: tuple[str, ...] = ()   # maps shared with the scope this program replaces

    @property
    def prog_fd(self) -> int:
        """The first entry point's program (the only one for a cgroup scope)."""
        return next(iter(self.progs.values()))

    @property
    def tag(self) -> str:
        return libbpf.prog_info(self.prog_fd).tag

    def pin(self, directory: str) -> None:
        pins.make_private_dirs(directory)   # pins are readable by root only
        for entry, fd in self.progs.items():
            libbpf.obj_pin(fd, os.path.join(directory, PIN_NAMES[entry]))
        for name, fd in self.maps.fds.items():
            libbpf.obj_pin(fd, os.path.join(directory, name))

    def close(self) -> None:
        if self._bcc_object is not None:
            self._bcc_object.cleanup()
        else:
            self.maps.close()
            for fd in self.progs.values():
                os.close(fd)


def cache_dir() -> str | None:
    """Where compiled program images are kept: $KSBPF_CACHE_DIR ("" turns the
    cache off), by default /var/cache/ksbpf."""
    value = os.environ.get("KSBPF_CACHE_DIR", "/var/cache/ksbpf")
    return value or None


def _compiler_identity() -> str:
    """Which bcc would compile, without importing it (importing maps LLVM: ~60 MB)."""
    spec = importlib.util.find_spec(preflight.BCC_MODULE)
    if spec is None or not spec.origin:
        return "no-bcc"
    st = os.stat(spec.origin)
    return f"{os.path.realpath(spec.origin)}:{st.st_size}:{st.st_mtime_ns}"


def _cache_path(cache_dir: str, flags: list[str]) -> str:
    h = hashlib.sha256()
    for name in ("ksbpf.c", "ksbpf.h"):
        with open(os.path.join(ebpf_dir(), name), "rb") as f:
            h.update(f.read())
    h.update("\0".join([*flags, platform.release(), _compiler_identity()]).encode())
    return os.path.join(cache_dir, h.hexdigest()[:32] + ".json")


def image_cached(options: Options, n_endpoints: int = 0, events: EventSettings = EventSettings()) -> bool:
    """Would load() find a compiled image (and so need no compiler)?"""
    cache = cache_dir()
    return bool(cache) and os.path.exists(_cache_path(cache, cflags(options, n_endpoints, events)))


def bcc_map_fds(b) -> dict[str, int]:
    """The maps of MAP_NAMES a bcc-compiled program has (socket storage is not
    one bcc's tables can open: ask its module for the fd)."""
    import bcc
    fds = {}
    for name in MAP_NAMES:
        fd = bcc.lib.bpf_table_fd(b.module, name.encode())
        if fd >= 0:
            fds[name] = fd
    return fds


def load(options: Options, n_endpoints: int = 0, events: EventSettings = EventSettings(),
         cache: str | None = "default", entries: tuple[str, ...] = (ENTRY_CGROUP,),
         keep: dict[str, int] | None = None) -> LoadedProgram:
    """The programs of these entry points for these options, with fresh maps
    (but those of `keep`: see ProgramImage.load).  Compiled with bcc the first
    time (every entry point at once); then loaded from the image cached in the
    cache directory (keyed by the sources, the flags, the kernel and bcc),
    without the compiler -- bcc is not even imported then.  cache: a
    directory, None for no cache, "default" for cache_dir()."""
    flags = cflags(options, n_endpoints, events)
    cache = cache_dir() if cache == "default" else cache
    cached = _cache_path(cache, flags) if cache else None
    if cached and os.path.exists(cached):
        try:
            with open(cached) as f:
                return ProgramImage.from_json(f.read()).load(entries, keep)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable, or refused by this kernel: compile afresh below
    bcc = preflight.require_compiler()
    try:
        b = bcc.BPF(src_file=source_path().encode(), cflags=flags)
        compiled = compiled_entries(flags)
        loaded = {entry: b.load_func(entry.encode(), ENTRIES[entry], attach_type=EXPECTED_ATTACH.get(entry, -1)).fd
                  for entry in compiled}
    except Exception as exc:  # bcc raises bare Exception on compile/verifier errors
        raise KsbpfError(f"the BPF program did not compile or load: {exc}",
                         "check `make setup` output and the kernel log (dmesg); the messages above come from bcc") from None
    fds = bcc_map_fds(b)
    image = None
    if cached or keep:
        image = ProgramImage.from_loaded({e: b.dump_func(e.encode()) for e in compiled}, fds,
                                         bcc.lib.bpf_module_license(b.module).decode())
    if cached:
        try:
            os.makedirs(cache, mode=0o700, exist_ok=True)
            tmp = f"{cached}.{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(image.to_json())
            os.replace(tmp, cached)
        except OSError:
            pass  # no cache: the next load compiles again
    if keep and any(name in fds for name in keep):
        b.cleanup()
        return image.load(entries, keep)   # bcc made fresh maps: load again, sharing the kept ones
    return LoadedProgram({e: loaded[e] for e in entries if e in loaded}, ScopeMaps(fds, owned=False), b)


def image(options: Options, n_endpoints: int = 0, events: EventSettings = EventSettings(),
          cache: str | None = "default") -> ProgramImage:
    """The compiled programs for these options as an image: the cached one,
    else compiled now with bcc (and cached)."""
    cache = cache_dir() if cache == "default" else cache
    cached = _cache_path(cache, cflags(options, n_endpoints, events)) if cache else None
    if cached and os.path.exists(cached):
        try:
            with open(cached) as f:
                return ProgramImage.from_json(f.read())
        except (OSError, ValueError, KeyError, TypeError):
            pass
    compiled = compiled_entries(cflags(options, n_endpoints, events))
    loaded = load(options, n_endpoints, events, cache=None, entries=compiled)
    try:
        b = loaded._bcc_object
        return ProgramImage.from_loaded({e: b.dump_func(e.encode()) for e in compiled}, loaded.maps.fds,
                                        preflight.require_compiler().lib.bpf_module_license(b.module).decode())
    finally:
        loaded.close()
