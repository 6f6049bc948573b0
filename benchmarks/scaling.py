"""How the per-packet cost grows with the size of the policy: 1, 100, 10,000
and 100,000 VPN endpoints, in ksbpf, nftables and iptables.

Two measures:

1. ksbpf alone, through BPF_PROG_TEST_RUN as in packet_cost.py: a program
   loaded for n endpoints (events off), its map filled with n endpoints; ns
   per packet to the LAST endpoint added (allowed) and to an address that is
   no endpoint (dropped), as a ratio to the same path at the smallest size,
   measured in the same rounds.  Target: at 100,000 within 1.2x of 1.  The
   same packet runs `repeat` times in a row, so the map entry it finds is
   hot in the cache: the figure is the lookup's cost, not a cache miss's.

2. All three the same way: UDP with 64-byte payloads (iperf3 -u -l 64 -b 0)
   through a veth, to the last of the n endpoints (an address the server
   namespace owns), in packets/s received (and sent), as a ratio to no
   filter measured in the same block.  One client namespace per variant and
   size, loaded once (load time reported): ksbpf, a cgroup scope with the n
   endpoints (the veth is no tunnel); nftables, a set `ip daddr . meta
   l4proto . th dport @endpoints accept`; iptables, n rules `-d ADDR -p udp
   --dport PORT -j ACCEPT` before the final drop, the traffic matching the
   last one (ip6tables: everything dropped).  Each also allows the iperf3
   control connection (TCP to the same address and port: ksbpf an endpoint
   more, nftables a set element more, iptables the first rule) and loopback.
   Before measuring, a datagram to an address that is no endpoint must fail
   with EPERM, and one to the last endpoint must not.

The LAN ranges are not scaled: they are a fixed list of nine ranges in
ksbpf (compiled into the program), so there is no "n LAN entries" to
compare.  Rounds interleave the sizes and, within a size, the variants (the
order rotates); figures are medians with their spread (min-max).

    python benchmarks/scaling.py [--sizes 1,100,10000,100000] [--rounds 3] [--seconds 2]
                                 [--testrun-rounds 15] [--repeat 20000] [--out benchmarks/results]
"""

from __future__ import annotations

import ipaddress
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import report  # noqa: E402
from packets import UDP, frame, ipv4  # noqa: E402
from throughput import (  # noqa: E402
    PORT,
    Netlab,
    blocked,
    iperf3,
    iperf3_server,
    load_iptables,
    load_nft,
    rotated,
    run,
    spread,
    versions,
)

from ksbpf.kernel import bpf, libbpf, netns  # noqa: E402
from ksbpf.policy import Endpoint, EventSettings, Options, Policy  # noqa: E402
from ksbpf.reasons import Reason  # noqa: E402
from ksbpf.scopes import cgroups, common  # noqa: E402

TARGET_TESTRUN_RATIO = 1.2       # ns/packet at 100,000 endpoints <= 1.2 x at 1
TARGET_AT = 100_000
SIZES = (1, 100, 10_000, 100_000)
VARIANTS = ("ksbpf", "nftables", "iptables")
OPTIONAL = ("iptables-legacy",)
FIRST = int(ipaddress.IPv4Address("198.18.0.1"))  # endpoint i is FIRST + i
MAX_SIZE = 130_000                # endpoints stay below the addresses of the links
NOT_ENDPOINT = "198.19.254.254"   # routed like the endpoints, but none of them
TABLE = "ksbpf_bench"
SHORT = {"no filter": "n", "ksbpf": "k", "nftables": "f", "iptables": "i", "iptables-legacy": "l"}


def endpoint(i: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(FIRST + i)


def last(n: int) -> ipaddress.IPv4Address:
    return endpoint(n - 1)


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(endpoint(i), PORT, "udp") for i in range(n)]


# --- 1. ksbpf through BPF_PROG_TEST_RUN -----------------------------------------

def testrun(lab: Netlab, sizes: list[int], rounds: int, repeat: int) -> dict:
    name = lab.netns("t")
    run("ip", "-n", name, "link", "add", "tnl", "type", "veth", "peer", "name", "phy")
    ns = netns.resolve(name)
    cookie, tnl, phy = netns.cookie(ns), netns.ifindex(ns, "tnl"), netns.ifindex(ns, "phy")
    progs, fill_s = {}, {}
    try:
        for n in sizes:
            progs[n] = bpf.load(Options(), n, EventSettings(rate=0))
            t = time.perf_counter()
            progs[n].maps.add_tunnel(cookie, tnl, 0)
            for ep in endpoints(n):
                progs[n].maps.add_endpoint(ep)
            fill_s[n] = time.perf_counter() - t
        packets = {n: {"endpoint": frame(ipv4(str(last(n)), UDP, dport=PORT)),
                       "drop": frame(ipv4(NOT_ENDPOINT, UDP, dport=PORT))} for n in sizes}

        def one_round(r: int) -> dict:
            out: dict = {}
            for n in rotated(sizes, r):
                for path, want in (("endpoint", 1), ("drop", 0)):
                    res = libbpf.prog_test_run(progs[n].prog_fd, packets[n][path], phy, repeat)
                    assert res.retval == want, (n, path, res.retval)
                    out[(n, path)] = res.duration_ns
            return out

        samples = [netns.run_in(ns.path, one_round, r) for r in range(rounds)]
    finally:
        for p in progs.values():
            p.close()
    base = sizes[0]
    rows = {}
    for n in sizes:
        row = {"fill_s": round(fill_s[n], 3)}
        for path in ("endpoint", "drop"):
            row[path] = spread([s[(n, path)] for s in samples], 0)
            row[path + "_ratio"] = spread([s[(n, path)] / s[(base, path)] for s in samples if s[(base, path)]], 3)
        rows[str(n)] = row
    return {"rounds": rounds, "repeat": repeat, "base_size": base, "sizes": rows}


# --- 2. packets/s through a veth ---------------------------------------------------

def nft_ruleset(n: int) -> str:
    elements = [f"{last(n)} . tcp . {PORT}"] + [f"{endpoint(i)} . udp . {PORT}" for i in range(n)]
    return "\n".join([
        f"table inet {TABLE} {{",
        "\tset endpoints {",
        "\t\ttype ipv4_addr . inet_proto . inet_service",
        "\t\telements = { " + ",\n\t\t\t".join(elements) + " }",
        "\t}",
        "\tchain output {",
        "\t\ttype filter hook output priority filter; policy drop;",
        '\t\toif "lo" accept',
        "\t\tip daddr . meta l4proto . th dport @endpoints accept",
        "\t}",
        "}", ""])


def iptables_rulesets(n: int) -> tuple[str, str]:
    head = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT DROP [0:0]",
            "-A OUTPUT -o lo -j ACCEPT"]
    v4 = head + [f"-A OUTPUT -d {last(n)}/32 -p tcp -m tcp --dport {PORT} -j ACCEPT"]
    v4 += [f"-A OUTPUT -d {endpoint(i)}/32 -p udp -m udp --dport {PORT} -j ACCEPT" for i in range(n)]
    return "\n".join(v4 + ["COMMIT", ""]), "\n".join(head + ["COMMIT", ""])


def pps(lab: Netlab, sizes: list[int], variants: tuple[str, ...], rounds: int, seconds: float) -> dict:
    t = lab.tag
    server = lab.netns("s")
    for n in sizes:
        run("ip", "-n", server, "addr", "add", f"{last(n)}/32", "dev", "lo")
    clients: dict[tuple[str, int], dict] = {}
    link = 0

    def client(variant: str, n: int) -> dict:
        nonlocal link
        if link >= 64:
            raise ValueError("too many sizes and variants: at most 63 client links")
        ns = lab.netns(f"{SHORT[variant]}{n}")
        # link k: 198.19.255.4k/30, the client .4k+1, the server .4k+2
        caddr, saddr = f"198.19.255.{4 * link + 1}", f"198.19.255.{4 * link + 2}"
        lab.veth(ns, f"sc{link}{t}", caddr, server, f"ss{link}{t}", saddr, 30)
        run("ip", "-n", ns, "route", "add", "198.18.0.0/15", "via", saddr)
        link += 1
        return {"ns": ns, "cg": lab.cgroup(f"{SHORT[variant]}{n}"), "load_s": None}

    plain = client("no filter", 0)
    for n in sizes:
        for variant in variants:
            c = client(variant, n)
            t0 = time.perf_counter()
            if variant == "ksbpf":
                eps = tuple(endpoints(n)) + (Endpoint(last(n), PORT, "tcp"),)
                # the veth is no tunnel: the tunnel named here does not exist
                policy = Policy((f"wg{t}",), eps, c["ns"], Options(), events=EventSettings(rate=0))
                c["pin_dir"] = lab.attach(c["cg"], policy).pin_dir
            elif variant == "nftables":
                load_nft(c["ns"], nft_ruleset(n))
            else:
                load_iptables(c["ns"], *iptables_rulesets(n), legacy=variant == "iptables-legacy")
            c["load_s"] = time.perf_counter() - t0
            if not blocked(c["ns"], c["cg"], NOT_ENDPOINT, PORT) or blocked(c["ns"], c["cg"], str(last(n)), PORT):
                raise RuntimeError(f"{variant} with {n} endpoints does not enforce the policy as expected")
            clients[(variant, n)] = c
            print(f"  {variant}, {n} endpoints: loaded in {c['load_s']:.2f} s", file=sys.stderr)
    if blocked(plain["ns"], plain["cg"], NOT_ENDPOINT, PORT):
        raise RuntimeError("no filter blocks")
    for n in sizes:  # one per address: UDP replies must come from the address the client sends to
        iperf3_server(lab, server, str(last(n)))

    everyone = ("no filter",) + variants
    samples = []
    for r in range(rounds):
        sample = {}
        for n in rotated(sizes, r):
            for variant in rotated(everyone, r):
                c = plain if variant == "no filter" else clients[(variant, n)]
                sample[(variant, n)] = iperf3(c["ns"], c["cg"], str(last(n)), seconds, udp=True)
        samples.append(sample)
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr)

    checks = {}
    for n in sizes:
        if ("ksbpf", n) in clients:
            counted = common.by_reason(cgroups.read_scope(clients[("ksbpf", n)]["pin_dir"]).counters)
            checks[f"ksbpf_{n}_endpoint_packets"] = counted[Reason.ALLOW_ENDPOINT][0]
            if not counted[Reason.ALLOW_ENDPOINT][0]:
                raise RuntimeError(f"ksbpf with {n} endpoints counted no endpoint packet: not in the path")

    rows: dict = {}
    for n in sizes:
        rows[str(n)] = {}
        for variant in everyone:
            row: dict = {"load_s": None if variant == "no filter" else round(clients[(variant, n)]["load_s"], 3)}
            for metric in ("rx_pps", "tx_pps"):
                row[metric] = spread([s[(variant, n)][metric] for s in samples], 0)
                row[metric + "_ratio"] = spread([s[(variant, n)][metric] / s[("no filter", n)][metric]
                                                 for s in samples], 3)
            rows[str(n)][variant] = row
    return {"rounds": rounds, "seconds": seconds, "variants": list(everyone), "sizes": rows, "checks": checks}


# --- the benchmark ---------------------------------------------------------------

def measure(sizes: list[int], variants: tuple[str, ...], rounds: int, seconds: float,
            testrun_rounds: int, repeat: int) -> dict:
    t0 = time.perf_counter()
    with Netlab() as lab:
        tr = testrun(lab, sizes, testrun_rounds, repeat)
        t1 = time.perf_counter()
        through = pps(lab, sizes, variants, rounds, seconds)
        tools = versions()
    at = str(TARGET_AT) if str(TARGET_AT) in tr["sizes"] else str(sizes[-1])
    ratio = tr["sizes"][at]["endpoint_ratio"]["median"]
    target = {"size": int(at), "endpoint_ratio": ratio, "limit": TARGET_TESTRUN_RATIO,
              "met": ratio <= TARGET_TESTRUN_RATIO}
    return {"benchmark": "scaling", "sizes": sizes, "testrun": tr, "pps": through, "target": target,
            "met": target["met"], "tools": tools, "tc_hook": "cgroup hook here (node mode: node_throughput)",
            "duration_s": {"testrun": round(t1 - t0, 1), "total": round(time.perf_counter() - t0, 1)},
            "machine": report.machine()}


def _k(v: float) -> str:
    return f"{v / 1e3:.1f}k" if v < 10_000 else f"{v / 1e3:.0f}k"


def table(r: dict) -> str:
    tr = r["testrun"]
    base = tr["base_size"]
    lines = [f"ksbpf through BPF_PROG_TEST_RUN ({tr['repeat']} packets per call, {tr['rounds']} rounds):", "",
             f"| endpoints | to the last endpoint: ns/packet (min–max) | × at {base} | "
             f"to no endpoint (drop): ns/packet | × at {base} | map filled in |",
             "|---|---|---|---|---|---|"]
    for n, row in tr["sizes"].items():
        e, d, er, dr = row["endpoint"], row["drop"], row["endpoint_ratio"], row["drop_ratio"]
        lines.append(f"| {int(n):,} | {e['median']:.0f} ({e['min']:.0f}–{e['max']:.0f}) | "
                     f"{er['median']:.2f} ({er['min']:.2f}–{er['max']:.2f}) | {d['median']:.0f} ({d['min']:.0f}–{d['max']:.0f}) | "
                     f"{dr['median']:.2f} ({dr['min']:.2f}–{dr['max']:.2f}) | {row['fill_s']:.2f} s |")
    t = r["target"]
    lines += ["", f"Target: ≤ {t['limit']}× at {t['size']:,} endpoints: {t['endpoint_ratio']:.2f}× — "
              f"{'met' if t['met'] else 'MISSED'}.", ""]
    p = r["pps"]
    for n, rows in p["sizes"].items():
        lines += [f"{int(n):,} endpoints — UDP, 64-byte payloads, to the last endpoint "
                  f"({p['rounds']} rounds of {p['seconds']:g} s):", "",
                  "| variant | load | received: packets/s (min–max) | × no filter (min–max) | sent: × no filter | test-run ns/packet |",
                  "|---|---|---|---|---|---|"]
        for variant, row in rows.items():
            rx, q, tq = row["rx_pps"], row["rx_pps_ratio"], row["tx_pps_ratio"]
            ns = f"{tr['sizes'][n]['endpoint']['median']:.0f}" if variant == "ksbpf" else "—"
            load = f"{row['load_s']:.2f} s" if row["load_s"] is not None else "—"
            lines.append(f"| {variant} | {load} | {_k(rx['median'])} ({_k(rx['min'])}–{_k(rx['max'])}) | "
                         f"{q['median']:.3f} ({q['min']:.3f}–{q['max']:.3f}) | {tq['median']:.3f} | {ns} |")
        lines.append("")
    lines.append("ksbpf here is the cgroup hook; node mode's tc hook: node_throughput.")
    return "\n".join(lines)


def main() -> int:
    ap = report.parser(__doc__)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="endpoint counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of iperf3 runs")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each iperf3 run")
    ap.add_argument("--testrun-rounds", type=int, default=15)
    ap.add_argument("--repeat", type=int, default=20000, help="packets per BPF_PROG_TEST_RUN call")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, from {', '.join(VARIANTS + OPTIONAL)} (no filter is always measured)")
    a = ap.parse_args()
    sizes = sorted({int(s) for s in a.sizes.split(",") if s.strip()})
    if not sizes or sizes[0] < 1 or sizes[-1] > MAX_SIZE:
        ap.error(f"sizes must be 1 to {MAX_SIZE:,}")
    variants = tuple(v.strip() for v in a.variants.split(",") if v.strip() and v.strip() != "no filter")
    unknown = set(variants) - set(VARIANTS + OPTIONAL)
    if unknown:
        ap.error(f"unknown variants: {', '.join(sorted(unknown))}")
    result = measure(sizes, variants, a.rounds, a.seconds, a.testrun_rounds, a.repeat)
    report.publish(a.out, "scaling", result, "Per-packet cost by policy size: ksbpf, nftables, iptables",
                 f"Endpoint counts {', '.join(f'{n:,}' for n in sizes)}. ksbpf alone through BPF_PROG_TEST_RUN "
                 f"(the same packet {a.repeat} times per call: a hot-cache lookup), as a ratio to the smallest size; "
                 f"then all three the same way, UDP 64-byte packets/s through a veth to the last endpoint, as a "
                 f"ratio to no filter in the same block. iptables: {result['tools'].get('iptables')}. "
                 f"The LAN list is fixed (nine ranges), not scaled. ksbpf here is the cgroup hook; node mode's tc hook: node_throughput.",
                 table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
