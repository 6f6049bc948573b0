"""dns = ["auto"] followed by the daemon (issue 17 §3): when the VPN changes
the resolvers it configured for the tunnel, the daemon updates the scope's
dns maps in place -- nothing re-attached -- and `status` shows them with
where they were read.

The lab's real wireguard-go tunnel; `dns auto` reads a wg-quick file in a
test directory (KSBPF_WG_QUICK_DIR; the tunnel lives in the lab's namespace,
so systemd-resolved, which knows its own namespace's links only, is not asked).
Two resolvers behind the tunnel, each answering with its own address and
counting the queries it gets: the tunnel's server address (the "old" VPN
resolver) and another address routed into the tunnel (the "new" one)."""

from __future__ import annotations

import json
import os

import pytest
from dnslab import DnsServer, query
from helpers import DaemonProcess, ksbpf, packets, scope_status, toml_config, wait_until

pytestmark = pytest.mark.lab

OLD_ANSWER, NEW_ANSWER = "10.111.0.1", "10.88.8.8"
STUB = "127.0.0.53"


@pytest.fixture
def resolvers(lab):
    with DnsServer(lab.server_path, lab.tun4_server, OLD_ANSWER) as old, \
            DnsServer(lab.server_path, lab.net4_server, NEW_ANSWER) as new:
        yield old, new


@pytest.fixture
def dns_daemon(lab, make_cgroup, tmp_path):
    """start(wg_quick_text or None) -> (daemon, cgroup, wg-quick file): a daemon keeping one scope of the
    lab's tunnel with dns = ["auto"]; stopped before the cgroup is removed (which detaches)."""
    started: list[DaemonProcess] = []
    cg = make_cgroup()
    wg_dir = tmp_path / "wireguard"
    wg_dir.mkdir()
    conf = wg_dir / f"{lab.wg_client}.conf"

    def start(text: str | None):
        if text is not None:
            conf.write_text(text)
        path = tmp_path / "ksbpf.toml"
        path.write_text(toml_config([{"cgroup": cg, "tunnels": [lab.wg_client], "netns": lab.client_ns,
                                      "endpoints": [lab.endpoint4], "dns": ["auto"]}]))
        env = dict(os.environ, KSBPF_WG_QUICK_DIR=str(wg_dir))
        d = DaemonProcess(str(path), env=env)
        started.append(d)
        d.wait_for("ready")
        return d, cg, conf

    yield start
    for d in started:
        d.stop()


def wg_quick(dns: str) -> str:
    return f"[Interface]\nPrivateKey = (not read)\nAddress = 10.99.0.2/32\nDNS = {dns}, vpn.example\n\n[Peer]\n"


def verify_fails(cg: str) -> list[dict]:
    """`ksbpf verify`'s FAIL findings for the scope: the crafted packets (DNS to the resolvers in force
    among them) through the attached program agree with the policy the daemon keeps."""
    out = json.loads(ksbpf("verify", "--scope", cg, "--json").stdout)
    assert any(f["check"] == "policy" and f["verdict"] == "ok" for f in out["findings"]), out
    return [f for f in out["findings"] if f["verdict"] == "fail"]


def ask(lab, cg, server: str, proto: str = "udp", timeout: float = 3.0) -> dict:
    return query(lab.client_ns, cg, server, proto, timeout)


def test_daemon_follows_the_tunnels_resolver(lab, dns_daemon, resolvers):
    old, new = resolvers
    d, cg, conf = dns_daemon(wg_quick(lab.tun4_server))
    ev = d.wait_for("dns_followed")
    assert ev["now"] == [lab.tun4_server] and ev["source"] == str(conf), ev
    st = scope_status(cg)
    assert st["dns"]["resolvers"] == [lab.tun4_server] and st["dns"]["auto"] is True
    assert st["dns"]["source"] == str(conf)
    prog_id = st["prog_id"]
    human = ksbpf("status", check=True).stdout
    assert f"only to {lab.tun4_server} (auto: {conf}) through the tunnel" in human, human

    # the control before the change: the old resolver answers, a query to the new one is redirected to the old
    r = ask(lab, cg, lab.tun4_server)
    assert r["ok"] and r["answer"] == OLD_ANSWER, r
    r = ask(lab, cg, lab.net4_server)
    assert r["ok"] and r["answer"] == OLD_ANSWER and r["from"] == lab.net4_server, r
    assert new.queries == 0 and old.queries == 2

    # the VPN moves its resolver: the daemon follows, in place
    mark = len(d.events)
    conf.write_text(wg_quick(lab.net4_server))
    ev = d.wait_for("dns_followed", after=mark, timeout=30)
    assert ev["added"] == [lab.net4_server] and ev["removed"] == [lab.tun4_server], ev
    assert ev["now"] == [lab.net4_server] and ev["source"] == str(conf)
    st = scope_status(cg)
    assert st["dns"]["resolvers"] == [lab.net4_server] and st["prog_id"] == prog_id   # nothing re-attached
    assert not [e for e in d.events[mark:] if e.get("event", "").startswith("scope_")], d.events[mark:]

    old_before = old.queries
    for proto in ("udp", "tcp"):
        # the new resolver answers; the old one, and the stub, are redirected to it
        r = ask(lab, cg, lab.net4_server, proto)
        assert r["ok"] and r["answer"] == NEW_ANSWER, (proto, r)
        for server in (lab.tun4_server, STUB):
            r = ask(lab, cg, server, proto)
            assert r["ok"] and r["answer"] == NEW_ANSWER and r["from"] == server, (proto, server, r)
    assert new.queries == 6 and old.queries == old_before == 2
    assert verify_fails(cg) == []
    assert d.proc.poll() is None


def test_no_resolver_yet_drops_dns_until_the_tunnel_has_one(lab, dns_daemon, resolvers):
    """The tunnel's configuration appears after the daemon started: until then the scope's DNS is dropped
    (a kill switch fails closed; the daemon still attached it), then it goes to the resolver read."""
    old, _new = resolvers
    d, cg, conf = dns_daemon(None)
    st = scope_status(cg)
    assert st["dns"]["resolvers"] == [] and st["dns"]["auto"] is True and st["dns"]["source"] is None
    assert (f"dns      none known yet (auto: no resolver configured for {lab.wg_client}): all DNS of the scope is "
            "dropped") in ksbpf("status", check=True).stdout
    dropped = packets(cg, "dns_not_vpn")
    r = ask(lab, cg, lab.tun4_server, timeout=1.0)
    assert not r["ok"] and old.queries == 0, r
    assert packets(cg, "dns_not_vpn") > dropped
    assert verify_fails(cg) == []
    # the control: the tunnel itself carries the scope's other traffic (the same server, another port)
    with DnsServer(lab.server_path, lab.tun4_server, OLD_ANSWER, port=5353) as other_port:
        r = query(lab.client_ns, cg, lab.tun4_server, "udp", 3.0, port=5353)
        assert r["ok"] and other_port.queries == 1, r

    mark = len(d.events)
    conf.write_text(wg_quick(lab.tun4_server))
    ev = d.wait_for("dns_followed", after=mark, timeout=30)
    assert ev["added"] == [lab.tun4_server] and ev["removed"] == [], ev
    wait_until(lambda: scope_status(cg)["dns"]["resolvers"] == [lab.tun4_server], 10, "status shows the resolver")
    r = ask(lab, cg, lab.tun4_server)
    assert r["ok"] and r["answer"] == OLD_ANSWER and old.queries == 1, r


def test_config_auto_is_followed_and_none_yet_is_no_error(tmp_path, monkeypatch):
    """dns = ["auto"] in the configuration: the policy says the resolvers are followed (and which were given as
    addresses beside auto); no resolver configured yet is no error (DNS is dropped until there is one)."""
    import ipaddress

    from ksbpf.daemon.config import parse
    from ksbpf.kernel import vpn_dns
    from ksbpf.policy import Policy
    monkeypatch.setattr(vpn_dns.shutil, "which", lambda _name: None)   # no resolved here
    monkeypatch.setattr(vpn_dns, "WG_QUICK_DIR", str(tmp_path))
    text = '[[scope]]\ncgroup = "/sys/fs/cgroup/vpn.slice"\ntunnels = ["wg0"]\ndns = ["10.1.1.1", "auto"]\n'
    (scope,) = parse(text, "t.toml").scopes
    p = scope.policy
    assert p.dns_auto and p.options.dns and p.dns == (ipaddress.ip_address("10.1.1.1"),)
    assert p.dns_fixed == p.dns
    (tmp_path / "wg0.conf").write_text(wg_quick("10.64.0.1"))
    (scope,) = parse(text, "t.toml").scopes
    assert scope.policy.dns == tuple(map(ipaddress.ip_address, ("10.1.1.1", "10.64.0.1")))
    # pinned and read back (status, adoption); the followed resolvers differing is still the same policy
    assert Policy.from_dict(scope.policy.to_dict()) == scope.policy
    assert scope.policy.same_but_followed(p) and p.same_but_followed(scope.policy)
    (scope_fixed,) = parse(text.replace(', "auto"', ""), "t.toml").scopes
    assert not scope_fixed.policy.dns_auto and not scope_fixed.policy.same_but_followed(scope.policy)
    # no resolver at all, and nothing known yet: DNS is still filtered (the program is compiled with --dns)
    (scope,) = parse(text.replace('"10.1.1.1", ', ""), "t.toml").scopes
    (tmp_path / "wg0.conf").unlink()
    (scope,) = parse(text.replace('"10.1.1.1", ', ""), "t.toml").scopes
    assert scope.policy.dns == () and scope.policy.options.dns and scope.policy.dns_auto


def test_resolved_not_answering_is_not_no_resolver(tmp_path, monkeypatch):
    """resolvectl that does not answer in time: Unreadable (one line) -- not "none configured"; the
    daemon keeps the resolvers in force (the maps are not touched) and asks again later."""
    import io
    import subprocess
    import time

    from ksbpf.daemon import service
    from ksbpf.daemon.log import EventLog
    from ksbpf.kernel import vpn_dns
    from ksbpf.policy import Policy

    def hung(argv, **kw):
        raise subprocess.TimeoutExpired(argv, kw.get("timeout"))
    (tmp_path / "wg0.conf").write_text(wg_quick("10.64.0.1"))   # would be read if resolved said "none"
    with pytest.raises(vpn_dns.Unreadable) as exc:
        vpn_dns.find(("wg0",), directory=str(tmp_path), run=hung, resolvectl="/usr/bin/resolvectl", timeout=0.5)
    assert "resolvectl dns wg0 did not answer within 0.5 s" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(vpn_dns.Unreadable):
        vpn_dns.find_optional(("wg0",), directory=str(tmp_path), run=hung, resolvectl="/usr/bin/resolvectl")
    got = vpn_dns.followed_specs(["auto"], ("wg0",), directory=str(tmp_path), run=hung, resolvectl="/usr/bin/x")
    assert got["dns_auto"] and got["dns"] == ()   # at start: nothing known yet (dropped; read again soon)

    out = io.StringIO()
    d = service.Daemon("/nonexistent.toml", EventLog("json", out))
    policy = Policy(("wg0",), dns=(ipaddress_of("10.64.0.1"),), dns_auto=True)
    st = service.ScopeState("/sys/fs/cgroup/x", policy, False, pin_dir=str(tmp_path / "no-pins"))
    monkeypatch.setattr(service.dns_followed, "read_now",
                        lambda p, **kw: (_ for _ in ()).throw(vpn_dns.Unreadable("resolvectl dns wg0 did not answer")))
    before = time.monotonic()
    d._follow_dns(st, {})
    ev = json.loads(out.getvalue().splitlines()[-1])
    assert ev["event"] == "dns_follow_failed" and ev["level"] == "warning" and "stay" in ev["note"], ev
    assert st.policy.dns == policy.dns                                      # kept, maps not opened
    assert st.dns_at >= before + service.DNS_UNREADABLE_SECONDS - 1


def ipaddress_of(text: str):
    import ipaddress
    return ipaddress.ip_address(text)
