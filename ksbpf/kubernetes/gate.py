"""`ksbpf gate`: the pod's first init container.  It exits 0 only once the
ksbpf daemon says it enforces this pod's policy AND the kernel refuses the
pod's own traffic outside the tunnel, for IPv4 and IPv6, so the app
containers never start unprotected; it exits non-zero at the timeout.

Unprivileged, no capabilities.  Two proofs, both required:

- the daemon's word: the pod's annotations, read from a downward API volume
  (--annotations), carry ksbpf.io/protected equal to the digest of the ksbpf
  annotations they carry (annotations.digest): the daemon has attached
  exactly this policy.  An EPERM alone proves nothing: an iptables rule in a
  sidecar gives the same one, for IPv4 only.
- the kernel's answer: a UDP datagram with TTL (hop limit) 1 to a
  documentation address (192.0.2.1, 2001:db8::1: before protection it dies
  at the first hop), sent through each interface of the pod that is up, not
  loopback and not of a tunnel kind -- chosen per datagram with IP_PKTINFO /
  IPV6_PKTINFO, which need no privilege (the routes may already lead into
  the tunnel).  IPv4 must be refused (EPERM) on every such interface, and at
  least one must exist; IPv6 must be refused, or have no route there at all
  (an IPv4-only pod: nothing can leave, and the daemon's cgroup program
  covers both families once a route appears).
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from dataclasses import dataclass

from ksbpf.policy import DEFAULT_TUNNEL_KINDS

PROBE_ADDRESS = "192.0.2.1"   # TEST-NET-1 (RFC 5737): never routed on the internet
PROBE_ADDRESS6 = "2001:db8::1"   # the IPv6 documentation prefix (RFC 3849)
PROBE_PORT = 9                # discard
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
NO_ROUTE = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)
INTERVAL = 0.2
ANNOTATIONS = "/etc/ksbpf-pod/annotations"   # the example pod's downward API volume


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
    family: int = socket.AF_INET

    @property
    def unroutable(self) -> bool:
        """Nothing could leave: no route (or no IPv6) through that interface."""
        return self.outcome in {errno.errorcode[e] for e in NO_ROUTE}

    @property
    def safe(self) -> bool:
        return self.refused or (self.family == socket.AF_INET6 and self.unroutable)


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


def probe(iface: Interface, family: int = socket.AF_INET) -> Probe:
    try:
        s = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:   # IPv6 disabled in this kernel
        return Probe(iface, False, errno.errorcode.get(exc.errno, str(exc.errno)), family)
    with s:
        if family == socket.AF_INET:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
            cmsg = (socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=I4s4s", iface.index, bytes(4), bytes(4)))
            dst = (PROBE_ADDRESS, PROBE_PORT)
        else:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 1)
            cmsg = (socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("=16sI", bytes(16), iface.index))
            dst = (PROBE_ADDRESS6, PROBE_PORT)
        try:
            s.sendmsg([b"ksbpf-gate"], [cmsg], 0, dst)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                return Probe(iface, True, "refused", family)
            return Probe(iface, False, errno.errorcode.get(exc.errno, str(exc.errno)), family)
    return Probe(iface, False, "sent", family)


def daemon_word(path: str, prefix: str = "ksbpf.io/") -> tuple[bool, str]:
    """Does the daemon say it enforces the annotations this pod carries?"""
    from ksbpf.kubernetes import annotations as notes
    try:
        seen = notes.read_downward(path)
    except OSError as exc:
        return False, (f"cannot read the pod's annotations at {path} ({exc.strerror}): mount them there "
                       "with a downward API volume (see deploy/kubernetes/example/vpn-pod.yaml)")
    value = seen.get(prefix + notes.PROTECTED)
    want = notes.digest(seen, prefix)
    if value is None:
        return False, f"the ksbpf daemon has not published {prefix}{notes.PROTECTED} on this pod yet"
    if value == "blocked:" + want:
        return False, "the ksbpf daemon blocks ALL of this pod's traffic: its annotations are invalid (see its Events)"
    if value != want:
        return False, f"{prefix}{notes.PROTECTED} is for other annotations than this pod's (changed since?)"
    return True, f"the ksbpf daemon enforces this pod's annotations ({value})"


def wait(timeout: float, say, tunnel_kinds: tuple[str, ...] = DEFAULT_TUNNEL_KINDS,
         interval: float = INTERVAL, annotations: str = ANNOTATIONS, prefix: str = "ksbpf.io/") -> bool:
    """Probe until the daemon's word and every candidate interface's refusal (True) or the timeout (False)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        word, why = daemon_word(annotations, prefix)
        ifaces, skipped = candidates(tunnel_kinds)
        v4 = [probe(i, socket.AF_INET) for i in ifaces]
        v6 = [probe(i, socket.AF_INET6) for i in ifaces]
        summary = ", ".join(f"{a.interface.name}: {a.outcome} (IPv6 {b.outcome})" for a, b in zip(v4, v6)) \
            or "no interface to probe"
        if skipped:
            summary += f" (skipped: {', '.join(skipped)})"
        kernel = bool(v4) and all(r.refused for r in v4) and all(r.safe for r in v6)
        if word and kernel:
            say(f"protected: {why}; egress outside the tunnel is refused by the kernel ({summary})")
            return True
        state = f"{why}; {summary}"
        if state != last:
            say(f"not protected yet: {why}; {summary}")
            last = state
        if time.monotonic() >= deadline:
            say(f"timed out after {timeout:g} s: {why}; egress outside the tunnel: {summary}. "
                "Is the ksbpf DaemonSet running on this node, and is the pod annotated?")
            return False
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
