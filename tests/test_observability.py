"""Observability end to end: /metrics read from the kernel at scrape time,
a real Prometheus server scraping the daemon, the blocked-packet stream."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from helpers import KSBPF, DaemonProcess, ksbpf, scope_status, toml_config

from ksbpf.kernel import features
from ksbpf.lab.namespaces import ProbeStream, probe

pytestmark = pytest.mark.lab
TOKEN_DATAGRAM_V6 = 40 + 8 + 16   # IPv6 + UDP headers + the probe's 16-byte token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scope_of(lab, cg: str, **extra) -> dict:
    return {"cgroup": cg, "tunnels": [lab.wg_client], "netns": lab.client_ns,
            "endpoints": [lab.endpoint4], **extra}


@pytest.fixture
def daemon_with_metrics(tmp_path):
    started = []

    def run(scopes: list[dict]) -> tuple[DaemonProcess, str]:
        port = free_port()
        path = tmp_path / "ksbpf.toml"
        path.write_text(toml_config(scopes, extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n'))
        d = DaemonProcess(str(path))
        started.append(d)
        d.wait_for("ready")
        d.wait_for("metrics_listening")
        return d, f"http://127.0.0.1:{port}"

    yield run
    for d in started:
        d.stop()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def sample(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.index("}") + 1]))
            if got == labels:
                return float(line.rsplit(" ", 1)[1])
    if name.endswith("_total") and re.search(rf"^# TYPE {name[:-len('_total')]}(_total)? counter$", text, re.M):
        return 0.0   # a counter is written once it is not zero: absent is 0
    raise AssertionError(f"no {name}{labels} in\n{text}")


def test_metrics_equal_the_traffic_exactly(lab, servers, make_cgroup, daemon_with_metrics):
    cg = make_cgroup()
    d, base = daemon_with_metrics([scope_of(lab, cg)])
    status, before = get(base + "/metrics")
    assert status == 200
    drop = dict(scope=cg, reason="not_tunnel", family="ipv6", hook="cgroup")
    for _ in range(5):
        assert not probe(lab, cg, "udp", lab.phy6_server, servers["udp"], timeout=0.5).ok
    for _ in range(3):
        assert probe(lab, cg, "udp", lab.tun6_server, servers["udp"]).ok
    _, after = get(base + "/metrics")
    assert sample(after, "ksbpf_dropped_packets_total", **drop) - sample(before, "ksbpf_dropped_packets_total", **drop) == 5
    assert sample(after, "ksbpf_dropped_bytes_total", **drop) - sample(before, "ksbpf_dropped_bytes_total", **drop) \
        == 5 * TOKEN_DATAGRAM_V6
    tunnel = dict(scope=cg, path="tunnel")
    assert sample(after, "ksbpf_allowed_packets_total", **tunnel) - sample(before, "ksbpf_allowed_packets_total", **tunnel) == 3
    assert sample(after, "ksbpf_tunnel_up", scope=cg, tunnel=lab.wg_client) == 1
    assert sample(after, "ksbpf_scope_attached", scope=cg) == 1
    assert sample(after, "ksbpf_netlink_events_total", type="RTM_NEWLINK") >= 0
    assert "ksbpf_route_alerts_total 0.0" in after and 'ksbpf_build_info{version=' in after
    assert not re.search(r'="(\d+\.){3}\d+"|="[0-9a-f:]+::[0-9a-f]*"', after), "an address in a label"
    # the same counters without a daemon, from the pins
    once = ksbpf("metrics", check=True).stdout
    assert sample(once, "ksbpf_dropped_packets_total", **drop) == sample(after, "ksbpf_dropped_packets_total", **drop)
    # and the tunnel going away shows
    lab.tunnel_down()
    d.wait_for("map_update")
    assert sample(get(base + "/metrics")[1], "ksbpf_tunnel_up", scope=cg, tunnel=lab.wg_client) == 0


def test_health_and_readiness(lab, make_cgroup, daemon_with_metrics):
    cg, later = make_cgroup(), make_cgroup("-later")
    os.rmdir(later)   # a configured scope whose cgroup does not exist (yet)
    d, base = daemon_with_metrics([scope_of(lab, cg), scope_of(lab, later)])
    assert get(base + "/healthz")[0] == 200
    assert sample(get(base + "/metrics")[1], "ksbpf_scope_attached", scope=later) == 0
    status, body = get(base + "/readyz")
    assert status == 503 and later in body and json.loads(body)["ready"] is False
    os.mkdir(later)
    d.wait_for("scope_attached", scope=later, timeout=15)
    deadline = time.monotonic() + 5   # attached, then its map reconciled
    while (status := get(base + "/readyz"))[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    ready = json.loads(status[1])
    assert (ready["ready"], ready["problems"], status[0]) == (True, [], 200)
    # which kernel features this node has (Kubernetes: a node's /readyz says so), as /metrics does
    assert {f["name"]: f["present"] for f in ready["kernel"]["features"]} == \
        {f.name: f.present for f in features.probe()}
    metrics = get(base + "/metrics")[1]
    for f in features.probe():
        assert sample(metrics, "ksbpf_kernel_feature", feature=f.name) == (1 if f.present else 0)


@pytest.mark.skipif(not shutil.which("prometheus"), reason="Debian's prometheus package is not installed")
def test_a_real_prometheus_server_reads_the_counters(lab, servers, make_cgroup, daemon_with_metrics, tmp_path):
    cg = make_cgroup()
    d, base = daemon_with_metrics([scope_of(lab, cg)])
    for _ in range(4):
        probe(lab, cg, "udp", lab.phy4_server, servers["udp"] + 1, timeout=0.5)  # endpoint address, other port
    target = base.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        f"scrape_configs:\n  - job_name: ksbpf\n    static_configs:\n      - targets: ['{target}']\n")
    web = f"127.0.0.1:{free_port()}"
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address={web}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        query = ('ksbpf_dropped_packets_total{scope="%s",reason="endpoint_mismatch",family="ipv4"}' % cg)
        url = f"http://{web}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        deadline, value = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            try:
                result = json.loads(get(url)[1])["data"]["result"]
            except (ValueError, KeyError, OSError):
                result = []
            if result:
                value = float(result[0]["value"][1])
                if value == 4:
                    break
            time.sleep(0.5)
        assert value == 4, value
        up = json.loads(get(f"http://{web}/api/v1/query?query=up%7Bjob%3D%22ksbpf%22%7D")[1])["data"]["result"]
        assert up and up[0]["value"][1] == "1"
    finally:
        prom.terminate()
        prom.wait(10)


def read_lines(proc, until: float) -> list[dict]:
    """The JSON lines the process writes until `until` (raw reads: a buffered
    readline could hold lines back from select)."""
    fd, data = proc.stdout.fileno(), b""
    while (left := until - time.monotonic()) > 0 and select.select([fd], [], [], left)[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


@pytest.fixture
def event_reader():
    procs = []

    def start(*args: str):
        proc = subprocess.Popen(KSBPF + ["events", "--json", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        assert "streaming" in proc.stderr.readline()
        return proc

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


def test_events_show_a_blocked_connection_within_a_second(lab, servers, make_cgroup, event_reader):
    cg = make_cgroup()
    ksbpf("attach", "--cgroup", cg, "--tunnel", lab.wg_client, "--netns", lab.client_ns, check=True)
    reader = event_reader("--scope", cg)
    time.sleep(0.2)
    argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cg, "ip", "netns", "exec", lab.client_ns,
            sys.executable, "-m", "ksbpf.lab.probe", "tcp", lab.phy6_server, str(servers["tcp"]), "--timeout", "0.3"]
    start = time.monotonic()
    subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    events = read_lines(reader, start + 1.0)
    assert events, "no event within one second"
    ev = events[0]
    assert (ev["scope"], ev["reason"], ev["family"], ev["proto"]) == (cg, "not_tunnel", "ipv6", "tcp")
    assert (ev["src"], ev["dst"], ev["dport"], ev["ifname"]) == (lab.phy6_client, lab.phy6_server,
                                                                 servers["tcp"], lab.phy_client)
    assert ev["uid"] == 0 and ev["cgroup"] == cg and ev["hook"] == "cgroup"


def test_flood_counters_exact_stream_within_rate(lab, servers, make_cgroup, event_reader):
    cg = make_cgroup()
    rate, burst = 20, 4
    ksbpf("attach", "--cgroup", cg, "--tunnel", lab.wg_client, "--netns", lab.client_ns,
          "--events-rate", str(rate), "--events-burst", str(burst), check=True)
    reader = event_reader("--scope", cg)
    before = scope_status(cg)
    start = time.monotonic()
    with ProbeStream(lab, cg, lab.phy6_server, servers["udp"] + 7, interval_ms=1) as stream:
        time.sleep(2.0)
    elapsed = time.monotonic() - start
    events = read_lines(reader, time.monotonic() + 1.0)
    after = scope_status(cg)
    drops = after["counters"]["not_tunnel"]["packets"] - before["counters"]["not_tunnel"]["packets"]
    assert drops == stream.result.blocked == stream.result.attempted > 500     # exact under a flood
    ncpu = os.cpu_count() or 1
    assert len(events) <= rate * (elapsed + 1.0) + burst + ncpu                 # within its rate
    assert len(events) >= burst // ncpu
    sent, suppressed = after["events"]["sent"], after["events"]["suppressed"]
    assert sent == len(events) and sent + suppressed == drops                  # adds up
