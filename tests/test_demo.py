"""`ksbpf demo` (what `make demo` runs) works and leaves nothing behind."""

import os
import re
import subprocess

import pytest
from helpers import ksbpf

from ksbpf.kernel import cgroup

pytestmark = pytest.mark.lab


def test_demo_shows_block_and_restore():
    proc = ksbpf("demo", timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert re.search(r"All \d+ checks passed\.", out)
    assert "✗" not in out
    for needle in ("through the tunnel: tcp ok, udp ok, icmp ok",
                   "over the physical link: tcp blocked, udp blocked, icmp blocked",
                   "tunnel down: tcp blocked, udp blocked, icmp blocked",
                   "reached the server over the physical link: 0",
                   "drops counted by reason: not_tunnel",
                   "via the new tunnel: tcp ok, udp ok, icmp ok",
                   "detached 2 program"):   # cgroup_skb egress and cgroup/sock_create
        assert needle in out, needle
    # nothing left: namespaces, cgroup, pins
    tag = re.search(r"client namespace ksbpf-demo-([0-9a-f]{6})-c", out).group(1)
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert tag not in namespaces
    assert not os.path.exists(os.path.join(cgroup.cgroup2_root(), f"ksbpf-demo-{tag}"))
    pin_dirs = set(re.findall(r"pins in (\S+)", out))
    assert pin_dirs and not any(os.path.exists(d) for d in pin_dirs)
    assert not os.path.exists(f"/var/run/wireguard/wgc{tag}.sock")
