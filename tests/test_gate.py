"""`ksbpf gate` run for real: as an unprivileged user (nobody, no
capabilities, no-new-privs) in a test namespace and cgroup, with the pod's
annotations in a file as a downward API volume holds them.  It fails closed
without protection (its probe datagrams were sent: they stay inside the
test's namespaces, TTL/hop limit 1, to TEST-NET-1 and 2001:db8::1 through a
veth whose peer is in another test namespace), and passes once the cgroup is
protected AND the daemon's ksbpf.io/protected matches the annotations.  An
iptables IPv4 DROP (EPERM, as ksbpf gives) does not pass it: not without
the daemon's word, and not with a forged one (IPv6 still leaves)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

import pytest

from ksbpf.kubernetes import annotations as notes
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
                    f"ip -n {ns} addr add fd00:203::2/64 dev eth0 nodad",
                    f"ip -n {ns} -6 route add default dev eth0",
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


ANNOTATIONS = {"ksbpf.io/tunnels": "wg0"}


def downward(annotations: dict, protected: bool | str = True) -> str:
    """A file holding the pod's annotations as the kubelet writes a downward API
    volume's, readable by nobody; protected=True adds the daemon's matching
    ksbpf.io/protected, a string adds that value."""
    annotations = dict(annotations)
    if protected:
        annotations["ksbpf.io/protected"] = (notes.published(annotations, "ksbpf.io/", False)
                                             if protected is True else protected)
    d = tempfile.mkdtemp(prefix="ksbpf-downward-")
    atexit.register(shutil.rmtree, d, True)
    os.chmod(d, 0o755)
    path = os.path.join(d, "annotations")
    with open(path, "w") as f:
        f.write("".join(f"{k}={json.dumps(v)}\n" for k, v in sorted(annotations.items())))
    os.chmod(path, 0o644)
    return path


def run_gate(cg: str, ns: str, timeout: float, annotations: str | None = None) -> subprocess.CompletedProcess:
    """The gate as `nobody` with no capabilities, in the cgroup and the namespace,
    reading the pod's annotations from `annotations` (a downward API file)."""
    inner = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all",
             "--bounding-set=-all", "--no-new-privs", sys.executable, "-m", "ksbpf.cli", "gate",
             "--timeout", str(timeout), "--annotations", annotations or "/nonexistent/annotations"]
    cmd = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec ip netns exec {ns} "$@"', "sh", *inner]
    with searchable_by_all(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30)


def test_gate_fails_closed_without_protection_and_passes_once_protected(pod_ns, make_cgroup):
    cg = make_cgroup()
    said = downward(ANNOTATIONS)
    start = time.monotonic()
    proc = run_gate(cg, pod_ns, timeout=1, annotations=said)
    print(proc.stderr)
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - start >= 1
    assert "eth0: sent (IPv6 sent)" in proc.stderr and "timed out" in proc.stderr
    assert "tun0 (tun: a tunnel)" in proc.stderr       # a tunnel kind is not probed
    cgroups.attach(cg, Policy(("wg0",), netns=pod_ns))   # wg0 does not exist: everything blocked
    proc = run_gate(cg, pod_ns, timeout=10, annotations=said)
    assert proc.returncode == 0, proc.stderr
    assert "protected" in proc.stderr and "eth0: refused (IPv6 refused)" in proc.stderr
    # the kernel refuses, but the daemon has not said so (or said so for other annotations,
    # or blocks everything): not passed
    for word, why in ((False, "has not published"), ("0123456789abcdef", "other annotations"),
                      ("blocked:" + notes.digest(ANNOTATIONS, "ksbpf.io/"), "blocks ALL")):
        proc = run_gate(cg, pod_ns, timeout=0.5, annotations=downward(ANNOTATIONS, word))
        assert proc.returncode == 1 and why in proc.stderr, proc.stderr
    proc = run_gate(cg, pod_ns, timeout=0.5)   # no downward API volume at all
    assert proc.returncode == 1 and "downward API volume" in proc.stderr, proc.stderr


@pytest.fixture
def iptables_drop(pod_ns):
    """What a firewall sidecar ordered first does: iptables -A OUTPUT -j DROP, IPv4 only."""
    if subprocess.run(["ip", "netns", "exec", pod_ns, "iptables", "-w", "-A", "OUTPUT", "-o", "eth0", "-j", "DROP"],
                      capture_output=True).returncode != 0:
        pytest.skip("iptables is not usable here")
    yield pod_ns
    subprocess.run(["ip", "netns", "exec", pod_ns, "iptables", "-w", "-F", "OUTPUT"])


def test_an_iptables_ipv4_drop_without_ksbpf_does_not_pass(iptables_drop, make_cgroup):
    cg = make_cgroup()
    # IPv4 is refused (EPERM, exactly as ksbpf refuses it), IPv6 leaves
    proc = run_gate(cg, iptables_drop, timeout=1, annotations=downward(ANNOTATIONS, protected=False))
    assert proc.returncode == 1, proc.stderr
    assert "eth0: refused (IPv6 sent)" in proc.stderr and "has not published" in proc.stderr
    # even with a forged ksbpf.io/protected (the admission policy refuses one): IPv6 still leaves
    proc = run_gate(cg, iptables_drop, timeout=1, annotations=downward(ANNOTATIONS))
    assert proc.returncode == 1 and "eth0: refused (IPv6 sent)" in proc.stderr, proc.stderr
    # control: with ksbpf in force, the same gate passes
    cgroups.attach(cg, Policy(("wg0",), netns=iptables_drop))
    proc = run_gate(cg, iptables_drop, timeout=10, annotations=downward(ANNOTATIONS))
    assert proc.returncode == 0, proc.stderr


def test_an_ipv4_only_pod_passes_with_no_ipv6_route(pod_ns, make_cgroup):
    subprocess.run(["ip", "-n", pod_ns, "-6", "route", "del", "default", "dev", "eth0"], check=True)
    subprocess.run(["ip", "-n", pod_ns, "-6", "addr", "flush", "dev", "eth0", "scope", "global"], check=True)
    cg = make_cgroup()
    cgroups.attach(cg, Policy(("wg0",), netns=pod_ns))
    proc = run_gate(cg, pod_ns, timeout=10, annotations=downward(ANNOTATIONS))
    assert proc.returncode == 0, proc.stderr
    assert "eth0: refused (IPv6 ENETUNREACH)" in proc.stderr, proc.stderr


def test_gate_needs_an_interface_to_probe(make_cgroup, tag):
    ns = f"ksbpf-g{tag}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        cg = make_cgroup()
        cgroups.attach(cg, Policy(("wg0",), netns=ns))
        proc = run_gate(cg, ns, timeout=0.5, annotations=downward(ANNOTATIONS))
        assert proc.returncode == 1 and "no interface to probe" in proc.stderr, proc.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns])
