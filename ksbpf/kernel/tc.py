"""tc egress attachments: tcx links (kernel >= 6.6) and, where tcx is
missing, a clsact qdisc with a direct-action filter.

tcx: a BPF link on an interface's egress (BPF_LINK_CREATE with
BPF_TCX_EGRESS), pinned in the BPF filesystem so that it outlives the
process; BPF_F_BEFORE puts it first in the interface's chain.  A program that
returns TCX_NEXT lets the next program on the interface decide.  An
interface is looked up in the namespace of the calling thread: callers run
these inside the namespace (netns.run_in).

clsact: `tc filter ... egress bpf direct-action object-pinned PROG` run with
nsenter in the namespace (not `ip netns exec`, which remounts /sys and hides
the BPF filesystem).  The filter holds the program; its preference says where
it runs in the chain.

The bpf(2) commands libbpf 1.1 cannot express (tcx link options, tcx
queries with link ids, link iteration) are issued directly.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import subprocess
from dataclasses import dataclass

from ksbpf.errors import KsbpfError
from ksbpf.kernel import libbpf

SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_LINK_GET_FD_BY_ID = 30
BPF_LINK_GET_NEXT_ID = 31
BPF_LINK_DETACH = 34
BPF_TCX_EGRESS = 47
BPF_F_BEFORE = 1 << 3
BPF_LINK_TYPE_TCX = 11

MODES = ("tcx", "clsact")
CLSACT_PREFS = (1, 2)   # ksbpf's filter alternates between them on replacement (make-before-break)
FILTER_NAME = "ksbpf"

_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ctypes.Array, what: str) -> int:
    ret = _libc.syscall(SYS_BPF, cmd, attr, len(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _attr(size: int = 128) -> ctypes.Array:
    return ctypes.create_string_buffer(size)


def _u32(buf: ctypes.Array, off: int, value: int | None = None) -> int:
    field = ctypes.c_uint32.from_buffer(buf, off)
    if value is not None:
        field.value = value
    return field.value


def _u64(buf: ctypes.Array, off: int, value: int | None = None) -> int:
    field = ctypes.c_uint64.from_buffer(buf, off)
    if value is not None:
        field.value = value
    return field.value


# -- tcx ---------------------------------------------------------------------

def tcx_attach(prog_fd: int, ifindex: int) -> int:
    """A tcx link of the program on the interface's egress, first in its
    chain; returns the link's fd.  Call inside the interface's namespace."""
    attr = _attr()
    _u32(attr, 0, prog_fd)
    _u32(attr, 4, ifindex)
    _u32(attr, 8, BPF_TCX_EGRESS)
    _u32(attr, 12, BPF_F_BEFORE)   # no relative object: before every other program
    return _bpf(BPF_LINK_CREATE, attr, f"tcx attach to ifindex {ifindex}")


def tcx_query(ifindex: int) -> list[tuple[int, int]]:
    """(program id, link id) of every program on the interface's tcx egress,
    in the order they run; link id 0 for a program attached without a link.
    Call inside the interface's namespace."""
    n = 64
    prog_ids = (ctypes.c_uint32 * n)()
    link_ids = (ctypes.c_uint32 * n)()
    attr = _attr()
    _u32(attr, 0, ifindex)
    _u32(attr, 4, BPF_TCX_EGRESS)
    _u64(attr, 16, ctypes.addressof(prog_ids))
    _u32(attr, 24, n)
    _u64(attr, 40, ctypes.addressof(link_ids))
    _bpf(BPF_PROG_QUERY, attr, f"tcx query of ifindex {ifindex}")
    count = _u32(attr, 24)
    return [(prog_ids[i], link_ids[i]) for i in range(min(count, n))]


@dataclass(frozen=True)
class LinkInfo:
    id: int
    type: int
    prog_id: int
    ifindex: int   # tcx: the interface (0 once the interface is gone or the link detached)


def link_info(fd: int) -> LinkInfo:
    info = _attr(64)
    attr = _attr(16)
    _u32(attr, 0, fd)
    _u32(attr, 4, len(info))
    _u64(attr, 8, ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "link info")
    kind = _u32(info, 0)
    return LinkInfo(_u32(info, 4), kind, _u32(info, 8), _u32(info, 16) if kind == BPF_LINK_TYPE_TCX else 0)


def link_detach(fd: int) -> None:
    """Detach a link, whoever else holds it (its pins then hold a dead link)."""
    attr = _attr(16)
    _u32(attr, 0, fd)
    try:
        _bpf(BPF_LINK_DETACH, attr, "link detach")
    except OSError as exc:
        if exc.errno not in (errno.ENOLINK, errno.ENOENT):
            raise


def unpin_link(path: str, detach: bool = True) -> int:
    """Detach a pinned link and remove its pin (idempotent); the link's id
    (0: there was no pin).  detach=False: only the pin goes (a link the pin
    alone holds -- a tracing link, which has no detach -- goes with it)."""
    try:
        fd = libbpf.obj_get(path)
    except OSError:
        return 0
    try:
        try:
            link_id = link_info(fd).id
        except OSError:
            link_id = 0
        if detach:
            link_detach(fd)
        return link_id
    finally:
        os.close(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def link_ids() -> list[int]:
    """Every BPF link of the machine, in every namespace."""
    out, start = [], 0
    while True:
        attr = _attr(16)
        _u32(attr, 0, start)
        try:
            _bpf(BPF_LINK_GET_NEXT_ID, attr, "link iteration")
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return out
            raise
        start = _u32(attr, 4)
        out.append(start)


def link_fd_by_id(link_id: int) -> int:
    attr = _attr(16)
    _u32(attr, 0, link_id)
    return _bpf(BPF_LINK_GET_FD_BY_ID, attr, f"open link id {link_id}")


def tcx_supported() -> bool:
    """Does this kernel have tcx (6.6+)?  A query on loopback answers without
    changing anything: EINVAL means the attach type is unknown."""
    try:
        tcx_query(1)
        return True
    except OSError as exc:
        return exc.errno not in (errno.EINVAL, errno.ENOSYS)


def detach_tcx_programs(names: tuple[str, ...]) -> list[int]:
    """Detach every tcx link, in any namespace, whose program has one of
    these names (the escape hatch for links whose pins are gone)."""
    done = []
    for link_id in link_ids():
        try:
            fd = link_fd_by_id(link_id)
        except OSError:
            continue
        try:
            info = link_info(fd)
            if info.type != BPF_LINK_TYPE_TCX or not info.ifindex:
                continue
            if libbpf.prog_name(info.prog_id) in names:
                link_detach(fd)
                done.append(link_id)
        finally:
            os.close(fd)
    return done


# -- clsact + direct-action filter (kernels without tcx) ---------------------------

def _tc(netns_path: str, *args: str, check: bool = True) -> str:
    proc = subprocess.run(["nsenter", f"--net={netns_path}", "tc", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise KsbpfError(f"`tc {' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}",
                         "check that iproute2's tc is installed and the interface still exists")
    return proc.stdout


@dataclass(frozen=True)
class ClsactFilter:
    pref: int
    prog_id: int
    name: str


def clsact_filters(netns_path: str, ifname: str) -> list[ClsactFilter]:
    """The BPF filters on the interface's clsact egress."""
    out = _tc(netns_path, "filter", "show", "dev", ifname, "egress", check=False)
    found = []
    for m in re.finditer(r"pref (\d+) bpf .*?(\S+) direct-action.*? id (\d+)", out):
        found.append(ClsactFilter(int(m.group(1)), int(m.group(3)), m.group(2).split(":")[0]))
    return found


def clsact_attach(netns_path: str, ifname: str, prog_pin: str, pref: int) -> None:
    """The pinned program as a direct-action filter on the interface's egress."""
    _tc(netns_path, "qdisc", "replace", "dev", ifname, "clsact")
    _tc(netns_path, "filter", "replace", "dev", ifname, "egress", "pref", str(pref), "handle", "1",
        "bpf", "direct-action", "object-pinned", prog_pin)


def clsact_detach(netns_path: str, ifname: str, pref: int) -> None:
    _tc(netns_path, "filter", "del", "dev", ifname, "egress", "pref", str(pref), check=False)
