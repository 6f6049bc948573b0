"""Node mode: a whole network namespace whose traffic may leave only through
its tunnels -- what the machine forwards for its containers and VMs included.

A node scope guards every interface of the namespace that is not loopback,
not a trusted tunnel and not internal (NodePolicy.role): a tc egress program
(the shared policy, ksbpf_tc_eth or ksbpf_tc_l3 by link type) attached first
in the interface's chain, with tcx links pinned under the scope's pin
directory (pins.node_dir), or a clsact direct-action filter where the kernel
has no tcx.  Guards are replaced make-before-break: the new program is
attached in front of the old one, then the old one is removed.

This module owns the life of a node scope -- attach, guarding interfaces as
they come and go (sync_guards, used by the daemon), detach, status.  The
kernel is the only state: the attachments, plus the pins.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from ksbpf.errors import KsbpfError
from ksbpf.kernel import bpf, cgroup, libbpf, links, netns, pins, preflight, tc
from ksbpf.policy import NodePolicy
from ksbpf.reasons import Hook
from ksbpf.scopes import common

LINKS_DIR = "links"


def label(policy_netns: str) -> str:
    """The node scope's name in status, metrics and events."""
    return "node" if not policy_netns else f"node:{policy_netns}"


def resolve_mode(requested: str) -> str:
    """The attachment in use: tcx where the kernel has it (6.6+), else clsact."""
    have_tcx = tc.tcx_supported()
    if requested == "tcx" and not have_tcx:
        raise KsbpfError("this kernel has no tcx (it came with Linux 6.6)",
                         "use --tc-mode clsact (or auto, which falls back by itself)")
    if requested == "auto":
        return "tcx" if have_tcx else "clsact"
    return requested


def entry_for(link: links.Link) -> str:
    """The tc entry point for an interface: frames start with an Ethernet
    header, or with the IP header on devices without a link layer."""
    return bpf.ENTRY_TC_ETH if link.ethernet else bpf.ENTRY_TC_L3


def guarded_links(np: NodePolicy, present: list[links.Link]) -> list[links.Link]:
    return [link for link in present if np.role(link.name, link.kind, link.ifindex) == "guarded"]


def exempt_entries(np: NodePolicy) -> list[tuple[int, int]]:
    """(cgroup id, level) of each exempted cgroup subtree."""
    out = []
    for path in np.exempt_cgroups:
        cg = cgroup.resolve(path)
        out.append((cg.id, cgroup.level(cg)))
    return out


# -- one interface's guard -------------------------------------------------------

def _link_pin(pin_dir: str, ifindex: int) -> str:
    return os.path.join(pin_dir, LINKS_DIR, str(ifindex))


def _prog_ids(pin_dir: str) -> set[int]:
    ids = set()
    for entry in bpf.TC_ENTRIES:
        try:
            fd = libbpf.obj_get(os.path.join(pin_dir, bpf.PIN_NAMES[entry]))
        except OSError:
            continue
        try:
            ids.add(libbpf.prog_info(fd).id)
        finally:
            os.close(fd)
    return ids


Runner = Callable[..., object]   # runner(fn, *args) runs fn inside the namespace


def guard(pin_dir: str, ns: netns.Netns, link: links.Link, mode: str, pref: int,
          runner: Runner | None = None) -> bool:
    """Attach the scope's program to the interface's egress, first in its
    chain.  False when the interface vanished meanwhile.  runner: how to run
    inside the namespace (default: a thread that enters it for the call)."""
    prog_pin = os.path.join(pin_dir, bpf.PIN_NAMES[entry_for(link)])
    try:
        if mode == "clsact":
            tc.clsact_attach(ns.path, link.name, prog_pin, pref)
            return True
        prog_fd = libbpf.obj_get(prog_pin)
        try:
            link_fd = (runner or partial(netns.run_in, ns.path))(tc.tcx_attach, prog_fd, link.ifindex)
        finally:
            os.close(prog_fd)
        try:
            os.makedirs(os.path.join(pin_dir, LINKS_DIR), exist_ok=True)
            path = _link_pin(pin_dir, link.ifindex)
            if os.path.exists(path):
                os.unlink(path)   # a dead link of an earlier interface with this ifindex
            libbpf.obj_pin(link_fd, path)
        except OSError:
            tc.link_detach(link_fd)
            raise
        finally:
            os.close(link_fd)
        return True
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO, errno.ENOENT):
            return False
        raise
    except KsbpfError:
        if netns.ifindex(ns, link.name) is None:
            return False
        raise


def unguard(pin_dir: str, ifindex: int, mode: str, pref: int,
            ns: netns.Netns | None = None, ifname: str | None = None) -> None:
    """Remove the scope's guard from one interface (idempotent).  A clsact
    filter is found by the interface's namespace and name."""
    if mode == "clsact":
        if ns is not None and ifname:
            tc.clsact_detach(ns.path, ifname, pref)
        return
    path = _link_pin(pin_dir, ifindex)
    try:
        fd = libbpf.obj_get(path)
    except OSError:
        return
    try:
        tc.link_detach(fd)
    finally:
        os.close(fd)
        os.unlink(path)


def tcx_guard_alive(pin_dir: str, ifindex: int) -> bool:
    """Is the pinned tcx link of this interface still attached to it?"""
    try:
        fd = libbpf.obj_get(_link_pin(pin_dir, ifindex))
    except OSError:
        return False
    try:
        return tc.link_info(fd).ifindex == ifindex
    finally:
        os.close(fd)


def _pinned_ifindexes(pin_dir: str) -> list[int]:
    d = os.path.join(pin_dir, LINKS_DIR)
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def guards_in_force(pin_dir: str, ns: netns.Netns, present: list[links.Link], mode: str) -> dict[int, bool]:
    """ifindex -> is this scope's program attached to it, for every present interface."""
    if mode == "tcx":
        return {link.ifindex: tcx_guard_alive(pin_dir, link.ifindex) for link in present}
    ours = _prog_ids(pin_dir)
    return {link.ifindex: any(f.prog_id in ours for f in tc.clsact_filters(ns.path, link.name))
            for link in present}


def unguarded(pin_dir: str, np: NodePolicy, ns: netns.Netns, present: list[links.Link], mode: str) -> list[str]:
    """The interfaces that should carry this scope's guard and do not (a
    cheap check for tcx: two syscalls an interface, no lock)."""
    want = guarded_links(np, present)
    live = guards_in_force(pin_dir, ns, want, mode)
    return [link.name for link in want if not live[link.ifindex]]


@dataclass
class GuardSync:
    guarded: list[str] = field(default_factory=list)     # interfaces a guard was put on now
    released: list[str] = field(default_factory=list)    # interfaces no longer guarded (now tunnel/internal/gone)


def sync_guards(pin_dir: str, np: NodePolicy, ns: netns.Netns, present: list[links.Link],
                mode: str, pref: int, runner: Runner | None = None) -> GuardSync:
    """Guard every interface that should be guarded and is not (new, or its
    attachment disappeared), and release the ones that no longer should be
    (gone, renamed into a tunnel or an internal name)."""
    result = GuardSync()
    want = {link.ifindex: link for link in guarded_links(np, present)}
    by_index = {link.ifindex: link for link in present}
    if mode == "tcx":
        # First the interfaces that have no pin at all: surely unguarded (one that
        # just appeared), and guarded before the pins of the others are looked at.
        pinned = _pinned_ifindexes(pin_dir)
        for ifindex in sorted(want.keys() - set(pinned)):
            if guard(pin_dir, ns, want[ifindex], mode, pref, runner):
                result.guarded.append(want[ifindex].name)
        # Then every pin, looked at once: released, or its link detached (put back).
        missing = []
        for ifindex in pinned:
            alive = tcx_guard_alive(pin_dir, ifindex)
            if ifindex not in want or not alive:
                link = by_index.get(ifindex)
                unguard(pin_dir, ifindex, mode, pref, ns, link.name if link else None)
                if ifindex not in want:
                    result.released.append(link.name if link else str(ifindex))
                else:
                    missing.append(want[ifindex])
    else:
        live = guards_in_force(pin_dir, ns, present, mode)
        for link in present:
            if live.get(link.ifindex) and link.ifindex not in want:
                unguard(pin_dir, link.ifindex, mode, pref, ns, link.name)
                result.released.append(link.name)
        missing = [link for i, link in want.items() if not live.get(i)]
    for link in missing:
        if guard(pin_dir, ns, link, mode, pref, runner):
            result.guarded.append(link.name)
    return result


def _release_all(pin_dir: str, meta: dict, ns: netns.Netns | None) -> None:
    """Remove every guard a node scope's pins record (the scope's tcx links;
    its clsact filters on the namespace's interfaces)."""
    mode, pref = meta.get("tc_mode", "tcx"), meta.get("pref", tc.CLSACT_PREFS[0])
    if mode == "tcx":
        for ifindex in _pinned_ifindexes(pin_dir):
            unguard(pin_dir, ifindex, mode, pref)
    elif ns is not None and common.netns_alive(ns):
        ours = _prog_ids(pin_dir)
        for link in links.links(ns):
            for f in tc.clsact_filters(ns.path, link.name):
                if f.prog_id in ours:
                    tc.clsact_detach(ns.path, link.name, f.pref)


# -- attach -------------------------------------------------------------------------

@dataclass
class NodeAttachResult:
    name: str
    netns: str
    netns_cookie: int
    pin_dir: str
    mode: str
    prog_ids: dict[str, int]
    replaced: bool
    interfaces: list["InterfaceState"]
    tunnels: list[common.TunnelState]
    mounted_bpffs: bool

    def to_dict(self) -> dict:
        return {"scope": self.name, "netns": self.netns, "netns_cookie": self.netns_cookie,
                "pin_dir": self.pin_dir, "tc_mode": self.mode, "prog_ids": self.prog_ids,
                "replaced": self.replaced, "interfaces": [i.to_dict() for i in self.interfaces],
                "tunnels": [t.to_dict() for t in self.tunnels], "mounted_bpffs": self.mounted_bpffs}


def _read_meta(pin_dir: str) -> dict | None:
    try:
        with bpf.ScopeMaps.from_pins(pin_dir) as maps:
            return maps.read_meta()
    except (OSError, KsbpfError, ValueError):
        return None


def attach(np: NodePolicy, progress: common.Progress = common.quiet, bpffs: str = pins.BPFFS) -> NodeAttachResult:
    """Guard the namespace with `np`.  If it is already guarded, the new
    guards are put in front of the old ones before those are removed, so no
    packet leaves unjudged."""
    policy = np.policy
    preflight.require_loader(cgroup_scope=False)
    if not bpf.image_cached(policy.options, len(policy.endpoints), policy.events):
        preflight.require_compiler()
    ns = netns.resolve(policy.netns)
    cookie = netns.cookie(ns)
    mode = resolve_mode(np.tc_mode)
    exempt = exempt_entries(np)

    progress("loading the tc programs (compiled by bcc unless a cached image fits)")
    prog = bpf.load(policy.options, len(policy.endpoints), policy.events, entries=bpf.TC_ENTRIES)
    with pins.locked(f"node-{cookie}"):   # taken after compiling: others wait milliseconds, not the compiler
        try:
            present = links.links(ns)
            common.sync_tunnels(prog.maps, policy, cookie, present)
            for ep in policy.endpoints:
                prog.maps.add_endpoint(ep)
            prog.maps.set_exempt(exempt)
            prog.maps.set_netns_cookie(cookie)
            final = pins.node_dir(cookie, bpffs)
            old_meta = _read_meta(final) if os.path.isdir(final) else None
            old_pref = (old_meta or {}).get("pref", tc.CLSACT_PREFS[1])
            pref = tc.CLSACT_PREFS[0] if old_pref != tc.CLSACT_PREFS[0] else tc.CLSACT_PREFS[1]
            meta = {
                "version": common.META_VERSION, "kind": "node", "name": label(policy.netns),
                "policy": {k: v for k, v in np.to_dict().items() if k != "endpoints"},
                "netns": {"path": ns.path, "inode": ns.inode, "cookie": cookie},
                "tc_mode": mode, "pref": pref, "attached_at": time.time(),
            }
            prog.maps.write_meta(meta)
            mounted = pins.ensure_bpffs(bpffs)
            staging = final + "_new"
            pins.remove_dir(staging)  # left over by a crash
            progress(f"pinning maps under {final}")
            prog.pin(staging)
            prog_ids = {e: libbpf.prog_info(fd).id for e, fd in prog.progs.items()}
            done: list[links.Link] = []
            try:
                for link in guarded_links(np, present):
                    if guard(staging, ns, link, mode, pref):
                        done.append(link)
                        progress(f"guarding {link.name} (ifindex {link.ifindex}) with {mode}")
            except BaseException:
                for link in done:   # nothing half-applied
                    unguard(staging, link.ifindex, mode, pref, ns, link.name)
                pins.remove_dir(staging)
                raise
            replaced = old_meta is not None
            if replaced:
                progress("removing the previous guards (the new ones are already in front of them)")
                _release_all(final, old_meta, ns)
                common.carry_counters(final, meta)
                prog.maps.write_meta(meta)
            pins.remove_dir(final)
            os.rename(staging, final)
        finally:
            prog.close()
    status = read_node(final)
    return NodeAttachResult(label(policy.netns), ns.label, cookie, final, mode, prog_ids, replaced,
                            status.interfaces, status.tunnels, mounted)


# -- detach ---------------------------------------------------------------------------

@dataclass
class NodeDetachResult:
    removed_pins: list[str] = field(default_factory=list)
    detached_links: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"removed_pins": self.removed_pins, "detached_link_ids": self.detached_links}


def _remove(pin_dir: str) -> None:
    meta = _read_meta(pin_dir) or {}
    ns = None
    if meta.get("netns"):
        ns = netns.Netns("", meta["netns"].get("path", ""), meta["netns"].get("inode", 0))
    _release_all(pin_dir, meta, ns)
    pins.remove_dir(pin_dir)


def detach(netns_spec: str = "", bpffs: str = pins.BPFFS) -> NodeDetachResult:
    """Remove node mode from a namespace: its guards and pins.  Idempotent."""
    preflight.require_root()
    ns = netns.resolve(netns_spec)
    result = NodeDetachResult()
    cookie = netns.cookie(ns)
    with pins.locked(f"node-{cookie}"):
        pin_dir = pins.node_dir(cookie, bpffs)
        if os.path.isdir(pin_dir):
            _remove(pin_dir)
            result.removed_pins.append(pin_dir)
        pins.prune(bpffs)
    return result


def detach_all(bpffs: str = pins.BPFFS) -> NodeDetachResult:
    """Every node scope, and every tcx link of a ksbpf program anywhere (also
    those whose pins were removed by hand).  Call with pins.locked() held."""
    result = NodeDetachResult()
    for pin_dir in pins.list_node_dirs(bpffs):
        _remove(pin_dir)
        result.removed_pins.append(pin_dir)
    result.detached_links = tc.detach_tcx_programs(bpf.TC_ENTRIES)
    return result


# -- status ----------------------------------------------------------------------------

@dataclass(frozen=True)
class InterfaceState:
    ifindex: int
    name: str
    kind: str | None
    role: str          # loopback, tunnel, internal, guarded
    guarded: bool      # this scope's program is attached to it

    @property
    def unguarded(self) -> bool:
        """Should be guarded and is not: its traffic is NOT judged."""
        return self.role == "guarded" and not self.guarded

    def to_dict(self) -> dict:
        return {"ifindex": self.ifindex, "name": self.name, "kind": self.kind, "role": self.role,
                "guarded": self.guarded, "unguarded": self.unguarded}


@dataclass
class NodeStatus:
    name: str
    pin_dir: str
    node: NodePolicy
    mode: str
    netns_label: str
    interfaces: list[InterfaceState]
    tunnels: list[common.TunnelState]
    counters: common.Counters
    attached_at: float | None
    problems: list[str]
    events: tuple[int, int] = (0, 0)
    netns_ok: bool = True
    hook: Hook = Hook.TC

    @property
    def policy(self):
        return self.node.policy

    @property
    def attached(self) -> bool:
        """Enforced: every interface that should be guarded is."""
        return self.netns_ok and not any(i.unguarded for i in self.interfaces)

    @property
    def dropped_packets(self) -> int:
        return sum(p for (r, _f), (p, _b) in self.counters.items() if not r.allowed)

    def to_dict(self) -> dict:
        return {
            "scope": self.name, "kind": "node", "netns": self.netns_label, "pin_dir": self.pin_dir,
            "tc_mode": self.mode, "attached": self.attached,
            "interfaces": [i.to_dict() for i in self.interfaces],
            "tunnels": [t.to_dict() for t in self.tunnels],
            "internal": list(self.node.internal), "exempt_cgroups": list(self.node.exempt_cgroups),
            "endpoints": [str(e) for e in self.policy.endpoints],
            "options": vars(self.policy.options).copy(), "tunnel_kinds": list(self.policy.tunnel_kinds),
            "counters": common.counters_dict(self.counters), "dropped_packets": self.dropped_packets,
            "events": {"rate": self.policy.events.rate, "burst": self.policy.events.burst,
                       "sent": self.events[0], "suppressed": self.events[1]},
            "attached_at": self.attached_at, "problems": self.problems,
        }


def read_node(pin_dir: str, link_cache: dict | None = None) -> NodeStatus:
    """Everything about one node scope, from its pins and the kernel."""
    problems: list[str] = []
    with bpf.ScopeMaps.from_pins(pin_dir) as maps:
        meta = maps.read_meta()
        if meta.get("version") != common.META_VERSION or meta.get("kind") != "node":
            raise KsbpfError(f"{pin_dir} holds a scope of another ksbpf version ({meta.get('version')})",
                             "attach it again: ksbpf attach --node ...")
        entries = maps.tunnels()
        np = NodePolicy.from_dict({**meta["policy"], "endpoints": [str(e) for e in maps.endpoints()]})
        counters = common.total_counters(maps, meta)
        event_stats = maps.event_stats()
    ns = common.meta_netns(meta)
    mode = meta.get("tc_mode", "tcx")
    ns_ok = common.netns_alive(ns) and netns.cookie(ns) == meta["netns"].get("cookie")
    interfaces: list[InterfaceState] = []
    present: list[links.Link] | None = None
    cookie = None
    if ns_ok:
        cache = link_cache if link_cache is not None else {}
        if ns.inode not in cache:
            cache[ns.inode] = (netns.cookie(ns), links.links(ns))
        cookie, present = cache[ns.inode]
        live = guards_in_force(pin_dir, ns, present, mode)
        for link in present:
            interfaces.append(InterfaceState(link.ifindex, link.name, link.kind,
                                             np.role(link.name, link.kind, link.ifindex), live[link.ifindex]))
        problems += [f"UNGUARDED: {i.name} (ifindex {i.ifindex}): its traffic is not judged "
                     f"(run the daemon, or `ksbpf attach --node` again)" for i in interfaces if i.unguarded]
    else:
        problems.append(f"network namespace {ns.label} is gone or not the one the scope was attached in")
    registered = {e.ifindex for e in entries if e.netns_cookie == cookie}
    tunnels = common.tunnel_states(np.policy, ns.label, present, registered)
    return NodeStatus(meta.get("name", label(np.policy.netns)), pin_dir, np, mode, ns.label, interfaces, tunnels,
                      counters, meta.get("attached_at"), problems, event_stats, ns_ok)


@dataclass
class NodeEnsureResult:
    action: str   # "adopted", "attached", "replaced"
    pin_dir: str
    attach: NodeAttachResult | None = None


def ensure(np: NodePolicy, progress: common.Progress = common.quiet, bpffs: str = pins.BPFFS) -> NodeEnsureResult:
    """Make the namespace guarded by exactly `np`: a node scope already in
    force with that policy and every guard in place is adopted untouched."""
    preflight.require_root()
    ns = netns.resolve(np.policy.netns)
    pin_dir = pins.node_dir(netns.cookie(ns), bpffs)
    if os.path.isdir(pin_dir):
        try:
            current = read_node(pin_dir)
        except (OSError, KsbpfError, ValueError):
            current = None
        if current and current.attached and current.node == np:
            return NodeEnsureResult("adopted", pin_dir)
    result = attach(np, progress, bpffs)
    return NodeEnsureResult("replaced" if result.replaced else "attached", pin_dir, result)
