"""The daemon's configuration file (TOML), parsed and validated.

Every problem is reported, not only the first, each naming the file, the
line and the key it is about and how to fix it.  tomllib gives no line
numbers for values, so _Locator scans the raw text for the line of each
table header and `key =`.  Policies are built with ksbpf.policy, so a scope
is checked exactly as `ksbpf attach` checks its options.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from ksbpf.daemon import trust
from ksbpf.errors import KsbpfError
from ksbpf.kernel import vpn_dns
from ksbpf.kubernetes import settings as kubernetes_settings
from ksbpf.policy import (
    DEFAULT_INTERNAL,
    DEFAULT_TUNNEL_KINDS,
    TC_MODES,
    Endpoint,
    EventSettings,
    NodePolicy,
    AnyEndpoint,
    Options,
    parse_endpoint_spec,
    parse_mark,
    Policy,
)

DEFAULT_LISTEN = "127.0.0.1:12479"  # outside the crowded 9100-9999 exporter range
LOG_FORMATS = ("text", "json")

# Known keys: of the file itself ("") and of each table.
KEYS: dict[str, tuple[str, ...]] = {
    "": ("metrics", "daemon", "scope", "node", "kubernetes"),
    "metrics": ("listen",),
    "daemon": ("log_format", "close_stray_sockets", "verify_interval"),
    "scope": ("cgroup", "tunnels", "endpoints", "netns", "allow_lan", "allow_lan_dns",
              "allow_dhcp", "tunnel_kinds", "create_cgroup", "events_rate", "events_burst", "deny_tun",
              "vpn_mark", "vpn_cgroup", "dns"),
    "node": ("netns", "tunnels", "endpoints", "allow_lan", "allow_lan_dns", "allow_dhcp", "tunnel_kinds",
             "internal", "default_internal", "exempt_cgroups", "tc_mode", "events_rate", "events_burst",
             "vpn_mark", "vpn_cgroup", "dns"),
    "kubernetes": kubernetes_settings.KEYS,
}

KeyPath = tuple[str | int, ...]  # ("scope", 0, "endpoints", 1) is scope[0].endpoints[1]
T = TypeVar("T")


@dataclass(frozen=True)
class ScopeConfig:
    """One [[scope]]: a cgroup and the policy that confines it."""

    cgroup: str  # absolute, os.path.normpath'ed (not resolved: it may not exist yet)
    policy: Policy
    create_cgroup: bool  # create the cgroup directory when it is missing
    line: int  # line of the [[scope]] header

    def to_dict(self) -> dict:
        return {"cgroup": self.cgroup, "line": self.line, **self.policy.to_dict(),
                "create_cgroup": self.create_cgroup}


@dataclass(frozen=True)
class NodeConfig:
    """The [node] table: node mode for one network namespace."""

    node: NodePolicy
    line: int  # line of the [node] header

    def to_dict(self) -> dict:
        return {"line": self.line, **self.node.to_dict()}


@dataclass(frozen=True)
class Config:
    """The whole file: where the daemon serves its metrics, how it logs, what it protects."""

    path: str
    listen_host: str  # an IP address; IPv6 without brackets
    listen_port: int
    log_format: str  # "text" | "json"
    scopes: tuple[ScopeConfig, ...]
    node: NodeConfig | None = None
    close_stray_sockets: bool = False   # close sockets created outside a scope held by its processes
    verify_interval: float = 300.0      # seconds between zero-traffic checks of every scope (ksbpf verify)
    kubernetes: kubernetes_settings.KubernetesSettings = kubernetes_settings.KubernetesSettings()

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"

    def to_dict(self) -> dict:
        return {"path": self.path, "listen": self.listen, "log_format": self.log_format,
                "close_stray_sockets": self.close_stray_sockets, "verify_interval": self.verify_interval,
                "scopes": [s.to_dict() for s in self.scopes],
                "node": self.node.to_dict() if self.node else None,
                "kubernetes": self.kubernetes.to_dict()}


@dataclass(frozen=True)
class ConfigIssue:
    """One problem: where it is (file, line, key) and what to do about it."""

    path: str
    line: int | None  # None: not located
    key: str  # "scope[1].endpoints[0]", "metrics.listen", "syntax" for a TOML syntax error
    message: str  # problem; fix

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.key}: {self.message}"

    def to_dict(self) -> dict:
        return {"line": self.line, "key": self.key, "message": self.message}


class ConfigError(KsbpfError):
    """The configuration is invalid; .errors holds every issue found (at least one)."""

    def __init__(self, errors: list[ConfigIssue]):
        self.errors = errors
        more = len(errors) - 1
        tail = f" (and {more} more problem(s): `ksbpf check-config {errors[0].path}` lists them all)" if more else ""
        super().__init__(f"{errors[0]}{tail}")


def load(path: str) -> Config:
    """Read and validate a configuration file: ConfigError lists every problem;
    a KsbpfError says why the file cannot be read."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # newline="": lines as tomllib counts them
            trust.require_root_only(path, f.fileno())   # like sshd's StrictModes
            text = f.read()
    except OSError as exc:
        raise KsbpfError(f"cannot read the configuration file {path}: {exc.strerror}",
                         "check the path and its permissions (an example: deploy/ksbpf.toml.example)") from None
    except UnicodeDecodeError:
        raise KsbpfError(f"the configuration file {path} is not UTF-8 text", "save it as UTF-8") from None
    return parse(text, path)


def parse(text: str, path: str = "<config>") -> Config:
    """Validate a configuration text; raises ConfigError listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_syntax_issue(exc, text, path)]) from None
    checker = _Checker(path, _Locator(text))
    config = checker.config(data)
    if checker.issues:
        raise ConfigError(sorted(checker.issues, key=lambda issue: issue.line or 0))
    return config


def _syntax_issue(exc: tomllib.TOMLDecodeError, text: str, path: str) -> ConfigIssue:
    """tomllib ends its message with "(at line N, column M)" or "(at end of document)"."""
    msg = str(exc)
    m = re.search(r"\s*\(at (?:line (\d+), (column \d+)|(end of document))\)$", msg)
    line = None if m is None else int(m[1]) if m[1] else text.rstrip().count("\n") + 1
    where = "" if m is None else f" ({m[2] or m[3]})"
    return ConfigIssue(path, line, "syntax", f"invalid TOML: {msg[:m.start()] if m else msg}{where}; "
                       "fix the syntax there (strings need quotes, lists use [ ]; see https://toml.io)")


# --- where things are -------------------------------------------------------

_KEY = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
_DOTTED = rf"{_KEY}(?:\s*\.\s*{_KEY})*"
_HEADER = re.compile(rf"\s*(\[\[?)\s*({_DOTTED})\s*\]")
_KEYVAL = re.compile(rf"\s*({_DOTTED})\s*=")
# Strings and comments, blanked before counting brackets (multi-line strings may end in 1-2 extra quotes).
_NOT_CODE = re.compile(r'''"""(?:[^\\]|\\.)*?"""(?!")|\'\'\'.*?\'\'\'(?!')|"(?:[^"\\\n]|\\.)*"|'[^'\n]*'|\#[^\n]*''', re.S)


def _key_parts(dotted: str) -> tuple[str, ...]:
    """The parts of a TOML key (bare, quoted or dotted), decoded by tomllib itself."""
    parts: list[str] = []
    node: Any = tomllib.loads(f"{dotted} = 0")
    while isinstance(node, dict):
        key, node = next(iter(node.items()))
        parts.append(key)
    return tuple(parts)


class _Locator:
    """Line of each table header and `key =` of a text tomllib accepted, by key
    path: [[scope]] headers are counted, so the second one is ("scope", 1).
    A value spanning lines (array, multi-line string) belongs to its key's
    line; keys inside inline tables are not recorded (see line())."""

    def __init__(self, text: str):
        self._lines: dict[KeyPath, int] = {}
        arrays: dict[KeyPath, int] = {}  # array-of-tables path -> index of its last element
        table: KeyPath = ()
        depth = 0  # brackets and braces still open: inside a value
        code_lines = _NOT_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m[0]), text).split("\n")
        for n, (line, code) in enumerate(zip(text.split("\n"), code_lines), 1):
            if depth == 0 and code.strip():
                if header := _HEADER.match(line):
                    table = self._table(_key_parts(header[2]), header[1] == "[[", arrays)
                    self._record(table, n)
                    continue
                if keyval := _KEYVAL.match(line):
                    self._record(table + _key_parts(keyval[1]), n)
            depth += code.count("[") + code.count("{") - code.count("]") - code.count("}")

    @staticmethod
    def _table(parts: tuple[str, ...], is_array: bool, arrays: dict[KeyPath, int]) -> KeyPath:
        path: KeyPath = ()
        for i, part in enumerate(parts):
            path += (part,)
            if is_array and i == len(parts) - 1:
                arrays[path] = arrays.get(path, -1) + 1
            if path in arrays:
                path += (arrays[path],)
        return path

    def _record(self, path: KeyPath, line: int) -> None:
        for end in range(1, len(path) + 1):  # a dotted key or nested header also locates its parents
            self._lines.setdefault(path[:end], line)

    def line(self, path: KeyPath) -> int | None:
        """The line of path, else of its nearest located parent (a list's key for its elements)."""
        while path and path not in self._lines:
            path = path[:-1]
        return self._lines.get(path)


def _key_name(path: KeyPath) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" if i else p for i, p in enumerate(path))


def _toml_type(value: object) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
                       (list, "an array"), (dict, "a table")):
        if isinstance(value, kind):
            return name
    return "a date/time"


def _config_words(message: str) -> str:
    """Shared policy messages name CLI options (--allow-lan); say the config key (allow_lan)."""
    return re.sub(r"(?<!\S)--([a-z][a-z-]*)", lambda m: m[1].replace("-", "_"), message)


# --- what is wrong ----------------------------------------------------------

class _Checker:
    """Builds a Config from tomllib's data, collecting every issue instead of stopping."""

    def __init__(self, path: str, where: _Locator):
        self.path = path
        self.where = where
        self.issues: list[ConfigIssue] = []

    def issue(self, at: KeyPath, message: str) -> None:
        self.issues.append(ConfigIssue(self.path, self.where.line(at), _key_name(at), message))

    def attempt(self, at: KeyPath, make: Callable[..., T], *args: Any) -> T | None:
        """make(*args), or None with its KsbpfError reported at `at`."""
        try:
            return make(*args)
        except KsbpfError as exc:
            self.issue(at, _config_words(str(exc)))
            return None

    def unknown(self, table: dict, at: KeyPath, known: tuple[str, ...]) -> None:
        for key in table:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
                self.issue(at + (key,), f"unknown key; {hint}")

    def get(self, table: dict, at: KeyPath, key: str, kind: type, expected: str) -> Any:
        """table[key] when it is a `kind`; None when absent or of another type (reported)."""
        value = table.get(key)
        if value is None or isinstance(value, kind):
            return value
        self.issue(at + (key,), f"{_toml_type(value)} is not valid here; expected {expected}")
        return None

    def strings(self, table: dict, at: KeyPath, key: str, expected: str) -> list[str] | None:
        """A list of strings, or None when absent or wrong (reported element by element)."""
        items = self.get(table, at, key, list, expected)
        if items is None:
            return None
        for i, item in enumerate(items):
            if not isinstance(item, str):
                self.issue(at + (key, i), f"{_toml_type(item)} is not valid here; expected a string")
        return items if all(isinstance(item, str) for item in items) else None

    def config(self, data: dict) -> Config:
        self.unknown(data, (), KEYS[""])
        metrics = self.get(data, (), "metrics", dict, "a [metrics] table") or {}
        self.unknown(metrics, ("metrics",), KEYS["metrics"])
        listen = self.get(metrics, ("metrics",), "listen", str, f'a string such as "{DEFAULT_LISTEN}"')
        host, port = self.listen(listen) if listen is not None else _split_listen(DEFAULT_LISTEN)
        daemon = self.get(data, (), "daemon", dict, "a [daemon] table") or {}
        self.unknown(daemon, ("daemon",), KEYS["daemon"])
        log_format = self.get(daemon, ("daemon",), "log_format", str, '"text" or "json"') or "text"
        if log_format not in LOG_FORMATS:
            self.issue(("daemon", "log_format"), f'{log_format!r} is not a log format; use "text" or "json"')
        close = self.get(daemon, ("daemon",), "close_stray_sockets", bool, "true or false") or False
        interval = self.get(daemon, ("daemon",), "verify_interval", (int, float), "a number of seconds")
        if interval is not None and not 10 <= interval <= 86400:
            self.issue(("daemon", "verify_interval"), f"{interval} is out of range; give 10 to 86400 seconds")
        node = None
        if "node" in data:
            table = self.get(data, (), "node", dict, "a [node] table (single brackets)")
            node = self.node(table, ("node",)) if table is not None else None
        return Config(self.path, host, port, log_format, self.scopes(data.get("scope", [])), node, close,
                      float(interval) if interval is not None else 300.0, self.kubernetes(data))

    def kubernetes(self, data: dict) -> kubernetes_settings.KubernetesSettings:
        table = self.get(data, (), "kubernetes", dict, "a [kubernetes] table") or {}
        self.unknown(table, ("kubernetes",), KEYS["kubernetes"])
        found, issues = kubernetes_settings.check(table)
        for key, message in issues:
            self.issue(("kubernetes", key), message)
        return found

    def listen(self, text: str) -> tuple[str, int]:
        try:
            return _split_listen(text)
        except KsbpfError as exc:
            self.issue(("metrics", "listen"), str(exc))
            return "", 0

    def scopes(self, raw: object) -> tuple[ScopeConfig, ...]:
        if isinstance(raw, dict):
            self.issue(("scope",), "[scope] is a single table; write [[scope]] (double brackets): "
                                   "each scope is one element of an array of tables")
            return ()
        if not isinstance(raw, list):
            self.issue(("scope",), f"expected [[scope]] tables, got {_toml_type(raw)}; write each scope as [[scope]] followed by its keys")
            return ()
        scopes, seen = [], {}
        for i, table in enumerate(raw):
            if not isinstance(table, dict):
                self.issue(("scope", i), f"expected a table, got {_toml_type(table)}; write each scope as [[scope]] followed by its keys")
            elif scope := self.scope(table, ("scope", i), seen):
                scopes.append(scope)
        return tuple(scopes)

    def scope(self, table: dict, at: KeyPath, seen: dict[str, str]) -> ScopeConfig | None:
        """One [[scope]]; seen maps the cgroups of earlier scopes to their key."""
        before = len(self.issues)
        self.unknown(table, at, KEYS["scope"])
        for key, example in (("cgroup", '"/sys/fs/cgroup/vpn.slice"'), ("tunnels", '["wg0"]')):
            if key not in table:
                self.issue(at + (key,), f"missing; every [[scope]] needs one, e.g. {key} = {example}")

        cgroup = self.get(table, at, "cgroup", str, 'an absolute path such as "/sys/fs/cgroup/vpn.slice"')
        if cgroup is not None and not os.path.isabs(cgroup):
            self.issue(at + ("cgroup",), f"{cgroup!r} is not an absolute path; give the cgroup directory's full path, e.g. /sys/fs/cgroup/vpn.slice")
        elif cgroup is not None:
            cgroup = os.path.normpath(cgroup)
            if cgroup in seen:
                self.issue(at + ("cgroup",), f"{cgroup} is already the cgroup of {seen[cgroup]}; merge the two scopes or remove one")
            seen.setdefault(cgroup, _key_name(at))

        create = self.get(table, at, "create_cgroup", bool, "true or false") or False
        deny_tun = self.get(table, at, "deny_tun", bool, "true or false") or False
        policy = self.policy_keys(table, at, dhcp_default=False)
        if policy is not None and deny_tun:
            policy = dataclasses.replace(policy, deny_tun=True)
        policy = self.dns_keys(table, at, policy)
        if len(self.issues) > before or policy is None or cgroup is None:
            return None
        return ScopeConfig(cgroup, policy, create, self.where.line(at) or 0)

    def node(self, table: dict, at: KeyPath) -> NodeConfig | None:
        """The [node] table: the same policy keys as a scope (allow_dhcp defaults
        to true: the machine's DHCP client must keep its lease), plus which
        interfaces are internal and which cgroups are exempt."""
        before = len(self.issues)
        self.unknown(table, at, KEYS["node"])
        if "tunnels" not in table:
            self.issue(at + ("tunnels",), 'missing; [node] needs one, e.g. tunnels = ["wg0"]')
        policy = self.dns_keys(table, at, self.policy_keys(table, at, dhcp_default=True))
        internal = self.strings(table, at, "internal", 'an array of interface name patterns such as ["docker*"]') or []
        default_internal = self.get(table, at, "default_internal", bool, "true or false")
        exempt = self.strings(table, at, "exempt_cgroups", 'an array of cgroup paths such as ["/sys/fs/cgroup/system.slice/ssh.service"]') or []
        tc_mode = self.get(table, at, "tc_mode", str, f"one of {', '.join(map(repr, TC_MODES))}") or "auto"
        if tc_mode not in TC_MODES:
            self.issue(at + ("tc_mode",), f"{tc_mode!r} is not a tc mode; use one of {', '.join(TC_MODES)}")
            tc_mode = "auto"
        for j, path in enumerate(exempt):
            if not os.path.isabs(path):
                self.issue(at + ("exempt_cgroups", j), f"{path!r} is not an absolute path; give the cgroup directory's full path")
        exempt = [os.path.normpath(p) for p in exempt if os.path.isabs(p)]
        globs = (DEFAULT_INTERNAL if default_internal is not False else ()) + tuple(internal)
        node = self.attempt(at + ("internal",), NodePolicy, policy, globs, tuple(exempt), tc_mode) if policy else None
        if len(self.issues) > before or node is None:
            return None
        return NodeConfig(node, self.where.line(at) or 0)

    def dns_keys(self, table: dict, at: KeyPath, policy: Policy | None) -> Policy | None:
        """dns = ["10.64.0.1"] or ["auto"] of a [[scope]] or [node]: the VPN's resolvers, `auto` read
        from the tunnels (in the scope's namespace) now and kept in step by the daemon."""
        dns = self.strings(table, at, "dns", 'an array of resolver addresses such as ["10.64.0.1"] or ["auto"]')
        if policy is None or not dns:
            return policy
        found = self.attempt(at + ("dns",), vpn_dns.followed_specs, dns, policy.tunnels, policy.netns in ("", None))
        return self.attempt(at + ("dns",), lambda: dataclasses.replace(policy, **found)) if found else None

    def policy_keys(self, table: dict, at: KeyPath, dhcp_default: bool) -> Policy | None:
        """The policy keys a [[scope]] and [node] share: tunnels, endpoints,
        netns, the allow options, tunnel_kinds and the event stream."""
        tunnels = self.strings(table, at, "tunnels", 'an array of interface names such as ["wg0"]')
        if tunnels == []:
            self.issue(at + ("tunnels",), 'no tunnel interface given; name at least one, e.g. tunnels = ["wg0"]')
        specs = [self.attempt(at + ("endpoints", j), parse_endpoint_spec, text) for j, text in
                 enumerate(self.strings(table, at, "endpoints", 'an array such as ["203.0.113.5:51820/udp"] or ["auto"]') or [])]
        endpoints = [e for e in specs if isinstance(e, (Endpoint, AnyEndpoint))]
        follow = tuple(dict.fromkeys(e for e in specs if isinstance(e, str)))
        if follow and table.get("netns") == "each":
            self.issue(at + ("endpoints",), 'endpoints "auto" is not followed across the namespaces of netns = "each"; '
                       "give the endpoints as ADDR:PORT/udp, or name the tunnel's namespace")
            follow = ()
        netns = self.get(table, at, "netns", str, 'a namespace name or path, e.g. "vpn" ("" for the daemon\'s own)') or ""
        lan, lan_dns = (self.get(table, at, key, bool, "true or false") or False for key in ("allow_lan", "allow_lan_dns"))
        dhcp = self.get(table, at, "allow_dhcp", bool, "true or false")
        kinds = self.strings(table, at, "tunnel_kinds", 'an array of link kinds such as ["wireguard", "tun"]')
        events = self.events(table, at)
        vpn = self.vpn(table, at)
        if any(isinstance(e, AnyEndpoint) for e in endpoints) and vpn == (None, ()):
            wild = next(e for e in endpoints if isinstance(e, AnyEndpoint))
            self.issue(at + ("endpoints",), f"{str(wild)!r} names every address: any process could reach any server "
                       "on that port outside the tunnel; add vpn_mark or vpn_cgroup so that only the VPN client may, "
                       "or give the server's address")
            return None
        return self.policy(at, tunnels or [], endpoints, netns,
                           Options(lan, lan_dns, dhcp_default if dhcp is None else dhcp),
                           DEFAULT_TUNNEL_KINDS if kinds is None else kinds, events, follow, vpn)

    def vpn(self, table: dict, at: KeyPath) -> tuple[tuple[int, int] | None, tuple[str, ...]]:
        """vpn_mark = "0xca6c" (or a number, or "MARK/MASK") and vpn_cgroup = a path or an array of paths."""
        raw = table.get("vpn_mark")
        mark = None
        if isinstance(raw, bool) or (raw is not None and not isinstance(raw, (int, str))):
            self.issue(at + ("vpn_mark",), f"{_toml_type(raw)} is not valid here; expected a mark such as "
                       '51820 or "0xca6c/0xffff"')
        elif raw is not None:
            mark = self.attempt(at + ("vpn_mark",), parse_mark, str(raw))
        paths = table.get("vpn_cgroup")
        if isinstance(paths, str):
            paths = [paths]
        elif paths is not None:
            paths = self.strings(table, at, "vpn_cgroup", 'a cgroup path or an array of them, such as '
                                 '"/sys/fs/cgroup/system.slice/openvpn.service"') or []
        cgroups = []
        for j, path in enumerate(paths or ()):
            if not os.path.isabs(path):
                self.issue(at + ("vpn_cgroup", j), f"{path!r} is not an absolute path; give the cgroup directory's full path")
            else:
                cgroups.append(os.path.normpath(path))
        return mark, tuple(cgroups)

    def events(self, table: dict, at: KeyPath) -> EventSettings:
        default = EventSettings()
        rate = self.get(table, at, "events_rate", (int, float), "a number of samples per second (0: off)")
        burst = self.get(table, at, "events_burst", int, "a whole number of samples")
        for key, value in (("events_rate", rate), ("events_burst", burst)):
            if isinstance(value, bool):
                self.issue(at + (key,), "true/false is not valid here; expected a number")
        rate = default.rate if rate is None or isinstance(rate, bool) else rate
        burst = default.burst if burst is None or isinstance(burst, bool) else burst
        return self.attempt(at + ("events_rate",), EventSettings, rate, burst) or default

    def policy(self, at: KeyPath, tunnels: list[str], endpoints: list[Endpoint], netns: str,
               options: Options, kinds: list[str] | tuple[str, ...], events: EventSettings,
               follow: tuple[str, ...] = (),
               vpn: tuple[tuple[int, int] | None, tuple[str, ...]] = (None, ())) -> Policy | None:
        """The Policy, built with the CLI's own checks in steps so that each problem
        is blamed on its key: each name, the names together, the kinds, the options."""
        if not tunnels:
            return None
        names = tuple(tunnels)
        if not (all([self.attempt(at + ("tunnels", j), Policy, (name,)) for j, name in enumerate(names)])
                and self.attempt(at + ("tunnels",), Policy, names)):
            return None
        kinds_ok = self.attempt(at + ("tunnel_kinds",), Policy, names, (), "", Options(), tuple(kinds))
        policy = self.attempt(at + ("allow_lan_dns",), Policy, names, tuple(endpoints), netns, options,
                              tuple(kinds) if kinds_ok else DEFAULT_TUNNEL_KINDS, events, (), False, follow,
                              vpn[0], vpn[1])
        return policy if kinds_ok else None


def _split_listen(text: str) -> tuple[str, int]:
    """ADDRESS:PORT -> (address, port); IPv6 as [ADDRESS]:PORT.  Addresses only, no names."""
    form = f'write it as ADDRESS:PORT, e.g. "{DEFAULT_LISTEN}" (IPv6: "[::1]:12479", every interface: "0.0.0.0:12479")'
    if not text.startswith("[") and text.count(":") > 1:
        raise KsbpfError(f"listen address {text!r}: an IPv6 address needs brackets", form)
    m = re.fullmatch(r"\[([^\]]+)\](?::(.*))?|([^:\[\]]+)(?::(.*))?", text)
    if not m:
        raise KsbpfError(f"listen address {text!r} is malformed", form)
    host, port = (m[1], m[2]) if m[1] else (m[3], m[4])
    if port is None:
        raise KsbpfError(f"listen address {text!r} has no port", form)
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise KsbpfError(f"listen address {text!r}: port {port!r} is not in 1-65535", form)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise KsbpfError(f"listen address {text!r}: {host!r} is not an IP address", form) from None
    if m[1] and address.version != 6:
        raise KsbpfError(f"listen address {text!r}: brackets are only for IPv6 addresses", form)
    return str(address), int(port)
