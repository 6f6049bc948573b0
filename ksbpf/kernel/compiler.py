"""Compiling the program in a helper process.

bcc's compiler (LLVM) costs ~1.5 s and ~100 MB that stay mapped in the
process that compiled.  The daemon never compiles itself: it asks a helper
process (`python -m ksbpf.kernel.compiler`) to compile an option set into
the image cache, goes on with its event loop, and loads the cached image when
the helper is done.  `ksbpf warm-cache` compiles every common option set
ahead of time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Callable

from ksbpf.kernel import bpf
from ksbpf.kernel.wakeup import Wakeup
from ksbpf.policy import EventSettings, Options

Key = tuple


def _key(options: Options, n_endpoints: int, events: EventSettings) -> Key:
    return tuple(bpf.cflags(options, n_endpoints, events))


def _argv(options: Options, n_endpoints: int, events: EventSettings) -> list[str]:
    spec = {"options": vars(options), "n_endpoints": n_endpoints, "events": vars(events)}
    return [sys.executable, "-m", "ksbpf.kernel.compiler", json.dumps(spec)]


def compile_now(options: Options, n_endpoints: int, events: EventSettings, timeout: float = 300) -> tuple[bool, str]:
    """Compile in a helper process and wait: (done, the helper's error output)."""
    proc = subprocess.run(_argv(options, n_endpoints, events), capture_output=True, text=True, timeout=timeout)
    return proc.returncode == 0, proc.stderr.strip()


class Compiler:
    """Helper processes compiling option sets for the daemon, one per set at a
    time.  A source of the daemon's loop: fileno() wakes it when one ends,
    handle() calls on_done(ok, error) for each."""

    def __init__(self, on_done: Callable[[bool, str], None]):
        self.on_done = on_done
        self._running: dict[Key, subprocess.Popen] = {}
        self._finished: list[tuple[Key, int, str]] = []
        self._lock = threading.Lock()
        self._wakeup = Wakeup()

    def ready(self, options: Options, n_endpoints: int, events: EventSettings) -> bool:
        """Is the image cached?  If not, a helper is compiling it (started now if needed)."""
        if bpf.image_cached(options, n_endpoints, events):
            return True
        key = _key(options, n_endpoints, events)
        with self._lock:
            if key not in self._running:
                proc = subprocess.Popen(_argv(options, n_endpoints, events), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                self._running[key] = proc
                threading.Thread(target=self._wait, args=(key, proc), daemon=True).start()
        return False

    def _wait(self, key: Key, proc: subprocess.Popen) -> None:
        err = proc.stderr.read()
        proc.wait()
        with self._lock:
            self._running.pop(key, None)
            self._finished.append((key, proc.returncode, err.strip()))
        self._wakeup.wake()

    def fileno(self) -> int:
        return self._wakeup.fileno()

    def deadline(self) -> float:
        return time.monotonic() + 3600

    def handle(self) -> None:
        self._wakeup.drain()
        with self._lock:
            finished, self._finished = self._finished, []
        for _key_, code, err in finished:
            self.on_done(code == 0, err)

    def close(self) -> None:
        with self._lock:
            for proc in self._running.values():
                proc.kill()
        self._wakeup.close()


def warm(progress: Callable[[str], None]) -> int:
    """Compile every common option set (LAN, LAN DNS, DHCP; default events; up
    to 64 endpoints) into the image cache; how many were compiled now."""
    done = 0
    for lan, dns, dhcp in ((False, False, False), (False, False, True), (True, False, False),
                           (True, False, True), (True, True, False), (True, True, True)):
        options = Options(lan, dns, dhcp)
        if bpf.image_cached(options, 0, EventSettings()):
            continue
        start = time.monotonic()
        ok, err = compile_now(options, 0, EventSettings())
        if not ok:
            raise RuntimeError(err or "the compiler helper failed")
        progress(f"compiled {options} in {time.monotonic() - start:.1f} s")
        done += 1
    return done


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    try:
        prog = bpf.load(Options(**spec["options"]), spec["n_endpoints"], EventSettings(**spec["events"]))
    except Exception as exc:
        print(str(exc), file=sys.stderr)
        return 1
    prog.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
