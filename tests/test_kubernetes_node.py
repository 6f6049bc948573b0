"""The node side for real: `ksbpf daemon` with [kubernetes] enabled, fed by
a local replaying API server (tests/kubeapi.py: no API server can run
here), protecting pods laid out as the kubelet makes them (tests/kubelet.py)
whose processes live in a network namespace with a real wireguard-go
tunnel (the lab).  Checked: the node's ksbpf.io/agent-not-ready taint is
removed once the daemon is ready (other taints kept); an annotated pod is
protected (traffic outside the tunnel counted and never arriving, the tunnel
working) and the daemon says so on it (ksbpf.io/protected, a KsbpfProtected
Event); the gate fails closed without the daemon and passes once the pod is
protected and its downward API file carries the daemon's word; a pod with a
bad annotation is fully blocked, marked "blocked:" and gets
KsbpfInvalidAnnotation and KsbpfBlocked Events; a hostNetwork pod is refused
with an Event; a restarted daemon adopts every pod without a gap (and writes
nothing again); deleting a pod removes its scope and pins."""

from __future__ import annotations

import os
import signal
import socket
import uuid

import kubernetes_validate
import pytest
from helpers import DaemonProcess, scope_status
from test_daemon import prog_ids
from test_gate import downward, run_gate

from ksbpf.kernel import pins
from ksbpf.kubernetes import annotations as notes
from harness.kubeapi import FakeApiServer, make_pod
from harness.kubelet import container_dir, pod_dir, start_in
from ksbpf.lab.namespaces import ProbeStream, Sniffer, probe

pytestmark = pytest.mark.lab
NODE = "node-test"
TAINT = {"key": "ksbpf.io/agent-not-ready", "effect": "NoSchedule"}
OTHER_TAINT = {"key": "example.com/other", "value": "x", "effect": "NoExecute"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pod:
    def __init__(self, top: str, lab, driver: str, qos: str, name: str, annotations: dict, **kw):
        self.uid = str(uuid.uuid4())
        self.cgroup = pod_dir(os.path.join(top, "node"), self.uid, driver, qos)
        os.makedirs(self.cgroup)
        self.container = container_dir(self.cgroup, driver, "containerd")
        self.proc = start_in(self.container, lab.client_ns)   # the pod's process, in the lab's client namespace
        self.obj = make_pod(name, NODE, annotations, uid=self.uid, qos=qos, **kw)
        self.name = f"default/{name}"


def api_uid(api, name: str) -> str:
    return next(uid for uid, p in api.pods.items() if p["metadata"]["name"] == name)


@pytest.fixture
def node(lab, make_cgroup, tmp_path):
    top = make_cgroup()
    pods: list[Pod] = []
    daemons: list[DaemonProcess] = []
    with FakeApiServer() as api:
        api.put_node(NODE, taints=[TAINT, OTHER_TAINT])
        cfg = tmp_path / "ksbpf.toml"
        cfg.write_text(f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n[kubernetes]\nenabled = true\n'
                       f'node_name = "{NODE}"\nkubeconfig = "{api.kubeconfig(tmp_path / "kubeconfig")}"\n'
                       f'cgroup_root = "{top}"\n')

        def add_pod(*args, **kw) -> Pod:
            pod = Pod(top, lab, *args, **kw)
            pods.append(pod)
            api.put_pod(pod.obj)
            return pod

        def start() -> DaemonProcess:
            d = DaemonProcess(str(cfg))
            daemons.append(d)
            d.wait_for("ready")
            return d

        yield api, add_pod, start
        for d in daemons:
            d.stop()
        for p in pods:
            p.proc.kill()
            p.proc.wait()


def test_pods_protected_refused_blocked_adopted_and_released(lab, servers, node):
    api, add_pod, start = node
    good = add_pod("systemd", "Burstable", "vpn-app", {
        "ksbpf.io/tunnels": lab.wg_client, "ksbpf.io/endpoints": lab.endpoint4,
        "ksbpf.io/allow-cidrs": "10.96.0.0/12"})
    bad = add_pod("cgroupfs", "BestEffort", "typo-app", {"ksbpf.io/tunnels": lab.wg_client,
                                                          "ksbpf.io/allow-lan": "yes please"})
    add_pod("systemd", "Guaranteed", "host-app", {"ksbpf.io/tunnels": "wg0"}, host_network=True)
    udp = servers["udp"]

    # no daemon: the gate fails closed (its datagram goes out, and nobody said it is protected)
    gate = run_gate(good.container, lab.client_ns, timeout=1,
                    annotations=downward(good.obj["metadata"]["annotations"], protected=False))
    assert gate.returncode == 1 and "timed out" in gate.stderr, gate.stderr
    assert [t["key"] for t in api.nodes[NODE]["spec"]["taints"]] == [TAINT["key"], OTHER_TAINT["key"]]

    d = start()
    d.wait_for("node_taint_removed", node=NODE, taint=TAINT["key"])
    assert api.nodes[NODE]["spec"]["taints"] == [OTHER_TAINT]       # only its own
    protected = d.wait_for("pod_protected", pod=good.name)
    assert (protected["driver"], protected["qos"], protected["blocked"]) == ("systemd", "burstable", False)
    assert protected["allow_cidrs"] == ["10.96.0.0/12"]
    assert d.wait_for("pod_protected", pod=bad.name)["blocked"] is True
    d.wait_for("pod_annotation_invalid", pod=bad.name)
    d.wait_for("pod_refused", pod="default/host-app", reason="HostNetworkRefused")
    key = "ksbpf.io/" + notes.PROTECTED
    api.wait(lambda: key in (api.pods[good.uid]["metadata"].get("annotations") or {})
             and key in (api.pods[bad.uid]["metadata"].get("annotations") or {}))
    good_notes = api.pod(good.uid)["metadata"]["annotations"]
    assert good_notes[key] == notes.digest(good_notes, "ksbpf.io/")
    bad_notes = api.pod(bad.uid)["metadata"]["annotations"]
    assert bad_notes[key] == "blocked:" + notes.digest(bad_notes, "ksbpf.io/")
    assert key not in api.pod(api_uid(api, "host-app"))["metadata"]["annotations"]
    said = downward(good_notes, protected=False)   # the kubelet's downward API file, with the daemon's word
    gate = run_gate(good.container, lab.client_ns, timeout=20, annotations=said)
    assert gate.returncode == 0, gate.stderr
    assert f"{lab.phy_client}: refused" in gate.stderr
    gate = run_gate(bad.container, lab.client_ns, timeout=1, annotations=downward(bad_notes, protected=False))
    assert gate.returncode == 1 and "blocks ALL" in gate.stderr, gate.stderr

    with Sniffer(lab) as sniffer:
        assert probe(lab, good.container, "udp", lab.net4_server, udp).ok          # through the tunnel
        assert not probe(lab, good.container, "udp", lab.phy4_server, udp, timeout=0.5).ok   # outside it
        assert not probe(lab, bad.container, "udp", lab.net4_server, udp, timeout=0.5).ok    # fully blocked
        assert not probe(lab, bad.container, "udp", lab.phy4_server, udp, timeout=0.5).ok
    assert sniffer.count == 0, sniffer.packets
    assert scope_status(good.cgroup)["counters"]["not_tunnel"]["packets"] >= 1
    assert scope_status(bad.cgroup)["counters"]["not_tunnel"]["packets"] >= 2

    want = ["HostNetworkRefused", "KsbpfBlocked", "KsbpfInvalidAnnotation", "KsbpfProtected"]
    api.wait(lambda: len(api.events) >= len(want))
    assert sorted(e["reason"] for e in api.events) == want, [(e["reason"], e["involvedObject"]["name"], e["message"]) for e in api.events]
    for event in api.events:
        kubernetes_validate.validate(event, "1.37.0", strict=True)
    by_reason = {e["reason"]: e for e in api.events}
    assert "yes please" in by_reason["KsbpfInvalidAnnotation"]["message"]
    assert by_reason["KsbpfBlocked"]["involvedObject"]["name"] == "typo-app"
    assert (by_reason["KsbpfProtected"]["involvedObject"]["name"], by_reason["KsbpfProtected"]["type"]) == \
        ("vpn-app", "Normal")
    patches = len(api.patches)

    # a restarted daemon adopts every pod: nothing detached or re-attached, no gap, no leak
    before = {p.cgroup: prog_ids(p.cgroup) for p in (good, bad)}
    with Sniffer(lab) as sniffer:
        with ProbeStream(lab, good.container, lab.net4_server, udp, interval_ms=5) as through, \
                ProbeStream(lab, good.container, lab.phy4_server, udp, interval_ms=5) as outside:
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait()
            d2 = start()
            d2.wait_for("scope_adopted", scope=good.cgroup)
            d2.wait_for("scope_adopted", scope=bad.cgroup)
            d2.wait_for("pod_protected", pod=good.name)
    assert sniffer.count == 0, sniffer.packets
    assert through.result.sent > 0 and through.result.blocked == 0, through.result   # never interrupted
    assert outside.result.sent == 0 and outside.result.blocked > 0
    assert {p.cgroup: prog_ids(p.cgroup) for p in (good, bad)} == before
    assert len(api.patches) == patches     # what it enforces was already said: nothing written again

    # the pod is deleted: its scope and pins go
    pin_dir = pins.scope_dir(os.stat(good.cgroup).st_ino)
    assert os.path.isdir(pin_dir)
    api.delete_pod(good.uid)
    d2.wait_for("pod_released", pod=good.name)
    d2.wait_for("scope_removed", scope=good.cgroup)
    assert prog_ids(good.cgroup) == [] and not os.path.exists(pin_dir)
    assert prog_ids(bad.cgroup) == before[bad.cgroup]
