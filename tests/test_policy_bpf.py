"""The policy, rule by rule and reason by reason, IPv4 and IPv6, through
every hook: crafted packets through BPF_PROG_TEST_RUN on the real loaded
programs (the cgroup entry point and the tc entry points, sharing their
maps), with the egress ifindex set through the context.  Each case checks the
verdict AND that exactly one counter (the expected reason) moved, by one
packet and the packet's length in bytes."""

from __future__ import annotations

import ipaddress
import subprocess

import pytest
from packets import DSTOPTS, ETH_ARP, FRAGMENT, HOPOPTS, ICMP, ICMPV6, TCP, UDP, eth, frame, ipv4, ipv6, vlan_frame
from test_dns import CASES as DNS_CASES

from ksbpf.kernel import bpf, features, libbpf, netns
from ksbpf.policy import LAN_RANGES, Endpoint, Options
from ksbpf.reasons import Family, Reason
from ksbpf.verify.nonce import set_nonce
from ksbpf.verify.testrun import Runner, allowed, new_nonce

pytestmark = pytest.mark.root

EP4 = Endpoint.parse("203.0.113.5:51820/udp")
EP4_TCP = Endpoint.parse("198.51.100.7:443/tcp")
EP6 = Endpoint.parse("[2001:db8:5::5]:51820/udp")

ON_LINK6, ROUTED6 = "2001:db8:1::1/64", "2001:db8:99::/48"
OPTION_SETS = {
    "strict": Options(),
    "lan": Options(allow_lan=True),
    "lan+dns": Options(allow_lan=True, allow_lan_dns=True),
    "dhcp": Options(allow_dhcp=True),
}


ALL_ENTRIES = (bpf.ENTRY_CGROUP, bpf.ENTRY_TC_ETH, bpf.ENTRY_TC_L3)
HOOKS = {"cgroup": bpf.ENTRY_CGROUP, "tc": bpf.ENTRY_TC_ETH}
TC_ALLOW, TC_DROP = 0xFFFFFFFF, 2   # TC_ACT_UNSPEC (-1, TCX_NEXT) as the u32 retval; TC_ACT_SHOT


@pytest.fixture(scope="module", params=["compiled", "cached", "storage"])
def host(request, tmp_path_factory):
    """A namespace with two interfaces: `tnl` (registered as the tunnel) and
    `phy` (anything else), and a tun device `tn0`.  Programs are loaded once
    per option set, either compiled by bcc or loaded from the cached image of
    that compilation; "storage": compiled so that the cgroup hook reads each
    socket's namespace from socket storage (kernels < 6.17) -- a test run's
    socket has none, so its namespace is unknown (see check())."""
    import uuid
    name = f"ksbpf-pt{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "tnl", "type", "veth", "peer", "name", "phy"], check=True)
        subprocess.run(["ip", "-n", name, "tuntap", "add", "mode", "tun", "name", "tn0"], check=True)
        # neighbour discovery through phy reaches 2001:db8:1::/64 (on its link), not 2001:db8:99::/48
        # (through a gateway); the helper answers only for an interface that forwards IPv6
        for cmd in (["link", "set", "tnl", "up"], ["link", "set", "phy", "up"],
                    ["-6", "addr", "add", ON_LINK6, "dev", "phy", "nodad"],
                    ["-6", "route", "add", ROUTED6, "via", "2001:db8:1::ff", "dev", "phy"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True)
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"], check=True)
        ns = netns.resolve(name)
        env = {"ns": ns, "cookie": netns.cookie(ns), "tnl": netns.ifindex(ns, "tnl"),
               "phy": netns.ifindex(ns, "phy"), "tn0": netns.ifindex(ns, "tn0"), "progs": {}}
        cache = str(tmp_path_factory.mktemp("cache"))
        env["nonce"] = new_nonce()
        env["identity"] = features.NETNS_STORAGE if request.param == "storage" else features.NETNS_HELPER
        for label, opts in OPTION_SETS.items():
            with features.forced_netns_identity(env["identity"]):
                prog = bpf.load(opts, 3, cache=cache, entries=ALL_ENTRIES)
            assert prog._bcc_object is not None   # compiled
            if request.param == "cached":
                tags = {e: libbpf.prog_info(fd).tag for e, fd in prog.progs.items()}
                prog.close()
                with features.forced_netns_identity(env["identity"]):
                    prog = bpf.load(opts, 3, cache=cache, entries=ALL_ENTRIES)
                assert prog._bcc_object is None   # the same programs, no compiler
                assert {e: libbpf.prog_info(fd).tag for e, fd in prog.progs.items()} == tags
            prog.maps.add_tunnel(env["cookie"], env["tnl"], 0)
            prog.maps.set_netns_cookie(env["cookie"])   # tc: the namespace of the guarded interfaces
            for ep in (EP4, EP4_TCP, EP6):
                prog.maps.add_endpoint(ep)
            set_nonce(prog.maps, env["nonce"], env["cookie"])   # a verify run: a socket of this namespace
            env["progs"][label] = prog
        yield env
        for prog in env["progs"].values():
            prog.close()
    finally:
        subprocess.run(["ip", "netns", "del", name])


def family_of(frame_: bytes) -> Family:
    return {0x0800: Family.IPV4, 0x86DD: Family.IPV6}.get(int.from_bytes(frame_[12:14], "big"), Family.OTHER)


@pytest.fixture(params=list(HOOKS))
def hook(request) -> str:
    return request.param


def decide(host, options: str, packet: bytes, via: str = "phy", hook: str = "cgroup",
           entry: str | None = None, family: Family | None = None) -> tuple[int, Reason]:
    """Run one frame through a hook's program; return (verdict, the one reason
    whose counter moved)."""
    prog = host["progs"][options]
    entry = entry or HOOKS[hook]
    before = prog.maps.counters()
    ifindex = {"phy": host["phy"], "tnl": host["tnl"], "tn0": host["tn0"], "lo": 1}[via]
    run = netns.run_in(host["ns"].path, libbpf.prog_test_run, prog.progs[entry], packet, ifindex)
    after = prog.maps.counters()
    moved = {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after if after[k] != before[k]}
    assert len(moved) == 1, f"expected exactly one counter to move, got {moved}"
    ((reason, fam), (packets, nbytes)), = moved.items()
    assert fam == (family if family is not None else family_of(packet))
    assert packets == 1
    # skb->len: the cgroup hook sees the IP packet; tc on Ethernet the whole frame
    assert nbytes == len(packet) - (14 if entry == bpf.ENTRY_CGROUP else 0)
    return run.retval, reason


def verify_run(host, options: str, packet: bytes, via: str, entry: str = bpf.ENTRY_CGROUP) -> bool:
    """A verify run (uncounted; it stands for a socket of the host namespace): allowed?"""
    prog = host["progs"][options]
    ifindex = {"phy": host["phy"], "tnl": host["tnl"], "tn0": host["tn0"], "lo": 1}[via]
    before = prog.maps.counters()
    ret = netns.run_in(host["ns"].path, lambda: Runner(prog.progs[entry], host["nonce"]).run(packet, ifindex))
    assert prog.maps.counters() == before   # counted nowhere
    return allowed(entry != bpf.ENTRY_CGROUP, ret)


def check(host, options, packet, expected: Reason, via="phy", hook="cgroup"):
    if host["identity"] == features.NETNS_STORAGE and hook == "cgroup" and expected == Reason.ALLOW_TUNNEL:
        # A counted test run's socket has no recorded namespace: unknown, never a tunnel's -- the
        # tunnel's ifindex is then like any other interface (fail closed) ...
        assert decide(host, options, packet, via, hook) == decide(host, options, packet, "phy", hook)
        # ... while a run standing for a socket of the namespace passes
        assert verify_run(host, options, packet, via)
        return
    verdict, reason = decide(host, options, packet, via, hook)
    assert reason == expected
    if hook == "cgroup":
        assert verdict == (1 if expected.allowed else 0)
    else:
        assert verdict == (TC_ALLOW if expected.allowed else TC_DROP)
    assert verify_run(host, options, packet, via, HOOKS[hook]) == expected.allowed


V4, V6 = ipv4, ipv6
CASES = [
    # id, options, packet, via, expected
    ("loopback-v4", "strict", V4("127.0.0.1", TCP, dport=80), "lo", Reason.ALLOW_LOOPBACK),
    ("loopback-v6", "strict", V6("::1", UDP, dport=53), "lo", Reason.ALLOW_LOOPBACK),
    ("tunnel-v4", "strict", V4("93.184.216.34", TCP, dport=443), "tnl", Reason.ALLOW_TUNNEL),
    ("tunnel-v6", "strict", V6("2606:2800:220:1::1", UDP, dport=53), "tnl", Reason.ALLOW_TUNNEL),
    ("tunnel-any-proto-v4", "strict", V4("10.1.2.3", ICMP), "tnl", Reason.ALLOW_TUNNEL),
    ("physical-v4", "strict", V4("93.184.216.34", TCP, dport=443), "phy", Reason.DROP_NOT_TUNNEL),
    ("physical-v6", "strict", V6("2606:2800:220:1::1", TCP, dport=443), "phy", Reason.DROP_NOT_TUNNEL),
    ("physical-icmp-v4", "strict", V4("93.184.216.34", ICMP), "phy", Reason.DROP_NOT_TUNNEL),
    ("physical-icmp-v6", "strict", V6("2606:2800:220:1::1", ICMPV6), "phy", Reason.DROP_NOT_TUNNEL),
    ("physical-dns-v4", "strict", V4("9.9.9.9", UDP, dport=53), "phy", Reason.DROP_NOT_TUNNEL),
    # endpoint: address AND port AND protocol
    ("endpoint-v4", "strict", V4("203.0.113.5", UDP, dport=51820), "phy", Reason.ALLOW_ENDPOINT),
    ("endpoint-tcp-v4", "strict", V4("198.51.100.7", TCP, dport=443), "phy", Reason.ALLOW_ENDPOINT),
    ("endpoint-v6", "strict", V6("2001:db8:5::5", UDP, dport=51820), "phy", Reason.ALLOW_ENDPOINT),
    ("serverip-port-v4", "strict", V4("203.0.113.5", UDP, dport=53), "phy", Reason.DROP_ENDPOINT_MISMATCH),
    ("serverip-proto-v4", "strict", V4("203.0.113.5", TCP, dport=51820), "phy", Reason.DROP_ENDPOINT_MISMATCH),
    ("serverip-icmp-v4", "strict", V4("203.0.113.5", ICMP), "phy", Reason.DROP_ENDPOINT_MISMATCH),
    ("serverip-port-v6", "strict", V6("2001:db8:5::5", UDP, dport=51821), "phy", Reason.DROP_ENDPOINT_MISMATCH),
    ("serverip-proto-v6", "strict", V6("2001:db8:5::5", TCP, dport=51820), "phy", Reason.DROP_ENDPOINT_MISMATCH),
    ("endpoint-port-other-host-v4", "strict", V4("203.0.113.6", UDP, dport=51820), "phy", Reason.DROP_NOT_TUNNEL),
    # LAN: off by default, a fixed list when on, DNS to it blocked unless --allow-lan-dns
    ("lan-off-v4", "strict", V4("192.168.1.20", TCP, dport=22), "phy", Reason.DROP_NOT_TUNNEL),
    ("lan-off-v6", "strict", V6("fe80::1", TCP, dport=22), "phy", Reason.DROP_NOT_TUNNEL),
    ("lan-10-v4", "lan", V4("10.20.30.40", TCP, dport=22), "phy", Reason.ALLOW_LAN),
    ("lan-172-v4", "lan", V4("172.31.255.1", UDP, dport=5000), "phy", Reason.ALLOW_LAN),
    ("lan-192-v4", "lan", V4("192.168.1.20", ICMP), "phy", Reason.ALLOW_LAN),
    ("lan-linklocal-v4", "lan", V4("169.254.1.1", TCP, dport=80), "phy", Reason.ALLOW_LAN),
    ("lan-broadcast-v4", "lan", V4("255.255.255.255", UDP, dport=9), "phy", Reason.ALLOW_LAN),
    ("lan-mdns-v4", "lan", V4("224.0.0.251", UDP, dport=5353), "phy", Reason.ALLOW_LAN),
    ("lan-linklocal-v6", "lan", V6("fe80::1", TCP, dport=22), "phy", Reason.ALLOW_LAN),
    ("lan-ula-v6", "lan", V6("fd12:3456::1", UDP, dport=5000), "phy", Reason.ALLOW_LAN),
    ("lan-mcast-v6", "lan", V6("ff02::fb", UDP, dport=5353), "phy", Reason.ALLOW_LAN),
    # TunnelCrack LocalNet: a public range is never LAN, whatever the network says
    ("localnet-public-v4", "lan", V4("93.184.216.34", TCP, dport=443), "phy", Reason.DROP_NOT_TUNNEL),
    ("localnet-public-v6", "lan", V6("2606:2800:220:1::1", TCP, dport=443), "phy", Reason.DROP_NOT_TUNNEL),
    ("lan-edge-172.32-v4", "lan", V4("172.32.0.1", TCP, dport=22), "phy", Reason.DROP_NOT_TUNNEL),
    ("lan-cgnat-is-not-lan-v4", "lan", V4("100.64.0.1", TCP, dport=22), "phy", Reason.DROP_NOT_TUNNEL),
    ("lan-global-mcast-v4", "lan", V4("239.1.1.1", UDP, dport=5000), "phy", Reason.DROP_NOT_TUNNEL),
    ("lan-site-mcast-v6", "lan", V6("ff05::1:3", UDP, dport=547), "phy", Reason.DROP_NOT_TUNNEL),
    ("lan-dns-udp-v4", "lan", V4("192.168.1.1", UDP, dport=53), "phy", Reason.DROP_LAN_DNS),
    ("lan-dns-tcp-v4", "lan", V4("10.0.0.1", TCP, dport=53), "phy", Reason.DROP_LAN_DNS),
    ("lan-dot-v4", "lan", V4("10.0.0.1", TCP, dport=853), "phy", Reason.DROP_LAN_DNS),
    ("lan-dns-udp-v6", "lan", V6("fd00::53", UDP, dport=53), "phy", Reason.DROP_LAN_DNS),
    ("lan-dot-v6", "lan", V6("fe80::53", TCP, dport=853), "phy", Reason.DROP_LAN_DNS),
    ("lan-dns-allowed-v4", "lan+dns", V4("192.168.1.1", UDP, dport=53), "phy", Reason.ALLOW_LAN),
    ("lan-dns-allowed-v6", "lan+dns", V6("fd00::53", TCP, dport=853), "phy", Reason.ALLOW_LAN),
    ("dns-public-with-lan-v4", "lan+dns", V4("9.9.9.9", UDP, dport=53), "phy", Reason.DROP_NOT_TUNNEL),
    # the endpoint rule comes before the LAN rule
    ("lan-serverip-v4", "lan", V4("203.0.113.5", TCP, dport=22), "phy", Reason.DROP_ENDPOINT_MISMATCH),
    # DHCP client traffic, only with --allow-dhcp
    ("dhcp-off-v4", "strict", V4("255.255.255.255", UDP, sport=68, dport=67), "phy", Reason.DROP_NOT_TUNNEL),
    ("dhcp-v4", "dhcp", V4("255.255.255.255", UDP, sport=68, dport=67, src="0.0.0.0"), "phy", Reason.ALLOW_DHCP),
    ("dhcp-renew-v4", "dhcp", V4("192.168.1.1", UDP, sport=68, dport=67), "phy", Reason.ALLOW_DHCP),
    ("dhcp-linklocal-v4", "dhcp", V4("169.254.1.1", UDP, sport=68, dport=67), "phy", Reason.ALLOW_DHCP),
    # DHCP carries no data: a routed server is not the link's, a big message is no DHCP message
    ("dhcp-routed-server-v4", "dhcp", V4("192.0.2.1", UDP, sport=68, dport=67), "phy", Reason.DROP_NOT_TUNNEL),
    ("dhcp-big-v4", "dhcp", V4("255.255.255.255", UDP, sport=68, dport=67, payload=b"d" * 1400), "phy",
     Reason.DROP_NOT_TUNNEL),
    ("dhcp-576-v4", "dhcp", V4("255.255.255.255", UDP, sport=68, dport=67, payload=b"d" * 548), "phy",
     Reason.ALLOW_DHCP),
    ("dhcp-577-v4", "dhcp", V4("255.255.255.255", UDP, sport=68, dport=67, payload=b"d" * 549), "phy",
     Reason.DROP_NOT_TUNNEL),
    ("dhcp-wrong-sport-v4", "dhcp", V4("192.0.2.1", UDP, sport=40000, dport=67), "phy", Reason.DROP_NOT_TUNNEL),
    ("dhcp-tcp-v4", "dhcp", V4("192.0.2.1", TCP, sport=68, dport=67), "phy", Reason.DROP_NOT_TUNNEL),
    ("dhcp-off-v6", "strict", V6("ff02::1:2", UDP, sport=546, dport=547), "phy", Reason.DROP_NOT_TUNNEL),
    ("dhcp-v6", "dhcp", V6("ff02::1:2", UDP, sport=546, dport=547, src="fe80::2"), "phy", Reason.ALLOW_DHCP),
    ("dhcp-wrong-port-v6", "dhcp", V6("ff02::1:2", UDP, sport=546, dport=53), "phy", Reason.DROP_NOT_TUNNEL),
    ("dhcp-linklocal-server-v6", "dhcp", V6("fe80::1", UDP, sport=546, dport=547), "phy", Reason.ALLOW_DHCP),
    ("dhcp-routed-server-v6", "dhcp", V6("2606:2800:220:1::1", UDP, sport=546, dport=547), "phy",
     Reason.DROP_NOT_TUNNEL),
    ("dhcp-other-mcast-v6", "dhcp", V6("ff05::1:3", UDP, sport=546, dport=547), "phy", Reason.DROP_NOT_TUNNEL),
    ("dhcp-big-v6", "dhcp", V6("ff02::1:2", UDP, sport=546, dport=547, payload=b"d" * 1400), "phy",
     Reason.DROP_NOT_TUNNEL),
    # IPv6 extension headers are followed to the ports
    ("endpoint-exthdrs-v6", "strict", V6("2001:db8:5::5", UDP, dport=51820, ext=(HOPOPTS, DSTOPTS)), "phy", Reason.ALLOW_ENDPOINT),
    ("serverip-exthdrs-v6", "strict", V6("2001:db8:5::5", UDP, dport=53, ext=(HOPOPTS, DSTOPTS)), "phy", Reason.DROP_ENDPOINT_MISMATCH),
    ("endpoint-first-fragment-v6", "strict", V6("2001:db8:5::5", UDP, dport=51820, ext=(FRAGMENT,)), "phy", Reason.ALLOW_ENDPOINT),
    ("lan-dns-exthdr-v6", "lan", V6("fd00::53", UDP, dport=53, ext=(DSTOPTS,)), "phy", Reason.DROP_LAN_DNS),
    ("exthdr-chain-too-long-v6", "strict", V6("2001:db8:5::5", UDP, dport=51820, ext=(HOPOPTS,) + (DSTOPTS,) * 6), "phy", Reason.DROP_MALFORMED),
    # fragments: no ports, so no exception can match
    ("fragment-v4", "strict", V4("203.0.113.5", UDP, frag_offset=1480), "phy", Reason.DROP_FRAGMENT),
    ("fragment-lan-v4", "lan", V4("192.168.1.2", UDP, frag_offset=8), "phy", Reason.DROP_FRAGMENT),
    ("fragment-v6", "strict", V6("2001:db8:5::5", UDP, ext=(FRAGMENT,), frag_offset=1448), "phy", Reason.DROP_FRAGMENT),
    ("fragment-through-tunnel-v4", "strict", V4("203.0.113.9", UDP, frag_offset=1480), "tnl", Reason.ALLOW_TUNNEL),
]


@pytest.mark.parametrize("options,packet,via,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_policy(host, hook, options, packet, via, expected):
    check(host, options, frame(packet), expected, via, hook)


ND = {"rs": 133, "ns": 135, "na": 136}
ARP_REQUEST = b"\x00\x01\x08\x00\x06\x04\x00\x01" + bytes.fromhex("020000000001c0000201") + bytes(6) + bytes.fromhex("c0000202")
ARP_REPLY = ARP_REQUEST[:7] + b"\x02" + ARP_REQUEST[8:]


def nd(dst: str, kind: str, payload: bytes = b"x" * 8, **kw) -> bytes:
    return frame(ipv6(dst, ICMPV6, hop_limit=255, icmp_type=ND[kind], payload=payload, **kw))


TC_CASES = [
    # id, options, frame, expected at tc, expected at the cgroup hook
    ("arp", "strict", eth(ETH_ARP, b"\x00\x01\x08\x00\x06\x04\x00\x01" + b"\x00" * 20),
     Reason.ALLOW_NEIGH, Reason.DROP_NOT_IP),
    ("arp-reply", "strict", eth(ETH_ARP, ARP_REPLY), Reason.ALLOW_NEIGH, Reason.DROP_NOT_IP),
    ("arp-padded-to-60", "strict", eth(ETH_ARP, ARP_REQUEST + bytes(18)), Reason.ALLOW_NEIGH, Reason.DROP_NOT_IP),
    ("arp-padded-some", "strict", eth(ETH_ARP, ARP_REQUEST + bytes(5)), Reason.ALLOW_NEIGH, Reason.DROP_NOT_IP),
    ("arp-vlan", "strict", eth(0x8100, b"\x00\x0a\x08\x06" + ARP_REQUEST), Reason.ALLOW_NEIGH, None),
    # the ARP ethertype around anything that is not an ARP message is not ARP
    ("arp-carrying-ipv4", "strict", eth(ETH_ARP, ipv4("93.184.216.34", UDP, dport=443)),
     Reason.DROP_NOT_IP, Reason.DROP_NOT_IP),
    ("arp-vlan-carrying-ipv4", "strict", eth(0x8100, b"\x00\x0a\x08\x06" + ipv4("93.184.216.34", UDP, dport=443)),
     Reason.DROP_NOT_IP, None),
    ("arp-data-in-padding", "strict", eth(ETH_ARP, ARP_REQUEST + b"\x00" * 17 + b"d"), Reason.DROP_NOT_IP, Reason.DROP_NOT_IP),
    ("arp-longer-than-a-minimum-frame", "strict", eth(ETH_ARP, ARP_REQUEST + bytes(19)), Reason.DROP_NOT_IP,
     Reason.DROP_NOT_IP),
    ("arp-short", "strict", eth(ETH_ARP, ARP_REQUEST[:27]), Reason.DROP_NOT_IP, Reason.DROP_NOT_IP),
    ("arp-ipv6-plen", "strict", eth(ETH_ARP, ARP_REQUEST[:5] + b"\x10" + ARP_REQUEST[6:]), Reason.DROP_NOT_IP,
     Reason.DROP_NOT_IP),
    ("arp-rarp-op", "strict", eth(ETH_ARP, ARP_REQUEST[:7] + b"\x03" + ARP_REQUEST[8:]), Reason.DROP_NOT_IP,
     Reason.DROP_NOT_IP),
    ("arp-not-ethernet", "strict", eth(ETH_ARP, b"\x00\x06" + ARP_REQUEST[2:]), Reason.DROP_NOT_IP, Reason.DROP_NOT_IP),
    # neighbour discovery toward the link itself, no bigger than ND needs
    ("nd-ns-on-link", "strict", nd("2001:db8:1::2", "ns", src="2001:db8:1::1"), Reason.ALLOW_NEIGH,
     Reason.DROP_NOT_TUNNEL),
    ("nd-na-on-link", "strict", nd("2001:db8:1::2", "na", src="2001:db8:1::1"), Reason.ALLOW_NEIGH,
     Reason.DROP_NOT_TUNNEL),
    # from an address outside the neighbour's /64: not ND toward the link (no FIB lookup needed)
    ("nd-ns-on-link-other-source", "strict", nd("2001:db8:1::2", "ns"), Reason.DROP_NOT_TUNNEL, Reason.DROP_NOT_TUNNEL),
    ("nd-ns-routed", "strict", nd("2001:db8:99::2", "ns"), Reason.DROP_NOT_TUNNEL, Reason.DROP_NOT_TUNNEL),
    ("nd-na-routed", "strict", nd("2001:db8:99::2", "na"), Reason.DROP_NOT_TUNNEL, Reason.DROP_NOT_TUNNEL),
    # the source forged into the routed destination's /64: the FIB says it is beyond a gateway
    ("nd-ns-routed-forged-source", "strict", nd("2001:db8:99::2", "ns", src="2001:db8:99::1"), Reason.DROP_NOT_TUNNEL,
     Reason.DROP_NOT_TUNNEL),
    ("nd-na-no-route-forged-source", "strict", nd("2606:2800:220:1::1", "na", src="2606:2800:220:1::2"),
     Reason.DROP_NOT_TUNNEL, Reason.DROP_NOT_TUNNEL),
    ("nd-rs-no-route", "strict", nd("2606:2800:220:1::1", "rs"), Reason.DROP_NOT_TUNNEL, Reason.DROP_NOT_TUNNEL),
    ("nd-ns-big", "strict", nd("ff02::1:ff00:1", "ns", payload=b"x" * 1200), Reason.DROP_NOT_TUNNEL,
     Reason.DROP_NOT_TUNNEL),
    ("nd-na-104", "strict", nd("fe80::1", "na", payload=b"x" * 56), Reason.ALLOW_NEIGH, Reason.DROP_NOT_TUNNEL),
    ("nd-na-105", "strict", nd("fe80::1", "na", payload=b"x" * 57), Reason.DROP_NOT_TUNNEL, Reason.DROP_NOT_TUNNEL),
    ("nd-big-to-lan-with-allow-lan", "lan", nd("ff02::1:ff00:1", "ns", payload=b"x" * 1200), Reason.ALLOW_LAN,
     Reason.ALLOW_LAN),
    # IPv4 carrying protocol 58 is no ICMPv6 (no "ICMPv6 type" is read of it)
    ("ipv4-proto-58", "strict", frame(ipv4("93.184.216.34", ICMPV6)), Reason.DROP_NOT_TUNNEL, Reason.DROP_NOT_TUNNEL),
    ("nd-ns", "strict", frame(ipv6("ff02::1:ff00:1", ICMPV6, hop_limit=255, icmp_type=ND["ns"])),
     Reason.ALLOW_NEIGH, Reason.DROP_NOT_TUNNEL),
    ("nd-na", "strict", frame(ipv6("fe80::1", ICMPV6, hop_limit=255, icmp_type=ND["na"])),
     Reason.ALLOW_NEIGH, Reason.DROP_NOT_TUNNEL),
    ("nd-rs", "strict", frame(ipv6("ff02::2", ICMPV6, hop_limit=255, icmp_type=ND["rs"])),
     Reason.ALLOW_NEIGH, Reason.DROP_NOT_TUNNEL),
    # a router advertisement, or ND that a router would forward (hop limit below 255), is not ND
    ("nd-ra-is-not-allowed", "strict", frame(ipv6("ff02::1", ICMPV6, hop_limit=255, icmp_type=134)),
     Reason.DROP_NOT_TUNNEL, Reason.DROP_NOT_TUNNEL),
    ("nd-hop-limit-64", "strict", frame(ipv6("2606:2800:220:1::1", ICMPV6, hop_limit=64, icmp_type=ND["ns"])),
     Reason.DROP_NOT_TUNNEL, Reason.DROP_NOT_TUNNEL),
    ("nd-fragmented", "strict", frame(ipv6("fe80::1", ICMPV6, hop_limit=255, icmp_type=ND["ns"], ext=(FRAGMENT,), frag_offset=8)),
     Reason.DROP_FRAGMENT, Reason.DROP_FRAGMENT),
    ("lldp", "strict", eth(0x88CC, b"\x02\x07\x04" + b"\x00" * 40), Reason.DROP_NOT_IP, Reason.DROP_NOT_IP),
    ("vlan-endpoint-v4", "strict", vlan_frame(ipv4("203.0.113.5", UDP, dport=51820)),
     Reason.ALLOW_ENDPOINT, None),
    ("vlan-public-v4", "strict", vlan_frame(ipv4("93.184.216.34", TCP, dport=443)),
     Reason.DROP_NOT_TUNNEL, None),
    ("vlan-public-v6", "strict", vlan_frame(ipv6("2606:2800:220:1::1", UDP, dport=53)),
     Reason.DROP_NOT_TUNNEL, None),
]


def frame_family(f: bytes) -> Family:
    ethertype = int.from_bytes(f[12:14], "big")
    if ethertype == 0x8100:
        ethertype = int.from_bytes(f[16:18], "big")
    return {0x0800: Family.IPV4, 0x86DD: Family.IPV6}.get(ethertype, Family.OTHER)


@pytest.mark.parametrize("options,frame_,at_tc,at_cgroup", [c[1:] for c in TC_CASES], ids=[c[0] for c in TC_CASES])
def test_link_layer_rules(host, options, frame_, at_tc, at_cgroup):
    """ARP and IPv6 ND pass the tc guard (the machine must reach its gateway
    and the VPN server), never the cgroup hook; other non-IP frames are
    dropped; the ethertype is read through an 802.1Q tag."""
    verdict, reason = decide(host, options, frame_, hook="tc", family=frame_family(frame_))
    assert (reason, verdict) == (at_tc, TC_ALLOW if at_tc.allowed else TC_DROP)
    if at_cgroup is not None:
        verdict, reason = decide(host, options, frame_, hook="cgroup", family=frame_family(frame_))
        assert (reason, verdict) == (at_cgroup, 1 if at_cgroup.allowed else 0)


@pytest.mark.parametrize("packet,expected", [
    (ipv4("203.0.113.5", UDP, dport=51820), Reason.ALLOW_ENDPOINT),
    (ipv4("93.184.216.34", TCP, dport=443), Reason.DROP_NOT_TUNNEL),
    (ipv6("2001:db8:5::5", UDP, dport=51820), Reason.ALLOW_ENDPOINT),
    (ipv6("2606:2800:220:1::1", TCP, dport=443), Reason.DROP_NOT_TUNNEL),
], ids=["endpoint-v4", "public-v4", "endpoint-v6", "public-v6"])
def test_tc_on_a_device_without_link_header(host, packet, expected):
    """The tc entry point for tun-like devices reads the IP version from the
    packet itself (the test run hands a tc program the buffer as given: here
    the bare IP packet, as a tun device's egress carries it)."""
    prog = host["progs"]["strict"]
    before = prog.maps.counters()
    run = netns.run_in(host["ns"].path, libbpf.prog_test_run, prog.progs[bpf.ENTRY_TC_L3], packet, host["tn0"])
    after = prog.maps.counters()
    moved = [k for k in after if after[k] != before[k]]
    assert moved == [(expected, family_of(frame(packet)))]
    assert run.retval == (TC_ALLOW if expected.allowed else TC_DROP)


def test_malformed_ipv4_header(host, hook):
    pkt = bytearray(ipv4("203.0.113.5", UDP, dport=51820))
    pkt[0] = 0x44  # IHL 4 (< 5): not a valid IPv4 header
    check(host, "strict", frame(bytes(pkt)), Reason.DROP_MALFORMED, hook=hook)


def test_ipv4_header_longer_than_packet(host, hook):
    pkt = bytearray(ipv4("203.0.113.5", UDP, dport=51820))
    pkt[0] = 0x4F  # IHL 15: the ports would lie past the end of the packet
    check(host, "strict", frame(bytes(pkt)), Reason.DROP_MALFORMED, hook=hook)


def test_ipv6_extension_header_past_end(host, hook):
    pkt = bytearray(ipv6("2001:db8:5::5", UDP, dport=51820, ext=(DSTOPTS,)))
    pkt[41] = 200  # the options header claims (200+1)*8 bytes
    check(host, "strict", frame(bytes(pkt)), Reason.DROP_MALFORMED, hook=hook)


def test_tunnel_is_keyed_by_netns(host):
    """The same ifindex in another namespace is not the tunnel: a container's
    eth0 may carry the number of the host's wg0."""
    prog = host["progs"]["strict"]
    other_cookie = host["cookie"] + 1000
    prog.maps.add_tunnel(other_cookie, host["phy"], 1)
    pkt = frame(ipv4("93.184.216.34", TCP, dport=443))
    try:
        check(host, "strict", pkt, Reason.DROP_NOT_TUNNEL, via="phy")
        if host["identity"] == features.NETNS_STORAGE:
            # a socket recorded in that other namespace would pass: the cookie decides, not the ifindex
            set_nonce(prog.maps, host["nonce"], other_cookie)
            assert verify_run(host, "strict", pkt, "phy")
    finally:
        set_nonce(prog.maps, host["nonce"], host["cookie"])
        prog.maps.remove_tunnel(other_cookie, host["phy"])
    assert not verify_run(host, "strict", pkt, "phy")


def test_tunnel_removed_from_map_blocks(host):
    prog = host["progs"]["strict"]
    prog.maps.remove_tunnel(host["cookie"], host["tnl"])
    try:
        check(host, "strict", frame(ipv4("93.184.216.34", TCP, dport=443)), Reason.DROP_NOT_TUNNEL, via="tnl")
    finally:
        prog.maps.add_tunnel(host["cookie"], host["tnl"], 0)
    check(host, "strict", frame(ipv4("93.184.216.34", TCP, dport=443)), Reason.ALLOW_TUNNEL, via="tnl")


def test_every_reason_is_exercised():
    """Guard against a reason added to the enum without a test case."""
    from test_vpn_only_bpf import VPN_CASES
    covered = ({c[4] for c in CASES} | {c[3] for c in TC_CASES} | {Reason.DROP_MALFORMED, Reason.DROP_NOT_IP}
               | {Reason.ALLOW_EXEMPT}     # needs a socket: tests/test_node.py, with real traffic
               | {Reason.DROP_TUNNEL_SOURCE}   # the netfilter source hook's: tests/test_tunnel_source.py
               | {c[-1] for c in VPN_CASES}     # --vpn-mark / --vpn-cgroup: tests/test_vpn_only_bpf.py
               | {c[3] for c in DNS_CASES})    # --dns (KSBPF_OPT_DNS): tests/test_dns.py
    reserved: set = set()
    assert covered == set(Reason) - reserved


def test_lan_list_is_fixed():
    assert {str(n) for n in LAN_RANGES} == {
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "224.0.0.0/24",
        "255.255.255.255/32", "fe80::/10", "fc00::/7", "ff02::/16"}
    assert all(isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network)) for n in LAN_RANGES)


def lan_probe_points():
    """The first and last address of every LAN range, and the addresses just
    outside it: the compiled-in list must agree with policy.LAN_RANGES."""
    def in_lan(addr):
        return any(addr in net for net in LAN_RANGES if net.version == addr.version)
    for net in LAN_RANGES:
        first, last = net.network_address, net.broadcast_address
        for addr in (first, last):
            yield str(net), addr, True
        for addr in (first - 1, last + 1) if int(last) < (1 << net.max_prefixlen) - 1 else (first - 1,):
            yield str(net), addr, in_lan(addr)


@pytest.mark.parametrize("net,addr,inside", list(lan_probe_points()), ids=lambda v: str(v))
def test_compiled_lan_list_matches_the_python_list(host, hook, net, addr, inside):
    build = ipv4 if addr.version == 4 else ipv6
    expected = Reason.ALLOW_LAN if inside else Reason.DROP_NOT_TUNNEL
    check(host, "lan", frame(build(str(addr), UDP, dport=9)), expected, hook=hook)


def test_ifindex_filter_counts_tunnels_in_every_namespace(host):
    """The same ifindex registered in two namespaces, one removed: the other
    still passes (the filter in front of the hash counts, it does not flag)."""
    prog = host["progs"]["strict"]
    other = host["cookie"] + 1000
    prog.maps.add_tunnel(other, host["tnl"], 1)
    prog.maps.remove_tunnel(other, host["tnl"])
    check(host, "strict", frame(ipv4("93.184.216.34", TCP, dport=443)), Reason.ALLOW_TUNNEL, via="tnl")
    prog.maps.remove_tunnel(host["cookie"], host["tnl"])
    try:
        check(host, "strict", frame(ipv4("93.184.216.34", TCP, dport=443)), Reason.DROP_NOT_TUNNEL, via="tnl")
    finally:
        prog.maps.add_tunnel(host["cookie"], host["tnl"], 0)


def test_dhcp_at_tc_only_from_the_node_namespaces_own_sockets(host):
    """tc: DHCP passes from a socket of the node's namespace (a test run's
    socket lives where the run is made), not from a socket of another
    namespace (a container's frame bridged out keeps its socket); a forwarded
    packet, with no socket at all, is tests/test_node.py's."""
    import uuid
    prog = host["progs"]["dhcp"]
    pkt = frame(ipv4("255.255.255.255", UDP, sport=68, dport=67, src="0.0.0.0"))
    other = f"ksbpf-pto{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", other], check=True)
    try:
        subprocess.run(["ip", "-n", other, "link", "add", "eth0", "index", "4000", "type", "veth", "peer", "name", "eth1"], check=True)
        ons = netns.resolve(other)
        for path, ifindex, expected in ((host["ns"].path, host["phy"], Reason.ALLOW_DHCP),
                                        (ons.path, netns.ifindex(ons, "eth0"), Reason.DROP_NOT_TUNNEL)):
            before = prog.maps.counters()
            run = netns.run_in(path, libbpf.prog_test_run, prog.progs[bpf.ENTRY_TC_ETH], pkt, ifindex)
            after = prog.maps.counters()
            assert [k for k in after if after[k] != before[k]] == [(expected, Family.IPV4)]
            assert run.retval == (TC_ALLOW if expected.allowed else TC_DROP)
    finally:
        subprocess.run(["ip", "netns", "del", other])
