"""A pod's cgroup and network namespace found from its UID, in real cgroup
trees laid out as the kubelet makes them (both drivers, every QoS class,
containerd, CRI-O and Docker container cgroups), with real processes in
real network namespaces."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from ksbpf.kubernetes import discovery
from ksbpf.lab.kubelet import CONTAINER_DIRS, LAYOUTS, container_dir, pod_dir, start_in

pytestmark = pytest.mark.root


@pytest.mark.parametrize("driver,qos", sorted(LAYOUTS))
def test_every_layout_is_found(make_cgroup, driver, qos):
    top = make_cgroup()
    procs = []
    try:
        uid = str(uuid.uuid4())
        other = pod_dir(os.path.join(top, "node"), str(uuid.uuid4()), driver, qos)   # a neighbour pod
        os.makedirs(other)
        pod = pod_dir(os.path.join(top, "node"), uid, driver, qos)   # below a --cgroup-root, as kind does
        os.makedirs(pod)
        runtimes = [r for d, r in CONTAINER_DIRS if d == driver]
        dirs = [container_dir(pod, driver, r) for r in runtimes]
        sandbox = start_in(dirs[0], "new")
        procs.append(sandbox)
        if driver == "systemd":   # CRI-O's conmon: in the pod's cgroup, in the node's namespace
            conmon = os.path.join(pod, f"crio-conmon-{uuid.uuid4().hex * 2}.scope")
            os.makedirs(conmon)
            procs.append(start_in(conmon, None))
        found, ns = None, None
        for _ in range(100):   # until the process has entered its namespace
            found = discovery.find_pod(uid, discovery.kubepods_roots(top))
            ns = discovery.pod_netns(found) if found else None
            if ns:
                break
            time.sleep(0.02)
        assert found and found.path == pod, found
        assert (found.driver, found.qos) == (driver, qos.lower())
        want = {"systemd": {"containerd", "cri-o", "docker", "cri-o-conmon"},
                "cgroupfs": {"containerd-or-docker", "cri-o"}}[driver]
        assert set(found.runtimes) == want
        assert ns.inode == os.stat(f"/proc/{sandbox.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
        assert ns.path == f"/proc/{sandbox.pid}/ns/net"
        # a path already in use is kept while it names the same namespace (a restarted daemon adopts)
        second = start_in(dirs[-1], None, "nsenter", f"--net=/proc/{sandbox.pid}/ns/net", "sleep", "600")
        procs.append(second)
        assert discovery.pod_netns(found, prefer=ns.path).path == ns.path
        assert discovery.find_pod(str(uuid.uuid4()), discovery.kubepods_roots(top)) is None
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_qos_level_of_another_name_is_found_by_looking(make_cgroup):
    """The kubelet's own names are tried first; any other level is found by walking."""
    top = make_cgroup()
    uid = str(uuid.uuid4())
    pod = os.path.join(top, "kubepods.slice", "kubepods-burstable.slice", "extra.slice",
                       f"kubepods-burstable-extra-pod{uid.replace('-', '_')}.slice")
    os.makedirs(pod)
    assert discovery.find_pod(uid, discovery.kubepods_roots(top)) is None   # two levels down: not a pod of this root
    inner = os.path.join(top, "kubepods", "other-level", f"pod{uid}")
    os.makedirs(inner)
    found = discovery.find_pod(uid, discovery.kubepods_roots(top))
    assert found and found.path == inner and found.driver == "cgroupfs" and found.qos == "other-level"
