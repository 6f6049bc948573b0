"""Shared fixtures.  Everything a test creates (namespaces, cgroups, pins,
attachments) has a unique name and is removed by a finalizer, even when the
test fails."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import pytest

from ksbpf import cgroup, netns, scope
from ksbpf.lab import Lab, TcpEchoServer, UdpEchoServer, new_lab


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root: run `make test` as root")
        for item in items:
            if "root" in item.keywords or "lab" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:6]


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture
def make_netns(tag):
    """make_netns(suffix) -> netns.Netns: an empty namespace with lo up."""
    made: list[str] = []

    def make(suffix: str = "") -> netns.Netns:
        name = f"ksbpf-t{tag}{suffix}"
        _run("ip", "netns", "add", name)
        made.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")
        return netns.resolve(name)

    yield make
    for name in made:
        subprocess.run(["ip", "netns", "pids", name], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def remove_cgroup(path: str) -> None:
    """Detach ksbpf, kill what is left inside, rmdir (children first)."""
    if not os.path.isdir(path):
        return
    for sub in sorted(cgroup.walk(path), key=len, reverse=True):
        try:
            scope.detach(sub)
        except Exception:
            pass
        for _ in range(50):
            try:
                with open(os.path.join(sub, "cgroup.procs")) as f:
                    pids = [int(p) for p in f.read().split()]
            except OSError:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.rmdir(sub)
                break
            except OSError:
                time.sleep(0.05)


@pytest.fixture
def make_cgroup(tag):
    """make_cgroup(suffix) -> path of a new cgroup v2 directory."""
    made: list[str] = []
    root = cgroup.cgroup2_root()

    def make(suffix: str = "") -> str:
        path = os.path.join(root, f"ksbpf-test-{tag}{suffix}")
        os.mkdir(path)
        made.append(path)
        return path

    yield make
    for path in reversed(made):
        remove_cgroup(path)


@pytest.fixture
def lab(request) -> Lab:
    """A client/server namespace pair with a running wireguard-go tunnel."""
    lab = new_lab("ksbpft")
    request.addfinalizer(lab.destroy)
    lab.create()
    lab.tunnel_up()
    return lab


@pytest.fixture
def servers(lab):
    """Echo servers in the server namespace on every address: port by probe kind."""
    with TcpEchoServer(lab) as tcp, UdpEchoServer(lab) as udp:
        yield {"tcp": tcp.port, "udp": udp.port, "icmp": 0}
