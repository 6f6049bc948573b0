"""What this kernel can do: asked of the kernel (feature probes: a program,
a map or an attach call the kernel takes or refuses), never guessed from its
version number, which distributions' backports make meaningless.

Each feature has a name (the `feature` label of ksbpf_kernel_feature in
/metrics), the upstream release that brought it (only to tell the user what
to upgrade to) and what ksbpf does without it.  `ksbpf status`, `ksbpf
verify`, the daemon's start and /metrics all show the same probes.

Probes are cheap (a few small program loads) and cached per process.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator

from ksbpf.kernel import libbpf, netns, nf, rawsock, tc

# KSBPF_NETNS_IDENTITY=helper|storage|auto chooses how the cgroup hook learns
# a packet's network namespace (auto: the helper where the kernel has it).
NETNS_ENV = "KSBPF_NETNS_IDENTITY"
NETNS_HELPER, NETNS_STORAGE = "helper", "storage"


@dataclass(frozen=True)
class Feature:
    name: str
    present: bool
    since: str       # the upstream release that brought it
    without: str     # what ksbpf does where it is missing

    @property
    def line(self) -> str:
        return f"{self.name} yes" if self.present else f"{self.name} no ({self.since}) -> {self.without}"

    def to_dict(self) -> dict:
        return {"name": self.name, "present": self.present, "since": self.since, "without": self.without}


def _helper(prog_type: int, helper: int) -> Callable[[], bool]:
    return lambda: libbpf.probe_helper(prog_type, helper)


def _map(map_type: int) -> Callable[[], bool]:
    return lambda: libbpf.probe_map_type(map_type)


def _sk_storage() -> bool:
    """Socket-local storage written by cgroup/sock_create and read by cgroup_skb."""
    return (libbpf.probe_map_type(libbpf.BPF_MAP_TYPE_SK_STORAGE)
            and libbpf.probe_helper(libbpf.BPF_PROG_TYPE_CGROUP_SOCK, libbpf.BPF_FUNC_sk_storage_get)
            and libbpf.probe_helper(libbpf.BPF_PROG_TYPE_CGROUP_SKB, libbpf.BPF_FUNC_sk_storage_get)
            and libbpf.probe_helper(libbpf.BPF_PROG_TYPE_CGROUP_SOCK, libbpf.BPF_FUNC_get_netns_cookie))


def _sock_addr() -> bool:
    """cgroup sock_addr programs on every hook --dns redirects at (connect4/6,
    sendmsg4/6, recvmsg4/6, getpeername4/6), asking the socket's cookie: a
    program that calls bpf_get_socket_cookie and returns 1, loaded for each
    attach type."""
    import struct
    insns = (struct.pack("=BBhi", 0x85, 0, 0, libbpf.BPF_FUNC_get_socket_cookie)   # call get_socket_cookie(r1)
             + struct.pack("=BBhi", 0xB7, 0, 0, 1)                                  # r0 = 1
             + struct.pack("=BBhi", 0x95, 0, 0, 0))                                 # exit
    for attach in (libbpf.BPF_CGROUP_INET4_CONNECT, libbpf.BPF_CGROUP_INET6_CONNECT, libbpf.BPF_CGROUP_UDP4_SENDMSG,
                   libbpf.BPF_CGROUP_UDP6_SENDMSG, libbpf.BPF_CGROUP_UDP4_RECVMSG, libbpf.BPF_CGROUP_UDP6_RECVMSG,
                   libbpf.BPF_CGROUP_INET4_GETPEERNAME, libbpf.BPF_CGROUP_INET6_GETPEERNAME):
        try:
            fd = libbpf.prog_load(libbpf.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, "ksbpf_probe", "GPL", insns, attach)
        except OSError:
            return False
        os.close(fd)
    return True


def _so_netns_cookie() -> bool:
    """Can user space read a namespace's cookie (getsockopt SO_NETNS_COOKIE)?"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.getsockopt(socket.SOL_SOCKET, netns.SO_NETNS_COOKIE, 8)
            return True
        except OSError:
            return False


# name -> (probe, since, what ksbpf does without it); in the order they are shown
PROBES: dict[str, tuple[Callable[[], bool], str, str]] = {
    "cgroup_skb": (lambda: libbpf.probe_prog_type(libbpf.BPF_PROG_TYPE_CGROUP_SKB), "Linux 4.10",
                   "no cgroup scopes (node mode still works)"),
    "tc_bpf": (lambda: libbpf.probe_prog_type(libbpf.BPF_PROG_TYPE_SCHED_CLS), "Linux 4.1",
               "no node mode"),
    "netns_cookie_cgroup_skb": (_helper(libbpf.BPF_PROG_TYPE_CGROUP_SKB, libbpf.BPF_FUNC_get_netns_cookie),
                                "Linux 6.17",
                                "a socket's namespace is recorded when it is created (socket storage); "
                                "sockets older than the attach are blocked until reopened"),
    "netns_cookie_tc": (_helper(libbpf.BPF_PROG_TYPE_SCHED_CLS, libbpf.BPF_FUNC_get_netns_cookie), "Linux 6.15",
                        "node mode's DHCP exception takes any local socket's packets, not only the node "
                        "namespace's (still only to the broadcast address or a LAN server, at most 576 bytes)"),
    "sk_storage": (_sk_storage, "Linux 5.12",
                   "cgroup scopes need bpf_get_netns_cookie in cgroup_skb instead"),
    "ringbuf": (_map(libbpf.BPF_MAP_TYPE_RINGBUF), "Linux 5.8", "ksbpf cannot run"),
    "so_netns_cookie": (_so_netns_cookie, "Linux 5.14", "ksbpf cannot run (it names namespaces by their cookie)"),
    "coarse_clock": (_helper(libbpf.BPF_PROG_TYPE_CGROUP_SKB, libbpf.BPF_FUNC_ktime_get_coarse_ns),
                     "Linux 5.11", "the event stream's rate limit reads the precise clock"),
    "lpm_trie": (_map(libbpf.BPF_MAP_TYPE_LPM_TRIE), "Linux 4.11", "no allow_cidrs"),
    "ancestor_cgroup_tc": (_helper(libbpf.BPF_PROG_TYPE_SCHED_CLS, libbpf.BPF_FUNC_skb_ancestor_cgroup_id),
                           "Linux 4.19", "no --exempt-cgroup in node mode"),
    "sock_addr": (_sock_addr, "Linux 5.8",
                  "--dns drops DNS to other resolvers but cannot redirect it to the VPN's"),
    "tcx": (tc.tcx_supported, "Linux 6.6", "node mode guards with clsact filters (tc-mode clsact)"),
    "netfilter_link": (nf.supported, "Linux 6.4",
                       "node mode has no from-birth layer: an interface created after attaching is not judged "
                       "until the daemon guards it"),
    "bpf_lsm_cgroup": (rawsock.available, "Linux 6.0, with lsm=...,bpf",
                       "cgroup scopes do not refuse AF_PACKET and AF_XDP sockets: a process of a scope holding "
                       "CAP_NET_RAW can send raw frames past the policy (drop CAP_NET_RAW)"),
    "bpf_lsm_mac": (rawsock.node_available, "Linux 5.7, with lsm=...,bpf",
                    "node mode does not refuse PACKET_QDISC_BYPASS or AF_XDP binds: a process holding CAP_NET_RAW "
                    "can send frames that skip the tc guards (drop CAP_NET_RAW outside the exempt cgroups)"),
}


@lru_cache(maxsize=1)
def probe() -> tuple[Feature, ...]:
    """Every feature of PROBES, asked of the running kernel (once per process)."""
    out = []
    for name, (fn, since, without) in PROBES.items():
        try:
            present = bool(fn())
        except (OSError, libbpf.LibbpfMissing, AttributeError):
            present = False
        out.append(Feature(name, present, since, without))
    return tuple(out)


def has(name: str) -> bool:
    return next(f.present for f in probe() if f.name == name)


def netns_identity() -> str:
    """How the cgroup hook learns a packet's network namespace: "helper"
    (bpf_get_netns_cookie in cgroup_skb) where the kernel has it, else
    "storage" (recorded per socket at creation).  KSBPF_NETNS_IDENTITY forces
    one (tests and benchmarks run both on one kernel)."""
    forced = os.environ.get(NETNS_ENV, "auto")
    if forced in (NETNS_HELPER, NETNS_STORAGE):
        return forced
    return NETNS_HELPER if has("netns_cookie_cgroup_skb") else NETNS_STORAGE


@contextmanager
def forced_netns_identity(identity: str) -> Iterator[None]:
    """Within: compile and load for this namespace identity (the fuzzer and the
    tests load both variants in one process)."""
    old = os.environ.get(NETNS_ENV)
    os.environ[NETNS_ENV] = identity
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(NETNS_ENV, None)
        else:
            os.environ[NETNS_ENV] = old


def summary() -> str:
    """One line: every feature, and what ksbpf does where one is missing."""
    return "this kernel: " + "; ".join(f.line for f in probe())


def short() -> str:
    """One line for `status` and `verify`: what is missing and what ksbpf does
    instead (or that nothing is)."""
    missing = [f.line for f in probe() if not f.present]
    ident = "socket storage" if netns_identity() == NETNS_STORAGE else "bpf_get_netns_cookie"
    head = f"this kernel ({os.uname().release}): cgroup scopes learn a packet's namespace from {ident}"
    return head + ("; " + "; ".join(missing) if missing else f"; every other feature ksbpf uses is present")


def as_dict() -> dict:
    return {"release": os.uname().release, "netns_identity": netns_identity(),
            "features": [f.to_dict() for f in probe()]}
