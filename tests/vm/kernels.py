"""The kernels the VM test boots: THE one place where they are pinned.

One guest image holds all of them (modules, initrd, headers for bcc); qemu's
direct kernel boot makes the kernel a parameter of each boot.  Exact package
names and versions, from the Debian mirror of the machine's apt sources, so
that a run does not boot whatever a suite's newest kernel is that day:

- Debian 12's stock kernel: bookworm's linux-image-amd64 (6.1).
- Debian 13's stock kernel: trixie's linux-image-amd64 (6.12).
- The newest: trixie-backports, pinned to a version that boots reliably under
  qemu's software emulation.  On 2026-12-06 trixie-backports' newest, 7.3.4,
  panicked before userspace 1 boot in 4 (int3 in sched_clock_cpu); 7.2.12 is
  what this test measured instead (see the README's "Kernels" table).

Pinning means a version can disappear from the mirror (a point release
replaces a suite's kernel): the image build then stops with one line that
names the pin to update (`apt-cache policy PACKAGE` with the suite added).

Opt-in (KSBPF_VM_KERNELS, `make vm-test-ubuntu`): Ubuntu's GA kernels, 22.04's
5.15 and 24.04's 6.8 -- the kernels people have.  They come from
archive.ubuntu.com, which CI (no network but the package registries) cannot
reach, so the default run boots the Debian kernels only and its image is the
same.  Their packages (the unsigned image and the modules; wireguard.ko,
veth.ko and virtio's drivers are all in linux-modules, no -extra needed) are
pinned by file and sha256 from the Packages index of jammy-updates and
noble-updates, downloaded into the cache, checked, and unpacked into the
image layer (dpkg -x: they depend on Ubuntu's linux-base, which a Debian
userland does not need), with an initrd made by the guest's own
initramfs-tools.  They boot with Ubuntu's stock command line: no `lsm=`, so
the BPF LSM is not active (Ubuntu's CONFIG_LSM lacks `bpf`).  To update a pin:
the Packages index of the pocket, e.g.
http://archive.ubuntu.com/ubuntu/dists/jammy-updates/main/binary-amd64/Packages.xz,
the linux-image-unsigned-RELEASE and linux-modules-RELEASE records (Filename, SHA256).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ksbpf.errors import KsbpfError

UBUNTU_ARCHIVE = "http://archive.ubuntu.com/ubuntu"   # http: every file is checked against its pinned sha256


@dataclass(frozen=True)
class Deb:
    """One package file of an Ubuntu kernel, pinned by its path in the archive and its sha256."""
    filename: str    # the Packages index's Filename: (pool/main/l/linux/...deb)
    sha256: str

    @property
    def basename(self) -> str:
        return os.path.basename(self.filename)


@dataclass(frozen=True)
class Kernel:
    name: str        # short: the test ids and the table's columns
    label: str       # what it is, for people
    suite: str       # the Debian suite it comes from
    package: str     # the exact binary package (its name carries the ABI)
    version: str     # the exact Debian version of that package
    strict: bool     # every scenario must pass here (the kernel ksbpf has always supported)
    debs: tuple[Deb, ...] = field(default=())   # not from the Debian mirror: these files (Ubuntu's archive)

    @property
    def release(self) -> str:
        """`uname -r` of this kernel (/lib/modules/RELEASE, /boot/vmlinuz-RELEASE)."""
        return self.package.removeprefix("linux-image-").removeprefix("unsigned-")

    def __str__(self) -> str:
        return f"{self.label}: {self.package}={self.version} ({self.suite})"


# In the order the VM test boots them: the newest first (everything must pass there).
KERNELS = (
    Kernel("newest", "newest (trixie-backports)", "trixie-backports",
           "linux-image-7.2.12+deb13-amd64", "7.2.12-1~bpo13+1", strict=True),
    Kernel("debian13", "Debian 13 stock", "trixie", "linux-image-6.12.117+deb13-amd64", "6.12.117-1", strict=False),
    Kernel("debian12", "Debian 12 stock", "bookworm", "linux-image-6.1.0-50-amd64", "6.1.176-1", strict=False),
)
# Opt-in (KSBPF_VM_KERNELS): Ubuntu's GA kernels, in the image only when selected.
def _ubuntu(name: str, label: str, suite: str, abi: str, version: str, image_sha: str, modules_sha: str) -> Kernel:
    """An Ubuntu GA kernel from the archive's pool: linux-image-unsigned and linux-modules of one ABI."""
    debs = tuple(Deb(f"pool/main/l/linux/linux-{part}-{abi}-generic_{version}_amd64.deb", sha)
                 for part, sha in (("image-unsigned", image_sha), ("modules", modules_sha)))
    return Kernel(name, label, suite, f"linux-image-unsigned-{abi}-generic", version, strict=False, debs=debs)


OPTIONAL = (
    _ubuntu("ubuntu2404", "Ubuntu 24.04 GA", "noble-updates", "6.8.0-155", "6.8.0-155.155",
            "37142e8a90eeaca30d0b1c8ffe53ea6996be0d676772e9b618da7a4adb18262f",
            "724188657b98fa17f6d7119d19bacdc51128865e01434a7578255f8a92d0fee8"),
    _ubuntu("ubuntu2204", "Ubuntu 22.04 GA", "jammy-updates", "5.15.0-208", "5.15.0-208.218",
            "dfcb46169cf058ac7b83fba89e2a9adbb3841fb63ba91c9d99418638ec6a4a8b",
            "1afd062d1e68a1fd76c3baf9e2e5b09ff7b87c7f92f6df2e406639537a60d54f"),
)
# The suites besides the image's own (bookworm) that the kernels come from: added to the
# image's apt sources only while the kernels are installed, at the lowest priority (nothing
# else is taken from them), then removed.  The newest kernel's packages need trixie's
# linux-base (>= 4.17~), named explicitly.
EXTRA_SUITES = ("trixie", "trixie-backports")
EXTRA_PACKAGES = ("linux-base/trixie-backports",)
# bcc compiles against the headers of the kernel it runs on: Debian 12's kernel gets its own
# headers package; the others get the generic ones linked by deploy/setup-host.sh, as on any
# machine whose kernel has no headers package for this userland (ksbpf needs only UAPI structs).
HEADERS = ("linux-headers-6.1.0-50-amd64=6.1.176-1",)
OWN_HEADERS = "debian12"   # the kernel whose headers package is installed (provision.sh's make setup links it)


def by_name(name: str) -> Kernel:
    return next(k for k in KERNELS + OPTIONAL if k.name == name)


def selected(spec: str | None = None) -> tuple[Kernel, ...]:
    """The kernels this run boots: KSBPF_VM_KERNELS, names separated by commas
    ("default" = the Debian kernels), in boot order (newest first); unset or
    empty: the Debian kernels."""
    spec = os.environ.get("KSBPF_VM_KERNELS", "") if spec is None else spec
    names = [n.strip() for n in spec.split(",") if n.strip()] or ["default"]
    known = {k.name for k in KERNELS + OPTIONAL}
    unknown = [n for n in names if n != "default" and n not in known]
    if unknown:
        raise KsbpfError(f"KSBPF_VM_KERNELS: no kernel named {', '.join(unknown)}",
                         f"choose among default, {', '.join(k.name for k in KERNELS + OPTIONAL)}")
    want = {k.name for k in KERNELS} if "default" in names else set()
    want |= set(names)
    return tuple(k for k in sorted(KERNELS + OPTIONAL, key=_boot_order) if k.name in want)


def _boot_order(k: Kernel) -> tuple[int, ...]:
    """Newest first (the strict kernel before all), by version."""
    return (not k.strict, *(-int(x) for x in re.findall(r"\d+", k.release)[:3]))


def ubuntu(chosen: tuple[Kernel, ...]) -> tuple[Kernel, ...]:
    """The chosen kernels that are not in the base image (from Ubuntu's archive)."""
    return tuple(k for k in chosen if k.debs)


def install_args() -> list[str]:
    """apt-get install arguments for every pinned kernel (and its headers)."""
    return [f"{k.package}={k.version}" for k in KERNELS] + list(HEADERS) + list(EXTRA_PACKAGES)
