"""Send one leak vector's packets, and report what the kernel said (stdlib only).

Run by ksbpf.verify.lab inside a cgroup and a network namespace:

    python -m ksbpf.verify.labsend KIND DST PORT [--dev IF] [--src ADDR] [--count N] [--seconds S]

KIND:
  udp, tcp, icmp        ordinary sockets (tcp: a connect attempt; icmp: a ping)
  bind-udp              UDP with SO_BINDTODEVICE to --dev
  pktinfo-udp           UDP with IP_PKTINFO / IPV6_PKTINFO naming --dev as the way out
  raw-udp               a raw IPv4 socket (SOCK_RAW, IPPROTO_UDP): needs CAP_NET_RAW
  packet-udp            an AF_PACKET socket on --dev with a whole IPv4/UDP packet from --src
  mcast6-udp            UDP to an IPv6 multicast group, out of --dev (IPV6_MULTICAST_IF)
  dhcp-udp              UDP from the DHCP client port (68; IPv6: 546) with 1,400 bytes (PORT: 67 or 547)
  stream-udp            one datagram a millisecond for --seconds (prints {"ready": true} first)
Prints {"sent": n, "errors": {"ENAME": n}} (exit status 0 either way).
"""

from __future__ import annotations

import argparse
import errno
import json
import signal
import socket
import struct
import subprocess
import sys
import time

SO_BINDTODEVICE = 25
IP_PKTINFO, IPV6_PKTINFO = 8, 50
IPV6_MULTICAST_IF = 17


def _addr(dst: str, port: int, kind: int) -> tuple[int, tuple]:
    info = socket.getaddrinfo(dst, port, type=kind)[0]
    return info[0], info[4]


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def send_once(kind: str, dst: str, port: int, dev: str | None, src: str | None) -> None:
    payload = b"ksbpf-verify-lab"
    if kind == "udp":
        fam, addr = _addr(dst, port, socket.SOCK_DGRAM)
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.sendto(payload, addr)
    elif kind == "tcp":
        fam, addr = _addr(dst, port, socket.SOCK_STREAM)
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.settimeout(0.3)
            try:
                s.connect(addr)
            except (TimeoutError, ConnectionRefusedError):
                pass   # the SYN left (or did not): the far side counts
    elif kind == "icmp":
        subprocess.run(["ping", "-n", "-q", "-c1", "-W0.3", dst], capture_output=True)
    elif kind == "bind-udp":
        fam, addr = _addr(dst, port, socket.SOCK_DGRAM)
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, dev.encode())
            s.sendto(payload, addr)
    elif kind == "pktinfo-udp":
        fam, addr = _addr(dst, port, socket.SOCK_DGRAM)
        ifindex = socket.if_nametoindex(dev)
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            if fam == socket.AF_INET:
                cmsg = (socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=I4s4s", ifindex, bytes(4), bytes(4)))
            else:
                cmsg = (socket.IPPROTO_IPV6, IPV6_PKTINFO, bytes(16) + struct.pack("=I", ifindex))
            s.sendmsg([payload], [cmsg], 0, addr)
    elif kind == "raw-udp":
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP) as s:
            s.sendto(struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload, (dst, 0))
    elif kind == "packet-udp":
        udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                          socket.inet_aton(src), socket.inet_aton(dst))
        hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
        with socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800)) as s:
            s.sendto(hdr + udp, (dev, 0x0800, 0, 0, b"\xff" * 6))
    elif kind == "mcast6-udp":
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_IF, socket.if_nametoindex(dev))
            s.sendto(payload, (dst, port, 0, 0))
    elif kind == "dhcp-udp":
        fam, addr = _addr(dst, port, socket.SOCK_DGRAM)
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", 68) if fam == socket.AF_INET else ("::", 546))
            s.sendto(payload + b"d" * 1384, addr)
    else:
        raise SystemExit(f"unknown kind {kind!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind")
    ap.add_argument("dst")
    ap.add_argument("port", type=int)
    ap.add_argument("--dev")
    ap.add_argument("--src")
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=0)
    a = ap.parse_args()
    sent, errors = 0, {}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

    def attempt(kind: str) -> None:
        nonlocal sent
        try:
            send_once(kind, a.dst, a.port, a.dev, a.src)
            sent += 1
        except OSError as exc:
            name = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else type(exc).__name__
            errors[name] = errors.get(name, 0) + 1

    if a.kind == "stream-udp":
        print(json.dumps({"ready": True}), flush=True)
        end = time.monotonic() + a.seconds
        while time.monotonic() < end and not stop:
            attempt("udp")
            time.sleep(0.001)
    else:
        for _ in range(a.count):
            attempt(a.kind)
    print(json.dumps({"sent": sent, "errors": errors}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
