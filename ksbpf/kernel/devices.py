"""`--deny-tun`: a cgroup device program that refuses /dev/net/tun (character
device 10:200) to a scope's processes, and the look at who holds one.

A process that can write into a tun device injects packets that no socket of
its cgroup sends: the kernel forwards them (ip_forward on) or answers them
(an echo request "from" a remote address gets an echo reply carrying its
payload, sent by the kernel's own ICMP socket).  The cgroup egress hook sees
neither.  Refusing to open the device closes that path; a tun device opened
before the program was attached stays usable (the check is at open), which
`ksbpf verify` reports.

The program is eleven instructions, built here rather than compiled by bcc:
no maps, nothing shared with the packet policy, no compiler needed to load
it, and the verifier accepts it in microseconds.  Its context is struct
bpf_cgroup_dev_ctx { u32 access_type (access << 16 | type); u32 major; u32
minor; }; returning 0 refuses the access (EPERM), 1 lets it through to the
next device program (cgroup programs of one hook must all agree).
"""

from __future__ import annotations

import os
import stat

from ksbpf.kernel import libbpf
from ksbpf.kernel.insns import AND64_K, EXIT, JNE_K, LDXW, MOV64_K, insn

BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
PROG_NAME = "ksbpf_deny_tun"
PIN_NAME = "prog_dev"
TUN_MAJOR, TUN_MINOR = 10, 200
BPF_DEVCG_DEV_CHAR = 2

def deny_tun_insns() -> bytes:
    """Refuse every access (mknod, read, write) to char 10:200; allow the rest."""
    return b"".join([
        insn(LDXW, dst=2, src=1, off=4),                   # r2 = ctx->major
        insn(JNE_K, dst=2, off=7, imm=TUN_MAJOR),          # not 10: allow
        insn(LDXW, dst=2, src=1, off=8),                   # r2 = ctx->minor
        insn(JNE_K, dst=2, off=5, imm=TUN_MINOR),          # not 200: allow
        insn(LDXW, dst=2, src=1, off=0),                   # r2 = ctx->access_type
        insn(AND64_K, dst=2, imm=0xFFFF),                  # the device type
        insn(JNE_K, dst=2, off=2, imm=BPF_DEVCG_DEV_CHAR),  # a block device 10:200: allow
        insn(MOV64_K, dst=0, imm=0),                       # /dev/net/tun: refuse
        insn(EXIT),
        insn(MOV64_K, dst=0, imm=1),                       # allow:
        insn(EXIT),
    ])


def load_deny_tun() -> int:
    """The program's fd (the caller closes it)."""
    return libbpf.prog_load(BPF_PROG_TYPE_CGROUP_DEVICE, PROG_NAME, "GPL", deny_tun_insns())


# -- who holds a tun device ----------------------------------------------------------

def holds_tun(pid: int) -> bool:
    """Does the process hold an open tun device (/dev/net/tun, char 10:200,
    whatever path it was opened by): a tun or tap device it can write into?"""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (TUN_MAJOR, TUN_MINOR):
            return True
    return False


def ip_forward() -> bool:
    """Is IPv4 forwarding on in the CALLING THREAD's network namespace (netns.run_in)?"""
    try:
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            return f.read().strip() == "1"
    except OSError:
        return False
