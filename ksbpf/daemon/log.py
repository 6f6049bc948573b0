"""Structured event log: one line per event, human-readable or JSON."""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

LEVELS = ("debug", "info", "notice", "warning", "error")


class EventLog:
    """log("tunnel_appeared", scope=..., ifindex=5) writes one line:

    text: 2026-11-25T19:10:00.123Z info    tunnel_appeared scope=/sys/fs/cgroup/x ifindex=5
    json: {"time": "...", "level": "info", "event": "tunnel_appeared", "scope": "...", "ifindex": 5}
    """

    def __init__(self, fmt: str = "text", stream: TextIO | None = None):
        if fmt not in ("text", "json"):
            raise ValueError(f"log format must be text or json, not {fmt!r}")
        self.fmt = fmt
        self.stream = stream or sys.stderr

    def __call__(self, event: str, level: str = "info", **fields) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        if self.fmt == "json":
            line = json.dumps({"time": stamp, "level": level, "event": event, **fields}, default=str)
        else:
            parts = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
            line = f"{stamp} {level:<7} {event} {parts}".rstrip()
        self.stream.write(line + "\n")
        self.stream.flush()


def _text(value) -> str:
    s = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return json.dumps(s) if (not s or any(c in s for c in ' "=')) else s
