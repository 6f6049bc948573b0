"""Network namespaces: naming them, running code inside them, their cookies.

Code runs "inside" a namespace on a short-lived thread that setns()es into
it: network namespaces are per thread, so the rest of the process (and its
/sys view) is untouched.  Sockets created there stay bound to that namespace.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from dataclasses import dataclass
from typing import Callable, TypeVar

from ksbpf.errors import KsbpfError

NETNS_RUN_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71

T = TypeVar("T")


@dataclass(frozen=True)
class Netns:
    """A network namespace as the user named it, and where it lives."""

    spec: str   # what the user gave: "" (the caller's), a name, or a path
    path: str   # a file that refers to the namespace
    inode: int  # the namespace's inode number (what `ip netns identify` compares)

    @property
    def label(self) -> str:
        return self.spec or "(caller's)"


def resolve(spec: str | None) -> Netns:
    """A netns from a name under /var/run/netns, a path, or None/"" for the caller's."""
    if not spec:
        return _callers()
    if "/" in spec:
        path = spec
    else:
        path = os.path.join(NETNS_RUN_DIR, spec)
    try:
        st = os.stat(path)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        raise KsbpfError(f"network namespace {spec!r} does not exist ({path})",
                         "name one from `ip netns list` or give a path such as /proc/PID/ns/net") from None
    try:
        _setns_check(fd)
    finally:
        os.close(fd)
    return Netns(spec or "", path, st.st_ino)


def _callers() -> Netns:
    """The caller's namespace, under a path that others can find again: PID 1's
    namespace file or a name under /var/run/netns when one matches, otherwise
    /proc/self/ns/net (whoever reads it later checks the inode)."""
    inode = os.stat("/proc/self/ns/net").st_ino
    candidates = ["/proc/1/ns/net"]
    if os.path.isdir(NETNS_RUN_DIR):
        candidates += [os.path.join(NETNS_RUN_DIR, n) for n in sorted(os.listdir(NETNS_RUN_DIR))]
    for path in candidates:
        try:
            if os.stat(path).st_ino == inode:
                return Netns("", path, inode)
        except OSError:
            continue
    return Netns("", "/proc/self/ns/net", inode)


def _setns_check(fd: int) -> None:
    # /proc/self/ns/net of our own thread is always fine; for anything else make
    # sure it really is a network namespace file before we use it.
    import fcntl
    NS_GET_NSTYPE = 0xB703
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        raise KsbpfError("the --netns path is not a namespace file",
                         "give a name from `ip netns list` or /proc/PID/ns/net") from None
    if kind != CLONE_NEWNET:
        raise KsbpfError("the --netns path is a namespace, but not a network namespace",
                         "give /proc/PID/ns/net or a name from `ip netns list`")


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def run_in(path: str, fn: Callable[..., T], *args, **kwargs) -> T:
    """Call fn(*args, **kwargs) inside the network namespace at `path`, on
    the calling thread, and come back.  A network namespace belongs to a
    thread (setns affects only the caller), so no other thread is disturbed,
    and no thread is started: with a thousand pods' namespaces, a thread per
    call cost milliseconds each under load (a socket made inside keeps its
    namespace after we return)."""
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            return fn(*args, **kwargs)
        finally:
            _restore(own)
    finally:
        os.close(own)


def _restore(own: int) -> None:
    """Back to the thread's own namespace.  If even that fails, this thread
    would go on in another namespace (reading, attaching, guarding the wrong
    interfaces): stop the process rather than that."""
    try:
        _setns(own)
    except OSError as exc:
        os.write(2, f"ksbpf: fatal: cannot return to the thread's own network namespace: {exc}\n".encode())
        os._exit(70)


# the same, positional arguments only (kept for its callers)
run_here = run_in


def _own_cookie() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def cookie(ns: Netns) -> int:
    """The kernel's cookie for the namespace (what bpf_get_netns_cookie returns)."""
    return run_in(ns.path, _own_cookie)


def _ifindex(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def ifindex(ns: Netns, name: str) -> int | None:
    """The ifindex of interface `name` in the namespace, or None if it does not exist."""
    return run_in(ns.path, _ifindex, name)
