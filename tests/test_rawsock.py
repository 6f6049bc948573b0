"""The raw-socket BPF LSM programs (ksbpf/kernel/rawsock.py), instruction by
instruction.

This machine's kernel refuses BPF LSM programs (BPF trampolines: EPERM), so
the programs are loaded and attached for real only in the VM test (scenario
"raw", on Debian's kernels and the newest).  Here every decision they take is
run through a small interpreter of the instructions they are made of, with a
socket laid out at the running kernel's BTF offsets: the jumps land where
they should, the right family/option/namespace/cgroup refuses, and anything
else is allowed.
"""

from __future__ import annotations

import struct

import pytest

from ksbpf.kernel import btf, rawsock

COOKIE = 0x1122_3344_5566_7788
EXEMPT = [(0x1_0000_0042, 3), (77, 2)]   # (cgroup id, level), an id wider than 32 bits among them


class Machine:
    """Runs the opcodes the programs use over a flat memory of named regions."""

    def __init__(self, regions: dict[int, bytearray], ancestors: dict[int, int]):
        self.regions, self.ancestors, self.calls = regions, ancestors, []

    def load(self, addr: int, size: int) -> int:
        for base, data in self.regions.items():
            if base <= addr and addr + size <= base + len(data):
                return int.from_bytes(data[addr - base:addr - base + size], "little")
        return 0   # a BTF pointer load that faults reads 0 (PROBE_MEM)

    def run(self, insns: bytes, ctx: int) -> int:
        r = [0] * 11
        r[1], r[10] = ctx, 0
        pc, n, mask = 0, len(insns) // 8, (1 << 64) - 1
        for _ in range(1000):
            assert 0 <= pc < n, f"jump out of the program: {pc}"
            code, regs, off, imm = struct.unpack_from("=BBhi", insns, pc * 8)
            dst, src = regs & 0xF, regs >> 4
            pc += 1
            if code == 0xBF:
                r[dst] = r[src]
            elif code == 0xB7:
                r[dst] = imm & mask
            elif code in (0x79, 0x61, 0x69):
                r[dst] = self.load(r[src] + off, {0x79: 8, 0x61: 4, 0x69: 2}[code])
            elif code == 0x18:
                hi = struct.unpack_from("=i", insns, pc * 8 + 4)[0]
                r[dst] = (imm & 0xFFFFFFFF) | ((hi & 0xFFFFFFFF) << 32)
                pc += 1
            elif code == 0x85:
                assert imm == rawsock.BPF_FUNC_get_current_ancestor_cgroup_id
                self.calls.append(r[1])
                r[0] = self.ancestors.get(r[1], 0)
            elif code == 0x95:
                return r[0] - (1 << 64) if r[0] >> 63 else r[0]
            elif code == 0x05:
                pc += off
            else:
                a32, i32 = r[dst] & 0xFFFFFFFF, imm & 0xFFFFFFFF
                taken = {0x55: r[dst] != (imm & mask), 0x15: r[dst] == (imm & mask), 0x56: a32 != i32, 0x16: a32 == i32,
                         0x5D: r[dst] != r[src], 0x1D: r[dst] == r[src]}.get(code)
                assert taken is not None, f"opcode {code:#x} not expected"
                if taken:
                    pc += off
        raise AssertionError("the program does not end")


@pytest.fixture(scope="module")
def off() -> dict[str, int]:
    return btf.offsets(rawsock.NODE_FIELDS)


def _socket(off, family: int, cookie: int) -> dict[int, bytearray]:
    sock_at, sk_at, net_at = 0x10_000, 0x20_000, 0x100_000
    socket_, sk, net = bytearray(64), bytearray(256), bytearray(off["net.net_cookie"] + 8)
    struct.pack_into("=Q", socket_, off["socket.sk"], sk_at)
    struct.pack_into("=H", sk, off["sock.__sk_common.skc_family"], family)
    struct.pack_into("=Q", sk, off["sock.__sk_common.skc_net"], net_at)
    struct.pack_into("=Q", net, off["net.net_cookie"], cookie)
    return {sock_at: socket_, sk_at: sk, net_at: net}


def _run(off, hook: str, family: int, cookie: int, args: tuple[int, int], ancestors=None) -> tuple[int, Machine]:
    regions = _socket(off, family, cookie)
    ctx_at = 0x1000
    regions[ctx_at] = bytearray(struct.pack("=QQQQ", 0x10_000, *args, 0))
    m = Machine(regions, ancestors or {})
    return m.run(rawsock.node_insns(hook, COOKIE, EXEMPT, off), ctx_at), m


def test_offsets_from_this_kernels_btf(off):
    assert set(off) == {"socket.sk", "sock.__sk_common.skc_net", "sock.__sk_common.skc_family", "net.net_cookie"}
    assert off["sock.__sk_common.skc_family"] != off["sock.__sk_common.skc_net"]
    with pytest.raises(btf.BtfError, match="no member"):
        btf.offsets((("sock", "__sk_common.no_such_member", 8),))


def test_qdisc_bypass_refused_in_the_namespace(off):
    upper = 0xFFFF_FFFF_0000_0000   # an int argument's upper half is not the kernel's: only the low 32 bits count
    ret, m = _run(off, "socket_setsockopt", 17, COOKIE, (upper | rawsock.SOL_PACKET, upper | rawsock.PACKET_QDISC_BYPASS))
    assert ret == -rawsock.EPERM
    assert m.calls == [3, 2]   # each exemption asked about, at its level


@pytest.mark.parametrize("level,optname", [(rawsock.SOL_PACKET, 1), (rawsock.SOL_PACKET, 8), (1, 20), (0, 20)])
def test_other_socket_options_allowed(off, level, optname):
    assert _run(off, "socket_setsockopt", 17, COOKIE, (level, optname))[0] == 0


def test_other_namespace_allowed(off):
    ret, m = _run(off, "socket_setsockopt", 17, COOKIE ^ 1, (rawsock.SOL_PACKET, rawsock.PACKET_QDISC_BYPASS))
    assert ret == 0 and m.calls == []
    ret, _ = _run(off, "socket_bind", rawsock.AF_XDP, COOKIE + (1 << 32), (0, 16))
    assert ret == 0   # the cookie's upper half counts


@pytest.mark.parametrize("ancestors", [{3: 0x1_0000_0042}, {2: 77}])
def test_exempt_cgroups_allowed(off, ancestors):
    assert _run(off, "socket_setsockopt", 17, COOKIE, (rawsock.SOL_PACKET, rawsock.PACKET_QDISC_BYPASS),
                ancestors)[0] == 0
    assert _run(off, "socket_bind", rawsock.AF_XDP, COOKIE, (0, 16), ancestors)[0] == 0


def test_not_exempt_by_a_near_id(off):
    # the id's low half alone, or an exempt id at another level, does not exempt
    for ancestors in ({3: 0x42}, {2: 0x1_0000_0042}, {3: 77}):
        assert _run(off, "socket_bind", rawsock.AF_XDP, COOKIE, (0, 16), ancestors)[0] == -rawsock.EPERM


@pytest.mark.parametrize("family", [2, 10, 17, 16, 1])   # inet, inet6, packet, netlink, unix
def test_binds_of_other_families_allowed(off, family):
    assert _run(off, "socket_bind", family, COOKIE, (0, 16))[0] == 0


def test_xdp_bind_refused(off):
    assert _run(off, "socket_bind", rawsock.AF_XDP, COOKIE, (0, 16))[0] == -rawsock.EPERM


@pytest.mark.parametrize("hole", ["sock", "sk", "net"])
def test_a_null_pointer_is_allowed_not_followed(off, hole):
    """Each pointer is checked before it is followed (newer kernels' verifiers
    insist: the hook's arguments are trusted-or-NULL)."""
    regions = _socket(off, rawsock.AF_XDP, COOKIE)
    regions[0x900_000] = bytearray(struct.pack("=QQQQ", 0 if hole == "sock" else 0x10_000, 0, 16, 0))
    if hole == "sk":
        struct.pack_into("=Q", regions[0x10_000], off["socket.sk"], 0)
    if hole == "net":
        struct.pack_into("=Q", regions[0x20_000], off["sock.__sk_common.skc_net"], 0)
    m = Machine(regions, {})
    m.load = lambda addr, size, orig=m.load: (_ for _ in ()).throw(AssertionError("NULL followed")) \
        if addr < 0x10_000 else orig(addr, size)   # nothing lives below the socket: a NULL followed
    assert m.run(rawsock.node_insns("socket_bind", COOKIE, EXEMPT, off), 0x900_000) == 0


def test_no_exemptions(off):
    insns = rawsock.node_insns("socket_bind", COOKIE, [], off)
    regions = _socket(off, rawsock.AF_XDP, COOKIE)
    regions[0x1000] = bytearray(struct.pack("=QQQQ", 0x10_000, 0, 16, 0))
    m = Machine(regions, {1: 5})
    assert m.run(insns, 0x1000) == -rawsock.EPERM and m.calls == []


@pytest.mark.parametrize("family,kern,want", [(17, 0, 0), (44, 0, 0), (2, 0, 1), (10, 0, 1), (17, 1, 1), (44, 1, 1)])
def test_cgroup_program(family, kern, want):
    """The cgroup scopes' socket_create program: 0 refuses, 1 allows."""
    ctx = bytearray(struct.pack("=QQQQ", family, 3, 0, kern))
    assert Machine({0x1000: ctx}, {}).run(rawsock.no_raw_insns(), 0x1000) == want


def test_why_not_is_one_line():
    """Where the kernel refuses the programs, the reason is one line for `status`
    and the feature line; where it loads them, there is none."""
    why = rawsock.node_why_not()
    assert "\n" not in why
    assert rawsock.node_available() == (why == "")
    if why:
        assert "lsm=" in why or "BPF LSM hook" in why or "verifier" in why


UBUNTU_LSMS = "lockdown,capability,landlock,yama,apparmor,ima,evm"   # /sys/kernel/security/lsm on Ubuntu 24.04


def test_bpf_missing_from_the_active_lsms_is_one_line_naming_it(tmp_path):
    """Ubuntu's kernels (CONFIG_BPF_LSM=y, `bpf` not in CONFIG_LSM) load and attach
    BPF LSM programs that then never run: the active list decides first."""
    lsm = tmp_path / "lsm"
    lsm.write_text(UBUNTU_LSMS)
    why = rawsock.lsm_inactive(str(lsm))
    assert "\n" not in why and "`bpf` is not among the active LSMs" in why, why
    assert why.endswith(f"lsm={UBUNTU_LSMS},bpf"), why
    lsm.write_text(UBUNTU_LSMS + ",bpf\n")
    assert rawsock.lsm_inactive(str(lsm)) == ""
    assert rawsock.lsm_inactive(str(tmp_path / "no-securityfs")) == ""   # unreadable: the load decides


@pytest.fixture
def lsms_without_bpf(tmp_path, monkeypatch):
    lsm = tmp_path / "lsm"
    lsm.write_text(UBUNTU_LSMS)
    monkeypatch.setattr(rawsock, "LSM_LIST", str(lsm))

    def never(*args, **kwargs):
        raise AssertionError("a BPF LSM program was loaded although `bpf` is not an active LSM")
    monkeypatch.setattr(rawsock, "load", never)
    monkeypatch.setattr(rawsock, "node_load", never)
    for f in (rawsock.why_not, rawsock.node_why_not):
        f.cache_clear()
    yield
    for f in (rawsock.why_not, rawsock.node_why_not):
        f.cache_clear()


def test_no_raw_socket_layer_where_bpf_is_not_an_active_lsm(lsms_without_bpf):
    """There the scope's and node mode's layers are absent (status says why), never
    reported as refusing what they cannot see."""
    assert not rawsock.available() and not rawsock.node_available()
    assert rawsock.why_not() == rawsock.node_why_not() == rawsock.lsm_inactive()
    assert "lsm=" in rawsock.why_not()
