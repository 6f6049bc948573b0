"""The policy model: what a protected scope allows, parsed and validated.

A Policy says which tunnel interfaces (looked up in one network namespace)
may carry the scope's traffic, which VPN endpoints (address + port +
protocol) may be reached outside them, and which opt-in exceptions apply.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import socket
from dataclasses import asdict, dataclass, field, replace
from typing import Union

from ksbpf.errors import KsbpfError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
MAX_CIDRS = 256  # entries of each LPM trie (cidrs4, cidrs6)
PROTOCOLS = {"udp": socket.IPPROTO_UDP, "tcp": socket.IPPROTO_TCP}
ENDPOINT_PORTS = 8  # port/protocol pairs per endpoint address (KSBPF_EP_PORTS)
IFNAMSIZ = 16

# --allow-lan: a FIXED list, never "whatever the current network says is
# on-link" (TunnelCrack LocalNet hands out a public range as the LAN).
# Compiled into the program (ksbpf_lan4/ksbpf_lan6); tests check they agree.
LAN_RANGES = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
    "224.0.0.0/24",        # IPv4 link-local multicast
    "255.255.255.255/32",  # local broadcast
    "fe80::/10", "fc00::/7",
    "ff02::/16",           # IPv6 link-local multicast
))


@dataclass(frozen=True)
class Endpoint:
    """A VPN server: traffic to exactly this address, port and protocol may
    leave outside the tunnel (it carries the tunnel itself)."""

    address: IPAddress
    port: int
    proto: str  # "udp" | "tcp"

    def sort_key(self) -> tuple:
        return (self.address.version, self.address.packed, self.port, self.proto)

    @property
    def proto_number(self) -> int:
        return PROTOCOLS[self.proto]

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}/{self.proto}"

    @classmethod
    def parse(cls, text: str) -> "Endpoint":
        """ADDR:PORT/udp|tcp, IPv6 as [ADDR]:PORT/udp."""
        form = "write it as ADDR:PORT/udp (IPv6: [ADDR]:PORT/udp)"
        raw = text.strip()
        if "/" not in raw:
            raise KsbpfError(f"endpoint {text!r} has no protocol", f"add /udp or /tcp: {form}")
        hostport, proto = raw.rsplit("/", 1)
        proto = proto.lower()
        if proto not in PROTOCOLS:
            raise KsbpfError(f"endpoint {text!r}: unknown protocol {proto!r}", "use udp or tcp")
        if not hostport.startswith("[") and hostport.count(":") > 1:
            raise KsbpfError(f"endpoint {text!r}: an IPv6 address needs brackets", form)
        m = re.fullmatch(r"\[([^\]]+)\](?::(.*))?", hostport) or re.fullmatch(r"([^:\[\]]+)(?::(.*))?", hostport)
        if not m:
            raise KsbpfError(f"endpoint {text!r} is malformed", form)
        host, port_text = m.group(1), m.group(2)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise KsbpfError(f"endpoint {text!r}: {host!r} is not an IP address",
                             "give the VPN server's IP address (names are not resolved: a DNS answer could redirect the exception)") from None
        if port_text is None or port_text == "":
            raise KsbpfError(f"endpoint {text!r} has no port", form)
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise KsbpfError(f"endpoint {text!r}: port {port_text!r} is not in 1-65535", form)
        if address.is_unspecified or address.is_multicast:
            raise KsbpfError(f"endpoint {text!r}: {address} cannot be a VPN server", "give the server's unicast address")
        return cls(address, int(port_text), proto)


@dataclass(frozen=True)
class AnyEndpoint:
    """A wildcard endpoint (`*:51820/udp`): any address on this port and
    protocol -- for the VPN client only (--vpn-mark / --vpn-cgroup), so that
    it may switch servers while nobody else reaches any."""

    port: int
    proto: str

    def sort_key(self) -> tuple:
        return (self.port, self.proto)

    @property
    def proto_number(self) -> int:
        return PROTOCOLS[self.proto]

    def __str__(self) -> str:
        return f"*:{self.port}/{self.proto}"

    @classmethod
    def parse(cls, text: str) -> "AnyEndpoint":
        """*:PORT/udp|tcp"""
        form = "write it as *:PORT/udp (any address on that port and protocol)"
        m = re.fullmatch(r"\*:(\d+)/(\w+)", text.strip())
        if not m:
            raise KsbpfError(f"endpoint {text!r} is malformed", form)
        port, proto = int(m.group(1)), m.group(2).lower()
        if proto not in PROTOCOLS:
            raise KsbpfError(f"endpoint {text!r}: unknown protocol {proto!r}", "use udp or tcp")
        if not 1 <= port <= 65535:
            raise KsbpfError(f"endpoint {text!r}: port {port} is not in 1-65535", form)
        return cls(port, proto)


def parse_endpoint(text: str) -> "Endpoint | AnyEndpoint":
    """ADDR:PORT/proto, or *:PORT/proto (any address: the VPN client's only)."""
    return AnyEndpoint.parse(text) if text.strip().startswith("*") else Endpoint.parse(text)


MAX_EP_ANY = 64   # KSBPF_MAX_EP_ANY
MAX_VPN_CGROUPS = 8   # KSBPF_MAX_VPN_CGROUPS


def parse_mark(text: str) -> tuple[int, int]:
    """--vpn-mark MARK[/MASK] (decimal or 0x hex, as `wg set ... fwmark` and
    `ip rule ... fwmark` take them) -> (mark, mask)."""
    form = "write it as MARK or MARK/MASK, e.g. 51820 or 0xca6c/0xffff"
    raw = str(text).strip()
    mark_text, _, mask_text = raw.partition("/")
    try:
        mark = int(mark_text, 0)
        mask = int(mask_text, 0) if mask_text else 0xFFFFFFFF
    except ValueError:
        raise KsbpfError(f"vpn mark {text!r} is not a number", form) from None
    if not (0 <= mark <= 0xFFFFFFFF and 0 <= mask <= 0xFFFFFFFF):
        raise KsbpfError(f"vpn mark {text!r} is not a 32-bit value", form)
    if mark & ~mask:
        raise KsbpfError(f"vpn mark {text!r} has bits outside its mask: no packet could carry it", form)
    if mark == 0:
        raise KsbpfError(f"vpn mark {text!r} is zero: every unmarked packet carries it",
                         "give the mark the VPN client sets (wg set IFACE fwmark M, openvpn --mark M)")
    return mark, mask


def format_mark(mark: int, mask: int) -> str:
    return f"{mark:#x}" if mask == 0xFFFFFFFF else f"{mark:#x}/{mask:#x}"


AUTO = "auto"


def parse_endpoint_spec(text: str) -> "Endpoint | str":
    """An endpoint, or what to follow: `auto` (the endpoints the tunnels use
    now, kept in step by the daemon) or `auto:PATH` (an OpenVPN management
    socket, for a client whose socket is not /run/openvpn/TUNNEL.sock)."""
    raw = text.strip()
    if raw == AUTO:
        return AUTO
    if raw.startswith(AUTO + ":"):
        path = raw[len(AUTO) + 1:]
        if not path.startswith("/") or any(c.isspace() for c in path):
            raise KsbpfError(f"endpoint {text!r}: {path!r} is not an absolute socket path",
                             "write auto:/run/openvpn/NAME.sock (an OpenVPN `management PATH unix` socket)")
        return path
    return parse_endpoint(raw)


def split_endpoint_specs(texts) -> tuple[tuple["Endpoint | AnyEndpoint", ...], tuple[str, ...]]:
    """--endpoint values -> (fixed endpoints, what to follow)."""
    fixed, follow = [], []
    for text in texts:
        spec = parse_endpoint_spec(text)
        (follow if isinstance(spec, str) else fixed).append(spec)
    return tuple(fixed), tuple(dict.fromkeys(follow))


@dataclass(frozen=True)
class EventSettings:
    """The stream of blocked packets: at most `rate` samples a second (0: off),
    `burst` at once.  Enforced in the kernel by a token bucket per CPU, each
    with an equal share; samples over the limit are counted, not sent."""

    rate: float = 100.0
    burst: int = 20

    def __post_init__(self) -> None:
        if not (0 <= self.rate <= 1_000_000) or not (1 <= self.burst <= 1_000_000):
            raise KsbpfError(f"event rate {self.rate} / burst {self.burst} out of range",
                             "give a rate of 0 (off) to 1000000 per second and a burst of 1 to 1000000")


@dataclass(frozen=True)
class Options:
    """The compile-time switches of the program (bpf.cflags).  allow_cidrs is
    not the user's to set: a Policy sets it when it has allowed CIDRs, so a
    program without them never pays for their lookups."""

    allow_lan: bool = False
    allow_lan_dns: bool = False
    allow_dhcp: bool = False
    allow_cidrs: bool = False
    vpn_mark: bool = False     # set by a Policy with a vpn_mark
    vpn_cgroup: bool = False   # set by a Policy with vpn_cgroups
    dns: bool = False   # --dns: set by a Policy with resolvers (KSBPF_OPT_DNS)

    def to_dict(self) -> dict:
        """The user's options (allow_cidrs, vpn_mark, vpn_cgroup and dns follow the policy)."""
        d = asdict(self)
        for derived in ("allow_cidrs", "vpn_mark", "vpn_cgroup", "dns"):
            del d[derived]
        return d


# Link kinds trusted as tunnels: kernel WireGuard, and tun devices (wireguard-go,
# OpenVPN, ...).  An interface of another kind that takes a tunnel's name (a
# veth renamed "wg0") is an impostor and stays blocked.
DEFAULT_TUNNEL_KINDS = ("wireguard", "tun")


@dataclass(frozen=True)
class Policy:
    tunnels: tuple[str, ...]
    endpoints: tuple[Endpoint, ...] = ()
    netns: str = ""  # where tunnel names are looked up: "" = the caller's namespace
    options: Options = field(default_factory=Options)
    tunnel_kinds: tuple[str, ...] = DEFAULT_TUNNEL_KINDS
    events: EventSettings = field(default_factory=EventSettings)
    # destinations allowed outside the tunnel, DNS included (Kubernetes: the
    # cluster's service and pod ranges); counted as `lan`
    allow_cidrs: tuple[IPNetwork, ...] = ()
    # cgroup scopes: a device program refuses /dev/net/tun to the scope's processes
    # (ksbpf/kernel/devices.py); off by default: a VPN client in the scope may need it
    deny_tun: bool = False
    # --endpoint auto: "auto" (the tunnels' own endpoints) and OpenVPN management
    # sockets; the endpoints read from them are kept in the maps beside the fixed ones
    follow: tuple[str, ...] = ()
    # --vpn-mark MARK[/MASK]: (mark, mask); the endpoint exception takes only the VPN client's marked packets
    vpn_mark: tuple[int, int] | None = None
    # --vpn-cgroup PATH: ... or only the packets of local sockets of these cgroup subtrees
    vpn_cgroups: tuple[str, ...] = ()
    # wildcard endpoints (*:PORT/proto): any address, for the VPN client only (given among `endpoints`)
    any_endpoints: tuple[AnyEndpoint, ...] = ()
    # --dns: the VPN's resolvers; DNS (53, 853) of the scope goes to them through the tunnel, and nowhere else
    dns: tuple[IPAddress, ...] = ()
    # dns = ["auto"] in the daemon: the resolvers are read from the tunnel and kept in step (dns holds the
    # current ones, dns_fixed the ones given as addresses beside `auto`); DNS is filtered even while none is known
    dns_auto: bool = False
    dns_fixed: tuple[IPAddress, ...] = ()

    def __post_init__(self) -> None:
        self._vpn_post_init()
        object.__setattr__(self, "follow", tuple(dict.fromkeys(self.follow)))
        object.__setattr__(self, "dns", check_resolvers(self.dns))
        object.__setattr__(self, "dns_fixed", check_resolvers(self.dns_fixed) if self.dns_auto else ())
        wants_dns = bool(self.dns) or self.dns_auto
        if self.options.dns != wants_dns:   # the program parses every packet only with resolvers (or auto)
            object.__setattr__(self, "options", replace(self.options, dns=wants_dns))
        if wants_dns and self.options.allow_lan_dns:
            raise KsbpfError("--allow-lan-dns and --dns contradict: with --dns, DNS goes only to the VPN's resolvers",
                             "drop --allow-lan-dns (or give the LAN resolver as --dns if it is reached through the tunnel)")
        for spec in self.follow:
            if spec != AUTO and not spec.startswith("/"):
                raise KsbpfError(f"cannot follow {spec!r}", "give auto, or auto:/run/openvpn/NAME.sock")
        if self.follow and self.netns == "each":
            raise KsbpfError("endpoint auto is not followed across the namespaces of netns each",
                             "give the endpoints as ADDR:PORT/udp, or name the tunnel's namespace")
        if not self.tunnels:
            raise KsbpfError("no tunnel interface given", "name the tunnel with --tunnel NAME (e.g. --tunnel wg0)")
        for name in self.tunnels:
            if not name or len(name) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name) or name in (".", ".."):
                raise KsbpfError(f"{name!r} is not a valid interface name",
                                 "give a name of 1-15 characters without '/' or spaces, as `ip link` shows it")
        if len(set(self.tunnels)) != len(self.tunnels):
            raise KsbpfError("the same tunnel is named twice", "name each tunnel once")
        if not self.tunnel_kinds or not all(k and k.isprintable() and " " not in k for k in self.tunnel_kinds):
            raise KsbpfError(f"tunnel kinds {list(self.tunnel_kinds)!r} are not valid",
                             "give link kinds as `ip -d link` shows them, e.g. wireguard or tun")
        object.__setattr__(self, "tunnel_kinds", tuple(sorted(set(self.tunnel_kinds))))
        if self.options.allow_lan_dns and not self.options.allow_lan:
            raise KsbpfError("--allow-lan-dns only widens --allow-lan", "add --allow-lan, or drop --allow-lan-dns")
        object.__setattr__(self, "endpoints", tuple(sorted(set(self.endpoints), key=Endpoint.sort_key)))
        per_address: dict = {}
        for ep in self.endpoints:
            per_address[ep.address] = per_address.get(ep.address, 0) + 1
            if per_address[ep.address] > ENDPOINT_PORTS:
                raise KsbpfError(f"more than {ENDPOINT_PORTS} endpoints on {ep.address}",
                                 f"give at most {ENDPOINT_PORTS} port/protocol pairs per address")
        cidrs = tuple(sorted(set(self.allow_cidrs), key=lambda n: (n.version, n.network_address.packed, n.prefixlen)))
        object.__setattr__(self, "allow_cidrs", cidrs)
        if self.options.allow_cidrs != bool(cidrs):   # the tries are looked up only when there are CIDRs
            object.__setattr__(self, "options", replace(self.options, allow_cidrs=bool(cidrs)))
        for net in cidrs:
            if net.prefixlen == 0:
                raise KsbpfError(f"allowed CIDR {net} is every address: it would open everything outside the tunnel",
                                 "give the cluster's service and pod ranges, e.g. 10.96.0.0/12")
        if max(sum(1 for n in cidrs if n.version == v) for v in (4, 6)) > MAX_CIDRS:
            raise KsbpfError(f"more than {MAX_CIDRS} allowed CIDRs of one address family", "merge them into fewer ranges")

    def _vpn_post_init(self) -> None:
        """The VPN client's identity (--vpn-mark, --vpn-cgroup) and the wildcard endpoints only it may use."""
        wild = tuple(e for e in self.endpoints if isinstance(e, AnyEndpoint)) + tuple(self.any_endpoints)
        object.__setattr__(self, "endpoints", tuple(e for e in self.endpoints if not isinstance(e, AnyEndpoint)))
        object.__setattr__(self, "any_endpoints", tuple(sorted(set(wild), key=AnyEndpoint.sort_key)))
        if self.vpn_mark is not None:
            mark = self.vpn_mark
            object.__setattr__(self, "vpn_mark", parse_mark(mark) if isinstance(mark, str)
                               else parse_mark(f"{mark[0]}/{mark[1]}"))
        paths = tuple(dict.fromkeys(p.rstrip("/") or "/" for p in self.vpn_cgroups))
        if any(not p.startswith("/") for p in paths):
            raise KsbpfError("a vpn cgroup must be an absolute path",
                             "give the VPN client's cgroup, e.g. /sys/fs/cgroup/system.slice/openvpn.service")
        if len(paths) > MAX_VPN_CGROUPS:
            raise KsbpfError(f"{len(paths)} vpn cgroups, more than {MAX_VPN_CGROUPS}",
                             f"give at most {MAX_VPN_CGROUPS} (a parent covers its children)")
        object.__setattr__(self, "vpn_cgroups", paths)
        if self.any_endpoints and self.vpn_mark is None and not paths:
            raise KsbpfError(f"endpoint {self.any_endpoints[0]} names every address: any process could reach "
                             f"any server on that port outside the tunnel",
                             "add --vpn-mark MARK or --vpn-cgroup PATH so that only the VPN client may, "
                             "or give the server's address")
        if len(self.any_endpoints) > MAX_EP_ANY:
            raise KsbpfError(f"more than {MAX_EP_ANY} wildcard endpoints", f"give at most {MAX_EP_ANY}")
        flags = {"vpn_mark": self.vpn_mark is not None, "vpn_cgroup": bool(paths)}
        if any(getattr(self.options, k) != v for k, v in flags.items()):
            object.__setattr__(self, "options", replace(self.options, **flags))

    def vpn_dict(self) -> dict:
        """The VPN client's identity as `status --json` and to_dict() show it."""
        return {**({"vpn_mark": format_mark(*self.vpn_mark)} if self.vpn_mark else {}),
                **({"vpn_cgroups": list(self.vpn_cgroups)} if self.vpn_cgroups else {}),
                **({"any_endpoints": [str(e) for e in self.any_endpoints]} if self.any_endpoints else {})}

    def to_dict(self) -> dict:
        return {
            "tunnels": list(self.tunnels),
            "endpoints": [str(e) for e in self.endpoints],
            "netns": self.netns,
            "options": self.options.to_dict(),
            "tunnel_kinds": list(self.tunnel_kinds),
            "events": asdict(self.events),
            **({"allow_cidrs": [str(n) for n in self.allow_cidrs]} if self.allow_cidrs else {}),
            **({"deny_tun": True} if self.deny_tun else {}),
            **({"follow": list(self.follow)} if self.follow else {}),
            **self.vpn_dict(),
            **({"dns": [str(a) for a in self.dns]} if self.dns else {}),
            **({"dns_auto": True, "dns_fixed": [str(a) for a in self.dns_fixed]} if self.dns_auto else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Policy":
        """The inverse of to_dict()."""
        try:
            options, events = Options(**d.get("options", {})), EventSettings(**d.get("events", {}))
        except TypeError as exc:   # a field this version does not know
            raise KsbpfError(f"a scope written by another ksbpf version ({exc})",
                             "use the ksbpf that attached it, or attach it again with this one") from None
        return cls(tuple(d["tunnels"]), tuple(Endpoint.parse(e) for e in d.get("endpoints", ())),
                   d.get("netns", ""), options,
                   tuple(d.get("tunnel_kinds", DEFAULT_TUNNEL_KINDS)), events,
                   tuple(parse_cidr(n) for n in d.get("allow_cidrs", ())), bool(d.get("deny_tun", False)),
                   tuple(d.get("follow", ())), d.get("vpn_mark"), tuple(d.get("vpn_cgroups", ())),
                   tuple(AnyEndpoint.parse(e) for e in d.get("any_endpoints", ())),
                   tuple(parse_resolver(a) for a in d.get("dns", ())), bool(d.get("dns_auto", False)),
                   tuple(parse_resolver(a) for a in d.get("dns_fixed", ())))

    def endpoint_specs(self) -> list[str]:
        """The endpoints as the user gives them: fixed ones, `auto`, `auto:PATH`."""
        return [str(e) for e in self.endpoints] + [str(e) for e in self.any_endpoints] + [AUTO if f == AUTO else f"{AUTO}:{f}" for f in self.follow]

    def same_but_followed(self, current: "Policy") -> bool:
        """Is `current` (read back from a scope's pins, whose maps hold the
        followed endpoints too) this policy?  With nothing to follow: equal.
        dns = ["auto"]: the resolvers followed now may differ (the daemon keeps them in step)."""
        import dataclasses
        if self.dns_auto and current.dns_auto and current.dns != self.dns:
            current = dataclasses.replace(current, dns=self.dns)
        if not self.follow:
            return current == self
        return (set(self.endpoints) <= set(current.endpoints)
                and dataclasses.replace(current, endpoints=self.endpoints) == self)

    def trusts(self, name: str, kind: str | None) -> bool:
        """Is an interface called `name` of link kind `kind` one of this policy's tunnels?"""
        return name in self.tunnels and kind in self.tunnel_kinds


# Node mode: interfaces that lead only to containers and VMs on this machine
# (their traffic leaves the machine, if at all, through a guarded uplink,
# where it is judged).  Docker (docker0, br-*, veth*), Podman (podman*,
# cni-podman*, veth*), libvirt (virbr*, vnet*), CNI plugins (cni*, cbr0,
# flannel*, cali*, vxlan.calico, tunl0, weave, kube-bridge), Cilium (cilium_*,
# lxc*), LXC/LXD (lxcbr*, lxdbr*).
DEFAULT_INTERNAL = ("docker*", "br-*", "veth*", "podman*", "cni*", "cbr0", "virbr*", "vnet*",
                    "flannel*", "cali*", "vxlan.calico", "tunl0", "weave", "kube-bridge",
                    "cilium_*", "lxc*", "lxdbr*")
TC_MODES = ("auto", "tcx", "clsact")
MAX_EXEMPT = 8  # KSBPF_MAX_EXEMPT


@dataclass(frozen=True)
class NodePolicy:
    """Node mode: every packet that leaves the namespace (policy.netns)
    through an interface that is not loopback, not one of the policy's
    tunnels and not internal is decided by `policy` -- forwarded container
    and VM traffic included.  Local sockets of the exempted cgroup subtrees
    pass (a management plane)."""

    policy: Policy
    internal: tuple[str, ...] = DEFAULT_INTERNAL   # interface name globs (fnmatch)
    exempt_cgroups: tuple[str, ...] = ()           # cgroup v2 directories
    tc_mode: str = "auto"                          # "auto" (tcx where the kernel has it), "tcx", "clsact"

    def __post_init__(self) -> None:
        for glob in self.internal:
            if not glob or len(glob) > 64 or any(c.isspace() for c in glob) or "/" in glob:
                raise KsbpfError(f"{glob!r} is not an interface name pattern",
                                 "give a name or a shell pattern such as 'docker*' (no spaces or '/')")
        object.__setattr__(self, "internal", tuple(dict.fromkeys(self.internal)))
        paths = tuple(dict.fromkeys(p.rstrip("/") or "/" for p in self.exempt_cgroups))
        if len(paths) > MAX_EXEMPT:
            raise KsbpfError(f"{len(paths)} exempted cgroups, more than {MAX_EXEMPT}",
                             f"exempt at most {MAX_EXEMPT} cgroup subtrees (a parent covers its children)")
        if any(not p.startswith("/") for p in paths):
            raise KsbpfError("an exempted cgroup must be an absolute path", "give e.g. /sys/fs/cgroup/system.slice/ssh.service")
        object.__setattr__(self, "exempt_cgroups", paths)
        if self.tc_mode not in TC_MODES:
            raise KsbpfError(f"tc mode {self.tc_mode!r} is unknown", f"use one of {', '.join(TC_MODES)}")

    def is_internal(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, glob) for glob in self.internal)

    def role(self, name: str, kind: str | None, ifindex: int) -> str:
        """What node mode does with an interface: "loopback" and "tunnel" are
        let through untouched, "internal" too (it leads to local containers
        and VMs), everything else is "guarded"."""
        if ifindex == 1:
            return "loopback"
        if self.policy.trusts(name, kind):
            return "tunnel"
        if self.is_internal(name):
            return "internal"
        return "guarded"

    def to_dict(self) -> dict:
        return {**self.policy.to_dict(), "internal": list(self.internal),
                "exempt_cgroups": list(self.exempt_cgroups), "tc_mode": self.tc_mode}

    @classmethod
    def from_dict(cls, d: dict) -> "NodePolicy":
        return cls(Policy.from_dict(d), tuple(d.get("internal", DEFAULT_INTERNAL)),
                   tuple(d.get("exempt_cgroups", ())), d.get("tc_mode", "auto"))


def parse_cidr(text: str) -> IPNetwork:
    """An address range such as 10.96.0.0/12 or fd00:10:96::/112 (host bits must be zero)."""
    try:
        return ipaddress.ip_network(text.strip())
    except ValueError as exc:
        raise KsbpfError(f"{text!r} is not an address range: {exc}",
                         "write it as ADDRESS/PREFIX with the host bits zero, e.g. 10.96.0.0/12") from None


MAX_DNS = 16  # resolvers of each address family (KSBPF_MAX_DNS)


def parse_resolver(text: str) -> IPAddress:
    """A resolver's IP address (names are not resolved: DNS would decide where DNS goes)."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        raise KsbpfError(f"resolver {text!r} is not an IP address",
                         "give the VPN's resolver as an address, e.g. --dns 10.64.0.1, or --dns auto") from None
    return address


def check_resolvers(addresses) -> tuple[IPAddress, ...]:
    """The resolvers in the user's order (the first of each family is where
    other DNS is redirected), once each; unicast only, at most MAX_DNS per family."""
    out = tuple(dict.fromkeys(addresses))
    for a in out:
        if a.is_unspecified or a.is_multicast:
            raise KsbpfError(f"resolver {a} cannot be a DNS server", "give the VPN resolver's unicast address")
    for version in (4, 6):
        if sum(1 for a in out if a.version == version) > MAX_DNS:
            raise KsbpfError(f"more than {MAX_DNS} IPv{version} resolvers", f"give at most {MAX_DNS} of each family")
    return out
