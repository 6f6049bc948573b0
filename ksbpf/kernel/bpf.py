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
from ksbpf.kernel import libbpf, preflight
from ksbpf.policy import PROTOCOLS, Endpoint, EventSettings, Options
from ksbpf.reasons import FAMILY_MAX, Family, Reason

PROG_NAME = "ksbpf_cg_egress"  # the entry point; the kernel shows it as the program's name
MAP_NAMES = ("tunnels", "tunnel_ifindex", "endpoints4", "endpoints6", "counters", "meta", "events", "bucket",
             "cidrs4", "cidrs6")
IFINDEX_FILTER = 4096  # KSBPF_IFINDEX_FILTER
META_SIZE = 8192
EP_PORTS = 8  # (port, protocol) pairs per endpoint address
MAX_TUNNELS = 64

_TUNNEL_KEY = struct.Struct("=QII")   # netns_cookie, ifindex, pad
_U32 = struct.Struct("=I")
_COUNTER = struct.Struct("=QQ")       # packets, bytes
_PROTO_NAMES = {v: k for k, v in PROTOCOLS.items()}


def ebpf_dir() -> str:
    """Absolute path of the shipped BPF sources (package data ksbpf.ebpf)."""
    return str(importlib.resources.files("ksbpf.ebpf"))


def source_path() -> str:
    return os.path.join(ebpf_dir(), "ksbpf.c")


def cflags(options: Options, n_endpoints: int, events: EventSettings = EventSettings()) -> list[str]:
    flags = [f"-I{ebpf_dir()}",
             f"-DKSBPF_MAX_TUNNELS={MAX_TUNNELS}",
             f"-DKSBPF_MAX_ENDPOINTS={max(64, n_endpoints)}"]
    if options.allow_lan:
        flags.append("-DKSBPF_OPT_LAN")
    if options.allow_lan_dns:
        flags.append("-DKSBPF_OPT_LAN_DNS")
    if options.allow_dhcp:
        flags.append("-DKSBPF_OPT_DHCP")
    if events.rate > 0:
        # each CPU gets an equal share of the rate and of the burst
        ncpu = libbpf.num_possible_cpus()
        flags += [f"-DKSBPF_EVENTS_INTERVAL_NS={max(1, round(ncpu * 1e9 / events.rate))}ULL",
                  f"-DKSBPF_EVENTS_BURST={max(1, -(-events.burst // ncpu))}ULL"]
    return flags


# --- key/value codecs -----------------------------------------------------------

def tunnel_key(netns_cookie: int, ifindex: int) -> bytes:
    return _TUNNEL_KEY.pack(netns_cookie, ifindex, 0)


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
        missing = set(MAP_NAMES) - set(fds)
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
                fds[name] = libbpf.obj_get(os.path.join(directory, name))
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
    def _filter_ifindex(self, ifindex: int) -> None:
        """tunnel_ifindex[ifindex] = how many tunnels have that ifindex (in any namespace)."""
        if ifindex < IFINDEX_FILTER:
            n = sum(1 for t in self.tunnels() if t.ifindex == ifindex)
            libbpf.map_update(self.fds["tunnel_ifindex"], _U32.pack(ifindex), _U32.pack(n))

    def add_tunnel(self, netns_cookie: int, ifindex: int, index: int) -> None:
        libbpf.map_update(self.fds["tunnels"], tunnel_key(netns_cookie, ifindex), _U32.pack(index))
        self._filter_ifindex(ifindex)   # after: the filter never says "tunnel" before the hash does

    def remove_tunnel(self, netns_cookie: int, ifindex: int) -> None:
        libbpf.map_delete(self.fds["tunnels"], tunnel_key(netns_cookie, ifindex))
        self._filter_ifindex(ifindex)

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
        libbpf.map_update(self.fds[name], key, _endpoint_value(ports + [(ep.port, ep.proto_number)]))

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
        (struct ksbpf_bucket: tokens, last_ns, sent, suppressed)."""
        per_cpu = [struct.unpack_from("=QQQQ", v)[2:] for v in self._percpu("bucket", 0)]
        return sum(s for s, _ in per_cpu), sum(x for _, x in per_cpu)

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
    """A compiled (and once verified) program that can be loaded again with
    fresh maps, without the compiler: its instructions, whose map references
    hold an index into `maps` instead of a file descriptor."""

    insns: bytes
    maps: tuple[MapSpec, ...]
    license: str

    @classmethod
    def from_loaded(cls, insns: bytes, fds: dict[str, int], license: str) -> "ProgramImage":
        names = list(MAP_NAMES)
        index = {fd: names.index(name) for name, fd in fds.items()}
        out = bytearray(insns)
        for off in range(0, len(out), 8):
            code, regs, o, imm = _INSN.unpack_from(out, off)
            if code == BPF_LD_IMM64 and regs >> 4 == BPF_PSEUDO_MAP_FD:
                _INSN.pack_into(out, off, code, regs, o, index[imm])
        specs = []
        for name in names:
            i = libbpf.map_info(fds[name])
            specs.append(MapSpec(name, i.type, i.key_size, i.value_size, i.max_entries, i.flags))
        return cls(bytes(out), tuple(specs), license)

    def to_json(self) -> str:
        return json.dumps({"insns": self.insns.hex(), "license": self.license,
                           "maps": [vars(m) for m in self.maps]})

    @classmethod
    def from_json(cls, text: str) -> "ProgramImage":
        d = json.loads(text)
        return cls(bytes.fromhex(d["insns"]), tuple(MapSpec(**m) for m in d["maps"]), d["license"])

    def load(self) -> "LoadedProgram":
        fds: dict[str, int] = {}
        try:
            for m in self.maps:
                fds[m.name] = libbpf.map_create(m.type, m.name, m.key_size, m.value_size, m.max_entries, m.flags)
            ordered = [fds[m.name] for m in self.maps]
            insns = bytearray(self.insns)
            for off in range(0, len(insns), 8):
                code, regs, o, imm = _INSN.unpack_from(insns, off)
                if code == BPF_LD_IMM64 and regs >> 4 == BPF_PSEUDO_MAP_FD:
                    _INSN.pack_into(insns, off, code, regs, o, ordered[imm])
            prog_fd = libbpf.prog_load(libbpf.BPF_PROG_TYPE_CGROUP_SKB, PROG_NAME, self.license, bytes(insns))
        except OSError:
            for fd in fds.values():
                os.close(fd)
            raise
        return LoadedProgram(prog_fd, ScopeMaps(fds, owned=True), libbpf.prog_info(prog_fd).tag, None)


@dataclass
class LoadedProgram:
    """A program freshly loaded, with its (empty) maps."""

    prog_fd: int
    maps: ScopeMaps
    tag: str
    _bcc_object: object  # bcc's BPF object when bcc loaded it (it owns the fds), else None

    def pin(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        libbpf.obj_pin(self.prog_fd, os.path.join(directory, "prog"))
        for name, fd in self.maps.fds.items():
            libbpf.obj_pin(fd, os.path.join(directory, name))

    def close(self) -> None:
        if self._bcc_object is not None:
            self._bcc_object.cleanup()
        else:
            self.maps.close()
            os.close(self.prog_fd)


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


def load(options: Options, n_endpoints: int = 0, events: EventSettings = EventSettings(),
         cache: str | None = "default") -> LoadedProgram:
    """The cgroup_skb program for these options, with fresh maps.  Compiled
    with bcc the first time; then loaded from the image cached in the cache
    directory (keyed by the sources, the flags, the kernel and bcc), without
    the compiler -- bcc is not even imported then.
    cache: a directory, None for no cache, "default" for cache_dir()."""
    flags = cflags(options, n_endpoints, events)
    cache = cache_dir() if cache == "default" else cache
    cached = _cache_path(cache, flags) if cache else None
    if cached and os.path.exists(cached):
        try:
            with open(cached) as f:
                return ProgramImage.from_json(f.read()).load()
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable, or refused by this kernel: compile afresh below
    bcc = preflight.require_compiler()
    try:
        b = bcc.BPF(src_file=source_path().encode(), cflags=flags)
        fn = b.load_func(PROG_NAME.encode(), bcc.BPF.CGROUP_SKB)
    except Exception as exc:  # bcc raises bare Exception on compile/verifier errors
        raise KsbpfError(f"the BPF program did not compile or load: {exc}",
                         "check `make setup` output and the kernel log (dmesg); the messages above come from bcc") from None
    fds = {name: b[name.encode()].map_fd for name in MAP_NAMES}
    if cached:
        try:
            image = ProgramImage.from_loaded(b.dump_func(PROG_NAME.encode()), fds,
                                             bcc.lib.bpf_module_license(b.module).decode())
            os.makedirs(cache, mode=0o700, exist_ok=True)
            tmp = f"{cached}.{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(image.to_json())
            os.replace(tmp, cached)
        except OSError:
            pass  # no cache: the next load compiles again
    return LoadedProgram(fn.fd, ScopeMaps(fds, owned=False), libbpf.prog_info(fn.fd).tag, b)
