"""dns = ["auto"] in the daemon: a scope's dns maps kept in step with the
resolvers its VPN configured for the tunnel (ksbpf.kernel.vpn_dns reads
them: systemd-resolved's per-link DNS, or wg-quick's `DNS =`).

Updated in place, nothing re-attached: the new resolvers enter dns4/dns6
first, then the redirect target moves to them, then the old ones leave
(ScopeMaps.set_dns), so a query to the new resolver is never dropped once
the daemon has read it.  The scope's meta records the resolvers (its
policy's `dns`) and where they were read (`dns_source`, for `ksbpf status`).
While none is known, DNS from the scope is dropped (dns_not_vpn): a kill
switch fails closed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ksbpf.kernel import bpf, vpn_dns
from ksbpf.policy import Policy


@dataclass
class DnsSync:
    now: tuple = ()                     # the resolvers in force after the sync
    source: str | None = None           # where the tunnel's were read (None: none configured)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


def read_now(policy: Policy, **kw) -> vpn_dns.Found | None:
    """The resolvers the VPN configured for the policy's tunnels now (None: none)."""
    return vpn_dns.find_optional(policy.tunnels, own_namespace=policy.netns in ("", None), **kw)


def wanted(policy: Policy, found: vpn_dns.Found | None) -> tuple:
    """The fixed resolvers first (the user's order), then the tunnel's."""
    return tuple(dict.fromkeys(policy.dns_fixed + (found.addresses if found else ())))


def sync(maps: bpf.ScopeMaps, policy: Policy, found: vpn_dns.Found | None) -> DnsSync:
    """Bring the scope's dns maps (and its meta) to the fixed resolvers and `found`."""
    want = wanted(policy, found)
    have = maps.dns()
    result = DnsSync(want, found.source if found else None,
                     [str(a) for a in want if a not in have], [str(a) for a in have if a not in want])
    meta = maps.read_meta()
    if result.changed or want != policy.dns:   # policy.dns: what the daemon set last (the order: the targets)
        maps.set_dns(want)   # new ones in, the redirect target moved, the old ones out
    pol = meta.get("policy")
    if pol is not None and (pol.get("dns", []) != [str(a) for a in want] or meta.get("dns_source") != result.source):
        if want:
            pol["dns"] = [str(a) for a in want]
        else:
            pol.pop("dns", None)
        meta["dns_source"] = result.source
        maps.write_meta(meta)
    return result
