"""The blocked-packet stream in the kernel: samples in the ring buffer, the
per-CPU token bucket, and counters that stay exact whatever is suppressed.
Crafted packets through BPF_PROG_TEST_RUN, pinned to one CPU."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest
from packets import TCP, UDP, frame, ipv4, ipv6

from ksbpf.kernel import bpf, libbpf, netns
from ksbpf.observability import events
from ksbpf.policy import EventSettings, Options
from ksbpf.reasons import Family, Reason

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def ns():
    name = f"ksbpf-ev{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "phy", "type", "veth", "peer", "name", "other"], check=True)
        yield netns.resolve(name)
    finally:
        subprocess.run(["ip", "netns", "del", name])


def load(settings: EventSettings):
    return bpf.load(Options(), 0, settings)


def run_on_cpu0(ns, prog, packet: bytes, repeat: int = 1):
    def body():
        # one CPU, one bucket; this thread's (run_in runs body on the calling thread): put back after
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {0})
        try:
            return libbpf.prog_test_run(prog.prog_fd, packet, netns.ifindex(ns, "phy"), repeat)
        finally:
            os.sched_setaffinity(0, before)
    return netns.run_in(ns.path, body)


def drain(prog) -> list[bytes]:
    got = []
    rb = libbpf.RingBuffer(lambda _src, raw: got.append(raw))
    rb.add(prog.maps.fds["events"], None)
    try:
        while rb.poll(50):
            pass
    finally:
        rb.close()
    return got


def burst_per_cpu(settings: EventSettings) -> int:
    return -(-settings.burst // libbpf.num_possible_cpus())


def test_samples_carry_the_packet(ns):
    settings = EventSettings(rate=10, burst=64)
    prog = load(settings)
    try:
        run_on_cpu0(ns, prog, frame(ipv4("203.0.113.9", UDP, sport=40001, dport=53, src="192.0.2.7")))
        run_on_cpu0(ns, prog, frame(ipv6("2001:db8::53", TCP, sport=40002, dport=853, src="2001:db8::7")))
        (a, b) = drain(prog)
        d = events.Describer()
        ev4, ev6 = d.describe("/s", None, a), d.describe("/s", None, b)
    finally:
        prog.close()
    phy = netns.ifindex(ns, "phy")
    assert (ev4.reason, ev4.family, ev4.proto, ev4.src, ev4.sport, ev4.dst, ev4.dport, ev4.ifindex) == \
        (Reason.DROP_NOT_TUNNEL, Family.IPV4, "udp", "192.0.2.7", 40001, "203.0.113.9", 53, phy)
    assert (ev6.family, ev6.proto, ev6.src, ev6.sport, ev6.dst, ev6.dport) == \
        (Family.IPV6, "tcp", "2001:db8::7", 40002, "2001:db8::53", 853)
    assert ev4.length == len(ipv4("203.0.113.9", UDP, sport=40001, dport=53))
    assert abs(ev4.time - __import__("time").time()) < 5


def test_flood_counters_exact_stream_limited_suppressed_add_up(ns):
    settings = EventSettings(rate=1, burst=8)   # one token per 2 s per CPU: the flood gets the burst
    prog = load(settings)
    try:
        packet = frame(ipv4("203.0.113.9", UDP, dport=9))
        run_on_cpu0(ns, prog, packet, repeat=5000)
        sent, suppressed = prog.maps.event_stats()
        records = drain(prog)
        counters = prog.maps.counters()
    finally:
        prog.close()
    assert counters[(Reason.DROP_NOT_TUNNEL, Family.IPV4)][0] == 5000        # exact
    assert sent == len(records) == burst_per_cpu(settings)                    # within the rate
    assert sent + suppressed == 5000                                          # adds up


def test_allowed_packets_are_not_sampled(ns):
    prog = load(EventSettings(rate=100, burst=10))
    try:
        run_on_cpu0(ns, prog, frame(ipv4("127.0.0.1", TCP, dport=80)), repeat=1)  # via phy: dropped
        run_on_cpu0(ns, prog, frame(ipv4("127.0.0.1", TCP, dport=80)), repeat=1)
        assert len(drain(prog)) == 2
        prog.maps.add_tunnel(netns.cookie(ns), netns.ifindex(ns, "phy"), 0)      # now phy is the tunnel
        run_on_cpu0(ns, prog, frame(ipv4("203.0.113.9", UDP, dport=9)), repeat=100)
        assert drain(prog) == [] and prog.maps.event_stats() == (2, 0)
    finally:
        prog.close()


def test_events_off_compiles_them_out(ns):
    prog = load(EventSettings(rate=0))
    try:
        run_on_cpu0(ns, prog, frame(ipv4("203.0.113.9", UDP, dport=9)), repeat=100)
        assert drain(prog) == [] and prog.maps.event_stats() == (0, 0)
        assert prog.maps.counters()[(Reason.DROP_NOT_TUNNEL, Family.IPV4)][0] == 100
    finally:
        prog.close()
