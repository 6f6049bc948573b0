"""A pod's ksbpf.io/* annotations -> the policy of its scope.

    ksbpf.io/tunnels: "wg0,tun0"                        required: the pod's tunnel interfaces
    ksbpf.io/endpoints: "203.0.113.5:51820/udp"         VPN servers reachable outside the tunnel
    ksbpf.io/allow-lan: "true"                          the fixed private ranges (not DNS)
    ksbpf.io/allow-lan-dns: "true"                      ... DNS to them too (with allow-lan)
    ksbpf.io/allow-dhcp: "true"                         DHCP client traffic
    ksbpf.io/allow-cidrs: "10.96.0.0/12,10.244.0.0/16"  in-cluster ranges (cluster DNS), DNS included
    ksbpf.io/tunnel-kinds: "wireguard,tun"              link kinds trusted as tunnels

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
from dataclasses import dataclass

from ksbpf.errors import KsbpfError
from ksbpf.policy import DEFAULT_TUNNEL_KINDS, Endpoint, Options, Policy, parse_cidr

KEYS = ("tunnels", "endpoints", "allow-lan", "allow-lan-dns", "allow-dhcp", "allow-cidrs", "tunnel-kinds")
# No interface has this name AND this link kind: nothing is ever registered, every
# non-local packet is dropped.
BLOCKED_TUNNEL = "ksbpf-blocked"
PROTECTED = "protected"     # the daemon's own annotation (not a policy key)
BOOLEANS = {"true": True, "false": False}


@dataclass(frozen=True)
class PodPolicy:
    policy: Policy
    errors: tuple[str, ...]   # empty when the annotations were valid

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


def parse(annotations: dict, prefix: str, netns: str) -> PodPolicy:
    """The pod's policy, its tunnels looked up in `netns`; with errors, a
    policy that blocks everything."""
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
    endpoints = each("endpoints", Endpoint.parse)
    cidrs = each("allow-cidrs", parse_cidr)
    kinds = _items(mine.get("tunnel-kinds", "")) or list(DEFAULT_TUNNEL_KINDS)
    options = Options(flag("allow-lan"), flag("allow-lan-dns"), flag("allow-dhcp"))
    if not errors:
        try:
            policy = Policy(tuple(tunnels), tuple(endpoints), netns, options, tuple(kinds),
                            allow_cidrs=tuple(cidrs))
            return PodPolicy(policy, ())
        except KsbpfError as exc:
            errors.append(f"{prefix}*: {exc}")
    return PodPolicy(blocked_policy(netns), tuple(errors))
