"""netns.run_in runs a function inside another network namespace on the
calling thread (no thread started per call: with a thousand pods it cost
milliseconds each under load).  What that relies on, measured with a
namespace made here: setns changes only the calling thread's namespace, the
thread comes back (also when the function raises), and a socket made inside
keeps the namespace it was made in."""

from __future__ import annotations

import socket
import subprocess
import threading
import uuid

import pytest

from ksbpf.kernel import netns

pytestmark = pytest.mark.root

SO_NETNS_COOKIE = 71


def cookie_of(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def here() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return cookie_of(s)


@pytest.fixture
def other():
    name = f"ksbpft-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield f"/run/netns/{name}"
    subprocess.run(["ip", "netns", "del", name], check=True)


def test_runs_inside_and_comes_back(other):
    own = here()
    inside = netns.run_in(other, here)
    assert inside != own and here() == own
    sock = netns.run_in(other, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        assert cookie_of(sock) == inside   # made inside: stays there
    with pytest.raises(ZeroDivisionError):
        netns.run_in(other, lambda: 1 / 0)
    assert here() == own
    with pytest.raises(FileNotFoundError):
        netns.run_in(other + "-gone", here)
    assert here() == own


def test_other_threads_stay_where_they_are(other):
    """While one thread is inside, another thread's sockets are made in the process's namespace."""
    own = here()
    entered, release = threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def inside() -> None:
        seen["inside"] = here()
        entered.set()
        release.wait(10)
        seen["inside_after_wait"] = here()

    t = threading.Thread(target=netns.run_in, args=(other, inside))
    t.start()
    try:
        assert entered.wait(10)
        assert here() == own   # this thread, meanwhile
    finally:
        release.set()
        t.join(10)
    assert seen["inside"] == seen["inside_after_wait"] != own
