"""Reaction time of the daemon: from a tunnel interface appearing (or
disappearing) in the kernel to the scope's tunnel map allowing (or no
longer allowing) it.

A bench-owned network namespace and cgroup; the daemon runs as it would in
production (`ksbpf daemon`), with a scope whose tunnel is a tun device (what
wireguard-go and OpenVPN create).  Each flap creates the device with
TUNSETIFF (the clock starts just before the ioctl), polls the pinned map
until the new ifindex is in it, closes the device (the clock starts just
before close) and polls until the entry is gone.  No packet is sent.

    python benchmarks/reaction.py [--flaps 200] [--out benchmarks/results]
"""

from __future__ import annotations

import fcntl
import os
import queue
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import report

from ksbpf.kernel import bpf, cgroup, netns, pins
from ksbpf.scopes import cgroups

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
TARGET_P99_MS = 10.0
POLL_LIMIT_S = 5.0
START_LIMIT_S = 120.0   # the daemon's start-up: bcc may compile, on a loaded machine


class TunWorker:
    """A thread inside the namespace that creates and removes one tun device
    on request, so that the main thread can watch the map meanwhile (closing a
    tun device blocks its caller for tens of ms after netlink has told)."""

    def __init__(self, ns: netns.Netns, name: str):
        self.requests: queue.Queue = queue.Queue()
        self.idle = threading.Event()
        self.idle.set()
        self.thread = threading.Thread(target=netns.run_in, args=(ns.path, self._serve, name), daemon=True)
        self.thread.start()

    def _serve(self, name: str) -> None:
        fd = None
        while (cmd := self.requests.get()) != "stop":
            if cmd == "create":
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
            elif fd is not None:
                os.close(fd)
                fd = None
            self.idle.set()

    def create(self) -> None:
        self.idle.clear()
        self.requests.put("create")

    def remove(self) -> None:
        self.idle.clear()
        self.requests.put("remove")

    def wait_idle(self) -> None:
        """Wait until the last request has returned (not timed)."""
        self.idle.wait()

    def stop(self) -> None:
        self.requests.put("remove")
        self.requests.put("stop")
        self.thread.join()


def wait_until(pred, what: str = "the map update", limit: float = POLL_LIMIT_S) -> float:
    """The time at which pred() became true, polled every 0.1 ms (sleeping lets
    the tun worker thread have the GIL)."""
    start = time.perf_counter()
    while not pred():
        if time.perf_counter() - start > limit:
            raise RuntimeError(f"{what}: not within {limit:g} s: is the daemon running?")
        time.sleep(0.0001)
    return time.perf_counter()


def table_row(label: str, s: dict, target_ms: float | None) -> str:
    """A Markdown row of a latency summary; target_ms None: shown, not judged."""
    target = f"≤ {target_ms:g}" if target_ms is not None else ""
    met = "—" if target_ms is None else "yes" if s["p99_ms"] <= target_ms else "NO"
    return f"| {label} | {s['n']} | {s['p50_ms']} | {s['p99_ms']} | {s['max_ms']} | {target} | {met} |"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def start_daemon(workdir: str, config_text: str, pin_dir: str) -> subprocess.Popen:
    """`ksbpf daemon` on this configuration (written to workdir, its log beside
    it), once it has pinned the scope at pin_dir -- its first attach may
    compile the program: seconds, more on a loaded machine."""
    config = os.path.join(workdir, "ksbpf.toml")
    with open(config, "w") as f:
        f.write(config_text)
    with open(os.path.join(workdir, "daemon.log"), "w") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "ksbpf.cli", "daemon", "--config", config,
                                   "--log-format", "json"], stdout=log, stderr=log)
    wait_until(lambda: os.path.exists(os.path.join(pin_dir, "meta")) or daemon.poll() is not None,
               "the daemon's start", START_LIMIT_S)
    if daemon.poll() is not None:
        with open(os.path.join(workdir, "daemon.log")) as f:
            raise RuntimeError(f"the daemon exited: {f.read()[-2000:]}")
    return daemon


def summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 3), "p99_ms": round(percentile(ms, 99), 3),
            "max_ms": round(max(ms), 3), "mean_ms": round(statistics.fmean(ms), 3)}


def run(flaps: int) -> dict:
    tag = uuid.uuid4().hex[:6]
    ns_name, tun = f"ksbpf-bench-{tag}", f"tunb{tag}"
    cg = os.path.join(cgroup.cgroup2_root(), f"ksbpf-bench-{tag}")
    workdir = tempfile.mkdtemp(prefix="ksbpf-bench-")
    subprocess.run(["ip", "netns", "add", ns_name], check=True)
    os.mkdir(cg)
    daemon = None
    try:
        pin_dir = pins.scope_dir(cgroup.cgroup_id(cg))
        daemon = start_daemon(workdir, f'[[scope]]\ncgroup = "{cg}"\ntunnels = ["{tun}"]\nnetns = "{ns_name}"\n',
                              pin_dir)
        time.sleep(0.5)  # let it finish its start-up reconcile
        worker = TunWorker(netns.resolve(ns_name), tun)
        appear, vanish = [], []
        try:
            with bpf.ScopeMaps.from_pins(pin_dir) as maps:
                def registered() -> set[int]:
                    return {e.ifindex for e in maps.tunnels()}
                for _ in range(flaps):
                    worker.wait_idle()
                    t0 = time.perf_counter()
                    worker.create()
                    appear.append((wait_until(registered) - t0) * 1000)
                    t0 = time.perf_counter()
                    worker.remove()
                    vanish.append((wait_until(lambda: not registered()) - t0) * 1000)
        finally:
            worker.stop()
        return {
            "benchmark": "reaction",
            "what": "netlink event -> tunnel map updated, by the ksbpf daemon",
            "flaps": flaps, "target_p99_ms": TARGET_P99_MS,
            "appear": summary(appear), "disappear": summary(vanish),
            "samples_ms": {"appear": [round(v, 4) for v in appear], "disappear": [round(v, 4) for v in vanish]},
            "met": percentile(appear, 99) <= TARGET_P99_MS and percentile(vanish, 99) <= TARGET_P99_MS,
            "machine": report.machine(),
        }
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait()
        cgroups.remove_cgroup_tree(cg)
        subprocess.run(["ip", "netns", "del", ns_name])
        subprocess.run(["rm", "-rf", workdir])


def table(r: dict) -> str:
    lines = ["| reaction | n | p50 ms | p99 ms | max ms | target p99 | met |", "|---|---|---|---|---|---|---|"]
    for key in ("appear", "disappear"):
        lines.append(table_row(f"tunnel {key}s → map", r[key], r["target_p99_ms"]))
    return "\n".join(lines)


def main() -> int:
    ap = report.parser(__doc__)
    ap.add_argument("--flaps", type=int, default=200)
    a = ap.parse_args()
    result = run(a.flaps)
    report.publish(a.out, "reaction", result, "Reaction time",
                 f"{result['what']}; {result['flaps']} flaps of a tun device in a bench-owned namespace.",
                 table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
