"""Network interfaces and routes of a namespace, from route netlink.

Sockets are opened inside the namespace (netns.run_in) and read from any
thread; messages are decoded with pyroute2.  A NetlinkWatch subscribes
BEFORE it dumps, so that no change can fall between the dump and the
subscription: whatever happened meanwhile is also waiting as an event.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass

from pyroute2.netlink import NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.rtnl import (
    RTM_DELLINK,
    RTM_GETADDR,
    RTM_DELROUTE,
    RTM_GETLINK,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from ksbpf.kernel import netns

IFF_UP = 0x1
ARPHRD_ETHER = 1
RTN_UNICAST = 1
RT_TABLE_LOCAL = 255
RCVBUF = 4 << 20


@dataclass(frozen=True)
class Link:
    ifindex: int
    name: str
    kind: str | None  # IFLA_INFO_KIND: "wireguard", "tun", "veth", ... (None: no kind, e.g. lo)
    up: bool
    arphrd: int = ARPHRD_ETHER  # link-layer type (ifi_type): 1 Ethernet, 65534 none (tun), 772 loopback ...

    @property
    def ethernet(self) -> bool:
        """Does a frame on this interface start with an Ethernet header?"""
        return self.arphrd == ARPHRD_ETHER


@dataclass(frozen=True)
class Route:
    added: bool
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    oifs: tuple[int, ...]
    gateway: str | None
    table: int
    unicast: bool

    def __str__(self) -> str:
        via = f" via {self.gateway}" if self.gateway else ""
        return f"{self.dst}{via}"


def parse_link(msg) -> Link:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info else None
    return Link(msg["index"], msg.get_attr("IFLA_IFNAME") or "", kind, bool(msg["flags"] & IFF_UP), msg["ifi_type"])


def parse_route(msg) -> Route | None:
    family = msg["family"]
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    zero = "0.0.0.0" if family == socket.AF_INET else "::"
    dst = ipaddress.ip_network(f"{msg.get_attr('RTA_DST') or zero}/{msg['dst_len']}", strict=False)
    oifs = [msg.get_attr("RTA_OIF")] if msg.get_attr("RTA_OIF") else []
    for hop in msg.get_attr("RTA_MULTIPATH") or []:
        oifs.append(hop["oif"])
    return Route(msg["header"]["type"] == RTM_NEWROUTE, dst, tuple(oifs), msg.get_attr("RTA_GATEWAY"),
                 msg.get_attr("RTA_TABLE") or msg["table"], msg["type"] == RTN_UNICAST)


def _open(groups: int) -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    s.bind((0, groups))
    return s


class DumpInterrupted(Exception):
    pass


class NetlinkWatch:
    """Link and route events of one network namespace, plus link dumps."""

    GROUPS = RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE

    def __init__(self, ns: netns.Netns, groups: int = GROUPS):
        self.ns = ns
        self._events = netns.run_in(ns.path, _open, groups)   # subscribe first ...
        self._queries = netns.run_in(ns.path, _open, 0)       # ... then dump on another socket
        self._events.setblocking(False)
        self._marshal = MarshalRtnl()
        self._seq = 0

    def fileno(self) -> int:
        return self._events.fileno()

    def close(self) -> None:
        self._events.close()
        self._queries.close()

    def links(self) -> list[Link]:
        """All interfaces of the namespace (a consistent dump: retried if interrupted)."""
        for _ in range(10):
            try:
                return [parse_link(m) for m in self._dump(RTM_GETLINK, struct.pack("=BxHiII", 0, 0, 0, 0, 0))]
            except DumpInterrupted:
                continue
        raise OSError(errno.EAGAIN, "link dump kept being interrupted")

    def addresses(self) -> dict[int, list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
        """ifindex -> the interface's IPv4 and IPv6 addresses (a consistent dump)."""
        for _ in range(10):
            try:
                msgs = self._dump(RTM_GETADDR, struct.pack("=BBBBI", 0, 0, 0, 0, 0))
            except DumpInterrupted:
                continue
            out: dict[int, list] = {}
            for m in msgs:
                if m["family"] not in (socket.AF_INET, socket.AF_INET6):
                    continue
                a = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
                if a:
                    out.setdefault(m["index"], []).append(ipaddress.ip_address(a))
            return out
        raise OSError(errno.EAGAIN, "address dump kept being interrupted")

    def _dump(self, msg_type: int, payload: bytes) -> list:
        self._seq += 1
        seq = self._seq
        hdr = struct.pack("=IHHII", 16 + len(payload), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
        self._queries.send(hdr + payload)
        out, interrupted = [], False
        while True:
            for msg in self._marshal.parse(self._queries.recv(1 << 20)):
                header = msg["header"]
                if header["sequence_number"] != seq:
                    continue
                interrupted |= bool(header["flags"] & NLM_F_DUMP_INTR)
                if header["type"] == NLMSG_DONE:
                    if interrupted:
                        raise DumpInterrupted()
                    return out
                if header["type"] == NLMSG_ERROR:
                    code = msg["error"] if "error" in msg else 0
                    if code:
                        raise OSError(-code, f"netlink dump: {errno.errorcode.get(-code, code)}")
                    continue
                out.append(msg)

    def events(self) -> tuple[list, bool]:
        """(pending link/route messages, lost): lost=True when the kernel dropped
        events (socket overrun): the caller must dump again."""
        out, lost = [], False
        while True:
            try:
                data = self._events.recv(1 << 20)
            except BlockingIOError:
                return out, lost
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    lost = True
                    continue
                raise
            out += [m for m in self._marshal.parse(data)
                    if m["header"]["type"] in (RTM_NEWLINK, RTM_DELLINK, RTM_NEWROUTE, RTM_DELROUTE)]


def links(ns: netns.Netns) -> list[Link]:
    """One dump of the namespace's interfaces."""
    w = NetlinkWatch(ns, groups=0)
    try:
        return w.links()
    finally:
        w.close()


def addresses(ns: netns.Netns) -> dict[int, list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """One dump of the namespace's addresses, by ifindex."""
    w = NetlinkWatch(ns, groups=0)
    try:
        return w.addresses()
    finally:
        w.close()


def is_link_event(msg) -> bool:
    return msg["header"]["type"] in (RTM_NEWLINK, RTM_DELLINK)


def is_deleted(msg) -> bool:
    return msg["header"]["type"] == RTM_DELLINK


def tun_owners(path: str) -> list[tuple[str, int]]:
    """(name, owner uid) of each tun/tap device of the namespace at `path`
    that belongs to a user (IFLA_TUN_OWNER; devices without an owner left out)."""
    w = NetlinkWatch(netns.Netns("", path, 0), groups=0)
    try:
        for _ in range(10):
            try:
                msgs = w._dump(RTM_GETLINK, struct.pack("=BxHiII", 0, 0, 0, 0, 0))
                break
            except DumpInterrupted:
                continue
        else:
            raise OSError(errno.EAGAIN, "link dump kept being interrupted")
    finally:
        w.close()
    out = []
    for msg in msgs:
        info = msg.get_attr("IFLA_LINKINFO")
        if not info or info.get_attr("IFLA_INFO_KIND") != "tun":
            continue
        data = info.get_attr("IFLA_INFO_DATA")
        owner = data.get_attr("IFLA_TUN_OWNER") if data else None
        if owner is not None and owner != 0xFFFFFFFF:
            out.append((msg.get_attr("IFLA_IFNAME") or "", owner))
    return out
