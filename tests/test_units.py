"""The systemd units: valid for systemd, ordered before the network, and
running commands that exist."""

import configparser
import os
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from ksbpf import cli

UNITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy", "systemd")


def unit(name: str) -> configparser.ConfigParser:
    p = configparser.ConfigParser(strict=False, interpolation=None)
    p.optionxform = str
    p.read(os.path.join(UNITS, name))
    return p


def test_early_unit_runs_before_the_network():
    u = unit("ksbpf-early.service")
    assert "network-pre.target" in u["Unit"]["Before"].split()
    assert "network-pre.target" in u["Unit"]["Wants"].split()
    assert u["Unit"]["DefaultDependencies"] == "no"
    assert u["Service"]["Type"] == "oneshot"


def test_daemon_unit_reloads_with_sighup_and_restarts():
    u = unit("ksbpf.service")
    assert "ksbpf-early.service" in u["Unit"]["After"].split()
    assert u["Service"]["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert u["Service"]["Restart"] == "always"


@pytest.mark.parametrize("name", ["ksbpf-early.service", "ksbpf.service"])
def test_exec_start_is_a_real_command(name):
    argv = unit(name)["Service"]["ExecStart"].split()
    assert argv[0] == "/usr/local/bin/ksbpf"
    result = CliRunner().invoke(cli.main, argv[1:] + ["--help"])
    assert result.exit_code == 0, result.output


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", ["ksbpf-early.service", "ksbpf.service"])
def test_systemd_accepts_the_unit(name, tmp_path):
    ksbpf = shutil.which("ksbpf") or os.path.join(os.path.dirname(os.sys.executable), "ksbpf")
    text = open(os.path.join(UNITS, name)).read().replace("/usr/local/bin/ksbpf", ksbpf)
    (tmp_path / name).write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True)
    problems = [ln for ln in proc.stderr.splitlines() if name in ln]
    assert proc.returncode == 0 and not problems, proc.stderr
