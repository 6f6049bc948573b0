"""Checks that run before ksbpf changes anything: each failure is one line
saying what is missing and how to get it."""

from __future__ import annotations

import importlib
import os
import platform
from types import ModuleType

from ksbpf.errors import KsbpfError
from ksbpf.kernel import libbpf

BCC_MODULE = "bcc"
MODULES_DIR = "/lib/modules"
KHEADERS = "/sys/kernel/kheaders.tar.xz"


def require_root() -> None:
    if os.geteuid() != 0:
        raise KsbpfError("ksbpf must run as root (it loads BPF programs and attaches them to cgroups)",
                         "run it with sudo")


def require_kernel_bpf() -> None:
    try:
        cg_skb = libbpf.probe_prog_type(libbpf.BPF_PROG_TYPE_CGROUP_SKB)
        cookie = cg_skb and libbpf.probe_helper(libbpf.BPF_PROG_TYPE_CGROUP_SKB,
                                                libbpf.BPF_FUNC_get_netns_cookie)
    except libbpf.LibbpfMissing as exc:
        raise KsbpfError(str(exc), "install libbpf1 (run `make setup`)") from None
    if not cg_skb:
        raise KsbpfError("this kernel cannot load cgroup_skb BPF programs",
                         "use a kernel built with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF (Linux >= 5.15)")
    if not cookie:
        raise KsbpfError("this kernel lacks bpf_get_netns_cookie for cgroup_skb programs",
                         "use a newer kernel (Linux 6.18 works; Debian 12's 6.1 and 6.12 lack it: vagrant/provision.sh installs one)")


def require_bcc() -> ModuleType:
    try:
        return importlib.import_module(BCC_MODULE)
    except ImportError:
        raise KsbpfError("the bcc Python module is missing (Debian/Ubuntu package python3-bpfcc; the PyPI package 'bcc' is unrelated)",
                         "run `make setup`, or apt-get install python3-bpfcc and use a Python that sees it") from None


def require_kernel_headers() -> None:
    build = os.path.join(MODULES_DIR, platform.release(), "build")
    source = os.path.join(MODULES_DIR, platform.release(), "source")
    # BCC_KERNEL_SOURCE: bcc's own override (the container image sets it to the headers it carries)
    for base in filter(None, (os.environ.get("BCC_KERNEL_SOURCE"), build, source)):
        if os.path.exists(os.path.join(base, "include", "linux", "kconfig.h")):
            return
    if os.path.exists(KHEADERS):
        return
    raise KsbpfError(f"bcc needs kernel headers and none are at {build}",
                     "run `make setup` (it installs your kernel's headers, or links the distribution's generic ones)")


def require_loader() -> None:
    """What loading and attaching a program needs."""
    require_root()
    require_kernel_bpf()


def require_compiler() -> ModuleType:
    """What compiling the program needs (only when no compiled image is cached);
    returns the bcc module."""
    bcc = require_bcc()
    require_kernel_headers()
    return bcc
