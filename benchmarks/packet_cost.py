"""Per-packet cost of every decision path, through BPF_PROG_TEST_RUN on the
real program, against the floor: a trivial "return allow" cgroup_skb program
loaded the same way.  Also the cost of a drop with the blocked-packet stream
on and off.

Each variant runs `repeat` packets per call (the kernel reports the mean);
variants are interleaved round after round, and each figure is the median
over rounds with its spread (min-max), in ns and as a ratio to the floor
measured in the same rounds.  Runs in a bench-owned namespace; no packet
leaves the program.

    python benchmarks/packet_cost.py [--rounds 15] [--repeat 20000] [--out benchmarks/results]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import report  # noqa: E402
from packets import DSTOPTS, FRAGMENT, HOPOPTS, ICMP, TCP, UDP, frame, ipv4, ipv6  # noqa: E402

from ksbpf.kernel import bpf, libbpf, netns  # noqa: E402
from ksbpf.policy import Endpoint, EventSettings, Options  # noqa: E402
from ksbpf.reasons import Reason  # noqa: E402

TARGET_RATIO = 3.0
RETURN_ALLOW = bytes.fromhex("b701000000000000".replace("b701", "b700")) + bytes.fromhex("9500000000000000")
EP4, EP6 = Endpoint.parse("203.0.113.5:51820/udp"), Endpoint.parse("[2001:db8:5::5]:51820/udp")

# name -> (options label, via, frame, expected reason)
PATHS = {
    "loopback v4": ("all", "lo", frame(ipv4("127.0.0.1", TCP, dport=80)), Reason.ALLOW_LOOPBACK),
    "tunnel v4": ("all", "tnl", frame(ipv4("93.184.216.34", TCP, dport=443)), Reason.ALLOW_TUNNEL),
    "tunnel v6": ("all", "tnl", frame(ipv6("2606:2800:220:1::1", TCP, dport=443)), Reason.ALLOW_TUNNEL),
    "endpoint v4": ("all", "phy", frame(ipv4("203.0.113.5", UDP, dport=51820)), Reason.ALLOW_ENDPOINT),
    "endpoint v6": ("all", "phy", frame(ipv6("2001:db8:5::5", UDP, dport=51820)), Reason.ALLOW_ENDPOINT),
    "lan v4": ("all", "phy", frame(ipv4("192.168.1.20", TCP, dport=22)), Reason.ALLOW_LAN),
    "lan v6": ("all", "phy", frame(ipv6("fd12::1", TCP, dport=22)), Reason.ALLOW_LAN),
    "dhcp v4": ("all", "phy", frame(ipv4("255.255.255.255", UDP, sport=68, dport=67)), Reason.ALLOW_DHCP),
    "dhcp v6": ("all", "phy", frame(ipv6("ff02::1:2", UDP, sport=546, dport=547)), Reason.ALLOW_DHCP),
    "drop not_tunnel v4": ("all", "phy", frame(ipv4("93.184.216.34", TCP, dport=443)), Reason.DROP_NOT_TUNNEL),
    "drop not_tunnel v6": ("all", "phy", frame(ipv6("2606:2800:220:1::1", TCP, dport=443)), Reason.DROP_NOT_TUNNEL),
    "drop endpoint_mismatch v4": ("all", "phy", frame(ipv4("203.0.113.5", TCP, dport=22)), Reason.DROP_ENDPOINT_MISMATCH),
    "drop endpoint_mismatch v6": ("all", "phy", frame(ipv6("2001:db8:5::5", UDP, dport=53)), Reason.DROP_ENDPOINT_MISMATCH),
    "drop lan_dns v4": ("all", "phy", frame(ipv4("192.168.1.1", UDP, dport=53)), Reason.DROP_LAN_DNS),
    "drop lan_dns v6": ("all", "phy", frame(ipv6("fd00::53", UDP, dport=53)), Reason.DROP_LAN_DNS),
    "drop fragment v4": ("all", "phy", frame(ipv4("203.0.113.9", UDP, frag_offset=1480)), Reason.DROP_FRAGMENT),
    "drop fragment v6": ("all", "phy", frame(ipv6("2001:db8::9", UDP, ext=(FRAGMENT,), frag_offset=1448)), Reason.DROP_FRAGMENT),
    "drop malformed v6": ("all", "phy", frame(ipv6("2001:db8:5::5", UDP, dport=1, ext=(HOPOPTS,) + (DSTOPTS,) * 6)), Reason.DROP_MALFORMED),
    "drop not_tunnel icmp v4": ("all", "phy", frame(ipv4("93.184.216.34", ICMP)), Reason.DROP_NOT_TUNNEL),
    "drop, events off": ("strict", "phy", frame(ipv4("93.184.216.34", UDP, dport=9)), Reason.DROP_NOT_TUNNEL),
    "drop, events on (flood: rate-limited)": ("events", "phy", frame(ipv4("93.184.216.34", UDP, dport=9)), Reason.DROP_NOT_TUNNEL),
}


def build(ns, cache: str | None):
    progs = {
        # every exception on, so each path is reachable; events off: the drop paths' own cost
        "all": bpf.load(Options(allow_lan=True, allow_dhcp=True), 2, EventSettings(rate=0), cache=cache),
        "strict": bpf.load(Options(), 2, EventSettings(rate=0), cache=cache),
        "events": bpf.load(Options(), 2, EventSettings(rate=100, burst=20), cache=cache),
    }
    cookie, tnl = netns.cookie(ns), netns.ifindex(ns, "tnl")
    for p in progs.values():
        p.maps.add_tunnel(cookie, tnl, 0)
        for ep in (EP4, EP6):
            p.maps.add_endpoint(ep)
    return progs


def measure(rounds: int, repeat: int, cache: str | None = None) -> dict:
    name = f"ksbpf-bench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    progs = {}
    floor_fd = None
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "tnl", "type", "veth", "peer", "name", "phy"], check=True)
        ns = netns.resolve(name)
        progs = build(ns, cache)
        floor_fd = libbpf.prog_load(libbpf.BPF_PROG_TYPE_CGROUP_SKB, "ksbpf_floor", "GPL", RETURN_ALLOW)
        via = {"lo": 1, "tnl": netns.ifindex(ns, "tnl"), "phy": netns.ifindex(ns, "phy")}
        floor_frame = PATHS["tunnel v4"][2]

        def one_round() -> dict[str, float]:
            out = {"floor": libbpf.prog_test_run(floor_fd, floor_frame, via["tnl"], repeat).duration_ns}
            for label, (opts, v, pkt, expected) in PATHS.items():
                run = libbpf.prog_test_run(progs[opts].prog_fd, pkt, via[v], repeat)
                assert run.retval == (1 if expected.allowed else 0), label
                out[label] = run.duration_ns
            return out

        samples = [netns.run_in(ns.path, one_round) for _ in range(rounds)]
    finally:
        for p in progs.values():
            p.close()
        if floor_fd is not None:
            os.close(floor_fd)
        subprocess.run(["ip", "netns", "del", name])
    floor = [s["floor"] for s in samples]
    rows = {}
    for label in PATHS:
        ns_ = [s[label] for s in samples]
        ratios = [s[label] / s["floor"] for s in samples if s["floor"]]
        rows[label] = {"ns_median": statistics.median(ns_), "ns_min": min(ns_), "ns_max": max(ns_),
                       "ratio_median": round(statistics.median(ratios), 2),
                       "ratio_min": round(min(ratios), 2), "ratio_max": round(max(ratios), 2),
                       "met": statistics.median(ratios) <= TARGET_RATIO}
    return {"benchmark": "packet_cost", "rounds": rounds, "repeat": repeat, "target_ratio": TARGET_RATIO,
            "floor_ns": {"median": statistics.median(floor), "min": min(floor), "max": max(floor)},
            "paths": rows, "met": all(r["met"] for r in rows.values()), "machine": report.machine()}


def table(r: dict) -> str:
    lines = [f"| path | ns/packet (median, min–max) | × floor ({r['floor_ns']['median']} ns) | target ≤ {r['target_ratio']:g}× |",
             "|---|---|---|---|"]
    for label, row in r["paths"].items():
        lines.append(f"| {label} | {row['ns_median']} ({row['ns_min']}–{row['ns_max']}) | "
                     f"{row['ratio_median']} ({row['ratio_min']}–{row['ratio_max']}) | {'yes' if row['met'] else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    ap = report.parser(__doc__)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--repeat", type=int, default=20000)
    a = ap.parse_args()
    result = measure(a.rounds, a.repeat)
    report.publish(a.out, "packet_cost", result, "Per-packet cost of each decision path",
                 f"BPF_PROG_TEST_RUN, {a.repeat} packets per call, {a.rounds} interleaved rounds; "
                 "the floor is a `return 1` cgroup_skb program run the same way.", table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
