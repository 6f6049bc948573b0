"""Another distribution's bcc, on this machine's kernel: a Debian 13 (trixie)
root filesystem with trixie's own python3-bpfcc and its stock kernel's
headers, in which ksbpf's BPF tests run (chroot, private mount namespace).

The guest of the VM test is Debian 12 (bcc 0.26, as here); this proves the
program also compiles with the bcc Debian 13 ships, against the headers a
Debian 13 user has (its stock kernel's, found through BCC_KERNEL_SOURCE as
the container image does), and that what it compiles decides as the model
says.

The root filesystem is built once (debootstrap from the machine's Debian
mirror, like the VM image) and cached in /var/cache/ksbpf-bcc, keyed by what
goes into it and the month (a point release replaces packages).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import time

from vm import kernels
from vm.image import apt_mirror

CACHE = os.environ.get("KSBPF_BCC_CACHE", "/var/cache/ksbpf-bcc")
SUITE = "trixie"
PACKAGES = ("python3", "python3-bpfcc", "python3-pytest", "libbpf1", "iproute2", "bpftool", "procps")
HEADERS_OF = "debian13"   # the stock kernel whose headers the root filesystem carries
HEADERS_DIR = "/opt/ksbpf-headers"
# the pure-Python dependencies ksbpf imports, taken from the test run's own environment
# (trixie's python3-pyroute2 is older than the 0.9 ksbpf needs)
DEPENDENCIES = ("pyroute2", "click", "prometheus_client")
BUILD_VERSION = "1"

_BUILD = r'''
set -eu
mkdir -p "$CACHE/debs"
debootstrap --variant=minbase --cache-dir="$CACHE/debs" --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
mount -t proc proc "$ROOT/proc"
trap 'umount "$ROOT/proc"' EXIT
chroot "$ROOT" env $PROXY_ENV apt-get -q -o APT::Sandbox::User=root update >/dev/null
mkdir -p "$ROOT/tmp/h"
chroot "$ROOT" sh -c "cd /tmp/h && env $PROXY_ENV apt-get -q -o APT::Sandbox::User=root download \
    linux-headers-$RELEASE linux-headers-${RELEASE%-amd64}-common"
for deb in "$ROOT"/tmp/h/*.deb; do dpkg-deb -x "$deb" "$ROOT/tmp/h/x"; done
mkdir -p "$ROOT$HEADERS_DIR"
cp -a "$ROOT/tmp/h/x/usr/src/linux-headers-${RELEASE%-amd64}-common/." "$ROOT$HEADERS_DIR/"
cp -a "$ROOT/tmp/h/x/usr/src/linux-headers-$RELEASE/." "$ROOT$HEADERS_DIR/"
rm -rf "$ROOT$HEADERS_DIR/scripts" "$ROOT$HEADERS_DIR/tools" "$ROOT/tmp/h" "$ROOT/var/cache/apt/archives/"*.deb
test -e "$ROOT$HEADERS_DIR/include/linux/kconfig.h"
test -e "$ROOT$HEADERS_DIR/include/generated/autoconf.h"
echo "linux-headers-$RELEASE" > "$ROOT$HEADERS_DIR/PACKAGE"
'''

_RUN = r'''
set -eu
mount --bind "$ROOT" "$ROOT"   # the chroot's / a mount point: `ip netns add` makes it a slave
for d in proc sys dev; do mount --rbind "/$d" "$ROOT/$d"; done
mount -t tmpfs tmpfs "$ROOT/tmp"
mkdir -p "$ROOT/tmp/src" "$ROOT/tmp/deps"
mount --bind "$REPO" "$ROOT/tmp/src"
mount -o remount,bind,ro "$ROOT/tmp/src"
mkdir -p "$ROOT/tmp/pkg"   # the package as installed: ebpf/ is the package ksbpf.ebpf
cp -a "$REPO/ksbpf" "$ROOT/tmp/pkg/ksbpf"
cp -a "$REPO/ebpf" "$ROOT/tmp/pkg/ksbpf/ebpf"
ln -s /tmp/src/tests "$ROOT/tmp/pkg/tests"   # beside the package, as in the repository (the fuzzer's saved cases)
for dep in $DEPS; do
    mkdir -p "$ROOT/tmp/deps/$(basename "$dep")"
    mount --bind "$dep" "$ROOT/tmp/deps/$(basename "$dep")"
done
exec chroot "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp LANG=C.UTF-8 \
    PYTHONPATH=/tmp/pkg:/tmp/deps PYTHONDONTWRITEBYTECODE=1 BCC_KERNEL_SOURCE=$HEADERS_DIR \
    KSBPF_CACHE_DIR=/tmp/program-cache "$@"
'''


def headers_release() -> str:
    return kernels.by_name(HEADERS_OF).release


def _key(mirror: str) -> str:
    h = hashlib.sha256()
    for part in (BUILD_VERSION, SUITE, mirror, " ".join(PACKAGES), headers_release(), _BUILD,
                 time.strftime("%Y-%m", time.gmtime())):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _proxy_env() -> str:
    return " ".join(f"{k}={v}" for k, v in os.environ.items()
                    if k.lower() in ("http_proxy", "https_proxy", "no_proxy") and " " not in v)


def ensure_rootfs(log=print, cache: str = CACHE) -> str:
    """The root filesystem (built at most once; concurrent callers wait)."""
    os.makedirs(cache, mode=0o700, exist_ok=True)
    mirror = apt_mirror()
    final = os.path.join(cache, f"rootfs-{_key(mirror)}")
    with open(os.path.join(cache, "lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(os.path.join(final, "root", HEADERS_DIR.lstrip("/"))):
            return os.path.join(final, "root")
        for old in os.listdir(cache):   # other keys: older months, older builds
            if old.startswith("rootfs-"):
                shutil.rmtree(os.path.join(cache, old), ignore_errors=True)
        tmp = final + ".tmp"
        os.makedirs(tmp)
        log(f"distro bcc: building a {SUITE} root filesystem with its bcc and linux-headers-{headers_release()} "
            f"(debootstrap from {mirror}); log: {tmp}/build.log")
        env = {**os.environ, "CACHE": cache, "ROOT": os.path.join(tmp, "root"), "SUITE": SUITE, "MIRROR": mirror,
               "PACKAGES": ",".join(PACKAGES), "RELEASE": headers_release(), "HEADERS_DIR": HEADERS_DIR,
               "PROXY_ENV": _proxy_env()}
        with open(os.path.join(tmp, "build.log"), "w") as out:
            proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", _BUILD],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1800)
        if proc.returncode != 0:
            tail = open(os.path.join(tmp, "build.log")).read()[-3000:]
            raise RuntimeError(f"distro bcc: building the {SUITE} root filesystem failed "
                               f"(exit {proc.returncode}):\n{tail}")
        os.rename(tmp, final)
        return os.path.join(final, "root")


def dependency_dirs() -> list[str]:
    out = []
    for name in DEPENDENCIES:
        module = __import__(name)
        out.append(os.path.dirname(os.path.abspath(module.__file__)))
    return out


def run(root: str, repo: str, *argv: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    """argv inside the root filesystem, the repository read-only at /tmp/src
    and the package as installed at /tmp/pkg, in a private mount namespace
    (every mount goes when it ends)."""
    env = {**os.environ, "ROOT": root, "REPO": os.path.abspath(repo), "HEADERS_DIR": HEADERS_DIR,
           "DEPS": " ".join(dependency_dirs())}
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", _RUN, "run", *argv],
                          env=env, capture_output=True, text=True, timeout=timeout)
