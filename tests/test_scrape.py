"""The daemon's fast /metrics (ksbpf.observability.scrape) says exactly what
the one-shot collector says, sample for sample, for scopes the daemon owns
(real programs attached to real cgroups, tunnels in a real namespace), a
scope attached by hand, and a configured scope that is not in force."""

from __future__ import annotations

import io
import os
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ksbpf.daemon.log import EventLog
from ksbpf.daemon.service import Daemon
from ksbpf.kernel import libbpf, netns
from ksbpf.observability import metrics
from ksbpf.observability.scrape import Scraper
from ksbpf.policy import Endpoint, Options, Policy
from ksbpf.scopes import cgroups
from ksbpf.verify import packets

pytestmark = pytest.mark.root


def samples(text: str, scopes: set[str]) -> set:
    out = set()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if "scope" not in s.labels or s.labels["scope"] in scopes:
                out.add((s.name, tuple(sorted(s.labels.items())), s.value))
    return out


def test_fast_scrape_matches_the_collector(make_cgroup, tag, tmp_path):
    ns = f"ksbpf-sc{tag}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "dev", "wg0", "mode", "tun"], check=True)
        a, b, hand, missing = make_cgroup("-a"), make_cgroup("-b"), make_cgroup("-h"), make_cgroup("-m")
        d = Daemon(str(tmp_path / "unused.toml"), EventLog("json", io.StringIO()))
        d.add_scope(a, Policy(("wg0", "wg1"), (Endpoint.parse("203.0.113.5:51820/udp"),), ns), "test")
        d.add_scope(b, Policy(("wg0",), (), ns, Options(allow_lan=True)), "test")
        assert d.scopes[a].pin_dir and d.scopes[b].pin_dir and not d.scopes[a].error
        cgroups.attach(hand, Policy(("wg9",), netns=ns))
        d.add_scope(missing + "-absent", Policy(("wg0",), netns=ns), "test")   # configured, cannot be applied
        fast = Scraper(d).render().decode()
        slow = metrics.render(d).decode()
        mine = {a, b, hand, missing + "-absent"}
        assert samples(fast, mine) == samples(slow, mine)
        assert ("ksbpf_tunnel_up", (("scope", a), ("tunnel", "wg0")), 1.0) in samples(fast, mine)
        assert ("ksbpf_scope_attached", (("scope", missing + "-absent"),), 0.0) in samples(fast, mine)
        again = Scraper(d)
        again.render()
        cgroups.attach(a, Policy(("wg0",), netns=ns))   # replaced behind the scraper's back: re-read
        d.scopes[a].policy = Policy(("wg0",), netns=ns)
        assert samples(again.render().decode(), mine) == samples(metrics.render(d).decode(), mine)
        for space in d.namespaces.values():
            space.watch.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def test_pod_scopes_are_named_by_their_pod_and_zero_counters_are_not_written(make_cgroup, tag, tmp_path):
    """A pod's scope is named by its pod in /metrics, never by its cgroup path;
    a counter that is still zero is not written (1,000 idle pods: a few lines each)."""
    ns = f"ksbpf-sp{tag}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "dev", "wg0", "mode", "tun"], check=True)
        pod_cg, plain = make_cgroup("-pod"), make_cgroup("-plain")
        d = Daemon(str(tmp_path / "unused.toml"), EventLog("json", io.StringIO()))
        d.add_scope(pod_cg, Policy(("wg0",), netns=ns), "kubernetes", {"namespace": "shop", "pod": "web-1"})
        d.add_scope(plain, Policy(("wg0",), netns=ns), "config")
        assert d.scopes[pod_cg].pin_dir and d.scopes[plain].pin_dir
        text = Scraper(d).render().decode()
        assert pod_cg not in text
        assert 'ksbpf_scope_attached{scope="pod/shop/web-1",namespace="shop",pod="web-1"} 1.0' in text
        assert 'ksbpf_tunnel_up{scope="pod/shop/web-1",namespace="shop",pod="web-1",tunnel="wg0"} 1.0' in text
        assert f'ksbpf_scope_attached{{scope="{plain}"}} 1.0' in text
        mine = [ln for ln in text.splitlines() if "pod/shop/web-1" in ln or plain in ln]
        assert len(mine) == 4, mine   # attached and tunnel_up each: no zero counter, no zero verify failure
        for space in d.namespaces.values():
            space.watch.close()
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def test_counted_detached_and_removed_scopes_match_the_collector(make_cgroup, tag, tmp_path):
    """The fast path's other branches, against the collector: counters that
    are not zero (packets the scope's real program judged), a program detached
    by hand behind the daemon's back, and a cgroup removed while its scope's
    pins remain -- each read by a scraper that had already opened the scope."""
    ns = f"ksbpf-sd{tag}"
    gone = None
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "dev", "wg0", "mode", "tun"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "add", "phy", "type", "veth", "peer", "name", "other"], check=True)
        a, b, c = make_cgroup("-a"), make_cgroup("-b"), make_cgroup("-c")
        gone = c   # removed below: make_cgroup's cleanup cannot find it, so its pins are released here
        d = Daemon(str(tmp_path / "unused.toml"), EventLog("json", io.StringIO()))
        for cg in (a, b, c):
            d.add_scope(cg, Policy(("wg0",), netns=ns), "test")
            assert d.scopes[cg].pin_dir and not d.scopes[cg].error
        mine = {a, b, c}
        scraper = Scraper(d)
        before = samples(scraper.render().decode(), mine)
        assert not any(name == "ksbpf_dropped_packets_total" for name, _, _ in before)

        space = netns.resolve(ns)
        prog = libbpf.obj_get(os.path.join(d.scopes[a].pin_dir, "prog"))
        try:
            leak = packets.frame(packets.ipv4("198.51.100.7", 17, dport=53))
            netns.run_in(space.path, lambda: libbpf.prog_test_run(prog, leak, netns.ifindex(space, "phy"), 3))
            ok = netns.run_in(space.path, lambda: libbpf.prog_test_run(prog, leak, netns.ifindex(space, "wg0"), 2))
            assert ok.retval == 1
            cg_fd = os.open(b, os.O_RDONLY | os.O_DIRECTORY)
            try:   # b's program, detached by hand
                b_prog = libbpf.obj_get(os.path.join(d.scopes[b].pin_dir, "prog"))
                try:
                    libbpf.prog_detach(b_prog, cg_fd, libbpf.BPF_CGROUP_INET_EGRESS)
                finally:
                    os.close(b_prog)
            finally:
                os.close(cg_fd)
        finally:
            os.close(prog)
        os.rmdir(c)   # c's cgroup removed; its pins stay until the daemon hears of it
        fast, slow = scraper.render().decode(), metrics.render(d).decode()
        assert samples(fast, mine) == samples(slow, mine)
        got = samples(fast, mine)
        assert ("ksbpf_scope_attached", (("scope", a),), 1.0) in got
        assert ("ksbpf_scope_attached", (("scope", b),), 0.0) in got
        assert ("ksbpf_scope_attached", (("scope", c),), 0.0) in got
        dropped = [(labels, v) for name, labels, v in got if name == "ksbpf_dropped_packets_total"]
        assert [v for labels, v in dropped if ("scope", a) in labels] == [3.0], dropped
        assert any(name == "ksbpf_allowed_packets_total" and ("scope", a) in labels and v == 2.0
                   for name, labels, v in got), got
        for space_ in d.namespaces.values():
            space_.watch.close()
    finally:
        if gone:
            cgroups.detach(gone)   # a cgroup that is gone: its stale pins are removed
        subprocess.run(["ip", "netns", "del", ns])
