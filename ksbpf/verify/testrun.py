"""Test runs of a loaded skb program with a context we choose: the egress
ifindex, and skb->cb (where a verify run carries the scope's nonce, so that
the program neither counts nor reports it).

One Runner keeps its ctypes buffers and only rewrites what changes between
runs: the fuzzer makes a million of these calls.
"""

from __future__ import annotations

import ctypes
import os
import struct

from ksbpf.kernel import libbpf

SK_BUFF_CB_OFFSET = 48   # offsetof(struct __sk_buff, cb): five __u32
NONCE_SIZE = 16          # cb[0..3]; struct ksbpf_nonce in ebpf/ksbpf.h
MAX_DATA = 3 * 1024      # the kernel refuses test-run data over about a page, less head and tail room
TC_ACT_UNSPEC, TC_ACT_SHOT = 0xFFFFFFFF, 2


def refused(data: bytes) -> bool:
    """Does the kernel refuse a test run of `data` (EINVAL)?  It does when the
    Ethernet header announces IPv4 or IPv6 and fewer bytes than that header
    follow (measured on 6.18; a real packet at these hooks always has them)."""
    if len(data) < 14:
        return True
    proto = struct.unpack_from("!H", data, 12)[0]
    return (proto == 0x0800 and len(data) < 14 + 20) or (proto == 0x86DD and len(data) < 14 + 40)


def new_nonce() -> bytes:
    """A random nonce whose first word is not zero (zero means "no nonce")."""
    while True:
        n = os.urandom(NONCE_SIZE)
        if struct.unpack_from("=I", n)[0]:
            return n


def allowed(hook_is_tc: bool, retval: int) -> bool:
    """A program's verdict: cgroup_skb 1/0; tc TC_ACT_UNSPEC (next)/TC_ACT_SHOT."""
    if hook_is_tc:
        if retval not in (TC_ACT_UNSPEC, TC_ACT_SHOT):
            raise ValueError(f"unexpected tc verdict {retval}")
        return retval == TC_ACT_UNSPEC
    if retval not in (0, 1):
        raise ValueError(f"unexpected cgroup_skb verdict {retval}")
    return retval == 1


class Runner:
    """BPF_PROG_TEST_RUN of one program, with reusable buffers."""

    def __init__(self, prog_fd: int, nonce: bytes | None = None):
        self.prog_fd = prog_fd
        self._lib = libbpf._lib()
        self._ctx = ctypes.create_string_buffer(libbpf.SK_BUFF_SIZE)
        self._data = ctypes.create_string_buffer(MAX_DATA)
        self._opts = libbpf._TestRunOpts()
        self._opts.sz = ctypes.sizeof(self._opts)
        self._opts.data_in = ctypes.cast(self._data, ctypes.c_void_p)
        self._opts.ctx_in = ctypes.cast(self._ctx, ctypes.c_void_p)
        self._opts.ctx_size_in = libbpf.SK_BUFF_SIZE
        self._opts.repeat = 1
        self._opts_ref = ctypes.byref(self._opts)
        self._ifindex = ctypes.c_uint32.from_buffer(self._ctx, libbpf.SK_BUFF_IFINDEX_OFFSET)
        self.set_nonce(nonce)

    def set_mark(self, mark: int) -> None:
        """skb->mark of the next runs (--vpn-mark: the VPN client's packets carry it)."""
        ctypes.c_uint32.from_buffer(self._ctx, libbpf.SK_BUFF_MARK_OFFSET).value = mark

    def set_nonce(self, nonce: bytes | None) -> None:
        ctypes.memmove(ctypes.addressof(self._ctx) + SK_BUFF_CB_OFFSET, nonce or bytes(NONCE_SIZE), NONCE_SIZE)

    def run(self, data: bytes, ifindex: int) -> int:
        """The program's return value for `data` (>= 14 bytes) leaving through ifindex."""
        n = len(data)
        if not 14 <= n <= MAX_DATA:
            raise ValueError(f"test-run data must be 14 to {MAX_DATA} bytes, not {n}")
        ctypes.memmove(self._data, data, n)
        self._opts.data_size_in = n
        self._opts.data_size_out = 0   # the kernel wrote the last output size here: a smaller hint is ENOSPC
        self._ifindex.value = ifindex
        ret = self._lib.bpf_prog_test_run_opts(self.prog_fd, self._opts_ref)
        if ret < 0:
            err = -ret if ret != -1 else (ctypes.get_errno() or 1)
            raise OSError(err, f"test run: {os.strerror(err)}")
        return self._opts.retval
