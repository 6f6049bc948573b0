"""Netfilter BPF links (BPF_PROG_TYPE_NETFILTER, kernel >= 6.4): a program
run at a netfilter hook of one network namespace, for every packet of one
protocol family, on every interface -- also those created later.

libbpf 1.1 has no netfilter attach API and the distribution's UAPI header
lacks the constants: the bpf(2) commands are issued directly (as for tcx).
A link belongs to the namespace of the thread that creates it: callers run
attach() inside the namespace (netns.run_in).  A pinned link outlives its
loader and keeps its namespace alive until the pin is removed and the link
detached.  A second link at the same (family, hook, priority) is refused
(EBUSY) and a link's program cannot be replaced (BPF_LINK_UPDATE is not
supported): a new program goes in at another priority, then the old link is
detached (make-before-break).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
from dataclasses import dataclass

from ksbpf.kernel import libbpf, tc

BPF_PROG_TYPE_NETFILTER = 32
BPF_NETFILTER = 45          # attach type
BPF_LINK_TYPE_NETFILTER = 10
NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10
FAMILIES = {"ipv4": NFPROTO_IPV4, "ipv6": NFPROTO_IPV6}
NF_INET_POST_ROUTING = 4
# ksbpf's links alternate between these priorities on replacement; both run
# before source NAT (NF_IP_PRI_NAT_SRC = 100), which would hide the source.
PRIORITIES = (-120, -119)

_EXIT_1 = struct.pack("=BBhi", 0xB7, 0, 0, 1) + struct.pack("=BBhi", 0x95, 0, 0, 0)   # r0 = 1; exit


@functools.lru_cache(maxsize=1)
def supported() -> bool:
    """Does this kernel take netfilter BPF programs (CONFIG_NETFILTER_BPF_LINK,
    Linux 6.4+)?  A feature probe: load a two-instruction program of that
    type; nothing is attached anywhere."""
    try:
        fd = libbpf.prog_load(BPF_PROG_TYPE_NETFILTER, "ksbpf_probe_nf", "GPL", _EXIT_1, BPF_NETFILTER)
    except OSError:
        return False
    except libbpf.LibbpfMissing:
        return False
    os.close(fd)
    return True


def attach(prog_fd: int, pf: int, priority: int, hooknum: int = NF_INET_POST_ROUTING) -> int:
    """A netfilter link of the program in the calling thread's namespace;
    returns the link's fd."""
    attr = tc._attr()
    tc._u32(attr, 0, prog_fd)
    tc._u32(attr, 8, BPF_NETFILTER)
    tc._u32(attr, 16, pf)
    tc._u32(attr, 20, hooknum)
    struct.pack_into("=i", attr, 24, priority)
    return tc._bpf(tc.BPF_LINK_CREATE, attr, f"netfilter link (family {pf}, hook {hooknum}, priority {priority})")


@dataclass(frozen=True)
class NfLinkInfo:
    id: int
    prog_id: int
    pf: int
    hooknum: int
    priority: int
    alive: bool   # still attached (a detached link reads as family 0)


def link_info(fd: int) -> NfLinkInfo | None:
    """The link's netfilter attachment; None when it is not a netfilter link."""
    info = tc._attr(64)
    attr = tc._attr(16)
    tc._u32(attr, 0, fd)
    tc._u32(attr, 4, len(info))
    tc._u64(attr, 8, ctypes.addressof(info))
    tc._bpf(tc.BPF_OBJ_GET_INFO_BY_FD, attr, "link info")
    kind, link_id, prog_id = struct.unpack_from("=III", info, 0)
    if kind != BPF_LINK_TYPE_NETFILTER:
        return None
    pf, hooknum, priority = struct.unpack_from("=IIi", info, 16)
    return NfLinkInfo(link_id, prog_id, pf, hooknum, priority, pf != 0)


def pinned_info(path: str) -> NfLinkInfo | None:
    """The pinned netfilter link's attachment, None when there is no pin."""
    try:
        fd = libbpf.obj_get(path)
    except OSError:
        return None
    try:
        return link_info(fd)
    finally:
        os.close(fd)


def unpin(path: str) -> int:
    """Detach the pinned link and remove its pin (idempotent); its id (0: none)."""
    return tc.unpin_link(path)


def detach_programs(names: tuple[str, ...]) -> list[int]:
    """Detach every netfilter link, in any namespace, whose program has one of
    these names (the escape hatch for links whose pins are gone)."""
    done = []
    for link_id in tc.link_ids():
        try:
            fd = tc.link_fd_by_id(link_id)
        except OSError:
            continue
        try:
            try:
                info = link_info(fd)
            except OSError:
                continue
            if info is None or not info.alive:
                continue
            if libbpf.prog_name(info.prog_id) in names:
                tc.link_detach(fd)
                done.append(link_id)
        finally:
            os.close(fd)
    return done


def busy(exc: OSError) -> bool:
    return exc.errno == errno.EBUSY
