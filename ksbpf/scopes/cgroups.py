"""A protected scope: one cgroup v2 whose egress goes through ksbpf's policy.

This module owns the life of a scope -- attach (make-before-break), detach,
status -- and is shared by the CLI and the daemon.  The kernel is the only
state: the attachment, plus the pins under /sys/fs/bpf/ksbpf (see pins.py).
"""

from __future__ import annotations

import errno
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ksbpf.errors import KsbpfError
from ksbpf.kernel import bpf, cgroup, devices, features, libbpf, links, netns, pins, preflight, privileges, rawsock
from ksbpf.policy import Policy
from ksbpf.reasons import Hook
from ksbpf.scopes import common, followed, subtree, tunnel_source

EGRESS = libbpf.BPF_CGROUP_INET_EGRESS


@contextmanager
def _open_dir(path: str) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def ksbpf_programs(cg_fd: int, effective: bool = False, hook: int = EGRESS, name: str = bpf.PROG_NAME) -> list[int]:
    """IDs of ksbpf's programs attached to a cgroup's egress hook (effective:
    also those inherited from its ancestors); or to another hook, by name."""
    found = []
    for prog_id in libbpf.prog_query(cg_fd, hook, effective):
        try:
            fd = libbpf.prog_fd_by_id(prog_id)
        except OSError:
            continue  # detached meanwhile
        try:
            if libbpf.prog_info(fd).name == name:
                found.append(prog_id)
        finally:
            os.close(fd)
    return found


def _detach_ids(cg_fd: int, prog_ids: list[int], hook: int = EGRESS) -> list[int]:
    done = []
    for prog_id in prog_ids:
        try:
            fd = libbpf.prog_fd_by_id(prog_id)
        except OSError:
            continue
        try:
            libbpf.prog_detach(fd, cg_fd, hook)
            done.append(prog_id)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        finally:
            os.close(fd)
    return done


def _sock_programs(cg_fd: int) -> list[int]:
    """--netns each: ksbpf's sock_create programs on the cgroup."""
    return ksbpf_programs(cg_fd, hook=subtree.SOCK_CREATE, name=subtree.SOCK_PROG_NAME)


def _detach_sock(cg_fd: int) -> list[int]:
    return _detach_ids(cg_fd, _sock_programs(cg_fd), subtree.SOCK_CREATE)


def _dev_programs(cg_fd: int) -> list[int]:
    """--deny-tun: ksbpf's device programs on the cgroup."""
    return ksbpf_programs(cg_fd, hook=devices.BPF_CGROUP_DEVICE, name=devices.PROG_NAME)


def _detach_dev(cg_fd: int) -> list[int]:
    return _detach_ids(cg_fd, _dev_programs(cg_fd), devices.BPF_CGROUP_DEVICE)


def _lsm_programs(cg_fd: int) -> list[int]:
    """ksbpf's raw-socket LSM programs on the cgroup (kernels that run BPF LSM programs)."""
    if not rawsock.available():
        return []
    return ksbpf_programs(cg_fd, hook=rawsock.BPF_LSM_CGROUP, name=rawsock.PROG_NAME)


def _detach_lsm(cg_fd: int) -> list[int]:
    return _detach_ids(cg_fd, _lsm_programs(cg_fd), rawsock.BPF_LSM_CGROUP)


def raw_sockets_refused(cg_path: str) -> bool:
    """Is ksbpf's raw-socket LSM program attached to the cgroup (in force on its subtree)?"""
    try:
        with _open_dir(cg_path) as cg_fd:
            return bool(_lsm_programs(cg_fd))
    except OSError:
        return False


def _dns_programs(cg_fd: int) -> dict[str, list[int]]:
    """--dns: ksbpf's sock_addr programs on the cgroup, by entry point."""
    return {e: ksbpf_programs(cg_fd, hook=hook, name=e) for e, hook in bpf.DNS_ATTACH.items()}


def _detach_dns(cg_fd: int, found: dict[str, list[int]] | None = None) -> list[int]:
    found = _dns_programs(cg_fd) if found is None else found
    return [i for e, ids in found.items() for i in _detach_ids(cg_fd, ids, bpf.DNS_ATTACH[e])]


def dns_redirect_in_force(cg_path: str) -> bool:
    """Are ksbpf's DNS redirect programs attached to the cgroup, on every hook?"""
    try:
        with _open_dir(cg_path) as cg_fd:
            return all(_dns_programs(cg_fd).values())
    except OSError:
        return False


def dns_entries(policy: Policy) -> tuple[str, ...]:
    """The DNS redirect programs a scope loads: with --dns, where the kernel has them."""
    return bpf.DNS_ENTRIES if policy.options.dns and features.has("sock_addr") else ()


def deny_tun_in_force(cg_path: str) -> bool:
    """Is ksbpf's device program attached to the cgroup (and so in force on its subtree)?"""
    try:
        with _open_dir(cg_path) as cg_fd:
            return bool(_dev_programs(cg_fd))
    except OSError:
        return False


@dataclass
class AttachResult:
    cgroup: str
    cgroup_id: int
    pin_dir: str
    prog_id: int
    replaced: list[int]
    tunnels: list[common.TunnelState]
    mounted_bpffs: bool
    each: bool = False   # --netns each: tunnels looked up in every namespace of the subtree
    netns_identity: str = "helper"   # how the program learns a packet's namespace (features.NETNS_*)
    # socket storage, first attach: processes of the subtree that were running already (their older
    # sockets have no recorded namespace: blocked until reopened)
    processes_before: int = 0
    followed: list = field(default_factory=list)       # --endpoint auto: the endpoints read from the tunnels now
    follow_failed: list = field(default_factory=list)  # ... and the sources that could not be read
    dns_redirect: bool = False   # --dns: the redirect programs are attached (else DNS elsewhere is only dropped)

    def to_dict(self) -> dict:
        return {"cgroup": self.cgroup, "cgroup_id": self.cgroup_id, "pin_dir": self.pin_dir,
                "prog_id": self.prog_id, "replaced_prog_ids": self.replaced,
                "tunnels": [t.to_dict() for t in self.tunnels], "mounted_bpffs": self.mounted_bpffs,
                "netns_each": self.each, "netns_identity": self.netns_identity,
                "processes_before": self.processes_before, "followed": [f.to_dict() for f in self.followed],
                "follow_failed": self.follow_failed, "dns_redirect": self.dns_redirect}


def attach(cgroup_path: str, policy: Policy, progress: common.Progress = common.quiet,
           bpffs: str = pins.BPFFS, loader: Callable | None = None) -> AttachResult:
    """Protect a cgroup with `policy`.  If it is already protected, the new
    program is attached before the old one is detached: during the swap both
    run and a packet must pass both, so there is no unprotected moment."""
    preflight.require_loader()
    if not bpf.image_cached(policy.options, len(policy.endpoints), policy.events):
        preflight.require_compiler()
    cg = cgroup.resolve(cgroup_path)
    each = subtree.is_each(policy)
    ns = None if each else netns.resolve(policy.netns)

    vpn = common.vpn_entries(policy)
    progress("loading the policy program (compiled by bcc unless a cached image fits)")
    keep = bpf.kept_maps(pins.scope_dir(cg.id, bpffs))   # a re-attach: the sockets' namespaces stay known
    old_inode = _pinned_netns_inode(pins.scope_dir(cg.id, bpffs))
    entries = subtree.entries(policy) + (() if each else (bpf.ENTRY_NF_SRC,)) + dns_entries(policy)
    keep_used = bool(keep)
    try:
        if keep:
            prog = bpf.load(policy.options, len(policy.endpoints), policy.events,
                            entries=entries, keep=keep)
        else:
            prog = (loader or bpf.load)(policy.options, len(policy.endpoints), policy.events,   # loader: a pool's
                                        entries=entries)
    finally:
        for fd in keep.values():
            os.close(fd)
    with pins.locked(f"cgroup-{cg.id}"):   # taken after compiling: others wait milliseconds, not the compiler
        try:
            if ns is None:   # every namespace the subtree uses now; the daemon follows later ones
                spaces = subtree.discover(cg.path)
                subtree.register_all(prog.maps, policy, spaces)
                tunnels = [t for sp in spaces for t in common.tunnel_states(policy, sp.use.label, sp.links,
                                                                            set(subtree.plan(policy, sp.links)))]
                ns_meta = {"each": True}
            else:
                present = links.links(ns)
                cookie = netns.cookie(ns)
                common.sync_tunnels(prog.maps, policy, cookie, present)
                subtree.mark_known(prog.maps, cookie)
                old_dir = pins.scope_dir(cg.id, bpffs)
                if os.path.isdir(old_dir):   # the last-known addresses of the scope's tunnels stay
                    try:
                        with bpf.ScopeMaps.from_pins(old_dir) as old_maps:
                            for (c, addr), (_ifindex, name) in old_maps.tunnel_sources().items():
                                prog.maps.set_tunnel_source(c, addr, 0, name)
                    except (OSError, KsbpfError):
                        pass
                common.sync_tunnel_sources(prog.maps, policy, cookie, present, links.addresses(ns))
                tunnels = common.tunnel_states(policy, ns.label, present, set(common.tunnel_plan(policy, present)))
                ns_meta = {"path": ns.path, "inode": ns.inode}
            for ep in policy.endpoints:
                prog.maps.add_endpoint(ep)
            for net in policy.allow_cidrs:
                prog.maps.add_cidr(net)
            common.set_vpn(prog.maps, policy, vpn)
            prog.maps.set_dns(policy.dns)
            meta = {
                "version": common.META_VERSION, "cgroup": cg.path, "cgroup_id": cg.id,
                # the endpoints live in their maps (there may be many)
                "policy": {k: v for k, v in policy.to_dict().items() if k != "endpoints"},
                "netns": ns_meta, "attached_at": time.time(),
                "netns_identity": "storage" if "sk_netns" in prog.maps.fds else "helper",
            }
            prog.maps.write_meta(meta)
            follow = followed.SyncResult()
            if policy.follow and ns is not None:   # --endpoint auto: what the tunnels use now
                follow = followed.sync(prog.maps, policy, *followed.read_now(policy, ns, present),
                                       previous=followed.previously(pins.scope_dir(cg.id, bpffs)))
                meta["followed"] = [f.to_dict() for f in follow.followed]   # the meta is written again below
            mounted = pins.ensure_bpffs(bpffs)
            final = pins.scope_dir(cg.id, bpffs)
            staging = final + "_new"  # bpffs refuses names with dots
            pins.remove_dir(staging)  # left over by a crash
            progress(f"pinning maps under {final}")
            prog.pin(staging)
            prog_id = libbpf.prog_info(prog.prog_fd).id
            if ns is not None and bpf.ENTRY_NF_SRC in prog.progs:
                try:
                    priority = tunnel_source.ensure(staging, ns, prog.maps, netns.cookie(ns))
                except BaseException:
                    pins.remove_dir(staging)   # unpinned: the links go with their pins
                    raise
                if priority is not None:
                    progress(f"netfilter hook in {ns.label} (priority {priority}): packets with the tunnel's "
                             "source address leave only through the tunnel")
            dev_fd = None
            if policy.deny_tun:   # small and separate from the packet policy, pinned with the scope
                dev_fd = devices.load_deny_tun()
                libbpf.obj_pin(dev_fd, os.path.join(staging, devices.PIN_NAME))
            lsm_fd = None
            if rawsock.available():   # no AF_PACKET or AF_XDP sockets in the scope, where the kernel allows it
                lsm_fd = rawsock.load()
                libbpf.obj_pin(lsm_fd, os.path.join(staging, rawsock.PIN_NAME))
            with _open_dir(cg.path) as cg_fd:
                old = ksbpf_programs(cg_fd)
                old_sock = _sock_programs(cg_fd)
                old_dev = _dev_programs(cg_fd)
                old_lsm = _lsm_programs(cg_fd)
                old_dns = _dns_programs(cg_fd)
                try:
                    if dev_fd is not None:   # first: if it is refused, nothing has changed
                        try:
                            libbpf.prog_attach(dev_fd, cg_fd, devices.BPF_CGROUP_DEVICE, libbpf.BPF_F_ALLOW_MULTI)
                        except OSError as exc:
                            pins.remove_dir(staging)
                            raise KsbpfError(
                                f"cannot attach the --deny-tun device program to {cg.path}: {exc.strerror} (another "
                                "device program may hold the hook without multi-attach)",
                                "check `bpftool cgroup show " + cg.path + "`, or attach without --deny-tun") from None
                    if lsm_fd is not None:
                        try:
                            libbpf.prog_attach(lsm_fd, cg_fd, rawsock.BPF_LSM_CGROUP, libbpf.BPF_F_ALLOW_MULTI)
                        except OSError as exc:
                            if dev_fd is not None:
                                _detach_ids(cg_fd, [libbpf.prog_info(dev_fd).id], devices.BPF_CGROUP_DEVICE)
                            pins.remove_dir(staging)
                            raise KsbpfError(f"cannot attach the raw-socket LSM program to {cg.path}: {exc.strerror}",
                                             "check `bpftool cgroup show " + cg.path + "`") from None
                    # the sock_create program first: every socket made from now on has its namespace recorded
                    # before the egress program that reads it is in force
                    sock = prog.progs.get(bpf.ENTRY_SOCK_CREATE)
                    dns_done: dict[str, list[int]] = {}
                    try:
                        if sock is not None:
                            libbpf.prog_attach(sock, cg_fd, subtree.SOCK_CREATE, libbpf.BPF_F_ALLOW_MULTI)
                        # --dns: the redirect programs before the egress program that drops what is not redirected
                        for entry, hook in bpf.DNS_ATTACH.items():
                            if entry in prog.progs:
                                libbpf.prog_attach(prog.progs[entry], cg_fd, hook, libbpf.BPF_F_ALLOW_MULTI)
                                dns_done[entry] = [libbpf.prog_info(prog.progs[entry]).id]
                        libbpf.prog_attach(prog.prog_fd, cg_fd, EGRESS, libbpf.BPF_F_ALLOW_MULTI)
                    except OSError as exc:
                        _detach_dns(cg_fd, dns_done)
                        if sock is not None:
                            _detach_ids(cg_fd, [libbpf.prog_info(sock).id], subtree.SOCK_CREATE)
                        if dev_fd is not None:
                            _detach_ids(cg_fd, [libbpf.prog_info(dev_fd).id], devices.BPF_CGROUP_DEVICE)
                        if lsm_fd is not None:
                            _detach_ids(cg_fd, [libbpf.prog_info(lsm_fd).id], rawsock.BPF_LSM_CGROUP)
                        pins.remove_dir(staging)
                        raise KsbpfError(
                            f"cannot attach to {cg.path}: {exc.strerror} (another tool may hold its hooks without multi-attach)",
                            "check `bpftool cgroup show " + cg.path + "`; ksbpf attaches with BPF_F_ALLOW_MULTI") from None
                finally:
                    for fd in (dev_fd, lsm_fd):
                        if fd is not None:
                            os.close(fd)
                progress(f"attached program {prog_id} to {cg.path}" + (f"; detaching the previous program {old}" if old else ""))
                replaced = _detach_ids(cg_fd, old)
                _detach_ids(cg_fd, old_sock, subtree.SOCK_CREATE)
                _detach_ids(cg_fd, old_dev, devices.BPF_CGROUP_DEVICE)
                _detach_ids(cg_fd, old_lsm, rawsock.BPF_LSM_CGROUP)
                _detach_dns(cg_fd, old_dns)
            _decide_netns_fast(prog.maps, cg.path, ns, first=not (old or old_sock or keep_used),
                               kept="netns_fast" in prog.kept, old_inode=old_inode)
            if replaced and os.path.isdir(final):
                common.carry_counters(final, meta)   # the old program is detached: its counts are final
                prog.maps.write_meta(meta)
            pins.remove_dir(final)
            os.rename(staging, final)
        finally:
            prog.close()
    identity = meta["netns_identity"]
    before = 0
    if identity == "storage" and not keep_used:
        before = sum(1 for _ in subtree.subtree_pids(cg.path))
    return AttachResult(cg.path, cg.id, final, prog_id, replaced, tunnels, mounted, each, identity, before,
                        follow.followed, follow.failed, bool(set(bpf.DNS_ENTRIES) & set(entries)))


def _pinned_netns_inode(pin_dir: str) -> int | None:
    """The namespace a pinned scope of one namespace was attached for."""
    try:
        with bpf.ScopeMaps.from_pins(pin_dir) as maps:
            return maps.read_meta().get("netns", {}).get("inode")
    except (OSError, KsbpfError, ValueError):
        return None


def _decide_netns_fast(maps: bpf.ScopeMaps, cg_path: str, ns, first: bool, kept: bool, old_inode) -> None:
    """May the egress program skip the per-packet namespace check (ksbpf_netns_fast)?  Only for a scope of
    one namespace whose every socket is known to be in it: made after the sock_create program, which stops
    the fast path at the first socket made in another namespace.  Decided after both programs are attached,
    so that a process that arrives later is seen: on a first attach, when no process runs in the subtree
    (no older socket); on a re-attach, as the previous program had it (the map is shared, and the previous
    sock_create program stayed attached until this one was), unless the namespace changed."""
    if ns is None:
        maps.allow_netns_fast(False)
    elif kept:
        if old_inode != ns.inode:
            maps.allow_netns_fast(False)
    elif first and not cgroup.populated(cg_path):
        maps.allow_netns_fast(True)


@dataclass
class DetachResult:
    cgroup: str | None
    detached_prog_ids: list[int] = field(default_factory=list)
    removed_pins: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"cgroup": self.cgroup, "detached_prog_ids": self.detached_prog_ids,
                "removed_pins": self.removed_pins}


def _meta_cgroup(pin_dir: str) -> str | None:
    try:
        with bpf.ScopeMaps.from_pins(pin_dir) as maps:
            return maps.read_meta().get("cgroup")
    except (OSError, KsbpfError, ValueError):
        return None


def detach(cgroup_path: str, bpffs: str = pins.BPFFS) -> DetachResult:
    """Remove ksbpf from one cgroup: its programs and pins.  Idempotent: a
    cgroup that is gone or unprotected is fine (stale pins are removed)."""
    preflight.require_root()
    real = os.path.realpath(cgroup_path)
    result = DetachResult(real)
    with pins.locked():
        if os.path.exists(real):
            cg = cgroup.resolve(real)
            with _open_dir(cg.path) as cg_fd:
                result.detached_prog_ids = (_detach_ids(cg_fd, ksbpf_programs(cg_fd)) + _detach_sock(cg_fd)
                                            + _detach_dev(cg_fd) + _detach_lsm(cg_fd) + _detach_dns(cg_fd))
        for d in pins.list_scope_dirs(bpffs):
            if _meta_cgroup(d) == real:
                pins.remove_dir(d)
                result.removed_pins.append(d)
        pins.prune(bpffs)
    return result


def detach_every_cgroup(progress: common.Progress = common.quiet) -> list[int]:
    """Detach every ksbpf program from every cgroup (pins are the caller's
    business); the ids detached.  Call with pins.locked() held."""
    detached: list[int] = []
    for root in cgroup.cgroup2_mounts():
        progress(f"scanning cgroups under {root}")
        for path in cgroup.walk(root):
            try:
                with _open_dir(path) as cg_fd:
                    detached += (_detach_ids(cg_fd, ksbpf_programs(cg_fd)) + _detach_sock(cg_fd) + _detach_dev(cg_fd)
                                 + _detach_lsm(cg_fd) + _detach_dns(cg_fd))
            except FileNotFoundError:
                continue  # removed while we walked
    return detached


@dataclass
class ScopeStatus:
    cgroup: str
    cgroup_id: int
    pin_dir: str
    prog_id: int | None
    attached: bool
    tunnels: list[common.TunnelState]
    policy: Policy
    counters: common.Counters   # since the scope's first attach
    attached_at: float | None
    problems: list[str]
    netns_ok: bool = True   # the tunnels' namespace is still the one attached to
    events: tuple[int, int] = (0, 0)   # blocked-packet samples (sent, suppressed) by this program
    namespaces: list[dict] | None = None   # --netns each: every namespace the subtree uses, with its tunnels
    warnings: list[str] = field(default_factory=list)   # e.g. processes that could bypass the policy
    hook: Hook = Hook.CGROUP
    netns_identity: str = "helper"   # how its program learns a packet's namespace (features.NETNS_*)
    tunnel_source: str = "absent"    # the netfilter hook on the tunnel's source addresses: on, absent, MISSING
    deny_tun: bool = False   # --deny-tun's device program is attached to the cgroup
    raw_sockets: str = "open"   # "refused": the raw-socket LSM program is attached; "open": the kernel runs none
    followed: list = field(default_factory=list)   # --endpoint auto: the endpoints followed now (Followed)
    netns_fast: bool = False   # the egress program trusts the tunnel filter's namespace (ksbpf_netns_fast)
    dns_redirect: bool = False   # --dns: the redirect programs are attached to the cgroup
    dns_source: str | None = None   # dns = ["auto"]: where the daemon read the resolvers in force

    @property
    def name(self) -> str:
        """The scope's name in metrics and events: its cgroup."""
        return self.cgroup

    @property
    def dropped_packets(self) -> int:
        return sum(p for (r, _f), (p, _b) in self.counters.items() if not r.allowed)

    def to_dict(self) -> dict:
        return {
            "cgroup": self.cgroup, "cgroup_id": self.cgroup_id, "pin_dir": self.pin_dir,
            "prog_id": self.prog_id, "attached": self.attached,
            "tunnels": [t.to_dict() for t in self.tunnels],
            "endpoints": [str(e) for e in self.policy.endpoints],
            "options": self.policy.options.to_dict(), "tunnel_kinds": list(self.policy.tunnel_kinds),
            "kind": "cgroup", "counters": common.counters_dict(self.counters),
            "dropped_packets": self.dropped_packets,
            "events": {"rate": self.policy.events.rate, "burst": self.policy.events.burst,
                       "sent": self.events[0], "suppressed": self.events[1]},
            "attached_at": self.attached_at, "problems": self.problems,
            "netns_each": self.namespaces is not None, "namespaces": self.namespaces or [],
            "warnings": self.warnings, "netns_identity": self.netns_identity,
            "tunnel_source": self.tunnel_source, "deny_tun": self.deny_tun, "netns_fast": self.netns_fast,
            "raw_sockets": self.raw_sockets,
            "follow": list(self.policy.follow), "followed": [f.to_dict() for f in self.followed],
            "vpn_mark": None, "vpn_cgroups": [], "any_endpoints": [], **self.policy.vpn_dict(),
            "dns": {"resolvers": [str(a) for a in self.policy.dns], "redirect": self.dns_redirect,
                    **({"auto": True, "source": self.dns_source} if self.policy.dns_auto else {})},
        }


def _pinned_prog_id(pin_dir: str) -> int | None:
    try:
        fd = libbpf.obj_get(os.path.join(pin_dir, "prog"))
    except OSError:
        return None
    try:
        return libbpf.prog_info(fd).id
    finally:
        os.close(fd)


def is_attached(pin_dir: str, cgroup_path: str) -> bool:
    """Is the scope's pinned program attached to its cgroup?"""
    prog_id = _pinned_prog_id(pin_dir)
    try:
        with _open_dir(cgroup_path) as cg_fd:
            return prog_id is not None and prog_id in libbpf.prog_query(cg_fd, EGRESS)
    except OSError:
        return False


def read_scope(pin_dir: str, link_cache: dict | None = None, light: bool = False) -> ScopeStatus:
    """Everything about one scope, from its pins and the kernel.  link_cache
    (namespace inode -> (cookie, links)) saves dumping a namespace twice when
    reading many scopes.  light: only what deciding to adopt it needs (its
    policy, attachments and namespace) -- no counters, no interfaces, no scan
    of its processes: a restarted daemon takes a thousand pods back."""
    problems: list[str] = []
    with bpf.ScopeMaps.from_pins(pin_dir) as maps:
        meta = maps.read_meta()
        if meta.get("version") != common.META_VERSION:
            raise KsbpfError(f"{pin_dir} holds a scope of another ksbpf version ({meta.get('version')})",
                             f"attach it again: ksbpf attach --cgroup {meta.get('cgroup', 'PATH')} ...")
        entries = maps.tunnels()
        policy = common.policy_from(meta, maps.endpoints())
        counters = {} if light else common.total_counters(maps, meta)
        event_stats = (0, 0) if light else maps.event_stats()
        allowed, foreign = maps.netns_fast()
    prog_id = _pinned_prog_id(pin_dir)
    if prog_id is None:
        problems.append("program pin missing")
    cg_path, cg_id = meta.get("cgroup", "?"), int(os.path.basename(pin_dir))
    attached = False
    try:
        if os.stat(cg_path).st_ino != cg_id:
            problems.append("the cgroup was removed and re-created: this scope protects nothing (run `ksbpf detach`)")
        else:
            with _open_dir(cg_path) as cg_fd:
                attached = prog_id in libbpf.prog_query(cg_fd, EGRESS)
            if not attached:
                problems.append("the program is not attached to the cgroup")
    except OSError:
        problems.append("the cgroup no longer exists (run `ksbpf detach` to remove the pins)")
    deny_tun = deny_tun_in_force(cg_path)
    dns_redirect = policy.options.dns and dns_redirect_in_force(cg_path)
    if policy.options.dns and not dns_redirect and features.has("sock_addr") and os.path.isdir(cg_path):
        problems.append("--dns's redirect programs are not attached to the cgroup: DNS to other resolvers is "
                        "dropped, not redirected to the VPN's (run `ksbpf attach ... --dns` again)")
    if policy.deny_tun and not deny_tun and os.path.isdir(cg_path):
        problems.append("--deny-tun's device program is not attached to the cgroup: its processes can open "
                        "/dev/net/tun (run `ksbpf attach ... --deny-tun` again)")
    raw = "refused" if raw_sockets_refused(cg_path) else "open"
    if raw == "open" and rawsock.available() and os.path.isdir(cg_path):
        problems.append("the raw-socket LSM program is not attached to the cgroup: its processes can open "
                        "AF_PACKET and AF_XDP sockets (run `ksbpf attach` again)")
    # with the LSM program in force no new raw socket can be made: the CAP_NET_RAW holders are no door
    warnings = [] if light else \
        (raw_socket_warnings(cg_path) if raw == "open" else []) + tun_warnings(cg_path, deny_tun)
    if meta.get("netns", {}).get("each") and not light:
        tunnels, namespaces = _each_states(policy, cg_path, entries)
        return ScopeStatus(cg_path, cg_id, pin_dir, prog_id, attached, tunnels, policy, counters,
                           meta.get("attached_at"), problems, True, event_stats, namespaces, warnings,
                           netns_identity=meta.get("netns_identity", "helper"), deny_tun=deny_tun,
                           followed=followed.recorded(meta), raw_sockets=raw, dns_redirect=dns_redirect,
                           dns_source=meta.get("dns_source"))
    if light:   # the namespace attached to, still there: what adopting needs of it
        each = bool(meta.get("netns", {}).get("each"))
        ns_ok = each or common.netns_alive(common.meta_netns(meta))
        return ScopeStatus(cg_path, cg_id, pin_dir, prog_id, attached, [], policy, counters, meta.get("attached_at"),
                           problems, ns_ok, event_stats, [] if each else None,
                           netns_identity=meta.get("netns_identity", "helper"), deny_tun=deny_tun,
                           followed=followed.recorded(meta), netns_fast=allowed and not foreign,
                           raw_sockets=raw, dns_redirect=dns_redirect, dns_source=meta.get("dns_source"))
    ns = common.meta_netns(meta)
    present = cookie = None
    ns_ok = common.netns_alive(ns)
    if ns_ok:
        cache = link_cache if link_cache is not None else {}
        if ns.inode not in cache:
            cache[ns.inode] = (netns.cookie(ns), links.links(ns))
        cookie, present = cache[ns.inode]
    else:
        problems.append(f"network namespace {ns.label} is gone or not the one the scope was attached in")
    registered = {e.ifindex for e in entries if e.netns_cookie == cookie}
    tunnels = common.tunnel_states(policy, ns.label, present, registered)
    problems += [f"interface {t.name} is a {t.kind}, not a trusted tunnel kind ({', '.join(policy.tunnel_kinds)}): blocked"
                 for t in tunnels if t.impostor]
    try:
        with bpf.ScopeMaps.from_pins(pin_dir) as maps:
            source_layer = tunnel_source.layer(pin_dir, meta, maps)
    except (OSError, KsbpfError):
        source_layer = "MISSING: the scope's maps cannot be read"
    if source_layer.startswith("MISSING"):
        problems.append(f"tunnel-source hook {source_layer}: the kernel's answers for the scope's connections "
                        "(TIME_WAIT, RSTs) may leave outside the tunnel (`ksbpf attach` again)")
    return ScopeStatus(cg_path, cg_id, pin_dir, prog_id, attached, tunnels, policy, counters,
                       meta.get("attached_at"), problems, ns_ok, event_stats, warnings=warnings,
                       netns_identity=meta.get("netns_identity", "helper"), tunnel_source=source_layer,
                       deny_tun=deny_tun, followed=followed.recorded(meta), netns_fast=allowed and not foreign,
                       raw_sockets=raw, dns_redirect=dns_redirect, dns_source=meta.get("dns_source"))


def raw_socket_warnings(cg_path: str, limit: int = 10) -> list[str]:
    """Processes of the scope holding CAP_NET_RAW: a raw AF_PACKET socket bypasses the cgroup hook."""
    if not os.path.isdir(cg_path):
        return []
    found = [(pid, where) for pid, where in subtree.subtree_pids(cg_path)
             if privileges.holds(pid, privileges.CAP_NET_RAW)]
    out = [f"process {pid} ({subtree.comm(pid)}, {os.path.relpath(where, cg_path)}) holds CAP_NET_RAW: its raw "
           "AF_PACKET sockets bypass the policy (start programs with `ksbpf exec --user USER`, "
           "containers with --cap-drop NET_RAW)" for pid, where in found[:limit]]
    if len(found) > limit:
        out.append(f"... and {len(found) - limit} more processes holding CAP_NET_RAW")
    return out


def _uids(pid: int) -> set[int]:
    """The real and effective user ids of a process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return {int(u) for u in line.split()[1:3]}
    except (OSError, ValueError):
        pass
    return set()


def tun_warnings(cg_path: str, deny_tun: bool = False, limit: int = 10) -> list[str]:
    """Processes of the scope that can write into a tun device -- holding an
    open /dev/net/tun, or (without --deny-tun) being the user a tun device
    of their namespace belongs to: the packets they write in leave, or make
    the kernel answer, without passing the scope's hook."""
    if not os.path.isdir(cg_path):
        return []
    spaces: dict[int, tuple[str, set[int]]] = {}   # netns inode -> (a path to it, uids of the scope there)
    holders = []
    for pid, _where in subtree.subtree_pids(cg_path):
        if devices.holds_tun(pid):
            holders.append(pid)
        try:
            ino = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            continue
        spaces.setdefault(ino, (f"/proc/{pid}/ns/net", set()))[1].update(_uids(pid))
    if not holders and (deny_tun or not spaces):
        return []
    forwarding: dict[str, bool] = {}

    def fwd(path: str) -> bool:
        if path not in forwarding:
            try:
                forwarding[path] = netns.run_in(path, devices.ip_forward)
            except OSError:
                forwarding[path] = False
        return forwarding[path]

    def what(on: bool) -> str:
        return ("ip_forward is on: what it writes in is forwarded out of the uplink" if on else
                "ip_forward is off, yet what it writes in makes the kernel answer (echo replies carrying its "
                "payload)") + ", never passing the scope's hook"
    fix = ("attach the scope with --deny-tun (config deny_tun = true) and restart the process"
           if not deny_tun else "restart the process: --deny-tun refuses new opens, not a device opened before")
    out = []
    for pid in holders[:limit]:
        out.append(f"process {pid} ({subtree.comm(pid)}) holds /dev/net/tun; {what(fwd(f'/proc/{pid}/ns/net'))} "
                   f"({fix})")
    if len(holders) > limit:
        out.append(f"... and {len(holders) - limit} more processes holding /dev/net/tun")
    if not deny_tun:
        for path, uids in spaces.values():
            try:
                owned = [(name, uid) for name, uid in links.tun_owners(path) if uid in uids]
            except OSError:
                continue
            for name, uid in owned[:limit]:
                out.append(f"tun device {name} belongs to uid {uid}, a user of the scope's processes: they can "
                           f"open it; {what(fwd(path))} (attach the scope with --deny-tun, or delete the device: "
                           f"ip tuntap del {name} mode tun)")
    return out


def _each_states(policy: Policy, cg_path: str,
                 entries: list[bpf.TunnelEntry]) -> tuple[list[common.TunnelState], list[dict]]:
    """--netns each: the tunnels of every namespace the subtree uses, and each namespace."""
    tunnels, namespaces = [], []
    spaces = subtree.discover(cg_path) if os.path.isdir(cg_path) else []
    for sp in sorted(spaces, key=lambda sp: sp.use.pid):
        registered = {e.ifindex for e in entries if e.netns_cookie == sp.cookie}
        states = common.tunnel_states(policy, sp.use.label, sp.links, registered)
        tunnels += states
        namespaces.append({"inode": sp.use.inode, "cookie": sp.cookie, "pid": sp.use.pid, "comm": sp.use.comm,
                           "container": sp.use.container,
                           "cgroup": sp.use.cgroup, "processes": sp.use.processes, "label": sp.use.label,
                           "tunnels": [t.to_dict() for t in states]})
    return tunnels, namespaces


def status(bpffs: str = pins.BPFFS) -> tuple[list[ScopeStatus], list[str]]:
    """The protected cgroup scopes, and the problems of pin directories that could not be read."""
    scopes, unreadable = [], []
    for d in pins.list_scope_dirs(bpffs):
        try:
            scopes.append(read_scope(d))
        except (OSError, KsbpfError, ValueError) as exc:
            unreadable.append(f"{d}: {exc}")
    return scopes, unreadable


@dataclass
class EnsureResult:
    action: str            # "adopted" (already in force, untouched), "attached" or "replaced"
    cgroup: str
    pin_dir: str
    attach: AttachResult | None = None


def ensure(cgroup_path: str, policy: Policy, progress: common.Progress = common.quiet,
           bpffs: str = pins.BPFFS, loader: Callable | None = None) -> EnsureResult:
    """Make the cgroup protected by exactly `policy`.  A scope already in
    force with that policy (attached by hand, by an earlier daemon, at boot)
    is adopted as it is: no detach, no re-attach.  Otherwise attach()
    (make-before-break when it was protected with another policy)."""
    preflight.require_root()
    cg = cgroup.resolve(cgroup_path)
    pin_dir = pins.scope_dir(cg.id, bpffs)
    if os.path.isdir(pin_dir):
        try:
            current = read_scope(pin_dir, light=True)
        except (OSError, KsbpfError, ValueError):
            current = None  # damaged pins: rebuild below
        if (current and current.attached and current.netns_ok and policy.same_but_followed(current.policy)
                and (current.deny_tun or not policy.deny_tun)
                and (current.dns_redirect or not dns_entries(policy))   # --dns: its redirect programs too
                and (current.raw_sockets == "refused" or not rawsock.available())):   # and the raw-socket program
            return EnsureResult("adopted", cg.path, pin_dir)
    result = attach(cg.path, policy, progress, bpffs, loader)
    return EnsureResult("replaced" if result.replaced else "attached", cg.path, pin_dir, result)


def remove_cgroup_tree(path: str) -> None:
    """Release every cgroup below path (and path) from ksbpf, then remove them
    (killing what still runs there): for labs, tests and benchmarks."""
    if os.path.isdir(path):
        for sub in cgroup.walk(path):
            detach(sub)
    cgroup.remove_tree(path)


def require_protected(cg: cgroup.Cgroup) -> None:
    """Refuse unless ksbpf's program is in force for the cgroup (attached to it or an ancestor)."""
    with _open_dir(cg.path) as cg_fd:
        if ksbpf_programs(cg_fd, effective=True):
            return
    raise KsbpfError(f"{cg.path} is not protected by ksbpf",
                     f"protect it first: ksbpf attach --cgroup {cg.path} --tunnel NAME")
