"""The VM test's harness without booting anything (tests/vm/): the kernel pins,
how a boot that died before userspace is recognised, the run-parts wrapper the
newer kernels' packages need on Debian 12, and the table's shape."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import threading
import time

import pytest

from vm import kernels, qemu

VM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vm")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PANIC = """[    2.104] int3: 0000 [#1] PREEMPT SMP NOPTI
[    2.105] RIP: 0010:sched_clock_cpu+0x10/0x1a0
[    2.200] Kernel panic - not syncing: Attempted to kill the idle task!
[    2.201] ---[ end Kernel panic - not syncing: Attempted to kill the idle task! ]---
"""
USERSPACE = """[    3.0] Run /init as init process
[    9.1] systemd[1]: systemd 252.39-1~deb12u1 running in system mode (+PAM +AUDIT ...)
Welcome to Debian GNU/Linux 12 (bookworm)!
"""


def test_kernels_are_pinned_exactly_once_each():
    names = [k.name for k in kernels.KERNELS]
    assert sorted(names) == ["debian12", "debian13", "newest"]
    for k in kernels.KERNELS:
        assert re.fullmatch(r"linux-image-\d+\.\d+[.\d]*[-+][\w.+-]*-amd64", k.package), k
        assert re.fullmatch(r"\d[\w.+~-]*", k.version) and "*" not in k.version, k
        assert k.release == k.package[len("linux-image-"):]
    assert [k.name for k in kernels.KERNELS if k.strict] == ["newest"]
    args = kernels.install_args()
    assert all(f"{k.package}={k.version}" in args for k in kernels.KERNELS)
    assert kernels.by_name(kernels.OWN_HEADERS).release in " ".join(kernels.HEADERS)


def test_a_panic_before_userspace_is_a_death_and_systemd_is_not():
    assert qemu.died_before_userspace(PANIC, exited=False, elapsed=5)
    assert qemu.died_before_userspace(PANIC, exited=True, elapsed=5)
    assert not qemu.died_before_userspace(USERSPACE, exited=False, elapsed=5)
    assert not qemu.died_before_userspace(USERSPACE + PANIC, exited=True, elapsed=900)   # a later panic: not this rule
    # no output: still booting, or dead once qemu ended or the timeout passed
    assert not qemu.died_before_userspace("", exited=False, elapsed=5)
    assert qemu.died_before_userspace("", exited=True, elapsed=5)
    assert qemu.died_before_userspace("[ 1.0] Linux version 7.2.12", exited=False, elapsed=qemu.USERSPACE_TIMEOUT + 1)
    assert "end Kernel panic" in qemu.last_lines(PANIC, 2) and "int3" not in qemu.last_lines(PANIC, 2)


def test_run_parts_wrapper_merges_directories_in_name_order(tmp_path):
    etc, usr = tmp_path / "etc", tmp_path / "usr"
    for d, name, text in ((etc, "10-initramfs", "etc-10"), (usr, "00-legacy-boot", "usr-00"),
                          (usr, "10-initramfs", "hidden")):
        d.mkdir(exist_ok=True)
        (d / name).write_text(f'#!/bin/sh\necho {text} "$@"\n')
        (d / name).chmod(0o755)
    proc = subprocess.run(["sh", os.path.join(VM, "run-parts-dirs.sh"), "--exit-on-error",
                           "--arg=7.3.4", "--arg=/boot/vmlinuz-7.3.4", str(etc), str(usr)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["usr-00 7.3.4 /boot/vmlinuz-7.3.4", "etc-10 7.3.4 /boot/vmlinuz-7.3.4"]


def test_units_run_the_guest_script_from_where_the_image_has_it():
    for name in os.listdir(os.path.join(VM, "units")):
        text = open(os.path.join(VM, "units", name)).read()
        for path in re.findall(r"ExecStart=\S+ (\S+\.py)", text):
            assert path == "/opt/ksbpf/tests/vm/guest.py", (name, path)
    proc = subprocess.run(["sh", "-n", os.path.join(VM, "run-parts-dirs.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_only_a_refusal_makes_a_cell_not_supported():
    import sys
    sys.path.insert(0, VM)
    import guest
    refusal = "ksbpf: error: this kernel has neither bpf_get_netns_cookie for cgroup_skb programs (Linux 6.17) nor x"
    assert guest.refusal(refusal).startswith("this kernel has neither")
    assert guest.refusal('x error   scope_failed scope=/a error="this kernel cannot load cgroup_skb BPF programs; y" r=5')
    # a verifier finding or a notice that mentions a missing feature is not a refusal
    assert guest.refusal('x error   verify_failed scope=/a check=nf detail="this kernel has no netfilter BPF links"') is None
    assert guest.refusal("this kernel: tcx no (Linux 6.6) -> node mode guards with clsact filters") is None


def test_the_default_run_boots_the_debian_kernels_and_ubuntus_are_opt_in():
    assert [k.name for k in kernels.selected("")] == ["newest", "debian13", "debian12"]
    assert kernels.selected("default") == kernels.selected("") == kernels.KERNELS
    both = kernels.selected("newest, ubuntu2204,ubuntu2404")   # boot order: the strict kernel, then newest first
    assert [k.name for k in both] == ["newest", "ubuntu2404", "ubuntu2204"]
    assert [k.name for k in kernels.selected("ubuntu2204,default")] == \
        ["newest", "debian13", "debian12", "ubuntu2204"]
    assert [k.release for k in kernels.ubuntu(both)] == ["6.8.0-155-generic", "5.15.0-208-generic"]
    try:
        kernels.selected("newest,ubuntu2004")
        raise AssertionError("an unknown kernel name was accepted")
    except kernels.KsbpfError as exc:
        assert "\n" not in str(exc) and "ubuntu2004" in str(exc) and "ubuntu2204" in str(exc), exc


def test_ubuntu_kernels_are_pinned_by_file_and_sha256_and_leave_the_base_alone():
    for k in kernels.OPTIONAL:
        assert not k.strict and k.release.endswith("-generic") and k.name not in [d.name for d in kernels.KERNELS]
        names = [d.basename for d in k.debs]
        assert names == [f"linux-image-unsigned-{k.release}_{k.version}_amd64.deb",
                         f"linux-modules-{k.release}_{k.version}_amd64.deb"], names
        for d in k.debs:
            assert d.filename.startswith("pool/main/l/linux/") and re.fullmatch(r"[0-9a-f]{64}", d.sha256), d
        assert kernels.by_name(k.name) is k
    # the base layer's key is made of the Debian kernels only
    assert not any("generic" in a for a in kernels.install_args())
    from vm import image
    assert image.image_key(REPO, "b") == image.image_key(REPO, "b", ())
    assert image.image_key(REPO, "b", kernels.OPTIONAL[1:]) not in (image.image_key(REPO, "b"),
                                                                  image.image_key(REPO, "b", kernels.OPTIONAL))


def test_ubuntu_packages_are_checked_and_an_unreachable_archive_is_one_line(tmp_path):
    from vm import image
    deb = b"a package"
    k = kernels.Kernel("t", "test", "pocket", "linux-image-unsigned-1.2.3-4-generic", "1.2.3-4.5", strict=False,
                       debs=(kernels.Deb("pool/x/a.deb", hashlib.sha256(deb).hexdigest()),))
    archive = tmp_path / "archive"
    (archive / "pool" / "x").mkdir(parents=True)
    cache = str(tmp_path / "cache")
    try:   # not there
        image.fetch_debs(cache, (k,), log=lambda m: None, archive=archive.as_uri())
        raise AssertionError("a missing package was not an error")
    except image.KsbpfError as exc:
        assert "\n" not in str(exc) and "KSBPF_VM_KERNELS" in str(exc) and "pool/x/a.deb" in str(exc), exc
    (archive / "pool" / "x" / "a.deb").write_bytes(b"another package")
    try:   # not what was pinned
        image.fetch_debs(cache, (k,), log=lambda m: None, archive=archive.as_uri())
        raise AssertionError("a package with the wrong sha256 was accepted")
    except image.KsbpfError as exc:
        assert "not the pinned" in str(exc) and not os.listdir(os.path.join(cache, "ubuntu-debs")), exc
    (archive / "pool" / "x" / "a.deb").write_bytes(deb)
    assert image.fetch_debs(cache, (k,), log=lambda m: None, archive=archive.as_uri()) == \
        [os.path.join(cache, "ubuntu-debs", "a.deb")]
    (archive / "pool" / "x" / "a.deb").unlink()   # from the cache now, checked again
    assert open(image.fetch_debs(cache, (k,), log=lambda m: None, archive=archive.as_uri())[0], "rb").read() == deb


def test_the_guests_cgroup_query_lists_what_is_attached_without_bpftool(tmp_path):
    """Where bpftool lists nothing (5.15 refuses its query), the guest asks through ksbpf's
    binding: here, on an empty cgroup of our own, it answers an empty list, not an error."""
    import sys
    sys.path.insert(0, VM)
    import guest
    cg = f"/sys/fs/cgroup/ksbpf-harness-{os.getpid()}"
    try:
        os.mkdir(cg)
    except OSError as exc:
        import pytest
        pytest.skip(f"no cgroup of our own here ({exc})")
    try:
        proc = subprocess.run([sys.executable, "-c", guest._CGROUP_QUERY, cg], capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
    finally:
        os.rmdir(cg)


class _FakeGuest:
    """A guest whose boots take `seconds` and say how many ran at once."""
    live = 0
    most = 0
    order: list[str] = []

    def __init__(self, name, after, seconds=0.2, fail=False):
        self.name, self.after, self.seconds, self.fail = name, after, seconds, fail

    def boot(self, scenario, timeout):
        with _LOCK:
            _FakeGuest.live += 1
            _FakeGuest.most = max(_FakeGuest.most, _FakeGuest.live)
            _FakeGuest.order.append(f"{self.name}:{scenario}")
        time.sleep(self.seconds)
        with _LOCK:
            _FakeGuest.live -= 1
        if self.fail:
            raise RuntimeError(f"{self.name} broke")
        assert threading.current_thread().name.startswith("vm-")
        return qemu.Boot(scenario, {"parts": {}}, self.seconds, "", "", False)

    def kill(self):
        pass


_LOCK = threading.Lock()


def test_the_schedule_runs_boots_a_few_at_a_time_and_a_later_boot_after_its_machine():
    from vm.schedule import Job, Schedule
    _FakeGuest.live = _FakeGuest.most = 0
    _FakeGuest.order = []
    s = Schedule(parallel=2)
    made = {}

    def maker(name, seconds=0.2, fail=False):
        def make(prev):
            made[name] = _FakeGuest(name, prev, seconds, fail)
            return made[name]
        return make
    first = s.add(Job(("k", "boot"), maker("boot"), (("boot+daemon", 9),), 240))
    s.add(Job(("k", "labeach"), maker("labeach"), (("lab+each+raw", 9),), 480, after=first))
    s.add(Job(("k", "escape"), maker("escape"), (("escape", 9), ("escape-rebooted", 9)), 230, after=first))
    for name in ("node", "nm", "wgquick"):
        s.add(Job(("k", name), maker(name, 0.3), ((name, 9),), 100))
    broken = s.add(Job(("j", "boot"), maker("broken", 0.05, fail=True), (("boot+daemon", 9),), 999))
    s.add(Job(("j", "labeach"), maker("never"), (("lab+each+raw", 9),), 480, after=broken))
    s.start()
    g, boots = s.result(("k", "escape"))
    assert [b.scenario for b in boots] == ["escape", "escape-rebooted"] and g is made["escape"]
    assert made["escape"].after is made["boot"] and made["labeach"].after is made["boot"]   # its machine, again
    for key in list(s.jobs):
        if key[0] == "k":
            s.result(key)
    assert _FakeGuest.most == 2, _FakeGuest.order   # two at a time, never more
    # the longest chains first: the broken job's (999 s), then the first boot's (240 + 480)
    assert set(_FakeGuest.order[:2]) == {"broken:boot+daemon", "boot:boot+daemon"}, _FakeGuest.order
    assert _FakeGuest.order.index("labeach:lab+each+raw") > _FakeGuest.order.index("boot:boot+daemon")
    with pytest.raises(RuntimeError, match="broken broke"):
        s.result(("j", "boot"))
    with pytest.raises(RuntimeError, match=r"earlier boot \(boot\) failed: broken broke"):
        s.result(("j", "labeach"))
    assert "never" not in made   # a later boot of a machine that failed is not booted
    s.stop()
    s.join()


def test_wanted_jobs_leave_the_newest_only_cells_to_the_newest_kernel():
    """The boots a full selection asks for: every job on the strict (newest) kernel; on the others every
    job but those of the cells they leave out (NEWEST_ONLY) -- no boot whose test would only skip."""
    import types

    import test_vm

    items = [types.SimpleNamespace(originalname=name, name=f"{name}[{k.name}]",
                                   callspec=types.SimpleNamespace(params={"kernel": k}))
             for _boots, _t, _dep, names in test_vm.JOBS.values() for name in names for k in kernels.KERNELS]
    wanted = test_vm.wanted_jobs(items)
    for k in kernels.KERNELS:
        jobs = {job for name, job in wanted if name == k.name}
        skipped = set() if k.strict else set(test_vm.NEWEST_ONLY)
        assert jobs == set(test_vm.JOBS) - skipped, (k.name, jobs)
    assert any(not k.strict for k in kernels.KERNELS) and any(k.strict for k in kernels.KERNELS)
