"""`--endpoint auto` without a tunnel: the answers of WireGuard's UAPI and
OpenVPN's management interface parsed, the policy's follow list, and the
order in which the endpoint maps change (tests/test_endpoint_auto.py has the
real tunnels)."""

from __future__ import annotations

import base64
import dataclasses
import socket
import threading

import pytest

from ksbpf.errors import KsbpfError
from ksbpf.kernel import vpn_endpoints
from ksbpf.kernel.vpn_endpoints import Followed, OpenVPNManagement, parse_remote, parse_state, parse_uapi
from ksbpf.policy import Endpoint, Policy, parse_endpoint_spec, split_endpoint_specs
from ksbpf.scopes import followed

KEY1, KEY2 = bytes(range(32)), bytes(range(1, 33))


def test_uapi_answer_gives_each_peer_its_endpoint():
    text = (f"private_key={'ab' * 32}\nlisten_port=51820\n"
            f"public_key={KEY1.hex()}\nendpoint=203.0.113.5:51820\nallowed_ip=0.0.0.0/0\n"
            f"public_key={KEY2.hex()}\nendpoint=[2001:db8::5]:4500\n"
            f"public_key={'cd' * 32}\nallowed_ip=10.0.0.2/32\n"   # a peer with no endpoint yet
            "errno=0\n\n")
    assert parse_uapi(text) == [(base64.b64encode(KEY1).decode(), Endpoint.parse("203.0.113.5:51820/udp")),
                                (base64.b64encode(KEY2).decode(), Endpoint.parse("[2001:db8::5]:4500/udp"))]


def test_uapi_error_is_an_error_not_an_empty_answer():
    with pytest.raises(OSError):
        parse_uapi("errno=19\n\n")


def test_an_ipv4_mapped_endpoint_is_the_ipv4_address():
    # wireguard-go on a dual-stack socket reports a roaming IPv4 peer this way
    assert parse_uapi(f"public_key={KEY1.hex()}\nendpoint=[::ffff:198.51.100.7]:51820\nerrno=0\n") == \
        [(base64.b64encode(KEY1).decode(), Endpoint.parse("198.51.100.7:51820/udp"))]


@pytest.mark.parametrize("line, endpoint", [
    (">REMOTE:203.0.113.5,1194,udp", "203.0.113.5:1194/udp"),
    (">REMOTE:203.0.113.5,443,tcp-client", "203.0.113.5:443/tcp"),
    (">REMOTE:2001:db8::5,1194,udp6", "[2001:db8::5]:1194/udp"),
])
def test_openvpn_remote_query(line, endpoint):
    assert parse_remote(line) == (Endpoint.parse(endpoint), "")


def test_openvpn_remote_by_name_is_not_followed_and_says_why():
    ep, why = parse_remote(">REMOTE:vpn.example.com,1194,udp")
    assert ep is None and "host name" in why and "remote ADDRESS PORT" in why


def test_openvpn_connected_state_names_the_remote():
    line = ">STATE:1796530407,CONNECTED,SUCCESS,10.8.0.2,203.0.113.5,1194,,"
    assert parse_state(line, {}) == Endpoint.parse("203.0.113.5:1194/udp")
    assert parse_state("1796530407,ASSIGN_IP,,10.70.9.2,,,,", {}) is None


def fake_openvpn(path: str, script: list[bytes]):
    """A management socket that sends `script` to its client and records what it answers."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            for chunk in script:
                conn.sendall(chunk)
            conn.settimeout(2)
            try:
                while data := conn.recv(4096):
                    got.append(data)
                    if b"remote ACCEPT" in b"".join(got):
                        break
            except socket.timeout:
                pass
        srv.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t, got


def test_management_connection_learns_the_remote_then_accepts(tmp_path):
    path = str(tmp_path / "m.sock")
    t, got = fake_openvpn(path, [b">INFO:OpenVPN Management Interface Version 5\r\n", b">REMOTE:198.51.100.9,1194,udp\r\n"])
    m = OpenVPNManagement(path)
    m.connect()
    assert m.followed() is None   # nothing said yet: what was followed is kept
    while not m.known:
        assert m.connected
        m.feed()
    assert m.followed() == [Followed(Endpoint.parse("198.51.100.9:1194/udp"), path, "openvpn")]
    assert m.pending_accept
    m.accept()
    t.join(5)
    m.close()
    assert b"remote ACCEPT\n" in b"".join(got) and b"state\n" in b"".join(got)


def test_no_management_socket_is_not_there(tmp_path):
    with pytest.raises(vpn_endpoints.NotThere):
        OpenVPNManagement(str(tmp_path / "none.sock")).connect()


def test_endpoint_specs():
    assert parse_endpoint_spec("auto") == "auto"
    assert parse_endpoint_spec(" auto:/run/openvpn/c.sock ") == "/run/openvpn/c.sock"
    assert split_endpoint_specs(["auto", "203.0.113.5:51820/udp", "auto"]) == \
        ((Endpoint.parse("203.0.113.5:51820/udp"),), ("auto",))
    for bad in ("auto:relative.sock", "auto:", "automatic"):
        with pytest.raises(KsbpfError):
            parse_endpoint_spec(bad)


def test_policy_keeps_what_it_follows_across_its_record():
    p = Policy(("wg0",), (Endpoint.parse("203.0.113.5:51820/udp"),), follow=("auto", "/run/openvpn/c.sock"))
    assert Policy.from_dict(p.to_dict()) == p
    assert "follow" not in Policy(("wg0",)).to_dict()   # records of scopes without it are unchanged
    # read back from the pins, the maps hold the followed endpoints too: still the same policy
    current = dataclasses.replace(p, endpoints=p.endpoints + (Endpoint.parse("198.51.100.1:51820/udp"),))
    assert p.same_but_followed(current)
    assert not p.same_but_followed(dataclasses.replace(current, endpoints=()))   # a fixed one missing
    assert not p.same_but_followed(dataclasses.replace(current, follow=("auto",)))
    plain = Policy(("wg0",), (Endpoint.parse("203.0.113.5:51820/udp"),))
    assert not plain.same_but_followed(current)


class FakeMaps:
    """The endpoint half of bpf.ScopeMaps, recording the order of changes."""

    def __init__(self, endpoints=(), meta=None):
        self.eps = list(endpoints)
        self.meta = meta if meta is not None else {"version": 1}
        self.ops: list[tuple[str, str]] = []

    def endpoints(self):
        return list(self.eps)

    def add_endpoint(self, ep):
        self.ops.append(("add", str(ep)))
        self.eps.append(ep)

    def remove_endpoint(self, ep):
        self.ops.append(("remove", str(ep)))
        self.eps.remove(ep)

    def read_meta(self):
        return dict(self.meta)

    def write_meta(self, meta):
        self.meta = meta


def fol(text: str, source: str = "wg0") -> Followed:
    return Followed(Endpoint.parse(text), source, "wireguard-uapi", "KEY")


def test_sync_adds_the_new_endpoint_before_removing_the_old():
    fixed = Endpoint.parse("192.0.2.1:1194/udp")
    policy = Policy(("wg0",), (fixed,), follow=("auto",))
    maps = FakeMaps([fixed])
    r = followed.sync(maps, policy, [fol("203.0.113.5:51820/udp")])
    assert r.added == ["203.0.113.5:51820/udp"] and r.removed == []
    assert followed.recorded(maps.meta) == [fol("203.0.113.5:51820/udp")]
    maps.ops.clear()
    r = followed.sync(maps, policy, [fol("203.0.113.6:51820/udp")])
    assert maps.ops == [("add", "203.0.113.6:51820/udp"), ("remove", "203.0.113.5:51820/udp")]
    assert set(maps.eps) == {fixed, Endpoint.parse("203.0.113.6:51820/udp")}   # the fixed one stays
    # the tunnel gone: its endpoint leaves, the fixed one stays
    r = followed.sync(maps, policy, [])
    assert r.removed == ["203.0.113.6:51820/udp"] and maps.eps == [fixed] and followed.recorded(maps.meta) == []


def test_sync_keeps_the_endpoints_of_a_source_it_could_not_read():
    policy = Policy(("wg0", "wg1"), follow=("auto",))
    maps = FakeMaps()
    followed.sync(maps, policy, [fol("203.0.113.5:51820/udp"), fol("203.0.113.7:51820/udp", "wg1")])
    r = followed.sync(maps, policy, [fol("203.0.113.7:51820/udp", "wg1")], ["wg0: timed out"])
    assert r.removed == [] and r.failed == ["wg0: timed out"]
    assert {str(e) for e in maps.eps} == {"203.0.113.5:51820/udp", "203.0.113.7:51820/udp"}
    r = followed.sync(maps, policy, [fol("203.0.113.7:51820/udp", "wg1")])   # read again: gone
    assert r.removed == ["203.0.113.5:51820/udp"]


def test_status_line_names_the_source_and_the_peer():
    f = Followed(Endpoint.parse("203.0.113.5:51820/udp"), "wg0", "wireguard", "ABCDEFGHIJKLMNOP=")
    assert f.describe() == "auto: 203.0.113.5:51820/udp from wg0 peer ABCDEFGH…"
    assert Followed.from_dict(f.to_dict()) == f


def test_auto_does_not_go_with_netns_each():
    with pytest.raises(KsbpfError, match="netns each"):
        Policy(("wg0",), netns="each", follow=("auto",))
