"""A pipe that wakes the daemon's poll loop from another thread."""

from __future__ import annotations

import os


class Wakeup:
    def __init__(self):
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._read_fd

    def wake(self) -> None:
        try:
            os.write(self._write_fd, b"!")
        except BlockingIOError:
            pass   # the pipe is full: the loop is awake anyway

    def drain(self) -> None:
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self._read_fd)
        os.close(self._write_fd)
