"""A lab of two network namespaces joined by a veth and a wireguard-go tunnel.

Used by `ksbpf demo` and by the integration tests.  Every packet stays inside
the lab: the client namespace (where filtered processes run) and the server
namespace (the far side) only know each other.

    client ns  ksbpf-<tag>-c              server ns  ksbpf-<tag>-s
      phc<tag>  198.18.N.1/24  ----veth----  phs<tag>  198.18.N.2/24
                2001:db8:N::1/64                       2001:db8:N::2/64
      wgc<tag>  100.64.N.1/24  ==tunnel===  wgs<tag>  100.64.N.2/24
                2001:db8:100:N::1/64                   2001:db8:100:N::2/64

The client is always .1 / ::1, the server .2 / ::2.  The tunnel runs over
IPv4 to the server's UDP port `wg_port`.

For node mode the client namespace plays a host with containers
(add_containers): a bridge br-<tag> (10.77.N.1/24, fd77:N::1/64) with
container namespaces <prefix>-<tag>-k1, -k2 behind veth<i><tag> (eth0
10.77.N.1i, fd77:N::1i inside), forwarding on, and their traffic
masqueraded out of every other interface -- the physical link included.

The server also holds an "internet" address on its loopback (net4_server
203.0.113.N, net6_server 2001:db8:ffff:N::80) that the client reaches
through its default routes, like a real VPN client: through the tunnel
(metric 10) while it exists, otherwise through the physical link (metric
100).  That fallback is where route-based kill switches leak.

Also here: `probe` (one connection attempt from a process in a cgroup and the
client namespace), `ProbeStream` (a steady flow of UDP datagrams), echo
servers in the server namespace, and `Sniffer` (counts plaintext packets from
the client that arrive over the physical link).
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Self

from ksbpf.errors import KsbpfError
from ksbpf.kernel import netns

WG_RUN_DIR = "/var/run/wireguard"
TUNNEL_TIMEOUT = 10.0


def _run(*cmd: str, input: str | None = None) -> str:
    """Run a command; its stdout, or KsbpfError with its stderr."""
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KsbpfError(f"lab: `{' '.join(cmd)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def _wait(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise KsbpfError(f"lab: timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Lab:
    """Two namespaces, a veth between them and (after tunnel_up) a tunnel."""

    tag: str                # 6 hex digits; every name and address derives from it
    prefix: str = "ksbpf"   # namespace names are <prefix>-<tag>-c / -s
    wg_port: int = 51820    # the server's WireGuard listen port
    client_ns: str = field(init=False)
    server_ns: str = field(init=False)
    phy_client: str = field(init=False)  # the client's "physical" link
    phy_server: str = field(init=False)
    wg_client: str = field(init=False)   # the tunnel the kill switch allows
    wg_server: str = field(init=False)
    phy4_client: str = field(init=False)
    phy4_server: str = field(init=False)
    phy6_client: str = field(init=False)
    phy6_server: str = field(init=False)
    tun4_client: str = field(init=False)
    tun4_server: str = field(init=False)
    tun6_client: str = field(init=False)
    tun6_server: str = field(init=False)
    net4_server: str = field(init=False)  # "the internet", behind the server
    net6_server: str = field(init=False)
    containers: list[str] = field(init=False, default_factory=list)   # container namespaces (add_containers)
    # the client's wireguard-go as a pod's VPN sidecar: in this cgroup, root with only CAP_NET_ADMIN
    client_cgroup: str | None = field(init=False, default=None)
    # the client's wireguard-go marks its own packets (wg set IFACE fwmark M), as a VPN client does for --vpn-mark
    client_fwmark: int | None = field(init=False, default=None)
    _wg: dict[str, subprocess.Popen] = field(init=False, repr=False, default_factory=dict)
    _keydir: str | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if len(self.tag) != 6 or any(c not in "0123456789abcdef" for c in self.tag):
            raise ValueError(f"lab tag must be 6 lower-case hex digits, not {self.tag!r}")
        t, n = self.tag, int(self.tag, 16) % 250 + 1
        self.client_ns, self.server_ns = f"{self.prefix}-{t}-c", f"{self.prefix}-{t}-s"
        self.phy_client, self.phy_server = f"phc{t}", f"phs{t}"
        self.wg_client, self.wg_server = f"wgc{t}", f"wgs{t}"
        self.phy4_client, self.phy4_server = f"198.18.{n}.1", f"198.18.{n}.2"
        self.phy6_client, self.phy6_server = f"2001:db8:{n}::1", f"2001:db8:{n}::2"
        self.tun4_client, self.tun4_server = f"100.64.{n}.1", f"100.64.{n}.2"
        self.tun6_client, self.tun6_server = f"2001:db8:100:{n}::1", f"2001:db8:100:{n}::2"
        self.net4_server, self.net6_server = f"203.0.113.{n}", f"2001:db8:ffff:{n}::80"

    @property
    def endpoint4(self) -> str:
        return f"{self.phy4_server}:{self.wg_port}/udp"

    @property
    def endpoint6(self) -> str:
        return f"[{self.phy6_server}]:{self.wg_port}/udp"

    @property
    def bridge(self) -> str:
        return f"br-{self.tag}"

    def container_addr(self, i: int, family: int = 4) -> str:
        """Container i's address (i from 1); family 4 or 6."""
        n = int(self.tag, 16) % 250 + 1
        return f"10.77.{n}.{10 + i}" if family == 4 else f"fd77:{n}::{10 + i}"

    @property
    def bridge4(self) -> str:
        return f"10.77.{int(self.tag, 16) % 250 + 1}.1"

    @property
    def bridge6(self) -> str:
        return f"fd77:{int(self.tag, 16) % 250 + 1}::1"

    @property
    def client_path(self) -> str:
        return os.path.join(netns.NETNS_RUN_DIR, self.client_ns)

    @property
    def server_path(self) -> str:
        return os.path.join(netns.NETNS_RUN_DIR, self.server_ns)

    # -- lifecycle ---------------------------------------------------------

    def create(self) -> None:
        """Namespaces, the veth pair, loopback, addresses.  Undone on failure."""
        c, s = self.client_ns, self.server_ns
        for name in (c, s):
            if os.path.exists(os.path.join(netns.NETNS_RUN_DIR, name)):
                raise KsbpfError(f"lab: namespace {name} already exists", "use another tag")
        try:
            _run("ip", "netns", "add", c)
            _run("ip", "netns", "add", s)
            # created inside the client namespace, peer moved straight into the server's
            _run("ip", "-n", c, "link", "add", self.phy_client, "type", "veth",
                 "peer", "name", self.phy_server, "netns", s)
            for ns, dev, a4, a6 in ((c, self.phy_client, self.phy4_client, self.phy6_client),
                                    (s, self.phy_server, self.phy4_server, self.phy6_server)):
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run("ip", "-n", ns, "addr", "add", f"{a4}/24", "dev", dev)
                _run("ip", "-n", ns, "addr", "add", f"{a6}/64", "dev", dev, "nodad")
                _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", s, "addr", "add", f"{self.net4_server}/32", "dev", "lo")
            _run("ip", "-n", s, "addr", "add", f"{self.net6_server}/128", "dev", "lo")
            for family, via in (("-4", self.phy4_server), ("-6", self.phy6_server)):
                _run("ip", "-n", c, family, "route", "add", "default", "via", via,
                     "dev", self.phy_client, "metric", "100")
            # Measured: without this wait the server ignores the client's first IPv6
            # neighbour solicitation and the first connection over phy6 takes 1 s more
            for ns, dev in ((c, self.phy_client), (s, self.phy_server)):
                _wait(partial(_is_up, ns, dev), 5, f"{dev} to be operationally up")
        except BaseException:
            self.destroy()
            raise

    def tunnel_up(self) -> None:
        """Start the tunnel (again, after tunnel_down) and wait until it carries
        IPv4 and IPv6 pings.  The server end keeps running across tunnel_down."""
        if self._keydir is None:
            self._keydir = tempfile.mkdtemp(prefix=f"ksbpf-lab-{self.tag}-")
            for side in ("client", "server"):
                key = _run("wg", "genkey")
                with open(os.path.join(self._keydir, side), "w") as f:
                    f.write(key)
                with open(os.path.join(self._keydir, f"{side}.pub"), "w") as f:
                    f.write(_run("wg", "pubkey", input=key))
        if not self._running(self.wg_server):
            self._start_wg(self.server_ns, self.wg_server, self.tun4_server, self.tun6_server,
                           "server", "client", ("listen-port", str(self.wg_port)), ())
        if not self._running(self.wg_client):
            self._start_wg(self.client_ns, self.wg_client, self.tun4_client, self.tun6_client,
                           "client", "server",
                           ("fwmark", str(self.client_fwmark)) if self.client_fwmark else (),
                           ("endpoint", f"{self.phy4_server}:{self.wg_port}",
                            "persistent-keepalive", "1"))
            for family in ("-4", "-6"):
                _run("ip", "-n", self.client_ns, family, "route", "add", "default",
                     "dev", self.wg_client, "metric", "10")
        for dst in (self.tun4_server, self.tun6_server):
            _wait(partial(self._ping, dst), TUNNEL_TIMEOUT,
                  f"a ping to {dst} through {self.wg_client}")

    def add_containers(self, count: int = 2) -> list[str]:
        """Container namespaces behind a bridge in the client namespace, which
        forwards and masquerades their traffic; returns their names."""
        c, n = self.client_ns, int(self.tag, 16) % 250 + 1
        _run("ip", "-n", c, "link", "add", self.bridge, "type", "bridge")
        _run("ip", "-n", c, "addr", "add", f"{self.bridge4}/24", "dev", self.bridge)
        _run("ip", "-n", c, "addr", "add", f"{self.bridge6}/64", "dev", self.bridge, "nodad")
        _run("ip", "-n", c, "link", "set", self.bridge, "up")
        for i in range(1, count + 1):
            name = f"{self.prefix}-{self.tag}-k{i}"
            _run("ip", "netns", "add", name)
            self.containers.append(name)
            host_end = f"veth{i}{self.tag}"
            _run("ip", "-n", c, "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", name)
            _run("ip", "-n", c, "link", "set", host_end, "master", self.bridge, "up")
            _run("ip", "-n", name, "link", "set", "lo", "up")
            _run("ip", "-n", name, "addr", "add", f"{self.container_addr(i)}/24", "dev", "eth0")
            _run("ip", "-n", name, "addr", "add", f"{self.container_addr(i, 6)}/64", "dev", "eth0", "nodad")
            _run("ip", "-n", name, "link", "set", "eth0", "up")
            _run("ip", "-n", name, "route", "add", "default", "via", self.bridge4)
            _run("ip", "-n", name, "-6", "route", "add", "default", "via", self.bridge6)
        _run("ip", "netns", "exec", c, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
             "net.ipv6.conf.all.forwarding=1")
        subprocess.run(["ip", "netns", "exec", c, "nft", "-f", "-"], check=True, text=True, input=f"""
            table inet ksbpf_lab {{
              chain post {{
                type nat hook postrouting priority 100;
                oifname != "{self.bridge}" ip saddr 10.77.{n}.0/24 masquerade
                oifname != "{self.bridge}" ip6 saddr fd77:{n}::/64 masquerade
              }}
            }}""")
        for name in self.containers:
            _wait(partial(_is_up, name, "eth0"), 5, f"eth0 of {name} to be operationally up")
        return list(self.containers)

    def tunnel_down(self) -> None:
        """Remove the client's tunnel interface (its wireguard-go exits with it)."""
        proc = self._wg.pop(self.wg_client, None)
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=5)
        if not self._client_link_gone():
            _run("ip", "-n", self.client_ns, "link", "del", self.wg_client)
        _wait(self._client_link_gone, 5, f"{self.wg_client} to disappear")

    def destroy(self) -> None:
        """Remove everything the lab made.  Safe to call more than once."""
        names = [n for n in (self.client_ns, self.server_ns, *self.containers)
                 if os.path.exists(os.path.join(netns.NETNS_RUN_DIR, n))]
        pids = {int(p) for n in names
                for p in subprocess.run(["ip", "netns", "pids", n], capture_output=True,
                                        text=True).stdout.split()}
        _kill(pids | {proc.pid for proc in self._wg.values()})
        for proc in self._wg.values():
            proc.wait()
        self._wg.clear()
        for n in names:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        self.containers.clear()
        for ifname in (self.wg_client, self.wg_server):
            try:
                os.unlink(os.path.join(WG_RUN_DIR, f"{ifname}.sock"))
            except FileNotFoundError:
                pass
        if self._keydir is not None:
            shutil.rmtree(self._keydir, ignore_errors=True)
            self._keydir = None

    def __enter__(self) -> Lab:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # -- helpers -----------------------------------------------------------

    def _running(self, ifname: str) -> bool:
        proc = self._wg.get(ifname)
        return proc is not None and proc.poll() is None

    def _start_wg(self, ns: str, ifname: str, addr4: str, addr6: str, own: str, peer: str,
                  own_opts: tuple[str, ...], peer_opts: tuple[str, ...]) -> None:
        """Run wireguard-go for `ifname` in `ns`, configure it, address it, bring it up."""
        sock = os.path.join(WG_RUN_DIR, f"{ifname}.sock")
        # WG_PROCESS_FOREGROUND keeps it from forking, so proc.pid is wireguard-go itself
        argv = ["ip", "netns", "exec", ns, "wireguard-go", ifname]
        if ns == self.client_ns and self.client_cgroup:
            net_admin = "-all,+net_admin"
            argv = ["sh", "-c", f'echo $$ > {self.client_cgroup}/cgroup.procs && exec "$@"', "sh", *argv[:4],
                    "setpriv", f"--inh-caps={net_admin}", f"--ambient-caps={net_admin}",
                    f"--bounding-set={net_admin}", *argv[4:]]
        proc = subprocess.Popen(argv,
                                env={**os.environ, "WG_PROCESS_FOREGROUND": "1"},
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        self._wg[ifname] = proc

        def ready() -> bool:
            """The socket answers: it exists between wireguard-go's bind() and
            listen() too, and a `wg` refused there falls back to kernel
            WireGuard ("Protocol not supported")."""
            if proc.poll() is not None:
                raise KsbpfError(f"lab: wireguard-go {ifname} exited with status {proc.returncode}")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe_sock:
                try:
                    probe_sock.connect(sock)
                except OSError:
                    return False
            return True

        _wait(ready, 10, f"wireguard-go to listen on {sock}")
        assert self._keydir is not None
        with open(os.path.join(self._keydir, f"{peer}.pub")) as f:
            peer_pub = f.read().strip()
        _run("ip", "netns", "exec", ns, "wg", "set", ifname,
             "private-key", os.path.join(self._keydir, own), *own_opts,
             "peer", peer_pub, "allowed-ips", "0.0.0.0/0,::/0", *peer_opts)
        _run("ip", "-n", ns, "addr", "add", f"{addr4}/24", "dev", ifname)
        _run("ip", "-n", ns, "addr", "add", f"{addr6}/64", "dev", ifname, "nodad")
        _run("ip", "-n", ns, "link", "set", ifname, "up")

    def _client_link_gone(self) -> bool:
        return netns.ifindex(netns.resolve(self.client_path), self.wg_client) is None

    def _ping(self, dst: str) -> bool:
        return subprocess.run(["ip", "netns", "exec", self.client_ns, "ping", "-n", "-q",
                               "-c1", "-W0.2", dst], capture_output=True).returncode == 0


def new_lab(prefix: str = "ksbpf") -> Lab:
    """A Lab with a random tag that no existing namespace or WireGuard socket uses."""
    while True:
        lab = Lab(secrets.token_hex(3), prefix)
        taken = [os.path.join(netns.NETNS_RUN_DIR, lab.client_ns),
                 os.path.join(netns.NETNS_RUN_DIR, lab.server_ns),
                 os.path.join(WG_RUN_DIR, f"{lab.wg_client}.sock"),
                 os.path.join(WG_RUN_DIR, f"{lab.wg_server}.sock")]
        if not any(os.path.exists(p) for p in taken):
            return lab


def _is_up(ns: str, dev: str) -> bool:
    link = json.loads(_run("ip", "-n", ns, "-j", "link", "show", "dev", dev))[0]
    return link["operstate"] == "UP"


def _alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _kill(pids: set[int], timeout: float = 3.0) -> None:
    """SIGTERM the processes, then SIGKILL whatever is still alive after `timeout`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            if _alive(p):
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
        try:
            _wait(lambda: not any(_alive(p) for p in pids), timeout, "lab processes to exit")
            return
        except KsbpfError:
            if sig == signal.SIGKILL:
                raise


# -- traffic from the client ------------------------------------------------

def _in_cgroup_and_ns(ns: Lab | str, cgroup_path: str | None, *cmd: str) -> list[str]:
    """argv that runs cmd in the cgroup (joined first: `ip netns exec` hides
    cgroupfs) and then in the client namespace of the lab (or the named one)."""
    name = ns.client_ns if isinstance(ns, Lab) else ns
    argv = ["ip", "netns", "exec", name, *cmd]
    if cgroup_path is None:
        return argv
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup_path, *argv]


def _probe_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "ksbpf.lab.probe", *args]


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    error: str | None


def probe(ns: Lab | str, cgroup_path: str | None, kind: str, dst: str,
          port: int = 0, timeout: float = 2.0) -> ProbeResult:
    """One tcp/udp/icmp attempt from a fresh process in the cgroup and namespace.

    ok=False means the attempt failed (EPERM, timeout, refused...); a probe
    that could not even run raises KsbpfError, so it never passes as "blocked".
    """
    if kind not in ("tcp", "udp", "icmp"):
        raise ValueError(f"probe kind must be tcp, udp or icmp, not {kind!r}")
    argv = _in_cgroup_and_ns(ns, cgroup_path, *_probe_argv(
        kind, dst, str(port), "--timeout", str(timeout)))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10)
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        return ProbeResult(bool(out["ok"]), out["error"])
    except (IndexError, ValueError, KeyError):
        raise KsbpfError(f"lab: probe {' '.join(argv)} did not run (status {proc.returncode}): "
                         f"{proc.stderr.strip()}") from None


@dataclass(frozen=True)
class StreamResult:
    attempted: int
    sent: int
    blocked: int              # sends that failed with EPERM
    errors: dict[str, int]    # other failed sends, by errno name


class ProbeStream:
    """A process in the cgroup and namespace sending a UDP datagram to (dst, port)
    every `interval_ms` until stop(); `with` waits until it is sending."""

    def __init__(self, ns: Lab | str, cgroup_path: str | None, dst: str, port: int,
                 interval_ms: float = 2.0):
        self._argv = _in_cgroup_and_ns(ns, cgroup_path, *_probe_argv(
            "stream", dst, str(port), "--interval-ms", str(interval_ms)))
        self._proc: subprocess.Popen | None = None
        self.result: StreamResult | None = None

    def start(self) -> None:
        self._proc = proc = subprocess.Popen(self._argv, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        if '"ready"' not in (proc.stdout.readline() if ready else ""):
            proc.kill()
            _, err = proc.communicate()
            raise KsbpfError(f"lab: probe stream {' '.join(self._argv)} did not start: "
                             f"{err.strip()}")

    def stop(self) -> StreamResult:
        if self.result is not None:
            return self.result
        proc = self._proc
        assert proc is not None, "stop() before start()"
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        try:
            self.result = StreamResult(**json.loads(out.strip().splitlines()[-1]))
        except (IndexError, ValueError, TypeError):
            raise KsbpfError(f"lab: probe stream gave no counts (status {proc.returncode}): "
                             f"{err.strip()}") from None
        return self.result

    def __enter__(self) -> ProbeStream:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the far side -----------------------------------------------------------

class _ServerSocket:
    """A socket made in the server namespace, read on a background thread:
    subclasses say what to do when it is readable."""

    def __init__(self, lab: Lab, make: Callable[[], socket.socket]):
        self._sock = netns.run_in(lab.server_path, make)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if select.select([self._sock], [], [], 0.05)[0]:
                self._readable()

    def _readable(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Last look at the socket, after the thread stopped and before it closes."""

    def _close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self._finish()
        self._sock.close()


class _EchoServer(_ServerSocket):
    """An echo server in the server namespace."""

    def __init__(self, lab: Lab, kind: int, host: str, port: int):
        def make() -> socket.socket:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(family, kind)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            if kind == socket.SOCK_STREAM:
                s.listen(16)
            return s

        super().__init__(lab, make)
        self.port: int = self._sock.getsockname()[1]

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TcpEchoServer(_EchoServer):
    """Echoes every TCP connection back, in the server namespace.  The default
    host "::" takes IPv4 and IPv6 on every address (tunnel and phy)."""

    def __init__(self, lab: Lab, port: int = 0, host: str = "::"):
        self.connections = 0
        super().__init__(lab, socket.SOCK_STREAM, host, port)

    def _readable(self) -> None:
        conn, _ = self._sock.accept()
        self.connections += 1
        threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass


IP_PKTINFO = 8  # not exported by Python's socket module


class UdpEchoServer(_EchoServer):
    """Echoes every UDP datagram back, in the server namespace; counts them.
    Replies come from the address the datagram was sent to (the client's
    socket is connected), whichever of the server's addresses that is."""

    def __init__(self, lab: Lab, port: int = 0, host: str = "::"):
        self.received = 0
        super().__init__(lab, socket.SOCK_DGRAM, host, port)
        self._sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        if self._sock.family == socket.AF_INET6:
            self._sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)

    def _readable(self) -> None:
        data, ancillary, _flags, peer = self._sock.recvmsg(65535, 256)
        self.received += 1
        reply = []
        for level, kind, cdata in ancillary:
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                reply = [(level, kind, cdata[:16] + b"\0\0\0\0")]
            elif level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                local4 = cdata[8:12]  # in_pktinfo.ipi_addr: the datagram's destination
                if self._sock.family == socket.AF_INET6:
                    reply = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO,
                              b"\0" * 10 + b"\xff\xff" + local4 + b"\0\0\0\0")]
                else:
                    reply = [(level, kind, b"\0\0\0\0" + local4 + b"\0\0\0\0")]
        try:
            self._sock.sendmsg([data], reply, 0, peer)
        except OSError:
            pass


# -- what leaks over the physical link --------------------------------------

ETH_P_ALL, ETH_P_IP, ETH_P_IPV6 = 0x0003, 0x0800, 0x86DD
SOL_PACKET, PACKET_STATISTICS, PACKET_OUTGOING = 263, 6, 4
SO_RCVBUFFORCE = 33
IPV6_EXT_HEADERS = {0, 43, 60}   # hop-by-hop, routing, destination options
IPV6_FRAGMENT = 44
ICMPV6_LINK_CONTROL = {130, 131, 132, 133, 134, 135, 136, 137, 143}  # MLD, ND
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}


@dataclass(frozen=True)
class Packet:
    proto: str
    src: str
    dst: str
    dport: int | None


@dataclass(frozen=True)
class _Parsed:
    packet: Packet
    sport: int | None
    icmp_type: int | None            # ICMP or ICMPv6 type
    quoted_ports: tuple[int, int] | None  # ports of the packet an ICMP error quotes


def _l4(proto: int, off: int, data: bytes, first_fragment: bool):
    """(sport, dport, icmp type) at offset off."""
    if not first_fragment:
        return None, None, None
    if proto in (6, 17) and len(data) >= off + 4:
        sport, dport = struct.unpack("!HH", data[off:off + 4])
        return sport, dport, None
    if proto in (1, 58) and len(data) > off:
        return None, None, data[off]
    return None, None, None


def _ip(ethertype: int, data: bytes):
    """(family, proto, l4 offset, src, dst, first fragment) of an IP packet, else None."""
    if ethertype == ETH_P_IP and len(data) >= 20:
        first = struct.unpack("!H", data[6:8])[0] & 0x1FFF == 0
        return socket.AF_INET, data[9], (data[0] & 0x0F) * 4, data[12:16], data[16:20], first
    if ethertype == ETH_P_IPV6 and len(data) >= 40:
        proto, off, first = data[6], 40, True
        while proto in IPV6_EXT_HEADERS | {IPV6_FRAGMENT} and len(data) >= off + 8:
            if proto == IPV6_FRAGMENT:
                first = struct.unpack("!H", data[off + 2:off + 4])[0] & 0xFFF8 == 0
                proto, off = data[off], off + 8
            else:
                proto, off = data[off], off + (data[off + 1] + 1) * 8
        return socket.AF_INET6, proto, off, data[8:24], data[24:40], first
    return None


def _parse(ethertype: int, data: bytes) -> _Parsed | None:
    ip = _ip(ethertype, data)
    if ip is None:
        return None
    family, proto, off, src, dst, first = ip
    sport, dport, icmp_type = _l4(proto, off, data, first)
    quoted = None
    if (proto, icmp_type) in ((1, 3), (1, 11), (58, 1), (58, 3)):  # unreachable, time exceeded
        inner = _ip(ethertype, data[off + 8:])
        if inner is not None:
            q_sport, q_dport, _ = _l4(inner[1], inner[2], data[off + 8:], inner[5])
            if q_sport is not None and q_dport is not None:
                quoted = (q_sport, q_dport)
    packet = Packet(PROTO_NAMES.get(proto, str(proto)), socket.inet_ntop(family, src),
                    socket.inet_ntop(family, dst), dport)
    return _Parsed(packet, sport, icmp_type, quoted)


class Sniffer(_ServerSocket):
    """Counts plaintext packets from the client arriving on the server's phy link.

    A real capture (AF_PACKET on phy_server, in the server namespace) of IPv4
    and IPv6 packets whose source is one of the client's phy addresses.  Not
    counted: the WireGuard transport (UDP from or to wg_port; those are
    counted in .wireguard instead, as proof the capture sees traffic, and so are
    the ICMP errors the client kernel sends back about WireGuard packets) and
    ICMPv6 neighbour discovery / MLD, which the kernel sends on its own.
    Results are final after the `with` block (or stop()).
    """

    def __init__(self, lab: Lab):
        self._wg_port = lab.wg_port
        self._client = {lab.phy4_client, lab.phy6_client}
        self.count = 0
        self.wireguard = 0
        self.dropped = 0          # packets the kernel could not queue to us
        self.packets: list[Packet] = []

        def make() -> socket.socket:
            # protocol 0 until bound: no packets from other interfaces sneak in
            s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
            s.bind((lab.phy_server, ETH_P_ALL))
            return s

        super().__init__(lab, make)

    def _readable(self) -> None:
        while True:
            try:
                data, addr = self._sock.recvfrom(256, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            if addr[2] != PACKET_OUTGOING:
                self._count(addr[1], data)

    def _count(self, ethertype: int, data: bytes) -> None:
        parsed = _parse(ethertype, data)
        if parsed is None:
            return
        packet = parsed.packet
        if packet.src not in self._client or (packet.proto == "icmpv6" and parsed.icmp_type in ICMPV6_LINK_CONTROL):
            return
        wg_ports = (parsed.sport, packet.dport) if packet.proto == "udp" else parsed.quoted_ports or ()
        if self._wg_port in wg_ports:
            self.wireguard += 1
            return
        self.count += 1
        self.packets.append(packet)

    def _finish(self) -> None:
        self._readable()  # what arrived since the last read
        stats = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        self.dropped = struct.unpack("II", stats)[1]

    def stop(self, settle: float = 0.1) -> None:
        """Wait `settle` s for packets in flight, read the rest, close."""
        if not self._stop.is_set():
            time.sleep(settle)
        self._close()

    def __enter__(self) -> Sniffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
