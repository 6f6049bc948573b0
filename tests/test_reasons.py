"""The C header is the source of truth for reasons and map layouts; the
Python mirror must agree with it exactly."""

import re

from ksbpf.kernel import bpf
from ksbpf.reasons import FAMILY_MAX, FIRST_DROP, REASON_MAX, Family, Hook, Reason, parse_c_enum


def header() -> str:
    with open(bpf.ebpf_dir() + "/ksbpf.h") as f:
        return f.read()


def define(name: str) -> str:
    m = re.search(r"#define\s+" + name + r"\s+(\S+)", header())
    assert m, name
    return m.group(1)


def test_reason_enum_matches_header():
    c_enum = parse_c_enum(header())
    assert c_enum.pop("REASON_MAX") == REASON_MAX == len(Reason)
    assert c_enum == {r.name: r.value for r in Reason}


def test_family_and_hook_enums_match_header():
    families = parse_c_enum(header(), "ksbpf_family", "KSBPF_FAMILY_")
    assert families.pop("MAX") == FAMILY_MAX
    assert families == {f.name: f.value for f in Family}
    hooks = parse_c_enum(header(), "ksbpf_hook", "KSBPF_HOOK_")
    assert hooks.pop("MAX") == len(Hook)
    assert hooks == {h.name: h.value for h in Hook}


def test_event_layout_matches_header():
    from ksbpf.observability.events import EVENT
    body = re.search(r"struct ksbpf_event \{(.*?)\};", header(), re.S).group(1)
    sizes = {"__u64": 8, "__u32": 4, "__be16": 2, "__u8": 1}
    total = 0
    for m in re.finditer(r"(__u64|__u32|__be16|__u8)\s+\w+(?:\[(\d+)\])?;", body):
        total += sizes[m.group(1)] * int(m.group(2) or 1)
    assert total == EVENT.size


def test_first_drop_matches_header():
    assert define("KSBPF_FIRST_DROP") == "KSBPF_" + FIRST_DROP.name
    assert all(r.allowed == (r.name.startswith("ALLOW_")) for r in Reason)


def test_map_constants_match_header():
    assert int(define("KSBPF_META_SIZE")) == bpf.META_SIZE
    assert int(define("KSBPF_EP_PORTS")) == bpf.EP_PORTS
    from ksbpf.policy import ENDPOINT_PORTS
    assert ENDPOINT_PORTS == bpf.EP_PORTS


def test_labels_are_unique_and_short():
    labels = [r.label for r in Reason]
    assert len(set(labels)) == len(labels)
    assert "not_tunnel" in labels and "tunnel" in labels


def test_parse_c_enum_ignores_comments():
    text = "enum ksbpf_reason { KSBPF_A = 0, /* KSBPF_B = 9 */ KSBPF_C = 0x2, };"
    assert parse_c_enum(text) == {"A": 0, "C": 2}


def test_btf_offsets_are_the_kernels(tmp_path, monkeypatch):
    """The netfilter entry point's struct offsets: read from the running
    kernel's BTF (checked against bpftool's dump), and cached per kernel."""
    import json as _json
    import os as _os
    import subprocess

    import pytest as _pytest

    from ksbpf.kernel import btf
    if not _os.path.exists(btf.VMLINUX):
        _pytest.skip("no kernel BTF")
    monkeypatch.setenv("KSBPF_CACHE_DIR", str(tmp_path))
    btf.nf_offsets.cache_clear()
    first = btf.nf_offsets()
    assert list(tmp_path.glob("btf-*.json"))
    btf.nf_offsets.cache_clear()
    assert btf.nf_offsets() == first   # from the cache
    btf.nf_offsets.cache_clear()
    dump = subprocess.run(["bpftool", "-j", "btf", "dump", "file", btf.VMLINUX], capture_output=True, text=True)
    if dump.returncode:
        _pytest.skip("bpftool cannot dump the kernel's BTF")
    types = _json.loads(dump.stdout)["types"]
    for struct_name, member in (("net_device", "ifindex"), ("nf_hook_state", "out"), ("sk_buff", "head")):
        (t,) = [t for t in types if t["kind"] == "STRUCT" and t["name"] == struct_name and t["vlen"]][:1]
        (m,) = [m for m in t["members"] if m["name"] == member]
        assert first[f"{struct_name}.{member}"] == m["bits_offset"] // 8
