"""--dns auto: the resolvers a VPN configured for its tunnel, read from
fixture files (wg-quick configurations, `resolvectl dns` output); and the
one-line refusal when there are none."""

from __future__ import annotations

import ipaddress
import os
import subprocess

import pytest
from helpers import ksbpf

from ksbpf.errors import KsbpfError
from ksbpf.kernel import vpn_dns

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "vpn_dns")


def ips(*texts):
    return [ipaddress.ip_address(t) for t in texts]


def read(name: str) -> str:
    with open(os.path.join(FIX, name)) as f:
        return f.read()


def test_wg_quick_dns_line():
    # addresses in order; the search domain and the comment are not resolvers
    assert vpn_dns.parse_wg_quick(read("wg0.conf")) == ips("10.64.0.1", "fc00:bbbb:bbbb:bb01::1")
    assert vpn_dns.parse_wg_quick(read("nodns.conf")) == []
    # several DNS lines (any case), each address once
    assert vpn_dns.parse_wg_quick(read("twolines.conf")) == ips("10.2.0.1", "10.2.0.2")
    assert vpn_dns.parse_wg_quick("[Peer]\nDNS = 9.9.9.9\n") == []   # not the [Interface] section


def test_resolvectl_output():
    assert vpn_dns.parse_resolvectl(read("resolvectl-wg0.txt"), "wg0") == ips("10.64.0.1", "fc00:bbbb:bbbb:bb01::1")
    assert vpn_dns.parse_resolvectl(read("resolvectl-empty.txt"), "wg0") == []
    # another link's servers are not the tunnel's; ADDR#NAME and [ADDR]:PORT forms
    assert vpn_dns.parse_resolvectl(read("resolvectl-all.txt"), "wg0") == ips("10.64.0.1", "fc00:bbbb::1")
    assert vpn_dns.parse_resolvectl(read("resolvectl-all.txt"), "eth0") == ips("192.168.1.1", "fe80::1")


def fake_resolvectl(text: str, rc: int = 0):
    calls = []

    def run(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, rc, stdout=text, stderr="")
    return run, calls


def test_find_prefers_resolved_then_wg_quick():
    run, calls = fake_resolvectl("Link 7 (wg0): 10.9.0.1\n")
    found = vpn_dns.find(("wg0",), directory=FIX, run=run, resolvectl="/usr/bin/resolvectl")
    assert found == vpn_dns.Found(tuple(ips("10.9.0.1")), "resolvectl dns wg0")
    assert calls == [["/usr/bin/resolvectl", "dns", "wg0"]]
    # resolved knows none for the link (or is not running): the wg-quick file
    run, _ = fake_resolvectl("Link 7 (wg0):\n")
    found = vpn_dns.find(("wg0",), directory=FIX, run=run, resolvectl="/usr/bin/resolvectl")
    assert found.addresses == tuple(ips("10.64.0.1", "fc00:bbbb:bbbb:bb01::1"))
    assert found.source == os.path.join(FIX, "wg0.conf")
    run, _ = fake_resolvectl("", rc=1)
    assert vpn_dns.find(("wg0",), directory=FIX, run=run, resolvectl="/usr/bin/resolvectl").addresses[0] == \
        ipaddress.ip_address("10.64.0.1")
    # a tunnel of another namespace: resolved (the caller's namespace's) is not asked
    run, calls = fake_resolvectl("Link 7 (wg0): 10.9.0.1\n")
    assert vpn_dns.find(("wg0",), own_namespace=False, directory=FIX, run=run,
                        resolvectl="/usr/bin/resolvectl").source.endswith("wg0.conf")
    assert calls == []


def test_find_none_is_one_actionable_line():
    run, _ = fake_resolvectl("", rc=1)
    with pytest.raises(KsbpfError) as exc:
        vpn_dns.find(("nodns", "absent0"), directory=FIX, run=run, resolvectl="/usr/bin/resolvectl")
    assert "no resolver configured for nodns, absent0" in str(exc.value)
    assert "--dns ADDR" in exc.value.fix


def test_resolve_specs_mixes_addresses_and_auto():
    run, _ = fake_resolvectl("", rc=1)
    got, sources = vpn_dns.resolve_specs(["10.64.0.1", "auto", "10.1.1.1"], ("wg0",), directory=FIX, run=run,
                                         resolvectl="/usr/bin/resolvectl")
    assert got == tuple(ips("10.64.0.1", "fc00:bbbb:bbbb:bb01::1", "10.1.1.1"))
    assert sources == [os.path.join(FIX, "wg0.conf")]
    with pytest.raises(KsbpfError, match="not an IP address"):
        vpn_dns.resolve_specs(["dns.example"], ("wg0",))


@pytest.mark.root
def test_cli_dns_auto_without_resolvers(make_cgroup, tmp_path):
    """`ksbpf attach --dns auto` with no resolver configured: one line, non-zero, nothing attached."""
    cg = make_cgroup()
    env = dict(os.environ, KSBPF_WG_QUICK_DIR=str(tmp_path), PATH="/usr/sbin:/sbin:/bin")   # no resolvectl
    proc = ksbpf("attach", "--cgroup", cg, "--tunnel", "wgnone0", "--dns", "auto", env=env)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ksbpf: error: dns auto: no resolver configured for wgnone0"), lines
    assert "--dns ADDR" in lines[0] and "Traceback" not in proc.stderr
    assert ksbpf("status", "--json", check=True).stdout.count(cg) == 0
    # node mode: the same line, nothing attached
    proc = ksbpf("attach", "--node", "--netns", "ksbpf-no-such-netns", "--tunnel", "wgnone0", "--dns", "auto",
                 env=env)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "dns auto" in lines[0], lines


def test_config_dns_key(tmp_path, monkeypatch):
    from ksbpf.daemon.config import ConfigError, parse
    text = ('[[scope]]\ncgroup = "/sys/fs/cgroup/vpn.slice"\ntunnels = ["wg0"]\n'
            'dns = ["10.64.0.1", "fd00::53"]\n')
    (scope,) = parse(text, "t.toml").scopes
    assert scope.policy.dns == tuple(ips("10.64.0.1", "fd00::53")) and scope.policy.options.dns
    # auto: the wg-quick file of the scope's tunnel
    monkeypatch.setattr(vpn_dns.shutil, "which", lambda _name: None)   # no resolved here
    monkeypatch.setattr(vpn_dns, "WG_QUICK_DIR", FIX)
    (scope,) = parse(text.replace('"10.64.0.1", "fd00::53"', '"auto"'), "t.toml").scopes
    assert scope.policy.dns == tuple(ips("10.64.0.1", "fc00:bbbb:bbbb:bb01::1"))
    # a bad resolver, and --allow-lan-dns with dns: blamed on the key, on their line
    for bad, needle in (('dns = ["resolver.example"]', "not an IP address"),
                        ('dns = ["10.64.0.1"]\nallow_lan = true\nallow_lan_dns = true', "contradict")):
        with pytest.raises(ConfigError) as exc:
            parse('[[scope]]\ncgroup = "/sys/fs/cgroup/vpn.slice"\ntunnels = ["wg0"]\n' + bad + "\n", "t.toml")
        assert needle in str(exc.value) and "scope[0].dns" in str(exc.value)
    # [node] dns = [...]: the same key, the same checks
    node = parse('[node]\ntunnels = ["wg0"]\ndns = ["10.64.0.1"]\n', "n.toml").node.node
    assert node.policy.dns == tuple(ips("10.64.0.1")) and node.policy.options.dns
    assert parse('[node]\ntunnels = ["wg0"]\ndns = ["auto"]\n', "n.toml").node.node.policy.dns == \
        tuple(ips("10.64.0.1", "fc00:bbbb:bbbb:bb01::1"))
    with pytest.raises(ConfigError) as exc:
        parse('[node]\ntunnels = ["wg0"]\ndns = ["10.64.0.1"]\nallow_lan = true\nallow_lan_dns = true\n', "n.toml")
    assert "contradict" in str(exc.value) and "node.dns" in str(exc.value)


def test_networkmanager_sources():
    """NetworkManager without systemd-resolved: the device's DNS while its
    connection is up (nmcli's terse output: " | " between values, IPv6 colons
    escaped), else the keyfile of the connection made for the interface."""
    assert vpn_dns.parse_nmcli_dns(read("nmcli-device-wg0.txt")) == ips("10.64.0.1", "10.64.0.2", "fc00:bbbb:bbbb:bb01::1")
    assert vpn_dns.parse_nmcli_dns(read("nmcli-device-empty.txt")) == []
    # captured in the VM test's guest (NetworkManager 1.42, scenario "nm"): IP4.DNS, then an empty IP6.DNS
    assert vpn_dns.parse_nmcli_dns(read("nmcli-device-vmtest.txt")) == ips("10.200.0.1")
    keyfile = read(os.path.join("nm", "wg0.nmconnection"))
    assert vpn_dns.parse_nm_keyfile(keyfile, "wg0") == ips("10.64.0.53", "10.64.0.54", "fd00:53::1")
    assert vpn_dns.parse_nm_keyfile(keyfile, "wg1") == []   # another interface's connection
    nm_dirs = (os.path.join(FIX, "absent"), os.path.join(FIX, "nm"))

    # up: nmcli's device DNS (resolved has none for the link: it is not NM's DNS backend here)
    def run(argv, **kw):
        text = {"resolvectl": "", "nmcli": read("nmcli-device-wg0.txt")}[os.path.basename(argv[0])]
        return subprocess.CompletedProcess(argv, 0 if argv[0].endswith("nmcli") else 1, stdout=text, stderr="")
    found = vpn_dns.find(("wg0",), directory=FIX, run=run, resolvectl="/usr/bin/resolvectl", nmcli="/usr/bin/nmcli",
                         nm_dirs=nm_dirs)
    assert found == vpn_dns.Found(tuple(ips("10.64.0.1", "10.64.0.2", "fc00:bbbb:bbbb:bb01::1")),
                                  "nmcli device show wg0")

    # down (nmcli: "Error: Device 'wg0' not found", exit 10): the connection's keyfile, before wg-quick's file
    def run_down(argv, **kw):
        return subprocess.CompletedProcess(argv, 10 if argv[0].endswith("nmcli") else 1, stdout="", stderr="")
    found = vpn_dns.find(("wg0",), directory=FIX, run=run_down, resolvectl="/usr/bin/resolvectl",
                         nmcli="/usr/bin/nmcli", nm_dirs=nm_dirs)
    assert found == vpn_dns.Found(tuple(ips("10.64.0.53", "10.64.0.54", "fd00:53::1")),
                                  os.path.join(FIX, "nm", "wg0.nmconnection"))
    # no NetworkManager at all: wg-quick's file, as before
    found = vpn_dns.find(("wg0",), directory=FIX, run=run_down, resolvectl="/usr/bin/resolvectl",
                         nmcli="/usr/bin/nmcli", nm_dirs=())
    assert found.source == os.path.join(FIX, "wg0.conf")
    # a tunnel of another namespace: neither resolved nor NetworkManager (the caller's namespace's) is asked
    assert vpn_dns.find(("wg0",), own_namespace=False, directory=FIX, run=run, resolvectl="/usr/bin/resolvectl",
                        nmcli="/usr/bin/nmcli", nm_dirs=nm_dirs).source.endswith("wg0.conf")


def test_find_asks_the_tunnels_that_are_up_first(tmp_path):
    """tunnels = ["a", "b"] with both wg-quick files keeping their DNS =: while a is down and b is up, b's
    resolver is the one in force (a down tunnel's file must not hold it); with both up, the user's order."""
    (tmp_path / "a.conf").write_text("[Interface]\nDNS = 10.1.0.1\n")
    (tmp_path / "b.conf").write_text("[Interface]\nDNS = 10.2.0.1\n")
    run, _ = fake_resolvectl("", rc=1)

    def find(up: set[str]):
        return vpn_dns.find(("a", "b"), directory=str(tmp_path), run=run, resolvectl="/usr/bin/resolvectl",
                            nmcli="/nonexistent/nmcli", nm_dirs=(), exists=up.__contains__)
    assert find({"b"}).addresses == tuple(ips("10.2.0.1"))
    assert find({"a", "b"}).addresses == tuple(ips("10.1.0.1"))
    assert find(set()).addresses == tuple(ips("10.1.0.1"))   # none up: the user's order
    assert not vpn_dns._interface_exists("ksbpf-absent0") and vpn_dns._interface_exists("lo")
