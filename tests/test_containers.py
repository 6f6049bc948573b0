"""Containers under a protected cgroup parent, with real Podman and Docker
(Debian's, runc), `netns = "each"` and the daemon.

The VPN-container pattern: a VPN container runs a real wireguard-go tunnel
(wg0, in its own network namespace, to a WireGuard server on the far side)
and an app container shares its namespace (`--network container:vpn`, compose
`network_mode: service:vpn`).  The far side is a namespace the tests make,
reached only through a test veth and /32 routes that FarSide.check_routes()
verifies before anything is sent; containers send TCP SYNs to per-container
ports there, counted outside the tunnel (on the veth) and through it.  Every
"nothing arrives" is paired with a control that does arrive.  The leak counts
are printed at the end of the run."""

from __future__ import annotations

import os
import shutil
import time
import uuid

import pytest
from helpers import DaemonProcess, ksbpf, scope_status

from ksbpf.kernel import cgroup
from harness.containers import FarSide, Runtime, configure_tunnel, delete_link, exclusive, image_tar, sender

pytestmark = pytest.mark.lab
RUNTIMES = {"podman": "/usr/bin/podman", "docker": "/usr/sbin/dockerd"}
ARRIVE_TIMEOUT = 30.0   # a WireGuard handshake through NAT, a container start
QUIET = 3.0             # how long "nothing arrives" is watched


def wait_for(cond, timeout: float, what: str, diag=lambda: "") -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, f"timed out after {timeout} s: {what}\n{diag()}"
        time.sleep(0.05)
    return time.monotonic() - start


def diagnose(path: str, far: FarSide, d: DaemonProcess | None = None) -> str:
    """What the scope, the far side and the daemon say (for a failure message)."""
    import json
    s = scope_status(path)
    out = [json.dumps({k: s[k] for k in ("namespaces", "counters", "problems")}, indent=1)[:6000],
           f"far side outside: {dict(far.outside.counts)}", f"far side through: {dict(far.through.counts)}"]
    if d is not None:
        out.append("\n".join(d.lines[-40:]))
    return "\n".join(out)


@pytest.fixture(scope="module", autouse=True)
def one_run_at_a_time():
    """Other checkouts on this machine may run these tests at the same time:
    the host's firewall and forwarding are snapshot and restored per run."""
    with exclusive() as waited:
        if waited > 1:
            print(f"waited {waited:.0f} s for another container test run to finish")
        yield


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    return image_tar(str(tmp_path_factory.mktemp("image")))


@pytest.fixture(scope="module")
def far():
    f = FarSide(uuid.uuid4().hex[:6])
    try:
        f.create()
        f.check_routes()
        yield f
    finally:
        f.destroy()


@pytest.fixture(scope="module", params=sorted(RUNTIMES))
def rt(request, image, tmp_path_factory):
    kind = request.param
    if not os.path.exists(RUNTIMES[kind]):
        pytest.skip(f"{kind} is not installed ({RUNTIMES[kind]}): run `make setup`")
    tag = uuid.uuid4().hex[:6]
    n = int(tag, 16) % 200 + 20
    runtime = Runtime(kind, tag, str(tmp_path_factory.mktemp(f"rt-{kind}")),
                      f"10.{89 if kind == 'podman' else 90}.{n}.0/24")
    try:
        took = runtime.start(image)
        print(f"{kind}: started and image imported in {took:.1f} s")
        yield runtime
    finally:
        undone = runtime.close()
        print(f"{kind}: removed; host firewall changes undone: {len(undone)}")


@pytest.fixture
def ctr(rt, make_cgroup, far):
    """Containers of one test (removed at teardown, before the cgroups are),
    and the protected parent cgroups: ctr.parent(suffix) -> (host path, runtime path)."""
    class Containers:
        def __init__(self):
            self.names: list[str] = []
            self.tag = uuid.uuid4().hex[:6]

        def parent(self, suffix: str = "") -> tuple[str, str]:
            path = make_cgroup(f"-{rt.kind}{suffix}")
            return path, "/" + os.path.relpath(path, cgroup.cgroup2_root())

        def run(self, role: str, script: str, **kw) -> str:
            name = f"ksbpf-{role}-{self.tag}"
            far.check_routes()   # before anything can send
            rt.run(name, script, **kw)
            self.names.append(name)
            return name

    c = Containers()
    yield c
    rt.remove(*c.names)


def ports(rt: Runtime, first: int, n: int) -> list[int]:
    """Destination ports of one test: the far side's counters are shared by both runtimes."""
    base = first + (0 if rt.kind == "podman" else 500)
    return list(range(base, base + n))


def scope(path: str, far: FarSide, **extra) -> dict:
    return {"cgroup": path, "tunnels": ["wg0"], "netns": "each",
            "endpoints": [f"{far.endpoint}:51820/udp"], **extra}


def vpn_script(far: FarSide, port: int) -> str:
    """The VPN container: its tunnel (wireguard-go forks into the background), then a sender of its own."""
    return f"wireguard-go wg0; {sender(far.internet, port)}"


COMPOSE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy", "compose")


def compose_options(service: str) -> tuple[str, ...]:
    """The `run` options of a service of the compose example (deploy/compose/
    compose.yaml): the tests run the example's own settings, not their own."""
    import yaml
    with open(os.path.join(COMPOSE, "compose.yaml")) as f:
        svc = yaml.safe_load(f)["services"][service]
    out: list[str] = []
    for key, flag in (("cap_add", "--cap-add"), ("cap_drop", "--cap-drop"), ("devices", "--device"),
                      ("sysctls", "--sysctl")):
        for value in svc.get(key, []):
            out += [flag, value]
    return tuple(out)


def net_raw(pid: int) -> bool:
    """Does the process hold CAP_NET_RAW (effective)?"""
    with open(f"/proc/{pid}/status") as f:
        eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return bool(eff & (1 << 13))


def blocked(path: str) -> int:
    return scope_status(path)["counters"]["not_tunnel"]["packets"]


def test_vpn_and_app_containers_through_the_tunnel_and_nothing_when_it_is_deleted(rt, far, ctr, run_daemon,
                                                                                   report_line):
    port_vpn, port_app, port_ctl = ports(rt, 21001, 3)
    path, parent = ctr.parent()
    d = run_daemon([scope(path, far)])
    vpn = ctr.run("vpn", vpn_script(far, port_vpn), parent=parent, options=compose_options("vpn"))
    configure_tunnel(rt.pid(vpn), far, f"{far.tunnel_net}.2", routes=(f"{far.internet}/32",))
    app = ctr.run("app", sender(far.internet, port_app), parent=parent, share=vpn, options=compose_options("app"))
    ctl = ctr.run("ctl", sender(far.internet, port_ctl))   # outside the protected parent, the runtime's defaults
    assert not net_raw(rt.pid(app))              # the example's cap_drop: no raw frames from the app
    if rt.kind == "docker":                      # Docker grants CAP_NET_RAW by default (Podman 4 no longer does)
        assert net_raw(rt.pid(ctl))
    assert not any(f"process {rt.pid(app)} " in w for w in scope_status(path)["warnings"])
    wait_for(lambda: far.through.get(far.internet, port_app) > 0 and far.through.get(far.internet, port_vpn) > 0,
             ARRIVE_TIMEOUT, "the app's and the VPN container's traffic through the tunnel",
             lambda: diagnose(path, far, d))
    wait_for(lambda: far.outside.get(far.internet, port_ctl) > 0, ARRIVE_TIMEOUT,
             "the control container's traffic (outside the protected parent, untouched)")
    status = scope_status(path)
    assert [t["registered"] for t in status["tunnels"] if t["present"]] == [True], status["namespaces"]
    vpn_ns = [n for n in status["namespaces"] if n["inode"] == os.stat(f"/proc/{rt.pid(vpn)}/ns/net").st_ino]
    assert [n["container"] for n in vpn_ns] in ([rt.cmd("inspect", "-f", "{{.Id}}", vpn)[:12]],
                                                [rt.cmd("inspect", "-f", "{{.Id}}", f"ksbpf-app-{ctr.tag}")[:12]])
    assert f"netns    container {vpn_ns[0]['container']}" in ksbpf("status", check=True).stdout
    assert far.outside.get(far.internet, port_app) == 0 and far.outside.get(far.internet, port_vpn) == 0

    # the tunnel deleted: the default route now leads out through the bridge and NAT
    before = {p: far.outside.get(far.internet, p) for p in (port_app, port_vpn, port_ctl)}
    dropped = blocked(path)
    delete_link(rt.pid(vpn))
    time.sleep(QUIET)
    leaked = {p: far.outside.get(far.internet, p) - before[p] for p in (port_app, port_vpn)}
    control = far.outside.get(far.internet, port_ctl) - before[port_ctl]
    dropped = blocked(path) - dropped
    report_line(f"[{rt.kind}] VPN tunnel deleted for {QUIET:g} s: outside the tunnel app={leaked[port_app]} "
                f"vpn={leaked[port_vpn]} (ksbpf dropped {dropped}); control container arrived: {control}")
    assert leaked == {port_app: 0, port_vpn: 0}
    assert dropped > 0 and control > 0


def test_a_container_sending_from_its_first_instruction_gets_nothing_out_before_its_tunnel(rt, far, ctr,
                                                                                         run_daemon, report_line):
    (port,) = ports(rt, 21011, 1)
    path, parent = ctr.parent()
    run_daemon([scope(path, far)])
    script = (f"({sender(far.internet, port)}) & "
              "while [ ! -e /tmp/go ]; do usleep 10000; done; wireguard-go wg0; wait")
    early = ctr.run("early", script, parent=parent, options=compose_options("vpn"))
    pid = rt.pid(early)
    wait_for(lambda: blocked(path) >= 3, ARRIVE_TIMEOUT, "the container's first attempts (dropped)")
    time.sleep(QUIET)
    outside_before_tunnel = far.outside.get(far.internet, port)
    attempts = blocked(path)
    with open(f"/proc/{pid}/root/tmp/go", "w"):
        pass
    configure_tunnel(pid, far, f"{far.tunnel_net}.3", routes=(f"{far.internet}/32",))
    took = wait_for(lambda: far.through.get(far.internet, port) > 0, ARRIVE_TIMEOUT,
                    "the container's traffic through its new tunnel")
    report_line(f"[{rt.kind}] container sending from its first instruction, before its tunnel existed: "
                f"outside the tunnel {outside_before_tunnel} (ksbpf dropped {attempts}); through the tunnel "
                f"{took:.1f} s after it was made")
    assert outside_before_tunnel == 0 and far.outside.get(far.internet, port) == 0


def test_vpn_container_restarted_traffic_resumes_without_a_leak(rt, far, ctr, run_daemon, report_line):
    port_vpn, port_app = ports(rt, 21021, 2)
    path, parent = ctr.parent()
    d = run_daemon([scope(path, far)])
    vpn = ctr.run("vpn", vpn_script(far, port_vpn), parent=parent, options=compose_options("vpn"))
    configure_tunnel(rt.pid(vpn), far, f"{far.tunnel_net}.2", routes=(f"{far.internet}/32",))
    app = ctr.run("app", sender(far.internet, port_app), parent=parent, share=vpn, options=compose_options("app"))
    wait_for(lambda: far.through.get(far.internet, port_app) > 0, ARRIVE_TIMEOUT, "the app through the tunnel")
    old_ns = os.stat(f"/proc/{rt.pid(vpn)}/ns/net").st_ino

    rt.restart(vpn)
    pid = rt.pid(vpn)
    assert os.stat(f"/proc/{pid}/ns/net").st_ino != old_ns   # a new namespace
    app_left_behind = os.stat(f"/proc/{rt.pid(app)}/ns/net").st_ino != os.stat(f"/proc/{pid}/ns/net").st_ino
    if app_left_behind:
        rt.restart(app)   # it stayed in the old namespace: what the user does (README, Containers)
    assert os.stat(f"/proc/{rt.pid(app)}/ns/net").st_ino == os.stat(f"/proc/{pid}/ns/net").st_ino
    through = {p: far.through.get(far.internet, p) for p in (port_vpn, port_app)}
    time.sleep(1.0)   # both restarted and sending, the new tunnel not there yet
    configure_tunnel(pid, far, f"{far.tunnel_net}.2", routes=(f"{far.internet}/32",))
    took = wait_for(lambda: all(far.through.get(far.internet, p) > through[p] for p in (port_vpn, port_app)),
                    ARRIVE_TIMEOUT, "traffic through the new tunnel after the restart")
    leaked = {p: far.outside.get(far.internet, p) for p in (port_vpn, port_app)}
    report_line(f"[{rt.kind}] VPN container restarted (new namespace, new tunnel): outside the tunnel "
                f"vpn={leaked[port_vpn]} app={leaked[port_app]}; traffic resumed {took:.1f} s after the new tunnel"
                f"{'; the app stayed in the old namespace and was restarted' if app_left_behind else ''}")
    assert leaked == {port_vpn: 0, port_app: 0}
    assert d.named("netns_found") and d.proc.poll() is None


def test_endpoint_rule_and_lan_option_per_container(rt, far, ctr, run_daemon, report_line):
    port_ep, _mismatch, port_lan_strict, port_lan_open = ports(rt, 21031, 4)
    strict, strict_parent = ctr.parent("-strict")
    lan, lan_parent = ctr.parent("-lan")
    run_daemon([scope(strict, far, endpoints=[f"{far.endpoint}:51820/udp", f"{far.endpoint}:{port_ep}/tcp"]),
                scope(lan, far, allow_lan=True)])
    ctr.run("strict", f"({sender(far.endpoint, port_ep)}) & ({sender(far.endpoint, port_ep + 1)}) & "
                      f"{sender(far.lan, port_lan_strict)}", parent=strict_parent)
    ctr.run("lan", sender(far.lan, port_lan_open), parent=lan_parent)
    wait_for(lambda: far.outside.get(far.endpoint, port_ep) > 0, ARRIVE_TIMEOUT,
             "the endpoint (address, port, protocol) reached outside the tunnel")
    wait_for(lambda: far.outside.get(far.lan, port_lan_open) > 0, ARRIVE_TIMEOUT,
             "the LAN address from the container whose scope allows the LAN")
    time.sleep(QUIET)
    mismatch = far.outside.get(far.endpoint, port_ep + 1)
    lan_strict = far.outside.get(far.lan, port_lan_strict)
    counters = scope_status(strict)["counters"]
    report_line(f"[{rt.kind}] endpoint on another port: {mismatch} arrived (ksbpf dropped "
                f"{counters['endpoint_mismatch']['packets']} as endpoint_mismatch); LAN from the strict scope: "
                f"{lan_strict} arrived, from the --allow-lan scope: {far.outside.get(far.lan, port_lan_open)}")
    assert mismatch == 0 and lan_strict == 0
    assert counters["endpoint_mismatch"]["packets"] > 0 and counters["endpoint"]["packets"] > 0


def test_one_shot_attach_and_detach_restores(rt, far, ctr, report_line):
    (port,) = ports(rt, 21041, 1)
    path, parent = ctr.parent()
    out = ksbpf("attach", "--cgroup", path, "--tunnel", "wg0", "--netns", "each", check=True).stdout
    assert "registered only by the daemon" in out
    ctr.run("plain", sender(far.internet, port), parent=parent)
    wait_for(lambda: blocked(path) >= 3, ARRIVE_TIMEOUT, "the container's attempts (dropped)")
    time.sleep(1.0)
    while_attached = far.outside.get(far.internet, port)
    assert "detached 2 program" in ksbpf("detach", "--cgroup", path, check=True).stdout
    took = wait_for(lambda: far.outside.get(far.internet, port) > 0, ARRIVE_TIMEOUT,
                    "the container's traffic once detached")
    report_line(f"[{rt.kind}] no tunnel, attached: {while_attached} arrived; detached: arriving after {took:.1f} s")
    assert while_attached == 0


def test_cleanup_tools_exist():
    """The clean-up needs these (installed by make setup)."""
    for tool in ("iptables-save", "ip6tables-save", "nsenter", "unshare", "wg", "wireguard-go"):
        assert shutil.which(tool), tool


def test_compose_example_is_consistent():
    """deploy/compose: the services' cgroup_parent is the scope's cgroup, the
    app shares the VPN's namespace, the scope follows every namespace."""
    import re

    from ksbpf.daemon import config
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy", "compose")
    compose = open(os.path.join(root, "compose.yaml")).read()
    cfg = config.load(os.path.join(root, "ksbpf.toml"))
    (sc,) = cfg.scopes
    parents = set(re.findall(r"^\s+cgroup_parent:\s*(\S+)", compose, re.M))
    assert parents == {"vpnkill.slice"} and sc.cgroup == "/sys/fs/cgroup/vpnkill.slice"
    assert re.search(r'^\s+network_mode:\s*"service:vpn"', compose, re.M)
    assert compose_options("app") == ("--cap-drop", "NET_RAW")   # what the README tells users to do
    assert ("--device", "/dev/net/tun:/dev/net/tun") == compose_options("vpn")[2:4]
    assert sc.policy.netns == "each" and sc.policy.tunnels == ("wg0",) and sc.create_cgroup
    assert "[Slice]" in open(os.path.join(root, "vpnkill.slice")).read()
