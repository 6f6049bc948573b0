"""A pod's ksbpf.io/* annotations -> the policy of its scope.

    ksbpf.io/tunnels: "wg0,tun0"                        required: the pod's tunnel interfaces
    ksbpf.io/endpoints: "203.0.113.5:51820/udp"         VPN servers reachable outside the tunnel
    ksbpf.io/allow-lan: "true"                          the fixed private ranges (not DNS)
    ksbpf.io/allow-lan-dns: "true"                      ... DNS to them too (with allow-lan)
    ksbpf.io/allow-dhcp: "true"                         DHCP client traffic
    ksbpf.io/allow-cidrs: "10.96.0.0/12,10.244.0.0/16"  in-cluster ranges (cluster DNS), DNS included
    ksbpf.io/tunnel-kinds: "wireguard,tun"              link kinds trusted as tunnels
    ksbpf.io/vpn-mark: "0x51820"                        MARK[/MASK]: the endpoint exception takes only
                                                        the VPN client's marked packets (--vpn-mark)
    ksbpf.io/vpn-container: "wireguard"                 ... or only the packets of this container of
                                                        the pod (its cgroup is the --vpn-cgroup)
    ksbpf.io/dns: "10.64.0.1,fd00::1" or "auto"         DNS only to these resolvers through the tunnel
                                                        (--dns; auto: the tunnel's wg-quick DNS =, followed)

Endpoints may be `auto` (the tunnel's own, followed by the daemon) and
`*:51820/udp` (any server on that port) only with vpn-mark or vpn-container:
without the VPN client's identity any process of the pod could use them.
Until the vpn-container's cgroup exists (the gate runs before the pod's other
containers start) the endpoint exception is closed: nobody reaches an
endpoint outside the tunnel; the daemon opens it to the container when it appears.

A pod with any annotation under the prefix is protected.  An annotation
with an error never leaves the pod open: the pod is protected with
everything blocked (BLOCKED_TUNNEL), and the errors are reported.

    ksbpf.io/protected: "<digest>"                       written by the daemon, never by users

is what the daemon publishes once the pod's policy is in force: the digest
of the ksbpf annotations it enforces (digest()), "blocked:<digest>" when
they were invalid and everything is blocked.  The gate reads it through a
downward API volume and compares it with the digest of the annotations it
sees there: a pod passes only with the daemon's word that THESE annotations
are enforced.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Callable

from ksbpf.errors import KsbpfError
from ksbpf.policy import (AUTO, DEFAULT_TUNNEL_KINDS, AnyEndpoint, Options, Policy, parse_cidr, parse_endpoint,
                          check_resolvers, parse_mark, parse_resolver)

KEYS = ("tunnels", "endpoints", "allow-lan", "allow-lan-dns", "allow-dhcp", "allow-cidrs", "tunnel-kinds",
        "vpn-mark", "vpn-container", "dns")
CONTAINER_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")   # a DNS-1123 label, as Kubernetes names containers
# No interface has this name AND this link kind: nothing is ever registered, every
# non-local packet is dropped.
BLOCKED_TUNNEL = "ksbpf-blocked"
PROTECTED = "protected"     # the daemon's own annotation (not a policy key)
BOOLEANS = {"true": True, "false": False}


@dataclass(frozen=True)
class PodPolicy:
    policy: Policy
    errors: tuple[str, ...]   # empty when the annotations were valid
    vpn_container: str | None = None   # <prefix>vpn-container: the VPN client's container
    vpn_waiting: bool = False          # ... whose cgroup is not there yet: the endpoint exception is closed

    @property
    def blocked(self) -> bool:
        return bool(self.errors)


def blocked_policy(netns: str) -> Policy:
    return Policy((BLOCKED_TUNNEL,), netns=netns, tunnel_kinds=(BLOCKED_TUNNEL,))


def is_annotated(annotations: dict | None, prefix: str) -> bool:
    return any(key.startswith(prefix) and key != prefix + PROTECTED for key in annotations or {})


def digest(annotations: dict | None, prefix: str) -> str:
    """What identifies the policy annotations: a digest of every prefix
    annotation but the daemon's own, in key order."""
    mine = sorted((k, v) for k, v in (annotations or {}).items() if k.startswith(prefix) and k != prefix + PROTECTED)
    return hashlib.sha256("\n".join(f"{k}={v}" for k, v in mine).encode()).hexdigest()[:16]


def published(annotations: dict | None, prefix: str, blocked: bool) -> str:
    """The value of <prefix>protected the daemon writes for these annotations."""
    return ("blocked:" if blocked else "") + digest(annotations, prefix)


def read_downward(path: str) -> dict[str, str]:
    """A downward API annotations file (key="quoted value" lines, as the kubelet writes them)."""
    import json
    out = {}
    with open(path) as f:
        for line in f:
            key, sep, value = line.rstrip("\n").partition("=")
            if sep:
                try:
                    out[key] = json.loads(value) if value.startswith('"') else value
                except ValueError:
                    out[key] = value.strip('"')
    return out


def _items(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse(annotations: dict, prefix: str, netns: str,
          vpn_cgroup_of: Callable[[str], str | None] | None = None) -> PodPolicy:
    """The pod's policy, its tunnels looked up in `netns`; with errors, a
    policy that blocks everything.  vpn_cgroup_of(NAME): the cgroup of the
    pod's container NAME, None while it is not there."""
    mine = {key[len(prefix):]: value for key, value in annotations.items()
            if key.startswith(prefix) and key != prefix + PROTECTED}
    errors: list[str] = []
    for key in sorted(set(mine) - set(KEYS)):
        errors.append(f"{prefix}{key}: unknown annotation; known: {', '.join(prefix + k for k in KEYS)}")

    def flag(key: str) -> bool:
        value = mine.get(key)
        if value is None:
            return False
        if value.strip().lower() not in BOOLEANS:
            errors.append(f'{prefix}{key}: {value!r} is not "true" or "false"')
            return False
        return BOOLEANS[value.strip().lower()]

    def each(key: str, parse_one) -> list:
        out = []
        for item in _items(mine.get(key, "")):
            try:
                out.append(parse_one(item))
            except KsbpfError as exc:
                errors.append(f"{prefix}{key}: {exc}")
        return out

    tunnels = _items(mine.get("tunnels", ""))
    if not tunnels:
        errors.append(f'{prefix}tunnels: missing or empty; name the pod\'s tunnel interfaces, e.g. "wg0"')
    def endpoint(text: str):
        if text == AUTO:
            return AUTO
        return parse_endpoint(text)
    endpoints = each("endpoints", endpoint)
    follow = tuple(e for e in endpoints if e == AUTO)
    endpoints = [e for e in endpoints if e != AUTO]
    cidrs = each("allow-cidrs", parse_cidr)
    kinds = _items(mine.get("tunnel-kinds", "")) or list(DEFAULT_TUNNEL_KINDS)
    options = Options(flag("allow-lan"), flag("allow-lan-dns"), flag("allow-dhcp"))
    mark = None
    if "vpn-mark" in mine:
        try:
            mark = parse_mark(mine["vpn-mark"])
        except KsbpfError as exc:
            errors.append(f"{prefix}vpn-mark: {exc}")
    container = mine.get("vpn-container", "").strip() or None
    if "vpn-container" in mine and (container is None or not CONTAINER_NAME.fullmatch(container)):
        errors.append(f"{prefix}vpn-container: {mine['vpn-container']!r} is not a container name; give the name of "
                      "the pod's VPN container as its spec has it, e.g. \"wireguard\"")
        container = None
    wild = [str(e) for e in endpoints if isinstance(e, AnyEndpoint)] + list(follow)
    if wild and mark is None and container is None and "vpn-mark" not in mine and "vpn-container" not in mine:
        errors.append(f"{prefix}endpoints: {', '.join(wild)} need the VPN client's identity: any process of the "
                      f"pod could reach {'any server on that port' if len(wild) > len(follow) else 'the servers the tunnel uses'} "
                      f"outside the tunnel; add {prefix}vpn-mark (the mark the VPN client sets) or "
                      f"{prefix}vpn-container (its container), or give the server's address")
    dns: dict = {}
    if "dns" in mine:
        specs = _items(mine["dns"])
        if not specs:
            errors.append(f'{prefix}dns: empty; give the VPN\'s resolvers ("10.64.0.1,fd00::1") or "auto"')
        try:
            check_resolvers([parse_resolver(spec) for spec in specs if spec != AUTO])
        except KsbpfError as exc:
            errors.append(f"{prefix}dns: {exc}")
        if specs and not errors:
            from ksbpf.kernel import vpn_dns   # auto: the tunnel's wg-quick file, followed by the daemon
            try:
                dns = vpn_dns.followed_specs(specs, tuple(tunnels), own_namespace=False)
            except KsbpfError as exc:
                errors.append(f"{prefix}dns: {exc}")
    vpn_cgroups: tuple[str, ...] = ()
    waiting = False
    if container is not None and not errors:
        path = vpn_cgroup_of(container) if vpn_cgroup_of else None
        if path is None:   # not started yet: nobody reaches an endpoint outside the tunnel meanwhile
            waiting = True
            if mark is None:
                endpoints, follow = [], ()
        else:
            vpn_cgroups = (path,)
    if not errors:
        try:
            policy = Policy(tuple(tunnels), tuple(endpoints), netns, options, tuple(kinds),
                            allow_cidrs=tuple(cidrs), follow=follow, vpn_mark=mark, vpn_cgroups=vpn_cgroups,
                            **dns)
            return PodPolicy(policy, (), container, waiting)
        except KsbpfError as exc:
            errors.append(f"{prefix}*: {exc}")
    return PodPolicy(blocked_policy(netns), tuple(errors), container)
