"""The DaemonSet as deployed: the image (tests/kube_image.py builds `make
image`'s Dockerfile), run with Podman exactly as deploy/kubernetes/daemonset.yaml
declares each container -- securityContext, capabilities, user, read-only
root, host namespaces, volumes and their propagation, environment, command
-- translated from the manifest here (a field this translation does not know
fails the test, so the two cannot drift), against a node made of:

- its filesystem: a directory per hostPath (an empty /var/cache/ksbpf, a
  /sys/fs/bpf with no BPF filesystem on it yet), and the node's cgroup v2
  tree: a cgroup of this test, laid out by the kubelet's systemd driver;
- the example pod (deploy/kubernetes/example/vpn-pod.yaml's annotations):
  its sandbox (pause) runs as 65535 and its app as 65534, in a network
  namespace of the lab; its VPN sidecar is a real wireguard-go, root with
  CAP_NET_ADMIN only, in the pod's cgroup; its gate is the example's init
  container run from the image by Podman (translated the same way: user
  65534, no capability, read-only root, the downward API volume) in the
  pod's namespace and below its cgroup;
- the API server: the replaying one (tests/harness/kubeapi.py).

The sequence: mount-bpffs mounts the BPF filesystem (Bidirectional: the node
sees it); warm-cache fills the empty cache with its own capabilities; the
gate fails before the daemon runs and passes once it has attached the pod's
policy and said so on the pod (ksbpf.io/protected, in the gate's downward API
file); the daemon removes the node's ksbpf.io/agent-not-ready taint; the
sidecar's tunnel comes up and is registered; the app's traffic goes through
it and nowhere else; the tunnel dies and nothing leaks (a control outside
the pod must arrive).

Not translated, said here: the ConfigMap's ksbpf.toml is used with three
values changed (the metrics port, a free one: hostNetwork is this machine's
network; the API server's kubeconfig, since the replaying server speaks plain
HTTP and in-cluster credentials need HTTPS; nothing else), and a capability
this machine's own bounding set lacks cannot be granted (printed)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid

import pytest
import yaml
from helpers import DaemonProcess
from test_gate import downward, run_gate
from test_kubernetes_privileges import as_user, grantable

from ksbpf.kernel import cgroup
from harness.kubeapi import FakeApiServer, make_pod
from harness.kubelet import container_dir, pod_dir
from ksbpf.lab.namespaces import Sniffer, probe

pytestmark = [pytest.mark.lab, pytest.mark.root]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KDIR = os.path.join(REPO, "deploy", "kubernetes")
NODE = "node-deployed"

KNOWN_POD = {"serviceAccountName", "priorityClassName", "hostNetwork", "hostPID", "dnsPolicy",
             "terminationGracePeriodSeconds", "tolerations", "initContainers", "containers", "volumes"}
KNOWN_CONTAINER = {"name", "image", "imagePullPolicy", "command", "env", "ports", "livenessProbe", "readinessProbe",
                   "startupProbe", "resources", "securityContext", "volumeMounts"}
KNOWN_SC = {"privileged", "runAsUser", "runAsGroup", "runAsNonRoot", "allowPrivilegeEscalation",
            "readOnlyRootFilesystem", "capabilities", "seccompProfile", "appArmorProfile"}
KNOWN_MOUNT = {"name", "mountPath", "readOnly", "mountPropagation"}
PROPAGATION = {None: "rprivate", "None": "rprivate", "HostToContainer": "rslave", "Bidirectional": "rshared"}


def manifest(path: str) -> dict:
    with open(os.path.join(KDIR, path)) as f:
        return yaml.safe_load(f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """The node's side of the translation: where each hostPath, configMap and emptyDir is."""

    def __init__(self, podman, root: str, cgroup_top: str, config_dir: str):
        self.podman, self.root, self.cgroup_top, self.config_dir = podman, root, cgroup_top, config_dir

    def host_path(self, path: str, kind: str) -> str:
        if path == "/sys/fs/cgroup":            # the node's cgroup v2 tree: this test's cgroup
            assert kind == "Directory"
            return self.podman.path_of(self.cgroup_top)
        local = os.path.join(self.root, path.lstrip("/"))
        if kind == "DirectoryOrCreate":
            os.makedirs(local, exist_ok=True)
        if path == "/sys/kernel/security":      # no type: the node's securityfs (the test writes its lsm file)
            assert kind is None, kind
            os.makedirs(local, exist_ok=True)
            return local
        assert kind in ("Directory", "DirectoryOrCreate") and os.path.isdir(local), (path, kind)
        return local


def podman_run(pod: dict, c: dict, node: Node, image: str, name: str, sandbox: tuple[str, str] | None = None,
               files: dict[str, str] | None = None) -> list[str]:
    """`podman run` arguments for container `c` of pod spec `pod`, as a kubelet would run it.
    sandbox: (network namespace path, container cgroup) of the pod it belongs to;
    files: downward API volume name -> the directory holding its files."""
    assert set(pod) <= KNOWN_POD, set(pod) - KNOWN_POD
    assert set(c) <= KNOWN_CONTAINER, set(c) - KNOWN_CONTAINER
    args = ["run", "--rm", "--name", name, "--cgroupns=private", "--ipc=private"]
    if sandbox:        # a container of the pod: its namespace, a cgroup below its container cgroup
        assert not pod.get("hostNetwork")
        parent = "/" + os.path.relpath(sandbox[1], cgroup.cgroup2_root())   # a cgroup path, not a file path
        args += [f"--network=ns:{sandbox[0]}", f"--cgroup-parent={parent}"]
    else:
        args += ["--network=host"] if pod.get("hostNetwork") else ["--network=none"]
    if pod.get("hostPID"):
        args.append("--pid=host")
    sc = c.get("securityContext", {})
    assert set(sc) <= KNOWN_SC, set(sc) - KNOWN_SC
    if sc.get("privileged"):
        args.append("--privileged")
    else:
        caps = sc.get("capabilities", {})
        assert set(caps) <= {"add", "drop"} and caps.get("drop") == ["ALL"], caps
        args.append("--cap-drop=all")
        args += [f"--cap-add=CAP_{cap.upper()}" for cap in grantable([n.lower() for n in caps.get("add", [])])]
    if "runAsUser" in sc:
        args += ["--user", f"{sc['runAsUser']}:{sc['runAsGroup']}" if "runAsGroup" in sc else str(sc["runAsUser"])]
    if sc.get("runAsNonRoot"):
        assert sc.get("runAsUser", 0) != 0, sc
    if sc.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]   # only the volumes are writable
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    for key, opt in (("seccompProfile", "seccomp"), ("appArmorProfile", "apparmor")):
        if key in sc and sc[key] != {"type": "RuntimeDefault"}:   # RuntimeDefault: podman's own profile
            assert sc[key] == {"type": "Unconfined"}, sc[key]
            args += ["--security-opt", f"{opt}=unconfined"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for m in c.get("volumeMounts", []):
        assert set(m) <= KNOWN_MOUNT, m
        vol = volumes[m["name"]]
        ro = ",ro" if m.get("readOnly") else ""
        if "hostPath" in vol:
            src = node.host_path(vol["hostPath"]["path"], vol["hostPath"].get("type"))
            args += ["-v", f"{src}:{m['mountPath']}:{PROPAGATION[m.get('mountPropagation')]}{ro}"]
        elif "configMap" in vol:
            assert vol["configMap"]["name"] == "ksbpf-config"
            args += ["-v", f"{node.config_dir}:{m['mountPath']}:ro"]
        elif "downwardAPI" in vol:
            assert vol["downwardAPI"]["items"] == [{"path": "annotations",
                                                   "fieldRef": {"fieldPath": "metadata.annotations"}}], vol
            args += ["-v", f"{files[m['name']]}:{m['mountPath']}:ro"]
        elif "emptyDir" in vol:
            if vol["emptyDir"].get("medium") == "Memory":
                args += ["--mount", f"type=tmpfs,destination={m['mountPath']}"]
            else:
                local = os.path.join(node.root, "emptydir", name, m["name"])
                os.makedirs(local, exist_ok=True)
                args += ["-v", f"{local}:{m['mountPath']}:rprivate"]
        else:
            raise AssertionError(f"unknown volume kind: {vol}")
    for e in c.get("env", []):
        if "value" in e:
            args += ["--env", f"{e['name']}={e['value']}"]
        else:
            assert e["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}, e
            args += ["--env", f"{e['name']}={NODE}"]
    return args + [image, *c["command"]]


@pytest.fixture
def node(podman, ksbpf_image, make_cgroup, tmp_path):
    top = make_cgroup()
    root = tmp_path / "node"
    root.mkdir()
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    n = Node(podman, str(root), top, str(config_dir))
    # the node's /sys/fs/bpf: an empty directory that is a shared mount point, as on a
    # node (systemd makes / shared), in the runtime's mount namespace
    bpffs = os.path.join(root, "sys", "fs", "bpf")
    os.makedirs(bpffs)
    made = podman.sh(f"mount --bind {bpffs} {bpffs} && mount --make-shared {bpffs}")
    assert made.returncode == 0, made.stderr
    yield n
    podman("rm", "--all", "--force", check=False)
    podman.sh(f"umount -R {bpffs}")


def test_daemonset_as_deployed_protects_the_example_pod(podman, ksbpf_image, node, lab, servers, tmp_path):
    ds = manifest("daemonset.yaml")
    spec = ds["spec"]["template"]["spec"]
    inits = {c["name"]: c for c in spec["initContainers"]}
    (daemon_c,) = spec["containers"]
    example = manifest("example/vpn-pod.yaml")
    gate_c = example["spec"]["initContainers"][0]

    with FakeApiServer() as api:
        api.put_node(NODE, taints=[{"key": "ksbpf.io/agent-not-ready", "effect": "NoSchedule"}])
        # the configuration: the ConfigMap's, three values changed (see the module's docstring)
        toml = manifest("configmap.yaml")["data"]["ksbpf.toml"]
        shutil.copy(api.kubeconfig(tmp_path / "kubeconfig"), os.path.join(node.config_dir, "kubeconfig"))
        changed = (toml.replace('listen = "0.0.0.0:12479"', f'listen = "127.0.0.1:{free_port()}"')
                   .replace('kubeconfig = ""', 'kubeconfig = "/etc/ksbpf/kubeconfig"'))
        assert changed.count("127.0.0.1:") == 1 and "/etc/ksbpf/kubeconfig" in changed
        with open(os.path.join(node.config_dir, "ksbpf.toml"), "w") as f:
            f.write(changed)

        # the example pod: pause as 65535, the app as 65534, the sidecar (later) root with NET_ADMIN
        lab.tunnel_down()
        uid = str(uuid.uuid4())
        pod_cg = pod_dir(node.cgroup_top, uid, "systemd", "Burstable")
        os.makedirs(pod_cg)
        pause, gate_cg, sidecar, app = (container_dir(pod_cg, "systemd", "containerd") for _ in range(4))
        procs = [as_user(65535, pause, lab.client_ns, "sleep", "600"), as_user(65534, app, lab.client_ns)]
        annotations = dict(example["metadata"]["annotations"])
        annotations.update({"ksbpf.io/tunnels": lab.wg_client, "ksbpf.io/endpoints": lab.endpoint4})
        api.put_pod(make_pod("vpn-app", NODE, annotations, uid=uid, qos="Burstable"))
        try:
            # 1. mount-bpffs: privileged, Bidirectional -- the node sees the BPF filesystem
            assert podman.sh(f"stat -f -c %T {node.root}/sys/fs/bpf").stdout.strip() != "bpf_fs"
            podman(*podman_run(spec, inits["mount-bpffs"], node, ksbpf_image, "mount-bpffs"), what="mount-bpffs")
            assert podman.sh(f"stat -f -c %T {node.root}/sys/fs/bpf").stdout.strip() == "bpf_fs"
            # 2. warm-cache on an empty cache, with its own capabilities and no node headers
            cache = os.path.join(node.root, "var", "cache", "ksbpf")
            assert not os.path.exists(cache) or os.listdir(cache) == []
            podman(*podman_run(spec, inits["warm-cache"], node, ksbpf_image, "warm-cache"), what="warm-cache",
                   timeout=600)
            assert len([n for n in os.listdir(cache) if n.endswith(".json") and not n.startswith("btf-")]) == 6, os.listdir(cache)

            # 3. the gate before the daemon: fails closed (its downward API file: the pod's annotations)
            gate = run_gate(gate_cg, lab.client_ns, timeout=1,
                            annotations=downward(api.pod(uid)["metadata"]["annotations"], protected=False))
            assert gate.returncode == 1 and "timed out" in gate.stderr, gate.stderr

            # 4. the daemon, as the DaemonSet runs it, on a node whose active LSMs lack `bpf` (Ubuntu's):
            #    it reads them through the securityfs volume and does not claim a layer that would never run
            with open(os.path.join(node.host_path("/sys/kernel/security", None), "lsm"), "w") as f:
                f.write("lockdown,capability,landlock,yama,apparmor")
            d = DaemonProcess("", argv=podman.argv(*podman_run(spec, daemon_c, node, ksbpf_image, "ksbpf")),
                              env=podman.env)
            try:
                protected = d.wait_for("pod_protected", pod="default/vpn-app", timeout=120)
                assert "`bpf` is not among the active LSMs (lockdown,capability,landlock,yama,apparmor)" in \
                    d.wait_for("kernel")["raw_sockets"], d.wait_for("kernel")
                d.wait_for("node_taint_removed", node=NODE)          # with the DaemonSet's RBAC's verbs
                assert api.nodes[NODE]["spec"]["taints"] == []
                assert not d.named("kubernetes_write_failed")
                assert protected["cgroup"] == f"/host/cgroup/{os.path.relpath(pod_cg, node.cgroup_top)}"
                assert (protected["driver"], protected["qos"], protected["blocked"]) == ("systemd", "burstable", False)
                # the daemon's word on the pod, which the kubelet puts in the gate's downward API file
                api.wait(lambda: "ksbpf.io/protected" in api.pods[uid]["metadata"]["annotations"])
                said = downward(api.pod(uid)["metadata"]["annotations"], protected=False)
                # the example's gate, from the image, as the example declares it (user, no capability,
                # read-only root, its downward API volume), in the pod's namespace and cgroup
                gate_c["image"] = ksbpf_image
                argv = podman_run(example["spec"], gate_c, node, ksbpf_image, "ksbpf-gate",
                                  sandbox=(f"/proc/{procs[0].pid}/ns/net", gate_cg),
                                  files={"ksbpf-pod": os.path.dirname(said)})
                gate = podman(*argv, what="ksbpf-gate (the example's)", check=False, timeout=180)
                assert gate.returncode == 0, gate.stdout + gate.stderr
                assert f"{lab.phy_client}: refused" in gate.stderr and "enforces this pod's annotations" in gate.stderr

                # 5. the sidecar's tunnel: wireguard-go in the pod, root with only NET_ADMIN
                mark = len(d.events)
                lab.client_cgroup = sidecar
                lab.tunnel_up()     # its handshake leaves through the annotated endpoint
                d.wait_for("tunnel_appeared", after=mark, tunnel=lab.wg_client, timeout=30)
                with Sniffer(lab) as sniffer:
                    assert probe(lab, app, "udp", lab.net4_server, servers["udp"]).ok                   # through it
                    assert not probe(lab, app, "udp", lab.phy4_server, servers["udp"], timeout=0.5).ok  # outside it
                assert sniffer.count == 0, sniffer.packets
                assert sniffer.wireguard > 0                 # the capture saw the tunnel's own packets

                # 6. the tunnel dies: nothing of the app's (UDP) leaks; a control outside the pod (TCP) arrives
                lab.tunnel_down()
                with Sniffer(lab) as sniffer:
                    assert not probe(lab, app, "udp", lab.net4_server, servers["udp"], timeout=0.5).ok
                    assert not probe(lab, app, "udp", lab.phy4_server, servers["udp"], timeout=0.5).ok
                    assert probe(lab, None, "tcp", lab.phy4_server, servers["tcp"]).ok   # control: not in the pod
                assert sniffer.count >= 1, "the capture saw nothing, not even the control"
                assert all(p.proto == "tcp" for p in sniffer.packets), sniffer.packets
            finally:
                podman("stop", "--time", "5", "ksbpf", check=False)
                d.stop()
                print("\n".join(d.lines[-40:]))
        finally:
            lab.client_cgroup = None
            for p in procs:
                p.kill()
                p.wait()
