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

Beside them, on the same packets of the scopes that check every packet,
hand-assembled probes that always let the packet go measure the check by
itself: the namespace lookup alone (one bpf_sk_storage_get or one
bpf_get_netns_cookie), and the smallest program that decides the tunnel
path from it (the lookup, the ifindex filter, one comparison; no counters,
no verify runs).  What the smallest decision costs bounds what any policy
that asks on every packet can cost.  A third way, which ksbpf does not use
(yet), is measured the same way where the kernel allows it (Linux 6.2+):
the kfunc bpf_cast_to_kern_ctx gives the packet's struct sk_buff, and three
plain loads checked against the kernel's BTF read skb->sk->sk_net->net_cookie
-- no helper call, and it knows sockets older than the attach.

    python benchmarks/netns_identity.py [--rounds 15] [--packets 40000]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import report  # noqa: E402

from ksbpf.kernel import bpf, btf, cgroup, features, libbpf  # noqa: E402
from ksbpf.kernel.insns import CALL, EXIT, JEQ_K, LD_IMM64, LDXDW, LDXW, MOV64_K, MOV64_X, Asm, insn  # noqa: E402
from ksbpf.lab.namespaces import UdpEchoServer, _in_cgroup_and_ns, new_lab  # noqa: E402
from ksbpf.policy import Endpoint, Policy  # noqa: E402
from ksbpf.scopes import cgroups  # noqa: E402

HOT_TARGET, DROP_TARGET = 1.5, 2.5
FAST, PER_PACKET = "at socket creation", "per packet"   # where the scope checks a packet's namespace
PROBE_LOOKUP, PROBE_DECIDE = "the lookup alone", "the smallest decision"   # the probes (see probe())
RETURN_ALLOW = bytes.fromhex("b700000001000000") + bytes.fromhex("9500000000000000")   # r0 = 1; exit
BPF_STATS_RUN_TIME = 0
STXW, ADD64_K, JNE_X, BPF_FUNC_map_lookup_elem, BPF_PSEUDO_KFUNC_CALL = 0x63, 0x07, 0x5D, 1, 2
KERNEL_CONTEXT = "kernel context"   # the probes' third way (Linux 6.2+), not a variant ksbpf loads
SKB_SK, SKB_IFINDEX = 168, 40                 # offsetof(struct __sk_buff, sk / ifindex)
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


def probe(identity: str, pin_dir: str, decide: bool) -> int:
    """A cgroup_skb program that always returns 1 (it changes no verdict)
    after asking the packet's namespace the way `identity` does -- and with
    `decide`, after deciding the tunnel path from it as the policy does
    (the ifindex filter's owner compared with the namespace).  Its maps are
    the scope's own, so the socket storage it reads is the scope's."""
    def map_fd(asm: Asm, dst: int, fd: int) -> Asm:   # dst = the map (a 64-bit immediate: two slots)
        asm.items.append(insn(LD_IMM64, dst, bpf.BPF_PSEUDO_MAP_FD, 0, fd) + insn(0))
        return asm
    fds = []
    try:
        asm = Asm().op(MOV64_X, 6, 1)
        if identity == KERNEL_CONTEXT:   # skb -> struct sk_buff (a kfunc the verifier turns into a move)
            off = btf.offsets((("sk_buff", "sk", 8), ("sock", "__sk_common.skc_net", 8), ("net", "net_cookie", 8)))
            asm.op(CALL, src=BPF_PSEUDO_KFUNC_CALL, imm=btf.func_id("bpf_cast_to_kern_ctx"))
            asm.op(LDXDW, 1, 0, off["sk_buff.sk"]).jump(JEQ_K, "out", 1, imm=0)   # no socket: unknown
            asm.op(LDXDW, 1, 1, off["sock.__sk_common.skc_net"]).op(LDXDW, 7, 1, off["net.net_cookie"])
        elif identity == features.NETNS_STORAGE:
            fds.append(libbpf.obj_get(os.path.join(pin_dir, "sk_netns")))
            asm.op(LDXDW, 2, 6, SKB_SK).jump(JEQ_K, "out", 2, imm=0)
            map_fd(asm, 1, fds[-1]).op(MOV64_K, 3).op(MOV64_K, 4).op(CALL, imm=libbpf.BPF_FUNC_sk_storage_get)
            asm.jump(JEQ_K, "out", 0, imm=0).op(LDXDW, 7, 0, 0)
        else:
            asm.op(CALL, imm=libbpf.BPF_FUNC_get_netns_cookie).op(MOV64_X, 7, 0)
        if decide:
            fds.append(libbpf.obj_get(os.path.join(pin_dir, "tunnel_ifindex")))
            asm.op(LDXW, 1, 6, SKB_IFINDEX).op(STXW, 10, 1, -4).op(MOV64_X, 2, 10).op(ADD64_K, 2, imm=-4)
            map_fd(asm, 1, fds[-1]).op(CALL, imm=BPF_FUNC_map_lookup_elem)
            asm.jump(JEQ_K, "out", 0, imm=0).op(LDXDW, 1, 0, 0).op(JNE_X, 1, 7, 0)   # if r1 != r7: the same exit
        asm.label("out").op(MOV64_K, 0, imm=1).op(EXIT)
        return libbpf.prog_load(libbpf.BPF_PROG_TYPE_CGROUP_SKB, "bench_probe", "GPL", asm.build())
    finally:
        for fd in fds:
            os.close(fd)


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
    probes: dict[tuple[str, str], list[tuple[float, float]]] = {}
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
                ids, owned = {"ksbpf": res.prog_id, "floor": libbpf.prog_info(floor).id}, [floor]
                if check == PER_PACKET:   # the check by itself, on the same packets
                    ways = [identity.split("/")[0]] + ([KERNEL_CONTEXT] if identity.startswith(features.NETNS_STORAGE)
                                                       else [])
                    for way, decide in ((w, d) for w in ways for d in (False, True)):
                        try:
                            pfd = probe(way, res.pin_dir, decide)
                        except (OSError, btf.BtfError):
                            if way == KERNEL_CONTEXT:
                                continue   # before 6.2, or no BTF: not measured here
                            raise
                        owned.append(pfd)
                        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
                        try:
                            libbpf.prog_attach(pfd, fd, libbpf.BPF_CGROUP_INET_EGRESS, libbpf.BPF_F_ALLOW_MULTI)
                        finally:
                            os.close(fd)
                        ids[f"{way}/{PROBE_DECIDE if decide else PROBE_LOOKUP}"] = libbpf.prog_info(pfd).id
                scopes[identity] = (path, ids, owned)
            for _ in range(rounds):
                for identity, (path, ids, _floor) in scopes.items():
                    for label, dst in (("tunnel v4", lab.tun4_server), ("drop not_tunnel v4", lab.phy4_server),
                                       ("tunnel v6", lab.tun6_server), ("drop not_tunnel v6", lab.phy6_server)):
                        r = ns_per_run(lab, path, ids, dst, udp.port, packets)
                        samples.setdefault((identity, label), []).append((r["ksbpf"], r["floor"]))
                        for name in r:
                            if name not in ("ksbpf", "floor"):   # way/probe, measured on this scope's packets
                                probes.setdefault((name, label), []).append((r[name], r["floor"]))
            for _path, _ids, owned in scopes.values():
                for fd in owned:
                    os.close(fd)
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
        target = HOT_TARGET if label.startswith("tunnel") else DROP_TARGET
        rows.setdefault(identity, {})[label] = dict(_summary(s), target=target,
                                                    met=statistics.median(k / f for k, f in s if f) <= target)
    bounds = {}
    for (variant, label), s in probes.items():
        bounds.setdefault(variant, {})[label] = _summary(s)
    return {"rounds": rounds, "packets": packets, "variants": rows, "probes": bounds,
            "met": all(r["met"] for v in rows.values() for r in v.values()), "machine": report.machine()}


def _summary(s: list[tuple[float, float]]) -> dict:
    """ns per run of a program and its ratio to the floor of the same round:
    median (min-max) over the rounds."""
    ns = [k for k, _f in s]
    ratios = [k / f for k, f in s if f]
    return {"ns_median": round(statistics.median(ns), 1), "ns_min": round(min(ns), 1), "ns_max": round(max(ns), 1),
            "floor_ns_median": round(statistics.median(f for _k, f in s), 1),
            "ratio_median": round(statistics.median(ratios), 2), "ratio_min": round(min(ratios), 2),
            "ratio_max": round(max(ratios), 2)}


def table(r: dict) -> str:
    lines = ["| namespace from | path | ns/packet (median, min–max) | floor ns | × floor (median, min–max) | target | met |",
             "|---|---|---|---|---|---|---|"]
    names = {features.NETNS_HELPER: "bpf_get_netns_cookie (≥ 6.17)",
             features.NETNS_STORAGE: "socket storage (5.12+)",
             KERNEL_CONTEXT: "kernel context: bpf_cast_to_kern_ctx, skb->sk->sk_net (6.2+, not used by ksbpf)"}
    for label in ("tunnel v4", "tunnel v6", "drop not_tunnel v4", "drop not_tunnel v6"):
        for variant, rows in r["variants"].items():
            identity, check = variant.split("/")
            row = rows[label]
            lines.append(f"| {names[identity]}, checked {check} | {label} | {_cells(row)} | "
                         f"≤ {row['target']:g}× | {'yes' if row['met'] else 'NO'} |")
    if r.get("probes"):
        lines += ["", "The check by itself, on the same packets as the scope that checks every packet: "
                  "probes that always let the packet go (see `probe()`). The smallest decision is what any "
                  "policy asking on every packet costs at least.", "",
                  "| namespace from | probe | path | ns/packet (median, min–max) | floor ns | × floor (median, min–max) |",
                  "|---|---|---|---|---|---|"]
        for label in ("tunnel v4", "tunnel v6"):
            for variant, rows in r["probes"].items():
                identity, name = variant.split("/")
                lines.append(f"| {names[identity]} | {name} | {label} | {_cells(rows[label])} |")
    return "\n".join(lines)


def _cells(row: dict) -> str:
    """ns (min-max) | floor ns | ratio (min-max): a _summary() as table cells."""
    return (f"{row['ns_median']} ({row['ns_min']}–{row['ns_max']}) | {row['floor_ns_median']} | "
            f"{row['ratio_median']} ({row['ratio_min']}–{row['ratio_max']})")


def main() -> int:
    ap = report.parser(__doc__)
    ap.add_argument("--rounds", type=int, default=15)
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
