"""The pod watch (ksbpf.kubernetes.api.PodWatch, the official `kubernetes`
client) against a local HTTP server replaying the API's list and watch
responses in the API's own format (tests/kubeapi.py): no API server can run
here (no kube-apiserver, k3s or kind image is reachable), and the server
listens on loopback only.  Covered: list then watch with the node's
fieldSelector, resuming from the last resourceVersion after a dropped
connection, a relist on 410 Gone, Events posted on pods.  Every pod the
server hands out and every Event ksbpf posts is validated against the
Kubernetes schema (kubernetes-validate)."""

from __future__ import annotations

import queue
import time

import kubernetes_validate
import pytest

from ksbpf.kubernetes import api as kube
from ksbpf.kubernetes.settings import KubernetesSettings
from harness.kubeapi import FakeApiServer, make_pod

K8S_VERSION = "1.37.0"
NODE = "node-a"


def validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.fixture
def server():
    with FakeApiServer() as s:
        yield s


class Collector:
    def __init__(self):
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.log_lines: list[tuple[str, dict]] = []

    def post(self, kind, payload):
        self.q.put((kind, payload))

    def log(self, event, level="info", **fields):
        self.log_lines.append((event, fields))

    def next(self, timeout: float = 10) -> tuple[str, object]:
        return self.q.get(timeout=timeout)


def wait_for(cond, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def names(pods) -> list[str]:
    return sorted(p["metadata"]["name"] for p in pods)


def test_pods_recorded_by_the_fake_server_are_valid_kubernetes_objects():
    for qos in ("Guaranteed", "Burstable", "BestEffort"):
        validate(make_pod("web", NODE, {"ksbpf.io/tunnels": "wg0"}, qos=qos))
    validate(make_pod("h", NODE, host_network=True))
    with pytest.raises(kubernetes_validate.ValidationError):   # the validator does reject bad pods
        bad = make_pod("web", NODE)
        bad["spec"]["containers"][0]["ports"] = [{"containerPort": "http"}]
        validate(bad)


def test_list_watch_resume_after_a_drop_and_relist_on_410(server, tmp_path):
    a = server.put_pod(make_pod("a", NODE, {"ksbpf.io/tunnels": "wg0"}))
    server.put_pod(make_pod("elsewhere", "node-b"))
    c = Collector()
    api = kube.make_api(KubernetesSettings(enabled=True, node_name=NODE, kubeconfig=server.kubeconfig(tmp_path / "kc")))
    w = kube.PodWatch(api, NODE, c.post, c.log)
    w.start()
    try:
        kind, pods = c.next()
        assert kind == "SYNC" and names(pods) == ["a"]          # the other node's pod is not ours
        for p in pods:
            validate(p)
        first = server.requests[0]
        assert first["fieldSelector"] == [f"spec.nodeName={NODE}"] and "watch" not in first
        # events
        b = server.put_pod(make_pod("b", NODE))
        a2 = dict(a, metadata=dict(a["metadata"], annotations={"ksbpf.io/tunnels": "wg1"}))
        server.put_pod(a2)
        server.delete_pod(b["metadata"]["uid"])
        got = [c.next() for _ in range(3)]
        assert [(k, p["metadata"]["name"]) for k, p in got] == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
        assert got[1][1]["metadata"]["annotations"] == {"ksbpf.io/tunnels": "wg1"}
        (watch,) = server.watches()
        assert watch["resourceVersion"] == [pods and str(server.rv - 3)] and watch["fieldSelector"] == [f"spec.nodeName={NODE}"]
        last_rv = str(server.rv)
        # the connection drops in the middle of a chunk: resume from the last resourceVersion, no relist
        server.drop_watches()
        wait_for(lambda: len(server.watches()) == 2)
        assert server.watches()[-1]["resourceVersion"] == [last_rv]
        d = server.put_pod(make_pod("d", NODE))
        assert c.next() == ("ADDED", d)
        assert w.lists == 1
        assert any(e == "kubernetes_reconnect" for e, _ in c.log_lines)
        # the history is compacted and the stream ends: the resumed watch gets 410, then a relist
        e = server.put_pod(make_pod("e", NODE))
        assert c.next() == ("ADDED", e)
        server.compact()
        server.end_watches()
        kind, pods = c.next()
        assert kind == "SYNC" and names(pods) == ["a", "d", "e"]
        assert w.lists == 2
        assert any(e == "kubernetes_relist" for e, _ in c.log_lines)
        f = server.put_pod(make_pod("f", NODE))
        assert c.next() == ("ADDED", f)                          # watching again after the relist
    finally:
        w.stop()
        server.end_watches()


def test_events_are_posted_on_the_pod_and_valid(server, tmp_path):
    pod = server.put_pod(make_pod("a", NODE))
    c = Collector()
    api = kube.make_api(KubernetesSettings(enabled=True, node_name=NODE, kubeconfig=server.kubeconfig(tmp_path / "kc")))
    kube.EventPoster(api, NODE, c.log).post(pod, "KsbpfAnnotationInvalid", "bad annotation")
    deadline = time.monotonic() + 10
    while not server.events:
        assert time.monotonic() < deadline, c.log_lines
        time.sleep(0.05)
    (event,) = server.events
    validate(event)
    assert event["involvedObject"]["uid"] == pod["metadata"]["uid"]
    assert (event["reason"], event["type"], event["metadata"]["namespace"]) == ("KsbpfAnnotationInvalid", "Warning", "default")
