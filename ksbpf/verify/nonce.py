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


def _value_size(maps: bpf.ScopeMaps) -> int:
    return libbpf.map_info(maps.fds["verify_nonce"]).value_size


def get_nonce(maps: bpf.ScopeMaps) -> bytes | None:
    value = libbpf.map_lookup(maps.fds["verify_nonce"], _KEY, _value_size(maps))
    return value[:NONCE_SIZE] if value and any(value[:4]) else None


def set_nonce(maps: bpf.ScopeMaps, nonce: bytes, netns_cookie: int = 0) -> None:
    """The nonce, and the namespace a verify run stands for where the program
    reads a socket's namespace from socket storage (a test run has no socket
    of the scope); older scopes' nonce holds the nonce alone."""
    value = nonce + struct.pack("=Q", netns_cookie)
    libbpf.map_update(maps.fds["verify_nonce"], _KEY, value[:_value_size(maps)])


def ensure_nonce(maps: bpf.ScopeMaps, netns_cookie: int = 0) -> bytes:
    """The scope's nonce, made on first use; verify runs stand for a socket of
    namespace netns_cookie from now on."""
    nonce = get_nonce(maps) or new_nonce()
    set_nonce(maps, nonce, netns_cookie)
    return nonce
