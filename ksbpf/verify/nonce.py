"""The per-scope verify nonce (map verify_nonce): a test run whose skb->cb
carries it is decided but neither counted nor reported by the program.

It is set once, at random, by the first verify of a scope, and kept: the
pinned map is readable by root only (bpffs pins are 0600, and opening a map
by id needs CAP_SYS_ADMIN), so only root can run an uncounted check.
"""

from __future__ import annotations

import struct

from ksbpf.kernel import bpf, libbpf
from ksbpf.verify.testrun import NONCE_SIZE, new_nonce

_KEY = struct.pack("=I", 0)


def get_nonce(maps: bpf.ScopeMaps) -> bytes | None:
    value = libbpf.map_lookup(maps.fds["verify_nonce"], _KEY, NONCE_SIZE)
    return value if value and any(value[:4]) else None


def set_nonce(maps: bpf.ScopeMaps, nonce: bytes) -> None:
    libbpf.map_update(maps.fds["verify_nonce"], _KEY, nonce)


def ensure_nonce(maps: bpf.ScopeMaps) -> bytes:
    """The scope's nonce, made on first use."""
    nonce = get_nonce(maps)
    if nonce is None:
        nonce = new_nonce()
        set_nonce(maps, nonce)
    return nonce
