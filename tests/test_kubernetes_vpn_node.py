"""ksbpf.io/vpn-container for real: the daemon with [kubernetes] (the local
replaying API server, pods laid out as the kubelet makes them, the lab's real
wireguard-go tunnel).  The pod's gate runs before its VPN sidecar starts, so
the daemon protects the pod at once with the endpoint exception closed; when
the sidecar's container appears in the pod's status, its cgroup becomes the
scope's --vpn-cgroup: the sidecar reaches the wildcard endpoint outside the
tunnel, the app container does not (endpoint_not_vpn)."""

from __future__ import annotations

import os

import pytest
from helpers import scope_status, wait_until
from test_kubernetes_node import node  # noqa: F401  (the fixture)

from harness.kubelet import container_dir
from ksbpf.lab.namespaces import probe

pytestmark = pytest.mark.lab


def test_vpn_container_becomes_the_vpn_cgroup(lab, servers, node):  # noqa: F811
    api, add_pod, start = node
    udp = servers["udp"]
    pod = add_pod("systemd", "Burstable", "vpn-sidecar-app", {
        "ksbpf.io/tunnels": lab.wg_client, "ksbpf.io/endpoints": f"*:{udp}/udp",
        "ksbpf.io/vpn-container": "vpn"})
    d = start()
    d.wait_for("pod_protected", pod=pod.name)
    ev = d.wait_for("pod_vpn_container", pod=pod.name)
    assert ev["cgroup"] is None and "not started yet" in ev["note"], ev
    st = scope_status(pod.cgroup)
    assert st["any_endpoints"] == [] and st["vpn_cgroups"] == []   # closed until the sidecar is there
    assert probe(lab, pod.container, "udp", lab.net4_server, udp).ok                 # control: the tunnel works
    assert not probe(lab, pod.container, "udp", lab.phy4_server, udp, timeout=0.5).ok

    # the sidecar starts: its container cgroup below the pod's, its id in the pod's status
    vpn = container_dir(pod.cgroup, "systemd", "containerd")
    cid = os.path.basename(vpn)[len("cri-containerd-"):-len(".scope")]
    obj = api.pod(pod.uid)
    obj["status"]["initContainerStatuses"] = [{
        "name": "vpn", "containerID": f"containerd://{cid}", "image": "docker.io/library/wireguard:latest",
        "imageID": "docker.io/library/wireguard@sha256:" + "0" * 64, "ready": True, "restartCount": 0,
        "started": True, "state": {"running": {"startedAt": "2026-11-26T07:00:02Z"}}}]
    api.put_pod(obj)
    ev = d.wait_for("pod_vpn_container", pod=pod.name, cgroup=vpn, timeout=30)
    wait_until(lambda: scope_status(pod.cgroup)["vpn_cgroups"] == [vpn], 20, "the sidecar's cgroup in force")
    st = scope_status(pod.cgroup)
    assert st["any_endpoints"] == [f"*:{udp}/udp"], st

    before = st["counters"]["endpoint_not_vpn"]["packets"]
    assert probe(lab, vpn, "udp", lab.phy4_server, udp).ok            # the VPN client: outside the tunnel
    assert not probe(lab, pod.container, "udp", lab.phy4_server, udp, timeout=0.5).ok   # the app: no
    assert scope_status(pod.cgroup)["counters"]["endpoint_not_vpn"]["packets"] > before

    # the sidecar restarts: a new container, a new cgroup -- taken when the pod's status says so
    vpn2 = container_dir(pod.cgroup, "systemd", "containerd")
    cid2 = os.path.basename(vpn2)[len("cri-containerd-"):-len(".scope")]
    obj = api.pod(pod.uid)
    obj["status"]["initContainerStatuses"][0].update(containerID=f"containerd://{cid2}", restartCount=1)
    api.put_pod(obj)
    d.wait_for("pod_vpn_container", pod=pod.name, cgroup=vpn2, timeout=30)
    wait_until(lambda: scope_status(pod.cgroup)["vpn_cgroups"] == [vpn2], 20, "the new cgroup in force")
    assert probe(lab, vpn2, "udp", lab.phy4_server, udp).ok
    assert not probe(lab, vpn, "udp", lab.phy4_server, udp, timeout=0.5).ok   # the old one is no VPN client now
    assert d.proc.poll() is None
