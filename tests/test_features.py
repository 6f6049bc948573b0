"""The kernel feature probes answer what the kernel really does: a probe that
says yes where the kernel refuses would compile a program that cannot load
(found on Debian 13's 6.12, whose verifier words its refusal in a way
libbpf 1.1's own probe does not know)."""

from __future__ import annotations

import pytest

from ksbpf.errors import KsbpfError
from ksbpf.kernel import bpf, features, libbpf
from ksbpf.policy import Options

pytestmark = pytest.mark.root

BPF_FUNC_sock_ops_cb_flags_set = 59      # sock_ops programs only, on every kernel
BPF_FUNC_skb_load_bytes_relative = 68    # cgroup_skb programs have had it since 4.19


def test_a_helper_the_type_may_not_call_is_refused():
    assert not libbpf.probe_helper(libbpf.BPF_PROG_TYPE_SCHED_CLS, BPF_FUNC_sock_ops_cb_flags_set)
    assert not libbpf.probe_helper(libbpf.BPF_PROG_TYPE_CGROUP_SKB, BPF_FUNC_sock_ops_cb_flags_set)
    assert not libbpf.probe_helper(libbpf.BPF_PROG_TYPE_CGROUP_SKB, 100000)   # no such helper


def test_a_helper_the_type_may_call_is_found():
    assert libbpf.probe_helper(libbpf.BPF_PROG_TYPE_CGROUP_SKB, BPF_FUNC_skb_load_bytes_relative)
    assert libbpf.probe_helper(libbpf.BPF_PROG_TYPE_CGROUP_SOCK, libbpf.BPF_FUNC_get_netns_cookie)


def test_the_netns_helper_probe_agrees_with_loading_the_program(tmp_path):
    """Where the probe says the cgroup hook may ask bpf_get_netns_cookie, the
    program that asks it loads; where it says no, that program is refused."""
    with features.forced_netns_identity(features.NETNS_HELPER):
        try:
            bpf.load(Options(), cache=str(tmp_path)).close()
            loads = True
        except KsbpfError:
            loads = False
    assert features.has("netns_cookie_cgroup_skb") == loads
    with features.forced_netns_identity(features.NETNS_STORAGE):   # the storage variant loads everywhere
        bpf.load(Options(), cache=str(tmp_path), entries=(bpf.ENTRY_CGROUP, bpf.ENTRY_SOCK_CREATE)).close()


def test_summary_names_every_probe():
    line = features.summary()
    assert all(f"{name} " in line for name in features.PROBES)
    assert features.short().startswith("this kernel (")
