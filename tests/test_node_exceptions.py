"""Node mode's exceptions carry no data (issue 18, rows 3-5): neighbour
discovery to a routed address, DHCP client ports to a routed server or
forwarded from a container, and AF_PACKET frames under the ARP ethertype
(also behind an 802.1Q tag) whose body is an IPv4 packet.

Each abuse is sent 20 times with a marker in its payload and counted on the
far side of the physical link (a packet capture in the server namespace):
first without node mode (all 20 arrive: the control that the packets are
real and the capture sees them), then with `ksbpf attach --node` in force and
the tunnel down (0 arrive).  The legitimate use of each exception still works:
the neighbour caches flushed, the VPN endpoint is reached (ARP and ND to the
neighbour pass), a well-formed ARP request arrives, and the machine's own DHCP
client reaches a server on its LAN while the same datagram forwarded from a
container does not."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import threading
import time
import uuid

import pytest
from test_node import attach_node, host, node_status  # noqa: F401  (host: a fixture)

from ksbpf.kernel import netns
from ksbpf.lab.namespaces import Sniffer, probe
from ksbpf.scopes import node

pytestmark = pytest.mark.lab
COUNT = 20
ETH_P_ALL, ETH_P_IP, ETH_P_ARP, ETH_P_8021Q = 0x0003, 0x0800, 0x0806, 0x8100
PACKET_OUTGOING = 4
IPV6_UNICAST_HOPS = 16


class Capture:
    """Frames arriving on the server's end of the physical link that carry
    `marker`, and ARP requests for `arp_target`."""

    def __init__(self, lab, marker: bytes, arp_target: str | None = None):
        self.marker = marker
        self.arp_target = socket.inet_aton(arp_target) if arp_target else None
        self.hits = 0
        self.arp_requests = 0
        self.sports: set[int] = set()   # UDP source ports of the hits

        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            s.bind((lab.phy_server, ETH_P_ALL))
            return s
        self._sock = netns.run_in(lab.server_path, make)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not select.select([self._sock], [], [], 0.05)[0]:
                continue
            while True:
                try:
                    data, addr = self._sock.recvfrom(4096, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                if self.marker in data:
                    self.hits += 1
                    ethertype = struct.unpack_from("!H", data, 12)[0]
                    off = 14 + (data[14] & 0xF) * 4 if ethertype == ETH_P_IP else 14 + 40
                    if data[23 if ethertype == ETH_P_IP else 20] == 17:
                        self.sports.add(struct.unpack_from("!H", data, off)[0])
                elif (self.arp_target and addr[1] == ETH_P_ARP and len(data) >= 42
                      and data[20:22] == b"\x00\x01" and data[38:42] == self.arp_target):
                    self.arp_requests += 1

    def close(self, settle: float = 0.3) -> None:
        time.sleep(settle)
        self._stop.set()
        self._thread.join(2)
        self._sock.close()

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _mac(ns: str, dev: str) -> bytes:
    import json
    out = json.loads(subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", dev],
                                    capture_output=True, text=True, check=True).stdout)
    return bytes.fromhex(out[0]["address"].replace(":", ""))


def _ipv4(src: str, dst: str, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 7, 0, 64, 17, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr + udp


def _raw_frames(lab, frame: bytes, count: int = COUNT) -> None:
    """Send `frame` count times on the client's end of the physical link
    (ENOBUFS, what a packet socket hears of a tc drop, is expected)."""
    def send() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as s:
            for _ in range(count):
                try:
                    s.sendto(frame, (lab.phy_client, 0))
                except OSError:
                    pass
    netns.run_in(lab.client_path, send)


def _raw_nd(lab, dst: str, icmp_type: int, payload: bytes, count: int = COUNT) -> None:
    """ICMPv6 of type icmp_type with hop limit 255 from a raw socket of the host."""
    def send() -> None:
        with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_UNICAST_HOPS, 255)
            msg = struct.pack("!BBHI", icmp_type, 0, 0, 0) + payload   # the kernel fills the checksum
            for _ in range(count):
                try:
                    s.sendto(msg, (dst, 0))
                except OSError:
                    pass
    netns.run_in(lab.client_path, send)


def _dhcp_client(ns: str, dst: str, v6: bool, payload: bytes, count: int = COUNT) -> None:
    """UDP from the DHCP client port to the server port (68 -> 67, 546 -> 547),
    from a socket of namespace `ns` (a path)."""
    def send() -> None:
        family = socket.AF_INET6 if v6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::" if v6 else "0.0.0.0", 546 if v6 else 68))
            for _ in range(count):
                try:
                    s.sendto(payload, (dst, 547 if v6 else 67))
                except OSError:
                    pass
    netns.run_in(ns, send)


@pytest.fixture
def node_guard(request, host):  # noqa: F811
    """A function that puts node mode in force on the host (removed at teardown)."""
    def detach() -> None:
        if os.path.exists(host.client_path):
            node.detach(host.client_path)
    request.addfinalizer(detach)
    return lambda *extra: attach_node(host, *extra)


def _marker() -> bytes:
    return b"KSBPF-EXC-" + uuid.uuid4().hex[:12].encode()


def _flush_neighbours(lab) -> None:
    subprocess.run(["ip", "-n", lab.client_ns, "neigh", "flush", "dev", lab.phy_client], check=True)
    subprocess.run(["ip", "-n", lab.server_ns, "neigh", "flush", "dev", lab.phy_server], check=True)


def _endpoint_reached(lab, family: int) -> int:
    """Neighbour caches flushed, udp to the VPN endpoint's port: how many
    datagrams arrived (ARP or ND to the neighbour had to pass first)."""
    _flush_neighbours(lab)
    with Sniffer(lab) as sniffer:
        probe(lab, None, "udp", lab.phy4_server if family == 4 else lab.phy6_server, lab.wg_port, timeout=0.5)
    return sniffer.wireguard


def test_nd_to_a_routed_address_carries_nothing(host, node_guard):  # noqa: F811
    """Row 3: ICMPv6 133/135/136, hop limit 255, 1.2 KB, to a routed address
    (net6_server, behind the server): 20 -> 20 without node mode, 0 with it;
    ND to the neighbour still works (the endpoint is reached over IPv6)."""
    host.tunnel_down()   # the routes fall back to the physical link
    marker = _marker()
    payload = marker + b"n" * (1200 - len(marker))
    sent = {}
    for guarded in (False, True):
        if guarded:
            node_guard()
        for t in (133, 135, 136):
            with Capture(host, marker) as cap:
                _raw_nd(host, host.net6_server, t, payload)
            sent[(guarded, t)] = cap.hits
    print(f"node, ND to a routed address: {sent}")
    assert all(sent[(False, t)] == COUNT for t in (133, 135, 136)), sent   # control: they are real and seen
    assert all(sent[(True, t)] == 0 for t in (133, 135, 136)), sent
    before = node_status(host)["counters"]["neigh"]["packets"]
    assert _endpoint_reached(host, 6) >= 1
    assert node_status(host)["counters"]["neigh"]["packets"] > before   # the neighbour solicitation passed


def test_dhcp_to_a_routed_server_or_forwarded_carries_nothing(host, node_guard):  # noqa: F811
    """Row 4: DHCP client ports with 1,400-byte payloads to a routed non-LAN
    address, from the host and forwarded from a container (masquerade keeps
    port 68), and 546 -> 547: 20 -> 20 each without node mode, 0 with it
    (DHCP allowed: node mode's default).  The host's own small DHCP datagram
    to a server on its LAN arrives; the same from a container does not."""
    n = int(host.tag, 16) % 250 + 1
    c, s = host.client_ns, host.server_ns
    # each sender its own servers: masquerade keeps port 68 only while no other flow holds it
    servers = {"host": (host.net4_server, host.net6_server, f"192.168.{n}.2"),
               "container": (f"198.51.100.{n}", f"2001:db8:fffe:{n}::80", f"192.168.{n}.3")}
    for cmd in (["-n", c, "addr", "add", f"192.168.{n}.1/24", "dev", host.phy_client],
                ["-n", s, "addr", "add", f"192.168.{n}.2/24", "dev", host.phy_server],
                ["-n", s, "addr", "add", f"192.168.{n}.3/24", "dev", host.phy_server],
                ["-n", s, "addr", "add", f"198.51.100.{n}/32", "dev", "lo"],
                ["-n", s, "addr", "add", f"2001:db8:fffe:{n}::80/128", "dev", "lo"]):
        subprocess.run(["ip", *cmd], check=True)
    host.tunnel_down()
    container = f"/run/netns/{host.containers[0]}"
    got, sports = {}, set()
    for guarded in (False, True):
        if guarded:
            node_guard()
            assert node_status(host)["options"]["allow_dhcp"]   # node mode's default
        for who, ns in (("host", host.client_path), ("container", container)):
            routed4, routed6, lan = servers[who]
            for v6, dst in ((False, routed4), (True, routed6)):
                marker = _marker()
                with Capture(host, marker) as cap:
                    _dhcp_client(ns, dst, v6, marker + b"d" * (1400 - len(marker)))
                got[(guarded, who, "v6" if v6 else "v4", "routed")] = cap.hits
                sports |= cap.sports
            marker = _marker()
            with Capture(host, marker) as cap:
                _dhcp_client(ns, lan, False, marker + bytes(300 - len(marker)))
            got[(guarded, who, "v4", "lan")] = cap.hits
            sports |= cap.sports
    print(f"node, DHCP client ports: {got}; source ports seen {sorted(sports)}")
    assert sports == {68, 546}   # the forwarded ones too: masquerade kept the client ports
    assert all(v == COUNT for k, v in got.items() if not k[0]), got      # control: all arrive unguarded
    guarded_got = {k[1:]: v for k, v in got.items() if k[0]}
    assert guarded_got == {("host", "v4", "routed"): 0, ("host", "v6", "routed"): 0,
                           ("container", "v4", "routed"): 0, ("container", "v6", "routed"): 0,
                           ("host", "v4", "lan"): COUNT,          # the machine's own client, to its LAN
                           ("container", "v4", "lan"): 0}, got    # forwarded: never
    assert node_status(host)["counters"]["dhcp"]["packets"] >= COUNT


def test_arp_ethertype_frames_carry_nothing(host, node_guard):  # noqa: F811
    """Row 5: AF_PACKET frames with the ARP ethertype (also behind an 802.1Q
    tag) whose body is an IPv4 packet: 20 -> 20 without node mode, 0 with it.
    A well-formed ARP request still goes out, and ARP to the neighbour works
    (the endpoint is reached over IPv4)."""
    host.tunnel_down()
    n = int(host.tag, 16) % 250 + 1
    dst_mac, src_mac = _mac(host.server_ns, host.phy_server), _mac(host.client_ns, host.phy_client)
    who_has = f"198.18.{n}.77"
    arp_request = (b"\xff" * 6 + src_mac + struct.pack("!H", ETH_P_ARP) + b"\x00\x01\x08\x00\x06\x04\x00\x01"
                   + src_mac + socket.inet_aton(host.phy4_client) + bytes(6) + socket.inet_aton(who_has))
    got = {}
    for guarded in (False, True):
        if guarded:
            node_guard()
        for tagged in (False, True):
            marker = _marker()
            body = _ipv4(host.phy4_client, host.net4_server, marker + b"a" * 64)
            ethertype = (struct.pack("!HHH", ETH_P_8021Q, 10, ETH_P_ARP) if tagged else struct.pack("!H", ETH_P_ARP))
            with Capture(host, marker) as cap:
                _raw_frames(host, dst_mac + src_mac + ethertype + body)
            got[(guarded, "tagged" if tagged else "plain")] = cap.hits
        with Capture(host, b"\x00no-marker\x00", arp_target=who_has) as cap:
            _raw_frames(host, arp_request)
        got[(guarded, "arp request")] = cap.arp_requests
    print(f"node, ARP ethertype frames: {got}")
    assert got == {(False, "plain"): COUNT, (False, "tagged"): COUNT, (False, "arp request"): COUNT,
                   (True, "plain"): 0, (True, "tagged"): 0, (True, "arp request"): COUNT}, got
    assert node_status(host)["counters"]["not_ip"]["packets"] >= 2 * COUNT
    assert _endpoint_reached(host, 4) >= 1
