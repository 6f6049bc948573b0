"""Bad input: one line naming the problem and the fix, a non-zero exit, and
no change to the system (no pins, no attachment)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from helpers import KSBPF, ksbpf

from ksbpf import cli
from ksbpf.kernel import bpf, cgroup, features, libbpf, pins, preflight
from ksbpf.scopes import cgroups

pytestmark = pytest.mark.root


def system_state(cg_path: str) -> tuple:
    """What an attach of this cgroup would change: its pin directory (and a
    staging one) and the programs attached to it."""
    fd = os.open(cg_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        progs = tuple(libbpf.prog_query(fd, libbpf.BPF_CGROUP_INET_EGRESS))
    finally:
        os.close(fd)
    pin_dir = pins.scope_dir(cgroup.cgroup_id(cg_path))
    return os.path.exists(pin_dir), os.path.exists(pin_dir + "_new"), progs


def assert_one_line_error(proc, *needles: str):
    assert proc.returncode != 0, proc
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ksbpf: error: ")
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.fixture
def cg(make_cgroup):
    return make_cgroup()


def v1_cgroup_dir() -> str | None:
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[2] == "cgroup":
                return fields[1]
    return None


def test_missing_cgroup_path(cg):
    before = system_state(cg)
    proc = ksbpf("attach", "--cgroup", cg + "-missing", "--tunnel", "wg0")
    assert_one_line_error(proc, "does not exist", "mkdir")
    assert system_state(cg) == before


def test_plain_file_is_not_a_cgroup(cg, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    before = system_state(cg)
    assert_one_line_error(ksbpf("attach", "--cgroup", str(f), "--tunnel", "wg0"), "not a directory")
    assert system_state(cg) == before


def test_other_directory_is_not_a_cgroup(cg, tmp_path):
    before = system_state(cg)
    assert_one_line_error(ksbpf("attach", "--cgroup", str(tmp_path), "--tunnel", "wg0"),
                          "not a cgroup v2 directory", cgroup.cgroup2_root())
    assert system_state(cg) == before


def test_cgroup_v1_path_is_refused(cg):
    v1 = v1_cgroup_dir()
    if v1 is None:
        pytest.skip("no cgroup v1 hierarchy mounted on this machine")
    before = system_state(cg)
    assert_one_line_error(ksbpf("attach", "--cgroup", v1, "--tunnel", "wg0"), "not a cgroup v2 directory")
    assert system_state(cg) == before


@pytest.mark.parametrize("endpoint,says", [
    ("203.0.113.999:51820/udp", "not an IP address"),
    ("vpn.example.com:51820/udp", "not an IP address"),
    ("203.0.113.5:0/udp", "1-65535"),
    ("203.0.113.5:65536/udp", "1-65535"),
    ("203.0.113.5:51820/sctp", "unknown protocol"),
    ("203.0.113.5/udp", "no port"),
    ("2001:db8::5:51820/udp", "brackets"),
    ("auto:run/openvpn/client.sock", "not an absolute socket path"),
])
def test_malformed_endpoint(cg, endpoint, says):
    before = system_state(cg)
    assert_one_line_error(ksbpf("attach", "--cgroup", cg, "--tunnel", "wg0", "--endpoint", endpoint), says)
    assert system_state(cg) == before


@pytest.mark.parametrize("args,says", [
    (("--endpoint", "*:51820/udp"), "names every address"),
    (("--endpoint", "*:51820/udp", "--vpn-mark", "0"), "is zero"),
    (("--vpn-mark", "0x10/0x1"), "outside its mask"),
    (("--vpn-mark", "fw"), "not a number"),
    (("--vpn-cgroup", "openvpn.service"), "absolute path"),
    (("--vpn-cgroup", "/sys/fs/cgroup/ksbpf-no-such-vpn-cgroup"), "does not exist"),
])
def test_vpn_client_errors(cg, args, says):
    """A wildcard endpoint without the VPN client's identity, a bad mark or vpn cgroup: one line, nothing applied."""
    before = system_state(cg)
    assert_one_line_error(ksbpf("attach", "--cgroup", cg, "--tunnel", "wg0", *args), says)
    assert system_state(cg) == before


def test_unknown_netns(cg, tag):
    before = system_state(cg)
    assert_one_line_error(ksbpf("attach", "--cgroup", cg, "--tunnel", "wg0", "--netns", f"nope-{tag}"),
                          "does not exist", "ip netns list")
    assert system_state(cg) == before


def test_netns_path_that_is_not_a_namespace(cg, tmp_path):
    f = tmp_path / "ns"
    f.write_text("")
    before = system_state(cg)
    assert_one_line_error(ksbpf("attach", "--cgroup", cg, "--tunnel", "wg0", "--netns", str(f)), "not a namespace")
    assert system_state(cg) == before


def test_lan_dns_without_lan(cg):
    before = system_state(cg)
    assert_one_line_error(ksbpf("attach", "--cgroup", cg, "--tunnel", "wg0", "--allow-lan-dns"), "--allow-lan")
    assert system_state(cg) == before


def test_non_root_caller(cg):
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is not installed")
    before = system_state(cg)
    # uid "nobody"; CAP_DAC_READ_SEARCH only so that it can read this checkout wherever it is
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", *KSBPF,
                           "attach", "--cgroup", cg, "--tunnel", "wg0"],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert_one_line_error(proc, "must run as root", "sudo")
    assert system_state(cg) == before


def test_exec_refuses_unprotected_cgroup(cg):
    assert_one_line_error(ksbpf("exec", "--cgroup", cg, "--", "true"), "not protected", "ksbpf attach")
    with open(os.path.join(cg, "cgroup.procs")) as f:
        assert f.read().strip() == ""


def test_deny_tun_goes_with_a_cgroup_scope():
    proc = ksbpf("attach", "--node", "--netns", "ksbpf-no-such-netns", "--tunnel", "wg0", "--deny-tun")
    assert proc.returncode == 2 and "--deny-tun goes with --cgroup" in proc.stderr


def test_node_dns_with_allow_lan_dns_is_refused():
    """--dns in node mode: --allow-lan-dns would open DNS to LAN resolvers, which --dns forbids; one line,
    before anything is looked up or attached."""
    assert_one_line_error(ksbpf("attach", "--node", "--netns", "ksbpf-no-such-netns", "--tunnel", "wg0",
                                "--allow-lan", "--allow-lan-dns", "--dns", "10.64.0.1"), "contradict")


def test_detach_needs_exactly_one_target():
    proc = ksbpf("detach")
    assert proc.returncode == 2 and "exactly one of --cgroup PATH, --node or --all" in proc.stderr
    proc = ksbpf("detach", "--all", "--cgroup", "/x")
    assert proc.returncode == 2


# The host's kernel, bcc and headers are fine here, so their absence is
# simulated where ksbpf looks for them; everything else is real.
def run_attach_in_process(cg_path: str):
    return CliRunner().invoke(cli.main, ["attach", "--cgroup", cg_path, "--tunnel", "wg0"])


def assert_in_process_error(result, *needles: str):
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    out = result.stderr.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("ksbpf: error: "), result.stderr
    for n in needles:
        assert n in out[0]


def test_bcc_missing(cg, monkeypatch, tmp_path):
    monkeypatch.setenv("KSBPF_CACHE_DIR", str(tmp_path))  # no compiled image to fall back on
    monkeypatch.setattr(preflight, "BCC_MODULE", "ksbpf_no_such_bcc_module")
    before = system_state(cg)
    assert_in_process_error(run_attach_in_process(cg), "python3-bpfcc", "make setup")
    assert system_state(cg) == before


def test_kernel_headers_missing(cg, monkeypatch, tmp_path):
    monkeypatch.setenv("KSBPF_CACHE_DIR", str(tmp_path / "cache"))  # no compiled image to fall back on
    monkeypatch.setattr(preflight, "MODULES_DIR", str(tmp_path))
    monkeypatch.setattr(preflight, "KHEADERS", str(tmp_path / "kheaders.tar.xz"))
    before = system_state(cg)
    assert_in_process_error(run_attach_in_process(cg), "kernel headers", "make setup")
    assert system_state(cg) == before


@pytest.fixture
def probes():
    """Kernel feature probes asked afresh (they are cached per process), and
    again after the test, whose monkeypatches they must not remember."""
    features.probe.cache_clear()
    yield
    features.probe.cache_clear()


def test_kernel_without_cgroup_bpf(cg, monkeypatch, probes):
    monkeypatch.setattr(libbpf, "probe_prog_type", lambda _t: False)
    before = system_state(cg)
    assert_in_process_error(run_attach_in_process(cg), "cannot load cgroup_skb", "CONFIG_CGROUP_BPF", "--node")
    assert system_state(cg) == before


def test_kernel_without_netns_cookie_or_socket_storage(cg, monkeypatch, probes):
    """Neither way of telling a socket's namespace: one line naming both, and node mode."""
    monkeypatch.delenv(features.NETNS_ENV, raising=False)
    monkeypatch.setattr(libbpf, "probe_helper", lambda _t, _h: False)
    before = system_state(cg)
    assert_in_process_error(run_attach_in_process(cg), "bpf_get_netns_cookie", "Linux 6.17", "socket storage",
                            "Linux 5.12", "ksbpf attach --node")
    assert system_state(cg) == before


def test_kernel_without_netns_cookie_uses_socket_storage(cg, monkeypatch, probes, tmp_path):
    """A kernel whose cgroup_skb programs cannot ask bpf_get_netns_cookie (< 6.17): the scope is
    attached with its sock_create program recording each socket's namespace."""
    monkeypatch.delenv(features.NETNS_ENV, raising=False)
    real = libbpf.probe_helper
    monkeypatch.setattr(libbpf, "probe_helper", lambda t, h: real(t, h) and not (
        t == libbpf.BPF_PROG_TYPE_CGROUP_SKB and h == libbpf.BPF_FUNC_get_netns_cookie))
    result = run_attach_in_process(cg)
    assert result.exit_code == 0, result.output + result.stderr
    assert features.netns_identity() == features.NETNS_STORAGE
    fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert cgroups.ksbpf_programs(fd) and cgroups._sock_programs(fd)
    finally:
        os.close(fd)
    assert os.path.exists(os.path.join(pins.scope_dir(cgroup.cgroup_id(cg)), "sk_netns"))


def test_forcing_the_helper_on_a_kernel_without_it(cg, monkeypatch, probes):
    monkeypatch.setenv(features.NETNS_ENV, features.NETNS_HELPER)
    real = libbpf.probe_helper
    monkeypatch.setattr(libbpf, "probe_helper", lambda t, h: real(t, h) and not (
        t == libbpf.BPF_PROG_TYPE_CGROUP_SKB and h == libbpf.BPF_FUNC_get_netns_cookie))
    before = system_state(cg)
    assert_in_process_error(run_attach_in_process(cg), f"{features.NETNS_ENV}=helper", "Linux 6.17")
    assert system_state(cg) == before


def test_a_cached_image_needs_no_compiler(cg, monkeypatch):
    """Once compiled, attaching needs neither bcc nor kernel headers."""
    assert run_attach_in_process(cg).exit_code == 0   # compiles (or finds) the image
    real_identity = bpf._compiler_identity()           # the cache key names the compiler
    monkeypatch.setattr(preflight, "BCC_MODULE", "ksbpf_no_such_bcc_module")
    monkeypatch.setattr(preflight, "MODULES_DIR", "/nonexistent")
    monkeypatch.setattr(bpf, "_compiler_identity", lambda: real_identity)
    result = run_attach_in_process(cg)
    assert result.exit_code == 0, result.output + result.stderr


def test_cgroup2_found_from_proc_mounts(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup2 /custom/place\\040x cgroup2 rw 0 0\nproc /proc proc rw 0 0\n")
    assert cgroup.cgroup2_mounts(str(mounts)) == ["/custom/place x"]
    mounts.write_text("proc /proc proc rw 0 0\n")
    with pytest.raises(Exception, match="no cgroup v2 hierarchy is mounted"):
        cgroup.cgroup2_root(str(mounts))


def test_detach_is_idempotent(cg):
    proc = ksbpf("detach", "--cgroup", cg)
    assert proc.returncode == 0 and "nothing to remove" in proc.stdout
    proc = ksbpf("detach", "--cgroup", cg + "-never-existed")
    assert proc.returncode == 0
