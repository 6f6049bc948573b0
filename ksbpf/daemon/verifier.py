"""The daemon's zero-traffic check (`ksbpf verify`, ksbpf/verify/check.py) of
every scope it manages (cgroup scopes and the node scope): after each change it makes and every
`verify_interval` seconds, on a thread of its own so that the event loop is
never blocked by it.  After a change only the scopes that changed are checked
(a new pod among a thousand: one scope, not a thousand); the periodic run
checks every scope.  And, with `close_stray_sockets`, closing the sockets a
process brings into a protected scope from outside it (polled every
JOIN_POLL_SECONDS: the kernel announces no cgroup migration).

Results are what the metrics and /readyz read:
  failures          (scope, check) -> failing findings of the scope's last check (0 when it passed)
  problems          one line per failing finding
  last_success      wall-clock time of the last run in which nothing failed
A failure must be seen by two runs a second apart before it is reported: a
run that overlaps one of the daemon's own map updates could catch the map
between two entries.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from ksbpf.errors import KsbpfError
from ksbpf.verify import check

JOIN_POLL_SECONDS = 2.0
CONFIRM_SECONDS = 1.0
QUIET_SECONDS = 0.5     # after a change, wait this long without another (a flapping tunnel: one check)
IDLE_WAIT_MAX = 1.0     # a check waits at most this long for the event loop to be idle (then runs anyway)


class Verifier:
    def __init__(self, log: Callable[..., None], pin_dirs: Callable[[], dict[str, str]],
                 interval: float = 300.0, close_stray: bool = False, idle: threading.Event | None = None,
                 unscraped: threading.Event | None = None):
        self.log = log
        self.pin_dirs = pin_dirs          # scope (cgroup path) -> pin directory, of the applied scopes
        self.interval = interval
        self.close_stray = close_stray
        self.idle = idle                  # set while the event loop waits for work (None: never wait)
        self.unscraped = unscraped        # set while no /metrics scrape runs (None: never wait)
        self.failures: dict[tuple[str, str], int] = {}
        self.problems: list[str] = []
        self._problems: dict[str, list[str]] = {}   # scope -> its failing findings' lines (the last check of it)
        self.last_success: float | None = None
        self.runs = 0
        self._wake = threading.Event()
        self._due = 0.0   # monotonic time of the check asked for by the last change
        self._changed: set[str] | None = set()   # the scopes changed since the last check (None: every scope)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="verify", daemon=True)
        self._logged: set[tuple[str, str, str]] = set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def soon(self, scope: str | None = None) -> None:
        """Check `scope` (None: every scope) once changes have been quiet for QUIET_SECONDS."""
        with self._lock:
            if scope is None or self._changed is None:
                self._changed = None
            else:
                self._changed.add(scope)
        self._due = time.monotonic() + QUIET_SECONDS
        self._wake.set()

    def _take_changed(self) -> set[str] | None:
        with self._lock:
            changed, self._changed = self._changed, set()
        return changed

    def wait_for_run(self, after: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.runs <= after and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.runs > after

    # -- the thread ---------------------------------------------------------------
    def _loop(self) -> None:
        next_check = time.monotonic()
        while not self._stop.is_set():
            timeout = max(0.0, next_check - time.monotonic())
            if self.close_stray:
                timeout = min(timeout, JOIN_POLL_SECONDS)
            full, only = False, set()
            if self._wake.wait(timeout):
                self._wake.clear()
                while not self._stop.is_set() and time.monotonic() < self._due:
                    self._stop.wait(self._due - time.monotonic())   # soon() may push it further
                changed = self._take_changed()
                full, only = changed is None, changed or set()
            if self._stop.is_set():
                return
            try:
                if self.close_stray:
                    self._close_strays()
                if full or time.monotonic() >= next_check:   # asked for, or the periodic run: every scope
                    self.run_once()
                    next_check = time.monotonic() + self.interval
                elif only:
                    self.run_once(only)   # what changed, now; the periodic run stays on its schedule
            except Exception as exc:   # the thread must outlive any one failure; say what happened
                self.log("verify_error", level="error", error=f"{type(exc).__name__}: {exc}")
                next_check = time.monotonic() + self.interval

    def _check(self, scopes: dict[str, str]) -> dict[str, list[check.Finding]]:
        out = {}
        for scope, pin_dir in scopes.items():
            if self.idle is not None:
                self.idle.wait(IDLE_WAIT_MAX)   # the loop first: a pod being protected does not wait for us
            if self.unscraped is not None:   # nor a scrape (its 1,000 pods' reads would share the GIL with us)
                self.unscraped.wait(IDLE_WAIT_MAX)
            try:
                out[scope] = check.check_pin_dir(pin_dir)
            except (OSError, KsbpfError) as exc:
                out[scope] = [check.Finding(scope, "scope", check.FAIL, f"the check could not run: {exc}")]
            for f in out[scope]:
                f.scope = scope
        return out

    def run_once(self, only: set[str] | None = None) -> None:
        """Check every scope, or those of `only`; the others keep their last results."""
        everything = self.pin_dirs()
        scopes = everything if only is None else {s: p for s, p in everything.items() if s in only}
        found = self._check(scopes)
        failing = {s for s, fs in found.items() if any(f.verdict == check.FAIL for f in fs)}
        if failing:   # confirm: a run that overlapped a map update may have caught it half-done
            time.sleep(CONFIRM_SECONDS)
            again = self._check({s: scopes[s] for s in failing})
            for s in failing:
                keep = {f.check for f in again[s] if f.verdict == check.FAIL}
                found[s] = [f for f in found[s] if f.verdict != check.FAIL or f.check in keep] + \
                           [f for f in again[s] if f.verdict == check.FAIL and f.check not in
                            {g.check for g in found[s] if g.verdict == check.FAIL}]
        with self._lock:   # the results of the scopes not checked now stand (of those still in force)
            failures = {k: n for k, n in self.failures.items() if k[0] in everything and k[0] not in found}
            by_scope = {s: p for s, p in self._problems.items() if s in everything and s not in found}
        for scope, fs in found.items():
            by_scope[scope] = [f"{scope}: verify {f.check} failed: {f.detail}" for f in fs if f.verdict == check.FAIL]
            for f in fs:
                key = (scope, f.check)
                failures[key] = failures.get(key, 0) + (1 if f.verdict == check.FAIL else 0)
        problems = [line for lines in by_scope.values() for line in lines]
        now_logged = {k for k in self._logged if k[0] in everything and k[0] not in found}
        for scope, fs in found.items():
            for f in fs:
                if f.verdict in (check.FAIL, check.WARN):
                    now_logged.add((scope, f.check, f.detail))
                    if (scope, f.check, f.detail) not in self._logged:
                        self.log("verify_failed" if f.verdict == check.FAIL else "verify_warning",
                                 level="error" if f.verdict == check.FAIL else "warning",
                                 scope=scope, check=f.check, detail=f.detail, fix=f.fix)
        for scope, chk, _detail in self._logged - now_logged:
            if not any(k[:2] == (scope, chk) for k in now_logged):
                self.log("verify_recovered", scope=scope, check=chk)
        self._logged = now_logged
        with self._lock:
            self.failures = failures
            self._problems, self.problems = by_scope, problems
            if not problems:
                self.last_success = time.time()
            self.runs += 1

    def _close_strays(self) -> None:
        for scope, pin_dir in self.pin_dirs().items():
            if check.is_node_dir(pin_dir):
                continue   # a node scope judges every packet at tc: no socket escapes it by its cgroup
            try:
                strays = check.stray_sockets(scope)
            except OSError:
                continue
            if not strays:
                continue
            closed, errors = check.close_stray(strays)
            self.log("stray_sockets_closed", level="warning", scope=scope, closed=closed,
                     sockets=[f"pid {s.pid} ({s.comm}) {s.sock}" for s in strays], errors=errors,
                     note="sockets created outside the scope, brought in by a process that joined it: "
                          "their applications see the connections reset")
