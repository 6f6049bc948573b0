"""Boot the VM test's guest with qemu: software emulation (TCG; this machine's
KVM is not usable for a stock kernel), the guest's own kernel and initrd
booted directly, NO network device at all (-nic none: every packet stays in
namespaces inside the guest), the console on the first serial port and the
results on the second (the console's getty hangs up the first).

Each Guest has its own throw-away disk, a qcow2 overlay on the cached image,
so that every scenario starts from the first boot and a reboot keeps state,
and its kernel (tests/vm/kernels.py): the image holds every kernel's modules
and initrd, qemu boots the one asked for.

A boot that dies before userspace (a kernel panic, or no sign of systemd on
the console within USERSPACE_TIMEOUT) is retried once, and said so; it never
counts as a pass.  If the retry dies too, the Boot says so and the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from ksbpf.errors import KsbpfError

from .image import Image
from .kernels import Kernel

QEMU = "qemu-system-x86_64"
RESULT = "KSBPF-VM-RESULT "
# systemd as PID 1 says one of these on the console as soon as it runs
USERSPACE_SIGNS = ("systemd[1]:", "running in system mode", "Welcome to ")
PANIC_SIGNS = ("Kernel panic", "end Kernel panic")
USERSPACE_TIMEOUT = 420.0   # s from qemu's start: TCG boots reach systemd in ~10-60 s on a busy machine


def died_before_userspace(console: str, exited: bool, elapsed: float, timeout: float = USERSPACE_TIMEOUT) -> bool:
    """Whether a boot's console (so far) shows a guest that died before systemd
    ran: it panicked, or qemu ended, or the timeout passed, with no sign of
    systemd."""
    if any(sign in console for sign in USERSPACE_SIGNS):
        return False
    return any(sign in console for sign in PANIC_SIGNS) or exited or elapsed > timeout


def last_lines(text: str, n: int = 6) -> str:
    lines = [line.strip() for line in text.replace("\r", "").splitlines() if line.strip()]
    return " | ".join(lines[-n:])


@dataclass
class Boot:
    scenario: str
    result: dict | None     # the guest's result line, None if it wrote none
    seconds: float          # qemu's wall time: boot, scenario, power-off
    console: str            # path of the console log
    serial: str             # path of the second serial port's log
    timed_out: bool
    kernel: str = ""                 # `uname -r` of the kernel booted
    retried: str | None = None       # why boot 1 was retried ("boot 1 died before userspace: ...")
    died: str | None = None          # the retry died before userspace too
    said: bool = False               # the test printed its time already

    def tail(self, chars: int = 4000) -> str:
        """The end of both logs, for a failure message."""
        out = []
        for path in (self.console, self.serial):
            try:
                out.append(f"--- {path}\n" + open(path, errors="replace").read()[-chars:])
            except OSError:
                pass
        return "\n".join(out)


class Guest:
    """One guest disk in `workdir`, bootable several times: an overlay on the
    image (a machine that never booted), or on another guest's disk (that
    machine, as it was when it powered off: a later boot of it)."""

    def __init__(self, image: Image, workdir: str, name: str, kernel: Kernel, after: "Guest | None" = None):
        self.image = image
        self.kernel = kernel
        self.workdir = workdir
        self.name = name
        self.disk = os.path.join(workdir, f"{name}.qcow2")
        backing, fmt = (after.disk, "qcow2") if after else (image.disk, "raw")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", backing, self.disk], check=True)
        self.boots = 0
        self.proc: subprocess.Popen | None = None   # qemu, while a boot runs

    def command(self, scenario: str, console: str, serial: str) -> list[str]:
        rel = self.kernel.release
        # -cpu qemu64 (no AVX state to emulate) and mitigations=off: 75 s where `-cpu max` and the
        # default mitigations took 80 s to boot and power off, and the leak matrix 78 s where it took
        # 101 s (measured 2026-12-07).  Neither changes what ksbpf's programs meet: its loaders hold
        # CAP_PERFMON (the units, the DaemonSet), for which the verifier skips its Spectre
        # sanitizing whatever the mitigations.
        return [QEMU, "-accel", "tcg,thread=multi", "-cpu", "qemu64", "-smp", "2", "-m", "1024",
                "-kernel", self.image.kernel(rel), "-initrd", self.image.initrd(rel),
                "-append", f"console=ttyS0 root=/dev/vda rw panic=1 mitigations=off ksbpf.scenario={scenario}",
                "-drive", f"file={self.disk},format=qcow2,if=virtio",
                "-nic", "none", "-nodefaults", "-display", "none", "-no-reboot",
                "-serial", f"file:{console}", "-serial", f"file:{serial}"]

    def boot(self, scenario: str, timeout: float = 900) -> Boot:
        """Boot until the guest powers off or reboots (qemu exits: -no-reboot);
        once more if it dies before userspace."""
        first = self._boot_once(scenario, timeout)
        if first.died is None:
            return first
        second = self._boot_once(scenario, timeout)
        second.retried = f"boot 1 died before userspace: {first.died}; retried (console: {first.console})"
        return second

    def kill(self) -> None:
        """End the boot running now, if any (from another thread: the VM test was interrupted)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)

    def _boot_once(self, scenario: str, timeout: float) -> Boot:
        self.boots += 1
        stem = os.path.join(self.workdir, f"{self.name}-{self.boots}-{scenario}")
        console, serial = stem + "-console.log", stem + "-serial.log"
        start = time.monotonic()
        proc = subprocess.Popen(self.command(scenario, console, serial), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=open(stem + "-qemu.log", "w"),
                                start_new_session=True)
        self.proc = proc
        timed_out, died, userspace = False, None, False
        try:
            while proc.poll() is None:
                elapsed = time.monotonic() - start
                if elapsed > timeout:
                    timed_out = True
                    break
                if not userspace:
                    text = _read(console)
                    if any(sign in text for sign in USERSPACE_SIGNS):
                        userspace = True
                    elif died_before_userspace(text, False, elapsed):
                        died = last_lines(text)
                        break
                time.sleep(0.5)
        finally:
            if proc.poll() is None:   # timed out, died, or the caller was interrupted
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.returncode not in (0, -signal.SIGKILL):
            raise KsbpfError(f"qemu exited with status {proc.returncode}: "
                             f"{open(stem + '-qemu.log').read().strip()[-500:]}", "see the qemu log above")
        text = _read(console)
        if died is None and not userspace and died_before_userspace(text, True, time.monotonic() - start):
            died = last_lines(text) or "no console output"
        return Boot(scenario, _result(serial), round(time.monotonic() - start, 1), console, serial, timed_out,
                    kernel=self.kernel.release, died=died)


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _result(path: str) -> dict | None:
    try:
        text = open(path, errors="replace").read()
    except OSError:
        return None
    for line in text.replace("\r", "").splitlines():
        if line.startswith(RESULT):
            try:
                return json.loads(line[len(RESULT):])
            except ValueError:
                return None
    return None
