"""Who may change the configuration: root only (like sshd's StrictModes).

The configuration is a security boundary: whoever can edit it can name any
interface a tunnel, or drop a scope.  A configuration file, or a directory
above it, that anyone but root can write is refused.  A root-owned sticky
directory such as /tmp is fine: others may create entries in it but cannot
replace or remove root's.  Both the path as given and the path its symbolic
links resolve to are checked.  (POSIX ACLs are not looked at.)
"""

from __future__ import annotations

import os
import stat

from ksbpf.errors import KsbpfError


def _who_can_write(st: os.stat_result, is_dir: bool) -> str | None:
    """Who besides root could change this file or directory entry, or None."""
    if st.st_uid != 0:
        return f"its owner (uid {st.st_uid})"
    if is_dir and st.st_mode & stat.S_ISVTX:
        return None   # sticky and root's: others cannot rename or remove root's entries
    if st.st_mode & stat.S_IWOTH:
        return "everyone"
    if st.st_mode & stat.S_IWGRP and st.st_gid != 0:
        return f"group {st.st_gid}"
    return None


def _parents(path: str) -> list[str]:
    out, p = [], os.path.dirname(path)
    while True:
        out.append(p)
        if p == os.path.dirname(p):
            return out
        p = os.path.dirname(p)


def require_root_only(path: str, fd: int) -> None:
    """Raise KsbpfError unless the open file `fd` (read from `path`) and every
    directory above it can be written by root only."""
    checks = [(path, os.fstat(fd), False)]
    for base in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
        checks += [(d, os.stat(d), True) for d in _parents(base)]
    for where, st, is_dir in checks:
        who = _who_can_write(st, is_dir)
        if who is not None:
            what = "the configuration file" if where == path else f"the directory {where} above it"
            raise KsbpfError(
                f"refusing the configuration {path}: {what} can be written by {who} "
                f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}), and whoever can write it "
                "decides what may bypass the tunnel",
                f"make it and every directory above it owned by root and writable only by root: "
                f"chown root:root {where} && chmod go-w {where}")
