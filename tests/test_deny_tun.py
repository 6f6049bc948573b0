"""Issue 18, row 8: an unprivileged process of a cgroup scope that can write
into a tun device it owns injects packets no socket of its cgroup sends.
With ip_forward on, the kernel forwards them out of the uplink; with it off,
spoofed echo requests make the kernel send echo replies carrying the
process's payload.  The cgroup hook sees neither.  `verify` and `status`
warn; `--deny-tun` attaches a device program that refuses /dev/net/tun to
the scope, and detach removes it.

The lab's client namespace is the scope's namespace, its tunnel down (every
non-local packet of the scope must be dropped); what leaks is counted on the
far side of the physical link by a capture that looks for the payload."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import pytest
from helpers import ksbpf

from ksbpf.kernel import devices, netns
from ksbpf.lab.namespaces import new_lab
from ksbpf.scopes import cgroups

pytestmark = pytest.mark.lab
SENT = 20
NOBODY = 65534
ETH_P_ALL = 0x0003

# What the scope's process runs: open the tun device (a private node of
# /dev/net/tun, char 10:200), attach to the named device it owns, write
# crafted IPv4 packets; or hold it open.  Plain python3 as uid 65534.
INJECT = r"""
import fcntl, json, os, struct, sys, time
node, dev, mode, count, marker, src, dst = sys.argv[1:8]
try:
    fd = os.open(node, os.O_RDWR)
except OSError as e:
    print(json.dumps({"opened": False, "errno": e.errno})); sys.exit(0)
fcntl.ioctl(fd, 0x400454ca, struct.pack("16sH", dev.encode(), 0x0001 | 0x1000))  # TUNSETIFF: IFF_TUN|IFF_NO_PI
if mode == "hold":
    print(json.dumps({"opened": True}), flush=True); time.sleep(600); sys.exit(0)
def csum(b):
    b += b"\0" * (len(b) % 2); s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
def ip(proto, body):
    a, b = (bytes(int(x) for x in v.split(".")) for v in (src, dst))
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, 0, 64, proto, 0, a, b)
    return h[:10] + struct.pack("!H", csum(h)) + h[12:] + body
written = 0
for i in range(int(count)):
    payload = marker.encode() + b"-%03d" % i + b"x" * 64
    if mode == "forward":   # UDP to a server beyond the uplink
        body = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
        pkt = ip(17, body)
    else:                   # an echo request "from" the server: the kernel answers it
        body = struct.pack("!BBHHH", 8, 0, 0, 0x4b53, i) + payload
        pkt = ip(1, body[:2] + struct.pack("!H", csum(body)) + body[4:])
    written += os.write(fd, pkt) > 0
print(json.dumps({"opened": True, "written": written}))
"""


class Capture:
    """Frames on the server's physical link carrying a marker."""

    def __init__(self, lab, marker: bytes):
        self.marker = marker
        self.count = 0
        self._stop = threading.Event()

        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            s.bind((lab.phy_server, ETH_P_ALL))
            s.settimeout(0.1)
            return s
        self._sock = netns.run_in(lab.server_path, make)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self._sock.recvfrom(4096)
            except OSError:
                continue
            if addr[2] != socket.PACKET_OUTGOING and self.marker in data:
                self.count += 1

    def stop(self) -> int:
        time.sleep(0.5)   # what was sent is in flight for microseconds; leave it time to land
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
        return self.count


@pytest.fixture
def lab(request):
    lab = new_lab("ksdtun")
    request.addfinalizer(lab.destroy)
    lab.create()
    lab.tunnel_up()
    lab.tunnel_down()   # the scope's tunnel is gone: every non-local packet of the scope must be dropped
    return lab


@pytest.fixture
def tun(lab):
    """A tun device in the scope's namespace owned by uid 65534, and a private
    node of /dev/net/tun (char 10:200) that uid can open (this machine's
    /dev/net/tun is 0600; on most distributions it is 0666)."""
    n = int(lab.tag, 16) % 250 + 1
    name = f"tj{lab.tag}"
    c = lab.client_ns
    for cmd in (f"ip -n {c} tuntap add mode tun name {name} user {NOBODY}",
                f"ip -n {c} addr add 10.77.{n}.1/24 dev {name}", f"ip -n {c} link set {name} up"):
        subprocess.run(cmd.split(), check=True)
    for key in ("all", "default", name):   # the attack needs no reverse-path filter on the tun device
        subprocess.run(["ip", "netns", "exec", c, "sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0"], check=True)
    d = tempfile.mkdtemp(prefix="ksbpf-tun-")
    os.chmod(d, 0o755)
    node = os.path.join(d, "tun")
    os.mknod(node, 0o20666, os.makedev(10, 200))
    os.chmod(node, 0o666)
    yield {"name": name, "node": node, "local": f"10.77.{n}.1", "peer": f"10.77.{n}.2"}
    shutil.rmtree(d, ignore_errors=True)


def forwarding(lab, on: bool) -> None:
    subprocess.run(["ip", "netns", "exec", lab.client_ns, "sysctl", "-qw", f"net.ipv4.ip_forward={int(on)}"],
                   check=True)


def inject_argv(lab, cg: str | None, tun: dict, mode: str, marker: str, src: str, dst: str) -> list[str]:
    inner = ["nsenter", f"--net={lab.client_path}", "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
             "--clear-groups", "--inh-caps=-all", "/usr/bin/python3", "-c", INJECT,
             tun["node"], tun["name"], mode, str(SENT), marker, src, dst]
    if cg is None:
        return inner
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cg, *inner]


def inject(lab, cg: str | None, tun: dict, mode: str) -> tuple[dict, int]:
    """(what the injector said, how many of its packets arrived beyond the uplink)."""
    marker = f"KS{os.urandom(4).hex()}"
    if mode == "forward":
        src, dst = tun["peer"], lab.net4_server
    else:
        src, dst = lab.net4_server, tun["local"]
    cap = Capture(lab, marker.encode())
    try:
        proc = subprocess.run(inject_argv(lab, cg, tun, mode, marker, src, dst), capture_output=True, text=True,
                              timeout=30)
    finally:
        arrived = cap.stop()
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), arrived


def attach(lab, cg: str, *extra: str) -> None:
    ksbpf("attach", "--cgroup", cg, "--tunnel", lab.wg_client, "--netns", lab.client_path,
          "--endpoint", lab.endpoint4, *extra, check=True)


def verify_tun(cg: str) -> dict:
    proc = ksbpf("verify", "--scope", cg, "--json")
    (f,) = [f for f in json.loads(proc.stdout)["findings"] if f["check"] == "tun"]
    return f


def status_of(cg: str) -> dict:
    (mine,) = [s for s in json.loads(ksbpf("status", "--json", check=True).stdout)["scopes"] if s["cgroup"] == cg]
    return mine


@pytest.mark.parametrize("ip_forward", [True, False], ids=["forwarded", "echo-replies"])
def test_row8_tun_device_of_a_scope_process(lab, tun, make_cgroup, request, ip_forward):
    cg = make_cgroup()
    request.addfinalizer(lambda: cgroups.detach(cg))
    attach(lab, cg)
    forwarding(lab, ip_forward)
    mode = "forward" if ip_forward else "echo"

    said, arrived = inject(lab, cg, tun, mode)
    print(f"row 8 ({mode}), scope without --deny-tun: {arrived} of {SENT} arrived")
    assert said == {"opened": True, "written": SENT}
    assert arrived == SENT            # the leak: the cgroup hook never sees these packets

    holder = subprocess.Popen(inject_argv(lab, cg, tun, "hold", "x", "0.0.0.0", "0.0.0.0"),
                              stdout=subprocess.PIPE, text=True)
    request.addfinalizer(holder.kill)
    assert json.loads(holder.stdout.readline()) == {"opened": True}
    f = verify_tun(cg)
    assert f["verdict"] == "warn", f
    assert "holds /dev/net/tun" in f["detail"] and f"belongs to uid {NOBODY}" in f["detail"]
    assert ("ip_forward is on" if ip_forward else "ip_forward is off") in f["detail"]
    assert "--deny-tun" in f["fix"]
    warnings = status_of(cg)["warnings"]
    assert any("holds /dev/net/tun" in w for w in warnings), warnings
    holder.kill()
    holder.wait()

    attach(lab, cg, "--deny-tun")
    st = status_of(cg)
    assert st["deny_tun"] and st["attached"] and not st["problems"]
    said, arrived = inject(lab, cg, tun, mode)
    assert said == {"opened": False, "errno": 1}     # EPERM: the device program refused the open
    assert arrived == 0
    # control, same run: the same user in the same namespace outside the scope still can
    said, control = inject(lab, None, tun, mode)
    print(f"row 8 ({mode}), --deny-tun: 0 of {SENT} from the scope; {control} of {SENT} from outside it (control)")
    assert said["opened"] and control == SENT
    f = verify_tun(cg)
    assert f["verdict"] == "ok" and "--deny-tun in force" in f["detail"], f

    ksbpf("detach", "--cgroup", cg, check=True)
    assert not cgroups.deny_tun_in_force(cg)
    said, _ = inject(lab, cg, tun, mode)
    assert said["opened"]                                # detach removed the device program too


def test_deny_tun_program_refuses_only_the_tun_device(make_cgroup, request):
    """The device program: char 10:200 refused, other devices (/dev/null) open."""
    cg = make_cgroup()
    fd = devices.load_deny_tun()
    cg_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    try:
        from ksbpf.kernel import libbpf
        libbpf.prog_attach(fd, cg_fd, devices.BPF_CGROUP_DEVICE, libbpf.BPF_F_ALLOW_MULTI)
        request.addfinalizer(lambda: cgroups.detach(cg))
    finally:
        os.close(fd)
        os.close(cg_fd)
    code = ("import os\nfor p in ('/dev/null', '/dev/net/tun'):\n"
            "    try: os.close(os.open(p, os.O_RDWR)); print(p, 'ok')\n"
            "    except OSError as e: print(p, e.errno)\n")
    out = subprocess.run(["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cg, "/usr/bin/python3", "-c", code],
                         capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["/dev/null ok", "/dev/net/tun 1"], out
    outside = subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True, text=True, check=True).stdout
    assert "/dev/net/tun ok" in outside    # control: root outside the cgroup opens it


def test_daemon_applies_deny_tun_from_the_configuration(make_cgroup, tag, tmp_path, request):
    """deny_tun = true in a [[scope]]: the daemon attaches the device program
    with the scope, and adopts it untouched on restart."""
    from helpers import DaemonProcess, toml_config
    ns = f"ksdtun-d{tag}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    request.addfinalizer(lambda: subprocess.run(["ip", "netns", "del", ns]))
    cg = make_cgroup()
    request.addfinalizer(lambda: cgroups.detach(cg))
    path = tmp_path / "ksbpf.toml"
    path.write_text(toml_config([{"cgroup": cg, "tunnels": ["tun0"], "netns": ns, "deny_tun": True}]))
    for expected in ("scope_attached", "scope_adopted"):
        d = DaemonProcess(str(path))
        try:
            d.wait_for("ready")
            assert d.named(expected), d.lines
        finally:
            d.stop()
        assert cgroups.deny_tun_in_force(cg)
    st = status_of(cg)
    assert st["deny_tun"] and not st["problems"]
    code = "import os\ntry: os.open('/dev/net/tun', os.O_RDWR); print('ok')\nexcept OSError as e: print(e.errno)\n"
    out = subprocess.run(["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cg, "/usr/bin/python3", "-c", code],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "1"   # EPERM, even for root inside the scope
