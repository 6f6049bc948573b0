"""--endpoint auto for kernel WireGuard: the peers' endpoints in WireGuard's
generic netlink answers, encoded and decoded by pyroute2's own message class
(this machine has no WireGuard module; the VM test reads a real one -- where
this was found: pyroute2 gives WGDEVICE_A_PEERS as a list of peers and a
peer's key as base64 bytes, which the reader took for one peer and a dict)."""

from __future__ import annotations

import ipaddress
from base64 import b64encode

from pyroute2.netlink.generic.wireguard import wgmsg

from ksbpf.kernel import vpn_endpoints

KEYS = [b64encode(bytes([i]) * 32).decode() for i in (1, 2, 3)]


def answer(peers: list[tuple[str, str | None, int]]) -> wgmsg:
    """A WG_CMD_GET_DEVICE answer as the kernel sends it, decoded as pyroute2 decodes it."""
    attrs = []
    for key, addr, port in peers:
        peer = [["WGPEER_A_PUBLIC_KEY", key]]
        if addr is not None:
            peer.append(["WGPEER_A_ENDPOINT", {"addr": addr, "port": port}])
        attrs.append({"attrs": peer})
    msg = wgmsg()
    msg["cmd"], msg["version"] = 0, 1
    msg["attrs"] = [["WGDEVICE_A_IFNAME", "wg-home"], ["WGDEVICE_A_PEERS", attrs]]
    msg.encode()
    out = wgmsg(msg.data)
    out.decode()
    return out


def test_every_peer_of_every_message():
    one = answer([(KEYS[0], "10.99.0.2", 51820), (KEYS[1], "fd00::2", 51821)])
    two = answer([(KEYS[2], None, 0)])   # a peer without an endpoint yet: not an endpoint
    got = vpn_endpoints.genl_peers([one, two])
    assert [(k, str(e.address), e.port, e.proto) for k, e in got] == [
        (KEYS[0], "10.99.0.2", 51820, "udp"), (KEYS[1], "fd00::2", 51821, "udp")]
    assert all(isinstance(e.address, (ipaddress.IPv4Address, ipaddress.IPv6Address)) for _, e in got)
    assert vpn_endpoints.genl_peers([answer([])]) == []
