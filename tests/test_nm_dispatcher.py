"""deploy/networkmanager/90-ksbpf, NetworkManager's dispatcher script: which
events of which interfaces make it reload the daemon.  Run as NetworkManager
runs it ($1 interface, $2 action), with `systemctl` and `logger` recording
their calls (the VM test's scenario "nm" runs it under NetworkManager)."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "deploy", "networkmanager", "90-ksbpf")
EXAMPLE = os.path.join(REPO, "deploy", "networkmanager", "ksbpf.toml")


@pytest.fixture
def shim(tmp_path):
    """A PATH whose systemctl says ksbpf.service is active (or not) and records its calls."""
    calls = tmp_path / "calls"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("systemctl", "logger"):
        path = bindir / tool
        path.write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n'
                        + ('[ "$1" = is-active ] && exit "${KSBPF_TEST_ACTIVE:-0}"\n' if tool == "systemctl" else "")
                        + "exit 0\n")
        path.chmod(0o755)

    def run(iface: str, action: str, config: str = EXAMPLE, active: bool = True) -> list[str]:
        if calls.exists():
            calls.unlink()
        env = {"PATH": f"{bindir}:/usr/bin:/bin", "KSBPF_CONFIG": config, "KSBPF_TEST_ACTIVE": "0" if active else "3"}
        proc = subprocess.run(["sh", SCRIPT, iface, action], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return calls.read_text().splitlines() if calls.exists() else []
    return run


def test_reloads_for_the_configured_tunnel_only(shim, tmp_path):
    mode = os.stat(SCRIPT).st_mode
    assert mode & stat.S_IXUSR and not mode & (stat.S_IWGRP | stat.S_IWOTH)   # NetworkManager runs no other
    for action in ("up", "vpn-up", "dns-change", "reapply"):
        assert shim("wg-home", action)[-1] == "systemctl reload --no-block ksbpf.service", action
    # other events, other interfaces, a daemon that does not run: nothing
    for action in ("down", "pre-up", "vpn-down", "hostname", "connectivity-change"):
        assert shim("wg-home", action) == [], action
    assert shim("eth0", "up") == [] and shim("wg-home2", "up") == []
    assert shim("wg-home", "up", active=False) == ["systemctl is-active --quiet ksbpf.service"]
    # a configuration with typed resolvers (no dns auto) has nothing to re-read
    typed = tmp_path / "typed.toml"
    typed.write_text(open(EXAMPLE).read().replace('dns = ["auto"]', 'dns = ["10.64.0.1"]'))
    assert shim("wg-home", "up", str(typed)) == []
    assert shim("wg-home", "up", str(tmp_path / "absent.toml")) == []
