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
from harness.kubelet import CONTAINER_DIRS, LAYOUTS, container_dir, pod_dir, start_in

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


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "kubernetes_cgroups")
FIND = r"""
import json, os, subprocess, sys
top, cg2, lines = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
subprocess.run(["mount", "-t", "tmpfs", "none", top], check=True)
os.mkdir(os.path.join(top, "unified"))
subprocess.run(["mount", "--bind", cg2, os.path.join(top, "unified")], check=True)
for line in lines:
    os.makedirs(os.path.join(top, line), exist_ok=True)
from ksbpf.kubernetes import discovery
roots = discovery.kubepods_roots(top)
out = {}
for uid in sys.argv[4:]:
    pod = discovery.find_pod(uid, roots)
    out[uid] = pod and [os.path.relpath(pod.path, top), pod.driver, pod.qos, pod.runtimes]
print(json.dumps({"roots": [os.path.relpath(r, top) for r in roots], "pods": out}))
"""


def fixture(name: str) -> tuple[list[str], list[tuple[str, str, str, list[str], str]]]:
    lines, expect = [], []
    with open(os.path.join(FIXTURES, name)) as f:
        for line in f:
            if line.startswith("# expect "):
                uid, driver, qos, runtimes, path = line.split()[2:]
                expect.append((uid, driver, qos, sorted(runtimes.split(",")), path))
            elif line.strip() and not line.startswith("#"):
                lines.append(line.strip())
    assert expect and lines
    return lines, expect


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(FIXTURES) if n.endswith(".txt") and n != "hybrid.txt"))
def test_real_node_layouts_are_found(make_cgroup, name):
    """Trees copied from real nodes (kind, containerd and CRI-O under both drivers,
    a node inside a container), made for real in cgroup v2."""
    top = make_cgroup()
    lines, expect = fixture(name)
    for line in lines:
        os.makedirs(os.path.join(top, line), exist_ok=True)
    roots = discovery.kubepods_roots(top)
    for uid, driver, qos, runtimes, path in expect:
        found = discovery.find_pod(uid, roots)
        assert found, (uid, roots)
        assert (found.path, found.driver, found.qos, found.runtimes) == (os.path.join(top, path), driver, qos, runtimes)
    assert discovery.find_pod(str(uuid.uuid4()), roots) is None


def test_hybrid_host_picks_the_cgroup2_tree_never_a_v1_controller(make_cgroup, tmp_path):
    """/sys/fs/cgroup of a hybrid host as the DaemonSet mounts it (/host/cgroup): v1
    controller directories with the kubelet's names, and the v2 tree at unified/ --
    a tmpfs with plain directories and a cgroup2 bind mount, in a mount namespace."""
    import json
    import subprocess
    import sys
    lines, expect = fixture("hybrid.txt")
    top = tmp_path / "host-cgroup"
    top.mkdir()
    cg2 = make_cgroup()
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", FIND, str(top), cg2,
                           json.dumps(lines), *[e[0] for e in expect]], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["roots"] == ["unified/kubepods.slice"]
    for uid, driver, qos, runtimes, path in expect:
        assert out["pods"][uid] == [path, driver, qos, runtimes]
    # the v1 names alone are never taken for pods
    v1 = [line.replace("unified/", "blkio/") for line in lines if line.startswith("unified/")]
    empty = make_cgroup("-empty")   # an empty v2 tree this time
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", FIND, str(top), empty,
                           json.dumps(v1), expect[0][0]], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["pods"] == {expect[0][0]: None}
