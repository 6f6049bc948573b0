"""Every benchmark runs in the suite with tiny counts, so the harness cannot
rot.  The figures themselves are `make bench`'s business, not asserted here."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(tmp_path, script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    name = script.removesuffix(".py")
    assert (tmp_path / f"{name}.md").read_text().startswith("# ")
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result["machine"]["kernel"] and result["machine"]["bcc"]
    return result


@pytest.mark.root
def test_reaction_benchmark_runs(tmp_path):
    result = bench(tmp_path, "reaction.py", "--flaps", "3")
    for key in ("appear", "disappear"):
        assert result[key]["n"] == 3 and result[key]["p50_ms"] > 0


@pytest.mark.root
def test_endpoint_follow_benchmark_runs(tmp_path):
    result = bench(tmp_path, "endpoint_follow.py", "--switches", "3")
    for key in ("allowed", "old_gone"):
        assert result[key]["n"] == 3 and result[key]["p50_ms"] > 0


@pytest.mark.root
def test_packet_cost_benchmark_runs(tmp_path):
    result = bench(tmp_path, "packet_cost.py", "--rounds", "2", "--repeat", "10")
    assert result["floor_ns"]["median"] > 0
    assert set(result["paths"]) >= {"tunnel v4", "endpoint v6", "drop, events off", "drop, events on (flood: rate-limited)"}
    assert set(result["hooks"]) == {"cgroup", "tc eth", "tc l3"}   # every hook, each against its own floor
    for hook in result["hooks"].values():
        assert hook["floor_ns"]["median"] > 0 and hook["paths"]["tunnel v4"]["target"] == result["hot_target_ratio"]
    assert {"arp", "drop not_ip (lldp)"} <= set(result["hooks"]["tc eth"]["paths"])


@pytest.mark.root
def test_new_uplink_benchmark_runs(tmp_path):
    result = bench(tmp_path, "new_uplink.py", "--tries", "1")
    assert len(result["rows"]) == 1 and result["rows"][0]["ip_sent"] + result["rows"][0]["ip_refused"] > 0


@pytest.mark.root
def test_nf_cost_benchmark_runs(tmp_path):
    from ksbpf.kernel import nf
    if not nf.supported():
        pytest.skip("this kernel has no netfilter BPF links (Linux 6.4+)")
    result = bench(tmp_path, "nf_cost.py", "--rounds", "2", "--packets", "300")
    assert set(result["paths"]) == {"tunnel", "guarded endpoint", "guarded drop", "endpoint", "drop"}
    assert all(p["trivial_ns"] > 0 and p["ksbpf_ns"] > 0 for p in result["paths"].values())


@pytest.mark.root
def test_netns_identity_benchmark_runs(tmp_path):
    result = bench(tmp_path, "netns_identity.py", "--rounds", "1", "--packets", "200")
    # every kernel has socket storage (the helper only >= 6.17), each measured where the namespace is
    # checked: once at socket creation (a scope of one namespace) or on every packet
    assert {"storage/at socket creation", "storage/per packet"} <= set(result["variants"])
    for rows in result["variants"].values():
        assert set(rows) == {"tunnel v4", "tunnel v6", "drop not_tunnel v4", "drop not_tunnel v6"}
        assert all(r["ns_median"] > 0 and r["floor_ns_median"] > 0 for r in rows.values())
    # beside the scopes that ask on every packet, the check by itself ran on their packets: the lookup
    # alone and the smallest decision (programs the kernel loaded and ran, each tunnel path counted)
    assert {"storage/the lookup alone", "storage/the smallest decision"} <= set(result["probes"])
    for rows in result["probes"].values():
        assert set(rows) >= {"tunnel v4", "tunnel v6"} and all(r["ns_median"] > 0 for r in rows.values())


@pytest.mark.root
def test_scrape_benchmark_runs(tmp_path):
    result = bench(tmp_path, "scrape.py", "--scopes", "3", "--scrapes", "1")
    assert result["scopes"] == 3 and result["body_bytes"] > 0


@pytest.mark.root
def test_footprint_benchmark_runs(tmp_path):
    result = bench(tmp_path, "footprint.py", "--runs", "1", "--scopes", "1")
    assert result["attach"]["cold_s"] > result["attach"]["warm_s"] > 0
    assert result["daemon_rss_mb"]["1"]["cached_image"] > 0


@pytest.mark.root
def test_throughput_benchmark_runs(tmp_path):
    result = bench(tmp_path, "throughput.py", "--rounds", "1", "--seconds", "1")
    for test, metric in (("tcp", "bps"), ("udp", "rx_pps"), ("udp", "tx_pps")):
        for variant in ("no filter", "no filter (control)", "ksbpf", "nftables", "iptables"):
            assert result["tests"][test][variant][metric]["median"] > 0, (test, variant)
    assert result["checks"]["ksbpf_tunnel_packets"] > 0  # the scope was in the path
    assert set(result["targets"]) == {"tcp", "udp"} and "node_throughput" in result["tc_hook"]


@pytest.mark.root
def test_node_throughput_benchmark_runs(tmp_path):
    result = bench(tmp_path, "node_throughput.py", "--rounds", "1", "--seconds", "1")
    for flow in ("host", "container -> endpoint", "container -> tunnel"):
        for test, metric in (("tcp", "bps"), ("udp", "rx_pps")):
            for variant in ("no filter", "no filter (control)", "ksbpf", "nftables", "iptables"):
                row = result["tests"][flow][test][variant]
                assert row[metric]["median"] > 0 and row["cpu_ns_per_packet"]["median"] > 0, (flow, test, variant)
    assert result["checks"]["ksbpf_endpoint_packets"] > 0   # the guard was in the path
    assert len(result["targets"]) == 6


@pytest.mark.root
def test_node_reaction_benchmark_runs(tmp_path):
    result = bench(tmp_path, "node_reaction.py", "--interfaces", "3")
    assert result["from_event"]["n"] == 3 and result["from_event"]["p50_ms"] > 0
    assert result["daemon_guarded_events"] >= 3 and result["kernel_tcx_attach"]["n"] >= 1


@pytest.mark.root
def test_scaling_benchmark_runs(tmp_path):
    result = bench(tmp_path, "scaling.py", "--sizes", "1,100", "--rounds", "1", "--seconds", "1",
                   "--testrun-rounds", "2", "--repeat", "10")
    for n in ("1", "100"):
        assert result["testrun"]["sizes"][n]["endpoint"]["median"] > 0
        for variant in ("no filter", "ksbpf", "nftables", "iptables"):
            assert result["pps"]["sizes"][n][variant]["rx_pps"]["median"] > 0, (n, variant)
        assert result["pps"]["checks"][f"ksbpf_{n}_endpoint_packets"] > 0
    assert result["target"]["size"] == 100


def test_summary_reports_every_benchmark(tmp_path):
    import shutil
    results = os.path.join(REPO, "benchmarks", "results")
    for name in os.listdir(results):
        if name.endswith(".json"):
            shutil.copy(os.path.join(results, name), tmp_path)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "summary.py"), "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "README.md").read_text()
    for name in ("packet_cost", "netns_identity", "throughput", "scaling", "reaction", "node_throughput",
                 "node_reaction", "footprint", "scrape", "containers", "dns_cost", "kubernetes"):
        assert f"[{name}]({name}.md)" in report, name
    assert "sendmsg: DNS to the stub 127.0.0.53 (redirected): added per call" in report
    assert "pods: one more pod protected, p99 ≤ 50 ms" in report and "pods: daemon RSS ≤ 150 MB" in report
    assert "pods at once, all protected" in report
    assert "not run" not in report
    for plot in ("packet_cost", "throughput", "scaling", "reaction", "node_throughput", "node_reaction"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 1000


@pytest.mark.root
def test_verify_cost_benchmark_runs(tmp_path):
    result = bench(tmp_path, "verify_cost.py", "--rounds", "1", "--repeat", "10")
    assert set(result["paths"]) >= {"loopback", "tunnel v4", "drop not_tunnel v4"}
    assert result["instructions"]["shipped"] > result["instructions"]["without the check"]


def test_containers_benchmark_runs(tmp_path):
    result = bench(tmp_path, "containers.py", "--flaps", "3", "--late", "2")
    assert result["tunnel_ready_to_passing"]["n"] == 3 and result["late_discovery"]["n"] == 2
    assert result["tunnel_created_to_passing"]["p50_ms"] > 0 and result["late_blocked_sends"]["max"] >= 1


@pytest.mark.root
def test_dns_cost_benchmark_runs(tmp_path):
    from ksbpf.kernel import features
    if not features.has("sock_addr"):
        pytest.skip("this kernel has no cgroup sock_addr programs on every hook --dns uses (Linux 5.8+)")
    result = bench(tmp_path, "dns_cost.py", "--rounds", "1", "--calls", "200")
    assert len(result["cases"]) == 5
    for case in result["cases"].values():
        assert case["program_ns"] > 0 and case["floor_ns"] > 0 and case["call_ns_with_dns"] > 0


@pytest.mark.root
def test_kubernetes_benchmark_runs(tmp_path):
    result = bench(tmp_path, "kubernetes.py", "--pods", "4", "--more", "2", "--scrapes", "1", "--burst", "6")
    assert result["pods"] == 4 and len(result["protect_samples_ms"]) == 2
    assert result["burst"] == 6 and result["burst_protect_s"] > 0 and result["scrape_later_ms"]["p50"] > 0
    for n in ("1", "4"):   # the first pod's program judged its packets (a count of 0 would give 0 ns)
        assert set(result["per_packet_ns"][n]) == {"drop not_tunnel", "loopback"}
        assert all(v > 0 for v in result["per_packet_ns"][n].values()), result["per_packet_ns"]
