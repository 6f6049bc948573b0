"""Throughput through the kill switch, against no filter and against the same
policy written for nftables and for iptables.

A server namespace runs one iperf3 server; each variant has its own client
namespace joined to it by a veth, so that no ruleset of one variant is in
the path of another (a legacy iptables table, once created, stays for the
life of its namespace).  In every client namespace the veth plays the
tunnel, and the policy is the full one: loopback, the tunnel, a VPN endpoint
(IPv4 and IPv6), the LAN ranges of ksbpf.policy.LAN_RANGES minus DNS,
everything else dropped.

- no filter: the iperf3 client in a plain cgroup of the bench;
- no filter (control): the same again in another namespace, an A/A
  comparison: its ratio to no filter is this machine's noise, and a
  difference between filters smaller than its spread is not a difference;
- ksbpf: the client in a cgroup protected by `cgroups.attach` (tunnel kind
  "veth" trusted, since a veth is otherwise refused as an impostor);
- nftables: an `inet` table, output chain, LAN ranges as interval sets;
- iptables: iptables-restore + ip6tables-restore (Debian's default backend,
  recorded in the results); `--variants ...,iptables-legacy` adds the
  legacy backend.

Before measuring, each filter is shown to be in force: a datagram to an
address behind a second link of the client namespace (not the tunnel) must
fail with EPERM.  Traffic to the server leaves through the tunnel, so every
variant takes its "tunnel" decision.  Two measures, each a ratio to no filter in the same round: TCP
throughput (iperf3, bits/s received) and UDP with 64-byte payloads
(iperf3 -u -l 64 -b 0; packets/s received by the server, and sent).
Variants are interleaved round after round (the order rotates); figures are
medians with their spread (min-max).  The iperf3 client is pinned to CPU 0
and the server to CPU 1 when there are two CPUs or more.

ksbpf on tc (node mode, forwarded traffic): benchmarks/node_throughput.py.

    python benchmarks/throughput.py [--rounds 5] [--seconds 3] [--variants ...] [--out benchmarks/results]
"""

from __future__ import annotations

import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
import uuid

import report

from ksbpf.kernel import cgroup
from ksbpf.policy import LAN_RANGES, Endpoint, Options, Policy
from ksbpf.reasons import Reason
from ksbpf.scopes import cgroups, common

PORT = 5201                      # the iperf3 server's port in the server namespace
TARGET_RATIO = 0.97              # ksbpf >= 0.97 x no filter, and ahead of nftables and iptables
NO_FILTER, CONTROL = "no filter", "no filter (control)"
UNFILTERED = (NO_FILTER, CONTROL)
VARIANTS = (NO_FILTER, CONTROL, "ksbpf", "nftables", "iptables")
OPTIONAL = ("iptables-legacy",)
TABLE = "ksbpf_bench"
# The policy's VPN endpoints: never sent to (the traffic goes through the tunnel)
ENDPOINTS = (Endpoint.parse("198.19.0.1:51820/udp"), Endpoint.parse("[2001:2::1]:51820/udp"))
BLOCKED_NET = "198.19.250.0/24"  # behind a second link, not the tunnel: blocked by every filter
BLOCKED_DST = "198.19.250.9"
TESTS = ("tcp", "udp")


# --- bench-owned namespaces, links, cgroups and processes -------------------

def run(*cmd: str, input: str | None = None, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)[:200]}` failed ({proc.returncode}): {proc.stderr.strip()[:2000]}")
    return proc.stdout


class Netlab:
    """Namespaces, veths, cgroups and processes of one benchmark run, every
    name derived from a random tag; close() removes all of them, and only
    them.  Every packet stays inside these namespaces."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.parent = os.path.join(cgroup.cgroup2_root(), f"ksbpf-bench-{self.tag}")
        self.scopes: list[str] = []
        self._cg_made = False

    def netns(self, role: str) -> str:
        name = f"ksbpf-bench-{self.tag}-{role}"
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def veth(self, client: str, cdev: str, caddr: str, server: str, sdev: str, saddr: str, plen: int) -> None:
        """A veth from `client` to `server` (created in client, peer moved straight to server)."""
        run("ip", "-n", client, "link", "add", cdev, "type", "veth", "peer", "name", sdev, "netns", server)
        for ns, dev, addr in ((client, cdev, caddr), (server, sdev, saddr)):
            run("ip", "-n", ns, "addr", "add", f"{addr}/{plen}", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
        for ns, dev in ((client, cdev), (server, sdev)):
            deadline = time.monotonic() + 5
            while json.loads(run("ip", "-n", ns, "-j", "link", "show", "dev", dev))[0]["operstate"] != "UP":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{dev} in {ns} did not come up")
                time.sleep(0.02)

    def cgroup(self, name: str) -> str:
        if not self._cg_made:
            os.mkdir(self.parent)
            self._cg_made = True
        path = os.path.join(self.parent, name)
        os.mkdir(path)
        return path

    def attach(self, cg: str, policy: Policy) -> cgroups.AttachResult:
        self.scopes.append(cg)
        return cgroups.attach(cg, policy)

    def start(self, *argv: str) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        errors = []
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for cg in self.scopes:
            try:
                cgroups.detach(cg)
            except Exception as exc:  # keep cleaning up
                errors.append(f"detach {cg}: {exc}")
        if self._cg_made:
            try:
                cgroup.remove_tree(self.parent)
            except OSError as exc:
                errors.append(f"remove {self.parent}: {exc}")
        for ns in self.namespaces:
            # anything still running in our namespaces was started by this run
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if errors:
            print("cleanup problems: " + "; ".join(errors), file=sys.stderr)

    def __enter__(self) -> "Netlab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def in_ns(ns: str, cg: str | None, *cmd: str) -> list[str]:
    """argv running cmd in cgroup cg (joined first: `ip netns exec` remounts
    /sys and hides cgroupfs) and then in namespace ns."""
    argv = ["ip", "netns", "exec", ns, *cmd]
    if cg is None:
        return argv
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cg, *argv]


def pin_cpus() -> tuple[str | None, str | None]:
    """(client CPU, server CPU) for iperf3 -A, or (None, None) on one CPU."""
    return ("0", "1") if (os.cpu_count() or 1) >= 2 else (None, None)


def iperf3_server(lab: Netlab, ns: str, bind: str | None = None) -> subprocess.Popen:
    """An iperf3 server in ns, on PORT of every address or of `bind` only (a
    UDP test needs the server to answer from the address the client sends to)."""
    _, server_cpu = pin_cpus()
    proc = lab.start("ip", "netns", "exec", ns, "iperf3", "-s", "-p", str(PORT),
                     *(("-B", bind) if bind else ()), *(("-A", server_cpu) if server_cpu else ()))
    deadline = time.monotonic() + 5
    while f"{bind or ''}:{PORT} " not in run("ip", "netns", "exec", ns, "ss", "-Hltn"):
        if proc.poll() is not None:
            raise RuntimeError(f"iperf3 server exited: {proc.stderr.read().decode()[:500] if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise RuntimeError("iperf3 server did not listen")
        time.sleep(0.05)
    return proc


def iperf3(ns: str, cg: str | None, dst: str, seconds: float, udp: bool, tries: int = 3) -> dict:
    """One iperf3 run from namespace ns (and cgroup cg).  TCP: bits/s received;
    UDP (64-byte payloads, no rate limit): packets/s received and sent.
    Also the client's CPU seconds (user + system, its rusage)."""
    client_cpu, _ = pin_cpus()
    args = ["iperf3", "-c", dst, "-p", str(PORT), "-t", f"{seconds:g}", "-J",
            *(("-A", client_cpu) if client_cpu else ()),
            *(("-u", "-l", "64", "-b", "0") if udp else ())]
    last = ""
    for _ in range(tries):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(in_ns(ns, cg, *args), capture_output=True, text=True, timeout=seconds + 60)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        client_cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        try:
            out = json.loads(proc.stdout)
        except ValueError:
            out = {"error": proc.stdout[-300:] + proc.stderr[-300:]}
        if proc.returncode == 0 and "error" not in out:
            end = out["end"]
            if not udp:
                return {"bps": end["sum_received"]["bits_per_second"], "client_cpu_s": client_cpu_s}
            rx, tx = end["sum_received"], end["sum_sent"]
            return {"rx_pps": (rx["packets"] - rx["lost_packets"]) / rx["seconds"],
                    "tx_pps": tx["packets"] / tx["seconds"], "client_cpu_s": client_cpu_s}
        last = out.get("error", "")
        time.sleep(0.5)  # "the server is busy": the previous test is still being torn down
    raise RuntimeError(f"iperf3 from {ns} to {dst} failed {tries} times: {last}")


PROBE = ("import socket, sys\n"
         "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
         "try:\n    s.sendto(b'x', (sys.argv[1], int(sys.argv[2])))\nexcept PermissionError:\n    print('blocked')\n"
         "else:\n    print('sent')\n")


def blocked(ns: str, cg: str | None, dst: str, port: int = 9) -> bool:
    """Does a UDP datagram from ns (and cg) to dst:port fail with EPERM?"""
    out = run(*in_ns(ns, cg, sys.executable, "-c", PROBE, dst, str(port))).strip()
    return out == "blocked"


# --- the same policy, three ways ----------------------------------------------

def _v4(nets) -> list:
    return [n for n in nets if n.version == 4]


def _v6(nets) -> list:
    return [n for n in nets if n.version == 6]


def nft_ruleset(tunnel: str, endpoints=ENDPOINTS, lan=LAN_RANGES, hook: str = "output",
                passed: tuple[str, ...] = (), dhcp: bool = False, nd: bool = False) -> str:
    """The policy as an nftables `inet` table with one base chain on `hook`
    (output: a host's own sockets; postrouting: everything leaving, forwarded
    traffic included).  passed: more interface names (globs) let through like
    the tunnel (node mode's internal interfaces); dhcp: DHCP client traffic;
    nd: IPv6 router/neighbour solicitation and advertisement (tc's rules)."""
    def eps(version: int, match: str) -> list[str]:
        return [f"\t\t{match} daddr {e.address} {e.proto} dport {e.port} accept"
                for e in endpoints if e.address.version == version]
    lan4, lan6 = ", ".join(map(str, _v4(lan))), ", ".join(map(str, _v6(lan)))
    sets = [f"\tset lan4 {{ type ipv4_addr; flags interval; elements = {{ {lan4} }} }}"] if lan4 else []
    sets += [f"\tset lan6 {{ type ipv6_addr; flags interval; elements = {{ {lan6} }} }}"] if lan6 else []
    lan_rules = (["\t\tip daddr @lan4 meta l4proto { tcp, udp } th dport { 53, 853 } drop"] if lan4 else []) + \
                (["\t\tip6 daddr @lan6 meta l4proto { tcp, udp } th dport { 53, 853 } drop"] if lan6 else []) + \
                (["\t\tip daddr @lan4 accept"] if lan4 else []) + (["\t\tip6 daddr @lan6 accept"] if lan6 else [])
    return "\n".join([
        f"table inet {TABLE} {{",
        *sets,
        f"\tchain {hook} {{",
        f"\t\ttype filter hook {hook} priority filter; policy drop;",
        '\t\toif "lo" accept',
        *(f'\t\toifname "{name}" accept' for name in (tunnel, *passed)),
        *eps(4, "ip"), *eps(6, "ip6"),
        *lan_rules,
        *(["\t\tudp sport 68 udp dport 67 accept", "\t\tudp sport 546 udp dport 547 accept"] if dhcp else []),
        *(["\t\tip6 hoplimit 255 icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } accept"]
          if nd else []),
        "\t}",
        "}", ""])


def iptables_ruleset(version: int, tunnel: str, endpoints=ENDPOINTS, lan=LAN_RANGES, table: str = "filter",
                     chain: str = "OUTPUT", passed: tuple[str, ...] = (), dhcp: bool = False,
                     nd: bool = False) -> str:
    """The policy for iptables-restore / ip6tables-restore on one chain of one
    table (filter OUTPUT: a host's own sockets; mangle POSTROUTING: everything
    leaving).  passed, dhcp, nd: as nft_ruleset (iptables globs end in '+')."""
    nets = _v4(lan) if version == 4 else _v6(lan)
    a = f"-A {chain}"
    rules = [f"{a} -o lo -j ACCEPT", *(f"{a} -o {name.replace('*', '+')} -j ACCEPT" for name in (tunnel, *passed))]
    rules += [f"{a} -d {e.address} -p {e.proto} -m {e.proto} --dport {e.port} -j ACCEPT"
              for e in endpoints if e.address.version == version]
    rules += [f"{a} -d {n} -p {p} -m multiport --dports 53,853 -j DROP" for n in nets for p in ("udp", "tcp")]
    rules += [f"{a} -d {n} -j ACCEPT" for n in nets]
    if dhcp:
        sport, dport = (68, 67) if version == 4 else (546, 547)
        rules.append(f"{a} -p udp -m udp --sport {sport} --dport {dport} -j ACCEPT")
    if nd and version == 6:
        rules += [f"{a} -p ipv6-icmp -m hl --hl-eq 255 -m icmp6 --icmpv6-type {t} -j ACCEPT" for t in (133, 135, 136)]
    chains = {"filter": ("INPUT", "FORWARD", "OUTPUT"),
              "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")}[table]
    return "\n".join([f"*{table}", *(f":{c} {'DROP' if c == chain else 'ACCEPT'} [0:0]" for c in chains),
                      *rules, "COMMIT", ""])


def load_iptables(ns: str, v4: str, v6: str | None, legacy: bool = False) -> float:
    """Load the rulesets with *-restore in ns; seconds taken."""
    t = time.perf_counter()
    run("ip", "netns", "exec", ns, "iptables-legacy-restore" if legacy else "iptables-restore", input=v4)
    if v6 is not None:
        run("ip", "netns", "exec", ns, "ip6tables-legacy-restore" if legacy else "ip6tables-restore", input=v6)
    return time.perf_counter() - t


def load_nft(ns: str, ruleset: str) -> float:
    t = time.perf_counter()
    run("ip", "netns", "exec", ns, "nft", "-f", "-", input=ruleset)
    return time.perf_counter() - t


def versions() -> dict:
    return {tool: report._version(*cmd) for tool, cmd in
            (("iperf3", ("iperf3", "--version")), ("nft", ("nft", "--version")),
             ("iptables", ("iptables", "--version")))}


def spread(values: list[float], digits: int = 3) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def rotated(items, r: int) -> list:
    items = list(items)
    k = r % len(items)
    return items[k:] + items[:k]


# --- the benchmark -------------------------------------------------------------

def measure(rounds: int, seconds: float, variants: tuple[str, ...]) -> dict:
    variants = (NO_FILTER,) + tuple(v for v in variants if v != NO_FILTER)
    with Netlab() as lab:
        t = lab.tag  # variant K: client 198.18.K.1, server 198.18.K.2
        server = lab.netns("s")
        clients: dict[str, dict] = {}
        for k, variant in enumerate(variants, 1):
            ns = lab.netns(f"c{k}")
            tun, srv = f"bt{k}{t}", f"bs{k}{t}"
            lab.veth(ns, tun, f"198.18.{k}.1", server, srv, f"198.18.{k}.2", 24)
            # a second link, not the tunnel (a veth pair inside the client namespace)
            other, peer = f"bp{k}{t}", f"bq{k}{t}"
            run("ip", "-n", ns, "link", "add", other, "type", "veth", "peer", "name", peer)
            run("ip", "-n", ns, "addr", "add", f"{BLOCKED_NET.rsplit('.', 1)[0]}.1/24", "dev", other)
            for dev in (other, peer):
                run("ip", "-n", ns, "link", "set", dev, "up")
            c = {"ns": ns, "tunnel": tun, "dst": f"198.18.{k}.2", "cg": lab.cgroup(f"c{k}"), "load_s": None}
            if variant == "ksbpf":
                policy = Policy((tun,), ENDPOINTS, ns, Options(allow_lan=True), ("veth",))
                t0 = time.perf_counter()
                c["pin_dir"] = lab.attach(c["cg"], policy).pin_dir
                c["load_s"] = time.perf_counter() - t0
            elif variant == "nftables":
                c["load_s"] = load_nft(ns, nft_ruleset(tun))
            elif variant.startswith("iptables"):
                c["load_s"] = load_iptables(ns, iptables_ruleset(4, tun), iptables_ruleset(6, tun),
                                            legacy=variant == "iptables-legacy")
            elif variant not in UNFILTERED:
                raise ValueError(f"unknown variant {variant!r}")
            if blocked(ns, c["cg"], BLOCKED_DST) != (variant not in UNFILTERED):
                raise RuntimeError(f"{variant}: the filter is not in force as expected "
                                   f"(datagram to {BLOCKED_DST} {'blocked' if variant in UNFILTERED else 'sent'})")
            clients[variant] = c
        iperf3_server(lab, server)

        samples: list[dict] = []
        for r in range(rounds):
            sample: dict = {test: {} for test in TESTS}
            for test in TESTS:
                for variant in rotated(variants, r):
                    c = clients[variant]
                    sample[test][variant] = iperf3(c["ns"], c["cg"], c["dst"], seconds, udp=test == "udp")
            samples.append(sample)
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr)

        checks = {}
        if "ksbpf" in clients:
            st = cgroups.read_scope(clients["ksbpf"]["pin_dir"])
            packets = common.by_reason(st.counters)
            checks["ksbpf_tunnel_packets"] = packets[Reason.ALLOW_TUNNEL][0]
            checks["ksbpf_dropped_packets"] = st.dropped_packets
            if not packets[Reason.ALLOW_TUNNEL][0]:
                raise RuntimeError("ksbpf counted no packet through the tunnel: the scope was not in the path")
        load_s = {v: (round(c["load_s"], 3) if c["load_s"] is not None else None) for v, c in clients.items()}
        backend = versions()

    return summarize(samples, variants, rounds, seconds, load_s, checks, backend)


METRICS = {"tcp": ("bps",), "udp": ("rx_pps", "tx_pps")}


def summarize(samples, variants, rounds, seconds, load_s, checks, tools) -> dict:
    result: dict = {"benchmark": "throughput", "rounds": rounds, "seconds": seconds,
                    "variants": list(variants), "target_ratio": TARGET_RATIO,
                    "tc_hook": "cgroup hook here; the tc hook (node mode) in node_throughput", "pinned_cpus": pin_cpus(),
                    "load_s": load_s, "checks": checks, "tools": tools, "tests": {}}
    for test in TESTS:
        rows = {}
        for variant in variants:
            row = {}
            for metric in METRICS[test]:
                vals = [s[test][variant][metric] for s in samples]
                ratios = [s[test][variant][metric] / s[test][NO_FILTER][metric] for s in samples]
                row[metric] = spread(vals, 0)
                row[metric + "_ratio"] = spread(ratios, 3)
            rows[variant] = row
        result["tests"][test] = rows
    targets = {}
    for test in TESTS:
        rows, key = result["tests"][test], METRICS[test][0] + "_ratio"
        if "ksbpf" not in rows:
            continue
        k = rows["ksbpf"][key]["median"]
        others = {v: rows[v][key]["median"] for v in variants if v not in UNFILTERED + ("ksbpf",)}
        targets[test] = {"ksbpf_ratio": k, f"ratio_at_least_{TARGET_RATIO}": k >= TARGET_RATIO,
                         **{f"ahead_of_{v}": k > o for v, o in others.items()}}
        targets[test]["met"] = all(val for name, val in targets[test].items()
                                   if name.startswith(("ratio_at_least", "ahead_of")))
        if CONTROL in rows:  # the A/A comparison: what noise alone does to a ratio
            targets[test]["control_ratio"] = rows[CONTROL][key]
    result["targets"] = targets
    result["met"] = bool(targets) and all(t["met"] for t in targets.values())
    result["machine"] = report.machine()
    return result


def _fmt(value: float, unit: str) -> str:
    if unit == "Gbit/s":
        return f"{value / 1e9:.2f}"
    return f"{value / 1e3:.0f}k"


def table(r: dict) -> str:
    lines = ["| test | variant | median (min–max) | × no filter (min–max) | load |", "|---|---|---|---|---|"]
    labels = {"bps": ("TCP", "Gbit/s"), "rx_pps": ("UDP 64 B, received", "packets/s"),
              "tx_pps": ("UDP 64 B, sent", "packets/s")}
    for test in TESTS:
        for metric in METRICS[test]:
            name, unit = labels[metric]
            for variant, row in r["tests"][test].items():
                v, q = row[metric], row[metric + "_ratio"]
                load = r["load_s"].get(variant)
                lines.append(f"| {name} ({unit}) | {variant} | {_fmt(v['median'], unit)} "
                             f"({_fmt(v['min'], unit)}–{_fmt(v['max'], unit)}) | "
                             f"{q['median']:.3f} ({q['min']:.3f}–{q['max']:.3f}) | "
                             f"{f'{load:.2f} s' if load is not None else '—'} |")
    lines.append("")
    for test, t in r["targets"].items():
        parts = [f"≥ {TARGET_RATIO} × no filter: {'met' if t[f'ratio_at_least_{TARGET_RATIO}'] else 'MISSED'}"]
        parts += [f"ahead of {k.removeprefix('ahead_of_')}: {'met' if v else 'MISSED'}"
                  for k, v in t.items() if k.startswith("ahead_of_")]
        lines.append(f"- target, {test.upper()} (ksbpf {t['ksbpf_ratio']:.3f} × no filter): " + "; ".join(parts))
        if "control_ratio" in t:
            c = t["control_ratio"]
            lines.append(f"- noise, {test.upper()}: the A/A control (no filter against no filter) gives "
                         f"{c['median']:.3f} ({c['min']:.3f}–{c['max']:.3f}); differences within that spread are "
                         "not resolved on this machine")
    lines.append("- ksbpf here is the cgroup hook; node mode's tc hook (forwarded traffic): node_throughput.")
    return "\n".join(lines)


def main() -> int:
    ap = report.parser(__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each iperf3 run")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, from {', '.join(VARIANTS + OPTIONAL)} (no filter is always measured)")
    a = ap.parse_args()
    variants = tuple(v.strip() for v in a.variants.split(",") if v.strip())
    unknown = set(variants) - set(VARIANTS + OPTIONAL)
    if unknown:
        ap.error(f"unknown variants: {', '.join(sorted(unknown))}")
    result = measure(a.rounds, a.seconds, variants)
    backend = result["tools"].get("iptables") or "?"
    report.publish(a.out, "throughput", result, "Throughput: ksbpf against no filter, nftables and iptables",
                 f"iperf3 between two namespaces over a veth that plays the tunnel (one client namespace per "
                 f"variant), {a.rounds} interleaved rounds of {a.seconds:g} s runs; TCP bits/s received, and UDP "
                 f"with 64-byte payloads (-b 0) in packets/s received by the server and sent by the client. "
                 f"Same policy in each filter: loopback, the tunnel, endpoints, LAN minus DNS, drop. "
                 f"iptables: {backend}. Target: ksbpf ≥ {TARGET_RATIO} × no filter and ahead of "
                 f"nftables and iptables. ksbpf here is the cgroup hook; node mode's tc hook: node_throughput.", table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
