"""The daemon never compiles in its own process: with an empty image cache,
the configured scopes are compiled by a helper before the loop starts, and a
scope that needs a new option set once the loop runs (a reload turning
allow_dhcp on; a pod's annotations do the same) is compiled by a helper while
the loop goes on.  The daemon's memory map never holds bcc or LLVM."""

from __future__ import annotations

import os
import signal

import pytest
from helpers import DaemonProcess, toml_config

pytestmark = pytest.mark.root


def compiler_mapped(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return sorted({line.split()[-1] for line in f if "libbcc" in line or "LLVM" in line})


def images(cache) -> list[str]:
    """The compiled program images in a cache directory (beside them: the BTF offsets, btf-*.json)."""
    return [n for n in os.listdir(cache) if not n.startswith("btf-")]


def test_daemon_compiles_in_helper_processes(make_cgroup, tmp_path, monkeypatch):
    monkeypatch.setenv("KSBPF_CACHE_DIR", str(tmp_path / "empty-cache"))
    cg = make_cgroup()
    path = tmp_path / "ksbpf.toml"
    path.write_text(toml_config([{"cgroup": cg, "tunnels": ["wg0"]}]))
    d = DaemonProcess(str(path))
    try:
        d.wait_for("scope_attached", scope=cg, timeout=120)
        assert len(images(tmp_path / "empty-cache")) == 1
        path.write_text(toml_config([{"cgroup": cg, "tunnels": ["wg0"], "allow_dhcp": True}]))
        mark = len(d.events)
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for("scope_compiling", scope=cg, after=mark, timeout=30)
        d.wait_for("scope_replaced", scope=cg, after=mark, timeout=120)
        assert len(images(tmp_path / "empty-cache")) == 2
        assert compiler_mapped(d.proc.pid) == []
    finally:
        d.stop()
