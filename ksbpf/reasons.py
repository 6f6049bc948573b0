"""Why a packet was allowed or dropped: the Python mirror of enum ksbpf_reason.

ebpf/ksbpf.h is the source of truth; tests/test_reasons.py checks that this
enum agrees with it, name for name and value for value.
"""

from __future__ import annotations

import re
from enum import IntEnum


class Reason(IntEnum):
    ALLOW_LOOPBACK = 0
    ALLOW_TUNNEL = 1
    ALLOW_ENDPOINT = 2
    ALLOW_LAN = 3
    ALLOW_DHCP = 4
    ALLOW_NEIGH = 5
    ALLOW_EXEMPT = 6
    DROP_NOT_TUNNEL = 7
    DROP_ENDPOINT_MISMATCH = 8
    DROP_LAN_DNS = 9
    DROP_FRAGMENT = 10
    DROP_MALFORMED = 11
    DROP_NOT_IP = 12
    DROP_TUNNEL_SOURCE = 13
    DROP_ENDPOINT_NOT_VPN = 14
    DROP_DNS_NOT_VPN = 15

    @property
    def allowed(self) -> bool:
        return self < FIRST_DROP

    @property
    def label(self) -> str:
        """Short lower-case name: 'tunnel', 'not_tunnel', ... (metrics, JSON)."""
        return self.name.split("_", 1)[1].lower()


FIRST_DROP = Reason.DROP_NOT_TUNNEL
REASON_MAX = len(Reason)


class Family(IntEnum):
    """Mirror of enum ksbpf_family: counters are kept per (reason, family)."""

    IPV4 = 0
    IPV6 = 1
    OTHER = 2

    @property
    def label(self) -> str:
        return self.name.lower()


FAMILY_MAX = len(Family)


class Hook(IntEnum):
    """Mirror of enum ksbpf_hook: where a decision was taken."""

    CGROUP = 0
    TC = 1
    NF = 2

    @property
    def label(self) -> str:
        return self.name.lower()


def parse_c_enum(header: str, enum: str = "ksbpf_reason", prefix: str = "KSBPF_") -> dict[str, int]:
    """NAME -> value of `enum <enum> { ... }` in C source (explicit values only)."""
    body = re.search(r"enum\s+" + enum + r"\s*\{(.*?)\}", header, re.S)
    if not body:
        raise ValueError(f"enum {enum} not found")
    text = re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S)
    return {m.group(1)[len(prefix):]: int(m.group(2), 0)
            for m in re.finditer(r"(" + prefix + r"\w+)\s*=\s*(\w+)", text)}
