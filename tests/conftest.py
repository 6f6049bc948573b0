"""Shared fixtures.  Everything a test creates (namespaces, cgroups, pins,
attachments) has a unique name and is removed by a finalizer, even when the
test fails."""

from __future__ import annotations

import ctypes
import os
import uuid

import pytest

from ksbpf.kernel import cgroup, pins
from ksbpf.lab.namespaces import Lab, TcpEchoServer, UdpEchoServer, new_lab
from ksbpf.scopes import cgroups

from kube_image import ksbpf_image, podman  # noqa: F401  (session fixtures: one image build per run)


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root: run `make test` as root")
        for item in items:
            if "root" in item.keywords or "lab" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def program_cache(tmp_path_factory):
    """Compiled program images go to a directory of the test run (inherited by
    the ksbpf processes the tests start), not to /var/cache/ksbpf."""
    path = str(tmp_path_factory.mktemp("program-cache"))
    old = os.environ.get("KSBPF_CACHE_DIR")
    os.environ["KSBPF_CACHE_DIR"] = path
    yield path
    if old is None:
        os.environ.pop("KSBPF_CACHE_DIR", None)
    else:
        os.environ["KSBPF_CACHE_DIR"] = old


@pytest.fixture(scope="session", autouse=True)
def bpffs_as_found():
    """Tests mount the BPF filesystem through `ksbpf attach`; if it was not
    mounted before the session and nothing is pinned in it, unmount it."""
    was_mounted = pins.is_bpffs(pins.BPFFS)
    yield
    if was_mounted or os.geteuid() != 0 or not pins.is_bpffs(pins.BPFFS):
        return
    if all(name.endswith(".debug") for name in os.listdir(pins.BPFFS)):  # the kernel's own files
        ctypes.CDLL(None, use_errno=True).umount2(pins.BPFFS.encode(), 0)


@pytest.fixture(autouse=True)
def thread_state_as_found():
    """A test leaves the test process's thread as it found it: its CPUs and its
    network namespace.  (A test that pinned the thread to CPU 0 and kept it so
    made every later child -- the VM test's qemu among them -- share one core,
    and the VM test twice as slow.)  Put back, and the test that changed it fails."""
    cpus = os.sched_getaffinity(0)
    net = os.stat("/proc/thread-self/ns/net").st_ino
    yield
    changed = []
    if os.sched_getaffinity(0) != cpus:
        os.sched_setaffinity(0, cpus)
        changed.append(f"its CPU affinity (now {sorted(cpus)} again)")
    if os.stat("/proc/thread-self/ns/net").st_ino != net:
        changed.append("its network namespace")
    if changed:
        pytest.fail("the test left the test process's thread changed: " + "; ".join(changed), pytrace=False)


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:6]


@pytest.fixture
def make_cgroup(tag):
    """make_cgroup(suffix) -> path of a new cgroup v2 directory."""
    made: list[str] = []
    root = cgroup.cgroup2_root()

    def make(suffix: str = "") -> str:
        path = os.path.join(root, f"ksbpf-test-{tag}{suffix}")
        os.mkdir(path)
        made.append(path)
        return path

    yield make
    for path in reversed(made):
        cgroups.remove_cgroup_tree(path)


@pytest.fixture
def lab(request) -> Lab:
    """A client/server namespace pair with a running wireguard-go tunnel."""
    lab = new_lab("ksbpft")
    request.addfinalizer(lab.destroy)
    lab.create()
    lab.tunnel_up()
    return lab


@pytest.fixture
def servers(lab):
    """Echo servers in the server namespace on every address: port by probe kind."""
    with TcpEchoServer(lab) as tcp, UdpEchoServer(lab) as udp:
        yield {"tcp": tcp.port, "udp": udp.port, "icmp": 0}


@pytest.fixture
def run_daemon(tmp_path):
    """run_daemon(scopes) -> DaemonProcess, ready; stopped (never detaching) at teardown."""
    from helpers import DaemonProcess, toml_config
    started: list = []

    def run(scopes: list[dict], wait_ready: bool = True):
        path = tmp_path / "ksbpf.toml"
        path.write_text(toml_config(scopes))
        d = DaemonProcess(str(path))
        d.config_path = str(path)
        started.append(d)
        if wait_ready:
            d.wait_for("ready")
        return d

    yield run
    for d in started:
        d.stop()


_REPORT: list[str] = []


@pytest.fixture
def report_line():
    """report_line(text): a line for the end of the test run's output (leak
    counts of the container tests), shown even when output is captured."""
    return _REPORT.append


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("what reached the far side outside the tunnel (leak counts)")
        for line in _REPORT:
            terminalreporter.write_line(line)
