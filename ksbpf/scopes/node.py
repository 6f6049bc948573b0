"""Node mode: a whole network namespace whose traffic may leave only through
its tunnels -- what the machine forwards for its containers and VMs included.

A node scope guards every interface of the namespace that is not loopback,
not a trusted tunnel and not internal (NodePolicy.role): a tc egress program
(the shared policy, ksbpf_tc_eth or ksbpf_tc_l3 by link type) attached first
in the interface's chain, with tcx links pinned under the scope's pin
directory (pins.node_dir), or a clsact direct-action filter where the kernel
has no tcx.  Guards are replaced make-before-break: the new program is
attached in front of the old one, then the old one is removed.

Where the kernel has netfilter BPF links (6.4+), node mode also attaches a
per-namespace hook (ksbpf_nf, IPv4 and IPv6, NF_INET_POST_ROUTING), pinned
under the scope's directory (nf/ipv4, nf/ipv6): the "from birth" layer.  It
sees every IP packet leaving the namespace, on every interface -- also one
created after attaching, before any guard can exist on it -- and decides it
with the same policy, except on the interfaces it leaves to others (map
nf_pass: loopback, tunnels, internal interfaces, and every interface whose
tc guard is in force: the guard judges those).  Replaced make-before-break at
the other of two priorities.

Where the kernel runs BPF LSM programs, node mode also refuses the two raw
paths that never reach a tc guard -- PACKET_QDISC_BYPASS on an AF_PACKET
socket, and binding an AF_XDP socket -- to every process of the namespace
outside the exempt cgroups (kernel/rawsock.py; links pinned under lsm/).

This module owns the life of a node scope -- attach, guarding interfaces as
they come and go (sync_guards, used by the daemon), detach, status.  The
kernel is the only state: the attachments, plus the pins.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from ksbpf.errors import KsbpfError
from ksbpf.kernel import bpf, cgroup, libbpf, links, netns, nf, pins, preflight, rawsock, tc
from ksbpf.policy import NodePolicy
from ksbpf.reasons import Hook
from ksbpf.scopes import common, followed

LINKS_DIR = "links"
NF_DIR = "nf"
NF_ABSENT = ("absent: this kernel has no netfilter BPF links (Linux 6.4+, CONFIG_NETFILTER_BPF_LINK): an interface "
             "created after attaching is not judged until the daemon guards it")


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
            ns: netns.Netns | None = None, ifname: str | None = None) -> int:
    """Remove the scope's guard from one interface (idempotent).  A clsact
    filter is found by the interface's namespace and name.  The tcx link's
    id (0: a clsact filter, or none)."""
    if mode == "clsact":
        if ns is not None and ifname:
            tc.clsact_detach(ns.path, ifname, pref)
        return 0
    return tc.unpin_link(_link_pin(pin_dir, ifindex))


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


# -- the from-birth layer: netfilter links ------------------------------------------

def _nf_pin(pin_dir: str, family: str) -> str:
    return os.path.join(pin_dir, NF_DIR, family)


def nf_pass_set(np: NodePolicy, present: list[links.Link], live: dict[int, bool]) -> set[int]:
    """The interfaces the netfilter hook leaves to others: loopback, tunnels,
    internal interfaces, and the guarded ones whose tc guard is in force.
    With --dns the tunnels are the hook's own: no tc guard sees what goes
    through them, and DNS to other resolvers is dropped there."""
    def passed(link: links.Link) -> bool:
        role = np.role(link.name, link.kind, link.ifindex)
        if role == "tunnel" and np.policy.options.dns:   # dns = ["auto"] with none known yet too
            return False
        return role != "guarded" or bool(live.get(link.ifindex))
    return {link.ifindex for link in present if passed(link)}


DNS_NO_REDIRECT = ("not redirected in node mode: the redirect programs attach to a cgroup's sockets, and a "
                   "forwarded packet has no socket (use a cgroup scope's --dns for local applications)")


def dns_state(np: NodePolicy, from_birth: str) -> dict | None:
    """--dns of a node scope as attach and status show it: the resolvers, no
    redirection, and whether DNS through the tunnel is seen (the netfilter
    hook; the tunnel carries no tc guard).  dns = ["auto"] (the daemon follows
    the tunnel's resolvers): `auto`, and no resolver while none is known."""
    if not np.policy.options.dns:
        return None
    return {"resolvers": [str(a) for a in np.policy.dns], "redirect": False,
            "through_tunnel": from_birth == "on", **({"auto": True} if np.policy.dns_auto else {})}


def dns_line(state: dict) -> str:
    """The one line attach and status print for a node scope's --dns."""
    tunnel = ("DNS through the tunnel to any other resolver dropped (netfilter hook)" if state["through_tunnel"]
              else "DNS through the tunnel NOT judged (no netfilter hook here: Linux 6.4+): only DNS outside "
                   "the tunnel is dropped")
    if not state["resolvers"]:   # dns = ["auto"], nothing configured for the tunnel yet
        return ("none known yet (auto): all DNS of the node and what it forwards is dropped until the daemon "
                f"reads the tunnel's resolvers; {tunnel}; {DNS_NO_REDIRECT}")
    auto = " (auto)" if state.get("auto") else ""
    return (f"only to {', '.join(state['resolvers'])}{auto} through the tunnel, from the node and what it forwards; "
            f"DNS outside the tunnel (LAN resolvers too) dropped; {tunnel}; {DNS_NO_REDIRECT}")


def nf_attach(pin_dir: str, ns: netns.Netns, priority: int, runner: Runner | None = None) -> None:
    """Attach the scope's netfilter program in the namespace, IPv4 and IPv6,
    and pin the links (nothing half-applied: both or neither)."""
    prog_fd = libbpf.obj_get(os.path.join(pin_dir, bpf.PIN_NAMES[bpf.ENTRY_NF]))
    done: list[str] = []
    try:
        os.makedirs(os.path.join(pin_dir, NF_DIR), exist_ok=True)
        for family, pf in nf.FAMILIES.items():
            try:
                link_fd = (runner or partial(netns.run_in, ns.path))(nf.attach, prog_fd, pf, priority)
            except OSError as exc:
                if nf.busy(exc):
                    raise KsbpfError(f"another netfilter BPF link holds priority {priority} at {family} "
                                     f"POST_ROUTING in {ns.label}",
                                     "remove it (bpftool link show; type 10), or `ksbpf detach --node` and attach again") from None
                raise
            try:
                libbpf.obj_pin(link_fd, _nf_pin(pin_dir, family))
            except OSError:
                tc.link_detach(link_fd)
                raise
            finally:
                os.close(link_fd)
            done.append(family)
    except BaseException:
        for family in done:
            nf.unpin(_nf_pin(pin_dir, family))
        raise
    finally:
        os.close(prog_fd)


def nf_release(pin_dir: str) -> list[int]:
    """Remove the scope's netfilter links; their ids."""
    return [i for i in (nf.unpin(_nf_pin(pin_dir, family)) for family in nf.FAMILIES) if i]


def nf_links(pin_dir: str) -> dict[str, nf.NfLinkInfo | None]:
    """family -> the scope's pinned netfilter link (None: no pin)."""
    return {family: nf.pinned_info(_nf_pin(pin_dir, family)) for family in nf.FAMILIES}


def sync_nf_pass(pin_dir: str, np: NodePolicy, ns: netns.Netns, present: list[links.Link], mode: str) -> None:
    """Tell the netfilter hook which interfaces it leaves to others (no-op
    for a scope without the from-birth layer)."""
    if not os.path.isdir(os.path.join(pin_dir, NF_DIR)):
        return
    live = guards_in_force(pin_dir, ns, present, mode)
    with bpf.ScopeMaps.from_pins(pin_dir) as maps:
        maps.set_nf_pass(nf_pass_set(np, present, live))


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


# -- first in the chain ------------------------------------------------------------

@dataclass(frozen=True)
class FrontProgram:
    """A program that runs before the scope's guard on an interface's egress:
    whatever it passes (TCX_PASS, TC_ACT_OK) the guard never sees."""
    prog_id: int
    name: str
    where: str          # "tcx" or "clsact pref N"
    link_id: int = 0    # the tcx link holding it (0: attached without a link, or a clsact filter)

    def __str__(self) -> str:
        link = f", link {self.link_id}" if self.link_id else ""
        return f"program {self.prog_id} ({self.name or 'no name'}; {self.where}{link})"

    def to_dict(self) -> dict:
        return {"prog_id": self.prog_id, "name": self.name, "where": self.where, "link_id": self.link_id}


def front_fix(ifname: str, front: list[FrontProgram], mode: str) -> str:
    """What to do about programs in front of a guard."""
    how = []
    for p in front:
        if p.link_id:
            how.append(f"bpftool link detach id {p.link_id}")
        elif p.where.startswith("clsact pref "):
            how.append(f"tc filter del dev {ifname} egress pref {p.where.split()[-1]}")
        else:
            how.append(f"have its owner detach program {p.prog_id}")
    again = ("then `ksbpf attach --node` again (it puts the guard first); the daemon does it by itself"
             if mode == "tcx" else "then `ksbpf attach --node` again")
    return f"find who put it there and remove it ({'; '.join(how)}), or {again}"


def _prog_name(prog_id: int) -> str:
    try:
        fd = libbpf.prog_fd_by_id(prog_id)
    except OSError:
        return ""
    try:
        return libbpf.prog_info(fd).name
    finally:
        os.close(fd)


def _tcx_chain(ifindex: int) -> list[tuple[int, int]]:
    """The interface's tcx egress chain in the order it runs ([] without tcx)."""
    try:
        return tc.tcx_query(ifindex)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS):
            return []
        raise


def programs_in_front(pin_dir: str, ns: netns.Netns, link: links.Link, mode: str,
                      runner: Runner | None = None) -> list[FrontProgram]:
    """The programs that run before this scope's guard on the interface's
    egress ([] when the guard is first, or absent: unguarded is another
    finding).  tcx runs before clsact, and a tcx program that returns
    anything but TCX_NEXT ends the interface's egress processing: in clsact
    mode every tcx program is in front, and every filter listed before ours."""
    run = runner or partial(netns.run_in, ns.path)
    chain = run(_tcx_chain, link.ifindex)
    if mode == "tcx":
        try:
            fd = libbpf.obj_get(_link_pin(pin_dir, link.ifindex))
        except OSError:
            return []
        try:
            ours = tc.link_info(fd)
        finally:
            os.close(fd)
        ids = [lid for _pid, lid in chain]
        if ours.ifindex != link.ifindex or ours.id not in ids:
            return []
        return [FrontProgram(pid, _prog_name(pid), "tcx", lid) for pid, lid in chain[:ids.index(ours.id)]]
    front = [FrontProgram(pid, _prog_name(pid), "tcx", lid) for pid, lid in chain]
    mine = _prog_ids(pin_dir)
    filters = tc.clsact_filters(ns.path, link.name)
    if not any(f.prog_id in mine for f in filters):
        return []
    for f in filters:
        if f.prog_id in mine:
            break
        front.append(FrontProgram(f.prog_id, _prog_name(f.prog_id) or f.name, f"clsact pref {f.pref}"))
    return front


def _guard_instance(pin_dir: str, entry: str) -> int:
    """A twin of the scope's pinned program for `entry`, on the scope's pinned
    maps, from the same compiled image (its tag must be the pinned one's: the
    same instructions, or it is refused)."""
    with bpf.ScopeMaps.from_pins(pin_dir) as maps:
        meta = maps.read_meta()
        np = NodePolicy.from_dict({**meta["policy"], "endpoints": [str(e) for e in maps.endpoints()]})
        image = bpf.image(np.policy.options, len(np.policy.endpoints), np.policy.events)
        fd = image.instance(entry, maps.fds)
    try:
        pinned = libbpf.obj_get(os.path.join(pin_dir, bpf.PIN_NAMES[entry]))
        try:
            same = libbpf.prog_info(pinned).tag == libbpf.prog_info(fd).tag
        finally:
            os.close(pinned)
        if not same:
            raise KsbpfError("the guard cannot be put first: this ksbpf's program differs from the attached one",
                             "attach again: ksbpf attach --node ... (or restart the daemon)")
        return fd
    except BaseException:
        os.close(fd)
        raise


def put_first(pin_dir: str, ns: netns.Netns, link: links.Link, mode: str,
              runner: Runner | None = None) -> bool:
    """Put the scope's guard first on the interface's egress again, make
    before break: a twin of the program is attached in front of everything
    (BPF_F_BEFORE), its link pinned in place of the old one, then the old
    link is detached -- the interface is never without a guard in the chain.
    tcx only (False for clsact: no filter can run before a tcx program, nor
    before one at preference 1; and False when the interface vanished)."""
    if mode != "tcx":
        return False
    path = _link_pin(pin_dir, link.ifindex)
    old_fd = libbpf.obj_get(path)
    try:
        prog_fd = _guard_instance(pin_dir, entry_for(link))
        try:
            try:
                new_fd = (runner or partial(netns.run_in, ns.path))(tc.tcx_attach, prog_fd, link.ifindex)
            except OSError as exc:
                if exc.errno in (errno.ENODEV, errno.ENXIO, errno.ENOENT):
                    return False
                raise
        finally:
            os.close(prog_fd)
        try:
            tmp = path + "_new"   # bpffs refuses names with a dot
            try:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                libbpf.obj_pin(new_fd, tmp)
                os.rename(tmp, path)   # atomic: the pin never goes missing
            except OSError:
                tc.link_detach(new_fd)   # keep the old guard, pinned as it was
                raise
            tc.link_detach(old_fd)
        finally:
            os.close(new_fd)
        return True
    finally:
        os.close(old_fd)


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
    sync_nf_pass(pin_dir, np, ns, present, mode)
    return result


def _release_all(pin_dir: str, meta: dict, ns: netns.Netns | None) -> list[int]:
    """Remove every guard a node scope's pins record (the scope's tcx links;
    its clsact filters on the namespace's interfaces).  The ids removed: of
    the links (netfilter, tcx), or of the program of each clsact filter."""
    mode, pref = meta.get("tc_mode", "tcx"), meta.get("pref", tc.CLSACT_PREFS[0])
    done = nf_release(pin_dir) + rawsock.node_release(pin_dir)
    if mode == "tcx":
        for ifindex in _pinned_ifindexes(pin_dir):
            done.append(unguard(pin_dir, ifindex, mode, pref))
    elif ns is not None and common.netns_alive(ns):
        ours = _prog_ids(pin_dir)
        for link in links.links(ns):
            for f in tc.clsact_filters(ns.path, link.name):
                if f.prog_id in ours:
                    tc.clsact_detach(ns.path, link.name, f.pref)
                    done.append(f.prog_id)
    return [i for i in done if i]


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
    from_birth: str = "absent"
    followed: list = field(default_factory=list)       # --endpoint auto: the endpoints read from the tunnels now
    follow_failed: list = field(default_factory=list)  # ... and the sources that could not be read
    raw_sockets: str = "open"   # "refused": the BPF LSM programs refuse PACKET_QDISC_BYPASS and AF_XDP binds
    dns: dict | None = None     # --dns: dns_state()

    def to_dict(self) -> dict:
        return {"scope": self.name, "netns": self.netns, "netns_cookie": self.netns_cookie,
                "pin_dir": self.pin_dir, "tc_mode": self.mode, "prog_ids": self.prog_ids,
                "from_birth": self.from_birth, "raw_sockets": self.raw_sockets, "dns": self.dns,
                "replaced": self.replaced, "interfaces": [i.to_dict() for i in self.interfaces],
                "tunnels": [t.to_dict() for t in self.tunnels], "mounted_bpffs": self.mounted_bpffs,
                "followed": [f.to_dict() for f in self.followed], "follow_failed": self.follow_failed}


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
    vpn = common.vpn_entries(policy)

    progress("loading the tc and netfilter programs (compiled by bcc unless a cached image fits)")
    prog = bpf.load(policy.options, len(policy.endpoints), policy.events, entries=bpf.NODE_ENTRIES)
    from_birth = bpf.ENTRY_NF in prog.progs
    with pins.locked(f"node-{cookie}"):   # taken after compiling: others wait milliseconds, not the compiler
        try:
            present = links.links(ns)
            common.sync_tunnels(prog.maps, policy, cookie, present)
            for ep in policy.endpoints:
                prog.maps.add_endpoint(ep)
            prog.maps.set_exempt(exempt)
            common.set_vpn(prog.maps, policy, vpn)
            prog.maps.set_dns(policy.dns)   # --dns: the VPN's resolvers (dns4, dns6)
            prog.maps.set_netns_cookie(cookie)
            final = pins.node_dir(cookie, bpffs)
            old_meta = _read_meta(final) if os.path.isdir(final) else None
            old_pref = (old_meta or {}).get("pref", tc.CLSACT_PREFS[1])
            pref = tc.CLSACT_PREFS[0] if old_pref != tc.CLSACT_PREFS[0] else tc.CLSACT_PREFS[1]
            old_nf = (old_meta or {}).get("nf_priority")
            nf_priority = nf.PRIORITIES[0] if old_nf != nf.PRIORITIES[0] else nf.PRIORITIES[1]
            meta = {
                "version": common.META_VERSION, "kind": "node", "name": label(policy.netns),
                "policy": {k: v for k, v in np.to_dict().items() if k != "endpoints"},
                "netns": {"path": ns.path, "inode": ns.inode, "cookie": cookie},
                "tc_mode": mode, "pref": pref, "attached_at": time.time(),
                "nf_priority": nf_priority if from_birth else None,
                "raw_lsm": rawsock.node_available(),   # PACKET_QDISC_BYPASS and AF_XDP binds refused
            }
            prog.maps.write_meta(meta)
            follow = followed.SyncResult()
            if policy.follow:   # --endpoint auto: what the tunnels use now
                follow = followed.sync(prog.maps, policy, *followed.read_now(policy, ns, present),
                                       previous=followed.previously(final) if old_meta else [])
                meta["followed"] = [f.to_dict() for f in follow.followed]   # the meta is written again below
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
                if from_birth:
                    live = {link.ifindex: True for link in done}
                    prog.maps.set_nf_pass(nf_pass_set(np, present, live))
                    progress(f"attaching the netfilter hook (IPv4, IPv6 POST_ROUTING, priority {nf_priority}): "
                             "interfaces created later are judged from birth")
                    nf_attach(staging, ns, nf_priority)
                if meta["raw_lsm"]:
                    progress("refusing PACKET_QDISC_BYPASS and AF_XDP binds in the namespace outside the exempt "
                             "cgroups (BPF LSM)")
                    rawsock.node_attach(staging, cookie, exempt)
            except BaseException:
                for link in done:   # nothing half-applied
                    unguard(staging, link.ifindex, mode, pref, ns, link.name)
                nf_release(staging)
                rawsock.node_release(staging)
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
                            status.interfaces, status.tunnels, mounted, status.from_birth,
                            follow.followed, follow.failed, status.raw_sockets, dns_state(np, status.from_birth))


# -- detach ---------------------------------------------------------------------------

@dataclass
class NodeDetachResult:
    removed_pins: list[str] = field(default_factory=list)
    detached_links: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"removed_pins": self.removed_pins, "detached_link_ids": self.detached_links}


def _remove(pin_dir: str) -> list[int]:
    meta = _read_meta(pin_dir) or {}
    ns = None
    if meta.get("netns"):
        ns = netns.Netns("", meta["netns"].get("path", ""), meta["netns"].get("inode", 0))
    done = _release_all(pin_dir, meta, ns)
    pins.remove_dir(pin_dir)
    return done


def detach(netns_spec: str = "", bpffs: str = pins.BPFFS) -> NodeDetachResult:
    """Remove node mode from a namespace: its guards and pins.  Idempotent."""
    preflight.require_root()
    ns = netns.resolve(netns_spec)
    result = NodeDetachResult()
    cookie = netns.cookie(ns)
    with pins.locked(f"node-{cookie}"):
        pin_dir = pins.node_dir(cookie, bpffs)
        if os.path.isdir(pin_dir):
            result.detached_links += _remove(pin_dir)
            result.removed_pins.append(pin_dir)
        pins.prune(bpffs)
    return result


def detach_all(bpffs: str = pins.BPFFS) -> NodeDetachResult:
    """Every node scope, and every tcx link of a ksbpf program anywhere (also
    those whose pins were removed by hand).  Call with pins.locked() held."""
    result = NodeDetachResult()
    for pin_dir in pins.list_node_dirs(bpffs):
        result.detached_links += _remove(pin_dir)
        result.removed_pins.append(pin_dir)
    result.detached_links += tc.detach_tcx_programs(bpf.TC_ENTRIES)
    if nf.supported():
        # every netfilter link of a ksbpf program: node mode's, and the cgroup scopes' tunnel-source hooks
        result.detached_links += nf.detach_programs(bpf.NF_ENTRIES)
    return result


# -- status ----------------------------------------------------------------------------

@dataclass(frozen=True)
class InterfaceState:
    ifindex: int
    name: str
    kind: str | None
    role: str          # loopback, tunnel, internal, guarded
    guarded: bool      # this scope's program is attached to it
    in_front: tuple[FrontProgram, ...] = ()   # programs that run before the guard (it is not first)

    @property
    def unguarded(self) -> bool:
        """Should be guarded and is not: its traffic is NOT judged."""
        return self.role == "guarded" and not self.guarded

    @property
    def enforced(self) -> bool:
        """Guarded and first in the chain: every packet is judged."""
        return self.role != "guarded" or (self.guarded and not self.in_front)

    def to_dict(self) -> dict:
        return {"ifindex": self.ifindex, "name": self.name, "kind": self.kind, "role": self.role,
                "guarded": self.guarded, "unguarded": self.unguarded, "first": not self.in_front,
                "in_front": [p.to_dict() for p in self.in_front]}


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
    from_birth: str = "absent"   # the netfilter layer: "on", "absent" (kernel), "MISSING"
    followed: list = field(default_factory=list)   # --endpoint auto: the endpoints followed now (Followed)
    raw_sockets: str = "open"    # the BPF LSM layer: "refused", "open: why", "MISSING: ..."

    @property
    def policy(self):
        return self.node.policy

    @property
    def attached(self) -> bool:
        """Enforced: every interface that should be guarded is, its guard first in its chain."""
        return self.netns_ok and all(i.enforced for i in self.interfaces)

    @property
    def dropped_packets(self) -> int:
        return sum(p for (r, _f), (p, _b) in self.counters.items() if not r.allowed)

    def to_dict(self) -> dict:
        return {
            "scope": self.name, "kind": "node", "netns": self.netns_label, "pin_dir": self.pin_dir,
            "tc_mode": self.mode, "attached": self.attached, "from_birth": self.from_birth,
            "raw_sockets": self.raw_sockets,
            "interfaces": [i.to_dict() for i in self.interfaces],
            "tunnels": [t.to_dict() for t in self.tunnels],
            "internal": list(self.node.internal), "exempt_cgroups": list(self.node.exempt_cgroups),
            "endpoints": [str(e) for e in self.policy.endpoints],
            "options": self.policy.options.to_dict(), "tunnel_kinds": list(self.policy.tunnel_kinds),
            "counters": common.counters_dict(self.counters), "dropped_packets": self.dropped_packets,
            "events": {"rate": self.policy.events.rate, "burst": self.policy.events.burst,
                       "sent": self.events[0], "suppressed": self.events[1]},
            "attached_at": self.attached_at, "problems": self.problems,
            "follow": list(self.policy.follow), "followed": [f.to_dict() for f in self.followed],
            "vpn_mark": None, "vpn_cgroups": [], "any_endpoints": [], **self.policy.vpn_dict(),
            "dns": dns_state(self.node, self.from_birth),
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
            role = np.role(link.name, link.kind, link.ifindex)
            try:
                front = programs_in_front(pin_dir, ns, link, mode) if role == "guarded" and live[link.ifindex] else []
            except (OSError, KsbpfError) as exc:
                front = []
                problems.append(f"the egress chain of {link.name} cannot be read: {exc}")
            interfaces.append(InterfaceState(link.ifindex, link.name, link.kind, role, live[link.ifindex],
                                             tuple(front)))
        problems += [f"UNGUARDED: {i.name} (ifindex {i.ifindex}): its traffic is not judged "
                     f"(run the daemon, or `ksbpf attach --node` again)" for i in interfaces if i.unguarded]
        problems += [f"NOT FIRST: on {i.name} (ifindex {i.ifindex}) {', '.join(map(str, i.in_front))} "
                     f"run(s) before the guard and can pass what it would drop: "
                     f"{front_fix(i.name, list(i.in_front), mode)}" for i in interfaces if i.in_front]
    else:
        problems.append(f"network namespace {ns.label} is gone or not the one the scope was attached in")
    registered = {e.ifindex for e in entries if e.netns_cookie == cookie}
    tunnels = common.tunnel_states(np.policy, ns.label, present, registered)
    from_birth = nf_layer(pin_dir, meta)
    if from_birth.startswith("MISSING"):
        problems.append(f"from-birth layer {from_birth}: an interface created now leaves unjudged until the daemon "
                        "guards it (`ksbpf attach --node` again)")
    raw = rawsock.node_layer(pin_dir, bool(meta.get("raw_lsm")))
    if raw.startswith("MISSING"):
        problems.append(f"raw-socket layer {raw}: PACKET_QDISC_BYPASS and AF_XDP frames skip the tc guards "
                        "(`ksbpf attach --node` again)")
    return NodeStatus(meta.get("name", label(np.policy.netns)), pin_dir, np, mode, ns.label, interfaces, tunnels,
                      counters, meta.get("attached_at"), problems, event_stats, ns_ok, from_birth=from_birth,
                      followed=followed.recorded(meta), raw_sockets=raw)


def nf_layer(pin_dir: str, meta: dict) -> str:
    """The from-birth layer of a node scope: "on" (both netfilter links
    attached), "absent: ..." (the kernel has none, or the scope was attached
    without), "MISSING: ..." (attached, and a link is gone)."""
    if meta.get("nf_priority") is None:
        return NF_ABSENT if not nf.supported() else "absent: attached without it (`ksbpf attach --node` again adds it)"
    state = nf_links(pin_dir)
    gone = [family for family, info in state.items() if info is None or not info.alive]
    if gone:
        return f"MISSING: the {' and '.join(gone)} netfilter link is not attached"
    return "on"


@dataclass
class NodeEnsureResult:
    action: str   # "adopted", "attached", "replaced"
    pin_dir: str
    attach: NodeAttachResult | None = None


def _same_but_followed(np: NodePolicy, current: NodePolicy) -> bool:
    """current (read back, the followed endpoints in its maps) is np."""
    return (np.policy.same_but_followed(current.policy)
            and dataclasses.replace(current, policy=np.policy) == np)


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
        layer_ok = current is not None and (current.from_birth == "on" or (
            current.from_birth.startswith("absent") and not bpf.nf_available(np.policy.options)))
        layer_ok = layer_ok and (current.raw_sockets == "refused" or not rawsock.node_available())
        if current and current.attached and _same_but_followed(np, current.node) and layer_ok:
            return NodeEnsureResult("adopted", pin_dir)
    result = attach(np, progress, bpffs)
    return NodeEnsureResult("replaced" if result.replaced else "attached", pin_dir, result)
