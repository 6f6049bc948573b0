"""`ksbpf gate` run for real: as an unprivileged user (nobody, no
capabilities, no-new-privs) in a test namespace and cgroup.  It fails
closed without protection (its probe datagrams were sent: they stay inside
the test's namespaces, TTL 1, to TEST-NET-1 through a veth whose peer is in
another test namespace), and passes once the cgroup is protected."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import pytest

from ksbpf.policy import Policy
from ksbpf.scopes import cgroups

pytestmark = pytest.mark.root


@pytest.fixture
def pod_ns(tag):
    """A "pod" namespace: lo, eth0 (a veth to a peer namespace, with an address), a tun device."""
    ns, peer = f"ksbpf-g{tag}", f"ksbpf-gp{tag}"
    for n in (ns, peer):
        subprocess.run(["ip", "netns", "add", n], check=True)
    try:
        for cmd in (f"ip -n {ns} link add eth0 type veth peer name p{tag} netns {peer}",
                    f"ip -n {ns} addr add 10.203.0.2/24 dev eth0", f"ip -n {ns} link set eth0 up",
                    f"ip -n {ns} link set lo up", f"ip -n {peer} link set p{tag} up",
                    f"ip -n {ns} tuntap add dev tun0 mode tun", f"ip -n {ns} link set tun0 up"):
            subprocess.run(cmd.split(), check=True)
        yield ns
    finally:
        for n in (ns, peer):
            subprocess.run(["ip", "netns", "del", n])


@contextmanager
def searchable_by_all(path: str) -> Iterator[None]:
    """Let any user traverse the directories above `path` (a checkout cloned
    into a private directory, as mktemp -d makes): nobody must reach the
    code it runs.  Restored afterwards."""
    changed = []
    d = os.path.dirname(os.path.realpath(path))
    while d != "/":
        mode = stat.S_IMODE(os.stat(d).st_mode)
        if not mode & stat.S_IXOTH:
            os.chmod(d, mode | stat.S_IXOTH)
            changed.append((d, mode))
        d = os.path.dirname(d)
    try:
        yield
    finally:
        for d, mode in changed:
            os.chmod(d, mode)


def run_gate(cg: str, ns: str, timeout: float) -> subprocess.CompletedProcess:
    """The gate as `nobody` with no capabilities, in the cgroup and the namespace."""
    inner = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all",
             "--bounding-set=-all", "--no-new-privs", sys.executable, "-m", "ksbpf.cli", "gate",
             "--timeout", str(timeout)]
    cmd = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec ip netns exec {ns} "$@"', "sh", *inner]
    with searchable_by_all(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30)


def test_gate_fails_closed_without_protection_and_passes_once_protected(pod_ns, make_cgroup):
    cg = make_cgroup()
    start = time.monotonic()
    proc = run_gate(cg, pod_ns, timeout=1)
    print(proc.stderr)
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - start >= 1
    assert "eth0: sent" in proc.stderr and "timed out" in proc.stderr
    assert "tun0 (tun: a tunnel)" in proc.stderr       # a tunnel kind is not probed
    cgroups.attach(cg, Policy(("wg0",), netns=pod_ns))   # wg0 does not exist: everything blocked
    proc = run_gate(cg, pod_ns, timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert "protected" in proc.stderr and "eth0: refused" in proc.stderr


def test_gate_needs_an_interface_to_probe(make_cgroup, tag):
    ns = f"ksbpf-g{tag}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        cg = make_cgroup()
        cgroups.attach(cg, Policy(("wg0",), netns=ns))
        proc = run_gate(cg, ns, timeout=0.5)
        assert proc.returncode == 1 and "no interface to probe" in proc.stderr, proc.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns])
