"""Dropping privileges before running a program in a scope, and reading a
process's capabilities.

Raw AF_PACKET sockets bypass the cgroup egress hook, and opening one takes
CAP_NET_RAW: a program `ksbpf exec` starts for a user gets no capability at
all -- the bounding set and the ambient set emptied, the effective,
permitted and inheritable sets cleared -- and no-new-privileges, so that no
set-uid or file-capability binary it runs can get one back.
"""

from __future__ import annotations

import ctypes
import os
import pwd
from dataclasses import dataclass

from ksbpf.errors import KsbpfError

CAP_NET_RAW = 13
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
KEPT_ENV = ("TERM", "COLORTERM", "LANG", "LANGUAGE", "DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY")

_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise KsbpfError(f"cannot drop privileges ({what}): {os.strerror(err)}",
                         "run ksbpf exec as root (it needs to join the cgroup and change user)")


@dataclass(frozen=True)
class Target:
    """Who the program runs as."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str

    @classmethod
    def lookup(cls, user: str) -> "Target":
        try:
            pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            raise KsbpfError(f"no user {user!r}", "give a user name or uid from /etc/passwd (--user NAME)") from None
        return cls(pw.pw_name, pw.pw_uid, pw.pw_gid, tuple(os.getgrouplist(pw.pw_name, pw.pw_gid)),
                   pw.pw_dir, pw.pw_shell or "/bin/sh")

    def environment(self, old: dict[str, str]) -> dict[str, str]:
        """A clean environment for the user: identity, home, a plain PATH, and
        the terminal, locale and display variables of the caller."""
        env = {k: v for k, v in old.items() if k in KEPT_ENV or k.startswith("LC_")}
        env.update(HOME=self.home, USER=self.name, LOGNAME=self.name, SHELL=self.shell, PATH=DEFAULT_PATH)
        runtime = f"/run/user/{self.uid}"
        if os.path.isdir(runtime):
            env["XDG_RUNTIME_DIR"] = runtime
        return env


def default_user(env: dict[str, str]) -> str | None:
    """The sudo caller, when ksbpf runs through sudo (and the caller is not root)."""
    user = env.get("SUDO_USER")
    return user if user and user != "root" else None


def hidden(pid: int) -> bool:
    """Is the process alive but invisible in this /proc (hidepid=invisible, as
    systemd's ProtectProc=invisible mounts it)?  Opening its namespace then
    fails for want of visibility, not of capability."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not os.path.exists(f"/proc/{pid}")


def last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def drop_to(target: Target) -> None:
    """Become `target` with no capability and no-new-privileges (the calling
    process: call it just before exec)."""
    for cap in range(last_cap() + 1):   # needs CAP_SETPCAP: before changing user
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"bounding set, capability {cap}")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "ambient set")
    os.setgroups(list(target.groups))
    os.setresgid(target.gid, target.gid, target.gid)
    os.setresuid(target.uid, target.uid, target.uid)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()   # all zero: effective, permitted and inheritable cleared (also for uid 0)
    _check(_libc.capset(ctypes.byref(header), data), "capability sets")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no-new-privileges")


def capabilities(pid: int) -> dict[str, int]:
    """CapEff, CapPrm, CapInh, CapBnd, CapAmb of a process, as bit masks."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Cap"):
                key, value = line.split(":")
                out[key] = int(value, 16)
    return out


def holds(pid: int, cap: int) -> bool:
    """Does the process hold `cap` (effective or permitted)?"""
    try:
        caps = capabilities(pid)
    except OSError:
        return False
    return bool((caps.get("CapEff", 0) | caps.get("CapPrm", 0)) >> cap & 1)
