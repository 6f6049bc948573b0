"""No raw sockets past the policy, where the kernel runs BPF LSM programs.

Cgroup scopes: a BPF LSM program on socket_create, attached to
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
layer is absent and the CAP_NET_RAW warnings stand.  A kernel built with
CONFIG_BPF_LSM whose active LSMs lack `bpf` (Ubuntu's: its CONFIG_LSM has no
`bpf`) loads and attaches the program and never runs it -- the LSM's hooks
are not registered -- so the active list (securityfs) is read first, and the
layer is absent there too.

Like the --deny-tun device program it is built here, not compiled by bcc:
ten instructions, no maps.  Its context is the hook's arguments as u64s:
socket_create(int family, int type, int protocol, int kern).  Sockets the
kernel makes for itself (kern != 0) are not the scope's business.  For
BPF_LSM_CGROUP programs 1 lets the call go on, 0 refuses it (EPERM).  A
socket opened before the program was attached stays usable (the check is at
creation).

Node mode: raw frames on an AF_PACKET socket pass the interface's tc guard,
except with PACKET_QDISC_BYPASS (they go straight to the driver), and AF_XDP
frames never pass tc at all.  Two machine-wide programs (BPF_LSM_MAC: an LSM
hook has no namespace) refuse exactly those two doors -- the
`setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS)` call and the `bind()` of an
AF_XDP socket -- when the socket belongs to the guarded namespace (its
netns cookie, compared with the one baked into the program) and the calling
process is outside the exempt cgroups (each (id, level) baked in, compared
with bpf_get_current_ancestor_cgroup_id).  One pair per node scope, built
here with the scope's namespace and exemptions as constants, their links
pinned in the scope's directory (a pinned tracing link outlives its
loader; removing the pin detaches it).  The struct offsets the programs
read (socket.sk, sock_common.skc_net and skc_family, net.net_cookie) come
from the running kernel's BTF.
"""

from __future__ import annotations

import errno
import functools
import os

from ksbpf.kernel import btf, libbpf, tc
from ksbpf.kernel.insns import (CALL, EXIT, JA, JEQ32_K, JEQ_K, JEQ_X, JNE32_K, JNE_K, JNE_X, LDXDW, LDXH, MOV64_K,
                                MOV64_X, Asm, insn)

BPF_PROG_TYPE_LSM = 29
BPF_LSM_CGROUP = 43
HOOK = "bpf_lsm_socket_create"
PROG_NAME = "ksbpf_no_raw"
PIN_NAME = "prog_lsm"
AF_PACKET, AF_XDP = 17, 44
REFUSED_FAMILIES = (AF_PACKET, AF_XDP)

BPF_FUNC_get_current_ancestor_cgroup_id = 123
BPF_LSM_MAC = 27
BPF_LINK_TYPE_TRACING = 2
EPERM = 1
SOL_PACKET, PACKET_QDISC_BYPASS = 263, 20
NODE_HOOKS = ("socket_setsockopt", "socket_bind")
NODE_PROG_NAMES = {"socket_setsockopt": "ksbpf_qdisc_byp", "socket_bind": "ksbpf_xdp_bind"}
NODE_PIN_DIR = "lsm"
NODE_FIELDS = (("socket", "sk", 8), ("sock", "__sk_common.skc_net", 8),
               ("sock", "__sk_common.skc_family", 2), ("net", "net_cookie", 8))


def no_raw_insns() -> bytes:
    """Refuse AF_PACKET and AF_XDP sockets made by a process; allow the rest."""
    return b"".join([
        insn(LDXDW, dst=2, src=1, off=24),                 # r2 = kern
        insn(JNE_K, dst=2, off=6, imm=0),                  # the kernel's own socket: allow
        insn(LDXDW, dst=2, src=1, off=0),                  # r2 = family
        insn(JEQ32_K, dst=2, off=2, imm=AF_PACKET),        # refuse
        insn(JEQ32_K, dst=2, off=1, imm=AF_XDP),           # refuse
        insn(JA, off=2),                                   # allow
        insn(MOV64_K, dst=0, imm=0),                       # refuse: EPERM
        insn(EXIT),
        insn(MOV64_K, dst=0, imm=1),                       # allow
        insn(EXIT),
    ])


def node_insns(hook: str, netns_cookie: int, exempt: list[tuple[int, int]], off: dict[str, int]) -> bytes:
    """The node program for one hook: refuse (-EPERM) when the socket is of
    the guarded namespace and the caller is outside every exempt cgroup.
    ctx is the hook's arguments as u64s:
    socket_setsockopt(struct socket *sock, int level, int optname),
    socket_bind(struct socket *sock, struct sockaddr *address, int addrlen)."""
    # Every pointer is checked for NULL before it is followed: newer kernels hand LSM programs their
    # arguments as trusted-or-NULL pointers and refuse a load through one unchecked.
    a = Asm().op(MOV64_X, dst=6, src=1)                                    # r6 = ctx
    a.op(LDXDW, dst=2, src=6, off=0).jump(JEQ_K, "allow", dst=2)          # r2 = sock
    a.op(LDXDW, dst=2, src=2, off=off["socket.sk"]).jump(JEQ_K, "allow", dst=2)   # r2 = sock->sk
    if hook == "socket_setsockopt":
        a.op(LDXDW, dst=3, src=6, off=8).jump(JNE32_K, "allow", dst=3, imm=SOL_PACKET)
        a.op(LDXDW, dst=3, src=6, off=16).jump(JNE32_K, "allow", dst=3, imm=PACKET_QDISC_BYPASS)
    elif hook == "socket_bind":
        a.op(LDXH, dst=3, src=2, off=off["sock.__sk_common.skc_family"])
        a.jump(JNE32_K, "allow", dst=3, imm=AF_XDP)
    else:
        raise ValueError(hook)
    a.op(LDXDW, dst=3, src=2, off=off["sock.__sk_common.skc_net"])          # r3 = sock_net(sk)
    a.jump(JEQ_K, "allow", dst=3)
    a.op(LDXDW, dst=3, src=3, off=off["net.net_cookie"])
    a.imm64(4, netns_cookie).jump(JNE_X, "allow", dst=3, src=4)            # another namespace's socket
    for cg_id, level in exempt:                                              # an exempt process
        a.op(MOV64_K, dst=1, imm=level).op(CALL, imm=BPF_FUNC_get_current_ancestor_cgroup_id)
        a.imm64(2, cg_id).jump(JEQ_X, "allow", dst=0, src=2)
    a.op(MOV64_K, dst=0, imm=-EPERM).op(EXIT)
    a.label("allow").op(MOV64_K, dst=0, imm=0).op(EXIT)
    return a.build()


def node_load(hook: str, netns_cookie: int, exempt: list[tuple[int, int]]) -> int:
    """One node program's fd (the caller closes it); OSError or btf.BtfError
    where the kernel does not run BPF LSM programs."""
    insns = node_insns(hook, netns_cookie, exempt, btf.offsets(NODE_FIELDS))
    return libbpf.prog_load_btf(BPF_PROG_TYPE_LSM, NODE_PROG_NAMES[hook], "GPL", insns, BPF_LSM_MAC,
                                btf.func_id(f"bpf_lsm_{hook}"))


def _pin(pin_dir: str, hook: str) -> str:
    return os.path.join(pin_dir, NODE_PIN_DIR, hook)


def node_attach(pin_dir: str, netns_cookie: int, exempt: list[tuple[int, int]]) -> list[int]:
    """Attach both node programs, their links pinned under pin_dir/lsm/; the
    link ids.  All or nothing."""
    os.makedirs(os.path.join(pin_dir, NODE_PIN_DIR), exist_ok=True)
    done: list[int] = []
    try:
        for hook in NODE_HOOKS:
            prog_fd = node_load(hook, netns_cookie, exempt)
            try:
                link_fd = libbpf.raw_tracepoint_open(prog_fd)
            finally:
                os.close(prog_fd)
            try:
                libbpf.obj_pin(link_fd, _pin(pin_dir, hook))
                done.append(tc.link_info(link_fd).id)
            finally:
                os.close(link_fd)
    except BaseException:
        node_release(pin_dir)
        raise
    return done


def node_release(pin_dir: str) -> list[int]:
    """Remove the node programs' pins (their links go with them: the pins
    alone hold them); the ids of the links removed."""
    done = [tc.unpin_link(_pin(pin_dir, hook), detach=False) for hook in NODE_HOOKS]
    try:
        os.rmdir(os.path.join(pin_dir, NODE_PIN_DIR))
    except OSError:
        pass
    return [i for i in done if i]


def node_layer(pin_dir: str, attached: bool) -> str:
    """The node scope's raw-socket layer: "refused" (both links pinned and
    their programs loaded), "open: why" (not attached: the kernel runs no BPF
    LSM program, or the scope predates it), "MISSING: ..." (attached, a link
    is gone)."""
    if not attached:
        why = node_why_not()
        return f"open: {why}" if why else "open: attached without it (`ksbpf attach --node` again adds it)"
    gone = []
    for hook in NODE_HOOKS:
        try:
            fd = libbpf.obj_get(_pin(pin_dir, hook))
        except OSError:
            gone.append(hook)
            continue
        try:
            info = tc.link_info(fd)
            if info.type != BPF_LINK_TYPE_TRACING or libbpf.prog_name(info.prog_id) != NODE_PROG_NAMES[hook]:
                gone.append(hook)
        except OSError:
            gone.append(hook)
        finally:
            os.close(fd)
    return f"MISSING: the {' and '.join(gone)} program is not attached" if gone else "refused"


LSM_LIST = "/sys/kernel/security/lsm"   # the active LSMs, in order (securityfs)


def lsm_inactive(path: str | None = None) -> str:
    """Why BPF LSM programs would load and never run here: `bpf` missing from the
    active LSMs; '' when it is there, or when the list cannot be read (securityfs
    not mounted: the load decides)."""
    try:
        with open(path or LSM_LIST) as f:
            active = [m for m in f.read().strip().split(",") if m]
    except OSError:
        return ""
    if "bpf" in active:
        return ""
    return (f"`bpf` is not among the active LSMs ({','.join(active) or 'none'}): BPF LSM programs would load and "
            f"never run; boot with lsm={','.join(active + ['bpf'])}")


@functools.lru_cache(maxsize=1)
def node_why_not() -> str:
    """'' when this kernel loads the node programs; else why not."""
    if inactive := lsm_inactive():
        return inactive
    try:
        for hook in NODE_HOOKS:
            os.close(node_load(hook, 0, [(1, 0)]))
    except btf.BtfError as exc:
        return f"no BPF LSM hook to attach to ({exc})"
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EINVAL):   # loaded as far as the verifier, which said no
            return f"the kernel's verifier refused the node program: {exc.strerror}"
        return (f"the kernel refused the BPF LSM program ({os.strerror(exc.errno) if exc.errno else exc}): it needs "
                "`bpf` in the active LSMs (lsm=...,bpf on the kernel command line) and BPF trampolines")
    return ""


def node_available() -> bool:
    return not node_why_not()


def load() -> int:
    """The program's fd (the caller closes it).  OSError (or btf.BtfError)
    where the kernel does not run BPF LSM programs."""
    attach_btf_id = btf.func_id(HOOK)
    return libbpf.prog_load_btf(BPF_PROG_TYPE_LSM, PROG_NAME, "GPL", no_raw_insns(), BPF_LSM_CGROUP, attach_btf_id)


@functools.lru_cache(maxsize=1)
def why_not() -> str:
    """'' when this kernel loads the program; else why not, for people."""
    if inactive := lsm_inactive():
        return inactive
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
