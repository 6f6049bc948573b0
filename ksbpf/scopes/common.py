"""What every kind of scope shares: counters carried across re-attach, the
tunnels a policy allows among the interfaces present and keeping a tunnels
map in step with them, and the scope's record (meta) read back from its pins.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable

from ksbpf.kernel import bpf, cgroup, links, netns
from ksbpf.policy import Endpoint, Policy
from ksbpf.reasons import Family, Reason

Progress = Callable[[str], None]
META_VERSION = 4   # of the record in every scope's meta map; 3: reasons renumbered for the tc hook; 4: the verify_nonce map


def quiet(_msg: str) -> None:
    pass


Counters = dict[tuple[Reason, Family], tuple[int, int]]


def counter_key(reason: Reason, family: Family) -> str:
    return f"{reason.label}/{family.label}"


def total_counters(maps: bpf.ScopeMaps, meta: dict) -> Counters:
    """The scope's counters since its first attach: the live map plus what
    earlier programs of the scope counted before a re-attach replaced them."""
    base = meta.get("counters_base", {})
    out = {}
    for (r, f), (p, b) in maps.counters().items():
        bp, bb = base.get(counter_key(r, f), (0, 0))
        out[(r, f)] = (p + bp, b + bb)
    return out


def carry_counters(old_pin_dir: str, meta: dict) -> None:
    """Record in `meta` what the scope counted until now, read from the pins of
    the program being replaced (its counts are final once it is detached)."""
    with bpf.ScopeMaps.from_pins(old_pin_dir) as old_maps:
        carried = total_counters(old_maps, old_maps.read_meta())
    meta["counters_base"] = {counter_key(r, f): [p, b] for (r, f), (p, b) in carried.items()}


def counters_dict(counters: Counters) -> dict:
    """The counters as `status --json` shows them: by reason, then by family."""
    return {r.label: {"allowed": r.allowed, "packets": p, "bytes": b,
                      "by_family": {f.label: {"packets": fp, "bytes": fb}
                                    for (rr, f), (fp, fb) in counters.items() if rr == r}}
            for r, (p, b) in by_reason(counters).items()}


def by_reason(counters: Counters) -> dict[Reason, tuple[int, int]]:
    out = {r: (0, 0) for r in Reason}
    for (r, _f), (p, b) in counters.items():
        out[r] = (out[r][0] + p, out[r][1] + b)
    return out


@dataclass(frozen=True)
class TunnelState:
    name: str
    netns: str
    ifindex: int | None   # current ifindex in its namespace, None when absent
    kind: str | None      # its link kind
    trusted: bool         # present with a trusted kind (not an impostor)
    registered: bool      # the policy map allows exactly this interface

    @property
    def present(self) -> bool:
        return self.ifindex is not None

    @property
    def impostor(self) -> bool:
        return self.present and not self.trusted

    def to_dict(self) -> dict:
        return {"name": self.name, "netns": self.netns, "ifindex": self.ifindex, "kind": self.kind,
                "present": self.present, "impostor": self.impostor, "registered": self.registered}


def tunnel_plan(policy: Policy, present: list[links.Link]) -> dict[int, int]:
    """ifindex -> tunnel index of the interfaces the policy allows right now:
    the tunnels' names, with a trusted link kind."""
    return {link.ifindex: policy.tunnels.index(link.name)
            for link in present if policy.trusts(link.name, link.kind)}


def tunnel_states(policy: Policy, label: str, present: list[links.Link] | None,
                  registered: set[int]) -> list[TunnelState]:
    by_name = {link.name: link for link in present or ()}
    states = []
    for name in policy.tunnels:
        link = by_name.get(name)
        ifindex = link.ifindex if link else None
        states.append(TunnelState(name, label, ifindex, link.kind if link else None,
                                  bool(link) and policy.trusts(name, link.kind), ifindex in registered))
    return states


@dataclass(frozen=True)
class SyncResult:
    added: list[int]
    removed: list[int]


def sync_tunnels(maps: bpf.ScopeMaps, policy: Policy, cookie: int, present: list[links.Link]) -> SyncResult:
    """Make the tunnels map allow exactly the policy's tunnels that exist now
    (stale entries are removed before new ones are added)."""
    want = tunnel_plan(policy, present)
    have = {(e.netns_cookie, e.ifindex): e.index for e in maps.tunnels()}
    removed = []
    for (c, ifindex), index in have.items():
        if c != cookie or want.get(ifindex) != index:
            maps.remove_tunnel(c, ifindex)
            removed.append(ifindex)
    added = []
    for ifindex, index in want.items():
        if have.get((cookie, ifindex)) != index:
            maps.add_tunnel(cookie, ifindex, index)
            added.append(ifindex)
    return SyncResult(added, removed)


def sync_tunnel_sources(maps: bpf.ScopeMaps, policy: Policy, cookie: int, present: list[links.Link],
                        addresses: dict[int, list]) -> list[str]:
    """Record the addresses of the policy's tunnels present now in the
    namespace (tunnel_src, for the netfilter hook that keeps packets with a
    tunnel's source address off every other interface).  Addresses are never
    forgotten while the scope lives: a tunnel that is gone keeps its last-known
    addresses, with ifindex 0 (TIME_WAIT sockets still use them).  Returns
    the addresses newly recorded."""
    if "tunnel_src" not in maps.fds:
        return []
    names = {link.ifindex: link.name for link in present}
    holder: dict = {}
    for ifindex in tunnel_plan(policy, present):
        for addr in addresses.get(ifindex, ()):
            if not addr.is_loopback:
                holder[addr] = (ifindex, names[ifindex])
    have = {a: v for (c, a), v in maps.tunnel_sources().items() if c == cookie}
    added = []
    for addr in sorted(set(have) | set(holder), key=lambda a: (a.version, a.packed)):
        want = holder.get(addr) or (0, have[addr][1])   # gone: ifindex 0, the last name kept
        if have.get(addr) != want:
            maps.set_tunnel_source(cookie, addr, *want)
            if addr not in have:
                added.append(str(addr))
    return added


def vpn_entries(policy: Policy) -> list[tuple[int, int]]:
    """(cgroup id, level) of each --vpn-cgroup: resolved before anything is
    loaded, so that a missing cgroup changes nothing."""
    out = []
    for path in policy.vpn_cgroups:
        cg = cgroup.resolve(path)
        out.append((cg.id, cgroup.level(cg)))
    return out


def set_vpn(maps: bpf.ScopeMaps, policy: Policy, cgroups: list[tuple[int, int]]) -> None:
    """The VPN client's identity (--vpn-mark, --vpn-cgroup) and the wildcard
    endpoints only it may use, into a freshly loaded program's maps."""
    if policy.vpn_mark:
        maps.set_vpn_mark(*policy.vpn_mark)
    if policy.vpn_cgroups:
        maps.set_vpn_cgroups(cgroups)
    for ep in policy.any_endpoints:
        maps.add_any_endpoint(ep)


def meta_netns(meta: dict) -> netns.Netns:
    ref = meta.get("netns", {})
    return netns.Netns(meta["policy"]["netns"], ref.get("path", ""), ref.get("inode", 0))


def policy_from(meta: dict, endpoints: list[Endpoint]) -> Policy:
    """The policy a scope was attached with, read back from its pins."""
    return dataclasses.replace(Policy.from_dict(meta["policy"]), endpoints=tuple(endpoints))


def netns_alive(ns: netns.Netns) -> bool:
    """Does ns.path still refer to the namespace the scope was attached in?"""
    try:
        return os.stat(ns.path).st_ino == ns.inode
    except OSError:
        return False
