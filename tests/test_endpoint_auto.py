"""`--endpoint auto`: the endpoint maps follow the tunnel (issue 17 §2).

Real wireguard-go tunnels in namespaces only.  The client namespace is
guarded in node mode, so the VPN client's own packets are judged: the
tunnel comes back through a new server only if the daemon followed the
switch.  A second server lives in its own namespace behind its own veth,
with the same WireGuard key as the first (a provider's relays)."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest
from helpers import DaemonProcess, UdpCapture, ksbpf, scope_status, toml_config, wait_until

from ksbpf.kernel import netns, vpn_endpoints
from ksbpf.lab.namespaces import WG_RUN_DIR, probe
from ksbpf.policy import Endpoint
from ksbpf.scopes import node

pytestmark = pytest.mark.lab
MARK = b"ksbpf-auto-probe"
TUNNEL_BACK = 40.0   # bound for the handshake through the new server (WireGuard retries after 15 s of silence)


class SecondServer:
    """A second WireGuard server (same key as the lab's) in namespace <prefix>-<tag>-s2,
    reached from the client namespace over its own veth (198.19.N.0/24)."""

    def __init__(self, lab):
        n = int(lab.tag, 16) % 250 + 1
        self.lab, self.ns = lab, f"{lab.prefix}-{lab.tag}-s2"
        self.phy_client, self.phy_server = f"pc2{lab.tag}", f"ps2{lab.tag}"
        self.addr_client, self.addr = f"198.19.{n}.1", f"198.19.{n}.2"
        self.wg = f"ws2{lab.tag}"

    @property
    def path(self) -> str:
        return os.path.join(netns.NETNS_RUN_DIR, self.ns)

    def create(self) -> None:
        lab, run = self.lab, _run
        run("ip", "netns", "add", self.ns)
        run("ip", "-n", lab.client_ns, "link", "add", self.phy_client, "type", "veth",
            "peer", "name", self.phy_server, "netns", self.ns)
        run("ip", "-n", self.ns, "link", "set", "lo", "up")
        for ns, dev, addr in ((lab.client_ns, self.phy_client, self.addr_client), (self.ns, self.phy_server, self.addr)):
            run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
        # the lab's own helper: wireguard-go with the server's key, the client as peer
        lab._start_wg(self.ns, self.wg, lab.tun4_server, lab.tun6_server, "server", "client",
                      ("listen-port", str(lab.wg_port)), ())

    def destroy(self) -> None:
        proc = self.lab._wg.pop(self.wg, None)
        if proc is not None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        try:
            os.unlink(os.path.join(WG_RUN_DIR, f"{self.wg}.sock"))
        except FileNotFoundError:
            pass

    @property
    def endpoint(self) -> str:
        return f"{self.addr}:{self.lab.wg_port}/udp"


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


class Arrivals(UdpCapture):
    """UDP datagrams carrying MARK that arrive on a server's veth, by
    (destination, port): a real capture (AF_PACKET) in the server's namespace."""

    def __init__(self, ns_path: str, ifname: str):
        super().__init__(ns_path, ifname, lambda data, ihl, dport: (socket.inet_ntoa(data[16:20]), dport)
                         if data[ihl + 8:].startswith(MARK) else None)

    def count(self, dst: str, port: int) -> int:
        return self.seen.get((dst, port), 0)


def send_marked(lab, dst: str, port: int, n: int = 5) -> None:
    """n datagrams with MARK from a process in the client namespace (node mode judges them)."""
    code = ("import socket,sys,time\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"for i in range({n}):\n"
            f"    try: s.sendto({MARK!r}+bytes([i]),({dst!r},{port}))\n"
            "    except OSError: pass\n"
            "    time.sleep(0.01)\n")
    subprocess.run(["ip", "netns", "exec", lab.client_ns, "python3", "-c", code], check=True, timeout=30)




@pytest.fixture
def second(lab, request):
    s2 = SecondServer(lab)
    request.addfinalizer(s2.destroy)
    s2.create()
    return s2


@pytest.fixture
def auto_node(lab, second, tmp_path, request):
    """The daemon guarding the client namespace in node mode with endpoints = ["auto"]."""
    path = tmp_path / "ksbpf.toml"
    path.write_text(toml_config([], f'[node]\nnetns = "{lab.client_path}"\ntunnels = ["{lab.wg_client}"]\n'
                                    'endpoints = ["auto"]\n'))

    def stop_and_detach() -> None:
        d.stop()
        if os.path.exists(lab.client_path):
            node.detach(lab.client_path)
    d = DaemonProcess(str(path))
    request.addfinalizer(stop_and_detach)
    d.wait_for("ready")
    return d


def server_key(lab) -> str:
    with open(os.path.join(lab._keydir, "server.pub")) as f:
        return f.read().strip()


def node_status(lab) -> dict:
    out = ksbpf("status", "--json", check=True).stdout
    import json
    mine = [n for n in json.loads(out)["nodes"] if n["netns"] == lab.client_path]
    assert len(mine) == 1, out
    return mine[0]


def test_uapi_reads_wireguard_go_peers(lab):
    """The reader asks wireguard-go's UAPI socket (this kernel has no WireGuard genl family)."""
    found = vpn_endpoints.wireguard(netns.resolve(lab.client_path), lab.wg_client)
    assert [f.endpoint for f in found] == [Endpoint.parse(lab.endpoint4)]
    assert found[0].via in ("wireguard-uapi", "wireguard") and found[0].peer == server_key(lab)
    with pytest.raises(vpn_endpoints.NotThere):
        vpn_endpoints.wireguard(netns.resolve(lab.client_path), "nosuch" + lab.tag)
    # the same device name asked about in another namespace: not that tunnel
    with pytest.raises(vpn_endpoints.NotThere, match="another network namespace"):
        vpn_endpoints.wireguard(netns.resolve(lab.server_path), lab.wg_client)


def test_server_switch_is_followed_and_the_old_endpoint_closes(lab, second, auto_node):
    d = auto_node
    s1_port = lab.wg_port
    # the daemon took the endpoint from the tunnel: nothing was typed
    st = node_status(lab)
    assert st["endpoints"] == [lab.endpoint4], st
    assert [f["endpoint"] for f in st["followed"]] == [lab.endpoint4] and st["followed"][0]["source"] == lab.wg_client
    text = ksbpf("status", check=True).stdout
    assert f"auto: {lab.endpoint4} from {lab.wg_client} peer {server_key(lab)[:8]}" in text, text
    s1 = Arrivals(lab.server_path, lab.phy_server)
    s2 = Arrivals(second.path, second.phy_server)
    try:
        # before the switch: the second server is not an endpoint (0 arrive), the first is (control)
        send_marked(lab, second.addr, s1_port)
        send_marked(lab, lab.phy4_server, s1_port)
        wait_until(lambda: s1.count(lab.phy4_server, s1_port) >= 1, 10, "the control to the first server arriving")
        assert s2.count(second.addr, s1_port) == 0

        # the old server forgets the client (a relay retired): else its next packet
        # through the old session would roam the client back to it (WireGuard
        # takes the source of any authenticated packet as the peer's endpoint)
        with open(os.path.join(lab._keydir, "client.pub")) as f:
            _run("ip", "netns", "exec", lab.server_ns, "wg", "set", lab.wg_server, "peer", f.read().strip(), "remove")
        mark = len(d.events)
        _run("ip", "netns", "exec", lab.client_ns, "wg", "set", lab.wg_client,
             "peer", server_key(lab), "endpoint", f"{second.addr}:{lab.wg_port}")
        ev = d.wait_for("endpoints_followed", after=mark)
        assert ev["added"] == [second.endpoint] and ev["removed"] == [lab.endpoint4], ev
        # the tunnel comes back through the second server
        wait_until(lambda: lab._ping(lab.tun4_server), TUNNEL_BACK, "a ping through the tunnel")
        peers = vpn_endpoints.wireguard(netns.resolve(second.path), second.wg)
        assert [str(f.endpoint.address) for f in peers] == [second.addr_client], peers

        # the old endpoint is closed, the new one open (control), nothing else reaches either
        before1, before2 = s1.count(lab.phy4_server, s1_port), s2.count(second.addr, s1_port)
        send_marked(lab, lab.phy4_server, s1_port)
        for dst in (lab.phy4_server, second.addr):
            send_marked(lab, dst, s1_port + 1)
        send_marked(lab, second.addr, s1_port)
        wait_until(lambda: s2.count(second.addr, s1_port) > before2, 10, "the control to the new server arriving")
        time.sleep(0.2)   # packets in flight (the control arrived after them)
        assert s1.count(lab.phy4_server, s1_port) == before1
        assert s1.count(lab.phy4_server, s1_port + 1) == 0 and s2.count(second.addr, s1_port + 1) == 0
    finally:
        s1.close()
        s2.close()
    st = node_status(lab)
    assert st["endpoints"] == [second.endpoint] and st["followed"][0]["endpoint"] == second.endpoint
    assert d.proc.poll() is None


def test_endpoints_leave_with_the_tunnel_and_come_back_with_it(lab, make_cgroup, run_daemon):
    """wg-quick down: the tunnel's endpoints leave the maps; up again: they are
    read as the link appears (WireGuard says nothing: the daemon asks)."""
    cg = make_cgroup()
    d = run_daemon([{"cgroup": cg, "tunnels": [lab.wg_client], "netns": lab.client_ns, "endpoints": ["auto"]}])
    assert scope_status(cg)["endpoints"] == [lab.endpoint4]
    for _ in range(2):
        mark = len(d.events)
        lab.tunnel_down()
        ev = d.wait_for("endpoints_followed", after=mark)
        assert ev["removed"] == [lab.endpoint4] and ev["added"] == [] and ev["now"] == []
        assert scope_status(cg)["endpoints"] == [] and scope_status(cg)["followed"] == []
        mark = len(d.events)
        lab.tunnel_up()
        ev = d.wait_for("endpoints_followed", after=mark)
        assert ev["added"] == [lab.endpoint4] and ev["removed"] == []
        st = scope_status(cg)
        assert st["endpoints"] == [lab.endpoint4] and st["followed"][0]["peer"] == server_key(lab)
    assert d.proc.poll() is None


def test_node_mode_tunnel_recreated_comes_back_through_its_followed_endpoint(lab, second, auto_node, servers):
    """Node mode judges the VPN client's own packets: a re-created tunnel
    handshakes again only because its endpoint is read as the link appears."""
    d = auto_node
    mark = len(d.events)
    lab.tunnel_down()
    d.wait_for("endpoints_followed", after=mark, removed=[lab.endpoint4])
    assert node_status(lab)["endpoints"] == []
    mark = len(d.events)
    lab.tunnel_up()   # waits until pings pass through the new tunnel
    d.wait_for("endpoints_followed", after=mark, added=[lab.endpoint4])
    assert probe(lab, None, "udp", lab.net4_server, servers["udp"]).ok   # traffic flows again (through the tunnel)
    assert node_status(lab)["endpoints"] == [lab.endpoint4]


def test_a_route_to_the_followed_endpoint_is_no_alert(lab, make_cgroup, run_daemon):
    """OpenVPN's redirect-gateway adds a /32 route to its server outside the
    tunnel: with endpoints = ["auto"] that server is the followed one."""
    cg = make_cgroup()
    d = run_daemon([{"cgroup": cg, "tunnels": [lab.wg_client], "netns": lab.client_ns, "endpoints": ["auto"]}])
    c, phy, via = lab.client_ns, lab.phy_client, lab.phy4_server
    for cmd in (f"ip -n {c} route add {via}/32 dev {phy}",               # the followed endpoint: quiet
                f"ip -n {c} route add 198.51.100.7/32 via {via} dev {phy}"):   # anywhere else: an alert
        subprocess.run(cmd.split(), check=True)
    d.wait_for("route_alert", route=f"198.51.100.7/32 via {via}")
    assert [e["route"] for e in d.named("route_alert")] == [f"198.51.100.7/32 via {via}"]


def test_one_shot_attach_reads_the_tunnel_once(lab, make_cgroup):
    cg = make_cgroup()
    out = ksbpf("attach", "--cgroup", cg, "--tunnel", lab.wg_client, "--netns", lab.client_path,
                "--endpoint", "auto", check=True).stdout
    assert f"auto: {lab.endpoint4} from {lab.wg_client} peer" in out, out
    assert "only the daemon" in out
    st = scope_status(cg)
    assert st["endpoints"] == [lab.endpoint4] and st["follow"] == ["auto"], st
    assert st["followed"][0]["source"] == lab.wg_client


# -- OpenVPN: its management interface ------------------------------------------------------
OVPN_PORT = 1194
OVPN_CIPHER = ("--cipher", "AES-256-CBC", "--data-ciphers", "AES-256-CBC", "--proto", "udp")


class OpenVPN:
    """Static-key OpenVPN (Debian's 2.6): a server in each server namespace, a
    client in the client namespace with two remotes and a management socket
    that asks which remote to use (management-query-remote)."""

    def __init__(self, lab, second, workdir):
        n = int(lab.tag, 16) % 250 + 1
        self.lab, self.second, self.dir = lab, second, str(workdir)
        self.key = os.path.join(self.dir, "static.key")
        self.sock = f"/tmp/ksbpf-ovpn-{lab.tag}.sock"
        self.tun = f"tvc{lab.tag}"
        self.tun_client, self.tun_server = f"10.70.{n}.2", f"10.70.{n}.1"
        self.pids: dict[str, str] = {}

    def start_server(self, name: str, ns: str, local: str) -> None:
        pid = os.path.join(self.dir, f"{name}.pid")
        _run("ip", "netns", "exec", ns, "openvpn", "--daemon", f"ovs{name}", "--writepid", pid,
             "--log", os.path.join(self.dir, f"{name}.log"), "--secret", self.key, *OVPN_CIPHER,
             "--dev", f"tvs{self.lab.tag}", "--dev-type", "tun", "--ifconfig", self.tun_server, self.tun_client,
             "--local", local, "--port", str(OVPN_PORT))
        self.pids[name] = pid

    def start(self) -> None:
        _run("openvpn", "--genkey", "secret", self.key)
        self.start_server("s1", self.lab.server_ns, self.lab.phy4_server)
        self.start_server("s2", self.second.ns, self.second.addr)
        pid = os.path.join(self.dir, "client.pid")
        _run("ip", "netns", "exec", self.lab.client_ns, "openvpn", "--daemon", "ovc", "--writepid", pid,
             "--log", os.path.join(self.dir, "client.log"), "--secret", self.key, *OVPN_CIPHER,
             "--dev", self.tun, "--dev-type", "tun", "--ifconfig", self.tun_client, self.tun_server,
             "--remote", self.lab.phy4_server, str(OVPN_PORT), "--remote", self.second.addr, str(OVPN_PORT),
             "--management", self.sock, "unix", "--management-query-remote",
             "--ping", "1", "--ping-restart", "3", "--connect-retry", "1")
        self.pids["client"] = pid

    def stop(self, name: str) -> None:
        path = self.pids.pop(name, None)
        if path and os.path.exists(path):
            with open(path) as f:
                pid = int(f.read().strip())
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                return
            wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10, f"openvpn {name} to exit")

    def stop_all(self) -> None:
        for name in list(self.pids):
            self.stop(name)
        for path in (self.sock,):
            if os.path.exists(path):
                os.unlink(path)

    def ping(self) -> bool:
        return subprocess.run(["ip", "netns", "exec", self.lab.client_ns, "ping", "-n", "-q", "-c1", "-W0.5",
                               self.tun_server], capture_output=True).returncode == 0

    def log(self, name: str) -> str:
        with open(os.path.join(self.dir, f"{name}.log")) as f:
            return f.read()


def test_openvpn_server_switch_is_followed(lab, second, tmp_path, request):
    ovpn = OpenVPN(lab, second, tmp_path)
    request.addfinalizer(ovpn.stop_all)
    ovpn.start()   # it waits for its management client before it sends anything
    path = tmp_path / "ksbpf.toml"
    path.write_text(toml_config([], f'[node]\nnetns = "{lab.client_path}"\ntunnels = ["{ovpn.tun}"]\n'
                                    f'endpoints = ["auto:{ovpn.sock}"]\n'))
    d = DaemonProcess(str(path))

    def stop_and_detach() -> None:
        d.stop()
        if os.path.exists(lab.client_path):
            node.detach(lab.client_path)
    request.addfinalizer(stop_and_detach)
    d.wait_for("ready")
    first = f"{lab.phy4_server}:{OVPN_PORT}/udp"
    # followed at once: by the attach, or by the daemon when OpenVPN asks
    wait_until(lambda: [f["endpoint"] for f in node_status(lab)["followed"]] == [first], 20, "the first remote followed")
    wait_until(ovpn.ping, 20, "a ping through the OpenVPN tunnel (first server)")
    text = ksbpf("status", check=True).stdout
    assert f"auto: {first} from {ovpn.sock}" in text, text

    s1 = Arrivals(lab.server_path, lab.phy_server)
    s2 = Arrivals(second.path, second.phy_server)
    try:
        # the first server goes away: the client restarts on its next remote
        mark = len(d.events)
        ovpn.stop("s1")
        ev = d.wait_for("endpoints_followed", after=mark, timeout=60)
        assert ev["added"] == [f"{second.addr}:{OVPN_PORT}/udp"] and ev["removed"] == [first], ev
        wait_until(ovpn.ping, 30, "a ping through the OpenVPN tunnel (second server)")
        assert f"Peer Connection Initiated with [AF_INET]{second.addr_client}:" in ovpn.log("s2"), ovpn.log("s2")

        # the old remote is closed, the new one open (control), nothing else reaches either
        before2 = s2.count(second.addr, OVPN_PORT)
        send_marked(lab, lab.phy4_server, OVPN_PORT)
        for dst in (lab.phy4_server, second.addr):
            send_marked(lab, dst, OVPN_PORT + 1)
        send_marked(lab, second.addr, OVPN_PORT)
        wait_until(lambda: s2.count(second.addr, OVPN_PORT) > before2, 10, "the control to the new server arriving")
        time.sleep(0.2)   # packets in flight (the control arrived after them)
        assert s1.count(lab.phy4_server, OVPN_PORT) == 0
        assert s1.count(lab.phy4_server, OVPN_PORT + 1) == 0 and s2.count(second.addr, OVPN_PORT + 1) == 0
    finally:
        s1.close()
        s2.close()

    # a daemon restarted with another policy (re-attached, make-before-break) while OpenVPN
    # is connected: OpenVPN names no remote until it reconnects; what was followed is kept
    d.stop()
    path.write_text(path.read_text() + "allow_lan = true\n")
    d = DaemonProcess(str(path))
    d.wait_for("ready")
    assert d.named("node_replaced"), d.lines
    # kept through the re-attach and the daemon's first look, while OpenVPN has said nothing:
    # never removed, not even for a moment
    assert not [e for e in d.events if e.get("event") == "endpoints_followed" and e["removed"]], d.lines
    st = node_status(lab)
    assert st["endpoints"] == [f"{second.addr}:{OVPN_PORT}/udp"] and st["options"]["allow_lan"], st
    wait_until(ovpn.ping, 10, "a ping through the OpenVPN tunnel after the re-attach")
