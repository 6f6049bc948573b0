"""Boot the VM test's guest with qemu: software emulation (TCG; this machine's
KVM is not usable for a stock kernel), the guest's own kernel and initrd
booted directly, NO network device at all (-nic none: every packet stays in
namespaces inside the guest), the console on the first serial port and the
results on the second (the console's getty hangs up the first).

Each Guest has its own throw-away disk, a qcow2 overlay on the cached image,
so that every scenario starts from the first boot and a reboot keeps state.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from ksbpf.errors import KsbpfError
from ksbpf.lab.vm.image import Image

QEMU = "qemu-system-x86_64"
RESULT = "KSBPF-VM-RESULT "


@dataclass
class Boot:
    scenario: str
    result: dict | None     # the guest's result line, None if it wrote none
    seconds: float          # qemu's wall time: boot, scenario, power-off
    console: str            # path of the console log
    serial: str             # path of the second serial port's log
    timed_out: bool

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

    def __init__(self, image: Image, workdir: str, name: str, after: "Guest | None" = None):
        self.image = image
        self.workdir = workdir
        self.name = name
        self.disk = os.path.join(workdir, f"{name}.qcow2")
        backing, fmt = (after.disk, "qcow2") if after else (image.disk, "raw")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", backing, self.disk], check=True)
        self.boots = 0

    def command(self, scenario: str, console: str, serial: str) -> list[str]:
        return [QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "1024",
                "-kernel", self.image.kernel, "-initrd", self.image.initrd,
                "-append", f"console=ttyS0 root=/dev/vda rw panic=1 ksbpf.scenario={scenario}",
                "-drive", f"file={self.disk},format=qcow2,if=virtio",
                "-nic", "none", "-nodefaults", "-display", "none", "-no-reboot",
                "-serial", f"file:{console}", "-serial", f"file:{serial}"]

    def boot(self, scenario: str, timeout: float = 900) -> Boot:
        """Boot until the guest powers off or reboots (qemu exits: -no-reboot)."""
        self.boots += 1
        stem = os.path.join(self.workdir, f"{self.name}-{self.boots}-{scenario}")
        console, serial = stem + "-console.log", stem + "-serial.log"
        start = time.monotonic()
        proc = subprocess.Popen(self.command(scenario, console, serial), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=open(stem + "-qemu.log", "w"),
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:   # timed out, or the caller was interrupted
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.returncode not in (0, -signal.SIGKILL):
            raise KsbpfError(f"qemu exited with status {proc.returncode}: "
                             f"{open(stem + '-qemu.log').read().strip()[-500:]}", "see the qemu log above")
        return Boot(scenario, _result(serial), round(time.monotonic() - start, 1), console, serial, timed_out)


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
