"""cgroup v2: where it is mounted, what a valid scope path is, joining one."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from ksbpf.errors import KsbpfError

PROC_MOUNTS = "/proc/mounts"


def _unescape(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal
    return (field.replace("\\040", " ").replace("\\011", "\t")
            .replace("\\012", "\n").replace("\\134", "\\"))


def cgroup2_mounts(mounts_file: str = PROC_MOUNTS) -> list[str]:
    """Mount points of the cgroup v2 hierarchy, from /proc/mounts."""
    found = []
    with open(mounts_file) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                found.append(_unescape(fields[1]))
    return found


def cgroup2_root(mounts_file: str = PROC_MOUNTS) -> str:
    mounts = cgroup2_mounts(mounts_file)
    if not mounts:
        raise KsbpfError("no cgroup v2 hierarchy is mounted",
                         "mount one: mount -t cgroup2 none /sys/fs/cgroup/unified")
    return mounts[0]


@dataclass(frozen=True)
class Cgroup:
    path: str  # absolute, normalised path of the cgroup directory
    id: int    # the kernel's cgroup id (the directory's inode number)

    def procs_file(self) -> str:
        return os.path.join(self.path, "cgroup.procs")


def cgroup_id(path: str) -> int:
    return os.stat(path).st_ino


def resolve(path: str, mounts_file: str = PROC_MOUNTS) -> Cgroup:
    """Validate that `path` is a directory of a cgroup v2 hierarchy."""
    real = os.path.realpath(path)
    if not os.path.exists(real):
        raise KsbpfError(f"cgroup {path} does not exist",
                         f"create it first (mkdir {path}) under the cgroup v2 mount {_root_hint(mounts_file)}")
    if not os.path.isdir(real):
        raise KsbpfError(f"{path} is not a directory, so not a cgroup",
                         f"give a directory under the cgroup v2 mount {_root_hint(mounts_file)}")
    mounts = cgroup2_mounts(mounts_file)
    inside = [m for m in mounts if real == m or real.startswith(m.rstrip("/") + "/")]
    if not inside or not os.path.exists(os.path.join(real, "cgroup.procs")):
        raise KsbpfError(f"{path} is not a cgroup v2 directory (cgroup v1 or another filesystem)",
                         f"give a directory under the cgroup v2 mount {_root_hint(mounts_file)}")
    return Cgroup(real, cgroup_id(real))


def _root_hint(mounts_file: str) -> str:
    mounts = cgroup2_mounts(mounts_file)
    return mounts[0] if mounts else "(none mounted: mount -t cgroup2 none /sys/fs/cgroup/unified)"


def level(cg: Cgroup, mounts_file: str = PROC_MOUNTS) -> int:
    """The cgroup's depth in its hierarchy, the root being 0 (what
    bpf_skb_ancestor_cgroup_id takes)."""
    for m in sorted(cgroup2_mounts(mounts_file), key=len, reverse=True):
        if cg.path == m.rstrip("/") or cg.path == m:
            return 0
        if cg.path.startswith(m.rstrip("/") + "/"):
            return cg.path[len(m.rstrip("/")) + 1:].count("/") + 1
    raise KsbpfError(f"{cg.path} is not under a cgroup v2 mount", "give a cgroup v2 directory")


def join(cg: Cgroup, pid: int = 0) -> None:
    """Move process `pid` (0: the caller) into the cgroup."""
    with open(cg.procs_file(), "w") as f:
        f.write(f"{pid or os.getpid()}\n")


def populated(path: str) -> bool:
    """Does a process run in the cgroup or below it (cgroup.events)?  True
    when it cannot be read: the careful answer."""
    try:
        with open(os.path.join(path, "cgroup.events")) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "populated":
                    return value.strip() != "0"
    except OSError:
        pass
    return True


def walk(root: str):
    """Every cgroup directory under root, root included."""
    for dirpath, _dirs, files in os.walk(root):
        if "cgroup.procs" in files:
            yield dirpath


def remove_tree(path: str, timeout: float = 5.0) -> None:
    """Kill every process in the cgroup and its descendants, then remove them
    (deepest first).  The kernel detaches BPF programs of a removed cgroup."""
    if not os.path.isdir(path):
        return
    for sub in sorted(walk(path), key=len, reverse=True):
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(os.path.join(sub, "cgroup.procs")) as f:
                    pids = [int(p) for p in f.read().split()]
            except FileNotFoundError:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.rmdir(sub)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
