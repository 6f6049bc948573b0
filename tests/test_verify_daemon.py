"""The daemon's zero-traffic check: run after each change and every
verify_interval, exported as ksbpf_verify_failures{scope,check} and
ksbpf_verify_last_success_timestamp_seconds, failures logged and reported by
/readyz; close_stray_sockets closes what a process brings into a scope."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from helpers import DaemonProcess, toml_config
from test_observability import free_port, get, sample
from test_verify import STRAY, Scope, detach_by_hand

pytestmark = pytest.mark.root


@pytest.fixture
def daemon_scope(tag, make_cgroup, tmp_path):
    """A scope (namespace with tun0, a cgroup) and a daemon managing it, with metrics."""
    cg = make_cgroup()
    sc = Scope(tag, cg)       # attached once by hand: the daemon adopts it
    started: list[DaemonProcess] = []

    def run(**daemon_keys) -> tuple[DaemonProcess, str]:
        port = free_port()
        keys = "".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in daemon_keys.items())
        path = tmp_path / "ksbpf.toml"
        path.write_text(toml_config([{"cgroup": cg, "tunnels": ["tun0"], "netns": sc.ns,
                                      "endpoints": ["203.0.113.5:51820/udp"]}],
                                    extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n[daemon]\n{keys}'))
        d = DaemonProcess(str(path))
        started.append(d)
        d.wait_for("ready")
        d.wait_for("metrics_listening")
        return d, f"http://127.0.0.1:{port}"

    yield sc, run
    for d in started:
        d.stop()
    sc.close()


def wait_metric(url: str, name: str, want, timeout: float = 15, **labels) -> float:
    deadline = time.monotonic() + timeout
    while True:
        _, text = get(url + "/metrics")
        try:
            value = sample(text, name, **labels) if labels else float(
                [ln for ln in text.splitlines() if ln.startswith(name + " ")][0].split()[1])
            if want(value):
                return value
        except (AssertionError, IndexError):
            pass
        assert time.monotonic() < deadline, f"{name}{labels} never satisfied the condition:\n{text}"
        time.sleep(0.2)


def test_daemon_verifies_and_reports_a_failure(daemon_scope):
    sc, run = daemon_scope
    d, url = run(verify_interval=3600)
    d.wait_for("scope_adopted", scope=sc.cg)
    # the check ran after the daemon's change (adopting the scope): every check passes
    wait_metric(url, "ksbpf_verify_runs_total", lambda v: v >= 1)
    assert 'ksbpf_verify_failures{' not in get(url + "/metrics")[1]   # a series only while a check fails
    assert wait_metric(url, "ksbpf_verify_last_success_timestamp_seconds", lambda v: v > 0) <= time.time()
    assert get(url + "/readyz")[0] == 200
    # detached by hand; a reload (a change) runs the check again
    detach_by_hand(sc.pin_dir, sc.cg)
    mark = len(d.events)
    d.proc.send_signal(signal.SIGHUP)
    failed = d.wait_for("verify_failed", after=mark, scope=sc.cg, check="attached", timeout=20)
    assert failed["level"] == "error" and "NOT attached" in failed["detail"] and failed["fix"].startswith("ksbpf attach")
    wait_metric(url, "ksbpf_verify_failures", lambda v: v == 1, scope=sc.cg, check="attached")
    status, body = get(url + "/readyz")
    assert status == 503 and "verify attached failed" in body


def test_daemon_closes_stray_sockets(daemon_scope):
    sc, run = daemon_scope
    d, _url = run(close_stray_sockets=True)
    proc = sc.spawn(sys.executable, "-c", STRAY, stdin=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "ready"
    mark = len(d.events)
    sc.join(proc)
    closed = d.wait_for("stray_sockets_closed", after=mark, scope=sc.cg, timeout=10)
    assert closed["closed"] >= 2 and any(f"pid {proc.pid}" in s and "udp" in s for s in closed["sockets"])
    proc.stdin.write("\n")
    proc.stdin.flush()
    said = dict(proc.stdout.readline().split()[:2] for _ in range(2))
    assert said == {"tcp": "closed", "udp": "closed"}


def test_close_stray_sockets_is_off_by_default(daemon_scope):
    sc, run = daemon_scope
    d, _url = run(verify_interval=3600)
    proc = sc.spawn(sys.executable, "-c", STRAY, stdin=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "ready"
    sc.join(proc)
    time.sleep(3)   # longer than the join poll
    assert not d.named("stray_sockets_closed")
    proc.stdin.write("\n")
    proc.stdin.flush()
    said = dict(proc.stdout.readline().split()[:2] for _ in range(2))
    assert said == {"tcp": "open", "udp": "open"}


def test_daemon_verifies_the_node_scope(tag, tmp_path):
    """The node scope the daemon guards is checked too: its metrics say so."""
    name = f"ksbpf-vd{tag}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    d = None
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"], check=True)
        subprocess.run(["ip", "-n", name, "tuntap", "add", "mode", "tun", "name", "tun0"], check=True)
        port = free_port()
        path = tmp_path / "ksbpf.toml"
        path.write_text(f'[metrics]\nlisten = "127.0.0.1:{port}"\n[daemon]\nverify_interval = 3600\n'
                        f'[node]\nnetns = "{name}"\ntunnels = ["tun0"]\n')
        d = DaemonProcess(str(path))
        d.wait_for("ready")
        d.wait_for("metrics_listening")
        url = f"http://127.0.0.1:{port}"
        wait_metric(url, "ksbpf_verify_runs_total", lambda v: v >= 1)
        assert f'scope="node:{name}"' not in "".join(ln for ln in get(url + "/metrics")[1].splitlines()
                                                    if ln.startswith("ksbpf_verify_failures{"))
        assert get(url + "/readyz")[0] == 200
    finally:
        if d is not None:
            d.stop()
        from ksbpf.scopes import node
        node.detach(f"/run/netns/{name}")
        subprocess.run(["ip", "netns", "del", name])
