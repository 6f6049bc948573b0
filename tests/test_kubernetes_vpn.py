"""Kubernetes annotations for the VPN options (issue 17): vpn-mark, dns,
endpoints `auto` and `*:PORT/proto` (only with the VPN client's identity),
and vpn-container (the pod's container whose cgroup is the --vpn-cgroup,
found from the pod's status and the container cgroups below the pod's)."""

from __future__ import annotations

import ipaddress
import os
import uuid

import pytest

from ksbpf.kernel import vpn_dns
from ksbpf.kubernetes import annotations as notes
from ksbpf.kubernetes import discovery
from ksbpf.policy import AnyEndpoint, Endpoint

P = "ksbpf.io/"
NS = "/proc/1234/ns/net"
T = {P + "tunnels": "wg0"}


def ips(*texts):
    return tuple(ipaddress.ip_address(t) for t in texts)


def test_vpn_mark_dns_and_wildcard_endpoints():
    got = notes.parse({**T, P + "vpn-mark": "0x51820", P + "endpoints": "*:51820/udp,auto,203.0.113.5:51820/udp",
                       P + "dns": "10.64.0.1, fd00::1"}, P, NS)
    assert not got.blocked, got.errors
    p = got.policy
    assert p.vpn_mark == (0x51820, 0xFFFFFFFF) and p.options.vpn_mark
    assert p.any_endpoints == (AnyEndpoint.parse("*:51820/udp"),) and p.follow == ("auto",)
    assert p.endpoints == (Endpoint.parse("203.0.113.5:51820/udp"),)
    assert p.dns == ips("10.64.0.1", "fd00::1") and p.options.dns and not p.dns_auto
    assert notes.parse({**T, P + "vpn-mark": "0xca6c/0xffff"}, P, NS).policy.vpn_mark == (0xCA6C, 0xFFFF)


def test_dns_auto_is_followed(tmp_path, monkeypatch):
    monkeypatch.setattr(vpn_dns, "WG_QUICK_DIR", str(tmp_path))
    got = notes.parse({**T, P + "dns": "auto"}, P, NS)
    assert not got.blocked and got.policy.dns_auto and got.policy.dns == () and got.policy.options.dns
    (tmp_path / "wg0.conf").write_text("[Interface]\nDNS = 10.64.0.1\n")
    got = notes.parse({**T, P + "dns": "auto"}, P, NS)
    assert got.policy.dns_auto and got.policy.dns == ips("10.64.0.1")


@pytest.mark.parametrize("bad,needle", [
    ({P + "endpoints": "*:51820/udp"}, "endpoints: *:51820/udp need the VPN client's identity"),
    ({P + "endpoints": "auto"}, "endpoints: auto need the VPN client's identity"),
    ({P + "endpoints": "auto:/run/openvpn/x.sock"}, "endpoints:"),
    ({P + "vpn-mark": "fwmark"}, "vpn-mark:"),
    ({P + "vpn-mark": "0x1/0x0"}, "vpn-mark:"),
    ({P + "vpn-container": "Not_A_Name"}, "vpn-container: 'Not_A_Name' is not a container name"),
    ({P + "vpn-container": ""}, "vpn-container:"),
    ({P + "dns": "resolver.example"}, "dns: "),
    ({P + "dns": ""}, "dns: empty"),
    ({P + "dns": "0.0.0.0"}, "dns: "),
    ({P + "dns": "10.64.0.1", P + "allow-lan": "true", P + "allow-lan-dns": "true"}, "contradict"),
])
def test_invalid_vpn_annotations_block_with_one_line(bad, needle):
    got = notes.parse({**T, **bad}, P, NS)
    assert got.blocked and got.policy == notes.blocked_policy(NS), got
    assert any(needle in e for e in got.errors), got.errors
    assert all("\n" not in e for e in got.errors)


def test_the_published_digest_covers_the_vpn_annotations():
    base = {**T, P + "vpn-mark": "0x51820", P + "endpoints": "*:51820/udp", P + "dns": "10.64.0.1",
            P + "vpn-container": "wireguard"}
    seen = {notes.digest(base, P)}
    for key, other in (("vpn-mark", "0x51821"), ("endpoints", "*:51821/udp"), ("dns", "10.64.0.2"),
                       ("vpn-container", "openvpn")):
        seen.add(notes.digest({**base, P + key: other}, P))
    assert len(seen) == 5


def kubelet_pod(make_cgroup, name: str, running: bool) -> tuple[dict, str, str]:
    """A pod cgroup with two containerd container cgroups, and the pod as the API has it."""
    pod_path = make_cgroup("-pod")
    ids = {"app": uuid.uuid4().hex * 2, name: uuid.uuid4().hex * 2}
    for cid in ids.values():
        os.mkdir(os.path.join(pod_path, f"cri-containerd-{cid}.scope"))
    statuses = [{"name": "app", "containerID": f"containerd://{ids['app']}"}]
    if running:
        statuses.append({"name": name, "containerID": f"containerd://{ids[name]}"})
    else:
        statuses.append({"name": name})   # waiting: no container yet
    pod = {"metadata": {"uid": str(uuid.uuid4())}, "status": {"containerStatuses": statuses[:1],
                                                              "initContainerStatuses": statuses[1:]}}
    return pod, pod_path, os.path.join(pod_path, f"cri-containerd-{ids[name]}.scope")


@pytest.mark.root
def test_vpn_container_is_the_vpn_cgroup(make_cgroup):
    pod, pod_path, vpn_path = kubelet_pod(make_cgroup, "wireguard", running=True)
    assert discovery.container_cgroup(pod, pod_path, "wireguard") == vpn_path   # a native sidecar (init status)
    assert discovery.container_cgroup(pod, pod_path, "app") != vpn_path
    assert discovery.container_cgroup(pod, pod_path, "absent") is None
    ann = {**T, P + "vpn-container": "wireguard", P + "endpoints": "*:51820/udp,auto"}
    got = notes.parse(ann, P, NS, lambda n: discovery.container_cgroup(pod, pod_path, n))
    assert not got.blocked and not got.vpn_waiting and got.vpn_container == "wireguard"
    assert got.policy.vpn_cgroups == (vpn_path,) and got.policy.options.vpn_cgroup
    assert got.policy.any_endpoints == (AnyEndpoint.parse("*:51820/udp"),) and got.policy.follow == ("auto",)


@pytest.mark.root
def test_vpn_container_not_started_closes_the_endpoint_exception(make_cgroup):
    pod, pod_path, _ = kubelet_pod(make_cgroup, "wireguard", running=False)
    ann = {**T, P + "vpn-container": "wireguard", P + "endpoints": "*:51820/udp,203.0.113.5:51820/udp"}
    got = notes.parse(ann, P, NS, lambda n: discovery.container_cgroup(pod, pod_path, n))
    assert not got.blocked and got.vpn_waiting
    p = got.policy   # nobody reaches an endpoint outside the tunnel until the VPN container is there
    assert p.endpoints == () and p.any_endpoints == () and p.follow == () and p.vpn_cgroups == ()
    # with a mark as well: the marked packets keep the exception meanwhile
    got = notes.parse({**ann, P + "vpn-mark": "51820"}, P, NS, lambda n: None)
    assert got.vpn_waiting and got.policy.vpn_mark == (51820, 0xFFFFFFFF) and got.policy.endpoints
