"""Footprint: the time `ksbpf attach` takes (compile, load, attach), with and
without a cached compiled image, and the resident memory of the daemon
protecting 1 and 100 scopes, with and without the compiler loaded.

Bench-owned namespace and cgroups; the scopes' tunnel does not exist, so
they are simply closed.  No packet is sent.

    python benchmarks/footprint.py [--runs 3] [--scopes 1,100] [--out benchmarks/results]
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import report

from ksbpf.kernel import cgroup
from ksbpf.scopes import cgroups

KSBPF = [sys.executable, "-m", "ksbpf.cli"]
TARGET_ATTACH_S = 1.5
TARGET_RSS_MB = 200


def timed_attach(cg: str, ns: str, cache: str) -> float:
    env = {**os.environ, "KSBPF_CACHE_DIR": cache}
    start = time.perf_counter()
    subprocess.run(KSBPF + ["attach", "--cgroup", cg, "--tunnel", "wgbench", "--netns", ns,
                            "--endpoint", "198.18.0.2:51820/udp"], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def daemon_rss_mb(cgroups: list[str], ns: str, cache: str, workdir: str) -> float:
    config = os.path.join(workdir, "ksbpf.toml")
    with open(config, "w") as f:
        with socket.socket() as probe:   # a free port for the metrics endpoint
            probe.bind(("127.0.0.1", 0))
            f.write(f'[metrics]\nlisten = "127.0.0.1:{probe.getsockname()[1]}"\n')
        for cg in cgroups:
            f.write(f'[[scope]]\ncgroup = "{cg}"\ntunnels = ["wgbench"]\nnetns = "{ns}"\n')
    env = {**os.environ, "KSBPF_CACHE_DIR": cache}
    proc = subprocess.Popen(KSBPF + ["daemon", "--config", config, "--log-format", "json"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if line.startswith("{") and json.loads(line).get("event") == "ready":
                break
        else:
            raise RuntimeError("the daemon exited before it was ready")
        time.sleep(0.5)
        with open(f"/proc/{proc.pid}/status") as f:
            rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return round(rss_kb / 1024, 1)
    finally:
        proc.terminate()
        proc.wait()


def run(runs: int, sizes: list[int]) -> dict:
    tag = uuid.uuid4().hex[:6]
    ns = f"ksbpf-bench-{tag}"
    parent = os.path.join(cgroup.cgroup2_root(), f"ksbpf-bench-{tag}")
    workdir = tempfile.mkdtemp(prefix="ksbpf-bench-")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    os.mkdir(parent)
    try:
        one = os.path.join(parent, "attach")
        os.mkdir(one)
        cold, warm = [], []
        for i in range(runs):  # interleaved: a cold attach (empty cache), then a warm one
            cache = os.path.join(workdir, f"cache{i}")
            cold.append(timed_attach(one, ns, cache))
            warm.append(timed_attach(one, ns, cache))
        cgroups.detach(one)
        rss = {}
        for n in sizes:
            cgs = []
            for i in range(n):
                cgs.append(os.path.join(parent, f"n{n}-{i}"))
                os.mkdir(cgs[-1])
            rss[n] = {}
            for label, cache in (("cached_image", os.path.join(workdir, "cache0")),  # holds the image
                                 ("compiling", os.path.join(workdir, f"cold{n}"))):  # empty
                rss[n][label] = daemon_rss_mb(cgs, ns, cache, workdir)
                for cg in cgs:   # the daemon leaves them protected: detach, so the next one attaches
                    cgroups.detach(cg)
        summary = {"cold_s": round(statistics.median(cold), 3), "warm_s": round(statistics.median(warm), 3),
                   "cold_range": [round(min(cold), 3), round(max(cold), 3)],
                   "warm_range": [round(min(warm), 3), round(max(warm), 3)]}
        return {"benchmark": "footprint", "runs": runs,
                "attach": summary, "compile_cost_s": round(summary["cold_s"] - summary["warm_s"], 3),
                "daemon_rss_mb": rss, "targets": {"attach_s": TARGET_ATTACH_S, "daemon_rss_mb": TARGET_RSS_MB},
                "met": {"attach_cold": summary["cold_s"] <= TARGET_ATTACH_S,
                        "attach_warm": summary["warm_s"] <= TARGET_ATTACH_S,
                        "daemon_rss": all(v["compiling"] <= TARGET_RSS_MB for v in rss.values())},
                "machine": report.machine()}
    finally:
        cgroups.remove_cgroup_tree(parent)
        subprocess.run(["ip", "netns", "del", ns])
        subprocess.run(["rm", "-rf", workdir])


def table(r: dict) -> str:
    a, t = r["attach"], r["targets"]
    yes = {True: "yes", False: "NO"}
    lines = ["| measure | median (min–max) | target | met |", "|---|---|---|---|",
             f"| `ksbpf attach`, nothing cached (bcc compiles) | {a['cold_s']} s ({a['cold_range'][0]}–{a['cold_range'][1]}) "
             f"| ≤ {t['attach_s']} s | {yes[r['met']['attach_cold']]} |",
             f"| `ksbpf attach`, compiled image cached | {a['warm_s']} s ({a['warm_range'][0]}–{a['warm_range'][1]}) "
             f"| ≤ {t['attach_s']} s | {yes[r['met']['attach_warm']]} |"]
    for n, v in r["daemon_rss_mb"].items():
        lines.append(f"| daemon RSS, {n} scope(s), image cached (bcc never loaded) | {v['cached_image']} MB | ≤ {t['daemon_rss_mb']} MB | "
                     f"{yes[v['cached_image'] <= t['daemon_rss_mb']]} |")
        lines.append(f"| daemon RSS, {n} scope(s), compiling once | {v['compiling']} MB | ≤ {t['daemon_rss_mb']} MB | "
                     f"{yes[v['compiling'] <= t['daemon_rss_mb']]} |")
    lines.append(f"\nWhat bcc's compiler costs: {r['compile_cost_s']} s per distinct option set, and the memory "
                 "of LLVM in the process that compiles. Every scope with the same options shares one compiled "
                 "image (cached in /var/cache/ksbpf), so 100 scopes compile once, and a restarted daemon or a "
                 "later `ksbpf attach` compiles nothing.")
    return "\n".join(lines)


def main() -> int:
    ap = report.parser(__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scopes", default="1,100")
    a = ap.parse_args()
    result = run(a.runs, [int(n) for n in a.scopes.split(",")])
    report.publish(a.out, "footprint", result, "Footprint: attach time and daemon memory",
                 "`ksbpf attach` timed as a user runs it (a new process); the daemon's VmRSS once it is ready.",
                 table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
