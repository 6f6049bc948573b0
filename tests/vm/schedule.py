"""Run the VM test's boots a few at a time (host side).

A guest under TCG keeps about one of the host's cores busy, whatever its -smp:
booted one after another, the kernels x scenarios left the second core idle
for most of an hour.  A Schedule knows every boot the selected tests need (a
Job: one guest, one or more boots of it in sequence), starts them up to
`parallel` at once -- a job whose guest is a later boot of another job's
machine only once that one powered off -- the longest chains first, and hands
each test its boots when they are done.  The results are the same Boot
objects the tests judged when they booted the guests themselves.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable

from .qemu import Boot, Guest


@dataclass
class Job:
    key: tuple[str, str]                 # (kernel name, job name)
    make: Callable[["Guest | None"], Guest]   # the job's guest, given its parent's (after=)
    boots: tuple[tuple[str, float], ...]      # (scenario, timeout) booted in sequence on that guest
    estimate: float                      # seconds, measured: which chains to start first
    after: "Job | None" = None
    future: Future = field(default_factory=Future)
    guest: Guest | None = None
    started: float = 0.0
    children: list["Job"] = field(default_factory=list)

    @property
    def rank(self) -> float:
        """The longest chain of work from this job on."""
        return self.estimate + max((c.rank for c in self.children), default=0.0)


class Schedule:
    def __init__(self, parallel: int):
        self.parallel = max(1, parallel)
        self.jobs: dict[tuple[str, str], Job] = {}
        self.origin = time.monotonic()
        self._lock = threading.Condition()
        self._running = 0
        self._thread: threading.Thread | None = None
        self._stop = False

    def add(self, job: Job) -> Job:
        self.jobs[job.key] = job
        if job.after is not None:
            job.after.children.append(job)
        return job

    def start(self) -> None:
        with self._lock:
            self._tick()   # the first boots start now
        self._thread = threading.Thread(target=self._run, name="vm-schedule", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """No new boots (those running finish: qemu is killed at its timeout)."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()

    def join(self, timeout: float = 60) -> None:
        """Wait for the jobs that started (after stop(), and their guests killed, they end at once)."""
        deadline = time.monotonic() + timeout
        for j in self.jobs.values():
            if j.started:
                try:
                    j.future.exception(max(0.0, deadline - time.monotonic()))
                except Exception:   # (a timeout: leave it; qemu was killed)
                    pass

    def result(self, key: tuple[str, str], wait_note: Callable[[str], None] | None = None) -> tuple[Guest, list[Boot]]:
        """The job's guest and its boots, once done (waiting for them)."""
        job = self.jobs[key]
        if not job.future.done() and wait_note:
            wait_note(f"waiting for {key[0]} {key[1]} ({self.describe()})")
        while True:   # (a wait in slices: ^C reaches the test at once)
            try:
                boots = job.future.result(timeout=1)
                return job.guest, boots
            except FutureTimeout:
                continue

    def describe(self) -> str:
        now = time.monotonic()
        with self._lock:   # (not between two starts of one turn)
            running = [f"{j.key[0]} {j.key[1]} since +{j.started - self.origin:.0f} s"
                       for j in self.jobs.values() if j.started and not j.future.done()]
            waiting = sum(1 for j in self.jobs.values() if not j.started)
        return f"+{now - self.origin:.0f} s; running: {', '.join(running) or 'none'}; {waiting} not started"

    def _ready(self) -> list[Job]:
        out = []
        for j in self.jobs.values():
            if j.started or j.future.done():
                continue
            if j.after is not None and not j.after.future.done():
                continue
            out.append(j)
        return sorted(out, key=lambda j: -j.rank)

    def _tick(self) -> bool:
        """Start what can start now (the lock held); False once there is nothing left to start."""
        if self._stop:
            for j in self.jobs.values():
                if not j.started and not j.future.done():
                    j.future.set_exception(RuntimeError("the VM test stopped before this boot"))
            return False
        if all(j.future.done() for j in self.jobs.values()):
            return False
        ready = self._ready()
        while ready and self._running < self.parallel:
            job = ready.pop(0)
            job.started = time.monotonic()
            self._running += 1
            threading.Thread(target=self._work, args=(job,), name=f"vm-{job.key[0]}-{job.key[1]}",
                             daemon=True).start()
        return True

    def _run(self) -> None:
        with self._lock:
            while self._tick():
                self._lock.wait(5)

    def _work(self, job: Job) -> None:
        try:
            if job.after is not None and job.after.future.exception() is not None:
                raise RuntimeError(f"its machine's earlier boot ({job.after.key[1]}) failed: "
                                   f"{job.after.future.exception()}")
            job.guest = job.make(job.after.guest if job.after else None)
            boots = []
            for scenario, timeout in job.boots:
                if self._stop:
                    raise RuntimeError("the VM test stopped before this boot")
                boots.append(job.guest.boot(scenario, timeout))
                b = boots[-1]
                if b.died is not None or b.timed_out or b.result is None:
                    break   # a later boot of a machine that did not finish this one would say nothing
            job.future.set_result(boots)
        except BaseException as exc:   # the test that asks for the job fails with it
            job.future.set_exception(exc)
        finally:
            with self._lock:
                self._running -= 1
                self._lock.notify_all()


def default_parallel() -> int:
    """KSBPF_VM_PARALLEL, else as many guests as the host has cores, at most 3."""
    value = os.environ.get("KSBPF_VM_PARALLEL", "")
    if value:
        return max(1, int(value))
    return max(1, min(3, os.cpu_count() or 1))
