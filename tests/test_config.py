"""The daemon's configuration file: parsing, and every problem reported with
its line and key.  No root needed; nothing on the system is touched."""

from __future__ import annotations

import ipaddress
import json
import os
import textwrap

import pytest
from click.testing import CliRunner

from ksbpf import cli
from ksbpf.daemon.config import DEFAULT_LISTEN, DEFAULT_TUNNEL_KINDS, KEYS, Config, ConfigError, _Locator, load, parse
from ksbpf.errors import KsbpfError
from ksbpf.policy import Endpoint, Options

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "deploy", "ksbpf.toml.example")

FULL = """\
[metrics]
listen = "[::1]:9100"

[daemon]
log_format = "json"

[[scope]]
cgroup = "/sys/fs/cgroup//vpn.slice/"
tunnels = ["wg0", "wg1"]
endpoints = ["203.0.113.5:51820/udp", "[2001:db8::5]:51820/udp"]
netns = "vpn"
allow_lan = true
allow_lan_dns = true
allow_dhcp = true
tunnel_kinds = ["wireguard"]
create_cgroup = true
deny_tun = true

[[scope]]
cgroup = "/sys/fs/cgroup/other.slice"
tunnels = ["tun0"]
"""


def issues(text: str) -> list[tuple[int | None, str]]:
    """(line, key) of every issue parse() reports."""
    with pytest.raises(ConfigError) as exc:
        parse(text, "t.toml")
    return [(i.line, i.key) for i in exc.value.errors]


def test_full_config():
    cfg = parse(FULL, "k.toml")
    assert (cfg.path, cfg.listen_host, cfg.listen_port, cfg.listen, cfg.log_format) == \
           ("k.toml", "::1", 9100, "[::1]:9100", "json")
    first, second = cfg.scopes
    assert first.cgroup == "/sys/fs/cgroup/vpn.slice"  # normalised
    assert first.line == 7
    assert first.policy.tunnels == ("wg0", "wg1")
    assert first.policy.endpoints == (Endpoint(ipaddress.ip_address("203.0.113.5"), 51820, "udp"),
                                      Endpoint(ipaddress.ip_address("2001:db8::5"), 51820, "udp"))
    assert first.policy.netns == "vpn"
    assert first.policy.options == Options(allow_lan=True, allow_lan_dns=True, allow_dhcp=True)
    assert first.policy.tunnel_kinds == ("wireguard",)
    assert first.create_cgroup is True
    assert first.policy.deny_tun is True
    # Defaults when omitted.
    assert second.line == 19
    assert second.policy.deny_tun is False
    assert second.policy.endpoints == () and second.policy.netns == "" and second.policy.options == Options()
    assert set(second.policy.tunnel_kinds) == set(DEFAULT_TUNNEL_KINDS) == {"wireguard", "tun"}
    assert second.create_cgroup is False


def test_empty_file_is_valid_with_defaults():
    cfg = parse("", "e.toml")
    assert cfg == Config("e.toml", "127.0.0.1", 12479, "text", ())
    assert cfg.listen == DEFAULT_LISTEN


def test_example_file_parses():
    cfg = load(EXAMPLE)
    assert [s.cgroup for s in cfg.scopes] == ["/sys/fs/cgroup/vpn.slice", "/sys/fs/cgroup/work.slice"]
    keys = {"cgroup", "tunnels", "endpoints", "netns", "allow_lan", "allow_lan_dns", "allow_dhcp",
            "tunnel_kinds", "create_cgroup", "listen", "log_format", "deny_tun"}
    with open(EXAMPLE) as f:
        text = f.read()
    assert all(f"\n{k} =" in text for k in keys)  # the example shows every key


def test_load_unreadable_file(tmp_path):
    with pytest.raises(KsbpfError) as exc:
        load(str(tmp_path / "missing.toml"))
    assert not isinstance(exc.value, ConfigError)
    assert "missing.toml" in str(exc.value) and "\n" not in str(exc.value)
    (tmp_path / "bom.toml").write_bytes(b'\xef\xbb\xbf[daemon]\r\nlog_format = "json"\r\n')
    assert load(str(tmp_path / "bom.toml")).log_format == "json"
    (tmp_path / "latin1.toml").write_bytes(b'# caf\xe9\n')
    with pytest.raises(KsbpfError, match="not UTF-8"):
        load(str(tmp_path / "latin1.toml"))


SCOPE = '[[scope]]\ncgroup = "/sys/fs/cgroup/a"\ntunnels = ["wg0"]\n'  # lines 1-3


@pytest.mark.parametrize("text, line, key, needle", [
    # TOML syntax: tomllib's line, the column kept in the message.
    ('[daemon]\nlog_format = text\n', 2, "syntax", "Invalid value (column 14)"),
    ('a = "x', 1, "syntax", "end of document"),
    # Unknown tables and keys, with the closest known one.
    ('[metric]\nlisten = "127.0.0.1:1"\n', 1, "metric", "did you mean 'metrics'?"),
    ('[[scopes]]\ncgroup = "/a"\n', 1, "scopes", "did you mean 'scope'?"),
    ('\nverbose = true\n', 2, "verbose", "known keys: metrics, daemon, scope"),
    ('[metrics]\nlisen = "127.0.0.1:1"\n', 2, "metrics.lisen", "did you mean 'listen'?"),
    ('[daemon]\nlog-format = "json"\n', 2, "daemon.log-format", "did you mean 'log_format'?"),
    (SCOPE + 'allow-lan = true\n', 4, "scope[0].allow-lan", "did you mean 'allow_lan'?"),
    # Wrong types.
    ('[[scope]]\ncgroup = "/a"\ntunnels = "wg0"\n', 3, "scope[0].tunnels", "expected an array of interface names"),
    ('[[scope]]\ncgroup = "/a"\ntunnels = ["wg0", 5]\n', 3, "scope[0].tunnels[1]", "an integer is not valid here; expected a string"),
    ('[[scope]]\ncgroup = ["/a"]\ntunnels = ["wg0"]\n', 2, "scope[0].cgroup", "an array is not valid here"),
    (SCOPE + 'allow_lan = "yes"\n', 4, "scope[0].allow_lan", "a string is not valid here; expected true or false"),
    (SCOPE + 'create_cgroup = 1\n', 4, "scope[0].create_cgroup", "an integer is not valid"),
    (SCOPE + 'deny_tun = "yes"\n', 4, "scope[0].deny_tun", "a string is not valid here; expected true or false"),
    (SCOPE + 'netns = 3\n', 4, "scope[0].netns", "an integer is not valid"),
    (SCOPE + 'endpoints = "1.2.3.4:1/udp"\n', 4, "scope[0].endpoints", "expected an array"),
    (SCOPE + 'tunnel_kinds = "tun"\n', 4, "scope[0].tunnel_kinds", "expected an array"),
    ('metrics = 5\n', 1, "metrics", "expected a [metrics] table"),
    ('[metrics]\nlisten = 12479\n', 2, "metrics.listen", "an integer is not valid"),
    ('daemon = "x"\n', 1, "daemon", "expected a [daemon] table"),
    ('scope = "x"\n', 1, "scope", "expected [[scope]] tables, got a string"),
    ('scope = [1]\n', 1, "scope[0]", "expected a table, got an integer"),
    # Missing and empty.
    ('\n[[scope]]\ntunnels = ["wg0"]\n', 2, "scope[0].cgroup", "missing"),
    ('[[scope]]\ncgroup = "/a"\n', 1, "scope[0].tunnels", "missing"),
    ('[[scope]]\ncgroup = "/a"\ntunnels = []\n', 3, "scope[0].tunnels", "no tunnel interface given"),
    (SCOPE + 'tunnel_kinds = []\n', 4, "scope[0].tunnel_kinds", "not valid"),
    (SCOPE + 'tunnel_kinds = ["wireguard", ""]\n', 4, "scope[0].tunnel_kinds", "not valid"),
    # The policy's own checks (shared with the CLI), said in config words.
    (SCOPE + 'endpoints = ["203.0.113.5:51820/udp", "203.0.113.5/udp"]\n', 4, "scope[0].endpoints[1]", "has no port"),
    (SCOPE + 'endpoints = ["vpn.example.com:51820/udp"]\n', 4, "scope[0].endpoints[0]", "not an IP address"),
    (SCOPE + 'endpoints = ["auto", "auto:run/openvpn/x.sock"]\n', 4, "scope[0].endpoints[1]", "not an absolute socket path"),
    (SCOPE + 'netns = "each"\nendpoints = ["auto"]\n', 5, "scope[0].endpoints", "not followed across the namespaces"),
    ('[[scope]]\ncgroup = "/a"\ntunnels = ["wg0", "a-name-far-too-long"]\n', 3, "scope[0].tunnels[1]", "not a valid interface name"),
    ('[[scope]]\ncgroup = "/a"\ntunnels = ["wg0", "wg0"]\n', 3, "scope[0].tunnels", "named twice"),
    (SCOPE + 'allow_lan_dns = true\n', 4, "scope[0].allow_lan_dns", "allow_lan_dns only widens allow_lan; add allow_lan"),
    # cgroups.
    ('[[scope]]\ncgroup = "vpn.slice"\ntunnels = ["wg0"]\n', 2, "scope[0].cgroup", "not an absolute path"),
    (SCOPE + '\n[[scope]]\ncgroup = "/sys/fs/cgroup//a/"\ntunnels = ["wg1"]\n', 6, "scope[1].cgroup",
     "/sys/fs/cgroup/a is already the cgroup of scope[0]"),
    # metrics.listen and daemon.log_format.
    ('[metrics]\nlisten = "127.0.0.1"\n', 2, "metrics.listen", "has no port"),
    ('[metrics]\nlisten = "127.0.0.1:0"\n', 2, "metrics.listen", "not in 1-65535"),
    ('[metrics]\nlisten = "[::1]:65536"\n', 2, "metrics.listen", "not in 1-65535"),
    ('[metrics]\nlisten = "::1:12479"\n', 2, "metrics.listen", "needs brackets"),
    ('[metrics]\nlisten = "localhost:12479"\n', 2, "metrics.listen", "not an IP address"),
    ('[metrics]\nlisten = "[127.0.0.1]:12479"\n', 2, "metrics.listen", "only for IPv6"),
    ('[metrics]\nlisten = ":12479"\n', 2, "metrics.listen", "malformed"),
    ('[daemon]\n\nlog_format = "xml"\n', 3, "daemon.log_format", 'use "text" or "json"'),
    # [scope] instead of [[scope]].
    ('[metrics]\n[scope]\ncgroup = "/a"\ntunnels = ["wg0"]\n', 2, "scope", "write [[scope]] (double brackets)"),
])
def test_each_problem_names_line_and_key(text, line, key, needle):
    with pytest.raises(ConfigError) as exc:
        parse(text, "t.toml")
    found = {(i.line, i.key): i for i in exc.value.errors}
    assert (line, key) in found, exc.value.errors
    issue = found[(line, key)]
    assert needle in issue.message
    assert str(issue) == f"t.toml:{line}: {key}: {issue.message}"
    assert "; " in issue.message  # every message carries a fix


def test_typo_in_scope_key_reports_the_typo_and_the_missing_key():
    assert issues('[[scope]]\ncgroup = "/a"\ntunnel = ["wg0"]\n') == [(1, "scope[0].tunnels"), (3, "scope[0].tunnel")]


def test_every_problem_is_reported_in_line_order():
    text = textwrap.dedent("""\
        [metrics]
        listen = "127.0.0.1:99999"
        [daemon]
        log_format = "xml"
        [[scope]]
        cgroup = "/a"
        tunnels = ["wg0"]
        endpoints = ["1.2.3.4/udp", "5.6.7.8:1/udp", "bad"]
        [[scope]]
        cgroup = "/a/"
        tunnels = ["wg0", "wg 1"]
        allow_lan_dns = true
        """)
    assert issues(text) == [(2, "metrics.listen"), (4, "daemon.log_format"), (8, "scope[0].endpoints[0]"),
                            (8, "scope[0].endpoints[2]"), (10, "scope[1].cgroup"), (11, "scope[1].tunnels[1]")]
    # Checks that need a policy (kinds, allow_lan_dns) run once the tunnel names are valid:
    text = text.replace('"wg 1"', '"wg1"') + 'tunnel_kinds = [""]\n'
    assert issues(text)[-2:] == [(12, "scope[1].allow_lan_dns"), (13, "scope[1].tunnel_kinds")]


def test_config_error_is_one_line_pointing_to_check_config():
    with pytest.raises(ConfigError) as exc:
        parse('[metrics]\nlisten = "x"\n[daemon]\nlog_format = "xml"\n', "t.toml")
    text = str(exc.value)
    assert "\n" not in text and text.startswith("t.toml:2: metrics.listen: ")
    assert "1 more problem(s): `ksbpf check-config t.toml`" in text
    assert isinstance(exc.value, KsbpfError)


# --- the line locator ---------------------------------------------------------

def test_locator_multiline_values_and_strings_do_not_fake_keys():
    text = textwrap.dedent('''\
        [[scope]]
        cgroup = """
        tunnels = ["x"]
        [metrics]
        """
        tunnels = [
            "wg0",  # a comment with [ brackets
            ["nested"],
        ]
        "netns" = 5 # quoted key
        allow . lan = true
        ''')
    assert issues(text) == [(2, "scope[0].cgroup"), (6, "scope[0].tunnels[1]"),
                            (10, "scope[0].netns"), (11, "scope[0].allow")]


def test_locator_paths():
    where = _Locator(textwrap.dedent("""\
        top = 1
        [[scope]]
        cgroup = "/a"
        [[scope]]
          'cgroup'="/b"
        [scope.sub]
        key = 1
        [metrics]
        listen = { host = "x" }
        """))
    assert where.line(("top",)) == 1
    assert where.line(("scope",)) == 2 and where.line(("scope", 0)) == 2 and where.line(("scope", 0, "cgroup")) == 3
    assert where.line(("scope", 1)) == 4 and where.line(("scope", 1, "cgroup")) == 5
    assert where.line(("scope", 1, "sub")) == 6 and where.line(("scope", 1, "sub", "key")) == 7
    assert where.line(("scope", 1, "tunnels", 3)) == 4  # absent: its table's header
    assert where.line(("metrics", "listen", "host")) == 9  # inside an inline table: the key's line
    assert where.line(("nowhere",)) is None


def test_inline_tables_fall_back_without_crashing():
    assert issues('metrics = { listen = "x" }\n') == [(1, "metrics.listen")]
    assert issues('scope = [{ cgroup = "a", tunnels = ["wg0"] }]\n') == [(1, "scope[0].cgroup")]


# --- ksbpf check-config -------------------------------------------------------

def run(*args: str):
    return CliRunner().invoke(cli.main, ["check-config", *args])


def test_check_config_valid(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text(FULL)
    result = run(str(path))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"{path}: valid; 2 scope(s); metrics on [::1]:9100; log format json" in out
    assert "/sys/fs/cgroup/vpn.slice (line 7), created if missing" in out
    assert "203.0.113.5:51820/udp, [2001:db8::5]:51820/udp" in out
    assert "allow_lan, allow_lan_dns, allow_dhcp" in out and "netns vpn" in out


def test_check_config_invalid_prints_one_issue_per_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[metrics]\nlisten = "x"\n[[scope]]\ncgroup = "rel"\ntunnel = ["wg0"]\n')
    result = run(str(path))
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert [ln.split(": ")[0:2] for ln in lines] == [
        [f"{path}:2", "metrics.listen"], [f"{path}:3", "scope[0].tunnels"],
        [f"{path}:4", "scope[0].cgroup"], [f"{path}:5", "scope[0].tunnel"]]


def test_check_config_json(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(FULL)
    result = run(str(path), "--json")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["valid"] is True and doc["errors"] == [] and doc["listen"] == "[::1]:9100"
    assert doc["scopes"][0]["cgroup"] == "/sys/fs/cgroup/vpn.slice"
    assert doc["scopes"][0]["endpoints"] == ["203.0.113.5:51820/udp", "[2001:db8::5]:51820/udp"]
    assert doc["scopes"][0]["options"] == {"allow_lan": True, "allow_lan_dns": True, "allow_dhcp": True}

    path.write_text('[daemon]\nlog_format = "xml"\n')
    result = run(str(path), "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["valid"] is False and doc["scopes"] == []
    assert doc["errors"] == [{"line": 2, "key": "daemon.log_format",
                              "message": "'xml' is not a log format; use \"text\" or \"json\""}]


def test_check_config_missing_file(tmp_path):
    result = run(str(tmp_path / "none.toml"))
    assert result.exit_code == 1
    assert result.stderr.startswith("ksbpf: error: cannot read the configuration file")


def test_example_node_table_parses_when_uncommented():
    """The example's [node] table is commented out (node mode guards the whole
    machine: opt in); uncommented, it is valid and shows every key."""
    with open(EXAMPLE) as f:
        text = f.read()
    node_text = text[text.index("# [node]"):]
    uncommented = "\n".join(line[2:].split("  #")[0] if line.startswith("# ") and ("=" in line or "[node]" in line)
                            else "" for line in node_text.splitlines())
    cfg = parse(uncommented)
    assert cfg.node is not None
    assert set(KEYS["node"]) == {line.split("=")[0].strip() for line in uncommented.splitlines() if "=" in line}
    n = cfg.node.node
    assert n.policy.options.allow_dhcp and "docker*" in n.internal and "tap*" in n.internal


def test_node_table():
    cfg = parse('[node]\ntunnels = ["wg0"]\nendpoints = ["203.0.113.5:51820/udp"]\n'
                'exempt_cgroups = ["/sys/fs/cgroup/ssh/"]\ninternal = ["tap*"]\ndefault_internal = false\n'
                'allow_dhcp = false\ntc_mode = "clsact"\n', "n.toml")
    n = cfg.node.node
    assert (cfg.node.line, n.internal, n.exempt_cgroups, n.tc_mode) == (1, ("tap*",), ("/sys/fs/cgroup/ssh",), "clsact")
    assert not n.policy.options.allow_dhcp
    assert cfg.to_dict()["node"]["tunnels"] == ["wg0"]
    assert parse('[node]\ntunnels = ["wg0"]\n').node.node.policy.options.allow_dhcp   # on by default


@pytest.mark.parametrize("body,key,words", [
    ('tunnels = ["wg0"]\ntc_mode = "ebpf"', "node.tc_mode", "not a tc mode"),
    ('tunnels = ["wg0"]\nexempt_cgroups = ["ssh.service"]', "node.exempt_cgroups[0]", "absolute path"),
    ('tunnels = ["wg0"]\ninternal = ["a b"]', "node.internal", "interface name pattern"),
    ('endpoints = []', "node.tunnels", "missing"),
    ('tunnels = ["wg0"]\nexempt = []', "node.exempt", "did you mean 'exempt_cgroups'"),
])
def test_node_table_errors(body, key, words):
    with pytest.raises(ConfigError) as exc:
        parse(f"[node]\n{body}\n", "n.toml")
    issues = [i for i in exc.value.errors if i.key == key]
    assert issues and words in issues[0].message, exc.value.errors


def test_node_must_be_a_single_table():
    with pytest.raises(ConfigError) as exc:
        parse('[[node]]\ntunnels = ["wg0"]\n', "n.toml")
    assert "single brackets" in str(exc.value)


def test_endpoints_auto_follow_the_tunnel():
    cfg = parse('[[scope]]\ncgroup = "/a"\ntunnels = ["wg0", "tun0"]\n'
                'endpoints = ["auto", "203.0.113.5:51820/udp", "auto:/run/openvpn/client.sock", "auto"]\n', "t.toml")
    policy = cfg.scopes[0].policy
    assert policy.follow == ("auto", "/run/openvpn/client.sock")   # once each, in order
    assert [str(e) for e in policy.endpoints] == ["203.0.113.5:51820/udp"]
    assert policy.endpoint_specs() == ["203.0.113.5:51820/udp", "auto", "auto:/run/openvpn/client.sock"]


def test_vpn_mark_and_vpn_cgroup_keys():
    """vpn_mark (a number or "MARK/MASK"), vpn_cgroup (a path or an array), and
    wildcard endpoints, in a scope and in [node]."""
    cfg = parse('[[scope]]\ncgroup = "/a"\ntunnels = ["wg0"]\nendpoints = ["*:51820/udp", "203.0.113.5:1194/udp"]\n'
                'vpn_mark = "0xca6c/0xffff"\n'
                '[node]\ntunnels = ["wg0"]\nendpoints = ["*:51820/udp"]\nvpn_mark = 51820\n'
                'vpn_cgroup = ["/sys/fs/cgroup/vpn/", "/sys/fs/cgroup/ovpn"]\n', "v.toml")
    p = cfg.scopes[0].policy
    assert p.vpn_mark == (0xCA6C, 0xFFFF) and [str(e) for e in p.any_endpoints] == ["*:51820/udp"]
    assert [str(e) for e in p.endpoints] == ["203.0.113.5:1194/udp"] and p.options.vpn_mark
    assert p.endpoint_specs() == ["203.0.113.5:1194/udp", "*:51820/udp"]
    n = cfg.node.node.policy
    assert n.vpn_mark == (51820, 0xFFFFFFFF) and n.vpn_cgroups == ("/sys/fs/cgroup/vpn", "/sys/fs/cgroup/ovpn")
    assert n.options.vpn_cgroup and n.options.vpn_mark
    one = parse('[[scope]]\ncgroup = "/a"\ntunnels = ["wg0"]\nvpn_cgroup = "/sys/fs/cgroup/vpn"\n', "o.toml")
    assert one.scopes[0].policy.vpn_cgroups == ("/sys/fs/cgroup/vpn",)


@pytest.mark.parametrize("body,key,words", [
    ('endpoints = ["*:51820/udp"]', "scope[0].endpoints", "names every address"),
    ('vpn_mark = "0"', "scope[0].vpn_mark", "is zero"),
    ('vpn_mark = "0x10/0x1"', "scope[0].vpn_mark", "outside its mask"),
    ('vpn_mark = true', "scope[0].vpn_mark", "expected a mark"),
    ('vpn_cgroup = ["vpn.service"]', "scope[0].vpn_cgroup[0]", "absolute path"),
    ('endpoints = ["*:0/udp"]\nvpn_mark = 1', "scope[0].endpoints[0]", "1-65535"),
])
def test_vpn_key_errors(body, key, words):
    with pytest.raises(ConfigError) as exc:
        parse(f'[[scope]]\ncgroup = "/a"\ntunnels = ["wg0"]\n{body}\n', "v.toml")
    issues = [i for i in exc.value.errors if i.key == key]
    assert issues and words in issues[0].message, exc.value.errors
