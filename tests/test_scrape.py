"""The daemon's fast /metrics (ksbpf.observability.scrape) says exactly what
the one-shot collector says, sample for sample, for scopes the daemon owns
(real programs attached to real cgroups, tunnels in a real namespace), a
scope attached by hand, and a configured scope that is not in force."""

from __future__ import annotations

import io
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ksbpf.daemon.log import EventLog
from ksbpf.daemon.service import Daemon
from ksbpf.observability import metrics
from ksbpf.observability.scrape import Scraper
from ksbpf.policy import Endpoint, Options, Policy
from ksbpf.scopes import cgroups

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
