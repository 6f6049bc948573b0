"""Where a pod lives on this node: its cgroup, found from its UID, and its
network namespace, found from its processes.

The kubelet names a pod's cgroup after its UID, under a "kubepods" root:

    driver    QoS          pod cgroup
    cgroupfs  Guaranteed   kubepods/pod<uid>
    cgroupfs  Burstable    kubepods/burstable/pod<uid>
    cgroupfs  BestEffort   kubepods/besteffort/pod<uid>
    systemd   Guaranteed   kubepods.slice/kubepods-pod<uid_>.slice
    systemd   Burstable    kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice
    systemd   BestEffort   kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice

(uid_: the UID with "_" for "-").  The kubepods root itself may sit below
the kubelet's --cgroup-root (nested nodes), and with the systemd driver it is
then named after it: kind's kubelet.slice/kubelet-kubepods.slice/
kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod<uid_>.slice.
Only the cgroup v2 hierarchy is searched: on hybrid hosts the v1 controllers'
trees (blkio/kubepods.slice, ...) carry the same names.  Nothing here assumes one
layout: the roots are found by walking the hierarchy, the pod by its name in
a root or one level below it (the QoS level), whatever that level is called.
Container cgroups below the pod: cri-containerd-<id>.scope (containerd),
crio-<id>.scope and crio-conmon-<id>.scope (CRI-O), docker-<id>.scope
(Docker through cri-dockerd) with the systemd driver; <id> (containerd or
Docker) and crio-<id> with cgroupfs.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass

from ksbpf.kernel import cgroup, privileges

ROOT_NAMES = ("kubepods", "kubepods.slice")
ROOT_DEPTH = 4   # how deep below the cgroup v2 mount a kubepods root may be
_ID = r"[0-9a-f]{64}"
RUNTIMES = (
    (re.compile(rf"cri-containerd-({_ID})\.scope"), "containerd"),
    (re.compile(rf"crio-conmon-({_ID})(?:\.scope)?"), "cri-o-conmon"),
    (re.compile(rf"crio-({_ID})(?:\.scope)?"), "cri-o"),
    (re.compile(rf"docker-({_ID})\.scope"), "docker"),
    (re.compile(rf"({_ID})"), "containerd-or-docker"),
)


@dataclass(frozen=True)
class Container:
    path: str
    runtime: str   # containerd, cri-o, cri-o-conmon, docker, containerd-or-docker (cgroupfs), unknown
    id: str


@dataclass(frozen=True)
class PodCgroup:
    path: str
    driver: str    # "systemd" | "cgroupfs"
    qos: str       # "guaranteed" | "burstable" | "besteffort"
    containers: tuple[Container, ...]

    @property
    def runtimes(self) -> list[str]:
        return sorted({c.runtime for c in self.containers})


@dataclass(frozen=True)
class PodNetns:
    path: str      # /proc/PID/ns/net
    inode: int
    pid: int


def is_root_name(name: str) -> bool:
    """kubepods, kubepods.slice, or <cgroup-root>-kubepods.slice (the systemd
    driver with a --cgroup-root: kind's kubelet-kubepods.slice)."""
    return name in ROOT_NAMES or name.endswith("-kubepods.slice")


def cgroup2_tops(top: str, mounts_file: str = cgroup.PROC_MOUNTS) -> list[str]:
    """Where to look for kubepods roots below `top`: `top` itself when it is in
    the cgroup v2 hierarchy, else the cgroup v2 mounts below it (a hybrid
    host's /sys/fs/cgroup/unified) -- never a cgroup v1 controller's tree
    (blkio/kubepods.slice has the same names and cannot be attached to)."""
    top = os.path.normpath(top)
    mounts = [os.path.normpath(m) for m in cgroup.cgroup2_mounts(mounts_file)]
    if any(top == m or top.startswith(m.rstrip("/") + "/") for m in mounts):
        return [top]
    return sorted(m for m in mounts if m.startswith(top.rstrip("/") + "/"))


def kubepods_roots(top: str | None = None, depth: int = ROOT_DEPTH) -> list[str]:
    """Every kubepods root at most `depth` levels below `top` (default: the
    cgroup v2 mount) in the cgroup v2 hierarchy, not descending into a root
    once found."""
    found, level = [], cgroup2_tops(top) if top else [cgroup.cgroup2_root()]
    for _ in range(depth + 1):
        below = []
        for path in level:
            if is_root_name(os.path.basename(path)):
                found.append(path)
                continue
            try:
                below += [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
        level = below
    return sorted(found)


def _pod_names(uid: str) -> tuple[str, str]:
    return f"pod{uid}", f"pod{uid.replace('-', '_')}.slice"


def _qos(level: str | None) -> str:
    if level is None:
        return "guaranteed"
    name = os.path.basename(level).lower()
    return "besteffort" if "besteffort" in name else "burstable" if "burstable" in name else name


def containers(pod_path: str) -> tuple[Container, ...]:
    out = []
    try:
        entries = sorted(e.name for e in os.scandir(pod_path) if e.is_dir(follow_symlinks=False))
    except OSError:
        return ()
    for name in entries:
        for pattern, runtime in RUNTIMES:
            m = pattern.fullmatch(name)
            if m:
                out.append(Container(os.path.join(pod_path, name), runtime, m.group(1)))
                break
        else:
            out.append(Container(os.path.join(pod_path, name), "unknown", name))
    return tuple(out)


def container_cgroup(pod: dict, pod_path: str, name: str) -> str | None:
    """The cgroup of the pod's container NAME (ksbpf.io/vpn-container): its
    id from the pod's status (containerID "containerd://<id>", init and
    sidecar containers included), matched with a container cgroup below the
    pod's.  None while the container has not been created (or has no cgroup yet)."""
    status = pod.get("status") or {}
    ids = [c.get("containerID") or "" for key in ("initContainerStatuses", "containerStatuses",
                                                  "ephemeralContainerStatuses")
           for c in status.get(key) or () if c.get("name") == name]
    wanted = {i.split("://", 1)[-1] for i in ids if i}
    for c in containers(pod_path):
        if c.id in wanted and c.runtime != "cri-o-conmon":   # conmon is CRI-O's monitor, not the container
            return c.path
    return None


def _direct(uid: str, root: str) -> PodCgroup | None:
    """The kubelet's own names tried first (a few stat calls, whatever the
    number of pods): the QoS levels burstable/besteffort, or
    <root>-burstable.slice/<root>-besteffort.slice with the systemd driver."""
    plain, slice_suffix = _pod_names(uid)
    base = os.path.basename(root)
    if base.endswith(".slice"):
        stem = base[:-len(".slice")]
        parents = [(root, None)] + [(os.path.join(root, f"{stem}-{q}.slice"), q) for q in ("burstable", "besteffort")]
        for parent, qos in parents:
            name = f"{os.path.basename(parent)[:-len('.slice')]}-{slice_suffix}"
            if os.path.isdir(os.path.join(parent, name)):
                path = os.path.join(parent, name)
                return PodCgroup(path, "systemd", qos or "guaranteed", containers(path))
        return None
    for parent, qos in [(root, None), (os.path.join(root, "burstable"), "burstable"),
                        (os.path.join(root, "besteffort"), "besteffort")]:
        if os.path.isdir(os.path.join(parent, plain)):
            path = os.path.join(parent, plain)
            return PodCgroup(path, "cgroupfs", qos or "guaranteed", containers(path))
    return None


def find_pod(uid: str, roots: list[str]) -> PodCgroup | None:
    """The pod's cgroup in one of the kubepods roots, or None (not created yet, or gone)."""
    for root in roots:
        found = _direct(uid, root)
        if found:
            return found
    plain, slice_suffix = _pod_names(uid)
    for root in roots:   # other names for the QoS level: look at every directory
        try:
            level0 = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for parent, entries in [(None, level0)] + [(e.path, None) for e in level0]:
            if entries is None:
                try:
                    entries = [e for e in os.scandir(parent) if e.is_dir(follow_symlinks=False)]
                except OSError:
                    continue
            for e in entries:
                if e.name == plain:
                    return PodCgroup(e.path, "cgroupfs", _qos(parent), containers(e.path))
                if e.name.endswith("-" + slice_suffix) and "kubepods" in e.name:
                    return PodCgroup(e.path, "systemd", _qos(parent), containers(e.path))
    return None


def pids(path: str) -> list[int]:
    """The processes of a cgroup and its descendants."""
    out = []
    for sub in cgroup.walk(path):
        try:
            with open(os.path.join(sub, "cgroup.procs")) as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            continue
    return out


class NetnsDenied(Exception):
    """The pod's processes exist but their network namespace cannot be opened:
    /proc/PID/ns/net of another user's process needs ptrace read access."""


DENIED_HINT = ("permission denied opening /proc/PID/ns/net of the pod's processes (they belong to other users): "
               "the daemon needs CAP_SYS_PTRACE (the DaemonSet grants it; a /proc mounted with hidepid hides "
               "them without it too)")


def _netns_inode(pid: int, denied: list[int] | None = None) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except (PermissionError, FileNotFoundError) as exc:
        # EACCES/EPERM: no ptrace access.  ENOENT while /proc/PID exists: hidden by hidepid=invisible
        if denied is not None and (isinstance(exc, PermissionError) or privileges.hidden(pid)):
            denied.append(pid)
        return None
    except OSError:
        return None


def pod_netns(pod: PodCgroup, prefer: str | None = None) -> PodNetns | None:
    """The pod's network namespace: the one its processes live in, other than
    the node's own (CRI-O's conmon runs in the pod's cgroup but in the node's
    namespace).  `prefer` (a /proc/PID/ns/net path already in use) is kept
    while it still names that namespace, so a restarted daemon adopts the
    scope unchanged.  None when no process of the pod is in its namespace yet;
    NetnsDenied when its processes are there but their namespaces cannot be
    opened (no CAP_SYS_PTRACE)."""
    host = os.stat("/proc/self/ns/net").st_ino
    denied: list[int] = []
    by_pid = {pid: ino for pid in pids(pod.path) if (ino := _netns_inode(pid, denied)) is not None and ino != host}
    if not by_pid:
        if denied:
            raise NetnsDenied(DENIED_HINT)
        return None
    inode = Counter(by_pid.values()).most_common(1)[0][0]
    if prefer:
        m = re.fullmatch(r"/proc/(\d+)/ns/net", prefer)
        if m and by_pid.get(int(m.group(1))) == inode:
            return PodNetns(prefer, inode, int(m.group(1)))
    pid = min(p for p, ino in by_pid.items() if ino == inode)   # the oldest, usually the sandbox (pause)
    return PodNetns(f"/proc/{pid}/ns/net", inode, pid)
