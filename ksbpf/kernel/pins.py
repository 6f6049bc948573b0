"""The BPF filesystem layout: where each protected scope's objects are pinned.

    /sys/fs/bpf/ksbpf/cgroup/<cgroup-id>/{prog,tunnels,endpoints4,endpoints6,counters,
                                          meta,events,bucket,tunnel_ifindex,exempt,
                                          scope_netns}
    /sys/fs/bpf/ksbpf/node/<netns-cookie>/{prog_eth,prog_l3,<the same maps>,
                                           links/<ifindex>}

<cgroup-id> is the kernel's id of the protected cgroup (the inode number of
its directory, as `stat -c %i` shows); <netns-cookie> the kernel's cookie of
the node scope's network namespace (unique for the boot, unlike its inode).
The pins keep the maps alive after `ksbpf attach` exits; the attachment
itself keeps a cgroup program running, and the pinned tcx links under
links/ keep a node scope's guards attached.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import zlib
from contextlib import contextmanager
from typing import Iterator

from ksbpf.errors import KsbpfError

BPFFS = "/sys/fs/bpf"
BPF_FS_MAGIC = 0xCAFE4A11
LOCK_FILE = "/run/ksbpf/lock"   # /run/ksbpf: the units' RuntimeDirectory (writable under ProtectSystem=strict)


def pin_root(bpffs: str = BPFFS) -> str:
    return os.path.join(bpffs, "ksbpf")


def scopes_dir(bpffs: str = BPFFS) -> str:
    return os.path.join(pin_root(bpffs), "cgroup")


def scope_dir(cgroup_id: int, bpffs: str = BPFFS) -> str:
    return os.path.join(scopes_dir(bpffs), str(cgroup_id))


def nodes_dir(bpffs: str = BPFFS) -> str:
    return os.path.join(pin_root(bpffs), "node")


def node_dir(netns_cookie: int, bpffs: str = BPFFS) -> str:
    return os.path.join(nodes_dir(bpffs), str(netns_cookie))


def is_bpffs(path: str) -> bool:
    class Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_char * 120)]

    libc = ctypes.CDLL(None, use_errno=True)
    buf = Statfs()
    return libc.statfs(path.encode(), ctypes.byref(buf)) == 0 and buf.f_type == BPF_FS_MAGIC


def ensure_bpffs(bpffs: str = BPFFS) -> bool:
    """Mount the BPF filesystem at `bpffs` if it is not there; True if mounted now."""
    if is_bpffs(bpffs):
        return False
    os.makedirs(bpffs, exist_ok=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", bpffs.encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise KsbpfError(f"cannot mount the BPF filesystem at {bpffs}: {os.strerror(err)}",
                         f"mount it yourself: mount -t bpf bpf {bpffs}")
    return True


def _numbered(base: str) -> list[str]:
    if not os.path.isdir(base):
        return []
    return sorted((os.path.join(base, d) for d in os.listdir(base) if d.isdigit()),
                  key=lambda p: int(os.path.basename(p)))


def list_scope_dirs(bpffs: str = BPFFS) -> list[str]:
    """The pin directories of the cgroup scopes."""
    return _numbered(scopes_dir(bpffs))


def scope_dir_inodes(bpffs: str = BPFFS) -> dict[str, int]:
    """The pin directories of the cgroup scopes, each with its inode number
    (from the directory listing: no stat; a replaced directory has a new one)."""
    try:
        with os.scandir(scopes_dir(bpffs)) as it:
            return {e.path: e.inode() for e in it if e.name.isdigit()}
    except FileNotFoundError:
        return {}


def list_node_dirs(bpffs: str = BPFFS) -> list[str]:
    """The pin directories of the node scopes (one per network namespace)."""
    return _numbered(nodes_dir(bpffs))


def make_private_dirs(path: str) -> None:
    """Create a pin directory and its missing parents, readable by root only
    (0700), and tighten ksbpf's own parents (up to the "ksbpf" directory) that
    an older version created 0755."""
    missing = []
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        missing.append(p)
        p = os.path.dirname(p)
    for d in reversed(missing):
        os.mkdir(d, 0o700)
    p = os.path.abspath(path)
    for _ in range(3):   # <cgroup-id> or <netns-cookie>, cgroup or node, ksbpf
        os.chmod(p, 0o700)   # mkdir's mode is masked by the umask
        if os.path.basename(p) == "ksbpf":
            break
        p = os.path.dirname(p)


def remove_dir(path: str) -> None:
    """Unpin everything in a pin directory (bpffs supports unlink/rmdir)."""
    shutil.rmtree(path, ignore_errors=True)


def prune(bpffs: str = BPFFS) -> None:
    """Remove ksbpf's directories once no scope is left in them."""
    for d in (scopes_dir(bpffs), nodes_dir(bpffs), pin_root(bpffs)):
        try:
            os.rmdir(d)
        except OSError:
            pass   # absent, or still holds a scope


@contextmanager
def locked(scope: str | None = None, lock_file: str = LOCK_FILE) -> Iterator[None]:
    """Serialise changes to pins and attachments between ksbpf processes.
    locked(scope): one scope's pins ("cgroup-<id>", "node-<cookie>"), while
    other scopes change alongside -- the daemon guarding a new interface never
    waits for an attach elsewhere.  locked(): the whole machine (the escape
    hatch), once no scope is being changed.  POSIX record locks on one file:
    a scope holds one byte (chosen by its name), the machine the whole file."""
    os.makedirs(os.path.dirname(lock_file), mode=0o700, exist_ok=True)
    length, start = (0, 0) if scope is None else (1, 1 + zlib.crc32(scope.encode()))
    with open(lock_file, "a") as f:
        fcntl.lockf(f, fcntl.LOCK_EX, length, start)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN, length, start)
