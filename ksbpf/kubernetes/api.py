"""The Kubernetes API, through the official client: the pods of this node
(list, then watch from the list's resourceVersion; relist on 410 Gone;
reconnect from the last resourceVersion when the connection drops) and
Events on pods.  Everything here runs on its own threads: a blocking read
never stalls the daemon's event loop.  The watch hands what it sees to
`post(kind, payload)`:

    ("SYNC", [pod, ...])    a complete list (first list and every relist)
    ("ADDED" | "MODIFIED" | "DELETED", pod)

Pods are plain dicts in the API's own JSON form (metadata.uid, spec.nodeName, ...).
"""

from __future__ import annotations

import datetime
import json
import queue
import threading
import time
from typing import Callable

from ksbpf.errors import KsbpfError
from ksbpf.kubernetes.settings import KubernetesSettings

WATCH_SECONDS = 300          # server-side timeout of one watch request
READ_TIMEOUT = WATCH_SECONDS + 30
CONNECT_TIMEOUT = 10
BACKOFF = (0.2, 0.5, 1, 2, 5, 10)   # seconds between reconnects (the last repeats)
LIST_PAGE = 500

Post = Callable[[str, object], None]
Log = Callable[..., None]


class Gone(Exception):
    """410: the resourceVersion is too old; list again."""


def make_api(settings: KubernetesSettings):
    """A CoreV1Api: a kubeconfig when configured, else the pod's service account."""
    from kubernetes import client, config
    cfg = client.Configuration()
    try:
        if settings.kubeconfig:
            config.load_kube_config(config_file=settings.kubeconfig, client_configuration=cfg)
        else:
            config.load_incluster_config(client_configuration=cfg)
    except (config.ConfigException, OSError) as exc:
        raise KsbpfError(f"no Kubernetes API credentials: {exc}",
                         "run in a pod with a service account (the DaemonSet), or set [kubernetes] kubeconfig") from None
    return client.CoreV1Api(client.ApiClient(cfg))


class PodWatch:
    """List-then-watch of the pods whose spec.nodeName is `node`, on a thread."""

    def __init__(self, api, node: str, post: Post, log: Log):
        self.api = api
        self.selector = f"spec.nodeName={node}"
        self.post = post
        self.log = log
        self.resource_version: str | None = None
        self.lists = 0             # how many complete lists were posted
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubernetes-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _list(self) -> None:
        items, token, rv = [], None, None
        while True:
            kwargs = {"field_selector": self.selector, "limit": LIST_PAGE, "_preload_content": False,
                      "_request_timeout": (CONNECT_TIMEOUT, READ_TIMEOUT)}
            if token:
                kwargs["_continue"] = token
            resp = self.api.list_pod_for_all_namespaces(**kwargs)
            body = json.loads(resp.data)
            items += body.get("items") or []
            rv = body["metadata"]["resourceVersion"]
            token = body["metadata"].get("continue")
            if not token:
                break
        self.resource_version = rv
        self.lists += 1
        self.post("SYNC", items)
        self.log("kubernetes_listed", pods=len(items), resource_version=rv)

    def _watch(self) -> None:
        from kubernetes.watch.watch import iter_resp_lines
        resp = self.api.list_pod_for_all_namespaces(
            field_selector=self.selector, watch=True, resource_version=self.resource_version,
            allow_watch_bookmarks=True, timeout_seconds=WATCH_SECONDS, _preload_content=False,
            _request_timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
        try:
            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    return
                if not line:
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone(obj.get("message", ""))
                    raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message')}")
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.post(kind, obj)
                if rv:
                    self.resource_version = rv   # BOOKMARK: only this
        finally:
            resp.release_conn()

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException
        failures = 0
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                self._watch()           # returns when the server ends the request: watch again
                failures = 0
            except Gone as exc:
                self.log("kubernetes_relist", reason="410 Gone: resourceVersion too old", message=str(exc),
                         resource_version=self.resource_version)
                self.resource_version = None
            except ApiException as exc:
                if exc.status == 410:
                    self.log("kubernetes_relist", reason="410 Gone", resource_version=self.resource_version)
                    self.resource_version = None
                    continue
                failures += 1
                self._wait(failures, f"API error {exc.status}: {exc.reason}")
            except Exception as exc:   # connection refused/reset, dropped stream, bad JSON
                failures += 1
                self._wait(failures, f"{type(exc).__name__}: {exc}")

    def _wait(self, failures: int, error: str) -> None:
        delay = BACKOFF[min(failures, len(BACKOFF)) - 1]
        self.log("kubernetes_reconnect", level="warning", error=error[:300], retry_in=delay,
                 resource_version=self.resource_version)
        self._stop.wait(delay)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_body(pod: dict, reason: str, message: str, node: str, kind: str = "Warning") -> dict:
    """A core/v1 Event about a pod."""
    meta = pod.get("metadata") or {}
    now = _now()
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{meta.get('name', 'pod')}.ksbpf.", "namespace": meta.get("namespace", "default")},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": meta.get("name"),
                           "namespace": meta.get("namespace"), "uid": meta.get("uid")},
        "reason": reason, "message": message[:1024], "type": kind,
        "source": {"component": "ksbpf", "host": node},
        "reportingComponent": "ksbpf.io/node-daemon", "reportingInstance": node,
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    }


class EventPoster:
    """Writes to the API on a thread (the API may be slow or away: never the
    event loop's problem): Events on pods, the daemon's ksbpf.io/protected
    annotation on them, and the removal of the node's not-ready taint."""

    def __init__(self, api, node: str, log: Log):
        self.api, self.node, self.log = api, node, log
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kubernetes-events", daemon=True)
        self._thread.start()

    def post(self, pod: dict, reason: str, message: str, kind: str = "Warning") -> None:
        self._queue.put(("event", event_body(pod, reason, message, self.node, kind)))

    def annotate(self, pod: dict, key: str, value: str) -> None:
        """Set one annotation on the pod (a JSON merge patch: nothing else changes)."""
        meta = pod.get("metadata") or {}
        self._queue.put(("annotate", (meta.get("namespace"), meta.get("name"), key, value)))

    def untaint(self, key: str) -> None:
        """Remove every taint with this key from this node, if it has one."""
        self._queue.put(("untaint", key))

    def _do(self, what: str, arg) -> None:
        timeout = (CONNECT_TIMEOUT, 30)
        if what == "event":
            self.api.create_namespaced_event(arg["metadata"]["namespace"], arg, _request_timeout=timeout)
        elif what == "annotate":
            namespace, name, key, value = arg
            self.api.patch_namespaced_pod(name, namespace, {"metadata": {"annotations": {key: value}}},
                                          _content_type="application/merge-patch+json", _request_timeout=timeout)
        else:
            resp = self.api.read_node(self.node, _preload_content=False, _request_timeout=timeout)
            node = json.loads(resp.data)
            taints = (node.get("spec") or {}).get("taints") or []
            kept = [t for t in taints if t.get("key") != arg]
            if len(kept) != len(taints):
                # test-and-replace: a concurrent change of the taints makes it fail, and it is retried
                self.api.patch_node(self.node, [{"op": "test", "path": "/spec/taints", "value": taints},
                                                {"op": "replace", "path": "/spec/taints", "value": kept}],
                                    _content_type="application/json-patch+json", _request_timeout=timeout)
                self.log("node_taint_removed", node=self.node, taint=arg)

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException
        while True:
            what, arg = self._queue.get()
            for attempt in range(5):
                try:
                    self._do(what, arg)
                    break
                except Exception as exc:
                    # no such object, or not allowed: trying again changes nothing (and holds the queue)
                    final = isinstance(exc, ApiException) and exc.status in (401, 403, 404)
                    if attempt == 4 or final:
                        self.log("kubernetes_write_failed", level="warning", what=what,
                                 target=arg["involvedObject"]["name"] if what == "event" else str(arg)[:200],
                                 reason=arg["reason"] if what == "event" else None, error=str(exc)[:200])
                        if final:
                            break
                    time.sleep(0.5 * (attempt + 1))
