"""The endpoint exception belongs to the VPN client (issue 17 sections 1 and 4):
real VPN clients in the namespace lab, real packets, counted where they
arrive (an AF_PACKET capture on the server's veth).

- wireguard-go marking its packets (`wg set IFACE fwmark M`) inside a cgroup
  scope attached with --vpn-mark M: the tunnel works, an application of the
  scope sending to the endpoint's address and port gets 0 datagrams to the
  server (control: the same send before ksbpf arrives);
- wireguard-go in a cgroup of its own, --vpn-cgroup: the same;
- node mode: a VXLAN device aimed at the endpoint carries its frames out
  without --vpn-mark (control), 0 with it; a server switch to a wildcard
  endpoint (`*:PORT/udp`): the tunnel comes back through another server,
  nothing else reaches either;
- node mode's netfilter hook (an interface created after attaching): only
  marked packets reach the endpoint;
- OpenVPN 2.6 with --mark, and as a --vpn-cgroup: the tunnel works, an
  application sending to the server's address and port gets 0 there; and a
  server switch (its next remote) under a wildcard endpoint with --vpn-mark:
  the tunnel comes back, nothing unmarked reaches either server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest
from helpers import UdpCapture, detach_node_at_teardown, ksbpf, wait_until
from test_endpoint_auto import SecondServer, server_key

from ksbpf.kernel import netns, nf
from ksbpf.lab.namespaces import _in_cgroup_and_ns

pytestmark = pytest.mark.lab
MARK = 0xCA6C
PREFIX = b"ksbpf-vpn-probe:"
SO_MARK = 36
VXLAN_FLAGS = b"\x08\x00\x00\x00"   # the VXLAN header's first word: the I flag (a WireGuard message starts 1-4)
TUNNEL_BACK = 40.0


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout




class Capture(UdpCapture):
    """UDP datagrams arriving on a server's veth, by (destination, port, kind):
    kind is the byte after PREFIX of our probes, "vxlan" for a VXLAN
    packet; anything else (the VPN's own packets) is not counted."""

    def __init__(self, ns_path: str, ifname: str):
        def classify(data: bytes, ihl: int, dport: int):
            payload = data[ihl + 8:]
            if payload.startswith(PREFIX):
                kind = payload[len(PREFIX):len(PREFIX) + 1].decode()
            elif payload.startswith(VXLAN_FLAGS):
                kind = "vxlan"
            else:
                return None
            return socket.inet_ntoa(data[16:20]), dport, kind
        super().__init__(ns_path, ifname, classify)

    def count(self, dst: str, port: int, kind: str) -> int:
        return self.seen.get((dst, port, kind), 0)


def send(ns: str, cgroup: str | None, dst: str, port: int, kind: str, n: int = 10,
         so_mark: int | None = None) -> dict:
    """n datagrams PREFIX+kind from a fresh process in the cgroup and namespace
    (setting SO_MARK first when asked: root may); returns {"sent", "refused"}."""
    code = ("import json,socket,sys,time\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            + (f"s.setsockopt(socket.SOL_SOCKET,{SO_MARK},{so_mark})\n" if so_mark is not None else "")
            + "sent=refused=0\n"
            f"for i in range({n}):\n"
            f"    try:\n        s.sendto({PREFIX + kind.encode()!r}+bytes([i]),({dst!r},{port})); sent+=1\n"
            "    except OSError: refused+=1\n"
            "    time.sleep(0.01)\n"
            "print(json.dumps({'sent':sent,'refused':refused}))\n")
    argv = _in_cgroup_and_ns(ns, cgroup, "python3", "-c", code)
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout
    return json.loads(out.strip().splitlines()[-1])


def ping(ns: str, dst: str, cgroup: str | None = None) -> bool:
    argv = _in_cgroup_and_ns(ns, cgroup, "ping", "-n", "-q", "-c1", "-W0.5", dst)
    return subprocess.run(argv, capture_output=True).returncode == 0


def counters(scope: dict) -> dict[str, int]:
    return {label: c["packets"] for label, c in scope["counters"].items()}


def cgroup_status(path: str) -> dict:
    out = json.loads(ksbpf("status", "--json", check=True).stdout)
    (mine,) = [s for s in out["scopes"] if s["cgroup"] == path]
    return mine


def node_status(lab) -> dict:
    out = json.loads(ksbpf("status", "--json", check=True).stdout)
    (mine,) = [n for n in out["nodes"] if n["netns"] == lab.client_path]
    return mine


@pytest.fixture
def capture(lab):
    cap = Capture(lab.server_path, lab.phy_server)
    yield cap
    cap.close()


def verify_policy(scope: str) -> dict:
    """`ksbpf verify --scope SCOPE --json`'s policy finding: crafted packets
    through the attached programs, with and without the mark, as the model says."""
    out = json.loads(ksbpf("verify", "--scope", scope, "--json").stdout)
    (policy,) = [f for f in out["findings"] if f["check"] == "policy"]
    return policy


def _detach_cgroup(path: str) -> None:
    ksbpf("detach", "--cgroup", path)


# -- cgroup scopes ---------------------------------------------------------------------

def test_wireguard_fwmark_in_a_cgroup_scope(lab, make_cgroup, capture, request):
    """wireguard-go inside the scope marks its packets; --vpn-mark gives the
    endpoint to it alone."""
    scope = make_cgroup()
    request.addfinalizer(lambda: _detach_cgroup(scope))
    lab.tunnel_down()
    lab.client_cgroup, lab.client_fwmark = scope, MARK   # wireguard-go: in the scope, `fwmark MARK`
    server, port = lab.phy4_server, lab.wg_port
    # control, no ksbpf: an application of the scope reaches the endpoint's address and port
    send(lab.client_ns, scope, server, port, "c")
    wait_until(lambda: capture.count(server, port, "c") >= 1, 10, "the control datagrams arriving")

    attach = ("attach", "--cgroup", scope, "--tunnel", lab.wg_client, "--netns", lab.client_path,
              "--endpoint", lab.endpoint4, "--vpn-mark", f"{MARK:#x}")
    ksbpf(*attach, check=True)
    lab.tunnel_up()   # wireguard-go starts in the scope: its handshake and the pings through it pass
    ksbpf(*attach, check=True)   # the tunnel exists now: registered (no daemon here)
    text = ksbpf("status", check=True).stdout
    assert f"packets with mark {MARK:#x}" in text, text
    st = cgroup_status(scope)
    assert st["vpn_mark"] == f"{MARK:#x}" and st["options"] == {"allow_lan": False, "allow_lan_dns": False,
                                                                   "allow_dhcp": False}
    assert counters(st)["endpoint"] > 0   # wireguard-go's own packets

    # an application of the scope to the endpoint's address and port: 0 arrive
    r = send(lab.client_ns, scope, server, port, "a", n=20)
    assert r["refused"] == 20, r
    # control after: the scope's traffic goes through the tunnel (wireguard-go's marked packets arrive)
    assert ping(lab.client_ns, lab.tun4_server, scope)
    time.sleep(0.2)
    assert capture.count(server, port, "a") == 0
    assert counters(cgroup_status(scope))["endpoint_not_vpn"] == 20
    policy = verify_policy(scope)
    assert policy["verdict"] == "ok", policy


def test_wireguard_in_its_own_vpn_cgroup(lab, make_cgroup, capture, request):
    """--vpn-cgroup: the VPN client's cgroup (a child of the scope) owns the
    endpoint; the application's sibling cgroup does not."""
    scope = make_cgroup()
    vpn, app = os.path.join(scope, "vpn"), os.path.join(scope, "app")
    os.mkdir(vpn)
    os.mkdir(app)
    request.addfinalizer(lambda: _detach_cgroup(scope))
    lab.tunnel_down()
    lab.client_cgroup = vpn
    attach = ("attach", "--cgroup", scope, "--tunnel", lab.wg_client, "--netns", lab.client_path,
              "--endpoint", lab.endpoint4, "--vpn-cgroup", vpn)
    ksbpf(*attach, check=True)
    lab.tunnel_up()   # wireguard-go (unmarked) in the vpn cgroup: its handshake and packets pass
    ksbpf(*attach, check=True)   # the tunnel exists now: registered (no daemon here)
    st = cgroup_status(scope)
    assert st["vpn_cgroups"] == [vpn] and st["vpn_mark"] is None
    server, port = lab.phy4_server, lab.wg_port
    r = send(lab.client_ns, app, server, port, "a", n=10)
    assert r["refused"] == 10, r
    # controls: a process of the vpn cgroup reaches the endpoint directly; the app goes through the tunnel
    send(lab.client_ns, vpn, server, port, "v", n=5)
    wait_until(lambda: capture.count(server, port, "v") >= 1, 10, "the vpn cgroup's datagrams arriving")
    assert ping(lab.client_ns, lab.tun4_server, app)
    time.sleep(0.2)
    assert capture.count(server, port, "a") == 0
    assert counters(cgroup_status(scope))["endpoint_not_vpn"] == 10


# -- node mode -------------------------------------------------------------------------

def _attach_node(lab, *extra: str) -> dict:
    return json.loads(ksbpf("attach", "--node", "--netns", lab.client_path, "--tunnel", lab.wg_client,
                            *extra, "--json", check=True).stdout)


@pytest.fixture
def node_detach(lab, request):
    detach_node_at_teardown(request, lab)


ARP_SEND = """
import socket, sys
ifname, n = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
mac = bytes.fromhex("02aabbccdd01")
arp = bytes.fromhex("0001080006040001") + mac + socket.inet_aton("10.199.0.1") + bytes(6) + socket.inet_aton("10.199.0.2")
for i in range(n):
    s.send(b"\\xff" * 6 + mac + b"\\x08\\x06" + arp)
"""


def test_vxlan_aimed_at_the_endpoint(lab, capture, node_detach):
    """TunnelCrack ServerIP in node mode: a VXLAN device whose remote is the
    VPN server's address and port.  Its ARP frames pass the device's own guard
    (ARP is let through); the UDP packets that carry them go to the endpoint."""
    vx, server, port = f"vx{lab.tag}", lab.phy4_server, lab.wg_port
    c = lab.client_ns
    _run("ip", "-n", c, "link", "add", vx, "type", "vxlan", "id", "42", "remote", server, "dstport", str(port),
         "dev", lab.phy_client)
    _run("ip", "-n", c, "addr", "add", "10.199.0.1/24", "dev", vx)
    _run("ip", "-n", c, "link", "set", vx, "up")
    _run("ip", "netns", "exec", c, "wg", "set", lab.wg_client, "fwmark", str(MARK))

    def arp(n: int) -> None:
        _run("ip", "netns", "exec", c, "python3", "-c", ARP_SEND, vx, str(n))

    # control: without --vpn-mark the endpoint is anyone's, and the VXLAN device carries 20 of 20 out
    _attach_node(lab, "--endpoint", lab.endpoint4)
    arp(20)
    wait_until(lambda: capture.count(server, port, "vxlan") >= 20, 15, "20 VXLAN packets arriving")
    # with --vpn-mark (re-attached, no gap): 0
    _attach_node(lab, "--endpoint", lab.endpoint4, "--vpn-mark", str(MARK))
    before = capture.count(server, port, "vxlan")
    arp(20)
    wait_until(lambda: lab._ping(lab.tun4_server), 15, "a ping through the marked tunnel (control)")
    time.sleep(0.2)
    assert capture.count(server, port, "vxlan") == before
    st = node_status(lab)
    assert st["vpn_mark"] == f"{MARK:#x}"
    assert counters(st)["endpoint_not_vpn"] >= 20
    policy = verify_policy(f"node:{lab.client_path}")
    assert policy["verdict"] == "ok", policy


def test_server_switch_to_a_wildcard_endpoint(lab, capture, node_detach, request):
    """`*:PORT/udp` with --vpn-mark: wireguard-go switches servers (`wg set
    ... endpoint`) and the tunnel comes back, no ksbpf change; nothing else
    reaches either server on that port."""
    second = SecondServer(lab)
    request.addfinalizer(second.destroy)
    second.create()
    c, port = lab.client_ns, lab.wg_port
    _run("ip", "netns", "exec", c, "wg", "set", lab.wg_client, "fwmark", str(MARK))
    out = _attach_node(lab, "--endpoint", f"*:{port}/udp", "--vpn-mark", str(MARK))
    assert out["from_birth"] in ("on",) or not nf.supported(), out
    assert node_status(lab)["any_endpoints"] == [f"*:{port}/udp"]
    wait_until(lambda: lab._ping(lab.tun4_server), 15, "a ping through the tunnel (first server)")
    cap2 = Capture(second.path, second.phy_server)
    try:
        # the first server forgets the client (else its next packet would roam the client back)
        with open(os.path.join(lab._keydir, "client.pub")) as f:
            _run("ip", "netns", "exec", lab.server_ns, "wg", "set", lab.wg_server, "peer", f.read().strip(), "remove")
        _run("ip", "netns", "exec", c, "wg", "set", lab.wg_client, "peer", server_key(lab),
             "endpoint", f"{second.addr}:{port}")
        wait_until(lambda: lab._ping(lab.tun4_server), TUNNEL_BACK, "a ping through the tunnel (second server)")
        for dst in (lab.phy4_server, second.addr):
            send(c, None, dst, port, "a", n=10)   # tc drops: the sender is not told (ENOBUFS is hidden)
        # control: a marked sender (root may set SO_MARK: as the VPN client does) reaches the new server
        send(c, None, second.addr, port, "m", n=5, so_mark=MARK)
        wait_until(lambda: cap2.count(second.addr, port, "m") >= 1, 10, "the marked datagrams arriving")
        time.sleep(0.2)
        assert capture.count(lab.phy4_server, port, "a") == 0 and cap2.count(second.addr, port, "a") == 0
    finally:
        cap2.close()
    policy = verify_policy(f"node:{lab.client_path}")   # the wildcard endpoint's crafted packets too
    assert policy["verdict"] == "ok", policy


@pytest.mark.skipif(not nf.supported(), reason="this kernel has no netfilter BPF links (Linux 6.4+)")
def test_netfilter_hook_reads_the_mark(lab, node_detach, request):
    """An interface created after a one-shot node attach is judged by the
    netfilter hook, which reads skb->mark at the offset the kernel's BTF gives."""
    second = SecondServer(lab)
    request.addfinalizer(second.destroy)
    out = _attach_node(lab, "--endpoint", second.endpoint, "--vpn-mark", f"{MARK:#x}/0xffff")
    assert out["from_birth"] == "on", out
    second.create()   # its veth appears after the attach: no tc guard, the netfilter hook decides
    c, port = lab.client_ns, lab.wg_port
    cap = Capture(second.path, second.phy_server)
    try:
        for kind, mark in (("u", None), ("w", MARK ^ 1)):
            r = send(c, None, second.addr, port, kind, n=10, so_mark=mark)
            assert r["refused"] == 10, r
        send(c, None, second.addr, port, "m", n=10, so_mark=0x50000 | MARK)   # under the mask: the VPN client's
        wait_until(lambda: cap.count(second.addr, port, "m") >= 1, 10, "the marked datagrams arriving")
        time.sleep(0.2)
        assert cap.count(second.addr, port, "u") == 0 and cap.count(second.addr, port, "w") == 0
    finally:
        cap.close()
    assert counters(node_status(lab))["endpoint_not_vpn"] >= 20


# -- OpenVPN ----------------------------------------------------------------------------
OVPN_PORT = 1194
OVPN_CIPHER = ("--cipher", "AES-256-CBC", "--data-ciphers", "AES-256-CBC", "--proto", "udp")


class OpenVPN:
    """Static-key OpenVPN 2.6: a server in the lab's server namespace, a client
    in the client namespace (with --mark, or in a cgroup)."""

    def __init__(self, lab, workdir):
        n = int(lab.tag, 16) % 250 + 1
        self.lab, self.dir = lab, str(workdir)
        self.key = os.path.join(self.dir, "static.key")
        self.tun = f"tvc{lab.tag}"
        self.tun_client, self.tun_server = f"10.71.{n}.2", f"10.71.{n}.1"
        self.pids: list[str] = []

    def _server(self, name: str, ns: str, local: str) -> str:
        spid = os.path.join(self.dir, f"{name}.pid")
        _run("ip", "netns", "exec", ns, "openvpn", "--daemon", f"ovs{name}", "--writepid", spid,
             "--log", os.path.join(self.dir, f"{name}.log"), "--secret", self.key, *OVPN_CIPHER,
             "--dev", f"tvs{self.lab.tag}", "--dev-type", "tun", "--ifconfig", self.tun_server, self.tun_client,
             "--local", local, "--port", str(OVPN_PORT))
        self.pids.append(spid)
        return spid

    def start(self, mark: int | None = None, cgroup: str | None = None, second=None) -> None:
        """A server (and one in `second`'s namespace: the client's next remote, its tun device
        kept across the switch with --persist-tun), then the client."""
        _run("openvpn", "--genkey", "secret", self.key)
        self.servers = {"s1": self._server("s1", self.lab.server_ns, self.lab.phy4_server)}
        cpid = os.path.join(self.dir, "client.pid")
        argv = ["openvpn", "--daemon", "ovc", "--writepid", cpid, "--log", os.path.join(self.dir, "client.log"),
                "--secret", self.key, *OVPN_CIPHER, "--dev", self.tun, "--dev-type", "tun",
                "--ifconfig", self.tun_client, self.tun_server, "--remote", self.lab.phy4_server, str(OVPN_PORT),
                "--ping", "1", "--ping-restart", "5", "--connect-retry", "1"]
        if second is not None:
            self.servers["s2"] = self._server("s2", second.ns, second.addr)
            argv += ["--remote", second.addr, str(OVPN_PORT), "--persist-tun"]
        if mark is not None:
            argv += ["--mark", str(mark)]
        subprocess.run(_in_cgroup_and_ns(self.lab.client_ns, cgroup, *argv), check=True, capture_output=True)
        self.pids.append(cpid)

    def stop_server(self, name: str) -> None:
        path = self.servers[name]
        with open(path) as f:
            pid = int(f.read().strip())
        os.kill(pid, 15)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10, f"openvpn {name} to exit")

    def log(self, name: str) -> str:
        with open(os.path.join(self.dir, f"{name}.log")) as f:
            return f.read()

    def stop(self) -> None:
        for path in self.pids:
            if os.path.exists(path):
                with open(path) as f:
                    pid = int(f.read().strip())
                try:
                    os.kill(pid, 15)
                except ProcessLookupError:
                    continue
                wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10, "openvpn to exit")
        self.pids.clear()

    def ping(self) -> bool:
        return ping(self.lab.client_ns, self.tun_server)


@pytest.mark.parametrize("how", ["mark", "cgroup"])
def test_openvpn_client(lab, capture, node_detach, make_cgroup, tmp_path, request, how):
    """OpenVPN with --mark (--vpn-mark) or in the VPN client's cgroup
    (--vpn-cgroup), node mode: the tunnel works through the marked/owned
    packets; an application sending to the server's address and port: 0."""
    ovpn = OpenVPN(lab, tmp_path)
    request.addfinalizer(ovpn.stop)
    endpoint = f"{lab.phy4_server}:{OVPN_PORT}/udp"
    vpn = make_cgroup("-ovpn") if how == "cgroup" else None
    args = ("--tunnel", ovpn.tun, "--endpoint", endpoint,
            *(("--vpn-mark", str(MARK)) if how == "mark" else ("--vpn-cgroup", vpn)))
    _attach_node(lab, *args)
    ovpn.start(mark=MARK if how == "mark" else None, cgroup=vpn)
    wait_until(lambda: netns.ifindex(netns.resolve(lab.client_path), ovpn.tun) is not None, 20,
               "OpenVPN's tun device")
    _attach_node(lab, *args)   # its tun device exists now: registered as the tunnel (no daemon here)
    wait_until(ovpn.ping, 30, "a ping through the OpenVPN tunnel")
    send(lab.client_ns, None, lab.phy4_server, OVPN_PORT, "a", n=10)
    assert ovpn.ping()   # control after: the tunnel still carries
    time.sleep(0.2)
    assert capture.count(lab.phy4_server, OVPN_PORT, "a") == 0
    st = node_status(lab)
    assert counters(st)["endpoint_not_vpn"] >= 10 and counters(st)["endpoint"] > 0


def test_openvpn_server_switch_to_a_wildcard_endpoint(lab, capture, node_detach, tmp_path, request):
    """OpenVPN with --mark and two remotes, node mode with `--endpoint '*:1194/udp'
    --vpn-mark`: the first server goes away, OpenVPN moves to its next remote and
    the tunnel comes back with no ksbpf change; an application sending to either
    server's port gets nothing out (control: a marked sender reaches the new one)."""
    second = SecondServer(lab)
    request.addfinalizer(second.destroy)
    second.create()
    ovpn = OpenVPN(lab, tmp_path)
    request.addfinalizer(ovpn.stop)
    args = ("--tunnel", ovpn.tun, "--endpoint", f"*:{OVPN_PORT}/udp", "--vpn-mark", str(MARK))
    _attach_node(lab, *args)
    ovpn.start(mark=MARK, second=second)
    wait_until(lambda: netns.ifindex(netns.resolve(lab.client_path), ovpn.tun) is not None, 20,
               "OpenVPN's tun device")
    _attach_node(lab, *args)   # its tun device exists now: registered as the tunnel (no daemon here)
    wait_until(ovpn.ping, 30, "a ping through the OpenVPN tunnel (first server)")
    cap2 = Capture(second.path, second.phy_server)
    try:
        ovpn.stop_server("s1")   # the client's ping-restart (5 s) moves it to its next remote
        wait_until(ovpn.ping, TUNNEL_BACK, "a ping through the OpenVPN tunnel (second server)")
        assert f"Peer Connection Initiated with [AF_INET]{second.addr_client}:" in ovpn.log("s2"), ovpn.log("s2")
        for dst in (lab.phy4_server, second.addr):
            send(lab.client_ns, None, dst, OVPN_PORT, "a", n=10)
        send(lab.client_ns, None, second.addr, OVPN_PORT, "m", n=5, so_mark=MARK)   # control: as the client
        wait_until(lambda: cap2.count(second.addr, OVPN_PORT, "m") >= 1, 10, "the marked datagrams arriving")
        time.sleep(0.2)
        assert capture.count(lab.phy4_server, OVPN_PORT, "a") == 0 and cap2.count(second.addr, OVPN_PORT, "a") == 0
    finally:
        cap2.close()
    assert counters(node_status(lab))["endpoint_not_vpn"] >= 20


def test_daemon_applies_vpn_mark_and_wildcard(lab, make_cgroup, run_daemon, capture, request):
    """The same from the daemon's configuration (vpn_mark, endpoints = ["*:PORT/udp"]):
    the daemon registers the tunnel as wireguard-go brings it up in the scope."""
    scope = make_cgroup()
    lab.tunnel_down()
    lab.client_cgroup, lab.client_fwmark = scope, MARK
    port = lab.wg_port
    d = run_daemon([{"cgroup": scope, "tunnels": [lab.wg_client], "netns": lab.client_ns,
                     "endpoints": [f"*:{port}/udp"], "vpn_mark": f"{MARK:#x}"}])

    def stop_and_detach() -> None:
        d.stop()
        _detach_cgroup(scope)
    request.addfinalizer(stop_and_detach)
    lab.tunnel_up()   # the handshake to the wildcard endpoint, marked; the daemon registers the tunnel
    wait_until(lambda: ping(lab.client_ns, lab.tun4_server, scope), 15, "a ping from the scope through the tunnel")
    st = cgroup_status(scope)
    assert st["vpn_mark"] == f"{MARK:#x}" and st["any_endpoints"] == [f"*:{port}/udp"], st
    r = send(lab.client_ns, scope, lab.phy4_server, port, "a", n=10)
    assert r["refused"] == 10, r
    assert ping(lab.client_ns, lab.tun4_server, scope)   # control after
    time.sleep(0.2)
    assert capture.count(lab.phy4_server, port, "a") == 0
    assert counters(cgroup_status(scope))["endpoint_not_vpn"] == 10
    assert d.proc.poll() is None
