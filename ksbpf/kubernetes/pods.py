"""The pods of this node -> protected scopes of the daemon.

A PodSource is one of the daemon's sources of scopes.  The watch runs on
its own thread (api.PodWatch) and hands what it sees through a queue; a
pipe wakes the daemon's select loop (fileno()), which calls handle(): all
kernel work (attach, detach, netlink watches) happens on the loop's thread.

For an annotated pod: parse its annotations (errors: an Event, a log line,
and a scope that blocks everything), find its cgroup from its UID and its
network namespace from its processes (discovery.py), and add it as a scope
whose tunnels are looked up in that namespace.  Once it is in force, the
daemon says so on the pod: the ksbpf.io/protected annotation (the digest of
the annotations it enforces, which the pod's gate checks) and an Event
(KsbpfProtected; KsbpfInvalidAnnotation and KsbpfBlocked say what is wrong).
After the first complete list the node's ksbpf.io/agent-not-ready taint is
removed: annotated pods are scheduled only where a daemon runs.  A pod not
on the node yet (no cgroup, no process in its namespace) is retried every
PENDING_RETRY seconds.  hostNetwork pods are refused with an Event.  A deleted (or
finished) pod's scope and pins are removed.  On every complete list, pins
left by pods deleted while the daemon was away are removed too.
"""

from __future__ import annotations

import os
import queue
import time
from dataclasses import dataclass, field
from typing import Protocol

from ksbpf.kernel.wakeup import Wakeup
from ksbpf.kubernetes import annotations as notes
from ksbpf.kubernetes import discovery
from ksbpf.kubernetes.settings import KubernetesSettings
from ksbpf.policy import Policy

PENDING_RETRY = 0.1    # seconds between looks for a pending pod's cgroup and namespace
CHECK_SECONDS = 1.0    # how often protected pods are checked (namespace replaced, scope failed)
BUDGET_SECONDS = 0.2   # work on pending pods per turn of the loop
SOURCE = "kubernetes"
NOT_READY_TAINT = "agent-not-ready"   # <prefix>agent-not-ready:NoSchedule, set on new nodes by the cluster


class ScopeSink(Protocol):
    """What a PodSource needs of the daemon."""

    scopes: dict

    def log(self, event: str, level: str = "info", **fields) -> None: ...
    def add_scope(self, cgroup: str, policy: Policy, source: str, labels: dict | None = None):
        """The scope's state: .error (None once applied), .compiling (waiting for its program)."""
    def remove_scope(self, cgroup: str) -> None: ...


@dataclass
class PodState:
    uid: str
    pod: dict
    cgroup: str | None = None        # protected: the scope's cgroup
    netns: str | None = None
    pending_since: float | None = None
    tries: int = 0                   # looks for it so far (the least tried go first)
    state: str = ""                  # what was last logged, not to repeat it
    reported: set = field(default_factory=set)   # the Events posted (reason:message), not to repeat them
    published: str = ""              # the <prefix>protected value written on the pod
    vpn_waiting: bool = False        # <prefix>vpn-container named, its cgroup not there yet (looked for again)
    vpn_cgroup: str | None = None    # ... its cgroup in force (a restarted container has another)

    @property
    def name(self) -> str:
        meta = self.pod.get("metadata") or {}
        return f"{meta.get('namespace')}/{meta.get('name')}"


def _finished(pod: dict) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _existing_netns(cgroup_path: str) -> str | None:
    """The namespace path an earlier daemon protected this cgroup with (to adopt it unchanged)."""
    from ksbpf.kernel import bpf, pins
    try:
        with bpf.ScopeMaps.from_pins(pins.scope_dir(os.stat(cgroup_path).st_ino)) as maps:
            return (maps.read_meta().get("netns") or {}).get("path")
    except Exception:
        return None


class PodSource:
    def __init__(self, settings: KubernetesSettings, daemon: ScopeSink, api=None, start_watch: bool = True):
        from ksbpf.kubernetes import api as kube
        self.settings = settings
        self.daemon = daemon
        self.node = settings.node()
        self.prefix = settings.annotation_prefix
        self.pods: dict[str, PodState] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = Wakeup()
        self._next_check = time.monotonic() + CHECK_SECONDS
        self._next_pending = 0.0
        self._roots: list[str] = []
        self._listed = False
        self.api = api or kube.make_api(settings)
        self.events = kube.EventPoster(self.api, self.node, daemon.log)
        self.watch = kube.PodWatch(self.api, self.node, self._post, daemon.log)
        daemon.log("kubernetes_watching", node=self.node, prefix=self.prefix,
                   credentials=settings.kubeconfig or "in-cluster service account")
        if start_watch:
            self.watch.start()

    # -- the watch thread's side ------------------------------------------------
    def _post(self, kind: str, payload: object) -> None:
        self._queue.put((kind, payload))
        self._wakeup.wake()

    # -- the event loop's side ------------------------------------------------------
    def fileno(self) -> int:
        return self._wakeup.fileno()

    def deadline(self) -> float:
        pending = any(p.pending_since is not None for p in self.pods.values())
        return min(self._next_check, self._next_pending) if pending else self._next_check

    def close(self) -> None:
        self.watch.stop()
        self._wakeup.close()

    def handle(self) -> None:
        """Drain the queue, then retry what is pending and check what is protected."""
        self._wakeup.drain()
        while True:
            try:
                kind, payload = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == "SYNC":
                self._sync(payload)
            elif kind == "DELETED":
                self._forget(payload["metadata"]["uid"], "deleted")
            else:
                self._update(payload)
        now = time.monotonic()
        if now >= self._next_pending:
            # a bounded slice of work per turn: a list of a thousand pods must not
            # keep the loop (netlink, /healthz) waiting for minutes
            budget_end = time.perf_counter() + BUDGET_SECONDS
            pending = [st for st in self.pods.values() if st.pending_since is not None]
            pending.sort(key=lambda st: st.tries)
            for st in pending:
                if time.perf_counter() > budget_end:
                    self._next_pending = 0.0   # more to do: come back at once
                    break
                st.tries += 1
                self._protect(st)
            else:
                self._next_pending = now + PENDING_RETRY
        if now >= self._next_check:
            self._next_check = now + CHECK_SECONDS
            for st in list(self.pods.values()):
                scope = self.daemon.scopes.get(st.cgroup) if st.cgroup else None
                if st.cgroup and st.vpn_waiting and scope is not None and not scope.error:
                    self._protect(st)   # its VPN container may be there now (the pod's update usually says so first)
                elif st.cgroup and (scope is None or scope.error):
                    # its namespace was replaced (sandbox re-created) or it failed: find it again
                    st.pending_since = now
                    self._protect(st)

    def _sync(self, pods: list[dict]) -> None:
        seen = {p["metadata"]["uid"] for p in pods}
        for uid in [u for u in self.pods if u not in seen]:
            self._forget(uid, "absent from the list")
        for pod in pods:
            self._update(pod, now=False)   # protected in slices by handle()
        self._collect_orphans()
        if not self._listed:
            self._listed = True
            self.events.untaint(self.prefix + NOT_READY_TAINT)   # ready: annotated pods may come here

    def _update(self, pod: dict, now: bool = True) -> None:
        uid = pod["metadata"]["uid"]
        wanted = notes.is_annotated((pod.get("metadata") or {}).get("annotations"), self.prefix)
        st = self.pods.get(uid)
        if not wanted or _finished(pod):
            if st:
                self._forget(uid, "finished" if wanted else "annotations removed")
            return
        if st is None:
            st = self.pods[uid] = PodState(uid, pod)
        st.pod = pod
        if (pod.get("spec") or {}).get("hostNetwork"):
            self._report(st, "HostNetworkRefused", "ksbpf does not protect hostNetwork pods: they share the "
                         "node's network namespace (protect the node instead); this pod is NOT protected")
            st.pending_since = None
            if st.cgroup:
                self._unprotect(st)
            return
        if (st.cgroup and not st.vpn_waiting and not self._vpn_moved(st)
                and st.published == self._value(st, st.state.startswith("protected-blocked"))):
            return   # in force, and what we published still matches (our own annotation's MODIFIED)
        if st.pending_since is None:
            st.pending_since = time.monotonic()
        if now:
            self._protect(st)

    def _roots_now(self) -> list[str]:
        if not self._roots:
            self._roots = discovery.kubepods_roots(self.settings.cgroup_root or None)
        return self._roots

    def _protect(self, st: PodState) -> None:
        """Find the pod on the node and protect it; pending until it is there."""
        started = time.perf_counter()
        pod_cg = discovery.find_pod(st.uid, self._roots_now())
        if pod_cg is None:
            self._roots = []   # a new kubepods root may have appeared: walk again next time
            return self._pending(st, "no cgroup yet")
        found = time.perf_counter()
        try:
            ns = discovery.pod_netns(pod_cg, prefer=st.netns or _existing_netns(pod_cg.path))
        except discovery.NetnsDenied as exc:
            self._report(st, "KsbpfBlocked", f"ksbpf cannot protect this pod: {exc}; its gate keeps the app "
                         "from starting")
            return self._pending(st, str(exc))
        if ns is None:
            return self._pending(st, "no process in the pod's network namespace yet")
        parsed = notes.parse((st.pod.get("metadata") or {}).get("annotations") or {}, self.prefix, ns.path,
                             lambda name: discovery.container_cgroup(st.pod, pod_cg.path, name))
        if parsed.blocked:
            self._report(st, "KsbpfInvalidAnnotation", "invalid ksbpf annotations: " + "; ".join(parsed.errors))
        applying = time.perf_counter()
        meta = st.pod.get("metadata") or {}
        scope = self.daemon.add_scope(pod_cg.path, parsed.policy, SOURCE,   # metrics name pods, not cgroup paths
                                      {"namespace": meta.get("namespace") or "", "pod": meta.get("name") or ""})
        if scope.error:
            if not scope.compiling:   # compiling: a moment, not a failure
                self._report(st, "KsbpfBlocked", f"ksbpf cannot protect this pod yet ({scope.error}); its gate "
                             "keeps the app from starting until it can")
            return self._pending(st, scope.error)
        waited = time.monotonic() - st.pending_since if st.pending_since is not None else 0.0
        st.cgroup, st.netns, st.pending_since = pod_cg.path, ns.path, None
        vpn_cgroup = (parsed.policy.vpn_cgroups or (None,))[0]
        if parsed.vpn_container and (parsed.vpn_waiting != st.vpn_waiting or vpn_cgroup != st.vpn_cgroup
                                     or not st.state.startswith("protected")):
            self.daemon.log("pod_vpn_container", pod=st.name, uid=st.uid, container=parsed.vpn_container,
                            cgroup=vpn_cgroup,
                            **({"note": "not started yet: no endpoint reachable outside the tunnel until it is"}
                               if parsed.vpn_waiting else {}))
        st.vpn_waiting, st.vpn_cgroup = parsed.vpn_waiting, vpn_cgroup
        state = f"protected{'-blocked' if parsed.blocked else ''}:{parsed.policy}"
        value = self._value(st, parsed.blocked)
        if st.published != value:
            st.published = value
            if ((st.pod.get("metadata") or {}).get("annotations") or {}).get(self.prefix + notes.PROTECTED) != value:
                self.events.annotate(st.pod, self.prefix + notes.PROTECTED, value)
        if parsed.blocked:
            self._report(st, "KsbpfBlocked", "ALL of this pod's traffic is blocked: its ksbpf annotations are "
                         "invalid (see KsbpfInvalidAnnotation); fix them and recreate the pod")
        else:
            self._report(st, "KsbpfProtected", f"egress only through {', '.join(parsed.policy.tunnels)}"
                         + (f" and to {', '.join(str(e) for e in parsed.policy.endpoints)}" if parsed.policy.endpoints
                            else "") + f" (policy {value})", kind="Normal")
        if st.state != state:
            st.state = state
            self.daemon.log("pod_protected", pod=st.name, uid=st.uid, cgroup=pod_cg.path, netns=ns.path,
                            driver=pod_cg.driver, qos=pod_cg.qos, runtimes=pod_cg.runtimes,
                            tunnels=list(parsed.policy.tunnels), blocked=parsed.blocked,
                            allow_cidrs=[str(n) for n in parsed.policy.allow_cidrs], waited_ms=round(waited * 1000, 1),
                            took_ms=round((time.perf_counter() - started) * 1000, 2),
                            find_ms=round((found - started) * 1000, 2),
                            scope_ms=round((time.perf_counter() - applying) * 1000, 2))

    def _vpn_moved(self, st: PodState) -> bool:
        """Is the pod's VPN container (<prefix>vpn-container) in another cgroup than the scope has (restarted)?"""
        name = ((st.pod.get("metadata") or {}).get("annotations") or {}).get(self.prefix + "vpn-container")
        if not name or not st.cgroup:
            return False
        return discovery.container_cgroup(st.pod, st.cgroup, name.strip()) not in (None, st.vpn_cgroup)

    def _value(self, st: PodState, blocked: bool) -> str:
        return notes.published((st.pod.get("metadata") or {}).get("annotations"), self.prefix, blocked)

    def _pending(self, st: PodState, why: str) -> None:
        if st.pending_since is None:
            st.pending_since = time.monotonic()
        if st.state != f"pending:{why}":
            st.state = f"pending:{why}"
            self.daemon.log("pod_pending", pod=st.name, uid=st.uid, why=why, retry_every=PENDING_RETRY)

    def _report(self, st: PodState, reason: str, message: str, kind: str = "Warning") -> None:
        if f"{reason}:{message}" in st.reported:
            return
        st.reported.add(f"{reason}:{message}")
        event = {"HostNetworkRefused": "pod_refused", "KsbpfInvalidAnnotation": "pod_annotation_invalid",
                 "KsbpfBlocked": "pod_blocked"}.get(reason)
        if event:
            self.daemon.log(event, level="warning", pod=st.name, uid=st.uid, reason=reason, message=message)
        self.events.post(st.pod, reason, message, kind)

    def _unprotect(self, st: PodState) -> None:
        if st.cgroup and st.cgroup in self.daemon.scopes:
            self.daemon.remove_scope(st.cgroup)
        st.cgroup = st.netns = None

    def _forget(self, uid: str, why: str) -> None:
        st = self.pods.pop(uid, None)
        if st is None:
            return
        cg = st.cgroup
        self._unprotect(st)
        self.daemon.log("pod_released", pod=st.name, uid=uid, why=why, cgroup=cg)

    def _collect_orphans(self) -> None:
        """Pins of pod cgroups (under a kubepods root) that no known pod owns:
        left by pods deleted while no daemon ran."""
        from ksbpf.kernel import pins
        from ksbpf.scopes import cgroups
        roots = [r.rstrip("/") + "/" for r in self._roots_now()]
        uids = [(st.uid, st.uid.replace("-", "_")) for st in self.pods.values()]   # pending ones too
        for d in pins.list_scope_dirs():
            path = cgroups._meta_cgroup(d)
            if (path and any(path.startswith(r) for r in roots) and path not in self.daemon.scopes
                    and not any(a in path or b in path for a, b in uids)):
                result = cgroups.detach(path)
                self.daemon.log("pod_orphan_removed", cgroup=path, pins=result.removed_pins)
