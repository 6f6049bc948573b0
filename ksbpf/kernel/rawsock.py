"""No raw sockets in a scope: a BPF LSM program on socket_create, attached to
the scope's cgroup (BPF_LSM_CGROUP, Linux 6.0), that refuses AF_PACKET
(SOCK_PACKET included: the kernel turns `socket(AF_INET, SOCK_PACKET, ...)`
into AF_PACKET before it asks the LSM) and AF_XDP sockets to the scope's
processes.

Frames sent on an AF_PACKET or AF_XDP socket never pass the cgroup egress
hook: a process holding CAP_NET_RAW could send any frame out of any
interface.  This program closes that at the source -- where the kernel runs
BPF LSM programs: `bpf` in the active LSM list (`lsm=...,bpf` on the kernel
command line; Debian's kernels are built with CONFIG_BPF_LSM) and BPF
trampolines (the JIT).  Where it does not load, `ksbpf status` says the
layer is absent and the CAP_NET_RAW warnings stand.

Like the --deny-tun device program it is built here, not compiled by bcc:
ten instructions, no maps.  Its context is the hook's arguments as u64s:
socket_create(int family, int type, int protocol, int kern).  Sockets the
kernel makes for itself (kern != 0) are not the scope's business.  For
BPF_LSM_CGROUP programs 1 lets the call go on, 0 refuses it (EPERM).  A
socket opened before the program was attached stays usable (the check is at
creation).
"""

from __future__ import annotations

import functools
import os
import struct

from ksbpf.kernel import btf, libbpf

BPF_PROG_TYPE_LSM = 29
BPF_LSM_CGROUP = 43
HOOK = "bpf_lsm_socket_create"
PROG_NAME = "ksbpf_no_raw"
PIN_NAME = "prog_lsm"
AF_PACKET, AF_XDP = 17, 44
REFUSED_FAMILIES = (AF_PACKET, AF_XDP)

_INSN = struct.Struct("=BBhi")
_LDXDW = 0x79        # BPF_LDX | BPF_MEM | BPF_DW
_JNE_K = 0x55        # BPF_JMP | BPF_JNE | BPF_K
_JEQ32_K = 0x16      # BPF_JMP32 | BPF_JEQ | BPF_K
_JA = 0x05           # BPF_JMP | BPF_JA
_MOV64_K = 0xB7
_EXIT = 0x95


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return _INSN.pack(code, (src << 4) | dst, off, imm)


def no_raw_insns() -> bytes:
    """Refuse AF_PACKET and AF_XDP sockets made by a process; allow the rest."""
    return b"".join([
        _insn(_LDXDW, dst=2, src=1, off=24),                 # r2 = kern
        _insn(_JNE_K, dst=2, off=6, imm=0),                  # the kernel's own socket: allow
        _insn(_LDXDW, dst=2, src=1, off=0),                  # r2 = family
        _insn(_JEQ32_K, dst=2, off=2, imm=AF_PACKET),        # refuse
        _insn(_JEQ32_K, dst=2, off=1, imm=AF_XDP),           # refuse
        _insn(_JA, off=2),                                   # allow
        _insn(_MOV64_K, dst=0, imm=0),                       # refuse: EPERM
        _insn(_EXIT),
        _insn(_MOV64_K, dst=0, imm=1),                       # allow
        _insn(_EXIT),
    ])


def load() -> int:
    """The program's fd (the caller closes it).  OSError (or btf.BtfError)
    where the kernel does not run BPF LSM programs."""
    attach_btf_id = btf.func_id(HOOK)
    return libbpf.prog_load_btf(BPF_PROG_TYPE_LSM, PROG_NAME, "GPL", no_raw_insns(), BPF_LSM_CGROUP, attach_btf_id)


@functools.lru_cache(maxsize=1)
def why_not() -> str:
    """'' when this kernel loads the program; else why not, for people."""
    try:
        fd = load()
    except btf.BtfError as exc:
        return f"no BPF LSM hook to attach to ({exc})"
    except OSError as exc:
        return (f"the kernel refused the BPF LSM program ({os.strerror(exc.errno) if exc.errno else exc}): it needs "
                "`bpf` in the active LSMs (lsm=...,bpf on the kernel command line), BPF trampolines, and Linux 6.0")
    os.close(fd)
    return ""


def available() -> bool:
    return not why_not()
