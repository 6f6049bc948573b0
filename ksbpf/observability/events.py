"""The stream of blocked packets: samples the BPF program sends to each
scope's ring buffer (rate-limited in the kernel), decoded and described."""

from __future__ import annotations

import ipaddress
import os
import struct
import time
from dataclasses import dataclass
from typing import Callable

from ksbpf.errors import KsbpfError
from ksbpf.kernel import bpf, cgroup, libbpf, links, netns, pins
from ksbpf.reasons import Family, Hook, Reason
from ksbpf.scopes.common import META_VERSION, meta_netns

# struct ksbpf_event (ebpf/ksbpf.h)
EVENT = struct.Struct("=QQQIIIHHBBBB16s16s")
PROTOS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
OVERFLOW_UID = 65534


@dataclass(frozen=True)
class Event:
    time: float           # seconds since the epoch
    scope: str            # the protected cgroup
    reason: Reason
    family: Family
    hook: Hook
    proto: str
    src: str | None
    dst: str | None
    sport: int | None
    dport: int | None
    ifindex: int
    ifname: str | None
    cgroup: str | None    # the sending socket's cgroup (the scope or a child)
    uid: int | None
    length: int

    def to_dict(self) -> dict:
        return {"time": self.time, "scope": self.scope, "reason": self.reason.label,
                "family": self.family.label, "hook": self.hook.label, "proto": self.proto,
                "src": self.src, "sport": self.sport, "dst": self.dst, "dport": self.dport,
                "ifindex": self.ifindex, "ifname": self.ifname, "cgroup": self.cgroup,
                "uid": self.uid, "length": self.length}

    def __str__(self) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.time)) + f".{int(self.time % 1 * 1000):03d}"
        def end(addr, port):
            if addr is None:
                return "?"
            host = f"[{addr}]" if ":" in addr and port else addr
            return f"{host}:{port}" if port else host
        via = self.ifname or f"ifindex {self.ifindex}"
        who = f" uid {self.uid}" if self.uid is not None else ""
        return (f"{stamp} {self.scope} DROP {self.reason.label:<17} {self.proto:<6} "
                f"{end(self.src, self.sport)} -> {end(self.dst, self.dport)} via {via}{who}"
                f"{' cgroup ' + self.cgroup if self.cgroup and self.cgroup != self.scope else ''}")


def _addr(family: Family, raw: bytes) -> str | None:
    if family == Family.IPV4:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == Family.IPV6:
        return str(ipaddress.IPv6Address(raw))
    return None


class Describer:
    """Turns raw records into Events: clocks, interface names and cgroup paths
    (looked up once and cached)."""

    def __init__(self):
        self._epoch = time.time() - time.monotonic()   # bpf_ktime_get_ns is CLOCK_MONOTONIC
        self._cgroups: dict[int, str] = {}
        self._ifnames: dict[tuple[int, int], str | None] = {}

    def cgroup_path(self, cgroup_id: int) -> str | None:
        if cgroup_id not in self._cgroups:
            for root in cgroup.cgroup2_mounts():
                for path in cgroup.walk(root):
                    try:
                        self._cgroups[cgroup.cgroup_id(path)] = path
                    except OSError:
                        continue
        return self._cgroups.get(cgroup_id)

    def ifname(self, ns: netns.Netns | None, cookie: int, ifindex: int) -> str | None:
        key = (cookie, ifindex)
        if key not in self._ifnames and ns is not None:
            try:
                if netns.cookie(ns) == cookie:
                    for link in links.links(ns):
                        self._ifnames[(cookie, link.ifindex)] = link.name
            except OSError:
                pass
        return self._ifnames.get(key)

    def describe(self, scope: str, ns: netns.Netns | None, raw: bytes) -> Event:
        (ts, cg_id, cookie, ifindex, uid, length, sport, dport, reason, family, proto, hook,
         saddr, daddr) = EVENT.unpack_from(raw)
        fam = Family(family)
        ported = proto in (6, 17)
        return Event(self._epoch + ts / 1e9, scope, Reason(reason), fam, Hook(hook),
                     PROTOS.get(proto, str(proto)) if fam != Family.OTHER else "-",
                     _addr(fam, saddr), _addr(fam, daddr),
                     struct.unpack("!H", struct.pack("=H", sport))[0] if ported else None,
                     struct.unpack("!H", struct.pack("=H", dport))[0] if ported else None,
                     ifindex, self.ifname(ns, cookie, ifindex), self.cgroup_path(cg_id),
                     None if uid == OVERFLOW_UID else uid, length)


def stream(scopes: list[str] | None, on_event: Callable[[Event], None],
           should_stop: Callable[[], bool], bpffs: str = pins.BPFFS, poll_ms: int = 200) -> int:
    """Read the ring buffers of the protected scopes (all, or those named in
    `scopes`: a cgroup path, or "node" / "node:NETNS" for a node scope) until
    should_stop(); returns how many scopes."""
    describer = Describer()
    fds: list[int] = []

    def on_record(source, raw: bytes) -> None:
        on_event(describer.describe(source[0], source[1], raw))

    rb = libbpf.RingBuffer(on_record)
    try:
        for pin_dir in pins.list_scope_dirs(bpffs) + pins.list_node_dirs(bpffs):
            try:
                with bpf.ScopeMaps.from_pins(pin_dir) as maps:
                    meta = maps.read_meta()
            except (OSError, KsbpfError, ValueError):
                continue   # removed meanwhile, or pins of another ksbpf version (`ksbpf status` says which)
            path = meta.get("cgroup") or meta.get("name", "?")
            if (scopes and path not in scopes) or meta.get("version") != META_VERSION:
                continue
            fd = libbpf.obj_get(os.path.join(pin_dir, "events"))
            fds.append(fd)
            ns = meta_netns(meta)
            rb.add(fd, (path, ns if os.path.exists(ns.path) else None))
        if not fds:
            return 0
        while not should_stop():
            rb.poll(poll_ms)
        return len(fds)
    finally:
        rb.close()
        for fd in fds:
            os.close(fd)
