"""The endpoints a VPN client is using right now, read from the client itself
(`--endpoint auto`), so that the kill switch follows a server switch.

- WireGuard in the kernel: the peers' current endpoints through WireGuard's
  generic netlink family (WG_CMD_GET_DEVICE, pyroute2.WireGuard), asked from
  inside the tunnel's network namespace.
- WireGuard in userspace (wireguard-go, boringtun): the kernel has no such
  family (or the device is not its own), so the cross-platform UAPI socket
  /var/run/wireguard/IFACE.sock answers `get=1` with the same data.
- OpenVPN: its management interface (`management /run/openvpn/NAME.sock
  unix`) reports, in its state history, the remote it is connected to.

WireGuard tells nobody when an endpoint changes (`wg set ... endpoint`, a
roaming peer): the daemon asks again on a short poll.
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import os
import socket
from dataclasses import dataclass

from ksbpf.errors import KsbpfError
from ksbpf.kernel import netns
from ksbpf.policy import Endpoint

UAPI_DIR = "/var/run/wireguard"
OPENVPN_DIR = "/run/openvpn"
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
def _genl_read(ifname: str) -> list[tuple[str, Endpoint]]:
    from pyroute2 import WireGuard
    from pyroute2.netlink.exceptions import NetlinkError
    try:
        wg = WireGuard()
    except NetlinkError as exc:
        if exc.code == errno.ENOENT:
            raise NotThere("no WireGuard generic netlink family (no kernel module)") from None
        raise
    try:
        try:
            messages = wg.info(ifname)
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT, errno.EOPNOTSUPP):
                raise NotThere(f"{ifname} is not a kernel WireGuard device") from None
            raise
        out = []
        for msg in messages:
            for peer in msg.get_attrs("WGDEVICE_A_PEERS") or []:
                key = (peer.get_attr("WGPEER_A_PUBLIC_KEY") or {}).get("value", b"")
                ep = peer.get_attr("WGPEER_A_ENDPOINT")
                endpoint = _endpoint(ep["addr"], ep["port"]) if ep else None
                if endpoint is not None:
                    out.append((key.decode() if isinstance(key, bytes) else str(key), endpoint))
        return out
    finally:
        wg.close()


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


def _uapi_read(ifname: str, directory: str = UAPI_DIR) -> list[tuple[str, Endpoint]]:
    path = uapi_path(ifname, directory)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotThere(f"no WireGuard UAPI socket {path}") from None
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
        peers = netns.run_here(ns.path, _genl_read, ifname)
        via = "wireguard"
    except NotThere:
        # the UAPI sockets are files, not per namespace: the same name in two
        # namespaces would be ambiguous, so the socket's owner must be in ns
        peers = _uapi_read(ifname, directory)
        via = "wireguard-uapi"
    return [Followed(ep, ifname, via, key) for key, ep in peers]


# -- OpenVPN: the management interface --------------------------------------------------
def parse_openvpn_state(text: str) -> Endpoint | None:
    """The remote of the latest state line that names one (`state all`:
    time,STATE,detail,tun-ip,remote-ip,remote-port,local-ip,local-port,tun-ipv6);
    TCP when that remote was reached by a TCP_CONNECT."""
    remote, tcp = None, set()
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) < 6 or not fields[0].isdigit():
            continue
        state, host, port = fields[1], fields[4], fields[5]
        if host and port.isdigit():
            ep = _endpoint(host, int(port))
            if ep is not None:
                remote = ep
                if state == "TCP_CONNECT":
                    tcp.add((ep.address, ep.port))
    if remote is not None and (remote.address, remote.port) in tcp:
        remote = Endpoint(remote.address, remote.port, "tcp")
    return remote


def openvpn(path: str) -> list[Followed]:
    """The remote an OpenVPN client is connected to, from its management socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotThere(f"no OpenVPN management socket {path}") from None
        s.sendall(b"state all\n")
        data = b""
        while b"\nEND\r\n" not in data and b"\nEND\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        try:
            s.sendall(b"quit\n")
        except OSError:
            pass
    ep = parse_openvpn_state(data.decode(errors="replace"))
    return [Followed(ep, path, "openvpn")] if ep else []


def openvpn_path(tunnel: str, directory: str = OPENVPN_DIR) -> str:
    return os.path.join(directory, f"{tunnel}.sock")


def read(ns: netns.Netns, tunnel: str, sockets: tuple[str, ...] = (), present: bool = True,
         uapi_dir: str = UAPI_DIR, openvpn_dir: str = OPENVPN_DIR) -> list[Followed]:
    """Every endpoint a tunnel named `tunnel` uses now: WireGuard (kernel or
    userspace) by the device's name, else an OpenVPN management socket named
    after it.  [] when the tunnel is not there."""
    if not present:
        return []
    try:
        return wireguard(ns, tunnel, uapi_dir)
    except NotThere:
        pass
    try:
        return openvpn(openvpn_path(tunnel, openvpn_dir))
    except NotThere:
        return []


def read_all(ns: netns.Netns, tunnels: dict[str, bool], sockets: tuple[str, ...] = (),
             uapi_dir: str = UAPI_DIR, openvpn_dir: str = OPENVPN_DIR) -> tuple[list[Followed], list[str]]:
    """The endpoints of every tunnel (name -> present now) and of every named
    OpenVPN management socket; and the sources that could not be read (their
    previous endpoints are kept)."""
    out, failed = [], []
    for name, present in tunnels.items():
        try:
            out += read(ns, name, present=present, uapi_dir=uapi_dir, openvpn_dir=openvpn_dir)
        except Exception as exc:   # a client that answers badly must not stop the daemon
            failed.append(f"{name}: {exc}")
    for path in sockets:
        try:
            out += openvpn(path)
        except NotThere:
            pass
        except (OSError, ValueError) as exc:
            failed.append(f"{path}: {exc}")
    return out, failed
