"""deploy/kubernetes/, validated offline.  Built-in kinds are validated with
kubernetes-validate (strict: unknown fields are errors) for a current
Kubernetes version.  No schema for the Prometheus Operator's CRDs ships
offline, so ServiceMonitor and PrometheusRule are checked structurally: the
fields the operator reads, the ServiceMonitor's selector and port against
the metrics Service, the PrometheusRule's groups equal to
deploy/prometheus/alerts.yml and accepted by `promtool check rules`.  The
ConfigMap's ksbpf.toml passes check-config; the example pod's annotations
parse without error; the kustomization lists every manifest."""

from __future__ import annotations

import os
import subprocess

import kubernetes_validate
import pytest
import yaml

from ksbpf.daemon import config
from ksbpf.kubernetes import annotations as notes

K8S_VERSION = "1.37.0"
HERE = os.path.join(os.path.dirname(__file__), "..", "deploy", "kubernetes")
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def docs(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def manifests() -> dict[str, list[dict]]:
    out = {}
    for root, _dirs, files in os.walk(HERE):
        for name in sorted(files):
            if name.endswith(".yaml") and name != "kustomization.yaml":
                out[os.path.relpath(os.path.join(root, name), HERE)] = docs(os.path.join(root, name))
    return out


def find(kind: str, name: str | None = None) -> dict:
    found = [d for ds in manifests().values() for d in ds if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, found)
    return found[0]


@pytest.mark.parametrize("path", sorted(manifests()))
def test_every_builtin_manifest_is_valid(path):
    for doc in manifests()[path]:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_rejects_a_broken_daemonset():
    ds = find("DaemonSet")
    broken = yaml.safe_load(yaml.safe_dump(ds))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilitiez"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_and_only_those():
    kust = docs(os.path.join(HERE, "kustomization.yaml"))[0]
    listed = set(kust["resources"])
    top = {name for name in manifests() if "/" not in name}
    assert listed == top
    names = {d["metadata"].get("namespace") for p in top for d in manifests()[p] if d["kind"] not in
             ("Namespace", "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy",
              "ValidatingAdmissionPolicyBinding")}
    assert names == {"ksbpf-system"}


def test_daemonset_has_what_the_daemon_needs_and_no_more():
    ds = find("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] and pod["hostPID"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    # SYS_PTRACE: /proc/PID/ns/net of the pods' processes (other users'); test_kubernetes_privileges.py
    assert sorted(sc["capabilities"]["add"]) == ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN", "SYS_PTRACE",
                                                 "SYS_RESOURCE"]
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "lifecycle" not in c                      # no preStop: enforcement outlives the pod
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/sys/fs/bpf"]["name"]]["hostPath"]["path"] == "/sys/fs/bpf"
    assert volumes[mounts["/host/cgroup"]["name"]]["hostPath"]["path"] == "/sys/fs/cgroup"
    inits = {c["name"]: c for c in pod["initContainers"]}
    assert [c["name"] for c in pod["initContainers"]] == ["mount-bpffs", "warm-cache"]
    init = inits["mount-bpffs"]                      # the one privileged step: mount bpffs, Bidirectional
    assert init["securityContext"] == {"privileged": True}
    assert init["volumeMounts"][0]["mountPropagation"] == "Bidirectional"
    warm = inits["warm-cache"]
    assert warm["command"] == ["ksbpf", "warm-cache"] and warm["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert not warm["securityContext"]["privileged"]
    # an empty cache: every entry point is loaded once, the tc and sock_create ones need NET_ADMIN
    assert "NET_ADMIN" in warm["securityContext"]["capabilities"]["add"]
    assert set(warm["securityContext"]["capabilities"]["add"]) <= set(sc["capabilities"]["add"])
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()


# What every node image has (COS, Bottlerocket, Talos and Flatcar have no /usr/src, and
# /lib/modules is not a headers tree there): the BPF filesystem, the cgroup tree, and
# directories the kubelet creates (DirectoryOrCreate).  Kernel headers come with the image.
NODE_PATHS = {"/sys/fs/bpf", "/sys/fs/cgroup"}
# Read if there, never required (no type: no check): the active LSMs (securityfs; its directory is
# in sysfs wherever the kernel has securityfs, mounted or not).
OPTIONAL_PATHS = {"/sys/kernel/security"}


def test_daemonset_needs_no_host_path_that_common_node_images_lack():
    pod = find("DaemonSet")["spec"]["template"]["spec"]
    for v in pod["volumes"]:
        if "hostPath" in v:
            hp = v["hostPath"]
            assert (hp["path"] in NODE_PATHS or hp.get("type") == "DirectoryOrCreate"
                    or (hp["path"] in OPTIONAL_PATHS and "type" not in hp)), v
            assert not hp["path"].startswith(("/usr/src", "/lib/modules")), v
    mounted = {m["mountPath"] for c in pod["containers"] + pod["initContainers"] for m in c.get("volumeMounts", [])}
    assert not mounted & {"/usr/src", "/lib/modules"}


def test_configmap_passes_check_config():
    cm = find("ConfigMap", "ksbpf-config")
    cfg = config.parse(cm["data"]["ksbpf.toml"], "ksbpf.toml")
    ds = find("DaemonSet")
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    assert cfg.kubernetes.enabled and cfg.kubernetes.cgroup_root == "/host/cgroup"
    assert cfg.listen_port == c["ports"][0]["containerPort"]


def test_rbac_allows_pods_read_and_events_create_only():
    role = find("ClusterRole")
    rules = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert {("", "pods", v) for v in ("get", "list", "watch")} <= rules
    assert ("", "events", "create") in rules
    assert ("", "pods", "patch") in rules                                   # ksbpf.io/protected
    assert {("", "nodes", "get"), ("", "nodes", "patch")} <= rules         # its node's not-ready taint
    assert all(r in ("events", "pods", "nodes") for _g, r, _v in rules)
    assert all(v in ("get", "list", "watch", "create", "patch") for _g, _r, v in rules)   # never delete or update
    binding = find("ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ksbpf", "namespace": "ksbpf-system"}]
    assert find("DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == "ksbpf"


def test_service_monitor_matches_the_metrics_service():
    svc, sm = find("Service", "ksbpf"), find("ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    assert all(e["path"] == "/metrics" for e in sm["spec"]["endpoints"])
    ds = find("DaemonSet")
    assert svc["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert svc["metadata"]["name"] == "ksbpf"   # the job label the alerts match: up{job="ksbpf"}


def test_prometheus_rule_carries_the_alerts_file(tmp_path):
    rule = find("PrometheusRule")
    with open(os.path.join(HERE, "..", "prometheus", "alerts.yml")) as f:
        alerts = yaml.safe_load(f)
    assert rule["spec"]["groups"] == alerts["groups"]
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations"} and r["alert"] and r["expr"]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    proc = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_example_pod_gate_first_then_the_native_sidecar():
    pod = find("Pod", "vpn-app")
    parsed = notes.parse(pod["metadata"]["annotations"], "ksbpf.io/", "/proc/1/ns/net")
    assert not parsed.blocked, parsed.errors
    assert parsed.policy.tunnels == ("wg0",) and parsed.policy.allow_cidrs
    gate, sidecar = pod["spec"]["initContainers"]
    assert gate["command"][:2] == ["ksbpf", "gate"] and "restartPolicy" not in gate
    assert gate["securityContext"]["capabilities"] == {"drop": ["ALL"]} and gate["securityContext"]["runAsNonRoot"]
    assert sidecar["restartPolicy"] == "Always" and "startupProbe" in sidecar
    assert sidecar["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    assert all("NET_ADMIN" not in str(c.get("securityContext")) for c in pod["spec"]["containers"])
