"""The node daemon: keeps every configured scope's tunnel map true to the
kernel's interfaces, from netlink events, and never opens a gap.

- Start-up adopts what is already in force (attached by hand, by the boot
  unit, by an earlier daemon): no detach, no re-attach.  A scope whose policy
  differs is replaced make-before-break.
- Per network namespace: subscribe, dump, reconcile, then apply events.  A
  tunnel is an interface with the tunnel's name AND a trusted link kind; one
  that disappears leaves the map at once, one that appears enters it at once.
- Node mode ([node]): every new interface of the node's namespace that is
  not a tunnel or internal is guarded the moment netlink reports it, and a
  guard that disappeared (detached by hand) is put back within a second.
- SIGHUP reloads the configuration; SIGTERM/SIGINT exit WITHOUT detaching:
  enforcement stays in the kernel, and so it does after kill -9.
- Routes added outside the tunnel while a scope is protected are reported
  (TunnelVision, CVE-2024-3661): the policy keeps that traffic blocked, the
  log tells the user why their connection broke.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from functools import partial

from ksbpf.daemon import config
from ksbpf.daemon.follow import SubtreeWatch
from ksbpf.daemon.log import EventLog
from ksbpf.errors import KsbpfError
from ksbpf.kernel import bpf, features, links, netns, pins, rawsock, vpn_dns, vpn_endpoints
from ksbpf.policy import LAN_RANGES, NodePolicy, Policy
from ksbpf.scopes import cgroups, common, dns_followed, followed, subtree, tunnel_source
from ksbpf.scopes import node as node_scope

RETRY_SECONDS = 5.0     # scopes that could not be applied are retried this often
RESYNC_SECONDS = 60.0   # full link dump and reconcile, in case an event was ever missed
COMPILING = "waiting for its program to be compiled (helper process)"
GUARD_CHECK_SECONDS = 1.0   # node mode: are the guards still attached (nothing tells us when one is removed)
PENDING_SECONDS = 2.0   # netns "each": a reported namespace not found at once is looked for this long ...
PENDING_INTERVAL = 0.005   # ... this often
# --endpoint auto: WireGuard tells nobody when a peer's endpoint changes, so it is asked
FOLLOW_SECONDS = 0.1         # this often (a UAPI or genl round trip per tunnel: ~0.1 ms),
FOLLOW_FAST_SECONDS = 0.02   # ... and this often
FOLLOW_FAST_FOR = 5.0        # ... for this long after a tunnel appears or changes (its first handshake)
# dns = ["auto"]: the tunnel's resolvers (resolved's per-link DNS, wg-quick's DNS =) are read again this often,
# and at once when a tunnel appears or changes
DNS_FOLLOW_SECONDS = 1.0
DNS_READ_TIMEOUT = 1.0   # resolvectl's answer is waited for this long (the loop waits meanwhile) ...
DNS_UNREADABLE_SECONDS = 30.0   # ... and after it did not come, asked again only this much later


@dataclass
class ScopeState:
    """A configured scope the daemon keeps in step."""

    cgroup: str
    policy: Policy
    create_cgroup: bool
    pin_dir: str | None = None   # set once applied
    ns: netns.Netns | None = None
    error: str | None = None     # why it could not be applied (retried)
    in_step: bool = False        # its map was reconciled with the latest link state
    source: str = "config"       # who asked for it: the configuration file, or a source (kubernetes)
    follow: SubtreeWatch | None = None                    # netns = "each": the subtree's signals
    spaces: dict[int, subtree.NsUse] = field(default_factory=dict)   # ... and the namespaces it uses
    denied: bool = False                                  # ... some of whose processes we may not open
    pending: dict[int, float] = field(default_factory=dict)   # reported cookies not registered yet -> give up at
    follow_at: float = 0.0       # --endpoint auto: when the tunnels' endpoints are read next
    follow_fast_until: float = 0.0
    follow_failed: tuple[str, ...] = ()   # the sources that could not be read last time (logged once)
    followed_addrs: frozenset = frozenset()   # the addresses followed now (a route to one is no TunnelVision)
    labels: dict | None = None   # a source's names for the scope in metrics (kubernetes: namespace, pod)
    dns_at: float = 0.0          # dns = ["auto"]: when the tunnel's resolvers are read next
    dns_source: str | None = None   # ... where they were read last (None: none configured)

    @property
    def name(self) -> str:
        return self.cgroup

    @property
    def compiling(self) -> bool:
        """Waiting for a helper to compile its program: a moment, not a failure."""
        return self.error == COMPILING

    @property
    def each(self) -> bool:
        return subtree.is_each(self.policy)


@dataclass
class NodeState:
    """The configured node scope the daemon keeps guarded."""

    node: NodePolicy
    pin_dir: str | None = None   # set once applied
    ns: netns.Netns | None = None
    mode: str = "tcx"
    pref: int = 1
    error: str | None = None
    in_step: bool = False        # every interface that needs a guard has one
    # ifindex -> ids of the programs found in front of its guard that could not be got ahead of
    # (reported once, not every check)
    front_kept: dict[int, tuple[int, ...]] = field(default_factory=dict)
    follow_at: float = 0.0       # --endpoint auto (see ScopeState)
    follow_fast_until: float = 0.0
    follow_failed: tuple[str, ...] = ()
    followed_addrs: frozenset = frozenset()
    dns_at: float = 0.0          # dns = ["auto"] (see ScopeState)
    dns_source: str | None = None

    @property
    def name(self) -> str:
        return node_scope.label(self.node.policy.netns)

    @property
    def policy(self) -> Policy:
        return self.node.policy


@dataclass
class Namespace:
    """One network namespace watched for the scopes whose tunnels live there."""

    ns: netns.Netns
    watch: links.NetlinkWatch
    cookie: int
    links: dict[int, links.Link] = field(default_factory=dict)

    def close(self) -> None:
        self.watch.close()
        vpn_endpoints.forget(self.ns.inode)   # --endpoint auto: its WireGuard genl socket, if one was opened


class Daemon:
    def __init__(self, config_path: str, log: EventLog):
        self.config_path = config_path
        self.log = log
        self.scopes: dict[str, ScopeState] = {}
        self.namespaces: dict[int, Namespace] = {}   # by namespace inode
        self.node: NodeState | None = None
        self.route_alerts = 0
        self.guards_displaced = 0   # node mode: times a program was found in front of a guard
        self.netlink_events = dict.fromkeys(("RTM_NEWLINK", "RTM_DELLINK", "RTM_NEWROUTE", "RTM_DELROUTE"), 0)
        self.heartbeat = time.monotonic()   # when the main loop last turned (/healthz)
        self.ready = False                  # the first apply is done (/readyz)
        self._signals: list[int] = []
        self.sources: list = []             # other sources of scopes (Kubernetes pods): fileno, deadline, handle
        self.compiler = None                # compiles in helper processes once the loop runs (never in the daemon)
        self.pool = None                    # programs verified ahead of time (with a source of scopes)
        self.verifier = None                # the zero-traffic check's thread (ksbpf/daemon/verifier.py)
        # set while the main loop waits for work: the verifier's thread checks a scope only then (or after
        # waiting Verifier.IDLE_WAIT_MAX), so that its Python work does not hold the GIL against a pod
        # being protected
        self.idle = threading.Event()
        # set while no /metrics scrape runs: the verifier's thread waits for that too (a scrape of 1,000
        # pods is ~20 ms of Python alone, ~4x that while sharing the GIL with a check)
        self.unscraped = threading.Event()
        self.unscraped.set()
        self.openvpn: dict[str, vpn_endpoints.OpenVPNManagement] = {}   # --endpoint auto:PATH, held open

    # -- configuration ---------------------------------------------------------
    def load(self) -> config.Config:
        return config.load(self.config_path)

    def apply(self, cfg: config.Config) -> None:
        """Bring the kernel to `cfg`: ensure each scope, detach removed ones,
        then (re)build the namespace watches and reconcile."""
        self._apply_node_config(cfg)
        wanted = {sc.cgroup: sc for sc in cfg.scopes}
        for path in [p for p, st in self.scopes.items() if p not in wanted and st.source == "config"]:
            result = cgroups.detach(path)
            self.log("scope_removed", scope=path, detached=result.detached_prog_ids)
            self._unfollow(self.scopes.pop(path))
        for path, sc in wanted.items():
            old = self.scopes.get(path)
            policy = sc.policy
            if old is None or not _same(old.policy, policy) or old.error:
                if old is not None:
                    self._unfollow(old)
                self.scopes[path] = ScopeState(path, policy, sc.create_cgroup)
                self._apply_scope(self.scopes[path])
        self._rebuild_watches()

    def add_scope(self, cgroup: str, policy: Policy, source: str, labels: dict | None = None) -> ScopeState:
        """A scope asked for by a source: ensured now (adopted when already in force)."""
        st = self.scopes.get(cgroup)
        if st is None or not _same(st.policy, policy) or (st.error and st.error != COMPILING):
            old = self.scopes.get(cgroup)
            st = self.scopes[cgroup] = ScopeState(cgroup, policy, False, source=source, labels=labels)
            self._apply_scope(st)
            self._watch_one(st)   # only its namespace: adding one scope costs the same with 1 or 1,000
            if old and old.ns and (not st.ns or old.ns.inode != st.ns.inode):
                self._unwatch_if_unused(old.ns.inode)
        elif labels is not None:
            st.labels = labels
        return st

    def remove_scope(self, cgroup: str) -> None:
        st = self.scopes.pop(cgroup, None)
        if st is not None:
            result = cgroups.detach(cgroup)
            self.log("scope_removed", scope=cgroup, detached=result.detached_prog_ids, pins=result.removed_pins)
            if st.ns:
                self._unwatch_if_unused(st.ns.inode)

    def _watch_one(self, st: ScopeState) -> None:
        """Watch (subscribe, then dump) the scope's namespace if nobody does yet, and reconcile it."""
        if st.ns is None or st.pin_dir is None:
            return
        space = self.namespaces.get(st.ns.inode)
        if space is None:
            space = self.namespaces[st.ns.inode] = Namespace(st.ns, links.NetlinkWatch(st.ns), netns.cookie(st.ns))
            self._resync(space)
        self._reconcile(space)

    def _unwatch_if_unused(self, inode: int) -> None:
        used = any((s.ns and s.ns.inode == inode) or any(u.inode == inode for u in s.spaces.values())
                   for s in self.scopes.values())
        if inode in self.namespaces and not used and not (self.node and self.node.ns and self.node.ns.inode == inode):
            self.namespaces.pop(inode).close()

    def _precompile(self, cfg: config.Config) -> None:
        """Before the loop: compile what the configured scopes need in helper
        processes (waited for), so the compiler never sits in the daemon's memory."""
        from ksbpf.kernel.compiler import compile_now
        todo = {(sc.policy.options, len(sc.policy.endpoints), sc.policy.events) for sc in cfg.scopes
                if not bpf.image_cached(sc.policy.options, len(sc.policy.endpoints), sc.policy.events)}
        for options, n, events in todo:
            ok, error = compile_now(options, n, events)
            if not ok:
                self.log("compile_failed", level="error", error=error[-500:])

    def _compiled(self, ok: bool, error: str) -> None:
        """A helper compiler ended: apply the scopes that waited for it."""
        if not ok:
            self.log("compile_failed", level="error", error=error[-500:])
        for st in [s for s in self.scopes.values() if s.error == COMPILING]:
            self._apply_scope(st)
            self._watch_one(st)

    def _start_sources(self, cfg: config.Config) -> None:
        from ksbpf.kernel.compiler import Compiler
        self.compiler = Compiler(self._compiled)
        self.sources.append(self.compiler)
        if cfg.kubernetes.enabled:
            from ksbpf.kernel.pool import ProgramPool
            self.pool = ProgramPool()
            from ksbpf.kubernetes.pods import PodSource
            self.sources.append(PodSource(cfg.kubernetes, self))

    def _apply_scope(self, st: ScopeState) -> None:
        try:
            if st.create_cgroup and not os.path.exists(st.cgroup):
                os.makedirs(st.cgroup)
                self.log("cgroup_created", scope=st.cgroup)
            if self.compiler and not self.compiler.ready(st.policy.options, len(st.policy.endpoints), st.policy.events):
                if st.error == COMPILING:
                    return
                st.error = COMPILING   # the helper's end retries it
                self.log("scope_compiling", scope=st.cgroup, note="the program for this option set is compiled "
                         "in a helper process; the scope is attached when it is done")
                return
            result = cgroups.ensure(st.cgroup, st.policy, loader=self.pool.load if self.pool else None)
            st.pin_dir, st.error = result.pin_dir, None
            st.ns = None if st.each else netns.resolve(st.policy.netns)
            if st.each:
                self._follow(st)
            fields = {}
            if result.attach:
                fields = {"prog_id": result.attach.prog_id, "replaced": result.attach.replaced}
            self.log(f"scope_{result.action}", scope=st.cgroup, pins=st.pin_dir,
                     tunnels=list(st.policy.tunnels), netns=st.ns.label if st.ns else subtree.EACH, **fields)
            self._verify_soon(st.cgroup)
        except (KsbpfError, OSError) as exc:
            st.error = str(exc)
            self.log("scope_failed", level="error", scope=st.cgroup, error=st.error,
                     retry_in=RETRY_SECONDS)

    def _apply_node_config(self, cfg: config.Config) -> None:
        want = cfg.node.node if cfg.node else None
        if self.node is not None and not _same_node(self.node.node, want):
            if want is None:
                result = node_scope.detach(self.node.node.policy.netns)
                self.log("node_removed", scope=self.node.name, pins=result.removed_pins)
            self.node = None
        if want is not None and (self.node is None or self.node.error):
            self.node = NodeState(want)
            self._apply_node(self.node)

    def _apply_node(self, st: NodeState) -> None:
        try:
            result = node_scope.ensure(st.node)
            status = node_scope.read_node(result.pin_dir)
            st.pin_dir, st.ns, st.error = result.pin_dir, netns.resolve(st.node.policy.netns), None
            with bpf.ScopeMaps.from_pins(st.pin_dir) as maps:
                meta = maps.read_meta()
            st.mode, st.pref = meta["tc_mode"], meta["pref"]
            self.log(f"node_{result.action}", scope=st.name, pins=st.pin_dir, tc_mode=st.mode, netns=st.ns.label,
                     guarded=[i.name for i in status.interfaces if i.guarded],
                     internal=[i.name for i in status.interfaces if i.role == "internal"],
                     tunnels=list(st.node.policy.tunnels))
            self._verify_soon(st.name)
        except (KsbpfError, OSError) as exc:
            st.error = str(exc)
            self.log("node_failed", level="error", scope=st.name, error=st.error, retry_in=RETRY_SECONDS)

    def _named(self, inode: int) -> bool:
        """Is the namespace one a scope or the node names (not one found by following a subtree)?"""
        return (any(st.ns and st.ns.inode == inode for st in self.scopes.values())
                or bool(self.node and self.node.ns and self.node.ns.inode == inode))

    def _rebuild_watches(self) -> None:
        needed = {st.ns.inode: st.ns for st in self.scopes.values() if st.ns}
        if self.node and self.node.ns:
            needed[self.node.ns.inode] = self.node.ns
        for st in self.scopes.values():
            for use in st.spaces.values():
                needed.setdefault(use.inode, use.netns())
        for inode in [i for i in self.namespaces if i not in needed]:
            space = self.namespaces.pop(inode)
            space.close()
            if not self._named(inode):
                self.log("netns_gone", netns=space.ns.label, inode=inode)
        for inode, ns in needed.items():
            if inode not in self.namespaces:
                # subscribe first, then dump: nothing can fall in between
                try:
                    space = Namespace(ns, links.NetlinkWatch(ns), netns.cookie(ns))
                except OSError:   # --netns each: its last process exited while we looked
                    continue
                if not subtree.still(ns):   # ... or moved to another namespace meanwhile
                    space.watch.close()
                    continue
                self.namespaces[inode] = space
                if not self._named(inode):
                    self.log("netns_found", netns=ns.label, inode=inode, cookie=self.namespaces[inode].cookie)
                self._resync(self.namespaces[inode])
        for space in self.namespaces.values():
            self._reconcile(space)
        for st in self.scopes.values():
            if st.each and st.pin_dir:
                self._prune_each(st)

    # -- netns = "each": following the subtree --------------------------------------
    def _follow(self, st: ScopeState) -> None:
        if st.follow is None:
            st.follow = SubtreeWatch(st.cgroup, st.pin_dir)
        st.spaces = self._in_use(st)

    def _in_use(self, st: ScopeState) -> dict:
        denied: list[int] = []
        spaces = subtree.in_use(st.cgroup, denied)
        if denied and not st.denied:
            self.log("netns_denied", level="error", scope=st.cgroup, pids=denied[:10], error=subtree.DENIED_HINT)
        st.denied = bool(denied)
        return spaces

    def _unfollow(self, st: ScopeState) -> None:
        if st.follow is not None:
            st.follow.close()
            st.follow = None
        st.spaces = {}

    def _on_subtree(self, st: ScopeState) -> None:
        """The subtree changed, or a socket was created in a namespace not yet
        registered: rescan it and follow its namespaces."""
        changes, reported = st.follow.drain()
        for cookie, cg_id, pid in reported:
            self.log("netns_reported", scope=st.cgroup, cookie=cookie, pid=pid, cgroup_id=cg_id)
            st.pending[cookie] = time.monotonic() + PENDING_SECONDS
        self._rescan(st, force=bool(reported))

    def _rescan(self, st: ScopeState, force: bool = False) -> None:
        before = set(st.spaces)
        st.spaces = self._in_use(st)
        if set(st.spaces) != before or force:
            self._rebuild_watches()
        # a reported namespace not found yet (its process was between two
        # steps of our scan): looked for again shortly, for a while
        found = {space.cookie for i, space in self.namespaces.items() if i in st.spaces}
        now = time.monotonic()
        st.pending = {c: t for c, t in st.pending.items() if c not in found and t > now}

    def _prune_each(self, st: ScopeState) -> None:
        """Entries of namespaces the subtree no longer uses leave the scope's map."""
        cookies = {self.namespaces[i].cookie for i in st.spaces if i in self.namespaces}
        try:
            with pins.locked(), bpf.ScopeMaps.from_pins(st.pin_dir) as maps:
                stale = {e.netns_cookie for e in maps.tunnels()} | set(subtree.known(maps))
                for cookie in stale - cookies:
                    removed = subtree.forget(maps, cookie)
                    if removed:
                        self.log("map_update", scope=st.cgroup, added=[], removed=removed, netns_cookie=cookie,
                                 note="namespace no longer used by the subtree")
            st.in_step = True
        except (OSError, KsbpfError) as exc:
            self.log("map_update_failed", level="error", scope=st.cgroup, error=str(exc))

    # -- keeping maps in step ------------------------------------------------------
    def _scopes_in(self, space: Namespace) -> list[ScopeState]:
        return [st for st in self.scopes.values() if st.pin_dir and
                ((st.ns and st.ns.inode == space.ns.inode) or space.ns.inode in st.spaces)]

    def _resync(self, space: Namespace) -> None:
        old, space.links = space.links, {link.ifindex: link for link in space.watch.links()}
        for ifindex in sorted(old.keys() | space.links.keys()):
            if old.get(ifindex) != space.links.get(ifindex):
                self._note_link(space, old.get(ifindex), space.links.get(ifindex))

    def _node_in(self, space: Namespace) -> NodeState | None:
        st = self.node
        return st if st and st.ns and st.pin_dir and st.ns.inode == space.ns.inode and not st.error else None

    def _guard(self, space: Namespace) -> None:
        """Node mode: a guard on every interface that needs one, first of all."""
        st = self._node_in(space)
        if st is None:
            return
        present = list(space.links.values())
        try:
            with pins.locked(f"node-{space.cookie}"):
                result = node_scope.sync_guards(st.pin_dir, st.node, space.ns, present, st.mode, st.pref,
                                                partial(netns.run_here, space.ns.path))
                with bpf.ScopeMaps.from_pins(st.pin_dir) as maps:
                    tunnels = common.sync_tunnels(maps, st.node.policy, space.cookie, present)
        except (OSError, KsbpfError) as exc:
            self.log("guard_failed", level="error", scope=st.name, error=str(exc))
            st.error, st.in_step = str(exc), False   # re-applied by the retry timer
            return
        st.in_step = True
        by_name = {link.name: link for link in present}
        for name in result.guarded:
            self.log("interface_guarded", scope=st.name, interface=name, netns=space.ns.label,
                     ifindex=by_name[name].ifindex if name in by_name else None, tc_mode=st.mode)
        for name in result.released:
            self.log("interface_released", scope=st.name, interface=name, netns=space.ns.label)
        if tunnels.added or tunnels.removed:
            self.log("map_update", scope=st.name, added=tunnels.added, removed=tunnels.removed, netns=space.ns.label)

    def _guard_new(self, space: Namespace, link: links.Link) -> None:
        """Node mode: an interface that just appeared is guarded at once, before
        the rest of its batch is handled (the full sync follows)."""
        st = self._node_in(space)
        if st is None or st.node.role(link.name, link.kind, link.ifindex) != "guarded":
            return
        try:
            with pins.locked(f"node-{space.cookie}"):
                done = node_scope.guard(st.pin_dir, space.ns, link, st.mode, st.pref,
                                        partial(netns.run_here, space.ns.path))
        except (OSError, KsbpfError) as exc:
            self.log("guard_failed", level="error", scope=st.name, interface=link.name, error=str(exc))
            return   # the full sync that follows tries again
        if done:
            self.log("interface_guarded", scope=st.name, interface=link.name, netns=space.ns.label,
                     ifindex=link.ifindex, tc_mode=st.mode)

    def _check_guards(self) -> None:
        """Nothing tells us when someone detaches a guard: look (cheaply), and repair."""
        for space in self.namespaces.values():
            st = self._node_in(space)
            if st is None:
                continue
            try:
                missing = node_scope.unguarded(st.pin_dir, st.node, space.ns, list(space.links.values()), st.mode)
            except (OSError, KsbpfError):
                missing = ["?"]
            if missing:
                self.log("guard_missing", level="warning", scope=st.name, interfaces=missing, netns=space.ns.label)
                self._guard(space)
            self._check_first(space, st)

    def _check_first(self, space: Namespace, st: NodeState) -> None:
        """A program put in front of a guard can pass what the guard would drop:
        say so, and put the guard first again (make before break, tcx)."""
        runner = partial(netns.run_here, space.ns.path)
        for link in node_scope.guarded_links(st.node, list(space.links.values())):
            try:
                front = node_scope.programs_in_front(st.pin_dir, space.ns, link, st.mode, runner)
            except (OSError, KsbpfError) as exc:
                self.log("guard_check_failed", level="error", scope=st.name, interface=link.name, error=str(exc))
                continue
            key = tuple(p.prog_id for p in front)
            if not front or st.front_kept.get(link.ifindex) == key:
                if not front:
                    st.front_kept.pop(link.ifindex, None)
                continue
            self.guards_displaced += 1
            self.log("guard_not_first", level="error", scope=st.name, interface=link.name, netns=space.ns.label,
                     ifindex=link.ifindex, in_front=[p.to_dict() for p in front],
                     note="a program in front of the guard can pass what it would drop",
                     fix=node_scope.front_fix(link.name, front, st.mode))
            try:
                with pins.locked(f"node-{space.cookie}"):
                    # looked at again under the lock: a `ksbpf attach --node` may have just put a new guard first
                    still = node_scope.programs_in_front(st.pin_dir, space.ns, link, st.mode, runner)
                    done = not still or node_scope.put_first(st.pin_dir, space.ns, link, st.mode, runner)
            except (OSError, KsbpfError) as exc:
                done, error = False, str(exc)
            else:
                error = None if done else f"{st.mode}: no way to run before {front[0]}"
            if done:
                st.front_kept.pop(link.ifindex, None)
                self.log("guard_put_first", level="warning", scope=st.name, interface=link.name,
                         netns=space.ns.label, ifindex=link.ifindex, behind=[p.prog_id for p in front])
            else:
                st.front_kept[link.ifindex] = key   # verify keeps failing (ksbpf_verify_failures) until it is removed
                self.log("guard_not_first_kept", level="error", scope=st.name, interface=link.name, error=error,
                         fix=node_scope.front_fix(link.name, front, st.mode))
            self._verify_soon(st.name)

    def _reconcile(self, space: Namespace) -> None:
        self._guard(space)
        if (nst := self._node_in(space)) is not None and nst.policy.follow:
            self._follow_endpoints(nst, space)
        present = list(space.links.values())
        addresses = None
        for st in self._scopes_in(space):
            sources: list[str] = []
            try:
                with pins.locked(f"cgroup-{os.path.basename(st.pin_dir)}"), bpf.ScopeMaps.from_pins(st.pin_dir) as maps:
                    if st.each:
                        result = common.SyncResult(*subtree.sync_namespace(maps, st.policy, space.cookie, present))
                    else:
                        result = common.sync_tunnels(maps, st.policy, space.cookie, present)
                        if "tunnel_src" in maps.fds:   # the tunnel's addresses, for the netfilter hook
                            if addresses is None:
                                addresses = space.watch.addresses()
                            sources = common.sync_tunnel_sources(maps, st.policy, space.cookie, present, addresses)
                            priority = tunnel_source.ensure(st.pin_dir, space.ns, maps, space.cookie,
                                                            partial(netns.run_here, space.ns.path))
                            if priority is not None:
                                self.log("tunnel_source_hook", scope=st.cgroup, netns=space.ns.label,
                                         priority=priority)
            except (OSError, KsbpfError) as exc:
                self.log("map_update_failed", level="error", scope=st.cgroup, error=str(exc))
                st.error, st.in_step = str(exc), False   # re-applied by the retry timer
                continue
            st.in_step = True
            if sources:
                self.log("tunnel_sources", scope=st.cgroup, added=sources, netns=space.ns.label)
            if result.added or result.removed:
                self.log("map_update", scope=st.cgroup, added=result.added, removed=result.removed,
                         netns=space.ns.label)
                self._verify_soon(st.cgroup)
            if st.policy.follow and not st.each:
                self._follow_endpoints(st, space)

    # -- --endpoint auto: the endpoint maps follow the tunnels --------------------------
    def _followers(self) -> list:
        """The scopes (and the node) whose endpoints follow their tunnels."""
        out = [st for st in self.scopes.values() if st.policy.follow and st.pin_dir and st.ns and not st.error]
        if self.node and self.node.policy.follow and self.node.pin_dir and self.node.ns and not self.node.error:
            out.append(self.node)
        return out

    def _follow_endpoints(self, st, space: Namespace) -> None:
        """Read what the tunnels use now and bring the endpoint maps to it
        (the new endpoint in before the old one leaves)."""
        now = time.monotonic()
        st.follow_at = now + (FOLLOW_FAST_SECONDS if now < st.follow_fast_until else FOLLOW_SECONDS)
        try:
            found, failed = followed.read_now(st.policy, space.ns, list(space.links.values()), self._openvpn_said)
            lock = f"node-{space.cookie}" if st is self.node else f"cgroup-{os.path.basename(st.pin_dir)}"
            with pins.locked(lock), bpf.ScopeMaps.from_pins(st.pin_dir) as maps:
                result = followed.sync(maps, st.policy, found, failed)
        except (OSError, KsbpfError) as exc:
            self.log("endpoints_follow_failed", level="error", scope=st.name, error=str(exc))
            return
        st.followed_addrs = frozenset(f.endpoint.address for f in result.followed)
        if tuple(result.failed) != st.follow_failed:
            st.follow_failed = tuple(result.failed)
            if result.failed:
                self.log("endpoint_source_unreadable", level="warning", scope=st.name, problems=result.failed,
                         note="the endpoints last read from these sources stay allowed")
        if result.changed:
            self.log("endpoints_followed", scope=st.name, added=result.added, removed=result.removed,
                     now=[f.describe() for f in result.followed], netns=space.ns.label)
            self._verify_soon(st.name)

    # -- dns = ["auto"]: the dns maps follow the tunnel's resolvers ------------------------
    def _dns_followers(self) -> list[ScopeState | NodeState]:
        out: list[ScopeState | NodeState] = [st for st in self.scopes.values()
                                             if st.policy.dns_auto and st.pin_dir and not st.error]
        if self.node and self.node.policy.dns_auto and self.node.pin_dir and self.node.ns and not self.node.error:
            out.append(self.node)
        return out

    def _follow_dns(self, st: ScopeState | NodeState, read: dict | None = None) -> None:
        """Read the resolvers the VPN configured for the scope's tunnels and
        bring its dns maps to them in place (new before old; nothing re-attached).
        read: what this pass read already, by (tunnels, own namespace) -- a
        thousand pods of one tunnel name read its configuration once."""
        st.dns_at = time.monotonic() + DNS_FOLLOW_SECONDS
        key = (st.policy.tunnels, st.policy.netns in ("", None))
        try:
            if read is not None and key in read:
                found = read[key]
                if isinstance(found, Exception):
                    raise found
            else:
                found = dns_followed.read_now(st.policy, timeout=DNS_READ_TIMEOUT)
                if read is not None:
                    read[key] = found
            lock = (f"node-{netns.cookie(st.ns)}" if isinstance(st, NodeState)
                    else f"cgroup-{os.path.basename(st.pin_dir)}")
            with pins.locked(lock), bpf.ScopeMaps.from_pins(st.pin_dir) as maps:
                result = dns_followed.sync(maps, st.policy, found)
        except vpn_dns.Unreadable as exc:   # not known is not "none": the resolvers in force stay
            st.dns_at = time.monotonic() + DNS_UNREADABLE_SECONDS
            if read is not None:
                read[key] = exc
            self.log("dns_follow_failed", level="warning", scope=st.name, error=str(exc),
                     note=f"the resolvers in force stay; asked again in {DNS_UNREADABLE_SECONDS:g} s")
            return
        except (OSError, KsbpfError) as exc:
            self.log("dns_follow_failed", level="error", scope=st.name, error=str(exc))
            return
        if result.now != st.policy.dns:   # a re-attach (retry) starts from these
            if isinstance(st, NodeState):
                st.node = replace(st.node, policy=replace(st.policy, dns=result.now))
            else:
                st.policy = replace(st.policy, dns=result.now)
        if result.changed or result.source != st.dns_source:
            st.dns_source = result.source
            self.log("dns_followed", scope=st.name, added=result.added, removed=result.removed,
                     now=[str(a) for a in result.now], source=result.source,
                     **({} if result.now else {"note": "no resolver configured for the tunnel: DNS is dropped"}))
            self._verify_soon(st.name)

    def _dns_due(self) -> None:
        now, read = time.monotonic(), {}
        for st in self._dns_followers():
            if st.dns_at <= now:
                self._follow_dns(st, read)

    def _openvpn_said(self, path: str):
        m = self.openvpn.get(path)
        return m.followed() if m else None

    def _openvpn_connect(self) -> None:
        """Hold a connection to every OpenVPN management socket a scope follows
        (OpenVPN may start after us, and restart)."""
        wanted = {f for st in self._followers() for f in st.policy.follow if f != "auto"}
        for path in [p for p in self.openvpn if p not in wanted]:
            self.openvpn.pop(path).close()
        for path in wanted:
            m = self.openvpn.setdefault(path, vpn_endpoints.OpenVPNManagement(path))
            if not m.connected:
                try:
                    m.connect()
                    self.log("openvpn_management_connected", socket=path)
                except vpn_endpoints.NotThere:
                    pass
                except OSError as exc:
                    self.log("openvpn_management_failed", level="warning", socket=path, error=str(exc))

    def _on_openvpn(self, m) -> None:
        """OpenVPN said something: a remote it is about to connect to is allowed
        (new before old) before it is told to go on."""
        was = m.connected
        if m.feed() or m.pending_accept:
            if m.problem:
                self.log("openvpn_remote_not_followed", level="warning", socket=m.path, problem=m.problem)
            for st in self._followers():
                space = self.namespaces.get(st.ns.inode)
                if m.path in st.policy.follow and space is not None:
                    self._follow_endpoints(st, space)
            m.accept()
        if was and not m.connected:
            self.log("openvpn_management_closed", socket=m.path,
                     note="the endpoint it used stays allowed until it says another")

    def _follow_due(self) -> None:
        now = time.monotonic()
        self._openvpn_connect()
        for st in self._followers():
            if st.follow_at <= now:
                space = self.namespaces.get(st.ns.inode)
                if space is not None:
                    self._follow_endpoints(st, space)

    def _follow_fast(self, space: Namespace, name: str) -> None:
        """A tunnel of this namespace appeared or changed: read its endpoints
        at once and often for a while (its first handshake must not be lost)."""
        now = time.monotonic()
        for st in self._followers():
            if st.ns.inode == space.ns.inode and name in st.policy.tunnels:
                st.follow_fast_until, st.follow_at = now + FOLLOW_FAST_FOR, now
        for st in self._dns_followers():   # dns = ["auto"]: its resolvers come with the link (resolved's per-link DNS)
            if name in st.policy.tunnels:
                st.dns_at = now

    def _note_link(self, space: Namespace, before: links.Link | None, after: links.Link | None) -> None:
        """Log what a link change means for the scopes of this namespace."""
        for link in (before, after):
            if link is not None:
                self._follow_fast(space, link.name)
        for st in self._scopes_in(space):
            names = st.policy.tunnels
            if before and before.name in names and (after is None or after.name != before.name):
                self.log("tunnel_disappeared", scope=st.cgroup, tunnel=before.name, ifindex=before.ifindex,
                         netns=space.ns.label, **({"renamed_to": after.name} if after else {}))
            if after and after.name in names:
                if not st.policy.trusts(after.name, after.kind):
                    self.log("impostor_rejected", level="warning", scope=st.cgroup, tunnel=after.name,
                             ifindex=after.ifindex, kind=after.kind, trusted=list(st.policy.tunnel_kinds),
                             netns=space.ns.label)
                elif before is None or before.name != after.name:
                    self.log("tunnel_appeared", scope=st.cgroup, tunnel=after.name, ifindex=after.ifindex,
                             kind=after.kind, netns=space.ns.label)
                elif before.up != after.up:
                    self.log("tunnel_up" if after.up else "tunnel_down", scope=st.cgroup, tunnel=after.name,
                             ifindex=after.ifindex, netns=space.ns.label)

    def _on_events(self, space: Namespace) -> None:
        messages, lost = space.watch.events()
        for msg in messages:
            kind = msg["event"]
            self.netlink_events[kind] = self.netlink_events.get(kind, 0) + 1
            if links.is_link_event(msg):
                link = links.parse_link(msg)
                before = space.links.get(link.ifindex)
                if links.is_deleted(msg):
                    space.links.pop(link.ifindex, None)
                    self._note_link(space, before, None)
                else:
                    space.links[link.ifindex] = link
                    if before is None:
                        self._guard_new(space, link)   # first of all: before the rest of the batch
                    self._note_link(space, before, link)
            else:
                route = links.parse_route(msg)
                if route is not None and route.added:
                    self._check_route(space, route, msg)
        if lost:
            self.log("netlink_overrun", level="warning", netns=space.ns.label)
            self._resync(space)
        self._reconcile(space)

    # -- TunnelVision ------------------------------------------------------------------
    def _check_route(self, space: Namespace, route: links.Route, msg) -> None:
        dst = route.dst
        if (not route.unicast or route.table == links.RT_TABLE_LOCAL or dst.prefixlen == 0
                or not route.oifs or dst.is_loopback or dst.is_link_local or dst.is_multicast):
            return
        if msg["proto"] == 2 and any(dst.subnet_of(n) for n in LAN_RANGES if n.version == dst.version):
            return  # the kernel's connected route of an ordinary private LAN
        protected = [(st.cgroup, st.policy, st.followed_addrs) for st in self._scopes_in(space)]
        if (nst := self._node_in(space)) is not None:
            protected.append((nst.name, nst.node.policy, nst.followed_addrs))
        for name, policy, followed_addrs in protected:
            if all(space.links.get(oif) and policy.trusts(space.links[oif].name, space.links[oif].kind)
                   for oif in route.oifs):
                continue  # through the scope's own tunnel
            if dst.prefixlen == dst.max_prefixlen and (any(e.address == dst.network_address for e in policy.endpoints)
                                                       or dst.network_address in followed_addrs):
                continue  # the route to the VPN server itself (typed, or followed: --endpoint auto)
            devs = [space.links[o].name if o in space.links else str(o) for o in route.oifs]
            self.route_alerts += 1
            self.log("route_alert", level="warning", scope=name, route=str(route), dev=devs,
                     netns=space.ns.label,
                     message="a route sends traffic outside the tunnel; ksbpf keeps it blocked "
                             "(route injection, e.g. DHCP option 121: TunnelVision, CVE-2024-3661)")

    def _check_namespaces(self) -> None:
        """A namespace deleted and re-created under the same name is another
        namespace: re-apply its scopes (make-before-break) on the new one."""
        for st in self.scopes.values():
            if st.ns and not st.error and not common.netns_alive(st.ns):
                st.error = f"network namespace {st.ns.label} was replaced"
                self.log("netns_changed", level="warning", scope=st.cgroup, netns=st.ns.label)
        if self.node and self.node.ns and not self.node.error and not common.netns_alive(self.node.ns):
            self.node.error = f"network namespace {self.node.ns.label} was replaced"
            self.log("netns_changed", level="warning", scope=self.node.name, netns=self.node.ns.label)

    def readiness(self) -> list[str]:
        """Why the daemon is not ready; [] when every configured scope is
        attached and its map in step with netlink."""
        if not self.ready:
            return ["starting"]
        problems = []
        if (nst := self.node) is not None:
            if nst.error:
                problems.append(f"{nst.name}: {nst.error}")
            elif not nst.in_step:
                problems.append(f"{nst.name}: interfaces not guarded yet")
        for st in list(self.scopes.values()):
            if st.error:
                problems.append(f"{st.cgroup}: {st.error}")
            elif not st.in_step:
                problems.append(f"{st.cgroup}: tunnel map not reconciled yet")
            elif not cgroups.is_attached(st.pin_dir, st.cgroup):
                problems.append(f"{st.cgroup}: program not attached (detached by hand?)")
        if self.verifier is not None:
            problems += self.verifier.problems
        return problems

    # -- the zero-traffic check (ksbpf verify) ----------------------------------------
    def _verify_soon(self, scope: str | None = None) -> None:
        """Check the scope that changed (None: every scope) on the verifier's thread."""
        if self.verifier is not None:
            self.verifier.soon(scope)

    def applied_scopes(self) -> dict[str, str]:
        """scope (cgroup path, or the node scope's name) -> pin directory of every scope in force."""
        out = {st.cgroup: st.pin_dir for st in list(self.scopes.values()) if st.pin_dir and not st.error}
        st = self.node
        if st is not None and st.pin_dir and not st.error:
            out[st.name] = st.pin_dir
        return out

    def _start_verifier(self, cfg: config.Config) -> None:
        from ksbpf.daemon.verifier import Verifier
        self.verifier = Verifier(self.log, self.applied_scopes, cfg.verify_interval, cfg.close_stray_sockets,
                                 idle=self.idle, unscraped=self.unscraped)
        self.verifier.start()

    def _serve_metrics(self, cfg: config.Config) -> None:
        from ksbpf.observability.metrics import MetricsServer
        try:
            server = MetricsServer(self, cfg.listen_host, cfg.listen_port)
        except OSError as exc:
            self.log("metrics_failed", level="error", listen=cfg.listen, error=exc.strerror or str(exc),
                     note="enforcement and tracking go on without metrics")
            return
        self.log("metrics_listening", listen=cfg.listen,
                 urls=[f"http://{cfg.listen}/metrics", f"http://{cfg.listen}/readyz"])

    # -- main loop ----------------------------------------------------------------
    def _on_signal(self, signum: int, _frame) -> None:
        self._signals.append(signum)

    def run(self) -> int:
        cfg = self.load()   # a bad file raises before anything is changed
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:   # a namespace watch and a few maps per pod: a thousand pods need more than 1024
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(write_fd)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.log("kernel", release=os.uname().release, netns_identity=features.netns_identity(),
                 missing={f.name: f"{f.since}: {f.without}" for f in features.probe() if not f.present},
                 note=features.short(),
                 raw_sockets=("refused in scopes (BPF LSM)" if rawsock.available()
                              else f"not refused in scopes: {rawsock.why_not()}"))
        self._precompile(cfg)
        self.apply(cfg)
        self._start_sources(cfg)
        self.ready = True
        self._start_verifier(cfg)
        self._serve_metrics(cfg)
        self.log("ready", scopes=len(self.scopes), failed=sum(1 for s in self.scopes.values() if s.error),
                 node=self.node.name if self.node else None,
                 namespaces=len(self.namespaces), config=self.config_path, pid=os.getpid())
        next_resync = time.monotonic() + RESYNC_SECONDS
        resync_queue: list[int] = []
        next_retry = time.monotonic() + RETRY_SECONDS
        next_guard_check = time.monotonic() + GUARD_CHECK_SECONDS
        while True:
            watches = {space.watch.fileno(): space for space in self.namespaces.values()}
            sources = {src.fileno(): src for src in self.sources}
            follows = {fd: st for st in self.scopes.values() if st.follow for fd in st.follow.fds()}
            pending = [st for st in self.scopes.values() if st.pending and st.follow]
            ovpn = {m.fileno(): m for m in self.openvpn.values() if m.connected}
            deadline = min(next_resync, next_retry, next_guard_check if self.node else next_retry,
                           *(time.monotonic() + PENDING_INTERVAL for _ in pending[:1]),
                           *(src.deadline() for src in self.sources),
                           *(st.follow_at for st in self._followers()),
                           *(st.dns_at for st in self._dns_followers()))
            self.idle.set()
            readable = _readable([read_fd, *watches, *follows, *sources, *ovpn], max(0.0, deadline - time.monotonic()))
            self.idle.clear()
            self.heartbeat = time.monotonic()
            for fd in readable:
                if fd == read_fd:
                    while True:
                        try:
                            if not os.read(read_fd, 64):
                                break
                        except BlockingIOError:
                            break
                elif fd in follows:
                    if follows[fd].follow is not None:
                        self._on_subtree(follows[fd])
                elif fd in ovpn:
                    self._on_openvpn(ovpn[fd])
                elif fd in watches and self.namespaces.get(watches[fd].ns.inode) is watches[fd]:
                    self._on_events(watches[fd])
            for src in self.sources:
                src.handle()   # its queue, and its own timers (cheap when there is nothing to do)
            while self._signals:
                signum = self._signals.pop(0)
                if signum == signal.SIGHUP:
                    self.reload()
                else:
                    self.log("exiting", signal=signal.Signals(signum).name,
                             note="enforcement stays in the kernel; `ksbpf detach --all` removes it")
                    for space in self.namespaces.values():
                        space.close()
                    for st in self.scopes.values():
                        self._unfollow(st)
                    if self.verifier is not None:
                        self.verifier.stop()
                    for src in self.sources:
                        src.close()
                    return 0
            if self.node and time.monotonic() >= next_guard_check:
                self._check_guards()   # puts back a guard that was removed by hand
                next_guard_check = time.monotonic() + GUARD_CHECK_SECONDS * (1 if self.node.mode == "tcx" else 10)
            for st in pending:
                if st.follow is not None:
                    self._rescan(st, force=True)
            self._follow_due()
            self._dns_due()
            if time.monotonic() >= next_retry:
                self._check_namespaces()
                failed = [s for s in self.scopes.values() if s.error]
                for st in failed:
                    self._apply_scope(st)
                node_failed = self.node is not None and self.node.error is not None
                if node_failed:
                    self._apply_node(self.node)
                if failed or node_failed:
                    self._rebuild_watches()
                next_retry = time.monotonic() + RETRY_SECONDS
            if time.monotonic() >= next_resync:
                # one namespace at a time, each every RESYNC_SECONDS: with a thousand
                # pods' namespaces a full pass at once would stall the loop for seconds
                if not resync_queue:
                    if any(st.follow is not None for st in self.scopes.values()):
                        for st in self.scopes.values():
                            if st.follow is not None:
                                st.spaces = self._in_use(st)
                        self._rebuild_watches()
                    resync_queue = list(self.namespaces)
                space = self.namespaces.get(resync_queue.pop()) if resync_queue else None
                if space:
                    self._resync(space)
                    self._reconcile(space)
                next_resync = time.monotonic() + RESYNC_SECONDS / max(1, len(self.namespaces))

    def reload(self) -> None:
        try:
            cfg = self.load()
        except KsbpfError as exc:
            self.log("reload_rejected", level="error", config=self.config_path, error=str(exc),
                     note="the running configuration stays in force")
            return
        self.log("reload", config=self.config_path, scopes=len(cfg.scopes))
        self.apply(cfg)
        if self.verifier is not None:
            self.verifier.interval, self.verifier.close_stray = cfg.verify_interval, cfg.close_stray_sockets
            self.verifier.soon()
        self.log("reloaded", scopes=len(self.scopes), failed=sum(1 for s in self.scopes.values() if s.error))


def _readable(fds: list[int], timeout: float) -> list[int]:
    """The fds ready to read (poll(2): select's 1024-descriptor limit is too
    low for a daemon following a thousand pods' namespaces)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(timeout * 1000)]


def apply_once(config_path: str, log: EventLog) -> int:
    """`ksbpf apply`: bring the configured scopes in force and exit (boot unit)."""
    d = Daemon(config_path, log)
    cfg = d.load()
    d.apply(cfg)
    for space in d.namespaces.values():
        space.close()
    for st in d.scopes.values():
        d._unfollow(st)
    failed = [s for s in d.scopes.values() if s.error]
    return 1 if failed or (d.node and d.node.error) else 0


def _same_node(current: NodePolicy, wanted: NodePolicy | None) -> bool:
    """Is the node kept with the one asked for?  dns = ["auto"]: as _same()."""
    return wanted is not None and _same(current.policy, wanted.policy) and replace(current, policy=wanted.policy) == wanted


def _same(current: Policy, wanted: Policy) -> bool:
    """Is the policy a scope is kept with the one asked for?  dns = ["auto"]:
    the resolvers followed since may differ (they are kept in step in place)."""
    return wanted.same_but_followed(current) if wanted.dns_auto else current == wanted
