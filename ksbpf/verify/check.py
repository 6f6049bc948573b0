"""`ksbpf verify`: prove, without sending a packet, that every protected scope
does what its policy says, and point at the ways around it.

For each cgroup scope (a pin directory under /sys/fs/bpf/ksbpf/cgroup/):

- attached   the pinned program is attached to the cgroup
- inherited  ... and in force (effective) on every descendant cgroup
- pins       the pinned maps are the maps the attached program uses
- tunnels    the tunnels registered are exactly the trusted tunnel interfaces present
- policy     crafted packets (ksbpf/verify/crafted.py) through the ATTACHED
             program with BPF_PROG_TEST_RUN, once per interface of the scope's
             network namespace (the egress ifindex in the context, run inside
             that namespace), each verdict compared with the policy model
             (ksbpf/verify/model.py).  The test runs carry the scope's verify
             nonce in skb->cb (ksbpf/verify/nonce.py): the program decides them
             but neither counts nor reports them, so the scope's counters and
             its event stream are untouched.
- the ways around it, as warnings with the process and what to do:
  sockets    a process of the scope holds a TCP/UDP socket created outside the
             scope (its cgroup, from sock_diag, decides, not the process's);
             --fix closes them (SOCK_DESTROY)
  raw        a process of the scope has CAP_NET_RAW, or holds an AF_PACKET
             socket (those bypass the cgroup hook)
  routes     a route sends non-local destinations outside the tunnel (TunnelVision)
  ipv6       a non-tunnel interface has a global IPv6 address and the tunnel none
  tun        a process of the scope holds a tun device, or a tun device of its
             namespace belongs to one of its users (without --deny-tun): what it
             writes in is forwarded or answered by the kernel, outside the hook;
             FAIL when --deny-tun's device program is missing
- dns        with --dns: the redirect programs (connect4/6, sendmsg4/6,
             recvmsg4/6, getpeername4/6) are attached to the cgroup, where the
             kernel has cgroup sock_addr programs (else: drop only)

For the node scope: guarded (every interface that needs a guard has one),
first (each guard runs first in its interface's egress chain: a program in
front of it is named), pins, tunnels, policy (the tc programs' verdicts),
routes, ipv6.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import ipaddress
import os
import shlex
import socket
from dataclasses import dataclass, field

from ksbpf.errors import KsbpfError
from ksbpf.kernel import bpf, cgroup, features, libbpf, links, netns, pins, preflight, rawsock
from ksbpf.policy import LAN_RANGES, NodePolicy, Policy, format_mark
from ksbpf.scopes import cgroups, common, tunnel_source
from ksbpf.scopes import subtree as subtree_scope
from ksbpf.scopes import node as node_scope
from ksbpf.verify import crafted, model, sockdiag
from ksbpf.verify.nonce import ensure_nonce
from ksbpf.verify.packets import frame
from ksbpf.verify.testrun import Runner, allowed

PASS, FIXED, WARN, FAIL = "ok", "fixed", "WARN", "FAIL"
CAP_NET_RAW = 13
RTPROT_KERNEL = 2
# --dns: the sock_addr hook each redirect program runs at, as verify names it
DNS_HOOK_NAMES = {bpf.ENTRY_DNS_CONN4: "connect4", bpf.ENTRY_DNS_CONN6: "connect6",
                  bpf.ENTRY_DNS_SEND4: "sendmsg4", bpf.ENTRY_DNS_SEND6: "sendmsg6",
                  bpf.ENTRY_DNS_RECV4: "recvmsg4", bpf.ENTRY_DNS_RECV6: "recvmsg6",
                  bpf.ENTRY_DNS_PEER4: "getpeername4", bpf.ENTRY_DNS_PEER6: "getpeername6"}
# the maps `ksbpf attach` and the daemon write, which the cgroup program must be reading
POLICY_MAPS = ("tunnels", "tunnel_ifindex", "endpoints4", "endpoints6", "counters", "verify_nonce")


@dataclass
class Finding:
    scope: str
    check: str
    verdict: str          # ok, fixed, WARN, FAIL
    detail: str
    fix: str = ""         # what to do (empty when nothing)

    def to_dict(self) -> dict:
        return {"scope": self.scope, "check": self.check, "verdict": self.verdict.lower(),
                "detail": self.detail, "fix": self.fix}


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    def count(self, verdict: str) -> int:
        return sum(1 for f in self.findings if f.verdict == verdict)

    def ok(self, strict: bool = False) -> bool:
        return not self.count(FAIL) and not (strict and self.count(WARN))

    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.verdict == FAIL]

    def to_dict(self, strict: bool = False) -> dict:
        return {"ok": self.ok(strict), "strict": strict,
                "summary": {v.lower(): self.count(v) for v in (PASS, FIXED, WARN, FAIL)},
                "findings": [f.to_dict() for f in self.findings], "kernel": features.as_dict()}


# -- helpers -----------------------------------------------------------------------------

def attach_command(cg: str, policy: Policy) -> str:
    """The `ksbpf attach` command line that puts this policy in force again."""
    argv = ["ksbpf", "attach", "--cgroup", cg]
    for t in policy.tunnels:
        argv += ["--tunnel", t]
    for e in (*policy.endpoints, *policy.any_endpoints):
        argv += ["--endpoint", str(e)]
    if policy.vpn_mark:
        argv += ["--vpn-mark", format_mark(*policy.vpn_mark)]
    for c in policy.vpn_cgroups:
        argv += ["--vpn-cgroup", c]
    if policy.netns:
        argv += ["--netns", policy.netns]
    for a in (policy.dns_fixed if policy.dns_auto else policy.dns):
        argv += ["--dns", str(a)]
    if policy.dns_auto:
        argv += ["--dns", "auto"]
    for flag, on in (("--allow-lan", policy.options.allow_lan), ("--allow-lan-dns", policy.options.allow_lan_dns),
                     ("--allow-dhcp", policy.options.allow_dhcp), ("--deny-tun", policy.deny_tun)):
        if on:
            argv.append(flag)
    return " ".join(shlex.quote(a) for a in argv)


def prog_map_ids(prog_fd: int) -> set[int]:
    """The ids of the maps a loaded program uses."""
    ids = (ctypes.c_uint32 * 64)()
    info = libbpf._ProgInfo()
    info.nr_map_ids = 64
    info.map_ids = ctypes.addressof(ids)
    size = ctypes.c_uint32(ctypes.sizeof(info))
    if libbpf._lib().bpf_obj_get_info_by_fd(prog_fd, ctypes.byref(info), ctypes.byref(size)) < 0:
        raise OSError(ctypes.get_errno(), "program info")
    return set(ids[:min(info.nr_map_ids, 64)])


def subtree(cg_path: str) -> list[str]:
    return list(cgroup.walk(cg_path))


def scope_pids(cg_path: str) -> list[int]:
    pids: list[int] = []
    for d in subtree(cg_path):
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            continue
    return pids


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _socket_inodes(pid: int) -> set[int]:
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def _has_cap(pid: int, cap: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except OSError:
        pass
    return False


def _packet_inodes(pid: int) -> set[int]:
    """Inodes of the AF_PACKET sockets of the process's network namespace."""
    try:
        with open(f"/proc/{pid}/net/packet") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return set()
    return {int(r.split()[-1]) for r in rows if r.split()}


# -- the checks ------------------------------------------------------------------------------

@dataclass
class Stray:
    pid: int
    comm: str
    ns_path: str
    sock: sockdiag.DiagSocket


def stray_sockets(cg_path: str) -> list[Stray]:
    """TCP/UDP sockets held by processes of the scope but created outside it."""
    ids = set()
    for d in subtree(cg_path):
        try:
            ids.add(os.stat(d).st_ino)
        except OSError:
            pass
    by_ns: dict[int, list[int]] = {}
    for pid in scope_pids(cg_path):
        try:
            by_ns.setdefault(os.stat(f"/proc/{pid}/ns/net").st_ino, []).append(pid)
        except OSError:
            continue
    out = []
    for pids in by_ns.values():
        ns_path = f"/proc/{pids[0]}/ns/net"
        try:
            socks = {s.inode: s for s in sockdiag.sockets(ns_path)}
        except OSError:
            continue   # the process exited meanwhile
        for pid in pids:
            for inode in _socket_inodes(pid):
                s = socks.get(inode)
                if s is not None and s.cgroup_id is not None and s.cgroup_id not in ids:
                    out.append(Stray(pid, _comm(pid), f"/proc/{pid}/ns/net", s))
    return out


def close_stray(strays: list[Stray]) -> tuple[int, list[str]]:
    """SOCK_DESTROY each; (closed, errors)."""
    closed, errors = 0, []
    for st in strays:
        try:
            sockdiag.destroy(st.ns_path, st.sock)
            closed += 1
        except OSError as exc:
            if exc.errno == errno.ENOENT:   # gone already (its peer, closed just before, reset it)
                closed += 1
                continue
            errors.append(f"pid {st.pid} {st.sock}: {exc.strerror or exc}")
    return closed, errors


def _dump_routes_and_addrs() -> tuple[list, list]:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return list(ipr.route("dump")), list(ipr.get_addr(family=socket.AF_INET6))


def on_link_table(present: list[links.Link]):
    """(In the namespace.)  The model's view of the FIB helper that decides
    whether IPv6 neighbour discovery goes to a neighbour on the egress link:
    the main table's longest-prefix unicast route to the destination has no
    gateway and leaves through that interface, and the interface forwards IPv6
    (the helper answers nothing otherwise).  Routes through nexthop objects or
    several nexthops count as through a gateway."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        routes = list(ipr.get_routes(family=socket.AF_INET6, table=254))
    forwarding = set()
    for link in present:
        try:
            with open(f"/proc/sys/net/ipv6/conf/{link.name}/forwarding") as f:
                if f.read().strip() == "1":
                    forwarding.add(link.ifindex)
        except OSError:
            pass
    table = []   # (network, direct through this ifindex or None)
    for r in routes:
        dst = r.get_attr("RTA_DST") or "::"
        net = ipaddress.IPv6Network(f"{dst}/{r['dst_len']}", strict=False)
        direct = (r["type"] == 1 and not r.get_attr("RTA_GATEWAY") and not r.get_attr("RTA_MULTIPATH")
                  and not r.get_attr("RTA_NH_ID"))
        table.append((net, r.get_attr("RTA_OIF") if direct else None))

    def on_link(ifindex: int, daddr: bytes) -> bool:
        if ifindex not in forwarding:
            return False
        a = ipaddress.IPv6Address(daddr)
        best = max((n.prefixlen for n, _ in table if a in n), default=None)
        return best is not None and any(n.prefixlen == best and a in n and oif == ifindex for n, oif in table)
    return on_link


def hijacking_routes(policy: Policy, present: dict[int, links.Link], routes: list) -> list[str]:
    """Routes that send non-local destinations through a non-tunnel interface:
    the same test as the daemon's route_alert (TunnelVision), applied to the
    routes in place.  Default routes (the fallback every VPN client keeps),
    the kernel's connected routes, routes through the tunnel and the host
    route to a VPN endpoint are not."""
    out = []
    for msg in routes:
        route = links.parse_route(msg)
        if route is None:
            continue
        dst = route.dst
        if (not route.unicast or route.table == links.RT_TABLE_LOCAL or dst.prefixlen == 0 or not route.oifs
                or dst.is_loopback or dst.is_link_local or dst.is_multicast or msg["proto"] == RTPROT_KERNEL):
            continue
        if any(dst.subnet_of(n) for n in LAN_RANGES if n.version == dst.version):
            continue
        if all(o in present and policy.trusts(present[o].name, present[o].kind) for o in route.oifs):
            continue
        if dst.prefixlen == dst.max_prefixlen and any(e.address == dst.network_address for e in policy.endpoints):
            continue
        devs = ",".join(present[o].name if o in present else str(o) for o in route.oifs)
        out.append(f"{route} dev {devs}" + (f" table {route.table}" if route.table != 254 else ""))
    return out


def ipv6_exposure(policy: Policy, present: dict[int, links.Link], addrs: list) -> list[str]:
    """Non-tunnel interfaces with a global IPv6 address, when no tunnel has one."""
    def is_global(msg) -> bool:
        a = ipaddress.IPv6Address(msg.get_attr("IFA_ADDRESS"))
        return msg["scope"] == 0 and not any(a in n for n in LAN_RANGES if n.version == 6)
    tunnel = {i for i, link in present.items() if policy.trusts(link.name, link.kind)}
    if any(is_global(m) for m in addrs if m["index"] in tunnel):
        return []
    return sorted({f"{present[m['index']].name} ({m.get_attr('IFA_ADDRESS')})" for m in addrs
                   if is_global(m) and m["index"] not in tunnel and m["index"] in present and m["index"] != 1})


def _policy_runs(prog_fd: int, nonce: bytes, present: list[links.Link], scope: model.Scope,
                 cases: list[tuple[str, bytes]], mark: int = 0) -> tuple[int, list[str]]:
    runner = Runner(prog_fd, nonce)
    runner.set_mark(mark)
    runs, mismatches = 0, []
    for link in present:
        for label, pkt in cases:
            buf = frame(pkt)
            want = model.decide_test_run(model.CGROUP, buf, link.ifindex, scope)
            got = allowed(False, runner.run(buf, link.ifindex))
            runs += 1
            if got != want.allowed:
                mismatches.append(f"{label} via {link.name}: the kernel {'allows' if got else 'drops'} it, "
                                  f"the policy says {want.reason.label} ({'allow' if want.allowed else 'drop'})")
    return runs, mismatches


class _ScopeCheck:
    def __init__(self, pin_dir: str, fix: bool):
        self.pin_dir = pin_dir
        self.fix = fix
        self.findings: list[Finding] = []
        self.scope = pin_dir

    def add(self, check: str, verdict: str, detail: str, fix: str = "") -> None:
        self.findings.append(Finding(self.scope, check, verdict, detail, fix))

    def _open(self, name_key: str, kind: str | None, again: str) -> tuple[bpf.ScopeMaps, dict] | None:
        """The scope's maps and meta record; None (after a FAIL finding) when
        they cannot be read or are of another ksbpf version."""
        try:
            maps = bpf.ScopeMaps.from_pins(self.pin_dir)
        except (OSError, KsbpfError) as exc:
            self.add("pins", FAIL, f"{self.pin_dir}: the scope's maps cannot be opened: {exc}", again)
            return None
        meta = maps.read_meta()
        self.scope = meta.get(name_key, self.pin_dir)
        if meta.get("version") != common.META_VERSION or (kind and meta.get("kind") != kind):
            maps.close()
            self.add("pins", FAIL, f"pins of another ksbpf version ({meta.get('version')})",
                     f"attach it again with this ksbpf ({again})")
            return None
        return maps, meta

    def run(self) -> list[Finding]:
        opened = self._open("cgroup", None, "ksbpf attach --cgroup PATH ..., or remove the pins: ksbpf detach --cgroup PATH")
        if opened is None:
            return self.findings
        maps, meta = opened
        with maps:
            try:
                policy = common.policy_from(meta, maps.endpoints())
            except (KeyError, ValueError, KsbpfError) as exc:
                self.add("pins", FAIL, f"the scope's description cannot be read: {exc}",
                         "attach the scope again with ksbpf attach")
                return self.findings
            self._scope(maps, meta, policy)
        return self.findings

    def _scope(self, maps: bpf.ScopeMaps, meta: dict, policy: Policy) -> None:
        cg_path, cg_id = self.scope, int(os.path.basename(self.pin_dir))
        again = attach_command(cg_path, policy)
        try:
            prog_fd = libbpf.obj_get(os.path.join(self.pin_dir, "prog"))
        except OSError:
            self.add("attached", FAIL, "the program's pin is missing", again)
            return
        try:
            prog_id = libbpf.prog_info(prog_fd).id
            try:
                ino = os.stat(cg_path).st_ino
            except OSError:
                self.add("attached", FAIL, "the cgroup no longer exists: the pins protect nothing",
                         f"ksbpf detach --cgroup {cg_path}")
                return
            if ino != cg_id:
                self.add("attached", FAIL, "the cgroup was removed and created again: it is NOT protected", again)
                return
            with open_dir(cg_path) as cg_fd:
                attached = libbpf.prog_query(cg_fd, cgroups.EGRESS)
                others = [i for i in cgroups.ksbpf_programs(cg_fd) if i != prog_id]
            if prog_id not in attached:
                self.add("attached", FAIL, f"program {prog_id} is NOT attached to the cgroup (detached by hand?): "
                         "its processes can send anywhere", again)
            else:
                self.add("attached", PASS, f"program {prog_id} attached to the cgroup's egress hook"
                         + (f" (also ksbpf program(s) {others}: left by an interrupted attach?)" if others else ""))
            self._inherited(cg_path, prog_id, again)
            self._pins(maps, [prog_fd], again)
            layer = tunnel_source.layer(self.pin_dir, meta, maps)
            if layer == "on":
                self.add("tunnel_source", PASS, "netfilter hook in the tunnel's namespace: packets with the tunnel's "
                         "source address (TIME_WAIT answers, RSTs of TCP's control socket) leave only through it")
            elif layer.startswith("MISSING"):
                self.add("tunnel_source", FAIL, f"tunnel-source hook {layer}: the kernel's answers for the scope's "
                         "connections can leave outside the tunnel", again)
            elif layer.startswith("waiting"):
                self.add("tunnel_source", PASS, f"tunnel-source hook {layer} (the daemon, or `ksbpf attach` again, "
                         "attaches it)")
            elif not layer.startswith("absent: not with"):
                self.add("tunnel_source", WARN, f"tunnel-source hook {layer}: the kernel's answers for the scope's "
                         "connections (TIME_WAIT, RSTs) are not judged", again)
            self._dns(cg_path, policy, again)
            if meta.get("netns", {}).get("each"):
                self._each(maps, policy, cg_path, prog_fd)
            elif not common.netns_alive(ns := common.meta_netns(meta)):
                self.add("tunnels", FAIL, f"network namespace {ns.label} is gone or was replaced", again)
            else:
                present = links.links(ns)
                self._tunnels(maps, policy, ns, present)
                self._policy(maps, policy, ns, present, prog_fd)
                self._network(policy, ns, present)
        finally:
            os.close(prog_fd)
        self._processes(cg_path, policy)

    def _dns(self, cg_path: str, policy: Policy, again: str) -> None:
        """--dns: the scope's redirect programs (its pinned ones) on every sock_addr hook of the cgroup."""
        if not policy.options.dns:
            return
        if not features.has("sock_addr"):
            self.add("dns", PASS, "drop only: this kernel runs no cgroup sock_addr programs, so DNS to other "
                     "resolvers is dropped (dns_not_vpn), not redirected to the VPN's")
            return
        missing = []
        with open_dir(cg_path) as cg_fd:
            for entry, hook in bpf.DNS_ATTACH.items():
                try:
                    fd = libbpf.obj_get(os.path.join(self.pin_dir, bpf.PIN_NAMES[entry]))
                except OSError:
                    missing.append(f"{DNS_HOOK_NAMES[entry]} (its program's pin is missing)")
                    continue
                try:
                    if libbpf.prog_info(fd).id not in libbpf.prog_query(cg_fd, hook):
                        missing.append(DNS_HOOK_NAMES[entry])
                except OSError as exc:
                    missing.append(f"{DNS_HOOK_NAMES[entry]} ({exc})")
                finally:
                    os.close(fd)
        if missing:
            self.add("dns", FAIL, f"--dns redirect program(s) NOT attached to the cgroup: {', '.join(missing)}: DNS "
                     "there is dropped, not redirected to the VPN's resolver (applications get no answer)",
                     f"attach again: {again} (or restart the daemon: systemctl restart ksbpf)")
        else:
            self.add("dns", PASS, f"DNS redirected to {', '.join(map(str, policy.dns)) or 'the resolvers when known'}: "
                     "connect4/6, sendmsg4/6, recvmsg4/6 and getpeername4/6 programs attached")

    def _inherited(self, cg_path: str, prog_id: int, again: str) -> None:
        missing = []
        dirs = subtree(cg_path)
        for d in dirs:
            try:
                with open_dir(d) as fd:
                    if prog_id not in libbpf.prog_query(fd, cgroups.EGRESS, effective=True):
                        missing.append(d)
            except OSError:
                continue
        if missing:
            self.add("inherited", FAIL, f"not in force on {len(missing)} descendant cgroup(s): {', '.join(missing[:3])}",
                     again)
        else:
            self.add("inherited", PASS, f"in force on the cgroup and its {len(dirs) - 1} descendant(s)")

    def _pins(self, maps: bpf.ScopeMaps, prog_fds: list[int], again: str) -> None:
        """Every map the attached program(s) use is pinned, and the policy's maps
        (the ones ksbpf and the daemon change) are among them."""
        used = set().union(*(prog_map_ids(fd) for fd in prog_fds))
        pinned = {name: libbpf.map_info(fd).id for name, fd in maps.fds.items()}
        unpinned = used - set(pinned.values())
        unused = sorted(n for n in POLICY_MAPS if pinned.get(n) not in used)
        if unpinned or unused:
            self.add("pins", FAIL, (f"pinned map(s) {', '.join(unused)} are not the attached programs': changes to them "
                                    "have no effect" if unused else "")
                     + ("; " if unused and unpinned else "")
                     + (f"the attached program uses {len(unpinned)} map(s) that are not pinned" if unpinned else ""),
                     again)
        else:
            self.add("pins", PASS, f"the {len(used)} maps the program{'s use' if len(prog_fds) > 1 else ' uses'} are the pinned ones")

    def _each(self, maps: bpf.ScopeMaps, policy: Policy, cg_path: str, prog_fd: int) -> None:
        """`netns = "each"`: every namespace a process of the subtree lives in,
        judged as a scope of that namespace; entries of namespaces no longer
        in use are stale."""
        spaces = subtree_scope.discover(cg_path)
        in_use = {sp.cookie for sp in spaces}
        stale = sorted({e.netns_cookie for e in maps.tunnels()} - in_use)
        if stale:
            self.add("tunnels", FAIL, f"tunnel entries of {len(stale)} namespace(s) no process of the subtree uses "
                     "any more (a namespace that takes that cookie cannot exist, but the map is out of step)",
                     "run the daemon (ksbpf daemon) with netns = \"each\"")
        if not spaces:
            self.add("tunnels", PASS, "netns each: no process of the subtree lives in any namespace yet "
                     "(whatever starts there is blocked until its tunnel is registered)")
        for sp in spaces:
            ns = sp.use.netns()
            self._tunnels(maps, policy, ns, sp.links, only_this_namespace=True)
            self._policy(maps, policy, ns, sp.links, prog_fd)
            self._network(policy, ns, sp.links)

    def _tunnels(self, maps: bpf.ScopeMaps, policy: Policy, ns: netns.Netns, present: list[links.Link],
                 only_this_namespace: bool = False) -> None:
        cookie = netns.cookie(ns)
        want = {link.ifindex: link.name for link in present if policy.trusts(link.name, link.kind)}
        have = maps.tunnels()
        if only_this_namespace:   # netns each: the other namespaces' entries are theirs
            have = [e for e in have if e.netns_cookie == cookie]
        extra = [e for e in have if e.netns_cookie != cookie or e.ifindex not in want]
        missing = [f"{name} (ifindex {i})" for i, name in want.items()
                   if not any(e.netns_cookie == cookie and e.ifindex == i for e in have)]
        fix = "run the daemon (ksbpf daemon) to keep the map in step, or attach again: " + attach_command(self.scope, policy)
        if extra:
            self.add("tunnels", FAIL, "registered tunnel entr(ies) for interface(s) that are not a trusted tunnel now: "
                     + ", ".join(f"ifindex {e.ifindex}" + ("" if e.netns_cookie == cookie else " in another namespace")
                                 for e in extra) + " (an interface that takes that number would be allowed)", fix)
        if missing:
            self.add("tunnels", WARN, f"tunnel(s) {', '.join(missing)} present but not registered: the scope is "
                     "blocked (fail-closed)", fix)
        if not extra and not missing:
            names = ", ".join(f"{n} (ifindex {i})" for i, n in want.items()) or "none present"
            self.add("tunnels", PASS, f"registered tunnels = trusted tunnels present: {names}")

    def _policy(self, maps: bpf.ScopeMaps, policy: Policy, ns: netns.Netns, present: list[links.Link],
                prog_fd: int) -> None:
        nonce = ensure_nonce(maps, netns.cookie(ns))   # runs stand for a socket of the scope's namespace
        tunnels = frozenset(link.ifindex for link in present if policy.trusts(link.name, link.kind))
        scope = model.Scope(policy.options, policy.endpoints, tunnels, any_endpoints=policy.any_endpoints,
                            resolvers=frozenset(a.packed for a in policy.dns))
        cases = crafted.packets(policy.endpoints, policy.any_endpoints, policy.dns)
        runs, mismatches = 0, []
        for mark, as_scope in _vpn_variants(policy, scope):   # --vpn-mark: marked runs too
            r, m = netns.run_in(ns.path, _policy_runs, prog_fd, nonce, present, as_scope, cases, mark)
            runs, mismatches = runs + r, mismatches + [f"{x} (mark {mark:#x})" if mark else x for x in m]
        if mismatches:
            self.add("policy", FAIL, f"{len(mismatches)} of {runs} verdicts differ from the policy: "
                     + "; ".join(mismatches[:4]) + (" ..." if len(mismatches) > 4 else ""),
                     "attach the scope again: " + attach_command(self.scope, policy))
        else:
            self.add("policy", PASS, f"{len(cases)} crafted packets x {len(present)} interface(s) "
                     f"({', '.join(link.name for link in present)}): every verdict as the policy says")

    def _network(self, policy: Policy, ns: netns.Netns, present: list[links.Link]) -> None:
        by_index = {link.ifindex: link for link in present}
        routes, addrs = netns.run_in(ns.path, _dump_routes_and_addrs)
        bad = hijacking_routes(policy, by_index, routes)
        if bad:
            self.add("routes", WARN, f"route(s) sending non-local destinations outside the tunnel: {'; '.join(bad)} "
                     "(the policy keeps that traffic blocked: connections there fail)",
                     "find who added them (DHCP option 121? TunnelVision, CVE-2024-3661) and remove them: "
                     "ip route del ...; distrust the network that pushed them")
        else:
            self.add("routes", PASS, "no route sends non-local destinations outside the tunnel")
        exposed = ipv6_exposure(policy, by_index, addrs)
        if exposed:
            self.add("ipv6", WARN, f"global IPv6 on {', '.join(exposed)} but none on the tunnel: the scope's IPv6 "
                     "traffic is blocked, and applications that try IPv6 first stall",
                     "give the tunnel IPv6, or turn IPv6 off there: sysctl net.ipv6.conf.IF.disable_ipv6=1")
        else:
            self.add("ipv6", PASS, "no global IPv6 address outside the tunnel that the tunnel lacks")

    def _processes(self, cg_path: str, policy: Policy | None = None) -> None:
        strays = stray_sockets(cg_path)
        if strays and self.fix:
            closed, errors = close_stray(strays)
            left = stray_sockets(cg_path)
            if left or errors:
                self.add("sockets", FAIL, f"closed {closed}, but {len(left)} socket(s) created outside the scope remain: "
                         + "; ".join(errors[:3]), "restart those processes inside the scope (ksbpf exec)")
            else:
                udp = any(s.sock.protocol == socket.IPPROTO_UDP for s in strays)
                self.add("sockets", FIXED, f"closed {closed} socket(s) created outside the scope: "
                         + "; ".join(f"pid {s.pid} ({s.comm}) {s.sock}" for s in strays[:4]),
                         "a UDP socket is aborted, not taken from its process, which can use it again: "
                         "restart those processes with ksbpf exec" if udp else "")
        elif strays:
            self.add("sockets", WARN, f"{len(strays)} socket(s) created outside the scope, unprotected: "
                     + "; ".join(f"pid {s.pid} ({s.comm}) {s.sock}" for s in strays[:4])
                     + (" ..." if len(strays) > 4 else ""),
                     "ksbpf verify --fix closes them (the application sees the connection reset), "
                     "or restart the process with ksbpf exec")
        else:
            self.add("sockets", PASS, "every TCP/UDP socket of the scope's processes was created inside it")
        raw = []
        for pid in scope_pids(cg_path):
            why = []
            if _has_cap(pid, CAP_NET_RAW):
                why.append("has CAP_NET_RAW")
            if _socket_inodes(pid) & _packet_inodes(pid):
                why.append("holds an AF_PACKET socket")
            if why:
                raw.append(f"pid {pid} ({_comm(pid)}) {' and '.join(why)}")
        if raw:
            self.add("raw", WARN, "; ".join(raw[:4]) + (" ..." if len(raw) > 4 else "")
                     + ": raw AF_PACKET sockets bypass the cgroup hook",
                     "run it without CAP_NET_RAW (capsh --drop=cap_net_raw --, or CapabilityBoundingSet=~CAP_NET_RAW)")
        else:
            self.add("raw", PASS, "no process of the scope can open raw packet sockets")
        self._tun(cg_path, policy)

    def _tun(self, cg_path: str, policy: Policy | None) -> None:
        """A tun device a scope process can write into: what it writes is
        forwarded (ip_forward) or answered by the kernel, outside the hook."""
        wanted = bool(policy and policy.deny_tun)
        in_force = cgroups.deny_tun_in_force(cg_path)
        if wanted and not in_force:
            self.add("tun", FAIL, "--deny-tun's device program is NOT attached to the cgroup: its processes can "
                     "open /dev/net/tun", attach_command(cg_path, policy))
            return
        found = cgroups.tun_warnings(cg_path, in_force)
        if found:
            self.add("tun", WARN, "; ".join(found[:4]) + (" ..." if len(found) > 4 else ""),
                     "ksbpf attach ... --deny-tun (config deny_tun = true) refuses /dev/net/tun to the scope; "
                     "then restart the processes that hold one")
        else:
            self.add("tun", PASS, "no process of the scope can write into a tun device"
                     + (" (--deny-tun in force)" if in_force else ""))


def _own_cgroup() -> str | None:
    """This process's cgroup v2 directory (the cgroup of a test run's socket)."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return os.path.join(cgroup.cgroup2_root(), line[3:].strip().lstrip("/")).rstrip("/")
    except OSError:
        pass
    return None


def _vpn_variants(policy: Policy, scope: model.Scope) -> list[tuple[int, model.Scope]]:
    """(skb mark, what the model assumes) of each pass of crafted packets: a
    test run's packet carries no mark and its socket is in this process's
    cgroup -- the VPN client's when that is in a --vpn-cgroup subtree; with
    --vpn-mark, a second pass carries the mark: the VPN client's."""
    own = _own_cgroup()
    in_vpn = bool(own) and any(own == c or own.startswith(c.rstrip("/") + "/")
                               for c in (os.path.realpath(x) for x in policy.vpn_cgroups))
    out = [(0, dataclasses.replace(scope, vpn_client=in_vpn))]
    if policy.vpn_mark:
        out.append((policy.vpn_mark[0], dataclasses.replace(scope, vpn_client=True)))
    return out


def _node_runs(fds: dict[str, int], nonce: bytes, present: list[links.Link], scope: model.Scope,
               endpoints, any_endpoints=(), mark: int = 0, resolvers=()) -> tuple[int, list[str]]:
    runners = {entry: Runner(fd, nonce) for entry, fd in fds.items()}
    for r in runners.values():
        r.set_mark(mark)
    runs, mismatches = 0, []
    for link in present:
        entry = node_scope.entry_for(link)
        hook = model.TC_ETH if entry == bpf.ENTRY_TC_ETH else model.TC_L3
        for label, buf in crafted.tc_frames(endpoints, link.ethernet, any_endpoints, resolvers):
            want = model.decide_test_run(hook, buf, link.ifindex, scope)
            got = allowed(True, runners[entry].run(buf, link.ifindex))
            runs += 1
            if got != want.allowed:
                mismatches.append(f"{label} via {link.name}: the kernel {'allows' if got else 'drops'} it, "
                                  f"the policy says {want.reason.label} ({'allow' if want.allowed else 'drop'})")
    return runs, mismatches


class _NodeCheck(_ScopeCheck):
    """A node scope: every interface that should be guarded is, and the tc
    programs decide as the policy says on each of them."""

    def run(self) -> list[Finding]:
        opened = self._open("name", "node", "ksbpf attach --node ..., or remove it: ksbpf detach --node")
        if opened is None:
            return self.findings
        maps, meta = opened
        with maps:
            np = NodePolicy.from_dict({**meta["policy"], "endpoints": [str(e) for e in maps.endpoints()]})
            self._node(maps, meta, np)
        return self.findings

    def _node(self, maps: bpf.ScopeMaps, meta: dict, np: NodePolicy) -> None:
        policy = np.policy
        again = f"ksbpf attach --node --netns {policy.netns or '...'} --tunnel ... (or run the daemon)"
        ns = common.meta_netns(meta)
        if not common.netns_alive(ns) or netns.cookie(ns) != meta["netns"].get("cookie"):
            self.add("guarded", FAIL, f"network namespace {ns.label} is gone or was replaced", again)
            return
        fds: dict[str, int] = {}
        try:
            for entry in bpf.TC_ENTRIES:
                fds[entry] = libbpf.obj_get(os.path.join(self.pin_dir, bpf.PIN_NAMES[entry]))
        except OSError:
            self.add("guarded", FAIL, "a tc program's pin is missing", again)
            for fd in fds.values():
                os.close(fd)
            return
        try:
            present = links.links(ns)
            mode = meta.get("tc_mode", "tcx")
            want = node_scope.guarded_links(np, present)
            live = node_scope.guards_in_force(self.pin_dir, ns, want, mode)
            missing = [f"{link.name} (ifindex {link.ifindex})" for link in want if not live[link.ifindex]]
            roles = {link.name: np.role(link.name, link.kind, link.ifindex) for link in present}
            others = ", ".join(f"{n} {r}" for n, r in roles.items() if r != "guarded")
            if missing:
                self.add("guarded", FAIL, f"NOT guarded: {', '.join(missing)}: its traffic leaves unjudged", again)
            else:
                self.add("guarded", PASS, f"every non-internal interface guarded ({mode}): "
                         + (", ".join(link.name for link in want) or "none") + (f"; not guarded by design: {others}"
                                                                               if others else ""))
            self._first(ns, [link for link in want if live[link.ifindex]], mode)
            self._pins(maps, list(fds.values()), again)
            layer = node_scope.nf_layer(self.pin_dir, meta)
            if layer == "on":
                self.add("from_birth", PASS, "netfilter hook (IPv4, IPv6 POST_ROUTING) attached: the IP traffic of "
                         "interfaces created later is judged before any guard exists on them")
            elif layer.startswith("absent"):
                self.add("from_birth", WARN, f"from-birth layer {layer}",
                         "a kernel with netfilter BPF links (Linux 6.4+), or run the daemon" if "kernel" in layer
                         else again)
            else:
                self.add("from_birth", FAIL, f"from-birth layer {layer}", again)
            raw = rawsock.node_layer(self.pin_dir, bool(meta.get("raw_lsm")))
            if raw == "refused":
                self.add("raw_sockets", PASS, "PACKET_QDISC_BYPASS and AF_XDP binds refused in the namespace outside "
                         "the exempt cgroups (BPF LSM): no frame skips the tc guards")
            elif raw.startswith("open"):
                self.add("raw_sockets", WARN, f"raw-socket layer {raw}: frames sent with PACKET_QDISC_BYPASS or "
                         "through AF_XDP skip the tc guards",
                         again if "attached without" in raw else "drop CAP_NET_RAW outside the exempt cgroups")
            else:
                self.add("raw_sockets", FAIL, f"raw-socket layer {raw}", again)
            if policy.dns:   # the tunnel carries no tc guard: only the netfilter hook sees DNS through it
                if layer == "on":
                    self.add("dns", PASS, f"DNS only to {', '.join(map(str, policy.dns))}: outside the tunnel "
                             "dropped by the guards, through the tunnel to other resolvers by the netfilter hook "
                             "(not redirected in node mode)")
                else:
                    self.add("dns", WARN, f"DNS through the tunnel to other resolvers is NOT judged (from-birth "
                             f"layer {layer}): only DNS outside the tunnel is dropped",
                             "a kernel with netfilter BPF links (Linux 6.4+), or a cgroup scope's --dns for "
                             "local applications")
            self._tunnels(maps, policy, ns, present)
            nonce = ensure_nonce(maps)
            own = _own_cgroup()
            exempt = bool(own) and any(own == e or own.startswith(e.rstrip("/") + "/")
                                       for e in (os.path.realpath(x) for x in np.exempt_cgroups))
            tunnels = frozenset(link.ifindex for link in present if policy.trusts(link.name, link.kind))
            judged = [link for link in present if roles[link.name] in ("guarded", "tunnel")]
            scope = model.Scope(policy.options, policy.endpoints, tunnels, exempt,
                                on_link=netns.run_in(ns.path, on_link_table, judged),
                                any_endpoints=policy.any_endpoints,
                                resolvers=frozenset(a.packed for a in policy.dns))
            runs, mismatches = 0, []
            for mark, as_scope in _vpn_variants(policy, scope):   # --vpn-mark: marked runs too
                r, m = netns.run_in(ns.path, _node_runs, fds, nonce, judged, as_scope, policy.endpoints,
                                    policy.any_endpoints, mark, policy.dns)
                runs, mismatches = runs + r, mismatches + [f"{x} (mark {mark:#x})" if mark else x for x in m]
            if mismatches:
                self.add("policy", FAIL, f"{len(mismatches)} of {runs} verdicts differ from the policy: "
                         + "; ".join(mismatches[:4]) + (" ..." if len(mismatches) > 4 else ""), again)
            else:
                self.add("policy", PASS, f"{runs} crafted frames through the tc programs on "
                         f"{', '.join(link.name for link in judged) or 'no interface'}: every verdict as the policy says")
            self._network(policy, ns, present)
        finally:
            for fd in fds.values():
                os.close(fd)


    def _first(self, ns: netns.Netns, guarded: list[links.Link], mode: str) -> None:
        """Each guard runs first on its interface's egress: a program in front of
        it can pass (TCX_PASS, TC_ACT_OK) what the guard would drop."""
        bad = []
        for link in guarded:
            try:
                front = node_scope.programs_in_front(self.pin_dir, ns, link, mode)
            except (OSError, KsbpfError) as exc:
                self.add("first", FAIL, f"the egress chain of {link.name} cannot be read: {exc}",
                         "run verify as root; check `bpftool net show`")
                return
            if front:
                bad.append((link, front))
        if bad:
            self.add("first", FAIL, "; ".join(f"on {link.name} (ifindex {link.ifindex}) "
                                              f"{', '.join(map(str, front))} run(s) BEFORE the guard: what "
                                              "it passes is never judged" for link, front in bad),
                     " / ".join(node_scope.front_fix(link.name, front, mode) for link, front in bad))
        else:
            self.add("first", PASS, f"each guard runs first on its interface's egress ({mode}): "
                     + (", ".join(link.name for link in guarded) or "none"))


def open_dir(path: str):
    return cgroups._open_dir(path)


def verify(scope: str | None = None, fix: bool = False, bpffs: str = pins.BPFFS) -> Report:
    """Check every protected scope (or the one whose cgroup is `scope`)."""
    preflight.require_root()
    report = Report()
    dirs = [(d, _ScopeCheck) for d in pins.list_scope_dirs(bpffs)] + \
        [(d, _NodeCheck) for d in pins.list_node_dirs(bpffs)]
    if scope is not None:
        dirs = [(d, kind) for d, kind in dirs if _is_scope(d, kind, scope)]
        if not dirs:
            raise KsbpfError(f"{scope} is not a protected scope", "see `ksbpf status` for the protected scopes "
                             "(a cgroup directory, or node / node:NETNS)")
    for d, kind in dirs:
        try:
            report.findings += kind(d, fix).run()
        except (OSError, KsbpfError) as exc:
            report.findings.append(Finding(d, "scope", FAIL, f"the check could not run: {exc}",
                                           "see `ksbpf status`"))
    return report


def check_pin_dir(pin_dir: str, fix: bool = False, bpffs: str = pins.BPFFS) -> list[Finding]:
    """The findings of one scope, by its pin directory (a cgroup scope or the node scope)."""
    return (_NodeCheck if is_node_dir(pin_dir, bpffs) else _ScopeCheck)(pin_dir, fix).run()


def is_node_dir(pin_dir: str, bpffs: str = pins.BPFFS) -> bool:
    return os.path.dirname(pin_dir.rstrip("/")) == pins.nodes_dir(bpffs)


def _is_scope(pin_dir: str, kind, scope: str) -> bool:
    """Is the scope pinned at pin_dir the one named `scope` (a cgroup path; node / node:NETNS)?"""
    if kind is _ScopeCheck:
        try:
            return os.path.basename(pin_dir) == str(os.stat(os.path.realpath(scope)).st_ino)
        except OSError:
            return False
    try:
        with bpf.ScopeMaps.from_pins(pin_dir) as maps:
            meta = maps.read_meta()
    except (OSError, KsbpfError, ValueError):
        return False
    ns = meta.get("netns", {})
    return scope in (meta.get("name"), ns.get("path")) or (
        scope.startswith("node:") and scope[5:] in (ns.get("path"), os.path.basename(ns.get("path", ""))))


def render(report: Report) -> str:
    """The report as one table: scope, check, verdict, what it found and what to do."""
    if not report.findings:
        return features.short() + "\nno protected scope on this machine (nothing to verify)\n"
    width = max(len(f.scope) for f in report.findings)
    width = min(max(width, 5), 48)
    lines = [features.short(), f"{'SCOPE':<{width}}  {'CHECK':<9}  {'VERDICT':<7}  FINDING / WHAT TO DO"]
    last = None
    for f in report.findings:
        scope = f.scope if f.scope != last else ""
        last = f.scope
        lines.append(f"{scope:<{width}}  {f.check:<9}  {f.verdict:<7}  {f.detail}")
        if f.fix:
            lines.append(f"{'':<{width}}  {'':<9}  {'':<7}  -> {f.fix}")
    s = {v: report.count(v) for v in (PASS, FIXED, WARN, FAIL)}
    lines.append(f"{s[PASS]} ok, {s[FIXED]} fixed, {s[WARN]} warning(s), {s[FAIL]} failure(s)")
    return "\n".join(lines) + "\n"
