"""`ksbpf gate`: the pod's first init container.  It exits 0 only once its
own traffic outside the tunnel is refused by the kernel, so the app
containers never start unprotected; it exits non-zero at the timeout.

Unprivileged, no capabilities.  The probe: a UDP datagram with TTL 1 to a
documentation address (TEST-NET-1: before protection it dies at the first
hop), sent through each interface of the pod that is up, not loopback and
not of a tunnel kind -- chosen per datagram with IP_PKTINFO, which needs no
privilege (the routes may already lead into the tunnel).  The gate passes
when the kernel refuses it (EPERM, ksbpf's cgroup program) on every such
interface, and at least one exists.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from dataclasses import dataclass

from ksbpf.policy import DEFAULT_TUNNEL_KINDS

PROBE_ADDRESS = "192.0.2.1"   # TEST-NET-1 (RFC 5737): never routed on the internet
PROBE_PORT = 9                # discard
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
INTERVAL = 0.2


@dataclass(frozen=True)
class Interface:
    name: str
    index: int
    kind: str | None


@dataclass(frozen=True)
class Probe:
    interface: Interface
    refused: bool       # EPERM: the kernel's policy dropped it
    outcome: str        # "refused", "sent" or the error's name


def candidates(tunnel_kinds: tuple[str, ...] = DEFAULT_TUNNEL_KINDS) -> tuple[list[Interface], list[str]]:
    """The interfaces a leak could leave through (up, not loopback, not a
    tunnel kind), and a note on each one skipped.  Route netlink dumps need
    no privilege."""
    from pyroute2 import IPRoute

    from ksbpf.kernel import links
    out, skipped = [], []
    with IPRoute() as ipr:
        for msg in ipr.get_links():
            link = links.parse_link(msg)
            if link.ifindex == 1 or link.name == "lo":
                continue
            if link.kind in tunnel_kinds:
                skipped.append(f"{link.name} ({link.kind}: a tunnel)")
            elif not link.up:
                skipped.append(f"{link.name} (down)")
            else:
                out.append(Interface(link.name, link.ifindex, link.kind))
    return out, skipped


def probe(iface: Interface) -> Probe:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
        pktinfo = struct.pack("=I4s4s", iface.index, bytes(4), bytes(4))
        try:
            s.sendmsg([b"ksbpf-gate"], [(socket.IPPROTO_IP, IP_PKTINFO, pktinfo)], 0,
                      (PROBE_ADDRESS, PROBE_PORT))
        except OSError as exc:
            if exc.errno == errno.EPERM:
                return Probe(iface, True, "refused")
            return Probe(iface, False, errno.errorcode.get(exc.errno, str(exc.errno)))
    return Probe(iface, False, "sent")


def wait(timeout: float, say, tunnel_kinds: tuple[str, ...] = DEFAULT_TUNNEL_KINDS,
         interval: float = INTERVAL) -> bool:
    """Probe until every candidate interface refuses (True) or the timeout (False)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        ifaces, skipped = candidates(tunnel_kinds)
        results = [probe(i) for i in ifaces]
        summary = ", ".join(f"{r.interface.name}: {r.outcome}" for r in results) or "no interface to probe"
        if skipped:
            summary += f" (skipped: {', '.join(skipped)})"
        if results and all(r.refused for r in results):
            say(f"protected: egress outside the tunnel is refused by the kernel ({summary})")
            return True
        if summary != last:
            say(f"not protected yet: {summary}")
            last = summary
        if time.monotonic() >= deadline:
            say(f"timed out after {timeout:g} s: this pod's egress is not refused outside the tunnel ({summary}); "
                "is the ksbpf DaemonSet running on this node, and is the pod annotated?")
            return False
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
