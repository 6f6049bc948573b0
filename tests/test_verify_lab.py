"""`ksbpf verify --lab`: the leak matrix with real packets runs on this machine
and passes -- no vector leaks, every control arrives -- and leaves nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
from helpers import ksbpf

pytestmark = [pytest.mark.lab,
              pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="needs wireguard-go")]

VECTORS = ("tcp over the physical link", "IPv6 udp, global address on-link", "SO_BINDTODEVICE", "IP_PKTINFO",
           "IPV6_PKTINFO", "SOCK_RAW", "AF_PACKET", "multicast", "endpoint address, another udp port",
           "endpoint address, tcp", "endpoint address, icmp", "DNS over udp to a LAN", "DNS over tcp to a LAN",
           "LocalNet", "DHCP client port", "DHCPv6 client port", "more specific route", "ifindex", "re-attach", "tunnel deleted mid-stream")


def leftovers() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith("ksbpf-vl-")}


def cgroups_left() -> set[str]:
    from ksbpf.kernel import cgroup
    return {d for d in os.listdir(cgroup.cgroup2_root()) if d.startswith("ksbpf-vl-")}


def test_verify_lab_passes():
    before, cg_before = leftovers(), cgroups_left()
    start = time.monotonic()
    proc = ksbpf("verify", "--lab", "--json", timeout=300)
    print(f"verify --lab: {time.monotonic() - start:.1f} s")
    out = json.loads(proc.stdout)
    assert proc.returncode == 0 and out["ok"], json.dumps(out, indent=1)
    cells = out["cells"]
    for v in VECTORS:
        assert any(v in c["vector"] for c in cells), f"no cell for {v}"
    assert all(c["leaked"] == 0 and c["control"] > 0 and c["verdict"] == "ok" for c in cells)
    assert leftovers() <= before
    assert cgroups_left() <= cg_before
