"""`ksbpf verify` (zero traffic): a clean scope is reported clean, and each
planted problem is found -- the program detached by hand, a map entry
removed, a tunnel entry for a vanished interface, a socket opened before
joining, a CAP_NET_RAW process, a hijacking route; --fix closes stray TCP and
UDP sockets; a verify run leaves the scope's counters and events unchanged.

Each test builds its own namespace (a tun device as the tunnel, a veth as the
"physical" link) and cgroup, with unique names, removed by finalizers."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys

import pytest
from helpers import ksbpf, scope_status

from ksbpf.kernel import bpf, libbpf, netns, nf, pins
from ksbpf.scopes import cgroups

pytestmark = pytest.mark.root

EP = "203.0.113.5:51820/udp"

# A process that opens a TCP connection (to its own listener) and a connected
# UDP socket, says so, and waits: the test moves it into the scope afterwards.
STRAY = """
import socket, sys, time
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen()
c = socket.create_connection(l.getsockname()); a, _ = l.accept(); l.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.connect(("127.0.0.1", 9))
print("ready", flush=True)
sys.stdin.readline()
for name, s in (("tcp", c), ("udp", u)):   # the pending error, without sending (a send would bind a UDP socket again)
    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    print(name, "closed" if err in (103, 104) else "open", err, flush=True)   # ECONNABORTED, or ECONNRESET by its closed peer
sys.stdin.readline()
u.sendto(b"x", ("127.0.0.1", 9))   # an aborted UDP socket is still usable: it binds again
print("sent", flush=True)
time.sleep(60)
"""


class Scope:
    """A namespace (lo, eth0 10.77.0.1/24 up, tun0 the tunnel) and a protected cgroup."""

    def __init__(self, tag: str, cg: str):
        self.ns = f"ksbpf-vf{tag}"
        self.cg = cg
        self.procs: list[subprocess.Popen] = []
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        self.ip("link", "set", "lo", "up")
        self.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        self.ip("addr", "add", "10.77.0.1/24", "dev", "eth0")
        self.ip("link", "set", "eth0", "up")
        self.ip("link", "set", "eth1", "up")
        self.ip("tuntap", "add", "mode", "tun", "name", "tun0")
        ksbpf("attach", "--cgroup", cg, "--tunnel", "tun0", "--netns", self.ns, "--endpoint", EP, check=True)
        self.pin_dir = pins.scope_dir(os.stat(cg).st_ino)

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.ns, *args], check=True, capture_output=True)

    def spawn(self, *argv: str, raw: bool = False, stdin=subprocess.DEVNULL) -> subprocess.Popen:
        """A process in the namespace, moved into the scope after it started;
        without CAP_NET_RAW unless raw."""
        cmd = ["ip", "netns", "exec", self.ns, *argv]
        if not raw:
            cmd = ["setpriv", "--bounding-set", "-net_raw", *cmd]
        proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def join(self, proc: subprocess.Popen) -> None:
        with open(os.path.join(self.cg, "cgroup.procs"), "w") as f:
            f.write(str(proc.pid))

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


@pytest.fixture
def scope(tag, make_cgroup):
    sc = Scope(tag, make_cgroup())
    sleeper = sc.spawn("sleep", "300")
    sc.join(sleeper)
    yield sc
    sc.close()


def verify(sc: Scope, *args: str) -> tuple[int, dict[str, list[dict]]]:
    """(exit status, findings by check) of `ksbpf verify --scope ... --json`."""
    proc = ksbpf("verify", "--scope", sc.cg, "--json", *args)
    out = json.loads(proc.stdout)
    by_check: dict[str, list[dict]] = {}
    for f in out["findings"]:
        assert f["scope"] == sc.cg
        by_check.setdefault(f["check"], []).append(f)
    assert out["ok"] == (proc.returncode == 0), proc.stderr
    return proc.returncode, by_check


def verdicts(by_check) -> dict[str, set[str]]:
    return {c: {f["verdict"] for f in fs} for c, fs in by_check.items()}


CHECKS = {"attached", "inherited", "pins", "tunnels", "policy", "routes", "ipv6", "sockets", "raw", "tun"}
if nf.supported():
    CHECKS.add("tunnel_source")   # the netfilter hook on the tunnel's source addresses


def test_clean_scope_is_clean(scope):
    rc, found = verify(scope, "--strict")
    assert rc == 0, found
    assert set(found) == CHECKS
    assert all(v == {"ok"} for v in verdicts(found).values()), found
    detail = found["policy"][0]["detail"]
    assert "crafted packets x 4 interface(s)" in detail
    assert all(name in detail for name in ("lo", "eth0", "eth1", "tun0"))
    text = ksbpf("verify", "--scope", scope.cg)
    assert text.returncode == 0
    assert text.stdout.splitlines()[0].startswith("this kernel (")   # what it can do, and what ksbpf does instead
    assert text.stdout.splitlines()[1].split() == ["SCOPE", "CHECK", "VERDICT", "FINDING", "/", "WHAT", "TO", "DO"]
    assert f"{len(CHECKS)} ok, 0 fixed, 0 warning(s), 0 failure(s)" in text.stdout


def detach_by_hand(pin_dir: str, cg: str) -> None:
    """What `bpftool cgroup detach` does: the scope's pinned program off its cgroup."""
    fd = libbpf.obj_get(os.path.join(pin_dir, "prog"))
    try:
        with cgroups._open_dir(cg) as cg_fd:
            libbpf.prog_detach(fd, cg_fd, cgroups.EGRESS)
    finally:
        os.close(fd)


def test_program_detached_by_hand(scope):
    detach_by_hand(scope.pin_dir, scope.cg)
    rc, found = verify(scope)
    assert rc == 1
    assert verdicts(found)["attached"] == {"fail"}
    assert "NOT attached" in found["attached"][0]["detail"]
    assert found["attached"][0]["fix"].startswith(f"ksbpf attach --cgroup {scope.cg} --tunnel tun0")
    assert verdicts(found)["inherited"] == {"fail"}


def test_descendant_sees_the_program(scope):
    os.mkdir(os.path.join(scope.cg, "child"))
    rc, found = verify(scope)
    assert rc == 0
    assert "its 1 descendant(s)" in found["inherited"][0]["detail"]


def test_tunnel_map_entry_removed(scope):
    ns = netns.resolve(scope.ns)
    with bpf.ScopeMaps.from_pins(scope.pin_dir) as maps:
        maps.remove_tunnel(netns.cookie(ns), netns.ifindex(ns, "tun0"))
    rc, found = verify(scope)
    assert rc == 1
    assert verdicts(found)["tunnels"] == {"warn"}          # fail-closed: blocked, not leaking ...
    assert verdicts(found)["policy"] == {"fail"}           # ... but not what the policy says
    assert "via tun0: the kernel drops it" in found["policy"][0]["detail"]


def test_tunnel_filter_entry_removed(scope):
    """The ifindex filter in front of the tunnel hash zeroed: only the packets show it."""
    ns = netns.resolve(scope.ns)
    with bpf.ScopeMaps.from_pins(scope.pin_dir) as maps:
        libbpf.map_update(maps.fds["tunnel_ifindex"], netns.ifindex(ns, "tun0").to_bytes(4, "little"), bytes(8))   # a __u64
    rc, found = verify(scope)
    assert rc == 1 and verdicts(found)["tunnels"] == {"ok"} and verdicts(found)["policy"] == {"fail"}


def test_tunnel_entry_for_a_vanished_interface(scope):
    ns = netns.resolve(scope.ns)
    with bpf.ScopeMaps.from_pins(scope.pin_dir) as maps:
        maps.add_tunnel(netns.cookie(ns), 3999, 1)
    rc, found = verify(scope)
    assert rc == 1
    assert verdicts(found)["tunnels"] == {"fail"}
    assert "ifindex 3999" in found["tunnels"][0]["detail"]


def test_socket_opened_before_joining_and_fix(scope):
    proc = scope.spawn(sys.executable, "-c", STRAY, stdin=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "ready"
    scope.join(proc)
    rc, found = verify(scope)
    assert rc == 0   # a warning
    assert verdicts(found)["sockets"] == {"warn"}
    detail = found["sockets"][0]["detail"]
    assert f"pid {proc.pid} (python" in detail and "tcp 127.0.0.1" in detail and "udp 127.0.0.1" in detail
    assert ksbpf("verify", "--scope", scope.cg, "--strict").returncode == 1
    rc, found = verify(scope, "--fix")
    assert rc == 0 and verdicts(found)["sockets"] == {"fixed"}, found["sockets"]
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert select.select([proc.stdout], [], [], 10)[0]   # it prints both lines at once, then sleeps
    said = dict(proc.stdout.readline().split()[:2] for _ in range(2))
    assert said == {"tcp": "closed", "udp": "closed"}
    rc, found = verify(scope, "--strict")
    assert rc == 0 and verdicts(found)["sockets"] == {"ok"}, [f for fs in found.values() for f in fs if f["verdict"] != "ok"]
    # SOCK_DESTROY aborts a UDP socket but cannot take it from its process: used again, it is found again
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "sent"
    _, found = verify(scope)
    assert verdicts(found)["sockets"] == {"warn"} and "udp 0.0.0.0:" in found["sockets"][0]["detail"]


def test_cap_net_raw_process(scope):
    proc = scope.spawn("sleep", "300", raw=True)
    scope.join(proc)
    rc, found = verify(scope)
    assert rc == 0 and verdicts(found)["raw"] == {"warn"}
    assert f"pid {proc.pid} (sleep) has CAP_NET_RAW" in found["raw"][0]["detail"]
    assert ksbpf("verify", "--scope", scope.cg, "--strict").returncode == 1


def test_hijacking_route(scope):
    scope.ip("route", "add", "198.51.100.0/24", "dev", "eth0")
    rc, found = verify(scope)
    assert rc == 0 and verdicts(found)["routes"] == {"warn"}
    assert "198.51.100.0/24 dev eth0" in found["routes"][0]["detail"]
    scope.ip("route", "add", "203.0.113.5/32", "dev", "eth0")     # the endpoint's host route: fine
    scope.ip("route", "add", "10.9.0.0/16", "dev", "eth0")        # a private LAN: fine
    _, found = verify(scope)
    assert found["routes"][0]["detail"].count(" dev ") == 1


def test_ipv6_global_address_outside_the_tunnel(scope):
    scope.ip("addr", "add", "2001:db8:77::1/64", "dev", "eth0", "nodad")
    rc, found = verify(scope)
    assert rc == 0 and verdicts(found)["ipv6"] == {"warn"}
    assert "eth0 (2001:db8:77::1)" in found["ipv6"][0]["detail"]
    scope.ip("addr", "add", "2001:db8:78::1/64", "dev", "tun0", "nodad")
    _, found = verify(scope)
    assert verdicts(found)["ipv6"] == {"ok"}


def test_verify_leaves_counters_and_events_unchanged(scope):
    """Every crafted packet runs through the attached program, most of them
    drops: none is counted, none reaches the event stream (the nonce)."""
    before = scope_status(scope.cg)
    rc, found = verify(scope)
    assert rc == 0 and "crafted packets x 4" in found["policy"][0]["detail"]
    after = scope_status(scope.cg)
    assert after["counters"] == before["counters"]
    assert after["events"] == before["events"]
    assert after["dropped_packets"] == 0


def test_nonce_is_root_only(scope):
    """The pin that holds the nonce is readable by root only."""
    st = os.stat(os.path.join(scope.pin_dir, "verify_nonce"))
    assert st.st_uid == 0 and st.st_mode & 0o077 == 0


def test_unknown_scope_is_one_line(tmp_path):
    proc = ksbpf("verify", "--scope", str(tmp_path / "nope"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "is not a protected scope" in proc.stderr
