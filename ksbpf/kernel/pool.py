"""Programs verified ahead of time.

Loading a program costs the kernel's verifier most of the time it takes to
protect a scope (~0.1 s for ksbpf's program); a daemon that protects pods
as they start keeps a few programs of each option set it has seen loaded,
each with its own fresh maps, by a worker thread (the verifier runs in the
bpf() system call, which releases the GIL: the event loop goes on).  Taking
one costs nothing; the worker loads its replacement.  Only programs whose
compiled image is cached are preloaded: compiling is never done here.
"""

from __future__ import annotations

import threading

from ksbpf.kernel import bpf, libbpf
from ksbpf.policy import EventSettings, Options

DEPTH = 4   # programs kept ready per option set


class ProgramPool:
    def __init__(self, depth: int = DEPTH):
        self.depth = depth
        self._ready: dict[tuple, list[bpf.LoadedProgram]] = {}
        self._wanted: dict[tuple, tuple[Options, int, EventSettings]] = {}
        self._images: dict[tuple, bpf.ProgramImage] = {}
        self._cond = threading.Condition()
        self.hits = self.misses = 0
        libbpf.num_possible_cpus()   # initialise the library on this thread first
        self._thread = threading.Thread(target=self._fill, name="program-pool", daemon=True)
        self._thread.start()

    def load(self, options: Options, n_endpoints: int = 0, events: EventSettings = EventSettings(),
             entries: tuple[str, ...] = (bpf.ENTRY_CGROUP,)) -> bpf.LoadedProgram:
        """bpf.load()'s result, taken from the pool when one is ready."""
        key = (tuple(bpf.cflags(options, n_endpoints, events)), tuple(entries))
        with self._cond:
            ready = self._ready.get(key)
            prog = ready.pop() if ready else None
            self._wanted[key] = (options, n_endpoints, events)
            self._cond.notify()
        if prog is not None:
            self.hits += 1
            return prog
        self.misses += 1
        return bpf.load(options, n_endpoints, events, entries=tuple(entries))

    def _fill(self) -> None:
        while True:
            with self._cond:
                todo = [(k, args) for k, args in self._wanted.items()
                        if len(self._ready.get(k, ())) < self.depth and bpf.image_cached(*args)]
                if not todo:
                    self._cond.wait(5.0)
                    continue
            for key, args in todo:
                try:
                    flags, entries = key
                    image = self._images.get(flags)
                    if image is None:   # parsed once: the JSON and its hex cost more than the copy
                        with open(bpf._cache_path(bpf.cache_dir(), list(flags))) as f:
                            image = self._images[flags] = bpf.ProgramImage.from_json(f.read())
                    prog = image.load(entries)
                except Exception:
                    continue   # refused now (memory?): the caller loads its own
                with self._cond:
                    self._ready.setdefault(key, []).append(prog)
