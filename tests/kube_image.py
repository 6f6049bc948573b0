"""The ksbpf container image, built once per test session for the tests that
need it (test_kubernetes_image.py, test_kubernetes_deployed.py): Podman with
runc and the cgroupfs manager (crun refuses hybrid hosts), inside a private
mount namespace (tmpfs on /run and /var/lib, and cgroup2 at /sys/fs/cgroup
where the v2 hierarchy is elsewhere), its storage in a directory of the
session, so no image outlives it.  The base is `debootstrap --variant=minbase`
from the machine's own Debian mirror, imported (no image registry is
reachable); the build fetches Debian packages only (`--network=host`: no
bridge or NAT chain), ksbpf and its Python dependencies come in as wheels."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pytest

from ksbpf.kernel import cgroup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def debian_mirror() -> tuple[str, str]:
    """(mirror URL, suite) of the machine's own apt sources."""
    suite = dict(line.rstrip().split("=", 1) for line in open("/etc/os-release") if "=" in line)["VERSION_CODENAME"]
    for path in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"):
        if os.path.exists(path):
            for line in open(path):
                words = line.split()
                if words[:1] == ["URIs:"] and not words[1].rstrip("/").endswith("-security"):
                    return words[1], suite
                if words[:1] == ["deb"] and "security" not in words[1]:
                    return words[1], suite
    pytest.skip("no Debian mirror in the apt sources: this test needs a Debian host")


def timed(what: str, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    print(f"{what}: {time.monotonic() - start:.1f} s (exit {proc.returncode})")
    if check:
        assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@dataclass
class Podman:
    holder: subprocess.Popen     # owns the private mount namespace
    base: list[str]              # nsenter ... podman --root ... (every podman command)
    env: dict

    def __call__(self, *args: str, what: str | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
        self._no_network(args)
        return timed(what or f"podman {args[0]}", self.base + list(args), check=check, env=self.env, **kw)

    def argv(self, *args: str) -> list[str]:
        self._no_network(args)
        return self.base + list(args)

    @staticmethod
    def _no_network(args) -> None:
        """Containers and builds never get a network of their own (no bridge, veth or NAT chain)."""
        if args and args[0] in ("run", "build"):
            nets = [a for a in args if a.startswith("--network=")]
            assert nets and all(a in ("--network=host", "--network=none") or a.startswith("--network=ns:/proc/")
                                for a in nets), args   # ns: joins an existing (pod) namespace

    def sh(self, script: str) -> subprocess.CompletedProcess:
        """A shell command in the runtime's mount namespace (where its mounts are)."""
        return subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m", "sh", "-c", script],
                              capture_output=True, text=True)

    @property
    def cgroup2(self) -> str:
        """Where the host's cgroup v2 hierarchy is, seen from the runtime's mount namespace."""
        return "/sys/fs/cgroup"

    def path_of(self, host_cgroup: str) -> str:
        """A cgroup's host path as the runtime's mount namespace sees it."""
        return os.path.join(self.cgroup2, os.path.relpath(host_cgroup, cgroup.cgroup2_root()))


@pytest.fixture(scope="session")
def podman(tmp_path_factory):
    if not shutil.which("podman") or not shutil.which("runc"):
        pytest.skip("podman and runc are not installed (make setup installs them)")
    tmp = tmp_path_factory.mktemp("podman")
    _soft_n, hard_n = resource.getrlimit(resource.RLIMIT_NOFILE)
    _, hard_p = resource.getrlimit(resource.RLIMIT_NPROC)
    nofile = min(20000, hard_n) if hard_n != resource.RLIM_INFINITY else 20000
    nproc = min(32768, hard_p) if hard_p != resource.RLIM_INFINITY else 32768
    conf = tmp / "containers.conf"
    conf.write_text('[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\nevents_logger = "file"\n'
                    f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
                    'pids_limit = 0\n[network]\nnetwork_backend = "netavark"\n')
    env = dict(os.environ, CONTAINERS_CONF=str(conf), TMPDIR=str(tmp))
    # A private mount namespace: podman's state that no option moves (/run/containers, /run/runc,
    # /var/lib/containers/cache) lands on tmpfs mounts that vanish with it, and on hybrid hosts
    # cgroup2 is mounted at /sys/fs/cgroup there.
    setup = "mount -t tmpfs none /run && mount -t tmpfs none /var/lib"
    if cgroup.cgroup2_root() != "/sys/fs/cgroup":
        setup += " && mount -t cgroup2 none /sys/fs/cgroup"
    holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               f"{setup} && echo ready && exec sleep infinity"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "ready"
    base = ["nsenter", "-t", str(holder.pid), "-m",
            "podman", "--root", str(tmp / "storage"), "--runroot", "/run/podman",
            "--storage-driver", "overlay", "--cgroup-manager", "cgroupfs", "--runtime", "runc",
            "--tmpdir", str(tmp / "podman-tmp")]
    yield Podman(holder, base, env)
    subprocess.run(base + ["rm", "--all", "--force"], env=env, capture_output=True)
    subprocess.run(base + ["rmi", "--all", "--force"], env=env, capture_output=True)
    holder.kill()   # its mount namespace, with podman's overlay mounts and state, goes with it
    holder.wait()
    # No network is ever made: every build is --network=host, every container --network=host or none
    # (no bridge, veth or NAT chain).  The host's link list is not compared: on a shared machine
    # other sessions add links while a run of several minutes goes on.
    shutil.rmtree(tmp / "storage", ignore_errors=True)


@pytest.fixture(scope="session")
def ksbpf_image(podman, tmp_path_factory) -> str:
    """`make image`'s Dockerfile built from a local Debian base: the image's name."""
    tmp = tmp_path_factory.mktemp("image")
    tag = uuid.uuid4().hex[:6]
    mirror, suite = debian_mirror()
    rootfs = tmp / "rootfs"
    timed("debootstrap", ["debootstrap", "--variant=minbase", suite, str(rootfs), mirror], timeout=900)
    tarball = tmp / "base.tar"
    timed("tar", ["tar", "-C", str(rootfs), "-cf", str(tarball), "."])
    shutil.rmtree(rootfs)
    base = f"localhost/ksbpf-test-base:{tag}"
    podman("import", str(tarball), base)
    tarball.unlink()
    # the build context: the sources and the wheels of ksbpf and its dependencies
    ctx = tmp / "context"
    ctx.mkdir()
    for name in ("Dockerfile", "pyproject.toml", "README.md", "ksbpf", "ebpf"):
        src = os.path.join(REPO, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, ctx / name)
    timed("pip wheel", [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                        "--wheel-dir", str(ctx / "build" / "wheels"), str(ctx)], timeout=900)
    image = f"localhost/ksbpf-test:{tag}"
    podman("build", "--network=host", "--build-arg", f"BASE={base}", "-t", image, "-f", str(ctx / "Dockerfile"),
           str(ctx), what="podman build", timeout=1800)
    shutil.rmtree(ctx)
    return image
