"""[kubernetes] in the configuration (checked by check-config) and the
pod annotations -> policy."""

from __future__ import annotations

import ipaddress

import pytest
from helpers import ksbpf

from ksbpf.daemon import config
from ksbpf.errors import KsbpfError
from ksbpf.kubernetes import annotations as notes
from ksbpf.kubernetes.settings import KubernetesSettings
from ksbpf.policy import Endpoint, Options

P = "ksbpf.io/"
NS = "/proc/1234/ns/net"


def test_kubernetes_table_parsed():
    cfg = config.parse('[kubernetes]\nenabled = true\nnode_name = "node-1"\nannotation_prefix = "vpn.example.com"\n')
    assert cfg.kubernetes == KubernetesSettings(True, "node-1", "vpn.example.com/", "", "")
    assert config.parse("").kubernetes.enabled is False


def test_kubernetes_table_errors_have_lines(tmp_path):
    path = tmp_path / "k.toml"
    path.write_text('[kubernetes]\nenabled = "yes"\nnode_nam = "x"\nannotation_prefix = "Not A Prefix"\n'
                    'kubeconfig = "/nonexistent/kubeconfig"\ncgroup_root = "relative"\n')
    proc = ksbpf("check-config", str(path))
    assert proc.returncode == 1
    for line, key in ((2, "enabled"), (3, "node_nam"), (4, "annotation_prefix"), (5, "kubeconfig"), (6, "cgroup_root")):
        assert f"{path}:{line}: kubernetes.{key}" in proc.stderr, proc.stderr
    assert "did you mean 'node_name'" in proc.stderr


def test_node_name_from_the_downward_api(monkeypatch):
    monkeypatch.delenv("NODE_NAME", raising=False)
    with pytest.raises(KsbpfError, match="NODE_NAME"):
        KubernetesSettings(enabled=True).node()
    monkeypatch.setenv("NODE_NAME", "node-7")
    assert KubernetesSettings(enabled=True).node() == "node-7"
    assert KubernetesSettings(enabled=True, node_name="n").node() == "n"


def test_annotations_to_policy():
    got = notes.parse({P + "tunnels": "wg0, tun0", P + "endpoints": "203.0.113.5:51820/udp,[2001:db8::5]:51820/udp",
                       P + "allow-lan": "true", P + "allow-lan-dns": "True", P + "allow-dhcp": "false",
                       P + "allow-cidrs": "10.96.0.0/12,fd00:10:96::/112", "other.io/x": "y"}, P, NS)
    assert not got.blocked
    p = got.policy
    assert p.tunnels == ("wg0", "tun0") and p.netns == NS
    assert set(p.endpoints) == {Endpoint.parse("203.0.113.5:51820/udp"), Endpoint.parse("[2001:db8::5]:51820/udp")}
    assert p.options == Options(True, True, False, allow_cidrs=True)   # the tries compiled in (KSBPF_OPT_CIDRS)
    assert p.allow_cidrs == (ipaddress.ip_network("10.96.0.0/12"), ipaddress.ip_network("fd00:10:96::/112"))
    assert notes.is_annotated({P + "tunnels": "wg0"}, P) and not notes.is_annotated({"a/b": "c"}, P)


@pytest.mark.parametrize("bad,needle", [
    ({P + "allow-lan": "true"}, "tunnels: missing"),
    ({P + "tunnels": "wg0", P + "endpoints": "vpn.example.com:51820/udp"}, "not an IP address"),
    ({P + "tunnels": "wg0", P + "allow-lan": "yes"}, 'not "true" or "false"'),
    ({P + "tunnels": "wg0", P + "allow-cidr": "10.96.0.0/12"}, "unknown annotation"),
    ({P + "tunnels": "wg0", P + "allow-cidrs": "0.0.0.0/0"}, "every address"),
    ({P + "tunnels": "wg0", P + "allow-lan-dns": "true"}, "only widens"),
    ({P + "tunnels": "a-name-much-too-long-for-an-interface"}, "not a valid interface name"),
])
def test_a_bad_annotation_blocks_everything(bad, needle):
    got = notes.parse(bad, P, NS)
    assert got.blocked and any(needle in e for e in got.errors), got.errors
    assert got.policy == notes.blocked_policy(NS)
    assert not got.policy.trusts(notes.BLOCKED_TUNNEL, "wireguard") and not got.policy.endpoints
    assert got.policy.options == Options() and not got.policy.allow_cidrs
