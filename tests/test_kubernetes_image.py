"""The container image (Dockerfile), built for real with Podman from a
Debian base made here: `debootstrap --variant=minbase` from the machine's
own Debian mirror, then `podman import` (no image registry is reachable).
Then `ksbpf --version` and `ksbpf gate --help` run in it, with no network.

Podman runs with runc and the cgroupfs manager (crun refuses this hybrid
host), inside a private mount namespace (tmpfs on /run and /var/lib, and,
where the cgroup v2 hierarchy is not at /sys/fs/cgroup, cgroup2 mounted
there).  Its storage is a
directory of the test, so no image outlives it.  The build fetches Debian
packages only (`--network=host`: no bridge or NAT chain is created; ksbpf
and its Python dependencies come in as wheels built beforehand), and the
containers run with `--network=none`.  Slow (debootstrap and the package
installs: a few minutes); the steps' times are printed."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from ksbpf.kernel import cgroup

pytestmark = pytest.mark.root
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


def timed(what: str, cmd: list[str], **kw) -> subprocess.CompletedProcess:
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    print(f"{what}: {time.monotonic() - start:.1f} s (exit {proc.returncode})")
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture
def podman(tmp_path):
    """podman(*args) -> CompletedProcess, with a private storage and configuration."""
    if not shutil.which("podman") or not shutil.which("runc"):
        pytest.skip("podman and runc are not installed (make setup installs them)")
    soft_n, hard_n = resource.getrlimit(resource.RLIMIT_NOFILE)
    _, hard_p = resource.getrlimit(resource.RLIMIT_NPROC)
    nofile = min(20000, hard_n) if hard_n != resource.RLIM_INFINITY else 20000
    nproc = min(32768, hard_p) if hard_p != resource.RLIM_INFINITY else 32768
    conf = tmp_path / "containers.conf"
    conf.write_text('[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\nevents_logger = "file"\n'
                    f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
                    'pids_limit = 0\n[network]\nnetwork_backend = "netavark"\n')
    env = dict(os.environ, CONTAINERS_CONF=str(conf), TMPDIR=str(tmp_path))
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
            "podman", "--root", str(tmp_path / "storage"), "--runroot", "/run/podman",
            "--storage-driver", "overlay", "--cgroup-manager", "cgroupfs", "--runtime", "runc",
            "--tmpdir", str(tmp_path / "podman-tmp")]
    links_before = set(os.listdir("/sys/class/net"))

    def run(*args: str, what: str | None = None, **kw) -> subprocess.CompletedProcess:
        return timed(what or f"podman {args[0]}", base + list(args), env=env, **kw)

    yield run
    subprocess.run(base + ["rm", "--all", "--force"], env=env, capture_output=True)
    subprocess.run(base + ["rmi", "--all", "--force"], env=env, capture_output=True)
    holder.kill()   # its mount namespace, with podman's overlay mounts and state, goes with it
    holder.wait()
    assert set(os.listdir("/sys/class/net")) - links_before == set()   # no bridge, no veth left
    shutil.rmtree(tmp_path / "storage", ignore_errors=True)



def test_image_builds_from_a_local_debian_base_and_runs_ksbpf(podman, tmp_path):
    tag = uuid.uuid4().hex[:6]
    mirror, suite = debian_mirror()
    rootfs = tmp_path / "rootfs"
    timed("debootstrap", ["debootstrap", "--variant=minbase", suite, str(rootfs), mirror], timeout=900)
    tarball = tmp_path / "base.tar"
    timed("tar", ["tar", "-C", str(rootfs), "-cf", str(tarball), "."])
    shutil.rmtree(rootfs)
    base = f"localhost/ksbpf-test-base:{tag}"
    podman("import", str(tarball), base)
    tarball.unlink()
    # the build context: the sources and the wheels of ksbpf and its dependencies
    ctx = tmp_path / "context"
    ctx.mkdir()
    for name in ("Dockerfile", "pyproject.toml", "README.md", "ksbpf", "ebpf"):
        src = os.path.join(REPO, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, ctx / name)
    timed("pip wheel", [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                        "--wheel-dir", str(ctx / "build" / "wheels"), str(ctx)], timeout=900)
    image = f"localhost/ksbpf-test:{tag}"
    podman("build", "--network=host", "--build-arg", f"BASE={base}", "-t", image, "-f", str(ctx / "Dockerfile"),
           str(ctx), what="podman build", timeout=1800)
    version = podman("run", "--rm", "--network=none", image, "ksbpf", "--version").stdout
    assert "0.1.0" in version
    helptext = podman("run", "--rm", "--network=none", "--user", "65534:65534", "--cap-drop=all",
                      image, "ksbpf", "gate", "--help").stdout
    assert "--timeout SECONDS" in helptext
    bcc = podman("run", "--rm", "--network=none", image, "/opt/ksbpf/bin/python", "-c",
                 "import bcc, ksbpf.kubernetes.api, kubernetes; print('ok')").stdout
    assert bcc.strip() == "ok"
