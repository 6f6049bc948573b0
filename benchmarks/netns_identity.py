"""Per-packet cost of the cgroup hook's two ways of knowing a packet's
network namespace, on real traffic: bpf_get_netns_cookie (Linux >= 6.17)
against socket storage written by the sock_create program (older kernels:
bpf_sk_storage_get on every packet) -- each where the scope checks it on
every packet (attached over running processes) and where it checks it when
each socket is made (a scope attached before its first process: the tunnel
path trusts the tunnel filter, see ksbpf_netns_fast).

A lab (wireguard-go tunnel between two namespaces); a cgroup scope attached
with each variant in turn, and beside it on the same cgroup a trivial
`return 1` cgroup_skb program (the floor), so both run on exactly the same
packets.  A sender in the scope sends UDP datagrams through the tunnel (the
tunnel path) and to the physical link (the drop path: EPERM).  The kernel's
own run-time statistics (BPF_ENABLE_STATS) give ns per run of each program.
Rounds alternate the variants; each figure is the median over rounds (with
min-max), in ns and as a ratio to the floor of the same round.

Target: the tunnel path <= 1.5x the floor with either variant; every drop
path <= 2.5x.

    python benchmarks/netns_identity.py [--rounds 7] [--packets 40000]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import report  # noqa: E402

from ksbpf.kernel import cgroup, features, libbpf  # noqa: E402
from ksbpf.lab.namespaces import UdpEchoServer, _in_cgroup_and_ns, new_lab  # noqa: E402
from ksbpf.policy import Endpoint, Policy  # noqa: E402
from ksbpf.scopes import cgroups  # noqa: E402

HOT_TARGET, DROP_TARGET = 1.5, 2.5
FAST, PER_PACKET = "at socket creation", "per packet"   # where the scope checks a packet's namespace
RETURN_ALLOW = bytes.fromhex("b700000001000000") + bytes.fromhex("9500000000000000")   # r0 = 1; exit
BPF_STATS_RUN_TIME = 0
SENDER = """
import socket, sys
dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
s.connect((dst, port))
sent = 0
for _ in range(n):
    try:
        s.send(b"x" * 64)
        sent += 1
    except OSError:
        pass
print(sent)
"""


def prog_stats(prog_id: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a program, as the kernel counts them."""
    out = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)],
                                    check=True, capture_output=True, text=True).stdout)
    return out.get("run_time_ns", 0), out.get("run_cnt", 0)


def send(lab, cg: str, dst: str, port: int, n: int) -> None:
    subprocess.run(_in_cgroup_and_ns(lab, cg, sys.executable, "-c", SENDER, dst, str(port), str(n)),
                   check=True, capture_output=True, timeout=300)


def ns_per_run(lab, cg: str, ids: dict[str, int], dst: str, port: int, n: int) -> dict[str, float]:
    before = {k: prog_stats(i) for k, i in ids.items()}
    send(lab, cg, dst, port, n)
    out = {}
    for k, i in ids.items():
        t, c = prog_stats(i)
        out[k] = (t - before[k][0]) / max(1, c - before[k][1])
    return out


def measure(rounds: int, packets: int) -> dict:
    stats_fd = libbpf._check(libbpf._lib().bpf_enable_stats(BPF_STATS_RUN_TIME), "enable BPF run-time statistics")
    lab = new_lab("ksbpfb")
    root = cgroup.cgroup2_root()
    made = []
    sleepers: list[subprocess.Popen] = []
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        lab.create()
        lab.tunnel_up()
        with UdpEchoServer(lab) as udp:
            scopes = {}
            for identity, check in ((i, c) for i in (features.NETNS_HELPER, features.NETNS_STORAGE)
                                    for c in (FAST, PER_PACKET)):
                if identity == features.NETNS_HELPER and not features.has("netns_cookie_cgroup_skb"):
                    continue   # this kernel has only socket storage
                path = os.path.join(root, f"ksbpf-bench-{lab.tag}-{identity}-{check.split()[0]}")
                os.mkdir(path)
                made.append(path)
                if check == PER_PACKET:   # attached over a running process: its older sockets may be anywhere
                    sleeper = subprocess.Popen(["sleep", "3600"])
                    sleepers.append(sleeper)
                    cgroup.join(cgroup.resolve(path), sleeper.pid)
                policy = Policy(tunnels=(lab.wg_client,), endpoints=(Endpoint.parse(lab.endpoint4),),
                                netns=lab.client_ns)
                with features.forced_netns_identity(identity):
                    res = cgroups.attach(path, policy)
                if cgroups.read_scope(res.pin_dir).netns_fast != (check == FAST):
                    raise SystemExit(f"{path}: the namespace check is not {check!r} as the bench expects")
                identity = f"{identity}/{check}"
                floor = libbpf.prog_load(libbpf.BPF_PROG_TYPE_CGROUP_SKB, "bench_floor", "GPL", RETURN_ALLOW)
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    libbpf.prog_attach(floor, fd, libbpf.BPF_CGROUP_INET_EGRESS, libbpf.BPF_F_ALLOW_MULTI)
                finally:
                    os.close(fd)
                scopes[identity] = (path, {"ksbpf": res.prog_id, "floor": libbpf.prog_info(floor).id}, floor)
            for _ in range(rounds):
                for identity, (path, ids, _floor) in scopes.items():
                    for label, dst in (("tunnel v4", lab.tun4_server), ("drop not_tunnel v4", lab.phy4_server),
                                       ("tunnel v6", lab.tun6_server), ("drop not_tunnel v6", lab.phy6_server)):
                        r = ns_per_run(lab, path, ids, dst, udp.port, packets)
                        samples.setdefault((identity, label), []).append((r["ksbpf"], r["floor"]))
            for _path, _ids, floor in scopes.values():
                os.close(floor)
    finally:
        for p in sleepers:
            p.kill()
            p.wait()
        for path in made:
            cgroups.remove_cgroup_tree(path)
        lab.destroy()
        os.close(stats_fd)
    rows = {}
    for (identity, label), s in samples.items():
        ns = [k for k, _f in s]
        ratios = [k / f for k, f in s if f]
        target = HOT_TARGET if label.startswith("tunnel") else DROP_TARGET
        rows.setdefault(identity, {})[label] = {
            "ns_median": round(statistics.median(ns), 1), "ns_min": round(min(ns), 1), "ns_max": round(max(ns), 1),
            "floor_ns_median": round(statistics.median(f for _k, f in s), 1),
            "ratio_median": round(statistics.median(ratios), 2), "ratio_min": round(min(ratios), 2),
            "ratio_max": round(max(ratios), 2), "target": target, "met": statistics.median(ratios) <= target}
    return {"rounds": rounds, "packets": packets, "variants": rows,
            "met": all(r["met"] for v in rows.values() for r in v.values()), "machine": report.machine()}


def table(r: dict) -> str:
    lines = ["| namespace from | path | ns/packet (median, min–max) | floor ns | × floor (median, min–max) | target | met |",
             "|---|---|---|---|---|---|---|"]
    names = {features.NETNS_HELPER: "bpf_get_netns_cookie (≥ 6.17)",
             features.NETNS_STORAGE: "socket storage (5.12+)"}
    for label in ("tunnel v4", "tunnel v6", "drop not_tunnel v4", "drop not_tunnel v6"):
        for variant, rows in r["variants"].items():
            identity, check = variant.split("/")
            row = rows[label]
            lines.append(f"| {names[identity]}, checked {check} | {label} | {row['ns_median']} ({row['ns_min']}–{row['ns_max']}) | "
                         f"{row['floor_ns_median']} | {row['ratio_median']} ({row['ratio_min']}–{row['ratio_max']}) | "
                         f"≤ {row['target']:g}× | {'yes' if row['met'] else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    ap = report.parser(__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--packets", type=int, default=40000)
    a = ap.parse_args()
    result = measure(a.rounds, a.packets)
    report.publish(a.out, "netns_identity", result, "The cgroup hook's namespace lookup: helper or socket storage",
                   f"Real UDP traffic from a scope's process ({a.packets} datagrams per path per round, "
                   f"{a.rounds} rounds alternating the variants); the kernel's run-time statistics of ksbpf's "
                   "cgroup program and of a `return 1` program attached to the same cgroup (the floor, same "
                   "packets). Targets: tunnel path ≤ 1.5× the floor, drop path ≤ 2.5×.", table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
