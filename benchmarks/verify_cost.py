"""What the verify nonce check costs the packets: the program as shipped
against the same source without the one call of ksbpf_verify_run() in
ksbpf_verdict(), on the allowed paths and a drop, through BPF_PROG_TEST_RUN
(real packets carry cb zeroed: the check is one context load and a branch).

Both variants are compiled by bcc from the shipped sources with the same
flags; variants are interleaved round after round; each figure is the median
over rounds of the kernel's mean ns per packet.  Runs in a bench-owned
namespace; no packet leaves the program.

    python benchmarks/verify_cost.py [--rounds 15] [--repeat 20000] [--out benchmarks/results]
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import report  # noqa: E402
from packets import TCP, UDP, frame, ipv4, ipv6  # noqa: E402

from ksbpf.kernel import bpf, libbpf, netns  # noqa: E402
from ksbpf.policy import Endpoint, EventSettings, Options  # noqa: E402
from ksbpf.verify.fuzz import FuzzEnv  # noqa: E402

CALL = "\tif (at->hook != KSBPF_HOOK_NF && ksbpf_verify_run(at->skb))\n\t\treturn reason < KSBPF_FIRST_DROP;\n"
EP4 = Endpoint.parse("203.0.113.5:51820/udp")
PATHS = {
    "loopback": ("lo", frame(ipv4("127.0.0.1", TCP, dport=80))),
    "tunnel v4": ("tnl", frame(ipv4("93.184.216.34", TCP, dport=443))),
    "tunnel v6": ("tnl", frame(ipv6("2606:2800:220:1::1", TCP, dport=443))),
    "endpoint v4": ("phy", frame(ipv4("203.0.113.5", UDP, dport=51820))),
    "lan v4": ("phy", frame(ipv4("192.168.1.20", TCP, dport=22))),
    "drop not_tunnel v4": ("phy", frame(ipv4("93.184.216.34", TCP, dport=443))),
}


def compile_variant(src_dir: str, flags: list[str]):
    import bcc
    b = bcc.BPF(src_file=os.path.join(src_dir, "ksbpf.c").encode(), cflags=[f"-I{src_dir}", *flags[1:]])
    fd = b.load_func(bpf.ENTRY_CGROUP.encode(), libbpf.BPF_PROG_TYPE_CGROUP_SKB).fd
    maps = bpf.ScopeMaps(bpf.bcc_map_fds(b), owned=False)
    return b, fd, maps


def main() -> None:
    ap = report.parser(__doc__)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--repeat", type=int, default=20000)
    a = ap.parse_args()
    opts = Options(allow_lan=True)
    flags = bpf.cflags(opts, 1, EventSettings(rate=0))
    with tempfile.TemporaryDirectory() as tmp, FuzzEnv() as env:
        variants = {}
        for name, drop_call in (("shipped", False), ("without the check", True)):
            d = os.path.join(tmp, name.replace(" ", "_"))
            os.makedirs(d)
            for f in ("ksbpf.c", "ksbpf.h"):
                shutil.copy(os.path.join(bpf.ebpf_dir(), f), d)
            if drop_call:
                path = os.path.join(d, "ksbpf.c")
                text = open(path).read()
                assert CALL in text, "the call of ksbpf_verify_run() moved: update CALL"
                with open(path, "w") as f:
                    f.write(text.replace(CALL, ""))
            b, fd, maps = compile_variant(d, flags)
            maps.add_tunnel(env.cookie, env.ifindex["tnl"], 0)
            maps.add_endpoint(EP4)
            variants[name] = (b, fd)
        samples = {(v, p): [] for v in variants for p in PATHS}
        for _ in range(a.rounds):
            for path, (via, data) in PATHS.items():
                for v, (_b, fd) in variants.items():
                    run = netns.run_in(env.path, libbpf.prog_test_run, fd, data, env.ifindex[via], a.repeat)
                    samples[(v, path)].append(run.duration_ns)
        rows = []
        result = {"machine": report.machine(), "rounds": a.rounds, "repeat": a.repeat, "paths": {}}
        for path in PATHS:
            with_ = statistics.median(samples[("shipped", path)])
            without = statistics.median(samples[("without the check", path)])
            result["paths"][path] = {"shipped_ns": with_, "without_check_ns": without, "delta_ns": with_ - without}
            rows.append(f"| {path} | {without:.1f} | {with_:.1f} | {with_ - without:+.1f} |")
        sizes = {v: libbpf._ProgInfo() for v in variants}
        for v, (_b, fd) in variants.items():
            import ctypes
            size = ctypes.c_uint32(ctypes.sizeof(sizes[v]))
            libbpf._lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(sizes[v]), ctypes.byref(size))
        insns = {v: sizes[v].xlated_prog_len // 8 for v in variants}
        result["instructions"] = insns
        for _b, _fd in variants.values():
            _b.cleanup()
    table = ("| path | without the check (ns) | shipped (ns) | difference (ns) |\n|---|---|---|---|\n" + "\n".join(rows)
             + f"\n\nProgram size after verification: {insns['without the check']} instructions without the check, "
               f"{insns['shipped']} shipped.")
    report.publish(a.out, "verify_cost", result, "The verify nonce check: cost per packet",
                   __doc__.split("\n\n")[0].replace("\n", " "), table)


if __name__ == "__main__":
    main()
