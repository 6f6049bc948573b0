"""Running the real command line from tests."""

from __future__ import annotations

import json
import subprocess
import sys

KSBPF = [sys.executable, "-m", "ksbpf.cli"]


def ksbpf(*args: str, check: bool = False, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(KSBPF + list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"ksbpf {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def scope_status(cgroup_path: str) -> dict:
    """The `ksbpf status --json` entry of one cgroup."""
    scopes = json.loads(ksbpf("status", "--json", check=True).stdout)["scopes"]
    mine = [s for s in scopes if s["cgroup"] == cgroup_path]
    assert len(mine) == 1, scopes
    return mine[0]


def packets(cgroup_path: str, reason: str) -> int:
    return scope_status(cgroup_path)["counters"][reason]["packets"]


def dropped(cgroup_path: str) -> int:
    return scope_status(cgroup_path)["dropped_packets"]
