"""`ksbpf exec --user`: the program runs as the user, with no capability and
no-new-privileges, so it cannot open the raw AF_PACKET socket that would
bypass the cgroup hook; `status` warns about processes of a scope that hold
CAP_NET_RAW."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from helpers import KSBPF, ksbpf, scope_status

pytestmark = pytest.mark.root
PYTHON = "/usr/bin/python3"   # readable by any user (the venv may not be)
REPORT = r"""
import json, os, socket
out = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
       "env": dict(os.environ)}
with open("/proc/self/status") as f:
    for line in f:
        k, _, v = line.partition(":")
        if k in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb", "NoNewPrivs"):
            out[k] = v.strip()
with open("/proc/self/cgroup") as f:
    out["cgroup"] = f.read().strip()
try:
    socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)).close()
    out["af_packet"] = "opened"
except OSError as exc:
    out["af_packet"] = type(exc).__name__
print(json.dumps(out))
"""


@pytest.fixture
def scope(make_cgroup):
    cg = make_cgroup()
    ksbpf("attach", "--cgroup", cg, "--tunnel", "wgnone0", check=True)
    return cg


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUDO_")}
    env.update(extra)
    return env


def run_report(cg: str, *args: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    proc = subprocess.run(KSBPF + ["exec", "--cgroup", cg, *args, "--", PYTHON, "-c", REPORT],
                          capture_output=True, text=True, timeout=60, env=env or clean_env(SECRET="x"))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_exec_as_a_user_has_no_capability_and_no_raw_socket(scope):
    out, _ = run_report(scope, "--user", "nobody")
    assert (out["uid"], out["euid"], out["gid"]) == (65534, 65534, 65534)
    assert out["groups"] == sorted(set(os.getgrouplist("nobody", 65534)))
    for cap in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
        assert int(out[cap], 16) == 0, (cap, out[cap])
    assert out["NoNewPrivs"] == "1"
    assert out["af_packet"] == "PermissionError"
    env = out["env"]
    assert env["USER"] == env["LOGNAME"] == "nobody" and env["HOME"] == "/nonexistent"
    assert "SECRET" not in env and "KSBPF_CACHE_DIR" not in env
    assert out["cgroup"].endswith(os.path.basename(scope))
    print(f"exec --user nobody: uid {out['uid']}, CapBnd {out['CapBnd']}, AF_PACKET: {out['af_packet']}")


def test_exec_defaults_to_the_sudo_caller(scope):
    out, _ = run_report(scope, env=clean_env(SUDO_USER="nobody", SUDO_UID="65534", SUDO_GID="65534"))
    assert out["uid"] == 65534 and out["af_packet"] == "PermissionError"


def test_control_exec_as_root_can_open_a_raw_socket_and_is_warned(scope):
    """Without a user (and not through sudo) the command runs as root, as
    before: it can open AF_PACKET -- what --user takes away -- and is told."""
    out, err = run_report(scope)
    assert out["uid"] == 0 and out["af_packet"] == "opened"
    assert "--user" in err


def test_unknown_user_is_one_line_and_runs_nothing(scope):
    proc = ksbpf("exec", "--cgroup", scope, "--user", "no-such-user-ksbpf", "--", "true")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "no user" in proc.stderr


def test_status_warns_about_processes_holding_cap_net_raw(scope):
    root = subprocess.Popen(["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec sleep 60', scope])
    user = subprocess.Popen(KSBPF + ["exec", "--cgroup", scope, "--user", "nobody", "--", "sleep", "60"],
                            env=clean_env())
    try:
        deadline = time.monotonic() + 10
        while True:
            s = scope_status(scope)
            procs = open(os.path.join(scope, "cgroup.procs")).read().split()
            if len(procs) == 2 and all(open(f"/proc/{p}/comm").read().strip() == "sleep" for p in procs):
                break
            assert time.monotonic() < deadline, procs
            time.sleep(0.05)
        s = scope_status(scope)
        assert [w for w in s["warnings"] if "CAP_NET_RAW" in w and f"process {root.pid} " in w]
        assert not [w for w in s["warnings"] if f"process {user.pid} " in w]
        assert "warning: process" in ksbpf("status", check=True).stdout
    finally:
        for p in (root, user):
            p.kill()
            p.wait()
