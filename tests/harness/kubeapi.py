"""A stand-in for the Kubernetes API server, for tests and benchmarks: no API server can
run here (no kube-apiserver, k3s or kind image is reachable).  It serves, on
loopback only, what ksbpf's watch uses, in the API's own wire format:

- GET /api/v1/pods?fieldSelector=spec.nodeName=N[&limit&continue]: a PodList
- GET /api/v1/pods?watch=true&resourceVersion=RV&...: a chunked stream of
  watch events, one JSON object per line, from the history after RV; a
  resourceVersion older than the compaction point gets the API's 410
  (an ERROR event carrying a Status with code 410, reason Expired)
- POST /api/v1/namespaces/NS/events: records the Event (201)

The test drives it: put_pod/delete_pod (events to every watcher),
compact() (old resourceVersions expire), drop_watches() (the connection is
cut in the middle of a chunk), end_watches() (the server ends the stream).
Pods are built by make_pod() in the API's own form; tests validate them
against the Kubernetes schema (kubernetes-validate).
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

TOKEN = "ksbpf-test-token"


def make_pod(name: str, node: str, annotations: dict | None = None, namespace: str = "default",
             uid: str | None = None, qos: str = "Burstable", host_network: bool = False) -> dict:
    """A Pod as the API returns it (scheduled to `node`, running)."""
    resources = {"Guaranteed": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}},
                 "Burstable": {"requests": {"cpu": "50m"}}, "BestEffort": {}}[qos]
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid or str(uuid.uuid4()),
                     "resourceVersion": "1", "creationTimestamp": "2026-11-26T07:00:00Z",
                     "annotations": dict(annotations or {}), "labels": {"app": name}},
        "spec": {
            "nodeName": node, "restartPolicy": "Always", "hostNetwork": host_network,
            "initContainers": [
                {"name": "ksbpf-gate", "image": "localhost/ksbpf:latest", "command": ["ksbpf", "gate", "--timeout", "60"],
                 "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "allowPrivilegeEscalation": False,
                                     "capabilities": {"drop": ["ALL"]}}},
            ],
            "containers": [{"name": "app", "image": "debian:bookworm-slim", "command": ["sleep", "infinity"],
                            "resources": resources}],
        },
        "status": {"phase": "Running", "qosClass": qos, "podIP": "10.244.1.7", "hostIP": "192.168.1.10",
                   "startTime": "2026-11-26T07:00:01Z"},
    }
    return pod


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        import sys
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):   # a client that went away
            super().handle_error(request, client_address)


class FakeApiServer:
    def __init__(self):
        self.pods: dict[str, dict] = {}
        self.history: list[tuple[int, str, dict]] = []
        self.rv = 100
        self.compacted = 0            # watches from a resourceVersion below this get 410
        self.generation = 0           # bumped by drop_watches/end_watches
        self.action = ""              # "drop" | "end"
        self.requests: list[dict] = []
        self.events: list[dict] = []
        self.nodes: dict[str, dict] = {}
        self.patches: list[dict] = []   # every PATCH: path, content type, body
        self.cond = threading.Condition()
        self.server = _Server(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- driving it -------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, path) -> str:
        text = json.dumps({   # JSON is YAML
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "ksbpf", "user": {"token": TOKEN}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "ksbpf"}}]})
        with open(path, "w") as f:
            f.write(text)
        return str(path)

    def _record(self, kind: str, pod: dict) -> None:
        self.rv += 1
        pod = copy.deepcopy(pod)
        pod["metadata"]["resourceVersion"] = str(self.rv)
        if kind == "DELETED":
            self.pods.pop(pod["metadata"]["uid"], None)
        else:
            self.pods[pod["metadata"]["uid"]] = pod
        self.history.append((self.rv, kind, pod))
        self.cond.notify_all()

    def put_pod(self, pod: dict) -> dict:
        with self.cond:
            self._record("MODIFIED" if pod["metadata"]["uid"] in self.pods else "ADDED", pod)
            return self.pods[pod["metadata"]["uid"]]

    def put_node(self, name: str, taints: list[dict] | None = None) -> dict:
        with self.cond:
            self.rv += 1
            self.nodes[name] = {"apiVersion": "v1", "kind": "Node",
                                "metadata": {"name": name, "resourceVersion": str(self.rv)},
                                "spec": {"taints": list(taints or [])}}
            return self.nodes[name]

    def pod(self, uid: str) -> dict:
        with self.cond:
            return copy.deepcopy(self.pods[uid])

    def wait(self, cond, timeout: float = 30.0) -> None:
        """Until cond() (called with the server's lock held) is true."""
        import time
        deadline = time.monotonic() + timeout
        with self.cond:
            while not cond():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the API server never saw it; patches: {self.patches}")
                self.cond.wait(min(left, 0.2))

    def downward_annotations(self, uid: str, path) -> None:
        """Write the pod's annotations as the kubelet writes a downward API volume's file."""
        import os
        annotations = self.pod(uid)["metadata"].get("annotations") or {}
        text = "".join(f"{k}={json.dumps(v)}\n" for k, v in sorted(annotations.items()))
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    def delete_pod(self, uid: str) -> None:
        with self.cond:
            self._record("DELETED", self.pods[uid])

    def compact(self) -> None:
        with self.cond:
            self.rv += 1                  # like etcd: compaction is itself a revision
            self.compacted = self.rv      # anything older is gone
            self.history.clear()

    def drop_watches(self) -> None:
        self._control("drop")

    def end_watches(self) -> None:
        self._control("end")

    def _control(self, action: str) -> None:
        with self.cond:
            self.action = action
            self.generation += 1
            self.cond.notify_all()

    def watches(self) -> list[dict]:
        return [r for r in self.requests if r.get("watch") == ["true"]]

    def __enter__(self) -> "FakeApiServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.end_watches()
        self.server.shutdown()
        self.server.server_close()


def _selected(pod: dict, query: dict) -> bool:
    for sel in (query.get("fieldSelector") or [""])[0].split(","):
        if sel.startswith("spec.nodeName=") and pod["spec"].get("nodeName") != sel.split("=", 1)[1]:
            return False
    return True


def _handler(api: FakeApiServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _json(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {TOKEN}":
                return True
            self._json(401, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 401,
                             "reason": "Unauthorized", "message": "Unauthorized"})
            return False

        def do_GET(self) -> None:
            url = urlparse(self.path)
            query = parse_qs(url.query)
            api.requests.append({"path": url.path, **query})
            if not self._authorized():
                return
            parts = url.path.strip("/").split("/")
            if len(parts) == 4 and parts[:3] == ["api", "v1", "nodes"]:
                with api.cond:
                    node = copy.deepcopy(api.nodes.get(parts[3]))
                return self._json(200, node) if node else self._not_found(url.path)
            if url.path != "/api/v1/pods":
                return self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                                        "reason": "NotFound", "message": f"{url.path} not found"})
            if query.get("watch") == ["true"]:
                try:
                    return self._watch(query)
                except (BrokenPipeError, ConnectionResetError):
                    return   # the client went away (stopped, or reconnecting)
            with api.cond:
                items = [copy.deepcopy(p) for p in api.pods.values() if _selected(p, query)]
                rv = api.rv
            self._json(200, {"kind": "PodList", "apiVersion": "v1",
                             "metadata": {"resourceVersion": str(rv)}, "items": items})

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _watch(self, query: dict) -> None:
            since = int((query.get("resourceVersion") or ["0"])[0] or 0)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            with api.cond:
                generation = api.generation
                if since < api.compacted:
                    status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                              "message": f"too old resource version: {since} ({api.compacted})",
                              "reason": "Expired", "code": 410}
                    self._chunk(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
                    self._chunk(b"")
                    return
            while True:
                with api.cond:
                    pending = [(rv, t, p) for rv, t, p in api.history if rv > since and _selected(p, query)]
                    if not pending and api.generation == generation:
                        api.cond.wait(1.0)
                        continue
                    action = api.action if api.generation != generation else ""
                for rv, kind, pod in pending:
                    self._chunk(json.dumps({"type": kind, "object": pod}).encode() + b"\n")
                    since = rv
                if action == "drop":
                    # cut the connection in the middle of a chunk
                    self.wfile.write(b"400\r\n{\"type\": \"MODIF")
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if action == "end":
                    self._chunk(b"")
                    return

        def _not_found(self, what: str) -> None:
            self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                             "reason": "NotFound", "message": f"{what} not found"})

        def do_PATCH(self) -> None:
            url = urlparse(self.path)
            ctype = self.headers.get("Content-Type", "")
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
            api.requests.append({"path": url.path, "method": "PATCH"})
            if not self._authorized():
                return
            parts = url.path.strip("/").split("/")
            with api.cond:
                api.patches.append({"path": url.path, "content_type": ctype, "body": body})
                if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
                    found = [p for p in api.pods.values() if p["metadata"]["namespace"] == parts[3]
                             and p["metadata"]["name"] == parts[5]]
                    if not found or ctype != "application/merge-patch+json":
                        return self._not_found(url.path) if not found else self._json(415, {"code": 415})
                    pod = copy.deepcopy(found[0])
                    for key, value in ((body.get("metadata") or {}).get("annotations") or {}).items():
                        annotations = pod["metadata"].setdefault("annotations", {})
                        if value is None:
                            annotations.pop(key, None)
                        else:
                            annotations[key] = value
                    api._record("MODIFIED", pod)
                    return self._json(200, api.pods[pod["metadata"]["uid"]])
                if len(parts) == 4 and parts[:3] == ["api", "v1", "nodes"] and parts[3] in api.nodes:
                    if ctype != "application/json-patch+json":
                        return self._json(415, {"code": 415})
                    node = copy.deepcopy(api.nodes[parts[3]])
                    for op in body:
                        field = op["path"].strip("/").split("/")
                        assert field == ["spec", "taints"], op
                        if op["op"] == "test" and node["spec"].get("taints", []) != op["value"]:
                            return self._json(422, {"kind": "Status", "code": 422, "reason": "Invalid",
                                                    "message": "the test operation failed"})
                        if op["op"] == "replace":
                            node["spec"]["taints"] = op["value"]
                    api.rv += 1
                    node["metadata"]["resourceVersion"] = str(api.rv)
                    api.nodes[parts[3]] = node
                    api.cond.notify_all()
                    return self._json(200, node)
            self._not_found(url.path)

        def do_POST(self) -> None:
            url = urlparse(self.path)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            api.requests.append({"path": url.path, "method": "POST"})
            if not self._authorized():
                return
            parts = url.path.strip("/").split("/")
            if len(parts) == 5 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "events":
                body.setdefault("metadata", {})["name"] = body["metadata"].get("generateName", "e.") + uuid.uuid4().hex[:5]
                with api.cond:
                    api.events.append(body)
                    api.cond.notify_all()
                return self._json(201, body)
            self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                             "reason": "NotFound", "message": "not found"})

    return Handler
