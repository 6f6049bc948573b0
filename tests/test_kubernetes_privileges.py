"""The daemon with exactly the privileges it is deployed with, against
processes of other users -- as on a real node, where containerd's pause runs
as 65535 and the apps as whoever their image says.

- Kubernetes: `ksbpf daemon` as root with only the capabilities the
  DaemonSet's container adds (read from deploy/kubernetes/daemonset.yaml, so
  the two cannot drift), protecting a pod (systemd driver, Burstable) whose
  sandbox runs as 65535 and whose app runs as 65534: the pod is protected and
  its gate passes.  Control: the same set without SYS_PTRACE -- the pod stays
  pending with a message naming CAP_SYS_PTRACE, and the gate times out.
- systemd: `netns = "each"` with the capability bounding set of
  deploy/systemd/ksbpf.service and a /proc mounted as its ProtectProc=invisible
  mounts it (hidepid=invisible): a process of another user, in a namespace of
  its own, gets its tunnel registered (traffic through it arrives).  Control:
  without CAP_SYS_PTRACE, the daemon says why and the traffic is dropped.

A capability this test runner itself lacks cannot be granted: it is left out
and printed (here: none or SYS_RESOURCE, which bcc uses only to raise the
locked-memory limit, charged to the memory cgroup on current kernels)."""

from __future__ import annotations

import configparser
import os
import socket
import subprocess
import uuid

import pytest
import yaml
from helpers import DaemonProcess
from test_gate import downward, run_gate

from harness.kubeapi import FakeApiServer, make_pod
from harness.kubelet import container_dir, pod_dir
from ksbpf.lab.namespaces import probe

pytestmark = pytest.mark.lab
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE = "node-privileges"
CAP_NAMES = ["chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid", "setuid",
             "setpcap", "linux_immutable", "net_bind_service", "net_broadcast", "net_admin", "net_raw",
             "ipc_lock", "ipc_owner", "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct",
             "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time", "sys_tty_config", "mknod",
             "lease", "audit_write", "audit_control", "setfcap", "mac_override", "mac_admin", "syslog",
             "wake_alarm", "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore"]


def daemonset_caps() -> list[str]:
    with open(os.path.join(REPO, "deploy", "kubernetes", "daemonset.yaml")) as f:
        ds = yaml.safe_load(f)
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    return [n.lower() for n in c["securityContext"]["capabilities"]["add"]]


def unit_caps() -> tuple[list[str], str]:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(os.path.join(REPO, "deploy", "systemd", "ksbpf.service"))
    svc = unit["Service"]
    return [n.lower().removeprefix("cap_") for n in svc["CapabilityBoundingSet"].split()], svc["ProtectProc"]


def grantable(caps: list[str]) -> list[str]:
    """The caps this runner can pass on (its own bounding set); the others printed."""
    with open("/proc/self/status") as f:
        bnd = int(next(line for line in f if line.startswith("CapBnd:")).split()[1], 16)
    have = [c for c in caps if bnd >> CAP_NAMES.index(c) & 1]
    if len(have) != len(caps):
        print(f"this runner cannot grant {sorted(set(caps) - set(have))}: left out")
    return have


def setpriv(caps: list[str]) -> list[str]:
    """Root (uid 0) with exactly these capabilities: what a container runtime gives
    a root container with `drop: [ALL]` and `add: caps`."""
    spec = ",".join(["-all"] + [f"+{c}" for c in caps])
    return ["setpriv", f"--inh-caps={spec}", f"--ambient-caps={spec}", f"--bounding-set={spec}"]


def as_user(uid: int, cgroup_dir: str, ns: str, *cmd: str) -> subprocess.Popen:
    """A process of user `uid`, no capabilities, in the cgroup and the namespace."""
    return subprocess.Popen(["sh", "-c", f'echo $$ > {cgroup_dir}/cgroup.procs && exec "$@"', "sh",
                             "ip", "netns", "exec", ns, "setpriv", f"--reuid={uid}", f"--regid={uid}",
                             "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", *(cmd or ("sleep", "600"))])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pod_of_other_users(lab, make_cgroup, tmp_path):
    """(pod cgroup, app container cgroup, config path, api, pod uid) -- a Burstable pod of the
    systemd driver whose pause runs as 65535 and whose app runs as 65534."""
    top = make_cgroup()
    uid = str(uuid.uuid4())
    cg = pod_dir(top, uid, "systemd", "Burstable")
    os.makedirs(cg)
    pause, app = container_dir(cg, "systemd", "containerd"), container_dir(cg, "systemd", "containerd")
    procs = [as_user(65535, pause, lab.client_ns, "sleep", "600"), as_user(65534, app, lab.client_ns)]
    with FakeApiServer() as api:
        api.put_pod(make_pod("vpn-app", NODE, {"ksbpf.io/tunnels": lab.wg_client,
                                               "ksbpf.io/endpoints": lab.endpoint4}, uid=uid, qos="Burstable"))
        cfg = tmp_path / "ksbpf.toml"
        cfg.write_text(f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n[kubernetes]\nenabled = true\n'
                       f'node_name = "{NODE}"\nkubeconfig = "{api.kubeconfig(tmp_path / "kubeconfig")}"\n'
                       f'cgroup_root = "{top}"\n')
        yield cg, app, str(cfg), api, uid
    for p in procs:
        p.kill()
        p.wait()


def test_daemonset_capabilities_reach_pods_of_other_users(lab, servers, pod_of_other_users):
    cg, app, cfg, api, uid = pod_of_other_users
    caps = grantable(daemonset_caps())
    assert "sys_ptrace" in caps
    d = DaemonProcess(cfg, prefix=tuple(setpriv(caps)))
    try:
        d.wait_for("pod_protected", pod="default/vpn-app", cgroup=cg)
        api.wait(lambda: "ksbpf.io/protected" in api.pods[uid]["metadata"]["annotations"])
        gate = run_gate(app, lab.client_ns, timeout=20,
                        annotations=downward(api.pod(uid)["metadata"]["annotations"], protected=False))
        assert gate.returncode == 0, gate.stderr
        assert probe(lab, app, "udp", lab.net4_server, servers["udp"]).ok                        # the tunnel
        assert not probe(lab, app, "udp", lab.phy4_server, servers["udp"], timeout=0.5).ok      # outside it
    finally:
        d.stop()


def test_without_sys_ptrace_the_pod_stays_pending_and_says_why(lab, pod_of_other_users):
    cg, app, cfg, api, uid = pod_of_other_users
    caps = [c for c in grantable(daemonset_caps()) if c != "sys_ptrace"]
    d = DaemonProcess(cfg, prefix=tuple(setpriv(caps)))
    try:
        pending = d.wait_for("pod_pending", pod="default/vpn-app", timeout=30)
        while "CAP_SYS_PTRACE" not in pending["why"]:   # first "no cgroup yet" is possible, never protected
            pending = d.wait_for("pod_pending", pod="default/vpn-app", after=d.events.index(pending) + 1)
        api.wait(lambda: any(e["reason"] == "KsbpfBlocked" for e in api.events))
        assert "CAP_SYS_PTRACE" in [e for e in api.events if e["reason"] == "KsbpfBlocked"][0]["message"]
        gate = run_gate(app, lab.client_ns, timeout=1,
                        annotations=downward(api.pod(uid)["metadata"]["annotations"], protected=False))
        assert gate.returncode == 1 and "timed out" in gate.stderr, gate.stderr
        assert "has not published" in gate.stderr
        assert not d.named("pod_protected")
    finally:
        d.stop()


def run_unit_daemon(cfg: str, caps: list[str], protect_proc: str) -> DaemonProcess:
    """The daemon as ksbpf.service runs it: its capability bounding set, and a /proc
    mounted as ProtectProc= mounts it, in a mount namespace of its own."""
    inner = " ".join(setpriv(caps))
    script = f'mount -t proc -o hidepid={protect_proc} proc /proc && exec {inner} "$@"'
    return DaemonProcess(cfg, prefix=("unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"))


@pytest.mark.parametrize("with_ptrace", [True, False], ids=["unit", "without-sys-ptrace"])
def test_unit_netns_each_reaches_processes_of_other_users(lab, servers, make_cgroup, tmp_path, with_ptrace):
    caps, protect_proc = unit_caps()
    assert protect_proc == "invisible" and "sys_ptrace" in caps
    caps = grantable(caps if with_ptrace else [c for c in caps if c != "sys_ptrace"])
    cg = make_cgroup()
    child = os.path.join(cg, "app")
    os.mkdir(child)
    proc = as_user(65534, child, lab.client_ns)
    cfg = tmp_path / "ksbpf.toml"
    cfg.write_text(f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n[[scope]]\ncgroup = "{cg}"\n'
                   f'tunnels = ["{lab.wg_client}"]\nnetns = "each"\n')
    d = run_unit_daemon(str(cfg), caps, protect_proc)
    try:
        d.wait_for("ready")
        if with_ptrace:
            d.wait_for("netns_found", timeout=10)
            assert probe(lab, child, "udp", lab.tun4_server, servers["udp"]).ok
        else:
            denied = d.wait_for("netns_denied", scope=cg, timeout=10)
            assert "CAP_SYS_PTRACE" in denied["error"]
            assert not probe(lab, child, "udp", lab.tun4_server, servers["udp"], timeout=0.5).ok
            assert probe(lab, None, "udp", lab.tun4_server, servers["udp"]).ok   # control: the tunnel works
        assert not probe(lab, child, "udp", lab.phy4_server, servers["udp"], timeout=0.5).ok
    finally:
        d.stop()
        proc.kill()
        proc.wait()
