"""The resolvers a VPN configured for its tunnel (`--dns auto`).

- systemd-resolved: the tunnel's per-link DNS servers, as `resolvectl dns
  IFACE` prints them (NetworkManager, wg-quick with resolvconf=systemd,
  OpenVPN's update-systemd-resolved all set them there).  resolved knows
  the links of its own network namespace only: asked only for a tunnel of
  the caller's namespace.
- NetworkManager (when it does not hand DNS to systemd-resolved, Debian's
  default): the tunnel device's DNS while its connection is up (`nmcli -g
  IP4.DNS,IP6.DNS device show IFACE`), else the DNS of the connection profile
  made for that interface (its keyfile under /etc/NetworkManager/
  system-connections or /run/NetworkManager/system-connections, as `nmcli
  connection import type wireguard` writes it: `interface-name=IFACE`, `dns=`
  in [ipv4] and [ipv6]) -- so a connection that is down has its resolvers too.
- wg-quick: the `DNS =` lines of /etc/wireguard/IFACE.conf (addresses; the
  search domains that may share the line are not resolvers).

`ksbpf attach --dns auto` reads them once.  The daemon follows them
(dns = ["auto"]): it reads them again on a short poll and when a tunnel
appears or changes, and updates the scope's dns maps in place
(ksbpf.scopes.dns_followed); while none is known, DNS is dropped.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable

from ksbpf.errors import KsbpfError

WG_QUICK_DIR = os.environ.get("KSBPF_WG_QUICK_DIR", "/etc/wireguard")   # (tests point it elsewhere)
RESOLVECTL_TIMEOUT = 5.0
NM_KEYFILE_DIRS = tuple(os.environ.get("KSBPF_NM_DIRS", "/etc/NetworkManager/system-connections:"
                                       "/run/NetworkManager/system-connections").split(":"))


class Unreadable(KsbpfError):
    """resolvectl did not answer in time (systemd-resolved hung or restarting): nothing is known,
    which is not the same as "no resolver" -- the daemon keeps the resolvers in force."""


@dataclass(frozen=True)
class Found:
    addresses: tuple   # ipaddress objects, in the order the source gives them
    source: str        # where they were read: "resolvectl dns wg0", "/etc/wireguard/wg0.conf"


def _addresses(words) -> list:
    out = []
    for w in words:
        w = w.strip().strip(",")
        if not w:
            continue
        # resolvectl may print ADDR%IFINDEX or ADDR#SERVERNAME, and IPv6 in brackets with a port
        w = w.split("#", 1)[0].split("%", 1)[0]
        if w.startswith("[") and "]" in w:
            w = w[1:w.index("]")]
        try:
            a = ipaddress.ip_address(w)
        except ValueError:
            continue   # a search domain (wg-quick), a label
        if not (a.is_unspecified or a.is_multicast) and a not in out:
            out.append(a)
    return out


def parse_resolvectl(text: str, iface: str) -> list:
    """`resolvectl dns IFACE`: "Link 5 (wg0): 10.64.0.1 fd00::1" (nothing after
    the colon when the link has none)."""
    out = []
    for line in text.splitlines():
        head, sep, rest = line.partition(":")
        if sep and f"({iface})" in head:
            out += [a for a in _addresses(rest.split()) if a not in out]
    return out


def parse_wg_quick(text: str) -> list:
    """The `DNS =` lines of a wg-quick configuration's [Interface] section."""
    out, section = [], ""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
            continue
        key, sep, value = line.partition("=")
        if sep and section == "interface" and key.strip().lower() == "dns":
            out += [a for a in _addresses(value.replace(",", " ").split()) if a not in out]
    return out


def parse_nmcli_dns(text: str) -> list:
    """`nmcli -g IP4.DNS,IP6.DNS device show IFACE`: one line per field, several
    values of a field joined by " | ", colons of IPv6 addresses escaped (\\:)."""
    out = []
    for line in text.splitlines():
        out += [a for a in _addresses(line.replace("\\:", ":").replace("|", " ").split()) if a not in out]
    return out


def parse_nm_keyfile(text: str, iface: str) -> list:
    """A NetworkManager keyfile's `dns=` of [ipv4] and [ipv6] (";"-separated),
    when its [connection] names the interface (`interface-name=IFACE`)."""
    sections: dict[str, dict[str, str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
            continue
        key, sep, value = line.partition("=")
        if sep:
            sections.setdefault(section, {})[key.strip()] = value.strip()
    if sections.get("connection", {}).get("interface-name") != iface:
        return []
    out = []
    for fam in ("ipv4", "ipv6"):
        out += [a for a in _addresses(sections.get(fam, {}).get("dns", "").replace(";", " ").split()) if a not in out]
    return out


def from_networkmanager(iface: str, run=subprocess.run, exe: str | None = None,
                        dirs: tuple | None = None, timeout: float = RESOLVECTL_TIMEOUT) -> tuple[list, str]:
    """The tunnel's resolvers as NetworkManager has them: the device's while its
    connection is up, else its connection profile's; ([], "") when none."""
    exe = exe or shutil.which("nmcli")
    if exe:
        try:
            done = run([exe, "-g", "IP4.DNS,IP6.DNS", "device", "show", iface], capture_output=True, text=True,
                       timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            done = None   # (not running, or not answering: its keyfiles say what is configured)
        if done is not None and done.returncode == 0:
            found = parse_nmcli_dns(done.stdout)
            if found:
                return found, f"nmcli device show {iface}"
    for d in dirs if dirs is not None else NM_KEYFILE_DIRS:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            path = os.path.join(d, name)
            try:
                with open(path) as f:
                    found = parse_nm_keyfile(f.read(), iface)
            except (OSError, UnicodeDecodeError):
                continue
            if found:
                return found, path
    return [], ""


def from_resolvectl(iface: str, run=subprocess.run, exe: str | None = None,
                    timeout: float = RESOLVECTL_TIMEOUT) -> list:
    """The link's DNS servers as systemd-resolved has them; [] when resolved
    is not there or knows none for the link; Unreadable when it does not answer in time."""
    exe = exe or shutil.which("resolvectl")
    if not exe:
        return []
    try:
        done = run([exe, "dns", iface], capture_output=True, text=True, timeout=timeout)
    except OSError:
        return []
    except subprocess.TimeoutExpired:
        raise Unreadable(f"resolvectl dns {iface} did not answer within {timeout:g} s",
                         "check systemd-resolved (systemctl status systemd-resolved)") from None
    if done.returncode != 0:
        return []
    return parse_resolvectl(done.stdout, iface)


def from_wg_quick(iface: str, directory: str | None = None) -> list:
    path = os.path.join(directory or WG_QUICK_DIR, f"{iface}.conf")
    try:
        with open(path) as f:
            return parse_wg_quick(f.read())
    except OSError:
        return []


def find(tunnels, own_namespace: bool = True, directory: str | None = None, run=subprocess.run,
         resolvectl: str | None = None, timeout: float = RESOLVECTL_TIMEOUT, nmcli: str | None = None,
         nm_dirs: tuple | None = None, exists: Callable[[str], bool] | None = None) -> Found:
    """The resolvers the VPN configured for these tunnels: systemd-resolved's
    per-link DNS, else NetworkManager's (both: a tunnel of the caller's
    namespace), else wg-quick's `DNS =`.  One actionable line when none is found.
    In the caller's namespace the tunnels that are up are asked first: a
    tunnel that is down keeps its DNS in wg-quick's file and NetworkManager's
    profile, and must not hold the resolvers of the one in use."""
    directory = directory or WG_QUICK_DIR
    if own_namespace and len(tunnels) > 1:
        up = exists or _interface_exists
        tunnels = sorted(tunnels, key=lambda t: not up(t))   # stable: the user's order otherwise
    for iface in tunnels:
        if own_namespace:
            found = from_resolvectl(iface, run, resolvectl, timeout)
            if found:
                return Found(tuple(found), f"resolvectl dns {iface}")
            found, where = from_networkmanager(iface, run, nmcli, nm_dirs, timeout)
            if found:
                return Found(tuple(found), where)
        found = from_wg_quick(iface, directory)
        if found:
            return Found(tuple(found), os.path.join(directory, f"{iface}.conf"))
    names = ", ".join(tunnels)
    raise KsbpfError(f"dns auto: no resolver configured for {names} (neither systemd-resolved's per-link DNS, "
                     f"NetworkManager's, nor a DNS = line in {directory}/IFACE.conf)",
                     "give the VPN's resolver as --dns ADDR (config dns = [\"ADDR\"])")


def _interface_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


def resolve_specs(specs, tunnels, own_namespace: bool = True, directory: str | None = None,
                  run=subprocess.run, resolvectl: str | None = None) -> tuple[tuple, list[str]]:
    """--dns values (addresses and `auto`) -> (resolvers in order, where the `auto` ones came from)."""
    from ksbpf.policy import parse_resolver
    out, sources = [], []
    for spec in specs:
        if spec.strip() == "auto":
            found = find(tunnels, own_namespace, directory, run, resolvectl)
            out += found.addresses
            sources.append(found.source)
        else:
            out.append(parse_resolver(spec))
    return tuple(dict.fromkeys(out)), sources


def find_optional(tunnels, own_namespace: bool = True, directory: str | None = None, run=subprocess.run,
                  resolvectl: str | None = None, timeout: float = RESOLVECTL_TIMEOUT) -> Found | None:
    """find(), or None when no resolver is configured for the tunnels (yet);
    Unreadable (raised) when resolved did not answer."""
    try:
        return find(tunnels, own_namespace, directory, run, resolvectl, timeout)
    except Unreadable:
        raise
    except KsbpfError:
        return None


def followed_specs(specs, tunnels, own_namespace: bool = True, directory: str | None = None,
                   run=subprocess.run, resolvectl: str | None = None) -> dict:
    """dns = [...] of a scope the daemon keeps in step: Policy keyword arguments.
    With `auto`: dns_auto, the addresses given beside it (dns_fixed), and the
    resolvers in force now (dns: fixed ones first, then those read from the
    tunnel); none read is no error -- DNS is dropped until the tunnel's are known."""
    from ksbpf.policy import parse_resolver
    if not any(s.strip() == "auto" for s in specs):
        return {"dns": resolve_specs(specs, tunnels, own_namespace, directory, run, resolvectl)[0]}
    fixed = tuple(dict.fromkeys(parse_resolver(s) for s in specs if s.strip() != "auto"))
    try:
        found = find_optional(tunnels, own_namespace, directory, run, resolvectl)
    except Unreadable:
        found = None   # the daemon reads them again within a second
    now = tuple(dict.fromkeys(fixed + (found.addresses if found else ())))
    return {"dns": now, "dns_auto": True, "dns_fixed": fixed}
