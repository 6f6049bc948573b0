"""TCP and UDP sockets of a network namespace with the cgroup each was created
in (sock_diag, INET_DIAG_CGROUP_ID), and closing one (SOCK_DESTROY, as
`ss -K` does).

A socket keeps the cgroup it was created in: a process moved into a
protected scope keeps its old sockets, and the scope's program never sees
their packets.  These calls find them and close them.  Each opens its
NETLINK_SOCK_DIAG socket inside the namespace (netns.run_in).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from ksbpf.kernel import netns

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
INET_DIAG_CGROUP_ID = 21
ALL_STATES = 0xFFFFFFFF
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
              7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV"}

_NLMSG = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBBI")          # struct inet_diag_req_v2, then struct inet_diag_sockid
_SOCKID = struct.Struct("!HH16s16s")    # sport, dport (network order), src, dst; then if, cookie[2] (host order)
_MSG_HEAD = struct.Struct("=BBBB")      # struct inet_diag_msg: family, state, timer, retrans; sockid; then:
_MSG_TAIL = struct.Struct("=IIIII")     # expires, rqueue, wqueue, uid, inode
MSG_SIZE = 4 + 48 + 20


@dataclass(frozen=True)
class DiagSocket:
    family: int
    protocol: int
    state: int
    src: str
    sport: int
    dst: str
    dport: int
    ifindex: int
    cookie: bytes       # the kernel's socket cookie (8 bytes, as the kernel gave it)
    uid: int
    inode: int
    cgroup_id: int | None
    raw_id: bytes       # struct inet_diag_sockid as dumped: what SOCK_DESTROY needs back

    @property
    def proto_name(self) -> str:
        return {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}.get(self.protocol, str(self.protocol))

    def __str__(self) -> str:
        def ep(a: str, p: int) -> str:
            return f"[{a}]:{p}" if ":" in a else f"{a}:{p}"
        state = TCP_STATES.get(self.state, str(self.state)) if self.protocol == socket.IPPROTO_TCP else (
            "connected" if self.state == 1 else "unconnected")
        return f"{self.proto_name} {ep(self.src, self.sport)} -> {ep(self.dst, self.dport)} {state}"


def _addr(family: int, raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw[:4]) if family == socket.AF_INET else ipaddress.IPv6Address(raw))


def _request(s: socket.socket, msg_type: int, flags: int, payload: bytes) -> list[bytes]:
    s.send(_NLMSG.pack(_NLMSG.size + len(payload), msg_type, flags, 1, 0) + payload)
    out = []
    while True:
        data = s.recv(1 << 20)
        off = 0
        while off + _NLMSG.size <= len(data):
            length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
            body = data[off + _NLMSG.size:off + length]
            off += (length + 3) & ~3
            if kind == NLMSG_DONE:
                return out
            if kind == NLMSG_ERROR:
                code = struct.unpack_from("=i", body)[0]
                if code:
                    raise OSError(-code, os.strerror(-code))
                return out   # the ACK of a request
            out.append(body)


def _parse(body: bytes, protocol: int) -> DiagSocket:
    family, state, _timer, _retrans = _MSG_HEAD.unpack_from(body)
    raw_id = body[4:52]
    sport, dport, src, dst = _SOCKID.unpack_from(raw_id)
    ifindex = struct.unpack_from("=I", raw_id, 36)[0]
    cookie = raw_id[40:48]
    _exp, _rq, _wq, uid, inode = _MSG_TAIL.unpack_from(body, 52)
    cgroup_id = None
    off = MSG_SIZE
    while off + 4 <= len(body):
        alen, atype = struct.unpack_from("=HH", body, off)
        if alen < 4:
            break
        if atype & 0x3FFF == INET_DIAG_CGROUP_ID:
            cgroup_id = struct.unpack_from("=Q", body, off + 4)[0]
        off += (alen + 3) & ~3
    return DiagSocket(family, protocol, state, _addr(family, src), sport, _addr(family, dst), dport, ifindex, cookie,
                      uid, inode, cgroup_id, raw_id)


def _open() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)


def _dump_here() -> list[DiagSocket]:
    out = []
    with _open() as s:
        for family in (socket.AF_INET, socket.AF_INET6):
            for protocol in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
                req = _REQ.pack(family, protocol, 0, 0, ALL_STATES) + bytes(48)
                try:
                    bodies = _request(s, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, req)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.EOPNOTSUPP):   # no udp_diag module: no UDP sockets listed
                        continue
                    raise
                out += [_parse(b, protocol) for b in bodies]
    return out


def sockets(ns_path: str) -> list[DiagSocket]:
    """Every TCP and UDP socket (IPv4, IPv6) of the namespace at ns_path."""
    return netns.run_in(ns_path, _dump_here)


def _destroy_here(sock: DiagSocket) -> None:
    with _open() as s:
        req = _REQ.pack(sock.family, sock.protocol, 0, 0, ALL_STATES) + sock.raw_id
        _request(s, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, req)


def destroy(ns_path: str, sock: DiagSocket) -> None:
    """Close the socket (its owner sees ECONNABORTED; a TCP peer gets a reset)."""
    netns.run_in(ns_path, _destroy_here, sock)
