"""Struct member offsets of the running kernel, read from its BTF
(/sys/kernel/btf/vmlinux).

The netfilter entry point reads kernel structures (struct nf_hook_state,
struct net_device, struct sk_buff) whose layout changes with the kernel's
version and configuration.  Their offsets are never hard-coded: they are
read here at load time and handed to the compiler as -D flags (the verifier
would not catch an offset that lands on another field of the same size).

A minimal reader of the BTF format (include/uapi/linux/btf.h): the header,
the type section (every type's size, to walk to the next one) and the
string section.  Members of anonymous structs and unions (sk_buff's
`headers` group) are searched through, their offsets added up.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import struct
from dataclasses import dataclass

VMLINUX = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F

# BTF kinds and the bytes each one's extra data takes after the 12-byte type header
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_FUNC = 8, 9, 10, 11, 12
KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 13, 14, 15, 17, 18, 19
_FIXED_EXTRA = {KIND_INT: 4, KIND_ARRAY: 12, KIND_VAR: 4, KIND_DECL_TAG: 4}
_PER_MEMBER = {KIND_STRUCT: 12, KIND_UNION: 12, KIND_ENUM: 8, KIND_FUNC_PROTO: 8, KIND_DATASEC: 12, KIND_ENUM64: 12}
_MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)

_HEADER = struct.Struct("=HBBIIIII")
_TYPE = struct.Struct("=III")
_MEMBER = struct.Struct("=III")


class BtfError(Exception):
    pass


@dataclass(frozen=True)
class Member:
    offset: int   # bytes from the start of the struct
    size: int     # bytes
    type_id: int = 0   # the member's type (modifiers resolved)


class Btf:
    def __init__(self, data: bytes):
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(data)
        if magic != BTF_MAGIC:
            raise BtfError("not BTF data (bad magic)")
        self.data = data
        self.types_at = hdr_len + type_off
        self.strings = data[hdr_len + str_off:hdr_len + str_off + str_len]
        # type id -> offset of its header in data (id 0 is void)
        self.offsets = [0]
        pos, end = self.types_at, self.types_at + type_len
        unpack = _TYPE.unpack_from
        while pos < end:
            self.offsets.append(pos)
            _name, info, _size = unpack(data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            pos += 12 + _FIXED_EXTRA.get(kind, 0) + _PER_MEMBER.get(kind, 0) * vlen

    def name(self, name_off: int) -> str:
        end = self.strings.index(b"\0", name_off)
        return self.strings[name_off:end].decode()

    def _type(self, type_id: int) -> tuple[int, int, int, int]:
        """(name_off, kind, vlen, size_or_type) of a type, kflag dropped."""
        name_off, info, size = _TYPE.unpack_from(self.data, self.offsets[type_id])
        return name_off, (info >> 24) & 0x1F, info & 0xFFFF, size

    def _kflag(self, type_id: int) -> bool:
        return bool(_TYPE.unpack_from(self.data, self.offsets[type_id])[1] >> 31)

    def find_struct(self, name: str) -> int:
        """The id of the (complete) struct called `name`."""
        target = b"\0" + name.encode() + b"\0"
        wanted, start = set(), 0
        while True:
            i = self.strings.find(target, start)
            if i < 0:
                break
            wanted.add(i + 1)
            start = i + 1
        if self.strings.startswith(target[1:]):
            wanted.add(0)
        for type_id in range(1, len(self.offsets)):
            name_off, kind, vlen, _ = self._type(type_id)
            if name_off in wanted and kind == KIND_STRUCT and vlen:
                return type_id
        raise BtfError(f"struct {name} is not in the kernel's BTF")

    def find_func(self, name: str) -> int:
        """The id of the function (BTF_KIND_FUNC) called `name`."""
        target = name.encode() + b"\0"
        for type_id in range(1, len(self.offsets)):
            name_off, kind, _vlen, _ = self._type(type_id)
            if kind == KIND_FUNC and self.strings.startswith(target, name_off) \
                    and (name_off == 0 or self.strings[name_off - 1] == 0):
                return type_id
        raise BtfError(f"function {name} is not in the kernel's BTF")

    def size_of(self, type_id: int) -> int:
        for _ in range(32):
            _n, kind, _v, size_or_type = self._type(type_id)
            if kind in _MODIFIERS:
                type_id = size_or_type
                continue
            if kind == KIND_PTR:
                return 8
            if kind == KIND_ARRAY:
                elem, _index, nelems = struct.unpack_from("=III", self.data, self.offsets[type_id] + 12)
                return self.size_of(elem) * nelems
            return size_or_type
        raise BtfError(f"type {type_id}: modifier chain too long")

    def _members(self, type_id: int):
        _n, kind, vlen, _s = self._type(type_id)
        kflag = self._kflag(type_id)
        base = self.offsets[type_id] + 12
        for i in range(vlen):
            name_off, mtype, offset = _MEMBER.unpack_from(self.data, base + 12 * i)
            bits = offset & 0xFFFFFF if kflag else offset
            yield name_off, mtype, bits

    def member(self, struct_id: int, name: str) -> Member | None:
        """A member of a struct, looked for through anonymous structs and unions."""
        for name_off, mtype, bits in self._members(struct_id):
            if name_off and self.name(name_off) == name:
                if bits % 8:
                    raise BtfError(f"member {name} is a bit field")
                return Member(bits // 8, self.size_of(mtype), self._resolve(mtype))
            if not name_off:
                inner = self._resolve(mtype)
                if self._type(inner)[1] in (KIND_STRUCT, KIND_UNION):
                    found = self.member(inner, name)
                    if found:
                        return Member(bits // 8 + found.offset, found.size, found.type_id)
        return None

    def path(self, struct_name: str, path: str) -> Member:
        """A member reached through named inner structs: path("sock",
        "__sk_common.skc_family") -- its offset from the start of the outer struct."""
        type_id, offset, found = self.find_struct(struct_name), 0, None
        for i, name in enumerate(path.split(".")):
            if found is not None:
                type_id = found.type_id
                if self._type(type_id)[1] not in (KIND_STRUCT, KIND_UNION):
                    raise BtfError(f"{struct_name}.{'.'.join(path.split('.')[:i])} is not a struct")
            found = self.member(type_id, name)
            if found is None:
                raise BtfError(f"struct {struct_name} has no member {'.'.join(path.split('.')[:i + 1])}")
            offset += found.offset
        return Member(offset, found.size, found.type_id)

    def _resolve(self, type_id: int) -> int:
        while self._type(type_id)[1] in _MODIFIERS:
            type_id = self._type(type_id)[3]
        return type_id


# The members the netfilter entry point reads, and the size each must have.
NF_FIELDS = (
    ("nf_hook_state", "pf", 1),
    ("nf_hook_state", "out", 8),
    ("nf_hook_state", "net", 8),
    ("net", "net_cookie", 8),
    ("net_device", "ifindex", 4),
    ("net_device", "name", 16),
    ("sk_buff", "len", 4),
    ("sk_buff", "head", 8),
    ("sk_buff", "network_header", 2),
    ("sk_buff", "tail", 4),
    ("sk_buff", "sk", 8),
    ("sk_buff", "mark", 4),   # --vpn-mark: the VPN client's firewall mark
)


def _cache_file(path: str) -> str | None:
    """Where the offsets read from this BTF file are kept ($KSBPF_CACHE_DIR,
    as the program images): keyed by the kernel, the file's size and mtime
    and the fields asked for.  Reading the BTF costs ~0.1 s a process."""
    cache = os.environ.get("KSBPF_CACHE_DIR", "/var/cache/ksbpf")
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not cache:
        return None
    key = json.dumps([platform.release(), st.st_size, st.st_mtime_ns, NF_FIELDS]).encode()
    return os.path.join(cache, f"btf-{hashlib.sha256(key).hexdigest()[:24]}.json")


@functools.lru_cache(maxsize=1)
def nf_offsets(path: str = VMLINUX) -> dict[str, int]:
    """{"nf_hook_state.out": offset, ...} for NF_FIELDS, from the running
    kernel's BTF.  BtfError when the BTF is missing or a member is not there
    with the size the program reads."""
    cached = _cache_file(path)
    if cached:
        try:
            with open(cached) as f:
                found = json.load(f)
            if set(found) == {f"{s}.{m}" for s, m, _ in NF_FIELDS}:
                return found
        except (OSError, ValueError):
            pass
    out = _read_offsets(path)
    if cached:
        try:
            os.makedirs(os.path.dirname(cached), mode=0o700, exist_ok=True)
            tmp = f"{cached}.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(out, f)
            os.replace(tmp, cached)
        except OSError:
            pass   # read again next time
    return out


def _read_offsets(path: str) -> dict[str, int]:
    try:
        with open(path, "rb") as f:
            btf = Btf(f.read())
    except OSError as exc:
        raise BtfError(f"cannot read {path}: {exc.strerror}") from None
    out: dict[str, int] = {}
    ids: dict[str, int] = {}
    for struct_name, member, size in NF_FIELDS:
        if struct_name not in ids:
            ids[struct_name] = btf.find_struct(struct_name)
        m = btf.member(ids[struct_name], member)
        if m is None:
            raise BtfError(f"struct {struct_name} has no member {member}")
        if m.size != size:
            raise BtfError(f"{struct_name}.{member} is {m.size} bytes, not {size}")
        out[f"{struct_name}.{member}"] = m.offset
    return out


@functools.lru_cache(maxsize=2)
def kernel(path: str = VMLINUX) -> Btf:
    """The running kernel's BTF, parsed once per process."""
    try:
        with open(path, "rb") as f:
            return Btf(f.read())
    except OSError as exc:
        raise BtfError(f"cannot read {path}: {exc.strerror}") from None


@functools.lru_cache(maxsize=8)
def func_id(name: str, path: str = VMLINUX) -> int:
    """The BTF id of a kernel function (an LSM hook's bpf_lsm_* stub: what a
    BPF LSM program is attached to)."""
    return kernel(path).find_func(name)


def offsets(fields: tuple[tuple[str, str, int], ...], path: str = VMLINUX) -> dict[str, int]:
    """{"struct.member.path": offset} of each (struct, member path, size), a
    BtfError when one is not there with that size."""
    btf, out = kernel(path), {}
    for struct_name, member, size in fields:
        m = btf.path(struct_name, member)
        if m.size != size:
            raise BtfError(f"{struct_name}.{member} is {m.size} bytes, not {size}")
        out[f"{struct_name}.{member}"] = m.offset
    return out


def nf_cflags() -> list[str]:
    """The offsets as the compiler flags ebpf/ksbpf.c expects
    (-DKSBPF_OFF_NF_HOOK_STATE_OUT=40, ...)."""
    return [f"-DKSBPF_OFF_{key.replace('.', '_').upper()}={off}" for key, off in sorted(nf_offsets().items())]
