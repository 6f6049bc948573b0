"""--vpn-mark / --vpn-cgroup in the kernel (issue 17 section 1): the endpoint
exception belongs to the VPN client.  Crafted packets through
BPF_PROG_TEST_RUN of the real programs (the cgroup entry point and both tc
entry points, sharing their maps), with the firewall mark set through the
test run's context and the test run's socket in this process's own cgroup.
Each case checks the verdict AND that exactly one counter (the expected
reason) moved; a drop to an endpoint is streamed as an event with reason
endpoint_not_vpn.  The netfilter hook (no test run can give it an output
interface) is tested with real marked packets in tests/test_vpn_client.py."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest
from packets import ICMP, TCP, UDP, frame, ipv4, ipv6

from ksbpf.errors import KsbpfError
from ksbpf.kernel import bpf, cgroup, features, libbpf, netns
from ksbpf.observability import events
from ksbpf.policy import AnyEndpoint, Endpoint, EventSettings, Options, Policy
from ksbpf.reasons import Reason
from ksbpf.verify import model

pytestmark = pytest.mark.root

EP4 = Endpoint.parse("203.0.113.5:51820/udp")
EP6 = Endpoint.parse("[2001:db8:5::5]:51820/udp")
ANY = (AnyEndpoint.parse("*:4500/udp"), AnyEndpoint.parse("*:443/tcp"))
MARK, MASK = 0xCA6C, 0xFFFF
PUBLIC4, PUBLIC6 = "93.184.216.34", "2606:2800:220:1::1"

# option set -> (Options, how the VPN cgroups are set: None, "own" (this process's cgroup: the test
# run's socket is the VPN client's) or "other" (a sibling cgroup made by the fixture))
SETS = {
    "strict": (Options(), None),
    "mark": (Options(vpn_mark=True), None),
    "cgroup-own": (Options(vpn_cgroup=True), "own"),
    "cgroup-other": (Options(vpn_cgroup=True), "other"),
    "mark+cgroup-other+lan": (Options(vpn_mark=True, vpn_cgroup=True, allow_lan=True), "other"),
}
HOOKS = {"cgroup": bpf.ENTRY_CGROUP, "tc": bpf.ENTRY_TC_ETH, "tc_l3": bpf.ENTRY_TC_L3}
ENTRIES = tuple(HOOKS.values())


def _own_cgroup() -> cgroup.Cgroup:
    with open("/proc/self/cgroup") as f:
        rel = next(line[3:].strip() for line in f if line.startswith("0::"))
    return cgroup.resolve(os.path.join(cgroup.cgroup2_root(), rel.lstrip("/")))


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """A namespace with `tnl` (the registered tunnel), `phy` and a tun device
    `tn0` (neither), and the programs of every option set."""
    name = f"ksbpf-vp{uuid.uuid4().hex[:6]}"
    other = os.path.join(cgroup.cgroup2_root(), f"ksbpf-vpnt-{uuid.uuid4().hex[:6]}")
    subprocess.run(["ip", "netns", "add", name], check=True)
    env = {"progs": {}}
    try:
        os.mkdir(other)
        subprocess.run(["ip", "-n", name, "link", "add", "tnl", "type", "veth", "peer", "name", "phy"], check=True)
        subprocess.run(["ip", "-n", name, "tuntap", "add", "mode", "tun", "name", "tn0"], check=True)
        for dev in ("tnl", "phy", "tn0"):
            subprocess.run(["ip", "-n", name, "link", "set", dev, "up"], check=True)
        ns = netns.resolve(name)
        env.update(ns=ns, cookie=netns.cookie(ns), tnl=netns.ifindex(ns, "tnl"), phy=netns.ifindex(ns, "phy"),
                   tn0=netns.ifindex(ns, "tn0"))
        own = _own_cgroup()
        other_cg = cgroup.resolve(other)
        cgroups = {"own": [(own.id, cgroup.level(own))], "other": [(other_cg.id, cgroup.level(other_cg))]}
        cache = str(tmp_path_factory.mktemp("cache"))
        for label, (opts, cgs) in SETS.items():
            with features.forced_netns_identity(features.NETNS_HELPER):
                prog = bpf.load(opts, 2, EventSettings(rate=1000, burst=1000), cache=cache, entries=ENTRIES)
            env["progs"][label] = prog
            prog.maps.add_tunnel(env["cookie"], env["tnl"], 0)
            prog.maps.set_netns_cookie(env["cookie"])
            for ep in (EP4, EP6):
                prog.maps.add_endpoint(ep)
            if opts.vpn_mark:
                prog.maps.set_vpn_mark(MARK, MASK)
            if cgs:
                prog.maps.set_vpn_cgroups(cgroups[cgs])
            if opts.vpn_mark or opts.vpn_cgroup:
                for ep in ANY:
                    prog.maps.add_any_endpoint(ep)
        yield env
    finally:
        for prog in env["progs"].values():
            prog.close()
        subprocess.run(["ip", "netns", "del", name])
        if os.path.isdir(other):
            os.rmdir(other)


def decide(host, label: str, packet: bytes, hook: str, via: str = "phy", mark: int = 0) -> tuple[bool, Reason]:
    """One IP packet through a hook's program (as a frame, or bare on tn0 for
    tc_l3) with skb->mark = mark: (allowed, the one reason whose counter moved)."""
    prog = host["progs"][label]
    if hook == "tc_l3":
        data, ifindex = packet, host["tn0"] if via == "phy" else host[via] if via != "lo" else 1
    else:
        data, ifindex = frame(packet), {"phy": host["phy"], "tnl": host["tnl"], "lo": 1}[via]
    before = prog.maps.counters()
    run = netns.run_in(host["ns"].path, libbpf.prog_test_run, prog.progs[HOOKS[hook]], data, ifindex, 1, mark)
    after = prog.maps.counters()
    moved = {k: after[k][0] - before[k][0] for k in after if after[k] != before[k]}
    assert len(moved) == 1 and list(moved.values()) == [1], f"expected one counter to move by one: {moved}"
    ((reason, _fam),) = moved
    allowed = run.retval == 1 if hook == "cgroup" else run.retval == 0xFFFFFFFF
    if hook != "cgroup":
        assert run.retval in (0xFFFFFFFF, 2)
    return allowed, reason


V4, V6 = ipv4, ipv6
VPN_CASES = [
    # id, option set, packet, via, mark, expected
    # --vpn-mark: the mark under its mask decides
    ("mark-endpoint-v4", "mark", V4("203.0.113.5", UDP, dport=51820), "phy", MARK, Reason.ALLOW_ENDPOINT),
    ("mark-endpoint-v6", "mark", V6("2001:db8:5::5", UDP, dport=51820), "phy", MARK, Reason.ALLOW_ENDPOINT),
    ("mark-outside-mask", "mark", V4("203.0.113.5", UDP, dport=51820), "phy", 0x7_0000 | MARK, Reason.ALLOW_ENDPOINT),
    ("no-mark-endpoint-v4", "mark", V4("203.0.113.5", UDP, dport=51820), "phy", 0, Reason.DROP_ENDPOINT_NOT_VPN),
    ("no-mark-endpoint-v6", "mark", V6("2001:db8:5::5", UDP, dport=51820), "phy", 0, Reason.DROP_ENDPOINT_NOT_VPN),
    ("other-mark-endpoint", "mark", V4("203.0.113.5", UDP, dport=51820), "phy", MARK ^ 1, Reason.DROP_ENDPOINT_NOT_VPN),
    ("mask-bits-differ", "mark", V4("203.0.113.5", UDP, dport=51820), "phy", 0xCA00, Reason.DROP_ENDPOINT_NOT_VPN),
    # ServerIP: the endpoint's address on another port is no endpoint, marked or not
    ("mark-serverip-port", "mark", V4("203.0.113.5", UDP, dport=53), "phy", MARK, Reason.DROP_ENDPOINT_MISMATCH),
    ("mark-serverip-icmp", "mark", V4("203.0.113.5", ICMP), "phy", MARK, Reason.DROP_ENDPOINT_MISMATCH),
    # wildcard endpoints: any address, the VPN client's only, its port and protocol only
    ("mark-any-v4", "mark", V4(PUBLIC4, UDP, dport=4500), "phy", MARK, Reason.ALLOW_ENDPOINT),
    ("mark-any-v6", "mark", V6(PUBLIC6, TCP, dport=443), "phy", MARK, Reason.ALLOW_ENDPOINT),
    ("no-mark-any-v4", "mark", V4(PUBLIC4, UDP, dport=4500), "phy", 0, Reason.DROP_ENDPOINT_NOT_VPN),
    ("no-mark-any-v6", "mark", V6(PUBLIC6, TCP, dport=443), "phy", 0, Reason.DROP_ENDPOINT_NOT_VPN),
    ("mark-any-other-proto", "mark", V4(PUBLIC4, TCP, dport=4500), "phy", MARK, Reason.DROP_NOT_TUNNEL),
    ("mark-any-other-port", "mark", V4(PUBLIC4, UDP, dport=4501), "phy", MARK, Reason.DROP_NOT_TUNNEL),
    # the mark opens nothing else: the tunnel rule and the drop stay as they were
    ("mark-public", "mark", V4(PUBLIC4, UDP, dport=51820), "phy", MARK, Reason.DROP_NOT_TUNNEL),
    ("no-mark-tunnel", "mark", V4(PUBLIC4, UDP, dport=4500), "tnl", 0, Reason.ALLOW_TUNNEL),
    # --vpn-cgroup: the test run's socket is in this process's cgroup
    ("cgroup-own-endpoint", "cgroup-own", V4("203.0.113.5", UDP, dport=51820), "phy", 0, Reason.ALLOW_ENDPOINT),
    ("cgroup-own-any", "cgroup-own", V6(PUBLIC6, UDP, dport=4500), "phy", 0, Reason.ALLOW_ENDPOINT),
    ("cgroup-other-endpoint", "cgroup-other", V4("203.0.113.5", UDP, dport=51820), "phy", 0,
     Reason.DROP_ENDPOINT_NOT_VPN),
    ("cgroup-other-any", "cgroup-other", V4(PUBLIC4, TCP, dport=443), "phy", 0, Reason.DROP_ENDPOINT_NOT_VPN),
    ("cgroup-other-public", "cgroup-other", V4(PUBLIC4, TCP, dport=80), "phy", 0, Reason.DROP_NOT_TUNNEL),
    # both: either identity is the VPN client's; LAN stays LAN
    ("both-mark", "mark+cgroup-other+lan", V4("203.0.113.5", UDP, dport=51820), "phy", MARK, Reason.ALLOW_ENDPOINT),
    ("both-neither", "mark+cgroup-other+lan", V4("203.0.113.5", UDP, dport=51820), "phy", 0,
     Reason.DROP_ENDPOINT_NOT_VPN),
    ("both-lan-on-wildcard-port", "mark+cgroup-other+lan", V4("192.168.1.9", UDP, dport=4500), "phy", 0,
     Reason.ALLOW_LAN),
    # without --vpn-mark/--vpn-cgroup: the endpoint is anyone's (as before), and no wildcard exists
    ("strict-endpoint-anyone", "strict", V4("203.0.113.5", UDP, dport=51820), "phy", 0, Reason.ALLOW_ENDPOINT),
    ("strict-no-wildcard", "strict", V4(PUBLIC4, UDP, dport=4500), "phy", MARK, Reason.DROP_NOT_TUNNEL),
]


@pytest.mark.parametrize("hook", list(HOOKS))
@pytest.mark.parametrize("case", VPN_CASES, ids=[c[0] for c in VPN_CASES])
def test_vpn_only(host, case, hook):
    _id, label, packet, via, mark, expected = case
    allowed, reason = decide(host, label, packet, hook, via, mark)
    assert reason == expected
    assert allowed == expected.allowed
    # the model (ksbpf verify's and the fuzzer's judge) agrees
    opts, cgs = SETS[label]
    scope = model.Scope(opts, (EP4, EP6), frozenset({host["tnl"]}),
                        vpn_client=(opts.vpn_mark and (mark & MASK) == MARK) or cgs == "own",
                        any_endpoints=ANY if (opts.vpn_mark or opts.vpn_cgroup) else ())
    ifindex = {"phy": host["phy"], "tnl": host["tnl"]}[via]
    assert model.decide(model.CGROUP, packet, ifindex, scope).reason == expected


def test_drop_is_streamed(host):
    """A packet to the endpoint without the mark: one event, reason endpoint_not_vpn."""
    prog = host["progs"]["mark"]
    got: list[bytes] = []
    rb = libbpf.RingBuffer(lambda _src, raw: got.append(raw))
    rb.add(prog.maps.fds["events"], None)
    try:
        while rb.poll(50):   # whatever earlier cases left
            pass
        got.clear()
        decide(host, "mark", V4("203.0.113.5", UDP, sport=40123, dport=51820), "cgroup", mark=0)
        decide(host, "mark", V4("203.0.113.5", UDP, sport=40124, dport=51820), "cgroup", mark=MARK)   # allowed: none
        while rb.poll(50):
            pass
    finally:
        rb.close()
    evs = [events.Describer().describe("/s", None, raw) for raw in got]
    assert [(e.reason, e.dst, e.dport, e.sport) for e in evs] == \
        [(Reason.DROP_ENDPOINT_NOT_VPN, "203.0.113.5", 51820, 40123)]


def test_without_the_options_nothing_is_compiled_in(host):
    """Policies without --vpn-mark/--vpn-cgroup pay nothing per packet: the
    check and its maps are not in their program."""
    strict = host["progs"]["strict"]
    assert not {"vpn_mark", "vpn_cgroups", "ep_any"} & set(strict.maps.fds)
    assert {"vpn_mark", "ep_any"} <= set(host["progs"]["mark"].maps.fds)
    assert "-DKSBPF_OPT_VPN_MARK" not in bpf.cflags(Options(), 0)
    assert "-DKSBPF_OPT_VPN_MARK" in bpf.cflags(Policy(("wg0",), vpn_mark="7").options, 0)
    assert "-DKSBPF_OPT_VPN_CGROUP" in bpf.cflags(Policy(("wg0",), vpn_cgroups=("/sys/fs/cgroup",)).options, 0)


def test_wildcard_needs_the_vpn_client():
    with pytest.raises(KsbpfError, match=r"names every address.*--vpn-mark"):
        Policy(("wg0",), (AnyEndpoint.parse("*:51820/udp"),))
    p = Policy(("wg0",), (AnyEndpoint.parse("*:51820/udp"), EP4), vpn_mark="0xca6c/0xffff")
    assert p.endpoints == (EP4,) and p.any_endpoints == (AnyEndpoint(51820, "udp"),)
    assert p.vpn_mark == (MARK, MASK)
    assert Policy.from_dict(p.to_dict()) == p
    for bad in ("0", "0x10/0x1", "x", "1/2/3", str(1 << 32)):
        with pytest.raises(KsbpfError):
            Policy(("wg0",), vpn_mark=bad)
