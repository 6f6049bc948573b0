"""Following a cgroup subtree for a `netns = "each"` scope: which network
namespaces its processes live in, told by the kernel, never polled.

Two signals, both as file descriptors for the daemon's select loop:
- inotify on every directory of the subtree: a descendant cgroup created or
  removed, and files modified in it -- `cgroup.events` (populated changes)
  and `cgroup.procs` written by a runtime moving a process in;
- the scope's sock_create program (ebpf/ksbpf.c ksbpf_sk_create), which
  reports the first socket created in a namespace the daemon has not
  registered yet: a process can enter a populated cgroup without a write
  we see (clone3 CLONE_INTO_CGROUP) or change namespace after it joined
  (setns), and neither raises a cgroup event.  Its socket cannot send before
  it exists, and the egress policy drops its traffic until the namespace is
  registered.
The daemon then rescans the subtree (ksbpf.scopes.subtree.in_use).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from ksbpf.kernel import cgroup
from ksbpf.scopes import subtree

IN_MODIFY = 0x00000002
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_IGNORED = 0x00008000
IN_Q_OVERFLOW = 0x00004000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
MASK = IN_CREATE | IN_DELETE | IN_MODIFY | IN_MOVED_TO | IN_DELETE_SELF
_EVENT = struct.Struct("=iIII")   # wd, mask, cookie, len

_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    """Watches on every directory of a tree (new directories are watched as they appear)."""

    def __init__(self, root: str):
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.paths: dict[int, str] = {}
        self.watch_tree(root)

    def watch_tree(self, root: str) -> None:
        for path in cgroup.walk(root):
            wd = _libc.inotify_add_watch(self.fd, path.encode(), MASK)
            if wd >= 0:
                self.paths[wd] = path   # a directory removed meanwhile is simply not watched
            # its own watch: the kernel notifies cgroup.events only through an inode in the cache
            events = os.path.join(path, "cgroup.events")
            wd = _libc.inotify_add_watch(self.fd, events.encode(), IN_MODIFY)
            if wd >= 0:
                self.paths[wd] = events

    def fileno(self) -> int:
        return self.fd

    def drain(self) -> int:
        """Read every pending event (watching new directories); how many."""
        n = 0
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return n
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            off = 0
            while off < len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, off)
                name = data[off + _EVENT.size:off + _EVENT.size + length].split(b"\0", 1)[0].decode()
                off += _EVENT.size + length
                n += 1
                if mask & IN_IGNORED:
                    self.paths.pop(wd, None)
                elif mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO) and wd in self.paths:
                    self.watch_tree(os.path.join(self.paths[wd], name))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SubtreeWatch:
    """The two signals of one scope, and what they say."""

    def __init__(self, cgroup_path: str, pin_dir: str):
        self.cgroup = cgroup_path
        self.inotify = Inotify(cgroup_path)
        self.reported: list[tuple[int, int, int]] = []   # (cookie, cgroup id, pid) since the last rescan
        self.reports = subtree.Reports(lambda _src, cookie, cg_id, pid: self.reported.append((cookie, cg_id, pid)))
        try:
            self.reports.add(pin_dir, cgroup_path)
        except OSError:
            self.inotify.close()
            raise

    def fds(self) -> list[int]:
        return [self.inotify.fileno(), self.reports.fileno()]

    def drain(self) -> tuple[int, list[tuple[int, int, int]]]:
        """(inotify events, sock_create reports) waiting; both consumed."""
        n = self.inotify.drain()
        self.reports.consume()
        reported, self.reported = self.reported, []
        return n, reported

    def close(self) -> None:
        self.inotify.close()
        self.reports.close()
