"""Real container runtimes for the container tests: Debian's Podman and Docker
with runc, and a far side the containers reach only through test-made paths.

- Each runtime runs inside a private mount namespace whose /sys/fs/cgroup is
  the cgroup2 hierarchy (on hybrid hosts the host's is elsewhere), with its
  storage, run directories, socket and bridge of its own under a work
  directory: nothing of the machine's own container set-up is used or changed.
- Images are imported from a root filesystem of busybox-static (no registry),
  with wireguard-go and the two libraries it links, so that a VPN container
  runs a real WireGuard tunnel.
- The far side is a network namespace joined to the host by a veth pair; its
  addresses (TEST-NET, and one private "LAN" address) are routed by /32 routes
  into that veth, and FarSide.check_routes() proves it before any packet is
  sent.  Sniffers count what arrives there: outside the tunnel (on the veth)
  and through it (on the far end of the tunnel), by destination and port.
- close() removes containers, images, the daemon, bridges, the firewall rules
  and chains the runtime added, and restores ip_forward as found.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass, field

from ksbpf.errors import KsbpfError
from ksbpf.kernel import cgroup, netns

WIREGUARD_GO = "/usr/bin/wireguard-go"
# what the runtimes create outside their work directory (state, shim sockets, a blob cache):
# removed at the end unless it existed before
RUNTIME_PATHS = ("/run/containers", "/run/libpod", "/run/docker", "/run/containerd", "/var/lib/containers")
BUSYBOX = "/bin/busybox"
WG_PORT = 51820


LOCK_FILE = "/run/ksbpf-container-tests.lock"


@contextlib.contextmanager
def exclusive(lock_file: str = LOCK_FILE):
    """One container test run at a time on the machine: the runtimes share
    the host's firewall chains, forwarding switch and state directories, which
    each run snapshots and restores.  Yields the seconds it waited."""
    with open(lock_file, "a") as f:
        t0 = time.monotonic()
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield time.monotonic() - t0
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(*cmd: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise KsbpfError(f"containers: {' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc


def _wait(cond, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise KsbpfError(f"containers: timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _libraries(binary: str) -> list[str]:
    """The shared libraries (and the loader) a binary needs, from ldd."""
    out = _run("ldd", binary).stdout
    return re.findall(r"(/\S+)\s+\(0x", out)


def image_tar(workdir: str) -> str:
    """A root filesystem of busybox-static (every applet linked), plus
    wireguard-go and its libraries, as a tar file."""
    root = os.path.join(workdir, "rootfs")
    for d in ("bin", "dev", "proc", "sys", "tmp", "etc", "var/run", "run"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    shutil.copy2(BUSYBOX, os.path.join(root, "bin/busybox"))
    for applet in _run(BUSYBOX, "--list").stdout.split():
        if applet != "busybox" and not os.path.lexists(os.path.join(root, "bin", applet)):
            os.symlink("busybox", os.path.join(root, "bin", applet))
    shutil.copy2(WIREGUARD_GO, os.path.join(root, "bin/wireguard-go"))
    for lib in _libraries(WIREGUARD_GO):
        dest = os.path.join(root, lib.lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(os.path.realpath(lib), dest)
    path = os.path.join(workdir, "image.tar")
    with tarfile.open(path, "w") as tar:
        tar.add(root, arcname=".")
    return path


# --- the host's firewall and forwarding, as found ------------------------------------

class HostNetState:
    """What a runtime changes in the host's namespace: iptables rules and
    chains, ip_forward.  restore() removes the rules and chains added since
    the snapshot that belong to the runtimes (NETAVARK*/DOCKER* chains, rules
    naming our bridges or subnets or jumping to such a chain) and sets the
    forwarding switches and chain policies back."""

    SYSCTLS = ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding")

    def __init__(self, markers: list[str]):
        self.markers = markers
        self.saved = {cmd: self._save(cmd) for cmd in ("iptables", "ip6tables")}
        self.sysctls = {}
        for path in self.SYSCTLS:
            with open(path) as f:
                self.sysctls[path] = f.read().strip()

    @staticmethod
    def _save(cmd: str) -> dict[str, tuple[dict[str, str], list[str]]]:
        """table -> ({chain: policy}, [rule lines])"""
        out, table = {}, None
        for line in _run(f"{cmd}-save").stdout.splitlines():
            if line.startswith("*"):
                table = line[1:]
                out[table] = ({}, [])
            elif line.startswith(":") and table:
                name, policy = line[1:].split()[:2]
                out[table][0][name] = policy
            elif line.startswith("-A") and table:
                out[table][1].append(line)
        return out

    def _ours(self, chain: str) -> bool:
        return chain.startswith(("NETAVARK", "DOCKER"))

    def restore(self) -> list[str]:
        """Undo; returns what was removed (for the test log)."""
        done = []
        for cmd, before in self.saved.items():
            now = self._save(cmd)
            for table, (chains, rules) in now.items():
                old_chains, old_rules = before.get(table, ({}, []))
                new_chains = [c for c in chains if c not in old_chains and self._ours(c)]
                for rule in rules:
                    if rule in old_rules:
                        continue
                    args = shlex.split(rule)
                    target = args[args.index("-j") + 1] if "-j" in args else ""
                    if (args[1] in new_chains or target in new_chains or self._ours(target)
                            or any(m in rule for m in self.markers)):
                        if args[1] not in new_chains:   # new chains are flushed whole below
                            _run(cmd, "-t", table, "-D", *args[1:], check=False)
                            done.append(f"{cmd} -t {table} {rule}")
                for chain in new_chains:
                    _run(cmd, "-t", table, "-F", chain, check=False)
                for chain in new_chains:
                    _run(cmd, "-t", table, "-X", chain, check=False)
                    done.append(f"{cmd} -t {table} -X {chain}")
                for chain, policy in old_chains.items():
                    if policy != "-" and chains.get(chain) not in (None, policy):
                        _run(cmd, "-t", table, "-P", chain, policy, check=False)
                        done.append(f"{cmd} -t {table} -P {chain} {policy}")
        for path, value in self.sysctls.items():
            with open(path, "w") as f:
                f.write(value)
        return done


# --- the runtimes -----------------------------------------------------------------

class MountNamespace:
    """A private mount namespace with cgroup2 at /sys/fs/cgroup, held by a sleeping process."""

    def __init__(self):
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             "mount -t cgroup2 none /sys/fs/cgroup && exec sleep infinity"],
            stdin=subprocess.DEVNULL, start_new_session=True)
        _wait(self._ready, 5, "the runtime's mount namespace")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise KsbpfError("containers: cannot make a private mount namespace with cgroup2 at /sys/fs/cgroup")
        try:
            with open(f"/proc/{self.proc.pid}/mounts") as f:
                return any(line.split()[1:3] == ["/sys/fs/cgroup", "cgroup2"] for line in f)
        except OSError:
            return False

    def argv(self, *cmd: str) -> list[str]:
        return ["nsenter", "-t", str(self.proc.pid), "-m", *cmd]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@dataclass
class Runtime:
    """One runtime (podman or docker), its bridge and subnet, its image."""

    kind: str          # "podman" | "docker"
    tag: str
    workdir: str
    subnet: str        # the bridge's /24
    bridge: str = field(init=False)
    image: str = field(init=False)
    mnt: MountNamespace | None = field(init=False, default=None)
    host: HostNetState | None = field(init=False, default=None)
    _dockerd: subprocess.Popen | None = field(init=False, default=None)
    _names: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.bridge = f"k{self.kind[0]}{self.tag}"
        self.image = f"localhost/ksbpf-bb-{self.tag}"
        self.network = f"ksbpf-{self.tag}"
        self.gateway = str(ipaddress.ip_network(self.subnet)[1])

    # -- life ------------------------------------------------------------
    def start(self, image_tar_path: str) -> float:
        """Start the runtime and import the image; seconds it took."""
        t0 = time.monotonic()
        self._preexisting = {p for p in RUNTIME_PATHS if os.path.lexists(p)}
        self.host = HostNetState([self.bridge, self.subnet])
        self.mnt = MountNamespace()
        if self.kind == "podman":
            self._podman_setup()
        else:
            self._docker_setup()
        self.cmd("import", "--change", 'CMD ["/bin/sh"]', image_tar_path, self.image)
        return time.monotonic() - t0

    def _podman_setup(self) -> None:
        d = self.workdir
        os.makedirs(os.path.join(d, "networks"), exist_ok=True)
        with open(os.path.join(d, "containers.conf"), "w") as f:
            f.write('[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\npids_limit = 0\n'
                    '[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\nevents_logger = "file"\n'
                    f'tmp_dir = "{d}/libpod-tmp"\n'
                    f'[network]\nnetwork_backend = "netavark"\nnetwork_config_dir = "{d}/networks"\n')
        with open(os.path.join(d, "networks", f"{self.network}.json"), "w") as f:
            json.dump({"name": self.network, "id": os.urandom(32).hex(), "driver": "bridge",
                       "network_interface": self.bridge, "created": "2026-01-01T00:00:00Z",
                       "subnets": [{"subnet": self.subnet, "gateway": self.gateway}],
                       "ipv6_enabled": False, "internal": False, "dns_enabled": False,
                       "ipam_options": {"driver": "host-local"}}, f)

    def _docker_setup(self) -> None:
        d = self.workdir
        # our own bridge: docker0 is never created
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for sub in ("data", "exec"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        self.sock = os.path.join(d, "docker.sock")
        log = open(os.path.join(d, "dockerd.log"), "w")
        self._dockerd = subprocess.Popen(self.mnt.argv(
            "/usr/sbin/dockerd", "--data-root", f"{d}/data", "--exec-root", f"{d}/exec",
            "--pidfile", f"{d}/docker.pid", "-H", f"unix://{self.sock}",
            "--exec-opt", "native.cgroupdriver=cgroupfs", "--bridge", self.bridge,
            "--userland-proxy=false", "--containerd-namespace", f"ksbpf{self.tag}",
            "--containerd-plugins-namespace", f"ksbpf{self.tag}p", "--log-level", "warn"),
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)

        def up() -> bool:
            if self._dockerd.poll() is not None:
                raise KsbpfError(f"containers: dockerd exited: see {d}/dockerd.log")
            return _run("/usr/bin/docker", "-H", f"unix://{self.sock}", "version", check=False).returncode == 0
        _wait(up, 30, "dockerd")

    def argv(self, *args: str) -> list[str]:
        if self.kind == "podman":
            d = self.workdir
            return self.mnt.argv("env", f"CONTAINERS_CONF={d}/containers.conf", "podman",
                                 "--root", f"{d}/storage", "--runroot", f"{d}/run", *args)
        return ["/usr/bin/docker", "-H", f"unix://{self.sock}", *args]

    def cmd(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        return _run(*self.argv(*args), check=check, timeout=timeout).stdout.strip()

    # -- containers --------------------------------------------------------
    def run(self, name: str, script: str, parent: str | None = None, share: str | None = None,
            tun: bool = False, options: tuple[str, ...] = ()) -> str:
        """Start a detached container running `sh -c script`; parent: a cgroup
        path relative to the cgroup2 root; share: a container whose network
        namespace it joins (else it gets its own on our bridge); options: more
        `run` options (--cap-drop NET_RAW ...)."""
        args = ["run", "-d", "--name", name, *options]
        args += ["--network", f"container:{share}"] if share else ["--network", self.network if self.kind == "podman" else "bridge"]
        if parent:
            args += ["--cgroup-parent", parent]
        if tun:
            args += ["--device", "/dev/net/tun", "--cap-add", "NET_ADMIN"]
        self._names.append(name)
        return self.cmd(*args, self.image, "sh", "-c", script)

    def pid(self, name: str) -> int:
        return int(self.cmd("inspect", "-f", "{{.State.Pid}}", name))

    def cgroup_of(self, name: str) -> str:
        with open(f"/proc/{self.pid(name)}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line.strip()[3:]
        return "?"

    def restart(self, name: str) -> None:
        self.cmd("restart", "-t", "0", name)

    def remove(self, *names: str) -> None:
        for name in reversed(names):   # dependants before what they share
            self.cmd("rm", "-f", name, check=False)
            if name in self._names:
                self._names.remove(name)

    def close(self) -> list[str]:
        """Remove everything; returns what was done to the host's firewall."""
        done: list[str] = []
        try:
            if self.mnt is not None:
                self.remove(*self._names)
                self.cmd("rmi", "-f", self.image, check=False)
        finally:
            if self._dockerd is not None and self._dockerd.poll() is None:
                self._dockerd.send_signal(signal.SIGTERM)
                try:
                    self._dockerd.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(self._dockerd.pid, signal.SIGKILL)
                    self._dockerd.wait()
            if self.mnt is not None:
                self.mnt.close()
            _run("ip", "link", "del", self.bridge, check=False)
            if self.host is not None:
                done = self.host.restore()
                for path in RUNTIME_PATHS:
                    if path not in self._preexisting and os.path.lexists(path):
                        shutil.rmtree(path, ignore_errors=True)
                        done.append(f"removed {path}")
            shutil.rmtree(self.workdir, ignore_errors=True)
        return done


# --- the far side -----------------------------------------------------------------

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


class Counter:
    """Incoming IPv4 TCP/UDP packets on one interface of a namespace, by
    (destination address, destination port)."""

    def __init__(self, ns_path: str, ifname: str):
        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
            s.bind((ifname, 0))
            s.settimeout(0.1)
            return s
        self.sock = netns.run_in(ns_path, make)
        self.counts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except (socket.timeout, OSError):
                continue
            if addr[2] == PACKET_OUTGOING or len(data) < 24 or data[0] >> 4 != 4:
                continue
            proto, ihl = data[9], (data[0] & 0xF) * 4
            if proto not in (6, 17) or len(data) < ihl + 4:
                continue
            dst = socket.inet_ntoa(data[16:20])
            dport = struct.unpack_from("!H", data, ihl + 2)[0]
            with self._lock:
                self.counts[(dst, dport)] += 1

    def get(self, dst: str, port: int) -> int:
        with self._lock:
            return self.counts[(dst, port)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@dataclass
class FarSide:
    """A server namespace reached from the host by a veth and /32 routes."""

    tag: str
    n: int = field(init=False)
    ns: str = field(init=False)
    host_if: str = field(init=False)
    far_if: str = field(init=False)
    wg_if: str = field(init=False)
    host_addr: str = field(init=False)   # the host's end of the veth (what NAT makes the source)
    far_addr: str = field(init=False)
    internet: str = field(init=False)    # "the internet": TEST-NET-3
    endpoint: str = field(init=False)    # the VPN server: TEST-NET-2
    lan: str = field(init=False)         # a private ("LAN") address
    tunnel_net: str = field(init=False)
    made: list[str] = field(init=False, default_factory=list)
    wg: subprocess.Popen | None = field(init=False, default=None)
    outside: Counter | None = field(init=False, default=None)
    through: Counter | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        t = self.tag
        self.n = int(t, 16) % 60 + 1
        k = self.n * 4
        self.ns, self.host_if, self.far_if, self.wg_if = f"ksbpf-far-{t}", f"kfh{t}", f"kff{t}", f"wgf{t}"
        self.host_addr, self.far_addr = f"192.0.2.{k + 1}", f"192.0.2.{k + 2}"
        self.internet, self.endpoint = f"203.0.113.{k + 1}", f"198.51.100.{k + 1}"
        self.lan = f"10.201.{self.n}.1"
        self.tunnel_net = f"10.202.{self.n}"
        self.keys = {side: _run("wg", "genkey").stdout.strip() for side in ("server", "client")}

    @property
    def destinations(self) -> tuple[str, ...]:
        return (self.internet, self.endpoint, self.lan)

    def pub(self, side: str) -> str:
        return _run("wg", "pubkey", input=self.keys[side]).stdout.strip()

    def create(self) -> None:
        for d in self.destinations:
            if _run("ip", "route", "show", f"{d}/32", check=False).stdout.strip():
                raise KsbpfError(f"containers: the host already routes {d}/32", "use another tag")
        _run("ip", "netns", "add", self.ns)
        self.made.append("netns")
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.far_if, "netns", self.ns)
        self.made.append("veth")
        _run("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        _run("ip", "-n", self.ns, "link", "set", "lo", "up")
        _run("ip", "-n", self.ns, "addr", "add", f"{self.far_addr}/30", "dev", self.far_if)
        _run("ip", "-n", self.ns, "link", "set", self.far_if, "up")
        for d in self.destinations:
            _run("ip", "-n", self.ns, "addr", "add", f"{d}/32", "dev", "lo")
            _run("ip", "route", "add", f"{d}/32", "via", self.far_addr, "dev", self.host_if)
        ns_path = os.path.join(netns.NETNS_RUN_DIR, self.ns)
        # the VPN server: wireguard-go in the far namespace, listening on the endpoint
        self.wg = subprocess.Popen(["ip", "netns", "exec", self.ns, "wireguard-go", self.wg_if],
                                   env={**os.environ, "WG_PROCESS_FOREGROUND": "1"}, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        _wait(lambda: os.path.exists(f"/var/run/wireguard/{self.wg_if}.sock"), 5, "the far side's wireguard-go")
        key = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ksbpf-far-{self.tag}.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(self.keys["server"])
        try:
            _run("wg", "set", self.wg_if, "private-key", key, "listen-port", str(WG_PORT),
                 "peer", self.pub("client"), "allowed-ips", f"{self.tunnel_net}.0/24")
        finally:
            os.unlink(key)
        _run("ip", "-n", self.ns, "addr", "add", f"{self.tunnel_net}.1/24", "dev", self.wg_if)
        _run("ip", "-n", self.ns, "link", "set", self.wg_if, "up")
        self.outside = Counter(ns_path, self.far_if)
        self.through = Counter(ns_path, self.wg_if)

    def check_routes(self) -> dict[str, str]:
        """The host's route to every test destination leaves through our veth,
        and nowhere else (asserted before anything is sent)."""
        out = {}
        for d in self.destinations:
            (route,) = json.loads(_run("ip", "-j", "route", "get", d).stdout)
            if route.get("dev") != self.host_if or route.get("gateway") != self.far_addr:
                raise KsbpfError(f"containers: the host routes {d} via {route.get('dev')}, not the test veth "
                                 f"{self.host_if}: refusing to send anything")
            out[d] = route["dev"]
        return out

    def destroy(self) -> None:
        for c in (self.outside, self.through):
            if c is not None:
                c.close()
        if self.wg is not None and self.wg.poll() is None:
            self.wg.kill()
            self.wg.wait()
        for d in self.destinations:
            _run("ip", "route", "del", f"{d}/32", "dev", self.host_if, check=False)
        if "veth" in self.made:
            _run("ip", "link", "del", self.host_if, check=False)
        if "netns" in self.made:
            pids = _run("ip", "netns", "pids", self.ns, check=False).stdout.split()
            for p in pids:
                try:
                    os.kill(int(p), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _run("ip", "netns", "del", self.ns, check=False)
        try:
            os.unlink(f"/var/run/wireguard/{self.wg_if}.sock")
        except FileNotFoundError:
            pass


# --- a tunnel inside a container ------------------------------------------------------

def _hex(key_b64: str) -> str:
    return base64.b64decode(key_b64).hex()


def configure_tunnel(pid: int, far: FarSide, client_addr: str, ifname: str = "wg0",
                     routes: tuple[str, ...] = ()) -> None:
    """Configure the wireguard-go running in the container of `pid` (its
    UAPI socket, seen through /proc/PID/root), address it, bring it up and
    route `routes` through it, from outside (nothing needed in the image)."""
    sock_path = f"/proc/{pid}/root/var/run/wireguard/{ifname}.sock"
    _wait(lambda: os.path.exists(sock_path), 10, f"wireguard-go's socket in the container ({sock_path})")
    request = (f"set=1\nprivate_key={_hex(far.keys['client'])}\nreplace_peers=true\n"
               f"public_key={_hex(far.pub('server'))}\nendpoint={far.endpoint}:{WG_PORT}\n"
               f"persistent_keepalive_interval=1\nreplace_allowed_ips=true\nallowed_ip=0.0.0.0/0\n\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(sock_path)
        s.sendall(request.encode())
        reply = s.recv(4096).decode()
    if "errno=0" not in reply:
        raise KsbpfError(f"containers: wireguard-go refused its configuration: {reply!r}")
    net = f"--net=/proc/{pid}/ns/net"
    _run("nsenter", net, "ip", "addr", "add", f"{client_addr}/24", "dev", ifname)
    _run("nsenter", net, "ip", "link", "set", ifname, "up")
    for r in routes:
        _run("nsenter", net, "ip", "route", "add", r, "dev", ifname)


def delete_link(pid: int, ifname: str = "wg0") -> None:
    _run("nsenter", f"--net=/proc/{pid}/ns/net", "ip", "link", "del", ifname)


def sender(dst: str, port: int, delay_us: int = 20000) -> str:
    """A shell loop that connects (TCP) to dst:port over and over, from its
    first instruction: each attempt is a SYN the far side can count."""
    return f"while :; do nc -w 1 {dst} {port} </dev/null; usleep {delay_us}; done"


def host_cgroup(parent: str) -> str:
    """The host's path of a cgroup the runtimes know as `parent` (relative to the cgroup2 root)."""
    return os.path.join(cgroup.cgroup2_root(), parent.lstrip("/"))
