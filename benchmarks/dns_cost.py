"""What `--dns` redirection costs per connect() and per sendmsg(): the
kernel's own run-time statistics (kernel.bpf_stats_enabled: run_time_ns and
run_cnt) of ksbpf's cgroup sock_addr programs (ksbpf_dns_send4 on
sendmsg, ksbpf_dns_conn4 on connect), each against a trivial `return 1`
program attached to the same hook of the same cgroup and measured on the
same calls; and the wall-clock time of the call as the application sees it,
with the scope attached with --dns and without.

A bench-owned network namespace with a tun device registered as the tunnel
(its resolver 10.99.0.53 and a non-DNS destination behind it: what is sent
there goes nowhere) and a bench-owned cgroup.  The sender is a process of the
cgroup in the namespace; each call is a UDP sendto() to, or a UDP connect()
of a fresh socket to:
- a stub resolver 127.0.0.53:53 (redirected to 10.99.0.53: the full path --
  resolver lookup, target lookup, socket cookie, dns_orig update);
- the VPN's resolver 10.99.0.53:53 (not redirected: resolver lookup, the
  socket's record deleted);
- 10.99.0.7:5353, not DNS (the early exit every other call pays).

    python benchmarks/dns_cost.py [--rounds 5] [--calls 20000]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import uuid

import report

from ksbpf.kernel import bpf, cgroup, libbpf, pins
from ksbpf.scopes import cgroups

RETURN_ALLOW = bytes.fromhex("b700000001000000") + bytes.fromhex("9500000000000000")   # r0 = 1; exit
RESOLVER, OTHER = "10.99.0.53", "10.99.0.7"
CASES = {   # name -> (call, destination, port)
    "sendmsg: DNS to the stub 127.0.0.53 (redirected)": ("send", "127.0.0.53", 53),
    "sendmsg: DNS to the VPN's resolver": ("send", RESOLVER, 53),
    "sendmsg: not DNS": ("send", OTHER, 5353),
    "connect: DNS to the stub 127.0.0.53 (redirected)": ("connect", "127.0.0.53", 53),
    "connect: not DNS": ("connect", OTHER, 5353),
}
SENDER = """
import json, socket, sys, time
call, dst, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
msg = b"x" * 40
if call == "send":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        try:
            s.sendto(msg, (dst, port))
        except OSError:
            pass
    t1 = time.perf_counter_ns()
else:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((dst, port))
        s.close()
    t1 = time.perf_counter_ns()
print(json.dumps({"ns": (t1 - t0) / n}))
"""


def _stats(prog_id: int) -> tuple[int, int]:
    out = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)],
                                    capture_output=True, text=True, check=True).stdout)
    return out.get("run_time_ns", 0), out.get("run_cnt", 0)


class Bench:
    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.ns = f"ksbpf-dc{tag}"
        self.cg = os.path.join(cgroup.cgroup2_root(), f"ksbpf-bench-dns-{tag}")
        self.trivial: dict[int, int] = {}   # attach type -> fd

    def create(self) -> None:
        run = lambda *c: subprocess.run(c, check=True, capture_output=True)   # noqa: E731
        run("ip", "netns", "add", self.ns)
        run("ip", "-n", self.ns, "link", "set", "lo", "up")
        run("ip", "-n", self.ns, "tuntap", "add", "mode", "tun", "name", "dctun")
        run("ip", "-n", self.ns, "addr", "add", "10.99.0.1/24", "dev", "dctun")
        run("ip", "-n", self.ns, "link", "set", "dctun", "up")
        os.mkdir(self.cg)

    def attach(self, dns: bool) -> None:
        from ksbpf.policy import Policy, parse_resolver
        policy = Policy(("dctun",), netns=self.ns, dns=(parse_resolver(RESOLVER),) if dns else ())
        cgroups.attach(self.cg, policy)

    def add_trivial(self) -> None:
        """`return 1` on the sendmsg4 and connect4 hooks: the floor each call pays for a program."""
        fd = os.open(self.cg, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for hook in (libbpf.BPF_CGROUP_UDP4_SENDMSG, libbpf.BPF_CGROUP_INET4_CONNECT):
                p = libbpf.prog_load(libbpf.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, "bench_trivial", "GPL", RETURN_ALLOW, hook)
                libbpf.prog_attach(p, fd, hook, libbpf.BPF_F_ALLOW_MULTI)
                self.trivial[hook] = p
        finally:
            os.close(fd)

    def ids(self) -> dict[str, int]:
        d = pins.scope_dir(cgroup.cgroup_id(self.cg))
        out = {}
        for entry, key in ((bpf.ENTRY_DNS_SEND4, "send"), (bpf.ENTRY_DNS_CONN4, "connect")):
            fd = libbpf.obj_get(os.path.join(d, bpf.PIN_NAMES[entry]))
            try:
                out[key] = libbpf.prog_info(fd).id
            finally:
                os.close(fd)
        out["send floor"] = libbpf.prog_info(self.trivial[libbpf.BPF_CGROUP_UDP4_SENDMSG]).id
        out["connect floor"] = libbpf.prog_info(self.trivial[libbpf.BPF_CGROUP_INET4_CONNECT]).id
        return out

    def call(self, call: str, dst: str, port: int, n: int) -> float:
        argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', self.cg,
                "ip", "netns", "exec", self.ns, sys.executable, "-c", SENDER, call, dst, str(port), str(n)]
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1])["ns"]

    def destroy(self) -> None:
        for hook, p in self.trivial.items():
            try:
                fd = os.open(self.cg, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    libbpf.prog_detach(p, fd, hook)
                finally:
                    os.close(fd)
            except OSError:
                pass
            os.close(p)
        cgroups.remove_cgroup_tree(self.cg)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


def measure(rounds: int, calls: int) -> dict:
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        stats_before = f.read().strip()
    b = Bench()
    prog: dict[str, list[tuple[float, float]]] = {c: [] for c in CASES}
    wall: dict[str, dict[str, list[float]]] = {c: {"with": [], "without": []} for c in CASES}
    try:
        b.create()
        b.attach(dns=True)
        b.add_trivial()
        ids = b.ids()
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write("1")
        for name, (call, dst, port) in CASES.items():   # warm-up
            b.call(call, dst, port, min(calls, 500))
        for r in range(rounds):
            names = list(CASES)
            for name in names[r % len(names):] + names[:r % len(names)]:
                call, dst, port = CASES[name]
                o0, t0 = _stats(ids[call]), _stats(ids[f"{call} floor"])
                wall[name]["with"].append(b.call(call, dst, port, calls))
                o1, t1 = _stats(ids[call]), _stats(ids[f"{call} floor"])
                if o1[1] > o0[1] and t1[1] > t0[1]:
                    prog[name].append(((o1[0] - o0[0]) / (o1[1] - o0[1]), (t1[0] - t0[0]) / (t1[1] - t0[1])))
        b.attach(dns=False)   # the same scope without --dns: the calls as they cost without redirection
        for r in range(rounds):
            for name, (call, dst, port) in CASES.items():
                wall[name]["without"].append(b.call(call, dst, port, calls))
    finally:
        with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
            f.write(stats_before)
        b.destroy()
    result: dict = {"benchmark": "dns_cost", "rounds": rounds, "calls": calls, "cases": {},
                    "machine_load": "other sessions were running tests on this machine at the same time"}
    for name in CASES:
        rows = prog[name]
        result["cases"][name] = {
            "program_ns": round(statistics.median(o for o, _ in rows), 1) if rows else None,
            "floor_ns": round(statistics.median(t for _, t in rows), 1) if rows else None,
            "added_ns": round(statistics.median(o - t for o, t in rows), 1) if rows else None,
            "call_ns_with_dns": round(statistics.median(wall[name]["with"]), 1),
            "call_ns_without_dns": round(statistics.median(wall[name]["without"]), 1),
        }
    result["machine"] = report.machine()
    return result


def main() -> int:
    ap = report.parser(__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20000)
    a = ap.parse_args()
    result = measure(a.rounds, a.calls)
    lines = ["| call | ksbpf program (ns) | trivial program (ns) | added (ns) | call with --dns (ns) | "
             "call without (ns) |", "|---|---|---|---|---|---|"]
    for name, c in result["cases"].items():
        lines.append(f"| {name} | {c['program_ns']} | {c['floor_ns']} | {c['added_ns']} | "
                     f"{c['call_ns_with_dns']} | {c['call_ns_without_dns']} |")
    report.publish(a.out, "dns_cost", result, "What --dns redirection costs per connect and sendmsg",
                   "Median over rounds of the kernel's bpf_stats for the sock_addr program and a trivial "
                   "`return 1` on the same hook and calls; wall time per call as the application sees it, in a "
                   "process of the scope (with --dns, then the same scope attached without).",
                   "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
