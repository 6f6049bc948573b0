"""`--endpoint auto`: the endpoint maps of a scope kept in step with the
endpoints its tunnels use (ksbpf.kernel.vpn_endpoints reads them).

The maps hold the fixed endpoints and the followed ones; the scope's meta
records which were followed, and from where (for `ksbpf status`).  A change
adds the new endpoints before it removes the old ones: during a server
switch both are allowed for a moment, never neither, so the handshake to the
new server is not dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ksbpf.errors import KsbpfError
from ksbpf.kernel import bpf, links, netns, vpn_endpoints
from ksbpf.kernel.vpn_endpoints import Followed
from ksbpf.policy import AUTO, Endpoint, Policy

MAX_FOLLOWED = 64   # the endpoint maps hold at least 64 addresses (KSBPF_MAX_ENDPOINTS)


@dataclass
class SyncResult:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    followed: list[Followed] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)   # sources not read (their endpoints kept), or refused endpoints

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


def read_now(policy: Policy, ns: netns.Netns, present: list[links.Link] | None = None,
             held=None) -> tuple[list[Followed], list[str]]:
    """What the policy's tunnels (and OpenVPN sockets) use now; the sources
    that could not be read.  A tunnel that is not there (or not of a trusted
    kind) has no endpoints."""
    if present is None:
        present = links.links(ns)
    tunnels = {}
    if AUTO in policy.follow:
        by_name = {link.name: link for link in present}
        tunnels = {name: name in by_name and policy.trusts(name, by_name[name].kind) for name in policy.tunnels}
    sockets = tuple(f for f in policy.follow if f != AUTO)
    return vpn_endpoints.read_all(ns, tunnels, sockets, held)


def recorded(meta: dict) -> list[Followed]:
    out = []
    for d in meta.get("followed", []):
        try:
            out.append(Followed.from_dict(d))
        except (KsbpfError, KeyError, TypeError):
            continue
    return out


def sync(maps: bpf.ScopeMaps, policy: Policy, followed: list[Followed], failed: list[str] = (),
         previous: list[Followed] | None = None) -> SyncResult:
    """Bring the endpoint maps to the fixed endpoints and `followed`; the
    endpoints of sources in `failed` (not read this time) stay as they were
    (`previous`: what was followed before, when the maps are new: a re-attach).
    New ones first, then the old ones leave."""
    meta = maps.read_meta()
    before = recorded(meta) if previous is None else previous
    failed_sources = {f.split(": ", 1)[0] for f in failed}
    keep = [f for f in before if f.source in failed_sources]
    wanted_followed = list(dict.fromkeys(followed + keep))
    result = SyncResult(failed=list(failed))
    if len({f.endpoint for f in wanted_followed}) > MAX_FOLLOWED:
        result.failed.append(f"more than {MAX_FOLLOWED} followed endpoints: only the first {MAX_FOLLOWED} are allowed")
        seen: list[Endpoint] = []
        for f in list(wanted_followed):
            if f.endpoint not in seen:
                seen.append(f.endpoint)
            if len(seen) > MAX_FOLLOWED:
                wanted_followed.remove(f)
    want = set(policy.endpoints) | {f.endpoint for f in wanted_followed}
    have = set(maps.endpoints())
    refused = set()
    for ep in sorted(want - have, key=Endpoint.sort_key):
        try:
            maps.add_endpoint(ep)
            result.added.append(str(ep))
        except (KsbpfError, OSError) as exc:
            refused.add(ep)
            result.failed.append(f"{ep}: {exc}")
    for ep in sorted(have - want, key=Endpoint.sort_key):
        maps.remove_endpoint(ep)
        result.removed.append(str(ep))
    result.followed = [f for f in wanted_followed if f.endpoint not in refused]
    if [f.to_dict() for f in result.followed] != meta.get("followed", []) and meta:
        meta["followed"] = [f.to_dict() for f in result.followed]
        maps.write_meta(meta)
    return result


def describe(meta: dict) -> list[str]:
    """The followed endpoints as `ksbpf status` shows them."""
    return [f.describe() for f in recorded(meta)]


def previously(pin_dir: str) -> list[Followed]:
    """What a scope in force follows now (a re-attach carries it over)."""
    try:
        with bpf.ScopeMaps.from_pins(pin_dir) as maps:
            return recorded(maps.read_meta())
    except (OSError, KsbpfError, ValueError):
        return []
