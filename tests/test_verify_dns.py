"""`ksbpf verify` and --dns (issue 17 §3): the redirect programs must be attached
to the scope's cgroup on every sock_addr hook.  One detached by hand is a FAIL
naming the hook and the fix; attached again, verify passes.  On a kernel without
cgroup sock_addr programs (the probe says so) verify says "drop only" on one
line and does not fail."""

from __future__ import annotations

import json
import os

import pytest
from helpers import ksbpf

from ksbpf.kernel import bpf, features, libbpf
from ksbpf.scopes import cgroups
from ksbpf.verify import check

pytestmark = pytest.mark.lab


def dns_findings(cg: str) -> tuple[int, list[dict]]:
    proc = ksbpf("verify", "--scope", cg, "--json")
    out = json.loads(proc.stdout)
    return proc.returncode, [f for f in out["findings"] if f["check"] == "dns"]


@pytest.fixture
def dns_scope(lab, make_cgroup):
    cg = make_cgroup()
    ksbpf("attach", "--cgroup", cg, "--tunnel", lab.wg_client, "--netns", lab.client_ns,
          "--endpoint", lab.endpoint4, "--dns", lab.tun4_server, check=True)
    return cg


@pytest.mark.skipif(not features.has("sock_addr"), reason="this kernel has no cgroup sock_addr programs")
def test_verify_fails_when_a_redirect_program_is_detached(dns_scope):
    cg = dns_scope
    rc, found = dns_findings(cg)
    assert rc == 0 and [f["verdict"] for f in found] == ["ok"], found   # the control: all eight in force
    assert "connect4/6, sendmsg4/6, recvmsg4/6 and getpeername4/6" in found[0]["detail"]

    pin_dir = json.loads(ksbpf("status", "--json", check=True).stdout)["scopes"]
    pin_dir = next(s["pin_dir"] for s in pin_dir if s["cgroup"] == cg)
    for entry, hook_name in ((bpf.ENTRY_DNS_SEND4, "sendmsg4"), (bpf.ENTRY_DNS_PEER6, "getpeername6")):
        prog = libbpf.obj_get(os.path.join(pin_dir, bpf.PIN_NAMES[entry]))
        cg_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
        try:
            libbpf.prog_detach(prog, cg_fd, bpf.DNS_ATTACH[entry])   # by hand, as another tool might
            rc, found = dns_findings(cg)
            assert rc == 1 and [f["verdict"] for f in found] == ["fail"], found
            detail, fix = found[0]["detail"], found[0]["fix"]
            assert f"NOT attached to the cgroup: {hook_name}:" in detail, detail
            assert all(other not in detail for other in check.DNS_HOOK_NAMES.values() if other != hook_name)
            assert "ksbpf attach --cgroup " + cg in fix and "--dns " + cgroups_resolver(cg) in fix, fix
            assert "restart the daemon" in fix
            human = ksbpf("verify", "--scope", cg).stdout
            assert hook_name in human and "FAIL" in human
            libbpf.prog_attach(prog, cg_fd, bpf.DNS_ATTACH[entry], libbpf.BPF_F_ALLOW_MULTI)   # and back
        finally:
            os.close(cg_fd)
            os.close(prog)
        rc, found = dns_findings(cg)
        assert rc == 0 and [f["verdict"] for f in found] == ["ok"], found


def cgroups_resolver(cg: str) -> str:
    scopes = json.loads(ksbpf("status", "--json", check=True).stdout)["scopes"]
    return next(s["dns"]["resolvers"][0] for s in scopes if s["cgroup"] == cg)


def test_verify_says_drop_only_without_sock_addr(dns_scope, monkeypatch):
    """Where the probe finds no cgroup sock_addr programs: one line, no FAIL (the redirect programs,
    detached here as such a kernel would never have had them, are not asked for)."""
    cg = dns_scope
    fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    try:
        cgroups._detach_dns(fd)
    finally:
        os.close(fd)
    rc, found = dns_findings(cg)
    if features.has("sock_addr"):   # the control on this kernel: missing programs fail
        assert rc == 1 and found[0]["verdict"] == "fail", found
    real = features.has
    monkeypatch.setattr(features, "has", lambda name: False if name == "sock_addr" else real(name))
    pin_dir = next(d for d in cgroups.pins.list_scope_dirs() if cgroups._meta_cgroup(d) == cg)
    findings = [f for f in check.check_pin_dir(pin_dir) if f.check == "dns"]
    assert [f.verdict for f in findings] == [check.PASS], findings
    assert findings[0].detail.startswith("drop only: ") and "\n" not in findings[0].detail
    assert "dns_not_vpn" in findings[0].detail
