"""A scope over every network namespace of its cgroup subtree (`--netns each`).

Containers live in network namespaces of their own.  With `netns = "each"`
the scope's tunnel names are looked up in every network namespace that a
process of the scope's cgroup subtree lives in (from /proc/PID/ns/net), and
registered by (namespace cookie, ifindex); a namespace no process of the
subtree uses any more leaves the map.  Until a namespace's tunnel is
registered its non-local traffic is dropped: fail closed.

This module owns: finding the namespaces in use, keeping the tunnel map's
entries of ONE namespace in step (the other namespaces' entries untouched),
the `netns_known` map the sock_create program reads, and
reading that program's reports (cgroups.py attaches it, BPF_CGROUP_INET_SOCK_CREATE,
beside the egress one).  It uses only the kernel layer: cgroups.py and the
daemon call it.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass

from ksbpf.kernel import bpf, cgroup, libbpf, links, netns, privileges
from ksbpf.policy import Policy

EACH = "each"
SOCK_CREATE = libbpf.BPF_CGROUP_INET_SOCK_CREATE
SOCK_PROG_NAME = bpf.ENTRY_SOCK_CREATE[:libbpf.BPF_OBJ_NAME_LEN - 1]
NETNS_KNOWN, NETNS_REPORTED = 1, 2   # KSBPF_NETNS_KNOWN, KSBPF_NETNS_REPORTED
NETNS_EVENT = struct.Struct("=QQII")  # struct ksbpf_netns_event: cookie, cgroup id, pid, pad
_U64 = struct.Struct("=Q")
_U32 = struct.Struct("=I")


def is_each(policy: Policy) -> bool:
    return policy.netns == EACH


def entries(policy: Policy) -> tuple[str, ...]:
    """The entry points a cgroup scope loads: the egress policy, and the
    sock_create program, which records each socket's namespace (kernels whose
    cgroup_skb programs cannot ask for it), reports new namespaces (each), and
    ends the fast path of a scope of one namespace at the first socket made in
    another (ksbpf_netns_fast)."""
    return (bpf.ENTRY_CGROUP, bpf.ENTRY_SOCK_CREATE)


def mark_known(maps: bpf.ScopeMaps, cookie: int) -> None:
    """A scope of one namespace: its sock_create program reports nothing of it."""
    if "netns_known" in maps.fds:
        libbpf.map_update(maps.fds["netns_known"], _U64.pack(cookie), _U32.pack(NETNS_KNOWN))


# --- which namespaces the subtree uses -----------------------------------------

@dataclass(frozen=True)
class NsUse:
    """A network namespace in use by a process of the subtree."""

    inode: int
    pid: int        # one process living there (the lowest pid found)
    comm: str       # its name
    cgroup: str     # its cgroup, relative to the scope ("." for the scope itself): a container's id is in it
    processes: int  # how many processes of the subtree live there

    @property
    def path(self) -> str:
        return f"/proc/{self.pid}/ns/net"

    @property
    def container(self) -> str | None:
        """The container's id (12 characters, as `docker ps`/`podman ps` show it),
        from its cgroup: <id>, libpod-<id>, docker-<id>.scope, libpod-<id>.scope."""
        m = re.search(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?(?:/|$)", self.cgroup)
        return m[1][:12] if m else None

    @property
    def label(self) -> str:
        who = f"container {self.container}, " if self.container else ""
        return f"{who}{self.comm}[{self.pid}] in {self.cgroup}"

    def netns(self) -> netns.Netns:
        return netns.Netns(self.label, self.path, self.inode)


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def subtree_pids(cgroup_path: str) -> list[tuple[int, str]]:
    """(pid, cgroup directory) of every process of the subtree."""
    out = []
    for path in cgroup.walk(cgroup_path):
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                out += [(int(p), path) for p in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue   # removed while we walked
    return out


DENIED_HINT = ("/proc/PID/ns/net of processes of other users needs ptrace read access: give the daemon "
               "CAP_SYS_PTRACE (deploy/systemd/ksbpf.service has it in CapabilityBoundingSet=)")


def in_use(cgroup_path: str, denied: list[int] | None = None) -> dict[int, NsUse]:
    """The network namespaces the processes of the subtree live in, by inode.
    Processes whose namespace cannot be opened (no CAP_SYS_PTRACE: another
    user's, or hidden by ProtectProc=invisible) are added to `denied`."""
    found: dict[int, list] = {}
    for pid, where in sorted(subtree_pids(cgroup_path)):
        try:
            inode = os.stat(f"/proc/{pid}/ns/net").st_ino
        except PermissionError:
            if denied is not None:
                denied.append(pid)
            continue
        except FileNotFoundError:
            if denied is not None and privileges.hidden(pid):
                denied.append(pid)
            continue   # exited meanwhile (or hidden)
        except OSError:
            continue   # exited meanwhile (or a zombie)
        if inode in found:
            found[inode][1] += 1
        else:
            found[inode] = [(pid, where), 1]
    out = {}
    for inode, ((pid, where), n) in found.items():
        rel = os.path.relpath(where, cgroup_path)
        out[inode] = NsUse(inode, pid, comm(pid), rel, n)
    return out


def still(ns: netns.Netns) -> bool:
    """Does ns.path (/proc/PID/ns/net) still refer to the namespace we found
    there?  Checked after opening sockets through it: a process may setns."""
    try:
        return os.stat(ns.path).st_ino == ns.inode
    except OSError:
        return False


@dataclass
class Space:
    """A namespace in use, with its cookie and its interfaces (one dump)."""

    use: NsUse
    cookie: int
    links: list[links.Link]


def discover(cgroup_path: str) -> list[Space]:
    """Every namespace of the subtree with its cookie and interfaces; a
    namespace whose process exits while we look is skipped."""
    out = []
    for use in in_use(cgroup_path).values():
        ns = use.netns()
        try:
            space = Space(use, netns.cookie(ns), links.links(ns))
        except OSError:
            continue
        if still(ns):
            out.append(space)
    return out


# --- the maps: one namespace's entries at a time -----------------------------------

def plan(policy: Policy, present: list[links.Link]) -> dict[int, int]:
    """ifindex -> tunnel index of the interfaces the policy allows in one namespace."""
    return {link.ifindex: policy.tunnels.index(link.name)
            for link in present if policy.trusts(link.name, link.kind)}


def sync_namespace(maps: bpf.ScopeMaps, policy: Policy, cookie: int,
                   present: list[links.Link]) -> tuple[list[int], list[int]]:
    """Make the tunnels map allow exactly the policy's tunnels present in the
    namespace with this cookie; other namespaces' entries are left alone.
    Marks the namespace known to the sock_create program.  (added, removed)."""
    want = plan(policy, present)
    have = {e.ifindex: e.index for e in maps.tunnels() if e.netns_cookie == cookie}
    removed = [i for i, index in have.items() if want.get(i) != index]
    for ifindex in removed:
        maps.remove_tunnel(cookie, ifindex)
    added = [i for i, index in want.items() if have.get(i) != index]
    for ifindex in added:
        maps.add_tunnel(cookie, ifindex, want[ifindex])
    libbpf.map_update(maps.fds["netns_known"], _U64.pack(cookie), _U32.pack(NETNS_KNOWN))
    return added, removed


def forget(maps: bpf.ScopeMaps, cookie: int) -> list[int]:
    """A namespace no longer in use: its entries leave the map (and the
    known list, so a new socket there is reported again).  Removed ifindexes."""
    removed = [e.ifindex for e in maps.tunnels() if e.netns_cookie == cookie]
    for ifindex in removed:
        maps.remove_tunnel(cookie, ifindex)
    try:
        libbpf.map_delete(maps.fds["netns_known"], _U64.pack(cookie))
    except OSError:
        pass
    return removed


def known(maps: bpf.ScopeMaps) -> dict[int, int]:
    """cookie -> NETNS_KNOWN or NETNS_REPORTED."""
    fd = maps.fds["netns_known"]
    out = {}
    for key in libbpf.map_keys(fd, 8):
        value = libbpf.map_lookup(fd, key, 4)
        if value is not None:
            out[_U64.unpack(key)[0]] = _U32.unpack(value)[0]
    return out


def register_all(maps: bpf.ScopeMaps, policy: Policy, spaces: list[Space]) -> None:
    """The map for exactly these namespaces (entries of others removed)."""
    cookies = {s.cookie for s in spaces}
    for cookie in {e.netns_cookie for e in maps.tunnels()} | set(known(maps)):
        if cookie not in cookies:
            forget(maps, cookie)
    for s in spaces:
        sync_namespace(maps, policy, s.cookie, s.links)


# --- the sock_create program's reports ----------------------------------------------
# (attached and detached with the egress program by cgroups.py: SOCK_CREATE, SOCK_PROG_NAME)

class Reports:
    """The reports of the sock_create programs of several scopes (one ring
    buffer each): on_report(source, cookie, cgroup_id, pid)."""

    def __init__(self, on_report):
        self._rb = libbpf.RingBuffer(lambda source, raw: on_report(source, *NETNS_EVENT.unpack_from(raw)[:3]))
        self._fds: list[int] = []

    def add(self, pin_dir: str, source) -> None:
        fd = libbpf.obj_get(os.path.join(pin_dir, "netns_events"))
        self._fds.append(fd)
        self._rb.add(fd, source)

    def fileno(self) -> int:
        return self._rb.fileno()

    def consume(self) -> None:
        self._rb.poll(0)

    def close(self) -> None:
        self._rb.close()
        for fd in self._fds:
            os.close(fd)
        self._fds = []
