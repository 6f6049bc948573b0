"""Pod cgroups laid out exactly as the kubelet makes them, with real
processes in real network namespaces (for tests and benchmarks)."""

from __future__ import annotations

import os
import subprocess
import uuid

LAYOUTS = {   # (driver, QoS) -> the pod cgroup's path below the kubepods root's parent
    ("systemd", "Guaranteed"): "kubepods.slice/kubepods-pod{u_}.slice",
    ("systemd", "Burstable"): "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u_}.slice",
    ("systemd", "BestEffort"): "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u_}.slice",
    ("cgroupfs", "Guaranteed"): "kubepods/pod{u}",
    ("cgroupfs", "Burstable"): "kubepods/burstable/pod{u}",
    ("cgroupfs", "BestEffort"): "kubepods/besteffort/pod{u}",
}
CONTAINER_DIRS = {   # (driver, runtime) -> a container cgroup's name
    ("systemd", "containerd"): "cri-containerd-{id}.scope",
    ("systemd", "cri-o"): "crio-{id}.scope",
    ("systemd", "docker"): "docker-{id}.scope",
    ("cgroupfs", "containerd"): "{id}",
    ("cgroupfs", "cri-o"): "crio-{id}",
    ("cgroupfs", "docker"): "{id}",
}


def pod_dir(root: str, uid: str, driver: str, qos: str) -> str:
    return os.path.join(root, LAYOUTS[(driver, qos)].format(u=uid, u_=uid.replace("-", "_")))


def container_dir(pod: str, driver: str, runtime: str) -> str:
    path = os.path.join(pod, CONTAINER_DIRS[(driver, runtime)].format(id=uuid.uuid4().hex * 2))
    os.makedirs(path)
    return path


def start_in(cgroup_dir: str, netns: str | None, *cmd: str) -> subprocess.Popen:
    """A process in the cgroup: in the named namespace, in a new one (netns="new"), or in ours (None)."""
    enter = {None: [], "new": ["unshare", "--net"]}.get(netns, ["ip", "netns", "exec", netns])
    return subprocess.Popen(["sh", "-c", f'echo $$ > {cgroup_dir}/cgroup.procs && exec "$@"', "sh",
                             *enter, *(cmd or ("sleep", "600"))])
