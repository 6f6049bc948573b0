"""Checks that run before ksbpf changes anything: each failure is one line
saying what is missing and how to get it."""

from __future__ import annotations

import importlib
import os
import platform
from types import ModuleType

from ksbpf.errors import KsbpfError
from ksbpf.kernel import features, libbpf

BCC_MODULE = "bcc"
MODULES_DIR = "/lib/modules"
KHEADERS = "/sys/kernel/kheaders.tar.xz"


def require_root() -> None:
    if os.geteuid() != 0:
        raise KsbpfError("ksbpf must run as root (it loads BPF programs and attaches them to cgroups)",
                         "run it with sudo")


def require_kernel_bpf(cgroup_scope: bool = True) -> None:
    """What the kernel must offer for a cgroup scope (cgroup_scope) or node
    mode; each missing piece is one line naming the feature, the release that
    has it and the nearest alternative."""
    try:
        have = {f.name: f for f in features.probe()}
        libbpf._lib()
    except libbpf.LibbpfMissing as exc:
        raise KsbpfError(str(exc), "install libbpf1 (run `make setup`)") from None
    if not cgroup_scope and not have["tc_bpf"].present:
        raise KsbpfError("this kernel cannot load tc BPF programs (CONFIG_BPF_SYSCALL, CONFIG_NET_CLS_BPF)",
                         "use a kernel built with them (every distribution's is)")
    if cgroup_scope and not have["cgroup_skb"].present:
        raise KsbpfError("this kernel cannot load cgroup_skb BPF programs",
                         "use a kernel built with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF (Linux >= 5.15), "
                         "or node mode (ksbpf attach --node)")
    if not have["ringbuf"].present:
        raise KsbpfError("this kernel has no BPF ring buffer (Linux 5.8)", "use Linux >= 5.15")
    if not have["so_netns_cookie"].present:
        raise KsbpfError("this kernel cannot tell user space a network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14)",
                         "use Linux >= 5.15")
    if not cgroup_scope:
        return
    if features.netns_identity() == features.NETNS_HELPER:
        if not have["netns_cookie_cgroup_skb"].present:
            raise KsbpfError(f"{features.NETNS_ENV}=helper, but this kernel's cgroup_skb programs cannot call "
                             "bpf_get_netns_cookie (Linux 6.17)",
                             f"unset {features.NETNS_ENV} (socket storage then records each socket's namespace)")
    elif not have["sk_storage"].present:
        raise KsbpfError("this kernel has neither bpf_get_netns_cookie for cgroup_skb programs (Linux 6.17) nor "
                         "socket storage for cgroup/sock programs (Linux 5.12): a cgroup scope cannot tell "
                         "namespaces apart",
                         "use Linux >= 5.12, or node mode (ksbpf attach --node), which needs neither")


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


def require_loader(cgroup_scope: bool = True) -> None:
    """What loading and attaching a program needs (a cgroup scope's, or node mode's)."""
    require_root()
    require_kernel_bpf(cgroup_scope)


def require_compiler() -> ModuleType:
    """What compiling the program needs (only when no compiled image is cached);
    returns the bcc module."""
    bcc = require_bcc()
    require_kernel_headers()
    return bcc
