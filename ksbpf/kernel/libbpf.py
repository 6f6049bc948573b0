"""Thin ctypes bindings to libbpf (libbpf.so.1) for what bcc cannot do.

bcc compiles and loads; everything that must work from a process that did not
load the program (pins, attach with flags, detach, query, map access, test
runs, feature probes) goes through these calls.  Each function raises
OSError with the kernel's errno on failure.
"""

from __future__ import annotations

import ctypes
import errno
import ctypes.util
import os
import struct
from dataclasses import dataclass
from functools import lru_cache

# enum bpf_attach_type / bpf_prog_type values (include/uapi/linux/bpf.h)
BPF_CGROUP_INET_EGRESS = 1
BPF_CGROUP_INET_SOCK_CREATE = 2
BPF_PROG_TYPE_CGROUP_SOCK = 9
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_CGROUP_SKB = 8
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP6_SENDMSG = 15
BPF_CGROUP_UDP4_RECVMSG = 19
BPF_CGROUP_UDP6_RECVMSG = 20
BPF_CGROUP_INET4_GETPEERNAME = 29
BPF_CGROUP_INET6_GETPEERNAME = 30
BPF_FUNC_get_socket_cookie = 46
BPF_FUNC_get_netns_cookie = 122
BPF_FUNC_sk_storage_get = 107
BPF_FUNC_ktime_get_coarse_ns = 160
BPF_FUNC_skb_ancestor_cgroup_id = 83
BPF_FUNC_sk_fullsock = 95
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_SK_STORAGE = 24
BPF_MAP_TYPE_RINGBUF = 27
BPF_F_ALLOW_MULTI = 2
BPF_ANY = 0
BPF_OBJ_NAME_LEN = 16

SK_BUFF_SIZE = 192          # sizeof(struct __sk_buff) on 6.x
SK_BUFF_IFINDEX_OFFSET = 40  # offsetof(struct __sk_buff, ifindex)
SK_BUFF_MARK_OFFSET = 8      # offsetof(struct __sk_buff, mark): a test run may set it


class _TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class _ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info; the kernel fills what fits."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    ]


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    ]


class LibbpfMissing(RuntimeError):
    pass


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise LibbpfMissing(f"cannot load libbpf ({name}): {exc}") from exc
    c_int, c_uint, vp, cp = ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_char_p
    sigs = {
        "bpf_obj_pin": (c_int, [c_int, cp]),
        "bpf_obj_get": (c_int, [cp]),
        "bpf_prog_attach": (c_int, [c_int, c_int, c_int, c_uint]),
        "bpf_prog_detach2": (c_int, [c_int, c_int, c_int]),
        "bpf_prog_query": (c_int, [c_int, c_int, c_uint, vp, vp, vp]),
        "bpf_prog_query_opts": (c_int, [c_int, c_int, vp]),
        "bpf_prog_get_fd_by_id": (c_int, [c_uint]),
        "bpf_obj_get_info_by_fd": (c_int, [c_int, vp, vp]),
        "bpf_raw_tracepoint_open": (c_int, [cp, c_int]),
        "bpf_map_lookup_elem": (c_int, [c_int, vp, vp]),
        "bpf_map_update_elem": (c_int, [c_int, vp, vp, ctypes.c_uint64]),
        "bpf_map_delete_elem": (c_int, [c_int, vp]),
        "bpf_map_get_next_key": (c_int, [c_int, vp, vp]),
        "bpf_map_lookup_batch": (c_int, [c_int, vp, vp, vp, vp, vp, vp]),
        "bpf_prog_test_run_opts": (c_int, [c_int, vp]),
        "libbpf_probe_bpf_prog_type": (c_int, [c_int, vp]),
        "libbpf_probe_bpf_helper": (c_int, [c_int, c_int, vp]),
        "libbpf_probe_bpf_map_type": (c_int, [c_int, vp]),
        "bpf_btf_load": (c_int, [vp, ctypes.c_size_t, vp]),
        "bpf_enable_stats": (c_int, [c_int]),
        "libbpf_num_possible_cpus": (c_int, []),
        "bpf_map_create": (c_int, [c_int, cp, c_uint, c_uint, c_uint, vp]),
        "bpf_prog_load": (c_int, [c_int, cp, cp, vp, ctypes.c_size_t, vp]),
        "ring_buffer__new": (vp, [c_int, vp, vp, vp]),
        "ring_buffer__add": (c_int, [vp, c_int, vp, vp]),
        "ring_buffer__poll": (c_int, [vp, c_int]),
        "ring_buffer__consume": (c_int, [vp]),
        "ring_buffer__free": (None, [vp]),
        "ring_buffer__epoll_fd": (c_int, [vp]),
    }
    for fname, (res, args) in sigs.items():
        fn = getattr(lib, fname)
        fn.restype, fn.argtypes = res, args
    return lib


@lru_cache(maxsize=1)
def _held() -> ctypes.PyDLL:
    """libbpf again, for the quick map reads a scrape makes per scope: through
    PyDLL the GIL stays held across the system call.  Released (CDLL), each
    call would let a busy thread take the GIL, and win it back only after the
    interpreter's switch interval (5 ms): a convoy, 1,000 scopes x 2 calls.
    Only calls that never sleep belong here (a batched map read takes RCU and
    spinlocks); BPF_PROG_QUERY takes the cgroup mutex, which another process
    may hold for a while, and goes through _lib() (the GIL released)."""
    lib = ctypes.PyDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
    vp = ctypes.c_void_p
    fn = lib.bpf_map_lookup_batch
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int, vp, vp, vp, vp, vp, vp]
    return lib


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = -ret if ret != -1 else (ctypes.get_errno() or 1)
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _buf(data: bytes | bytearray | ctypes.Array):
    if isinstance(data, ctypes.Array):
        return data
    return ctypes.create_string_buffer(bytes(data), len(data))


def obj_pin(fd: int, path: str) -> None:
    _check(_lib().bpf_obj_pin(fd, path.encode()), f"pin {path}")


def obj_get(path: str) -> int:
    return _check(_lib().bpf_obj_get(path.encode()), f"open pin {path}")


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int) -> None:
    _check(_lib().bpf_prog_attach(prog_fd, target_fd, attach_type, flags), "attach")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    _check(_lib().bpf_prog_detach2(prog_fd, target_fd, attach_type), "detach")


BPF_F_QUERY_EFFECTIVE = 1


class _ProgQueryOpts(ctypes.Structure):
    """struct bpf_prog_query_opts of libbpf 1.0+, up to prog_attach_flags."""

    _fields_ = [("sz", ctypes.c_size_t), ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("prog_ids", ctypes.POINTER(ctypes.c_uint32)), ("prog_cnt", ctypes.c_uint32),
                ("prog_attach_flags", ctypes.POINTER(ctypes.c_uint32))]


BPF_LSM_CGROUP = 43


def _query_lsm_cgroup(target_fd: int) -> list[int]:
    """BPF_LSM_CGROUP: the kernel answers only a query that takes each
    program's attach flags too (EINVAL without them)."""
    n = 64
    while True:
        ids, flags = (ctypes.c_uint32 * n)(), (ctypes.c_uint32 * n)()
        opts = _ProgQueryOpts(sz=ctypes.sizeof(_ProgQueryOpts), prog_ids=ids, prog_cnt=n, prog_attach_flags=flags)
        ret = _lib().bpf_prog_query_opts(target_fd, BPF_LSM_CGROUP, ctypes.byref(opts))
        if ret < 0 and -ret == 28 and opts.prog_cnt > n:  # ENOSPC: grow and retry
            n = opts.prog_cnt
            continue
        _check(ret, "query attached programs")
        return list(ids[:opts.prog_cnt])


def prog_query(target_fd: int, attach_type: int, effective: bool = False) -> list[int]:
    """IDs of the programs attached to target_fd (a cgroup) for attach_type;
    with effective=True, also those inherited from its ancestors."""
    if attach_type == BPF_LSM_CGROUP and not effective:
        return _query_lsm_cgroup(target_fd)
    count = ctypes.c_uint32(64)
    while True:
        ids = (ctypes.c_uint32 * count.value)()
        flags = ctypes.c_uint32(0)
        want = count.value
        ret = _lib().bpf_prog_query(target_fd, attach_type, BPF_F_QUERY_EFFECTIVE if effective else 0,
                                    ctypes.byref(flags), ids,
                                    ctypes.byref(count))
        if ret < 0 and -ret == 28 and count.value > want:  # ENOSPC: grow and retry
            continue
        _check(ret, "query attached programs")
        return list(ids[: count.value])


def prog_fd_by_id(prog_id: int) -> int:
    return _check(_lib().bpf_prog_get_fd_by_id(prog_id), f"open program id {prog_id}")


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str
    tag: str


def prog_name(prog_id: int) -> str | None:
    """The name of a loaded program, by id (None when it is gone)."""
    try:
        fd = prog_fd_by_id(prog_id)
    except OSError:
        return None
    try:
        return prog_info(fd).name
    finally:
        os.close(fd)


def raw_tracepoint_open(prog_fd: int) -> int:
    """Attach a program loaded for a kernel function by BTF id (a BPF_LSM_MAC
    program) where it said at load time; the link's fd.  BPF_RAW_TRACEPOINT_OPEN
    with no name: what every kernel with BPF LSM (5.7+) takes."""
    return _check(_lib().bpf_raw_tracepoint_open(None, prog_fd), "attach the BPF LSM program")


def prog_info(fd: int) -> ProgInfo:
    info = _ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "program info")
    return ProgInfo(info.id, info.type, info.name.decode(errors="replace"), bytes(info.tag).hex())


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    name: str
    flags: int = 0


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "map info")
    return MapInfo(info.id, info.type, info.key_size, info.value_size, info.max_entries,
                   info.name.decode(errors="replace"), info.map_flags)


class _MapCreateOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
        ("numa_node", ctypes.c_uint32),
        ("map_ifindex", ctypes.c_uint32),
    ]


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int, flags: int = 0,
               btf: tuple[int, int, int] | None = None) -> int:
    """btf: (BTF fd, key type id, value type id), which some map types require."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags)
    if btf:
        opts.btf_fd, opts.btf_key_type_id, opts.btf_value_type_id = btf
    return _check(_lib().bpf_map_create(map_type, name.encode()[:BPF_OBJ_NAME_LEN - 1], key_size, value_size,
                                        max_entries, ctypes.byref(opts)), f"create map {name}")


def btf_load(raw: bytes) -> int:
    buf = ctypes.create_string_buffer(raw, len(raw))
    return _check(_lib().bpf_btf_load(buf, len(raw), None), "load BTF")


def int_btf(*sizes: int) -> bytes:
    """A minimal BTF blob: one unsigned integer type per size in bytes (type
    ids 1, 2, ...), for map types that must name their key and value types
    (socket-local storage: an int key and the value)."""
    names = b"\0"
    types = b""
    for size in sizes:
        name_off = len(names)
        names += f"u{size * 8}".encode() + b"\0"
        # struct btf_type: name_off, info (kind INT = 1 << 24), size; then the INT word: bits
        types += struct.pack("=III", name_off, 1 << 24, size) + struct.pack("=I", size * 8)
    # struct btf_header: magic, version, flags, hdr_len, type_off, type_len, str_off, str_len
    header = struct.pack("=HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(names))
    return header + types + names


class _ProgLoadOpts(ctypes.Structure):
    """The head of struct bpf_prog_load_opts (libbpf takes a shorter one)."""

    _fields_ = [("sz", ctypes.c_size_t), ("attempts", ctypes.c_int), ("expected_attach_type", ctypes.c_uint32)]


def prog_load(prog_type: int, name: str, license: str, insns: bytes, expected_attach_type: int | None = None) -> int:
    buf = ctypes.create_string_buffer(insns, len(insns))
    opts = None
    if expected_attach_type is not None:
        opts = ctypes.byref(_ProgLoadOpts(sz=ctypes.sizeof(_ProgLoadOpts), expected_attach_type=expected_attach_type))
    return _check(_lib().bpf_prog_load(prog_type, name.encode()[:BPF_OBJ_NAME_LEN - 1], license.encode(),
                                       buf, len(insns) // 8, opts), f"load program {name}")


def prog_load_btf(prog_type: int, name: str, license: str, insns: bytes, expected_attach_type: int,
                  attach_btf_id: int) -> int:
    """A program attached to a kernel function named by its BTF id (a BPF LSM
    program: the hook's bpf_lsm_* stub in vmlinux)."""
    buf = ctypes.create_string_buffer(insns, len(insns))
    opts = _ProgLoadOptsLog(sz=ctypes.sizeof(_ProgLoadOptsLog), expected_attach_type=expected_attach_type,
                            attach_btf_id=attach_btf_id)
    ret = _lib().bpf_prog_load(prog_type, name.encode()[:BPF_OBJ_NAME_LEN - 1], license.encode(),
                               buf, len(insns) // 8, ctypes.byref(opts))
    if ret < 0 and -ret in (errno.EACCES, errno.EINVAL):   # the verifier refused it: ask again, for its reason
        log = ctypes.create_string_buffer(65536)
        opts.log_level, opts.log_size, opts.log_buf = 1, len(log), ctypes.cast(log, ctypes.c_void_p)
        again = _lib().bpf_prog_load(prog_type, name.encode()[:BPF_OBJ_NAME_LEN - 1], license.encode(),
                                     buf, len(insns) // 8, ctypes.byref(opts))
        if again >= 0:
            return again
        lines = [ln for ln in log.value.decode(errors="replace").splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if not ln.startswith(("processed ", "verification time"))), "")
        err = -again if again != -1 else (ctypes.get_errno() or 1)
        raise OSError(err, f"load program {name}: {os.strerror(err)}" + (f" (verifier: {why.strip()})" if why else ""))
    return _check(ret, f"load program {name}")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    value = ctypes.create_string_buffer(value_size)
    ret = _lib().bpf_map_lookup_elem(fd, _buf(key), value)
    if ret < 0 and -ret == 2:  # ENOENT
        return None
    _check(ret, "map lookup")
    return value.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    _check(_lib().bpf_map_update_elem(fd, _buf(key), _buf(value), flags), "map update")


def map_delete(fd: int, key: bytes) -> None:
    _check(_lib().bpf_map_delete_elem(fd, _buf(key)), "map delete")


def map_keys(fd: int, key_size: int) -> list[bytes]:
    keys: list[bytes] = []
    cur = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        ret = _lib().bpf_map_get_next_key(fd, cur, nxt)
        if ret < 0 and -ret == 2:
            return keys
        _check(ret, "map iterate")
        keys.append(nxt.raw)
        cur = ctypes.create_string_buffer(nxt.raw, key_size)


def map_lookup_batch(fd: int, key_size: int, value_size: int, count: int) -> tuple[bytes, bytes, int]:
    """Up to `count` entries from the start of a map in one system call:
    (keys, values, how many).  value_size: per entry as the kernel lays them
    out (per-CPU maps: round_up(value_size, 8) * possible CPUs)."""
    reader = BatchReader(fd, key_size, value_size, count)
    n = reader.read()
    return reader.keys.raw, reader.values.raw, n


class BatchReader:
    """A map read from its start in one system call (BPF_MAP_LOOKUP_BATCH),
    again and again if need be (a scrape of every scope): the buffers are
    made once; read() fills them."""

    def __init__(self, fd: int, key_size: int, value_size: int, count: int):
        self.fd, self.count = fd, count
        self.keys = ctypes.create_string_buffer(key_size * count)
        self.values = ctypes.create_string_buffer(value_size * count)
        self.out_batch = ctypes.create_string_buffer(max(key_size, 8))
        self.n = ctypes.c_uint32(count)

    def read(self) -> int:
        """How many entries were read into .keys and .values (from the start of the map)."""
        self.n.value = self.count
        ret = _held().bpf_map_lookup_batch(self.fd, None, self.out_batch, self.keys, self.values,
                                           ctypes.byref(self.n), None)
        if ret < 0 and -ret != 2:   # ENOENT: the end of the map was reached
            _check(ret, "map batch lookup")
        return self.n.value


class AttachedQuery:
    """prog_query for one target asked again and again (a scrape of every
    scope): the buffers are made once."""

    def __init__(self, target_fd: int, attach_type: int, room: int = 64):
        self.target_fd, self.attach_type, self.room = target_fd, attach_type, room
        self.ids = (ctypes.c_uint32 * room)()
        self.flags = ctypes.c_uint32(0)
        self.count = ctypes.c_uint32(room)

    def has(self, prog_id: int) -> bool:
        """Is program `prog_id` attached to the target (directly, not inherited)?"""
        self.count.value = self.room
        ret = _lib().bpf_prog_query(self.target_fd, self.attach_type, 0, ctypes.byref(self.flags), self.ids,
                                    ctypes.byref(self.count))
        if ret < 0 and -ret == 28:   # ENOSPC: more programs than room: ask the general way
            return prog_id in prog_query(self.target_fd, self.attach_type)
        _check(ret, "query attached programs")
        return prog_id in self.ids[:self.count.value]


def num_possible_cpus() -> int:
    return _check(_lib().libbpf_num_possible_cpus(), "count possible CPUs")


@dataclass(frozen=True)
class TestRun:
    retval: int
    duration_ns: int


def prog_test_run(prog_fd: int, data: bytes, ifindex: int = 0, repeat: int = 1, mark: int = 0) -> TestRun:
    """Run a loaded skb program once (or `repeat` times) on `data` (an Ethernet frame),
    leaving through ifindex, carrying firewall mark `mark`."""
    data_buf = _buf(data)
    ctx = ctypes.create_string_buffer(SK_BUFF_SIZE)
    ctypes.c_uint32.from_buffer(ctx, SK_BUFF_IFINDEX_OFFSET).value = ifindex
    ctypes.c_uint32.from_buffer(ctx, SK_BUFF_MARK_OFFSET).value = mark
    opts = _TestRunOpts()
    opts.sz = ctypes.sizeof(opts)
    opts.data_in = ctypes.cast(data_buf, ctypes.c_void_p)
    opts.data_size_in = len(data)
    opts.ctx_in = ctypes.cast(ctx, ctypes.c_void_p)
    opts.ctx_size_in = SK_BUFF_SIZE
    opts.repeat = repeat
    _check(_lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "test run")
    return TestRun(opts.retval, opts.duration)


def probe_prog_type(prog_type: int) -> bool:
    return _lib().libbpf_probe_bpf_prog_type(prog_type, None) == 1


def probe_map_type(map_type: int) -> bool:
    return _lib().libbpf_probe_bpf_map_type(map_type, None) == 1


class _ProgLoadOptsLog(ctypes.Structure):
    """struct bpf_prog_load_opts of libbpf 1.1, up to the verifier log."""

    _fields_ = [("sz", ctypes.c_size_t), ("attempts", ctypes.c_int), ("expected_attach_type", ctypes.c_uint32),
                ("prog_btf_fd", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32), ("prog_ifindex", ctypes.c_uint32),
                ("kern_version", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32),
                ("attach_prog_fd", ctypes.c_uint32), ("attach_btf_obj_fd", ctypes.c_uint32),
                ("fd_array", ctypes.c_void_p), ("func_info", ctypes.c_void_p), ("func_info_cnt", ctypes.c_uint32),
                ("func_info_rec_size", ctypes.c_uint32), ("line_info", ctypes.c_void_p),
                ("line_info_cnt", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32), ("log_buf", ctypes.c_void_p)]


# What the verifier says of a helper a program type may not call, across kernel versions
# ("unknown func" up to 6.x, "program of this type cannot use helper" since): libbpf 1.1's
# own probe knows only the first two, and takes a newer kernel's refusal for a yes.
_HELPER_REFUSED = (b"unknown func ", b"invalid func ", b"cannot use helper")


def probe_helper(prog_type: int, helper_id: int) -> bool:
    """May programs of this type call this helper?  A two-instruction program
    calling it: loaded, or refused for its arguments (the helper is known to
    the type), means yes; refused as unknown or not allowed for the type, no."""
    insns = struct.pack("=BBhi", 0x85, 0, 0, helper_id) + struct.pack("=BBhi", 0x95, 0, 0, 0)   # call; exit
    log = ctypes.create_string_buffer(16384)
    opts = _ProgLoadOptsLog(sz=ctypes.sizeof(_ProgLoadOptsLog), log_level=1, log_size=len(log),
                            log_buf=ctypes.cast(log, ctypes.c_void_p))
    if prog_type == BPF_PROG_TYPE_CGROUP_SOCK:
        opts.expected_attach_type = BPF_CGROUP_INET_SOCK_CREATE
    buf = ctypes.create_string_buffer(insns, len(insns))
    fd = _lib().bpf_prog_load(prog_type, None, b"GPL", buf, 2, ctypes.byref(opts))
    if fd >= 0:
        os.close(fd)
        return True
    return not any(m in log.value for m in _HELPER_REFUSED)


RingBufferCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


class RingBuffer:
    """Consumer of one or more BPF ring buffer maps: on_record(source, bytes)
    is called for every record, `source` being what add() was given."""

    def __init__(self, on_record):
        self._on_record = on_record
        self._sources: list = []
        self._callback = RingBufferCallback(self._dispatch)  # kept alive as long as we are
        self._rb = None

    def _dispatch(self, ctx, data, size) -> int:
        self._on_record(self._sources[ctx or 0], ctypes.string_at(data, size))
        return 0

    def add(self, map_fd: int, source) -> None:
        self._sources.append(source)
        ctx = ctypes.c_void_p(len(self._sources) - 1)
        if self._rb is None:
            self._rb = _lib().ring_buffer__new(map_fd, self._callback, ctx, None)
            if not self._rb:
                err = ctypes.get_errno() or 22
                raise OSError(err, f"ring buffer: {os.strerror(err)}")
        else:
            _check(_lib().ring_buffer__add(self._rb, map_fd, self._callback, ctx), "ring buffer add")

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for records; returns how many were consumed."""
        if self._rb is None:
            return 0
        ret = _lib().ring_buffer__poll(self._rb, timeout_ms)
        if ret == -4:  # EINTR
            return 0
        return _check(ret, "ring buffer poll")

    def fileno(self) -> int:
        """An fd that polls readable when records wait (for select)."""
        return _check(_lib().ring_buffer__epoll_fd(self._rb), "ring buffer epoll fd")

    def close(self) -> None:
        if self._rb is not None:
            _lib().ring_buffer__free(self._rb)
            self._rb = None
