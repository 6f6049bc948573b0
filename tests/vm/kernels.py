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
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kernel:
    name: str        # short: the test ids and the table's columns
    label: str       # what it is, for people
    suite: str       # the Debian suite it comes from
    package: str     # the exact binary package (its name carries the ABI)
    version: str     # the exact Debian version of that package
    strict: bool     # every scenario must pass here (the kernel ksbpf has always supported)

    @property
    def release(self) -> str:
        """`uname -r` of this kernel (/lib/modules/RELEASE, /boot/vmlinuz-RELEASE)."""
        return self.package.removeprefix("linux-image-")

    def __str__(self) -> str:
        return f"{self.label}: {self.package}={self.version} ({self.suite})"


# In the order the VM test boots them: the newest first (everything must pass there).
KERNELS = (
    Kernel("newest", "newest (trixie-backports)", "trixie-backports",
           "linux-image-7.2.12+deb13-amd64", "7.2.12-1~bpo13+1", strict=True),
    Kernel("debian13", "Debian 13 stock", "trixie", "linux-image-6.12.117+deb13-amd64", "6.12.117-1", strict=False),
    Kernel("debian12", "Debian 12 stock", "bookworm", "linux-image-6.1.0-50-amd64", "6.1.176-1", strict=False),
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
    return next(k for k in KERNELS if k.name == name)


def install_args() -> list[str]:
    """apt-get install arguments for every pinned kernel (and its headers)."""
    return [f"{k.package}={k.version}" for k in KERNELS] + list(HEADERS) + list(EXTRA_PACKAGES)
