"""The systemd units are hardened: `systemd-analyze security` rates each at an
exposure of 4.0 or less (the VM test proves they still work, in a booted guest)."""

import os
import re
import subprocess

import pytest

UNITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy", "systemd")
LIMIT = 4.0


@pytest.mark.parametrize("name", ["ksbpf-early.service", "ksbpf.service"])
def test_exposure_is_at_most_4(name):
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", os.path.join(UNITS, name)],
                          capture_output=True, text=True)
    m = re.search(rf"Overall exposure level for {re.escape(name)}: ([\d.]+)", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr
    assert float(m[1]) <= LIMIT, f"{name}: exposure {m[1]} > {LIMIT}\n" + "\n".join(
        line for line in proc.stdout.splitlines() if line.startswith("✗"))
