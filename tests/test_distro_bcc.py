"""Debian 13's own bcc compiles ksbpf's programs, against the headers of
Debian 13's stock kernel, and what it compiles decides as the model says
(issue 15: "the distribution's bcc of each release").

Debian 12's bcc (0.26) is the one this machine and the VM guest run; here
trixie's python3-bpfcc runs in a trixie root filesystem (tests/harness/
distro_bcc.py) on this machine's kernel: the policy's test runs for every
hook and option set (tests/test_policy_bpf.py) and the differential fuzzer
against the model (tests/test_verify_fuzz.py), each program compiled afresh
by that bcc.
"""

from __future__ import annotations

import os
import re

import pytest

from harness import distro_bcc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def trixie():
    return distro_bcc.ensure_rootfs()


def test_debian13_bcc_is_the_one_used(trixie):
    proc = distro_bcc.run(trixie, REPO, "python3", "-c",
                          "import bcc, sys, os; print(bcc.__version__, sys.version.split()[0], bcc.__file__, "
                          "os.environ['BCC_KERNEL_SOURCE'], open(os.environ['BCC_KERNEL_SOURCE'] + '/PACKAGE').read())")
    assert proc.returncode == 0, proc.stderr
    version, python, where, headers, package = proc.stdout.split(maxsplit=4)
    assert version.split(".")[:2] != ["0", "26"] and int(version.split(".")[1]) >= 29, proc.stdout  # trixie: 0.31
    assert where.startswith("/usr/lib/python3/dist-packages/bcc/"), where
    assert python.startswith("3.13"), python
    assert package.strip() == f"linux-headers-{distro_bcc.headers_release()}"


def test_policy_and_fuzzer_with_debian13_bcc(trixie):
    proc = distro_bcc.run(trixie, REPO, "python3", "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x",
                          "--rootdir", "/tmp/src", "/tmp/src/tests/test_reasons.py",
                          "/tmp/src/tests/test_policy_bpf.py", "/tmp/src/tests/test_verify_fuzz.py")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = re.search(r"(\d+) passed", out)
    assert summary and int(summary.group(1)) >= 500, out[-3000:]
    assert not re.search(r"\d+ (failed|errors?|skipped)", out), out[-3000:]
    # every program was compiled there, by that bcc, into the run's own cache (the conftest's program_cache
    # fixture: a fresh directory of the chroot's tmpfs), never taken from this machine's
