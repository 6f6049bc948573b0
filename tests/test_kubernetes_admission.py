"""deploy/kubernetes/admission-policy.yaml: its CEL, evaluated offline by a
CEL interpreter (cel-python) the way the API server evaluates a
ValidatingAdmissionPolicy -- the variables in order, then every validation
against `object`, `oldObject` (null on CREATE) and `request` -- against good
and bad pods.  The manifests themselves are validated with the others
(test_kubernetes_manifests.py)."""

from __future__ import annotations

import copy
import os

import celpy
import pytest
import yaml

HERE = os.path.join(os.path.dirname(__file__), "..", "deploy", "kubernetes")
DAEMON = "system:serviceaccount:ksbpf-system:ksbpf"


def policy() -> dict:
    with open(os.path.join(HERE, "admission-policy.yaml")) as f:
        (vap,) = [d for d in yaml.safe_load_all(f) if d and d["kind"] == "ValidatingAdmissionPolicy"]
    return vap


def admit(obj: dict, old: dict | None = None, user: str = "alice") -> list[str]:
    """The messages of the validations that fail (empty: admitted)."""
    spec = policy()["spec"]
    env = celpy.Environment()
    request = {"operation": "UPDATE" if old else "CREATE", "userInfo": {"username": user}}
    activation = {"object": celpy.json_to_cel(obj), "oldObject": celpy.json_to_cel(old),
                  "request": celpy.json_to_cel(request)}
    variables = {}
    for var in spec["variables"]:
        activation["variables"] = celpy.json_to_cel(variables)
        value = env.program(env.compile(var["expression"])).evaluate(activation)
        assert not isinstance(value, celpy.CELEvalError), (var["name"], value)
        variables[var["name"]] = value
    activation["variables"] = celpy.celtypes.MapType({celpy.celtypes.StringType(k): v for k, v in variables.items()})
    failed = []
    for v in spec["validations"]:
        result = env.program(env.compile(v["expression"])).evaluate(activation)
        assert isinstance(result, celpy.celtypes.BoolType), (v["expression"], result)   # an error is a rejection too
        if not result:
            failed.append(" ".join(v["message"].split()))
    return failed


def example() -> dict:
    with open(os.path.join(HERE, "example", "vpn-pod.yaml")) as f:
        return yaml.safe_load(f)


def test_the_example_pod_is_admitted():
    assert admit(example()) == []


def test_a_pod_without_ksbpf_annotations_needs_no_gate():
    pod = example()
    del pod["metadata"]["annotations"]
    pod["spec"]["initContainers"] = pod["spec"]["initContainers"][1:]
    assert admit(pod) == []
    del pod["spec"]["initContainers"]
    assert admit(pod) == []


@pytest.mark.parametrize("change", ["no init containers", "sidecar first", "gate as a native sidecar",
                                    "another command first", "annotated with one key only"])
def test_an_annotated_pod_without_the_gate_first_is_rejected(change):
    pod = example()
    inits = pod["spec"]["initContainers"]
    if change == "no init containers":
        del pod["spec"]["initContainers"]
    elif change == "sidecar first":
        inits.reverse()
    elif change == "gate as a native sidecar":
        inits[0]["restartPolicy"] = "Always"
    elif change == "another command first":
        inits[0]["command"] = ["sh", "-c", "ksbpf gate"]
    else:
        pod["metadata"]["annotations"] = {"ksbpf.io/tunnels": "wg0"}
        del pod["spec"]["initContainers"]
    failed = admit(pod)
    assert len(failed) == 1 and "FIRST init container" in failed[0], failed


def test_policy_annotations_of_an_existing_pod_cannot_change():
    old = example()
    for mutate in (lambda a: a.pop("ksbpf.io/tunnels"),                     # removed
                   lambda a: a.update({"ksbpf.io/allow-lan": "true"}),      # changed
                   lambda a: a.update({"ksbpf.io/allow-dhcp": "true"}),     # changed
                   lambda a: [a.pop(k) for k in list(a)]):                  # all removed
        new = copy.deepcopy(old)
        mutate(new["metadata"]["annotations"])
        failed = admit(new, old)
        assert any("cannot be added, changed or removed" in m for m in failed), failed
    added = copy.deepcopy(old)
    added["metadata"]["annotations"]["ksbpf.io/tunnel-kinds"] = "wireguard"
    assert any("cannot be added" in m for m in admit(added, old))
    # other annotations and labels may change
    other = copy.deepcopy(old)
    other["metadata"]["annotations"]["team"] = "blue"
    other["metadata"].setdefault("labels", {})["x"] = "y"
    assert admit(other, old) == []


def test_an_unannotated_running_pod_cannot_be_annotated():
    old = example()
    del old["metadata"]["annotations"]
    old["spec"]["initContainers"] = old["spec"]["initContainers"][1:]
    new = copy.deepcopy(old)
    new["metadata"]["annotations"] = {"ksbpf.io/tunnels": "wg0"}
    failed = admit(new, old)
    assert len(failed) == 2, failed    # no gate first, and a policy annotation added


def test_only_the_daemon_writes_protected():
    pod = example()
    forged = copy.deepcopy(pod)
    forged["metadata"]["annotations"]["ksbpf.io/protected"] = "0123456789abcdef"
    assert admit(forged) == ["ksbpf.io/protected is written by the ksbpf daemon only"]       # on CREATE
    assert admit(forged, pod) == ["ksbpf.io/protected is written by the ksbpf daemon only"]  # on UPDATE
    assert admit(forged, pod, user=DAEMON) == []                                             # the daemon
    gone = copy.deepcopy(pod)
    assert admit(gone, forged) == ["ksbpf.io/protected is written by the ksbpf daemon only"]  # nor removes it
    assert admit(forged, forged) == []                                                       # unchanged: fine
