"""The endpoints a VPN client is using right now, read from the client itself
(`--endpoint auto`), so that the kill switch follows a server switch.

- WireGuard in the kernel: the peers' current endpoints through WireGuard's
  generic netlink family (WG_CMD_GET_DEVICE, pyroute2.WireGuard), asked from
  inside the tunnel's network namespace.
- WireGuard in userspace (wireguard-go, boringtun): the kernel has no such
  family (or the device is not its own), so the cross-platform UAPI socket
  /var/run/wireguard/IFACE.sock answers `get=1` with the same data.
- OpenVPN: its management interface (`management /run/openvpn/NAME.sock
  unix` and `management-query-remote`) asks which remote to connect to
  before it sends anything; a connected TLS client also reports its remote.

WireGuard tells nobody when an endpoint changes (`wg set ... endpoint`, a
roaming peer): the daemon asks again on a short poll.
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable

from ksbpf.kernel import netns
from ksbpf.policy import Endpoint

UAPI_DIR = "/var/run/wireguard"
TIMEOUT = 1.0   # a client that does not answer within this is skipped this round


@dataclass(frozen=True)
class Followed:
    """One endpoint read from a tunnel: where it came from."""

    endpoint: Endpoint
    source: str        # the tunnel interface, or the OpenVPN management socket
    via: str           # "wireguard" (genl), "wireguard-uapi", "openvpn"
    peer: str = ""     # WireGuard: the peer's public key (base64)

    def describe(self) -> str:
        peer = f" peer {self.peer[:8]}…" if self.peer else ""
        return f"auto: {self.endpoint} from {self.source}{peer}"

    def to_dict(self) -> dict:
        return {"endpoint": str(self.endpoint), "source": self.source, "via": self.via, "peer": self.peer}

    @classmethod
    def from_dict(cls, d: dict) -> "Followed":
        return cls(Endpoint.parse(d["endpoint"]), d["source"], d.get("via", ""), d.get("peer", ""))


class NotThere(Exception):
    """This source does not exist (no such WireGuard device, no socket): not an error."""


def _endpoint(host: str, port: int) -> Endpoint | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if address.is_unspecified or port == 0:
        return None   # a peer without an endpoint yet (a server waiting for its client)
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return Endpoint(address, port, "udp")


# -- WireGuard: generic netlink -------------------------------------------------------
GENL_RECHECK = 10.0   # seconds: a kernel without the family is asked again this often (a module loaded later)
_genl_absent_until = 0.0
_genl_sockets: dict[int, object] = {}   # namespace inode -> an open pyroute2.WireGuard socket in it


def _genl_socket(ns: netns.Netns):
    """A WireGuard genl socket inside `ns`, opened once (opening one costs
    milliseconds: too much for a poll); NotThere without the family."""
    global _genl_absent_until
    if time.monotonic() < _genl_absent_until:
        raise NotThere("no WireGuard generic netlink family (no kernel module)")
    wg = _genl_sockets.get(ns.inode)
    if wg is not None:
        return wg
    from pyroute2 import WireGuard
    from pyroute2.netlink.exceptions import NetlinkError
    try:
        wg = netns.run_here(ns.path, WireGuard)
    except NetlinkError as exc:
        if exc.code == errno.ENOENT:
            _genl_absent_until = time.monotonic() + GENL_RECHECK
            raise NotThere("no WireGuard generic netlink family (no kernel module)") from None
        raise
    _genl_sockets[ns.inode] = wg
    return wg


def _genl_read(ns: netns.Netns, ifname: str) -> list[tuple[str, Endpoint]]:
    from pyroute2.netlink.exceptions import NetlinkError
    wg = _genl_socket(ns)
    try:
        messages = wg.info(ifname)
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT, errno.EOPNOTSUPP):
            raise NotThere(f"{ifname} is not a kernel WireGuard device") from None
        forget(ns.inode)
        raise
    except Exception:
        forget(ns.inode)   # a broken socket: a new one next time
        raise
    return genl_peers(messages)


def genl_peers(messages) -> list[tuple[str, Endpoint]]:
    """(public key, endpoint) of each peer in WG_CMD_GET_DEVICE answers as
    pyroute2 decodes them: WGDEVICE_A_PEERS is an array attribute (its value
    a list of peers, possibly split over several messages), a peer's public
    key its base64 bytes."""
    out = []
    for msg in messages:
        for item in msg.get_attrs("WGDEVICE_A_PEERS") or []:
            for peer in item if isinstance(item, (list, tuple)) else [item]:
                key = peer.get_attr("WGPEER_A_PUBLIC_KEY") or b""
                if hasattr(key, "get"):
                    key = key.get("value", b"")
                ep = peer.get_attr("WGPEER_A_ENDPOINT")
                endpoint = _endpoint(ep["addr"], ep["port"]) if ep else None
                if endpoint is not None:
                    out.append((key.decode() if isinstance(key, bytes) else str(key), endpoint))
    return out


def forget(ns_inode: int) -> None:
    """A namespace no longer followed: its genl socket is closed."""
    wg = _genl_sockets.pop(ns_inode, None)
    if wg is not None:
        try:
            wg.close()
        except Exception:
            pass


# -- WireGuard: the userspace implementations' UAPI socket -----------------------------
def parse_uapi(text: str) -> list[tuple[str, Endpoint]]:
    """The peers' endpoints in a `get=1` answer (key=value lines; each
    public_key= starts a peer; endpoint=IP:PORT or [IPv6]:PORT)."""
    out, peer = [], None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "public_key":
            try:
                peer = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                peer = value
        elif key == "endpoint" and peer is not None:
            host, _, port = value.rpartition(":")
            host = host[1:-1] if host.startswith("[") else host
            if port.isdigit():
                endpoint = _endpoint(host, int(port))
                if endpoint is not None:
                    out.append((peer, endpoint))
        elif key == "errno" and value not in ("", "0"):
            raise OSError(int(value) if value.isdigit() else errno.EIO, f"the WireGuard UAPI answered errno={value}")
    return out


def uapi_path(ifname: str, directory: str = UAPI_DIR) -> str:
    return os.path.join(directory, f"{ifname}.sock")


def _peer_netns_inode(s: socket.socket) -> int | None:
    """The network namespace of the process that listens on a unix socket."""
    pid = struct.unpack("=iII", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _uapi_read(ifname: str, directory: str = UAPI_DIR, ns_inode: int | None = None) -> list[tuple[str, Endpoint]]:
    path = uapi_path(ifname, directory)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotThere(f"no WireGuard UAPI socket {path}") from None
        # the sockets are files, not per namespace: a device of the same name in
        # another namespace is another tunnel
        owner = _peer_netns_inode(s)
        if ns_inode is not None and owner is not None and owner != ns_inode:
            raise NotThere(f"{path} belongs to a WireGuard device of another network namespace")
        s.sendall(b"get=1\n\n")
        data = b""
        while not data.endswith(b"\n\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return parse_uapi(data.decode(errors="replace"))


def wireguard(ns: netns.Netns, ifname: str, directory: str = UAPI_DIR) -> list[Followed]:
    """The current endpoints of the peers of WireGuard device `ifname` in
    namespace `ns`: generic netlink where the kernel runs it, else its UAPI
    socket.  NotThere when neither knows the device."""
    try:
        peers = _genl_read(ns, ifname)
        via = "wireguard"
    except NotThere:
        peers = _uapi_read(ifname, directory, ns.inode)
        via = "wireguard-uapi"
    return [Followed(ep, ifname, via, key) for key, ep in peers]


# -- OpenVPN: the management interface --------------------------------------------------
def parse_remote(line: str) -> tuple[Endpoint | None, str]:
    """`>REMOTE:HOST,PORT,PROTO` (--management-query-remote: the remote OpenVPN
    is about to connect to, before it sends anything) -> the endpoint, or
    None and why (a host name: ksbpf does not resolve names)."""
    host, _, rest = line.removeprefix(">REMOTE:").strip().partition(",")
    port, _, proto = rest.partition(",")
    if not port.isdigit():
        return None, f"unreadable remote {line.strip()!r}"
    ep = _endpoint(host, int(port))
    if ep is None:
        return None, (f"remote {host!r} is a host name: give OpenVPN the server's address "
                      "(`remote ADDRESS PORT`), or add the addresses it resolves to as fixed endpoints")
    return Endpoint(ep.address, ep.port, "tcp" if proto.lower().startswith("tcp") else "udp"), ""


def parse_state(line: str, last_proto: dict) -> Endpoint | None:
    """A state line (`state` or `>STATE:`) that names the remote: CONNECTED
    (TLS modes) and RECONNECTING carry it as field 5 and 6."""
    fields = line.removeprefix(">STATE:").strip().split(",")
    if len(fields) < 6 or fields[1] != "CONNECTED" or not fields[5].isdigit():
        return None
    ep = _endpoint(fields[4], int(fields[5]))
    return Endpoint(ep.address, ep.port, last_proto.get((ep.address, ep.port), "udp")) if ep else None


class OpenVPNManagement:
    """A connection to OpenVPN's management socket, held open: with
    `management-query-remote`, OpenVPN asks before each connection attempt
    which remote to use (`>REMOTE:`), and waits for the answer: the endpoint
    is allowed first, then ksbpf answers `remote ACCEPT` -- the first
    packet to a new server is never dropped.  OpenVPN takes one management
    client at a time."""

    def __init__(self, path: str):
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = b""
        self.current: Endpoint | None = None
        self.known = False          # False: nothing said since we connected (keep what was followed)
        self.pending_accept = False
        self.problem = ""           # why the last remote could not be followed
        self._proto: dict = {}

    def connect(self) -> None:
        """NotThere when nothing listens at the path."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            raise NotThere(f"no OpenVPN management socket {self.path}") from None
        except OSError:
            s.close()
            raise
        s.setblocking(False)
        self.sock, self.buf, self.known, self.pending_accept = s, b"", False, False
        self._send(b"state\n")   # a connected TLS client says its remote here

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock else -1

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (OSError, AttributeError):
            self.close()

    def feed(self) -> bool:
        """Read what OpenVPN said; did the remote change (or become known)?"""
        changed = False
        while self.sock is not None:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:   # OpenVPN exited or restarts: what it said last is kept until it says more
                self.close()
                break
            self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").strip()
            if line.startswith(">REMOTE:"):
                ep, self.problem = parse_remote(line)
                if ep is not None:
                    self._proto[(ep.address, ep.port)] = ep.proto
                changed |= not self.known or ep != self.current
                self.current, self.known, self.pending_accept = ep, True, True
            else:
                ep = parse_state(line, self._proto)
                if ep is not None:
                    changed |= not self.known or ep != self.current
                    self.current, self.known = ep, True
        return changed

    def accept(self) -> None:
        """Let OpenVPN go on to the remote it asked about."""
        if self.pending_accept and self.sock is not None:
            self.pending_accept = False
            self._send(b"remote ACCEPT\n")

    def followed(self) -> list[Followed] | None:
        """The endpoint OpenVPN uses now; None when it has said nothing yet."""
        if not self.known:
            return None
        return [Followed(self.current, self.path, "openvpn")] if self.current else []

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.known = False


def openvpn(path: str, wait: float = 0.3) -> list[Followed] | None:
    """One look (the one-shot `attach`): a remote OpenVPN waits to be told
    about, or the one a connected TLS client reports; None when it says
    neither (or serves another management client: the daemon)."""
    m = OpenVPNManagement(path)
    m.connect()
    try:
        deadline = time.monotonic() + wait
        while m.connected and time.monotonic() < deadline:
            m.feed()
            if m.known:
                break
            time.sleep(0.01)
        found = m.followed()
        m.accept()
        return found
    finally:
        m.close()


def read(ns: netns.Netns, tunnel: str, present: bool = True, uapi_dir: str = UAPI_DIR) -> list[Followed]:
    """Every endpoint WireGuard device `tunnel` (kernel or userspace) uses
    now.  [] when the tunnel is not there, or not WireGuard."""
    if not present:
        return []
    try:
        return wireguard(ns, tunnel, uapi_dir)
    except NotThere:
        return []


def read_all(ns: netns.Netns, tunnels: dict[str, bool], sockets: tuple[str, ...] = (),
             held: Callable[[str], list[Followed] | None] | None = None,
             uapi_dir: str = UAPI_DIR) -> tuple[list[Followed], list[str]]:
    """The endpoints of every tunnel (name -> present now) and of every
    OpenVPN management socket (`held`: the daemon's open connections, else
    one look each); and the sources that could not be read or have said
    nothing yet ("SOURCE: why": their previous endpoints are kept)."""
    out, failed = [], []
    for name, present in tunnels.items():
        try:
            out += read(ns, name, present=present, uapi_dir=uapi_dir)
        except Exception as exc:   # a client that answers badly must not stop the daemon
            failed.append(f"{name}: {exc}")
    for path in sockets:
        try:
            found = held(path) if held else openvpn(path)
        except NotThere as exc:   # OpenVPN not running (yet): what it used last is kept
            failed.append(f"{path}: {exc} (is OpenVPN running, with `management {path} unix`?)")
            continue
        except Exception as exc:
            failed.append(f"{path}: {exc}")
            continue
        if found is None:
            failed.append(f"{path}: OpenVPN has not said which remote it uses yet")
        else:
            out += found
    return out, failed
