"""The daemon's zero-traffic check is incremental: after a change only the
scope that changed is checked (a new pod among a thousand costs one scope's
check, not a thousand), the others keep their last results, a removed scope's
results go, and the periodic run (or a change with no scope named) checks
every scope.  The checks themselves are stood in for: what is measured here
is which scopes the verifier's thread asks about, and what it reports."""

from __future__ import annotations

import threading
import time

import pytest

from ksbpf.daemon import verifier as vmod
from ksbpf.verify import check


class FakeChecks:
    def __init__(self):
        self.calls: list[str] = []
        self.failing: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, pin_dir: str):
        with self.lock:
            self.calls.append(pin_dir)
        scope = pin_dir.rsplit("/", 1)[1]
        if scope in self.failing:
            return [check.Finding(scope, "attached", check.FAIL, "not attached", "attach it again")]
        return [check.Finding(scope, "attached", check.PASS, "attached")]

    def take(self) -> list[str]:
        with self.lock:
            out, self.calls = sorted(self.calls), []
        return out


@pytest.fixture
def verifier(monkeypatch):
    fake = FakeChecks()
    monkeypatch.setattr(check, "check_pin_dir", fake)
    monkeypatch.setattr(vmod, "QUIET_SECONDS", 0.05)
    monkeypatch.setattr(vmod, "CONFIRM_SECONDS", 0.01)
    scopes = {f"s{i}": f"/pins/s{i}" for i in range(50)}
    v = vmod.Verifier(lambda *a, **k: None, lambda: dict(scopes), interval=3600)
    v.start()
    assert v.wait_for_run(0, 10)   # the first run: every scope
    yield v, fake, scopes
    v.stop()


def run(v, scope=None) -> None:
    before = v.runs
    v.soon(scope)
    assert v.wait_for_run(before, 10)


def test_a_change_checks_only_its_scope(verifier):
    v, fake, scopes = verifier
    assert fake.take() == sorted(scopes.values())
    run(v, "s7")
    assert fake.take() == ["/pins/s7"]
    v.soon("s1")
    v.soon("s2")   # changes within the quiet time: one run of both
    deadline = time.monotonic() + 10
    while len(fake.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    assert fake.take() == ["/pins/s1", "/pins/s2"]


def test_results_of_other_scopes_stand_and_removed_scopes_go(verifier):
    v, fake, scopes = verifier
    fake.failing = {"s3", "s4"}
    run(v)   # no scope named: every scope
    assert v.failures[("s3", "attached")] == 1 and v.failures[("s4", "attached")] == 1
    assert v.failures[("s5", "attached")] == 0
    last = v.last_success
    fake.failing = {"s4"}
    run(v, "s3")   # s3 fixed; s4 not checked now: its failure stands
    assert v.failures[("s3", "attached")] == 0 and v.failures[("s4", "attached")] == 1
    assert any(p.startswith("s4: verify attached failed") for p in v.problems)
    assert not any(p.startswith("s3:") for p in v.problems)
    assert v.last_success == last   # s4 still fails
    del scopes["s4"]   # removed: its results go with it
    run(v, "s5")
    assert not any(k[0] == "s4" for k in v.failures) and not v.problems
    assert v.last_success is not None and v.last_success > (last or 0)


def started_held_back(monkeypatch, n: int, **events):
    """A verifier over n fake scopes, started with `events` (idle, unscraped)
    as given, once its first check has run: that check must have waited
    IDLE_WAIT_MAX (1 s) for them.  -> (verifier, fake checks, scopes, start)."""
    fake = FakeChecks()
    monkeypatch.setattr(check, "check_pin_dir", fake)
    monkeypatch.setattr(vmod, "QUIET_SECONDS", 0.0)
    monkeypatch.setattr(vmod, "IDLE_WAIT_MAX", 1.0)
    scopes = {f"s{i}": f"/pins/s{i}" for i in range(n)}
    v = vmod.Verifier(lambda *a, **k: None, lambda: dict(scopes), interval=3600, **events)
    start = time.monotonic()
    v.start()
    try:
        deadline = start + 10
        while not fake.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(fake.calls) == 1 and time.monotonic() - start >= 1.0   # waited
    except BaseException:
        for e in events.values():
            e.set()
        v.stop()
        raise
    return v, fake, scopes, start


def test_checks_wait_for_the_event_loop(monkeypatch):
    """The verifier's thread checks a scope only while the daemon's event loop waits for work (its
    `idle` event set), or after waiting IDLE_WAIT_MAX: a pod being protected does not share the GIL
    with a pass over every scope.  Measured against a loop that stays busy, then goes idle."""
    idle = threading.Event()   # the loop is busy
    v, fake, scopes, start = started_held_back(monkeypatch, 4, idle=idle)
    try:
        time.sleep(0.3)
        assert len(fake.calls) == 1   # busy: one scope per IDLE_WAIT_MAX, not the whole pass at once
        idle.set()                    # the loop waits for work: the rest of the pass at once
        assert v.wait_for_run(0, 10)
        assert fake.take() == sorted(scopes.values())
        assert time.monotonic() - start < 1.0 * len(scopes)
        idle.clear()
        t = time.monotonic()
        run(v, "s2")
        assert fake.take() == ["/pins/s2"] and time.monotonic() - t >= 1.0   # waited for the loop
    finally:
        idle.set()
        v.stop()


def test_checks_wait_for_a_scrape(monkeypatch):
    """Nor does a check run while a /metrics scrape does (the daemon's
    `unscraped` event cleared): a scrape of 1,000 pods would share the GIL
    with it.  The event loop is idle throughout; only the scrape holds it back."""
    idle, unscraped = threading.Event(), threading.Event()
    idle.set()
    v, fake, scopes, _ = started_held_back(monkeypatch, 3, idle=idle, unscraped=unscraped)
    try:
        unscraped.set()   # the scrape is done
        assert v.wait_for_run(0, 10)
        assert fake.take() == sorted(scopes.values())
        monkeypatch.setattr(vmod, "IDLE_WAIT_MAX", 60.0)   # a wait now would outlast run()'s 10 s
        run(v, "s1")
        assert fake.take() == ["/pins/s1"]   # no scrape: nothing to wait for
    finally:
        unscraped.set()
        v.stop()
