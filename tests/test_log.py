import io
import json

import pytest

from ksbpf.daemon.log import EventLog


def test_text_lines_are_one_event_each():
    out = io.StringIO()
    log = EventLog("text", out)
    log("tunnel_appeared", scope="/sys/fs/cgroup/a b", tunnel="wg0", ifindex=5, removed=[3, 4])
    (line,) = out.getvalue().splitlines()
    assert line.endswith('info    tunnel_appeared scope="/sys/fs/cgroup/a b" tunnel=wg0 ifindex=5 removed=3,4')
    assert line[:4].isdigit() and "Z " in line


def test_json_lines_parse():
    out = io.StringIO()
    log = EventLog("json", out)
    log("route_alert", level="warning", route="0.0.0.0/1 via 198.18.1.2", dev=["phy0"])
    log("ready", scopes=2)
    first, second = (json.loads(ln) for ln in out.getvalue().splitlines())
    assert first["event"] == "route_alert" and first["level"] == "warning" and first["dev"] == ["phy0"]
    assert second == {"time": second["time"], "level": "info", "event": "ready", "scopes": 2}


def test_unknown_format_is_refused():
    with pytest.raises(ValueError):
        EventLog("xml")
