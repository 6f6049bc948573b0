"""The guest image of the VM test, built once per set of inputs and cached.

Two layers, so that a code change does not cost a debootstrap:

- base-<key>/root: debootstrap (Debian 12, the mirror of the machine's apt
  sources), every kernel the test boots (tests/vm/kernels.py: exact versions,
  with their modules and initrds; the trixie suites are in the image's apt
  sources only while they are installed), the guest's other software
  (GUEST_PACKAGES: NetworkManager, disabled at boot), vagrant/provision.sh run in a chroot
  of it with the repository copied in, and bcc's headers for each kernel
  (deploy/setup-host.sh).  Keyed by the debootstrap inputs, the kernel pins,
  the scripts that decide the packages (provision.sh, setup-host.sh) and the
  month (so it follows the mirror's updates) -- not by the rest of the
  repository: the image layer runs the provisioning again on top.  ~6 min cold.
- image-<key>/{disk.img,kernels/RELEASE/{vmlinuz,initrd.img}}: the base under an overlay, the
  current repository copied in, provision.sh run again (idempotent: packages
  present, the venv only refreshed), the test's units added, and an ext4 disk
  made from the tree (mkfs.ext4 -d: no loop device).  Keyed by the base and
  every file of the repository.  ~1 min.  The opt-in Ubuntu kernels
  (KSBPF_VM_KERNELS, tests/vm/kernels.py) are unpacked here when selected, with
  an initrd and bcc's headers each, and then key the image too: the base, and
  the default image, stay what they are without them.

Every mount lives in a private mount and PID namespace (unshare) that dies
with the build, so nothing is left mounted or running, even on failure.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

from ksbpf.errors import KsbpfError

from . import kernels

SUITE = "bookworm"
# no kernel: the kernels (tests/vm/kernels.py) are installed after debootstrap, pinned
BASE_PACKAGES = ("systemd-sysv", "udev", "dbus", "kmod", "iproute2", "initramfs-tools",
                 "wireguard-tools", "python3", "python3-venv", "make", "rsync", "ca-certificates", "procps")
# the guest's other software, installed once the kernels are (apt, from the image's suite): present, never
# started at boot -- NetworkManager is disabled (scenario "nm" starts it, managing only its WireGuard connection)
GUEST_PACKAGES = ("network-manager", "openresolv")   # openresolv: the resolvconf of wg-quick's DNS = ("wgquick")
GUEST_DISABLED = ("NetworkManager.service", "NetworkManager-wait-online.service")
BUILD_VERSION = "3"   # change when the build steps below change
BASE_INPUTS = ("vagrant/provision.sh", "deploy/setup-host.sh", "tests/vm/run-parts-dirs.sh")   # decide the packages
HERE = os.path.dirname(os.path.abspath(__file__))
UNITS_DIR = os.path.join(HERE, "units")
DISK_SIZE = "6G"     # sparse
KEEP = 2             # images and bases kept in the cache (newest first)
EXCLUDES = (".git/", ".venv/", "*.egg-info/", "__pycache__/", ".pytest_cache/", "build/")


def cache_root() -> str:
    return os.environ.get("KSBPF_VM_CACHE", "/var/cache/ksbpf-vm")


@dataclass(frozen=True)
class Image:
    """A bootable guest: a raw ext4 disk (used read-only, as the backing file of
    each boot's overlay), the guest's own kernel and initrd."""

    directory: str
    key: str
    built: bool        # built by this call (not found in the cache)
    seconds: float     # how long ensure_image() took

    @property
    def disk(self) -> str:
        return os.path.join(self.directory, "disk.img")

    def kernel(self, release: str) -> str:
        return os.path.join(self.directory, "kernels", release, "vmlinuz")

    def initrd(self, release: str) -> str:
        return os.path.join(self.directory, "kernels", release, "initrd.img")


def apt_mirror(sources: tuple[str, ...] = ("/etc/apt/sources.list", "/etc/apt/sources.list.d")) -> str:
    """The Debian mirror of the machine's apt sources (one-line or deb822 format),
    not the security archive."""
    files = []
    for src in sources:
        files += sorted(glob.glob(os.path.join(src, "*"))) if os.path.isdir(src) else [src]
    for path in files:
        try:
            text = open(path).read()
        except OSError:
            continue
        urls = re.findall(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", text, re.M)
        urls += [u for line in re.findall(r"^\s*URIs:\s*(.+)$", text, re.M) for u in line.split()]
        for url in urls:
            if "security" not in url and url.startswith(("http://", "https://", "file:/")):
                return url.rstrip("/")
    raise KsbpfError("no Debian mirror found in /etc/apt/sources.list(.d)",
                     "add the distribution's mirror to the apt sources (the VM image is built from it)")


def repo_files(repo: str) -> list[str]:
    """The repository's files (tracked and new, not ignored), relative paths."""
    out = subprocess.run(["git", "-C", repo, "ls-files", "-co", "--exclude-standard", "-z"],
                         capture_output=True, check=True).stdout.decode()
    return sorted(f for f in out.split("\0") if f and os.path.isfile(os.path.join(repo, f)))


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def base_key(repo: str, mirror: str) -> str:
    month = time.strftime("%Y-%m", time.gmtime())
    return _digest([BUILD_VERSION.encode(), SUITE.encode(), mirror.encode(), " ".join(BASE_PACKAGES).encode(),
                    " ".join(GUEST_PACKAGES + GUEST_DISABLED).encode(),
                    " ".join(kernels.install_args()).encode(), " ".join(kernels.EXTRA_SUITES).encode(),
                    month.encode(), *(open(os.path.join(repo, f), "rb").read() for f in BASE_INPUTS)])


def image_key(repo: str, base: str, extra: tuple[kernels.Kernel, ...] = ()) -> str:
    parts = [base.encode()]
    for k in extra:   # the opt-in kernels, only when selected (else the key is the default image's)
        parts += [k.package.encode(), k.version.encode(), *(d.sha256.encode() for d in k.debs)]
    for name in repo_files(repo):
        st = os.stat(os.path.join(repo, name))
        parts += [name.encode(), oct(st.st_mode & 0o111).encode(), open(os.path.join(repo, name), "rb").read()]
    return _digest(parts)


def _run_isolated(script: str, env: dict[str, str], log: Callable[[str], None], timeout: float, what: str) -> None:
    """Run a bash script in a private mount and PID namespace: its mounts and
    processes end with it."""
    cmd = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private",
           "bash", "-euo", "pipefail", "-c", script]
    logfile = env["LOG"]
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise KsbpfError(f"VM image: {what} took longer than {timeout:.0f} s (log: {logfile})",
                             "check the mirror and PyPI are reachable; the log says where it stopped") from None
    if rc != 0:
        tail = open(logfile, errors="replace").read()[-3000:]
        log(tail)
        raise KsbpfError(f"VM image: {what} failed with status {rc} (log: {logfile})",
                         "read the log; the last lines are printed above")


def fetch_debs(cache: str, chosen: tuple[kernels.Kernel, ...], log: Callable[[str], None] = print,
               archive: str = kernels.UBUNTU_ARCHIVE) -> list[str]:
    """The package files of the opt-in kernels, in the cache (downloaded once, checked against
    their pinned sha256 every time): their paths."""
    directory = os.path.join(cache, "ubuntu-debs")
    os.makedirs(directory, exist_ok=True)
    paths = []
    for k in chosen:
        for deb in k.debs:
            path = os.path.join(directory, deb.basename)
            if not (os.path.exists(path) and _sha256(path) == deb.sha256):
                url = f"{archive}/{deb.filename}"
                log(f"vm image: downloading {url}")
                try:
                    with urllib.request.urlopen(url, timeout=60) as resp, open(path + ".part", "wb") as out:
                        shutil.copyfileobj(resp, out, 1 << 20)
                except (urllib.error.URLError, OSError) as exc:
                    reason = getattr(exc, "reason", None) or exc
                    raise KsbpfError(f"VM kernel {k.name}: cannot download {url} ({reason})",
                                     f"leave {k.name} out of KSBPF_VM_KERNELS where {archive} is unreachable, "
                                     "or update its pin in tests/vm/kernels.py if the file is gone") from None
                got = _sha256(path + ".part")
                if got != deb.sha256:
                    os.unlink(path + ".part")
                    raise KsbpfError(f"VM kernel {k.name}: {url} has sha256 {got}, not the pinned {deb.sha256}",
                                     "check the archive (or a proxy in between); re-pin in tests/vm/kernels.py "
                                     "only from the pocket's Packages index")
                os.replace(path + ".part", path)
            paths.append(path)
    return paths


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# Pseudo file systems and caches for a chroot of $ROOT; undone before the disk is made.
_CHROOT_MOUNTS = r'''
mount -t proc proc "$ROOT/proc"
mount --bind /dev "$ROOT/dev"
mount -t devpts -o newinstance devpts "$ROOT/dev/pts"
mount -t tmpfs tmpfs "$ROOT/run"
cp "$HOST_CA" "$ROOT/run/host-ca.crt"   # the machine's trust for the registries (pip), not kept in the image
mkdir -p "$ROOT/root/.cache/pip" "$CACHE/pip" "$CACHE/apt/partial"
mount --bind "$CACHE/pip" "$ROOT/root/.cache/pip"
mount --bind "$CACHE/apt" "$ROOT/var/cache/apt/archives"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
'''
_CHROOT_UNMOUNT = r'''
for m in var/cache/apt/archives root/.cache/pip run dev/pts dev proc; do umount "$ROOT/$m"; done
'''
# The repository copied in as the Vagrantfile's synced folder, then the Vagrantfile's provisioning.
_PROVISION = r'''
mkdir -p "$ROOT/opt/ksbpf-src"
rsync -a --delete $EXCLUDES "$REPO/" "$ROOT/opt/ksbpf-src/"
chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 KSBPF_KERNEL_RELEASE=$HEADERS_RELEASE $PROXY_ENV \
    PIP_CERT=/run/host-ca.crt SSL_CERT_FILE=/run/host-ca.crt REQUESTS_CA_BUNDLE=/run/host-ca.crt \
    /bin/bash /opt/ksbpf-src/vagrant/provision.sh /opt/ksbpf-src
'''
# The pinned kernels, from the image's suite and the extra suites (lowest priority: only what is
# named is taken from them), then the extra suites are removed again.  Debian 12's run-parts
# gets a wrapper for the newer kernels' hook directories (see run-parts-dirs.sh).
_KERNELS = r'''
inchroot() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive $PROXY_ENV "$@"; }
list="$ROOT/etc/apt/sources.list.d/ksbpf-vm-kernels.list"
prefs="$ROOT/etc/apt/preferences.d/ksbpf-vm-kernels"
: > "$list"; : > "$prefs"
for s in $EXTRA_SUITES; do
    echo "deb $MIRROR $s main" >> "$list"
    printf 'Package: *\nPin: release n=%s\nPin-Priority: 1\n\n' "$s" >> "$prefs"
done
install -m 0755 "$REPO/tests/vm/run-parts-dirs.sh" "$ROOT/usr/local/sbin/run-parts"
echo 'DPkg::Path "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin";' > "$ROOT/etc/apt/apt.conf.d/50ksbpf-run-parts"
inchroot apt-get update -q >/dev/null
for pin in $KERNEL_PINS; do
    case $pin in *=*) ;; *) continue ;; esac
    if ! inchroot apt-cache show "$pin" >/dev/null 2>&1; then
        echo "vm image: the pinned package ${pin%%=*} version ${pin#*=} is not on the mirror $MIRROR (suites $SUITE $EXTRA_SUITES) any more; pin another in tests/vm/kernels.py (see: apt-cache policy ${pin%%=*})"
        exit 3
    fi
done
inchroot apt-get install -y -q --no-install-recommends $KERNEL_PINS
rm -f "$list" "$prefs"
inchroot apt-get update -q >/dev/null
for rel in $KERNEL_RELEASES; do
    [ -e "$ROOT/boot/vmlinuz-$rel" ] && [ -e "$ROOT/boot/initrd.img-$rel" ] && [ -d "$ROOT/lib/modules/$rel" ] \
        || { echo "vm image: kernel $rel was not installed completely (vmlinuz, initrd, modules)"; exit 3; }
done
'''
# The opt-in kernels (Ubuntu's) in the image layer: their packages unpacked (through a staging
# directory: tar would replace the usr-merged /lib symlink with a directory), their modules
# decompressed if the guest's kmod cannot read zstd, depmod, an initrd by the guest's own
# initramfs-tools, and bcc's headers as setup-host.sh links them for a kernel without a package.
_UBUNTU = r'''
if [ -n "$UBUNTU_RELEASES" ]; then
    inchroot() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive $PROXY_ENV "$@"; }
    for deb in $UBUNTU_DEBS; do
        rm -rf "$WORK/deb"; dpkg-deb -x "$deb" "$WORK/deb"
        for d in "$WORK"/deb/*/; do d=${d%/}; mkdir -p "$ROOT/${d##*/}"; cp -a "$d/." "$ROOT/${d##*/}/"; done
    done
    rm -rf "$WORK/deb"
    zstd_ok=$(inchroot kmod --version | grep -c '+ZSTD' || true)
    for rel in $UBUNTU_RELEASES; do
        if [ "$zstd_ok" = 0 ] && [ -n "$(find "$ROOT/lib/modules/$rel" -name '*.ko.zst' -print -quit)" ]; then
            echo "vm image: the guest's kmod has no zstd: decompressing $rel's modules"
            find "$ROOT/lib/modules/$rel" -name '*.ko.zst' -exec zstd -q -d --rm {} +
        fi
        inchroot depmod -a "$rel"
        inchroot update-initramfs -c -k "$rel"
        inchroot env KSBPF_KERNEL_RELEASE=$rel KSBPF_SETUP_VM_TOOLS=no PIP_CERT=/run/host-ca.crt \
            SSL_CERT_FILE=/run/host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
            bash /opt/ksbpf/deploy/setup-host.sh /opt/ksbpf/.venv | grep -i "headers" || true
        [ -e "$ROOT/boot/vmlinuz-$rel" ] && [ -e "$ROOT/boot/initrd.img-$rel" ] \
            && inchroot test -e "/lib/modules/$rel/build/include/generated/autoconf.h" \
            || { echo "vm image: kernel $rel was not installed completely (vmlinuz, initrd, headers for bcc)"; exit 3; }
    done
fi
'''
# The guest's other software (GUEST_PACKAGES), disabled at boot (GUEST_DISABLED): the scenarios that
# use it start it.
_GUEST_PACKAGES = r'''
inchroot apt-get install -y -q --no-install-recommends $GUEST_PACKAGES
inchroot systemctl disable $GUEST_DISABLED
'''
# bcc's headers for each kernel, as a user gets them (deploy/setup-host.sh: the kernel's own, or the
# distribution's generic ones linked).
_HEADERS = r'''
for rel in $KERNEL_RELEASES; do
    inchroot env KSBPF_KERNEL_RELEASE=$rel KSBPF_SETUP_VM_TOOLS=no PIP_CERT=/run/host-ca.crt \
        SSL_CERT_FILE=/run/host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
        bash /opt/ksbpf/deploy/setup-host.sh /opt/ksbpf/.venv | grep -i "headers" || true
    inchroot test -e "/lib/modules/$rel/build/include/generated/autoconf.h" \
        || { echo "vm image: no kernel headers for bcc at /lib/modules/$rel/build"; exit 3; }
done
'''
_BASE = r'''
mkdir -p "$CACHE/debs"
if [ ! -e "$ROOT.debootstrapped" ]; then   # a build that failed later resumes after debootstrap
    rm -rf "$ROOT"
    debootstrap --variant=minbase --cache-dir="$CACHE/debs" --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR"
    touch "$ROOT.debootstrapped"
fi
echo ksbpf-vm > "$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 ksbpf-vm\n::1 localhost\n' > "$ROOT/etc/hosts"
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' > "$ROOT/etc/fstab"
chroot "$ROOT" passwd -d root >/dev/null   # the serial console, for debugging
''' + _CHROOT_MOUNTS + _KERNELS + _GUEST_PACKAGES + _PROVISION + _HEADERS + _CHROOT_UNMOUNT
_IMAGE = r'''
mkdir -p "$WORK/upper" "$WORK/ovl" "$WORK/root"
mount -t overlay overlay -o "lowerdir=$BASE,upperdir=$WORK/upper,workdir=$WORK/ovl" "$WORK/root"
ROOT="$WORK/root"
''' + _CHROOT_MOUNTS + _PROVISION + _UBUNTU + r'''
cp "$UNITS"/*.service "$ROOT/etc/systemd/system/"
chroot "$ROOT" systemctl enable $(cd "$UNITS" && ls *.service) >/dev/null 2>&1
''' + _CHROOT_UNMOUNT + r'''
rm -f "$ROOT/etc/resolv.conf"
for rel in $KERNEL_RELEASES; do
    mkdir -p "$WORK/kernels/$rel"
    cp -L "$ROOT/boot/vmlinuz-$rel" "$WORK/kernels/$rel/vmlinuz"
    cp -L "$ROOT/boot/initrd.img-$rel" "$WORK/kernels/$rel/initrd.img"
done
mkfs.ext4 -q -F -L ksbpf-vm -d "$ROOT" "$WORK/disk.img" "$DISK_SIZE"
umount "$ROOT"
rm -rf "$WORK/upper" "$WORK/ovl" "$WORK/root"
'''


def _prune(cache: str, prefix: str, keep: set[str]) -> None:
    """Remove unfinished builds and all but the newest KEEP finished ones."""
    for d in glob.glob(os.path.join(cache, f"{prefix}-*.tmp")):
        if d not in keep:
            shutil.rmtree(d, ignore_errors=True)
    done = sorted((d for d in glob.glob(os.path.join(cache, f"{prefix}-*")) if not d.endswith(".tmp")),
                  key=os.path.getmtime, reverse=True)
    for d in done[KEEP:]:
        if d not in keep:
            shutil.rmtree(d, ignore_errors=True)


def ensure_image(repo: str, log: Callable[[str], None] = print, cache: str | None = None,
                 chosen: tuple[kernels.Kernel, ...] = ()) -> Image:
    """The image for the repository as it is now, with the opt-in kernels among `chosen`: from
    the cache, or built (at most once: concurrent callers wait on a lock and then find it)."""
    start = time.monotonic()
    cache = cache or cache_root()
    os.makedirs(cache, mode=0o700, exist_ok=True)
    mirror = apt_mirror()
    extra = kernels.ubuntu(chosen)
    debs = fetch_debs(cache, extra, log)
    bkey = base_key(repo, mirror)
    ikey = image_key(repo, bkey, extra)
    base_dir = os.path.join(cache, f"base-{bkey}")
    image_dir = os.path.join(cache, f"image-{ikey}")
    with open(os.path.join(cache, "lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(image_dir, "disk.img")):
            os.utime(image_dir)
            return Image(image_dir, ikey, False, time.monotonic() - start)
        _prune(cache, "image", set())
        _prune(cache, "base", {base_dir, base_dir + ".tmp"})
        env = {"CACHE": cache, "REPO": os.path.abspath(repo), "SUITE": SUITE, "MIRROR": mirror,
               "PACKAGES": ",".join(BASE_PACKAGES), "UNITS": UNITS_DIR, "DISK_SIZE": DISK_SIZE,
               "GUEST_PACKAGES": " ".join(GUEST_PACKAGES), "GUEST_DISABLED": " ".join(GUEST_DISABLED),
               "KERNEL_PINS": " ".join(kernels.install_args()), "EXTRA_SUITES": " ".join(kernels.EXTRA_SUITES),
               "KERNEL_RELEASES": " ".join(k.release for k in kernels.KERNELS),
               "UBUNTU_RELEASES": " ".join(k.release for k in extra), "UBUNTU_DEBS": " ".join(debs),
               "HEADERS_RELEASE": kernels.by_name(kernels.OWN_HEADERS).release,
               "EXCLUDES": " ".join(f"--exclude={e}" for e in EXCLUDES),
               "HOST_CA": os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt",
               "PROXY_ENV": " ".join(f"{k}={v}" for k, v in os.environ.items()
                                     if k.lower() in ("http_proxy", "https_proxy", "no_proxy") and " " not in v)}
        if not os.path.isdir(base_dir):
            t = time.monotonic()
            tmp = base_dir + ".tmp"
            os.makedirs(tmp, exist_ok=True)
            log(f"vm image: building the base layer (debootstrap from {mirror}, then vagrant/provision.sh "
                f"in a chroot); log: {tmp}.log")
            _run_isolated(_BASE, {**env, "ROOT": os.path.join(tmp, "root"), "LOG": tmp + ".log"}, log,
                          1800, "building the base layer")
            os.replace(tmp + ".log", os.path.join(tmp, "build.log"))
            os.unlink(os.path.join(tmp, "root.debootstrapped"))
            os.rename(tmp, base_dir)
            log(f"vm image: base layer built in {time.monotonic() - t:.0f} s")
        os.utime(base_dir)
        t = time.monotonic()
        tmp = image_dir + ".tmp"
        os.makedirs(tmp)
        log(f"vm image: copying the repository in, provisioning and making the disk; log: {tmp}.log")
        _run_isolated(_IMAGE, {**env, "KERNEL_RELEASES": " ".join(k.release for k in kernels.KERNELS + extra),
                               "BASE": os.path.join(base_dir, "root"), "WORK": tmp, "LOG": tmp + ".log"},
                      log, 900, "provisioning the image")
        os.replace(tmp + ".log", os.path.join(tmp, "build.log"))
        os.rename(tmp, image_dir)
        log(f"vm image: image {ikey} made in {time.monotonic() - t:.0f} s")
        _prune(cache, "image", {image_dir})
        _prune(cache, "base", {base_dir})
        return Image(image_dir, ikey, True, time.monotonic() - start)
