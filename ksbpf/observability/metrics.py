"""Prometheus metrics, read from the kernel when scraped.

A custom collector reads every scope's per-CPU maps (through its pins) at
scrape time: no polling thread, nothing cached, so nothing counted twice.
The daemon adds what only it knows (netlink events, route alerts) and serves
/metrics, /healthz and /readyz; `ksbpf metrics` prints the same once.

Label values are bounded: scopes (cgroup paths; the daemon names a pod's
scope by its pod), reasons, families, hooks, paths, tunnel names, netlink
message types -- never addresses or ports.  Counters by reason or path are
written once they are not zero; gauges always.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily

from ksbpf.errors import KsbpfError
from ksbpf.kernel import features, pins
from ksbpf.observability.families import KERNEL_FEATURE_HELP, ksbpf_version, verify_metrics
from ksbpf.observability.scrape import Scraper
from ksbpf.reasons import Hook
from ksbpf.scopes import cgroups, common, node


class Daemon(Protocol):
    """What the metrics need of the daemon (ksbpf.daemon.service.Daemon): its
    configured scopes, its counters, its heartbeat and its readiness."""

    scopes: dict
    node: object   # NodeState | None: .name, .node (its NodePolicy)
    netlink_events: dict[str, int]
    route_alerts: int
    guards_displaced: int
    heartbeat: float
    unscraped: threading.Event   # cleared while a scrape runs (the verifier's thread waits)

    def readiness(self) -> list[str]: ...


HEALTHY_WITHIN = 30.0  # seconds since the daemon's loop last turned


class KsbpfCollector:
    def __init__(self, daemon: Daemon | None = None, bpffs: str = pins.BPFFS):
        self.daemon = daemon
        self.bpffs = bpffs

    def _scopes(self, link_cache: dict):
        """Every cgroup and node scope, read from its pins; those replaced or
        removed while we read are skipped (the next scrape sees the new one)."""
        for pin_dir in pins.list_scope_dirs(self.bpffs):
            try:
                yield cgroups.read_scope(pin_dir, link_cache)
            except (OSError, ValueError, KsbpfError):
                continue
        for pin_dir in pins.list_node_dirs(self.bpffs):
            try:
                yield node.read_node(pin_dir, link_cache)
            except (OSError, ValueError, KsbpfError):
                continue

    def collect(self):
        dropped_p = CounterMetricFamily("ksbpf_dropped_packets", "Packets dropped by ksbpf",
                                        labels=["scope", "reason", "family", "hook"])
        dropped_b = CounterMetricFamily("ksbpf_dropped_bytes", "Bytes dropped by ksbpf",
                                        labels=["scope", "reason", "family", "hook"])
        allowed_p = CounterMetricFamily("ksbpf_allowed_packets", "Packets let through, by path",
                                        labels=["scope", "path"])
        allowed_b = CounterMetricFamily("ksbpf_allowed_bytes", "Bytes let through, by path",
                                        labels=["scope", "path"])
        tunnel_up = GaugeMetricFamily("ksbpf_tunnel_up", "1 when the tunnel exists and the scope's map allows it",
                                      labels=["scope", "tunnel"])
        attached = GaugeMetricFamily("ksbpf_scope_attached", "1 when the scope is enforced: its program attached to its cgroup, "
                                     "or (node mode) a guard on every interface that needs one",
                                     labels=["scope"])
        suppressed = CounterMetricFamily("ksbpf_events_suppressed", "Blocked-packet samples not streamed "
                                         "(in-kernel rate limit or full ring buffer)", labels=["scope"])
        unguarded = GaugeMetricFamily("ksbpf_unguarded_interfaces", "Node mode: interfaces that should carry "
                                      "a guard and do not (their traffic is not judged)", labels=["scope"])
        link_cache: dict = {}
        seen = set()
        for st in self._scopes(link_cache):
            name, hook = st.name, st.hook.label
            seen.add(name)
            for (reason, family), (packets, nbytes) in st.counters.items():
                if reason.allowed or not packets:
                    continue
                dropped_p.add_metric([name, reason.label, family.label, hook], packets)
                dropped_b.add_metric([name, reason.label, family.label, hook], nbytes)
            for reason, (packets, nbytes) in common.by_reason(st.counters).items():
                if reason.allowed and packets:
                    allowed_p.add_metric([name, reason.label], packets)
                    allowed_b.add_metric([name, reason.label], nbytes)
            up: dict[str, int] = {}   # netns "each": a tunnel name per namespace, counted
            for t in st.tunnels:
                up[t.name] = up.get(t.name, 0) + (1 if t.registered else 0)
            for tunnel, n in up.items():
                tunnel_up.add_metric([name, tunnel], n)
            attached.add_metric([name], 1 if st.attached else 0)
            if st.events[1]:
                suppressed.add_metric([name], st.events[1])
            if st.hook == Hook.TC:
                unguarded.add_metric([name], sum(1 for i in st.interfaces if i.unguarded))
        if self.daemon is not None:  # configured but not (or no longer) protected: say so
            configured = [(st.cgroup, st.policy) for st in list(self.daemon.scopes.values())]
            if self.daemon.node is not None:
                configured.append((self.daemon.node.name, self.daemon.node.node.policy))
            for name, policy in configured:
                if name not in seen:
                    attached.add_metric([name], 0)
                    for tunnel in policy.tunnels:
                        tunnel_up.add_metric([name, tunnel], 0)
        yield from (dropped_p, dropped_b, allowed_p, allowed_b, tunnel_up, attached, suppressed, unguarded)
        info = GaugeMetricFamily("ksbpf_build_info", "ksbpf's version", labels=["version"])
        info.add_metric([ksbpf_version()], 1)
        yield info
        kernel = GaugeMetricFamily("ksbpf_kernel_feature", KERNEL_FEATURE_HELP, labels=["feature"])
        for f in features.probe():
            kernel.add_metric([f.name], 1 if f.present else 0)
        yield kernel
        if self.daemon is not None:
            events = CounterMetricFamily("ksbpf_netlink_events", "Netlink messages the daemon handled",
                                         labels=["type"])
            for kind, n in sorted(dict(self.daemon.netlink_events).items()):
                events.add_metric([kind], n)
            yield events
            yield CounterMetricFamily("ksbpf_guards_displaced", "Node mode: times the daemon found a program "
                                      "running in front of a guard (it then puts the guard first again)",
                                      value=getattr(self.daemon, "guards_displaced", 0))
            yield CounterMetricFamily("ksbpf_route_alerts", "Routes added outside a tunnel while a scope "
                                      "was protected (TunnelVision)", value=self.daemon.route_alerts)
            verifier = getattr(self.daemon, "verifier", None)
            if verifier is not None:
                yield from verify_metrics(verifier)


def registry(daemon: Daemon | None = None, bpffs: str = pins.BPFFS) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(KsbpfCollector(daemon, bpffs))
    return reg


def render(daemon: Daemon | None = None, bpffs: str = pins.BPFFS) -> bytes:
    return generate_latest(registry(daemon, bpffs))


class MetricsServer:
    """/metrics, /healthz and /readyz on a background thread."""

    def __init__(self, daemon: Daemon, host: str, port: int):
        scraper = Scraper(daemon)   # the daemon's fast path: maps kept open, its own netlink view
        lock = threading.Lock()
        unscraped = daemon.unscraped

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    with lock:   # one scrape at a time: the scraper's open maps are shared
                        unscraped.clear()   # the verifier's thread waits meanwhile
                        try:
                            body = scraper.render()
                        finally:
                            unscraped.set()
                    self._send(200, body, CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    age = time.monotonic() - daemon.heartbeat
                    ok = age < HEALTHY_WITHIN
                    self._send(200 if ok else 503, f"{'ok' if ok else 'stalled'}: loop {age:.1f} s ago\n".encode())
                elif path == "/readyz":
                    problems = daemon.readiness()
                    body = json.dumps({"ready": not problems, "problems": problems,
                                       "kernel": features.as_dict()}).encode() + b"\n"
                    self._send(503 if problems else 200, body, "application/json")
                else:
                    self._send(404, b"try /metrics, /healthz or /readyz\n")

            def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args) -> None:
                pass  # scrapes are not events

        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

        self.server = Server((host, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
