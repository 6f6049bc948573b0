"""Scrape time of the metrics endpoint's collector with many protected
scopes: every scrape reads every scope's maps from the kernel.

Creates N cgroups under a bench-owned parent, protects each (the compiled
program is cached after the first, so attaching is fast), times rendering
/metrics (median of several scrapes), and removes everything.  No packet is
sent.

    python benchmarks/scrape.py [--scopes 1000] [--scrapes 5] [--out benchmarks/results]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import uuid

import report

from ksbpf.kernel import cgroup
from ksbpf.observability import metrics
from ksbpf.policy import Endpoint, Policy
from ksbpf.scopes import cgroups

TARGET_S = None  # the issue sets no target: reported as measured


def run(n: int, scrapes: int) -> dict:
    tag = uuid.uuid4().hex[:6]
    ns_name = f"ksbpf-bench-{tag}"
    parent = os.path.join(cgroup.cgroup2_root(), f"ksbpf-bench-{tag}")
    subprocess.run(["ip", "netns", "add", ns_name], check=True)
    os.mkdir(parent)
    try:
        policy = Policy((f"wg{tag}",), (Endpoint.parse("203.0.113.5:51820/udp"),), ns_name)
        attach_s = []
        for i in range(n):
            path = os.path.join(parent, f"s{i}")
            os.mkdir(path)
            t = time.perf_counter()
            cgroups.attach(path, policy)
            attach_s.append(time.perf_counter() - t)
            if i and i % 100 == 0:
                print(f"  {i} scopes attached", file=sys.stderr)
        times, size = [], 0
        for _ in range(scrapes):
            t = time.perf_counter()
            body = metrics.render()
            times.append(time.perf_counter() - t)
            size = len(body)
        return {"benchmark": "scrape", "scopes": n, "scrapes": scrapes,
                "scrape_s": {"median": round(statistics.median(times), 3), "min": round(min(times), 3),
                             "max": round(max(times), 3)},
                "per_scope_ms": round(statistics.median(times) / n * 1000, 3),
                "body_bytes": size,
                "attach_s": {"first": round(attach_s[0], 3), "median": round(statistics.median(attach_s), 4)},
                "machine": report.machine()}
    finally:
        cgroups.remove_cgroup_tree(parent)
        subprocess.run(["ip", "netns", "del", ns_name])


def table(r: dict) -> str:
    s = r["scrape_s"]
    return "\n".join([
        "| scopes | scrape (median, min–max) | per scope | /metrics size | attach: first (compiles) / median (cached) |",
        "|---|---|---|---|---|",
        f"| {r['scopes']} | {s['median']} s ({s['min']}–{s['max']}) | {r['per_scope_ms']} ms | "
        f"{r['body_bytes'] // 1024} KiB | {r['attach_s']['first']} s / {r['attach_s']['median']} s |"])


def main() -> int:
    ap = report.parser(__doc__)
    ap.add_argument("--scopes", type=int, default=1000)
    ap.add_argument("--scrapes", type=int, default=5)
    a = ap.parse_args()
    result = run(a.scopes, a.scrapes)
    report.publish(a.out, "scrape", result, "Scrape time with many scopes",
                 f"{a.scopes} protected scopes; the collector reads every scope's maps at each scrape.",
                 table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
