"""Cgroup scopes: packets the kernel sends for a scope without the scope's
socket.

TIME_WAIT answers and RSTs from TCP's control socket (whose cgroup is the
root) and ICMP errors carry the scope's tunnel address but no socket of the
scope, so the cgroup hook never sees them.  In the namespace where a scope's
tunnel lives, a netfilter link of the scope's ksbpf_nf_src program (IPv4 and
IPv6 POST_ROUTING, pinned under the scope's directory, nf_src/) drops every
packet whose SOURCE address is one of the tunnel's addresses (map
tunnel_src, also the last-known addresses of a tunnel that is gone) when it
leaves through any interface but that tunnel: reason tunnel_source.

The links are attached once the scope knows an address of its tunnel (at
attach, or when the daemon sees the tunnel's addresses): a namespace where
no tunnel of the scope was ever seen gets no hook.  Several scopes may guard
one namespace, and a second netfilter BPF link at the same (family, hook,
priority) is refused: each scope's links take the first free priority of
PRIORITIES (a replacement, too, before the old links go: make-before-break).
"""

from __future__ import annotations

import os
from functools import partial

from ksbpf.errors import KsbpfError
from ksbpf.kernel import bpf, libbpf, netns, nf, tc

DIR = "nf_src"
# before source NAT (100), after node mode's hook (-120/-119)
PRIORITIES = tuple(range(-130, -330, -1))
ABSENT = "absent: this kernel has no netfilter BPF links (Linux 6.4+)"


def _pin(pin_dir: str, family: str) -> str:
    return os.path.join(pin_dir, DIR, family)


def _attach_free(prog_fd: int) -> tuple[int, dict[str, int]]:
    """Inside the namespace: links (IPv4, IPv6) at the first priority free
    for both; (priority, family -> link fd)."""
    for priority in PRIORITIES:
        fds: dict[str, int] = {}
        try:
            for family, pf in nf.FAMILIES.items():
                fds[family] = nf.attach(prog_fd, pf, priority)
            return priority, fds
        except OSError as exc:
            for fd in fds.values():
                tc.link_detach(fd)
                os.close(fd)
            if not nf.busy(exc):
                raise
    return 0, {}


def alive(pin_dir: str) -> bool:
    """Are both of the scope's links attached?"""
    return all((i := nf.pinned_info(_pin(pin_dir, f))) is not None and i.alive for f in nf.FAMILIES)


def attach(pin_dir: str, ns: netns.Netns, runner=None) -> int:
    """Attach the scope's ksbpf_nf_src (pinned in pin_dir) in the namespace,
    IPv4 and IPv6, at the first priority free for both, and pin the links;
    returns the priority."""
    run = runner or partial(netns.run_in, ns.path)
    prog_fd = libbpf.obj_get(os.path.join(pin_dir, bpf.PIN_NAMES[bpf.ENTRY_NF_SRC]))
    try:
        priority, fds = run(_attach_free, prog_fd)
    finally:
        os.close(prog_fd)
    if not fds:
        raise KsbpfError(f"every netfilter priority ksbpf uses ({PRIORITIES[0]}..{PRIORITIES[-1]}) is taken at "
                         f"POST_ROUTING in {ns.label}", "detach scopes you no longer need, or look at `bpftool link show`")
    try:
        os.makedirs(os.path.join(pin_dir, DIR), exist_ok=True)
        for family, fd in fds.items():
            path = _pin(pin_dir, family)
            if os.path.exists(path):
                os.unlink(path)   # a dead link
            libbpf.obj_pin(fd, path)
    except OSError:
        for fd in fds.values():
            tc.link_detach(fd)
        raise
    finally:
        for fd in fds.values():
            os.close(fd)
    return priority


def ensure(pin_dir: str, ns: netns.Netns, maps: bpf.ScopeMaps, cookie: int, runner=None) -> int | None:
    """Attach the scope's links in the namespace if it knows an address of
    its tunnel there and they are not attached; the priority taken now, None
    when nothing was done."""
    if bpf.ENTRY_NF_SRC not in _pinned_entries(pin_dir):
        return None
    if not any(c == cookie for c, _a in maps.tunnel_sources()):
        return None
    if alive(pin_dir):
        return None
    return attach(pin_dir, ns, runner)


def _pinned_entries(pin_dir: str) -> set[str]:
    return {e for e in (bpf.ENTRY_NF_SRC,) if os.path.exists(os.path.join(pin_dir, bpf.PIN_NAMES[e]))}


def release(pin_dir: str) -> None:
    for family in nf.FAMILIES:
        nf.unpin(_pin(pin_dir, family))


def layer(pin_dir: str, meta: dict, maps: bpf.ScopeMaps | None = None) -> str:
    """"on", "waiting: ...", "absent: ..." or "MISSING: ..." for a cgroup scope."""
    if (meta.get("netns") or {}).get("each"):
        return "absent: not with --netns each"
    if bpf.ENTRY_NF_SRC not in _pinned_entries(pin_dir):
        return ABSENT if not nf.supported() else "absent: attached without it (`ksbpf attach` again adds it)"
    state = {f: nf.pinned_info(_pin(pin_dir, f)) for f in nf.FAMILIES}
    if all(i is None for i in state.values()):
        if maps is not None and maps.tunnel_sources():
            return "MISSING: the tunnel's addresses are known and no netfilter link is attached"
        return "waiting: no address of the tunnel seen yet (attached when one is)"
    gone = [f for f, i in state.items() if i is None or not i.alive]
    if gone:
        return f"MISSING: the {' and '.join(gone)} netfilter link is not attached"
    return "on"
