"""The command line: a thin layer over the scopes, the daemon and the lab."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone

import click

from ksbpf.daemon.config import ConfigError
from ksbpf.errors import KsbpfError
from ksbpf.kernel import cgroup, features, preflight, rawsock, vpn_dns
from ksbpf.policy import (
    DEFAULT_INTERNAL,
    DEFAULT_TUNNEL_KINDS,
    TC_MODES,
    format_mark,
    Endpoint,
    EventSettings,
    NodePolicy,
    Options,
    Policy,
    split_endpoint_specs,
)
from ksbpf.scopes import cgroups, common, machine
from ksbpf.scopes import node as node_scope


def _progress(msg: str) -> None:
    click.echo(f"ksbpf: {msg}", err=True)


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


class _Cli(click.Group):
    """Turns a KsbpfError into one line on stderr and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ConfigError as exc:  # every problem of the file, one per line
            for issue in exc.errors:
                click.echo(f"ksbpf: error: {issue}", err=True)
            ctx.exit(1)
        except KsbpfError as exc:
            click.echo(f"ksbpf: error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=_Cli)
@click.version_option(package_name="ksbpf")
def main() -> None:
    """ksbpf: an eBPF kill switch.  The processes of a cgroup may send only
    through the tunnel interfaces you name (and to the VPN endpoints), through
    no other interface, whether the tunnel is up or not."""


def _endpoint(_ctx, _param, values) -> tuple[tuple[Endpoint, ...], tuple[str, ...]]:
    return split_endpoint_specs(values)


def _print_endpoints(policy: Policy, followed_now: list, failed: list, fixed_note: str = "") -> None:
    """Fixed endpoints, then the followed ones with where they came from."""
    for ep in policy.endpoints:
        click.echo(f"  endpoint {ep}{fixed_note}")
    for f in followed_now:
        click.echo(f"  endpoint {f.describe()}")
    if policy.follow:
        sources = ", ".join("the tunnels" if f == "auto" else f for f in policy.follow)
        if not followed_now:
            click.echo(f"  endpoint auto: none in use now by {sources}")
    for problem in failed:
        click.echo(f"  warning: endpoint source not read: {problem}")


@main.command()
@click.option("--cgroup", "cgroup_path", metavar="PATH",
              help="cgroup v2 directory whose processes are confined.")
@click.option("--node", is_flag=True,
              help="Node mode: guard every interface of the namespace (tc egress), forwarded traffic included.")
@click.option("--tunnel", "tunnels", multiple=True, required=True, metavar="NAME",
              help="Tunnel interface the scope may use (repeat for several).")
@click.option("--endpoint", "endpoints", multiple=True, callback=_endpoint, metavar="ADDR:PORT/PROTO|auto",
              help="VPN server the scope may reach outside the tunnel: 203.0.113.5:51820/udp, [2001:db8::5]:51820/udp; "
                   "`auto`: the endpoints the WireGuard tunnels' peers use, read now, followed by the daemon; "
                   "`auto:/run/openvpn/NAME.sock`: the remote of the OpenVPN client with that management socket; "
                   "`*:51820/udp`: any address on that port and protocol (needs --vpn-mark or --vpn-cgroup).")
@click.option("--vpn-mark", "vpn_mark", metavar="MARK[/MASK]",
              help="The endpoint exception belongs to the VPN client: only packets carrying this firewall mark "
                   "(wg set IFACE fwmark MARK, openvpn --mark MARK) may reach the endpoints outside the tunnel.")
@click.option("--vpn-cgroup", "vpn_cgroups", multiple=True, metavar="PATH",
              help="... or only packets of local sockets of this cgroup subtree (the VPN client's service or "
                   "container; repeatable).")
@click.option("--netns", default="", metavar="NAME|PATH|each",
              help="Network namespace where the tunnel names live (default: the caller's; node mode: the one "
                   "guarded); `each`: every namespace a process of the cgroup subtree lives in (containers).")
@click.option("--allow-lan", is_flag=True, help="Allow the fixed private ranges (not DNS to them).")
@click.option("--allow-lan-dns", is_flag=True, help="With --allow-lan: also allow DNS (53, 853) to LAN addresses.")
@click.option("--allow-dhcp", is_flag=True, help="Allow DHCPv4/DHCPv6 client traffic (node mode: the default).")
@click.option("--block-dhcp", is_flag=True, help="Node mode: do not let the machine's DHCP client through.")
@click.option("--internal", "internal", multiple=True, metavar="GLOB",
              help="Node mode: interfaces leading only to local containers/VMs, left unguarded (adds to the defaults).")
@click.option("--no-default-internal", is_flag=True,
              help="Node mode: drop the default internal list (Docker, Podman, libvirt, CNI, Cilium bridges and veths).")
@click.option("--exempt-cgroup", "exempt", multiple=True, metavar="PATH",
              help="Node mode: local sockets of this cgroup subtree pass the guard (sshd, a node agent).")
@click.option("--tc-mode", type=click.Choice(TC_MODES), default="auto", show_default=True,
              help="Node mode: tcx links (kernel 6.6+) or a clsact qdisc filter; auto picks tcx when it exists.")
@click.option("--deny-tun", is_flag=True,
              help="cgroup scopes: refuse /dev/net/tun to the scope's processes (a tun device they write into "
                   "is forwarded or answered by the kernel, outside the hook); off by default: a VPN client "
                   "inside the scope needs it.")
@click.option("--dns", "dns", multiple=True, metavar="ADDR|auto",
              help="The VPN's resolver (repeatable): DNS (53, 853) of the scope goes only to these, "
                   "through the tunnel; DNS to any other resolver (a stub on 127.0.0.53 included) is redirected to "
                   "the first one where the kernel can, else dropped.  Node mode: every local and forwarded "
                   "packet's DNS, dropped (never redirected).  `auto`: the resolvers the VPN set for the "
                   "tunnel (systemd-resolved's per-link DNS, or wg-quick's DNS = line).")
@click.option("--tunnel-kind", "kinds", multiple=True, metavar="KIND",
              help=f"Link kind trusted as a tunnel (repeatable; default: {', '.join(DEFAULT_TUNNEL_KINDS)}).")
@click.option("--events-rate", type=float, default=EventSettings.rate, show_default=True, metavar="N",
              help="Samples of blocked packets streamed per second (`ksbpf events`); 0: off.")
@click.option("--events-burst", type=int, default=EventSettings.burst, show_default=True, metavar="N")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def attach(cgroup_path, node, tunnels, endpoints, vpn_mark, vpn_cgroups, netns, allow_lan, allow_lan_dns, allow_dhcp, block_dhcp,
           internal, no_default_internal, exempt, tc_mode, deny_tun, dns, kinds, events_rate, events_burst,
           as_json) -> None:
    """Protect a cgroup (--cgroup) or the whole machine (--node); replaces
    the policy if already protected (no gap).

    Enforcement stays in the kernel after this command exits."""
    if bool(cgroup_path) == node:
        raise click.UsageError("give exactly one of --cgroup PATH or --node")
    if node and deny_tun:
        raise click.UsageError("--deny-tun goes with --cgroup (node mode judges forwarded packets at tc already)")
    node_only = {"--block-dhcp": block_dhcp, "--internal": internal, "--no-default-internal": no_default_internal,
                 "--exempt-cgroup": exempt, "--tc-mode": tc_mode != "auto"}
    if cgroup_path and any(node_only.values()):
        raise click.UsageError(f"{', '.join(k for k, v in node_only.items() if v)} only go with --node")
    if block_dhcp and allow_dhcp:
        raise click.UsageError("give --allow-dhcp or --block-dhcp, not both")
    dhcp = allow_dhcp or (node and not block_dhcp)
    fixed, follow = endpoints
    resolvers, dns_sources = vpn_dns.resolve_specs(dns, tunnels, own_namespace=netns in ("", None))
    policy = Policy(tuple(tunnels), fixed, netns, Options(allow_lan, allow_lan_dns, dhcp),
                    tuple(kinds) or DEFAULT_TUNNEL_KINDS, EventSettings(events_rate, events_burst),
                    deny_tun=deny_tun, follow=follow, vpn_mark=vpn_mark, vpn_cgroups=tuple(vpn_cgroups),
                    dns=resolvers)
    if node:
        np = NodePolicy(policy, (() if no_default_internal else DEFAULT_INTERNAL) + tuple(internal), exempt, tc_mode)
        result = node_scope.attach(np, progress=_progress)
        if as_json:
            _emit_json(result.to_dict())
            return
        _print_node_attach(result, np, dns_sources)
        return
    result = cgroups.attach(cgroup_path, policy, progress=_progress)
    if as_json:
        _emit_json(result.to_dict())
        return
    if result.mounted_bpffs:
        click.echo("mounted the BPF filesystem at /sys/fs/bpf")
    verb = "re-attached (previous program replaced with no gap)" if result.replaced else "attached"
    click.echo(f"{result.cgroup}: {verb}; program {result.prog_id}, pins in {result.pin_dir}")
    _print_tunnels(result.tunnels, policy)
    if result.each:
        click.echo(f"  netns each: {len({t.netns for t in result.tunnels})} network namespace(s) in use by the subtree now; "
                   "tunnels of namespaces that appear later are registered only by the daemon (`ksbpf daemon` with "
                   "netns = \"each\"): until then their non-local traffic is dropped")
    _print_endpoints(policy, result.followed, result.follow_failed, ": allowed outside the tunnel")
    _print_vpn(policy, width=0)
    if policy.follow:
        click.echo("  endpoint auto: read once now; only the daemon (`ksbpf daemon`, endpoints = [\"auto\"]) "
                   "follows a server switch")
    click.echo(f"  options: {_options(policy)}")
    if policy.deny_tun:
        click.echo("  deny-tun: the scope's processes cannot open /dev/net/tun (devices opened before stay usable)")
    if policy.dns:
        click.echo(f"  dns: only to {', '.join(map(str, policy.dns))} through the tunnel"
                   + (f" (auto: {', '.join(dns_sources)})" if dns_sources else "") + "; other DNS "
                   + ("redirected to the first of its family, or dropped" if result.dns_redirect
                      else "dropped (this kernel cannot redirect it: no cgroup sock_addr programs)"))
    if rawsock.available():
        click.echo("  raw sockets: the scope's processes cannot open AF_PACKET or AF_XDP sockets (BPF LSM; "
                   "sockets opened before stay usable)")
    else:
        click.echo(f"  raw sockets: not refused on this kernel ({rawsock.why_not()}): a process of the scope "
                   "holding CAP_NET_RAW can send raw frames past the policy (drop CAP_NET_RAW)")
    if result.processes_before:
        click.echo(f"  notice: this kernel's cgroup programs cannot ask a packet's namespace (Linux 6.17 can): each "
                   f"socket's is recorded when it is created; the {result.processes_before} process(es) already in "
                   "the scope keep sockets opened before now blocked, even through the tunnel, until they reopen "
                   "them (fail closed)")
    click.echo("  everything else is dropped; undo with: ksbpf detach --cgroup " + result.cgroup)


def _print_vpn(policy: Policy, indent: str = "  ", width: int = 8) -> None:
    """Who the endpoint exception belongs to (--vpn-mark, --vpn-cgroup)."""
    if not policy.vpn_mark and not policy.vpn_cgroups:
        return
    who = ([f"packets with mark {format_mark(*policy.vpn_mark)}"] if policy.vpn_mark else []) + \
          ([f"local sockets of {', '.join(policy.vpn_cgroups)}"] if policy.vpn_cgroups else [])
    click.echo(f"{indent}{'vpn':<{width}} the endpoints are the VPN client's only: {' or '.join(who)}; "
               "anything else to them is dropped (endpoint_not_vpn)")
    for ep in policy.any_endpoints:
        click.echo(f"{indent}{'endpoint':<{width}} {ep} (any address: the VPN client's only)")


def _options(policy: Policy) -> str:
    opts = [k.replace("_", "-") for k, on in policy.options.to_dict().items() if on]
    return ", ".join(opts) if opts else "none (strict)"


def _print_tunnels(tunnels, policy: Policy) -> None:
    for t in tunnels:
        if t.registered:
            click.echo(f"  tunnel {t.name}: ifindex {t.ifindex} ({t.kind}) in netns {t.netns}: allowed")
        elif t.impostor:
            click.echo(f"  WARNING: {t.name} in netns {t.netns} is a {t.kind} interface, not a trusted tunnel "
                       f"kind ({', '.join(policy.tunnel_kinds)}): it stays blocked (add --tunnel-kind {t.kind} if it is your tunnel)")
        else:
            click.echo(f"  NOTICE: tunnel {t.name} does not exist in netns {t.netns} yet: every non-local "
                       f"packet of the scope is dropped until it appears and is registered (re-run attach, or run the daemon)")


def _print_interfaces(interfaces) -> None:
    for i in interfaces:
        if i.role == "guarded":
            state = "guarded" if i.guarded else "UNGUARDED: its traffic is NOT judged"
            if i.guarded and getattr(i, "in_front", ()):
                state = (f"guarded but NOT FIRST: {', '.join(map(str, i.in_front))} run(s) before the guard "
                         "and can pass what it would drop")
        else:
            state = {"tunnel": "tunnel: not touched", "internal": "internal: leads to local containers/VMs",
                     "loopback": "loopback"}[i.role]
        click.echo(f"  {'iface':<8} {i.name} (ifindex {i.ifindex}, {i.kind or 'no kind'}): {state}")


def _print_node_attach(result, np: NodePolicy, dns_sources=()) -> None:
    if result.mounted_bpffs:
        click.echo("mounted the BPF filesystem at /sys/fs/bpf")
    verb = "re-attached (previous guards replaced with no gap)" if result.replaced else "attached"
    click.echo(f"{result.name} (netns {result.netns}): {verb} with {result.mode}; pins in {result.pin_dir}")
    _print_interfaces(result.interfaces)
    _print_tunnels(result.tunnels, np.policy)
    _print_endpoints(np.policy, result.followed, result.follow_failed, ": allowed outside the tunnel")
    _print_vpn(np.policy, width=0)
    if np.policy.follow:
        click.echo("  endpoint auto: read once now; only the daemon (`ksbpf daemon`, endpoints = [\"auto\"]) "
                   "follows a server switch")
    click.echo(f"  options: {_options(np.policy)}")
    if np.exempt_cgroups:
        click.echo(f"  exempt:  {', '.join(np.exempt_cgroups)} (local sockets only; forwarded packets have none)")
    click.echo(f"  internal interfaces (not guarded): {' '.join(np.internal) or 'none'}")
    if result.dns:
        click.echo("  dns: " + node_scope.dns_line(result.dns)
                   + (f" (auto: {', '.join(dns_sources)})" if dns_sources else ""))
    if result.from_birth == "on":
        click.echo("  from birth: a netfilter hook (IPv4, IPv6) judges the IP traffic of interfaces that appear later;"
                   " their raw frames (AF_PACKET) and non-IP wait for the daemon's tc guard")
    else:
        click.echo(f"  from birth: {result.from_birth}")
        click.echo("  interfaces that appear later are guarded only by the daemon (`ksbpf daemon` with a [node] table)")
    if result.raw_sockets == "refused":
        click.echo("  raw sockets: PACKET_QDISC_BYPASS and AF_XDP binds are refused in the namespace outside the "
                   "exempt cgroups (BPF LSM); other AF_PACKET frames pass the tc guards")
    else:
        click.echo(f"  raw sockets: {result.raw_sockets}; frames sent with PACKET_QDISC_BYPASS or through AF_XDP "
                   "skip the tc guards: drop CAP_NET_RAW outside the exempt cgroups")
    click.echo("  everything else is dropped; undo with: ksbpf detach --node" + (f" --netns {np.policy.netns}" if np.policy.netns else ""))


@main.command()
@click.option("--cgroup", "cgroup_path", metavar="PATH", help="The cgroup to release.")
@click.option("--node", is_flag=True, help="Remove node mode from the namespace (--netns; default: the caller's).")
@click.option("--netns", default="", metavar="NAME|PATH", help="With --node: the namespace.")
@click.option("--all", "everything", is_flag=True, help="Remove ksbpf from every cgroup and interface (escape hatch).")
@click.option("--json", "as_json", is_flag=True)
def detach(cgroup_path, node, netns, everything, as_json) -> None:
    """Remove ksbpf's programs and pins (idempotent)."""
    if sum(map(bool, (cgroup_path, node, everything))) != 1:
        raise click.UsageError("give exactly one of --cgroup PATH, --node or --all")
    if netns and not node:
        raise click.UsageError("--netns goes with --node")
    if everything:
        result = machine.detach_all(progress=_progress)
        what, n_progs = "every cgroup and interface", len(result.detached_prog_ids) + len(result.detached_link_ids)
    elif node:
        result = node_scope.detach(netns)
        what, n_progs = node_scope.label(netns), len(result.detached_links)
    else:
        result = cgroups.detach(cgroup_path)
        what, n_progs = result.cgroup, len(result.detached_prog_ids)
    if as_json:
        _emit_json(result.to_dict())
        return
    if n_progs or result.removed_pins:
        click.echo(f"{what}: detached {n_progs} program(s)/link(s), removed {len(result.removed_pins)} pin director(ies)")
    else:
        click.echo(f"{what}: nothing to remove")


def _fmt_time(ts) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds") if ts else "?"


def _print_counters(s) -> None:
    for reason, (packets, bytes_) in common.by_reason(s.counters).items():
        if packets:
            verdict = "allow" if reason.allowed else "DROP "
            click.echo(f"  {verdict} {reason.label:<18} {packets:>12} packets {bytes_:>14} bytes")
    sent, suppressed = s.events
    if s.policy.events.rate:
        click.echo(f"  events   {s.policy.events.rate:g}/s, burst {s.policy.events.burst}: "
                   f"{sent} streamed, {suppressed} suppressed (`ksbpf events`)")
    for p in s.problems:
        click.echo(f"  problem: {p}")


def _status_endpoints(policy: Policy, followed_now: list) -> None:
    """The maps' endpoints: the followed ones say where they came from."""
    auto = {f.endpoint: f for f in followed_now}
    for ep in policy.endpoints:
        if ep not in auto:
            click.echo(f"  endpoint {ep}")
    for f in followed_now:
        click.echo(f"  endpoint {f.describe()}")
    if policy.follow and not followed_now:
        click.echo("  endpoint auto: none followed now (no tunnel up, or the daemon is not running)")


@main.command()
@click.option("--json", "as_json", is_flag=True)
def status(as_json) -> None:
    """Each protected scope: tunnels, endpoints, options, counters by reason."""
    st = machine.status()
    for problem in st.unreadable:
        click.echo(f"ksbpf: warning: {problem}", err=True)
    if as_json:
        _emit_json(st.to_dict())
        return
    click.echo(features.short())
    if not st.cgroups and not st.nodes:
        click.echo("no protected scopes")
        return
    for n in st.nodes:
        state = "enforced" if n.attached else "NOT FULLY ENFORCED"
        hooks = "hooks tc+netfilter" if n.from_birth == "on" else "hook tc"
        click.echo(f"{n.name} (netns {n.netns_label})  [{state}, {n.mode}, {hooks}, since {_fmt_time(n.attached_at)}]")
        click.echo(f"  from birth {n.from_birth}")
        click.echo("  raw sockets " + ("refused: PACKET_QDISC_BYPASS and AF_XDP binds outside the exempt cgroups "
                                      "(BPF LSM)" if n.raw_sockets == "refused" else n.raw_sockets))
        _print_interfaces(n.interfaces)
        for t in n.tunnels:
            where = f"ifindex {t.ifindex} ({t.kind})" if t.present else "absent"
            click.echo(f"  tunnel   {t.name}: {where}, {'registered' if t.registered else 'not registered'}")
        _status_endpoints(n.policy, n.followed)
        _print_vpn(n.policy)
        click.echo(f"  options  {_options(n.policy)}")
        click.echo(f"  internal {' '.join(n.node.internal) or 'none'}")
        if n.node.exempt_cgroups:
            click.echo(f"  exempt   {', '.join(n.node.exempt_cgroups)}")
        dns_state = node_scope.dns_state(n.node, n.from_birth)
        if dns_state:
            click.echo(f"  dns      {node_scope.dns_line(dns_state)}")
        _print_counters(n)
    for s in st.cgroups:
        state = "enforced" if s.attached else "NOT ENFORCED"
        click.echo(f"{s.cgroup}  [{state}, program {s.prog_id}, hook cgroup, since {_fmt_time(s.attached_at)}]")
        if s.namespaces is not None:
            click.echo(f"  netns    each: {len(s.namespaces)} network namespace(s) in use by the subtree")
            for n in s.namespaces:
                click.echo(f"  netns    {n['label']} (inode {n['inode']}, {n['processes']} process(es))")
                for t in n["tunnels"]:
                    where = f"ifindex {t['ifindex']} ({t['kind']})" if t["present"] else "absent"
                    click.echo(f"    tunnel {t['name']}: {where}, {'allowed' if t['registered'] else 'blocked'}")
        for t in s.tunnels if s.namespaces is None else ():
            where = f"ifindex {t.ifindex} ({t.kind})" if t.present else "absent"
            allowed = "allowed" if t.registered else "blocked"
            click.echo(f"  tunnel   {t.name} (netns {t.netns}): {where}, {allowed}")
        _status_endpoints(s.policy, s.followed)
        _print_vpn(s.policy)
        click.echo(f"  options  {_options(s.policy)}")
        if s.policy.deny_tun or s.deny_tun:
            click.echo(f"  deny-tun {'in force: /dev/net/tun refused to the scope' if s.deny_tun else 'NOT in force'}")
        if s.policy.options.dns:
            auto = (f" (auto: {s.dns_source or 'no resolver configured for ' + ', '.join(s.policy.tunnels)})"
                    if s.policy.dns_auto else "")
            if not s.policy.dns:   # dns = ["auto"], nothing configured for the tunnel yet
                click.echo(f"  dns      none known yet{auto}: all DNS of the scope is dropped until the daemon reads one")
            else:
                click.echo(f"  dns      only to {', '.join(map(str, s.policy.dns))}{auto} through the tunnel; other DNS "
                           + ("redirected (connect, sendmsg, recvmsg and getpeername programs attached)"
                              if s.dns_redirect else "dropped, not redirected"))
        click.echo("  netns    " + ("from socket storage (sockets created before the attach are blocked until reopened)"
                                   if s.netns_identity == features.NETNS_STORAGE else "from bpf_get_netns_cookie")
                   + ("; checked when each socket is made (every socket of the scope is in its namespace)"
                      if s.netns_fast else "; checked on every packet"))
        click.echo("  tunnel source elsewhere: " + ("dropped (netfilter hook)" if s.tunnel_source == "on"
                                                     else s.tunnel_source))
        click.echo("  raw sockets " + ("refused: AF_PACKET and AF_XDP (BPF LSM)" if s.raw_sockets == "refused"
                                       else "open: this kernel runs no BPF LSM program (drop CAP_NET_RAW)"))
        _print_counters(s)
        for w in s.warnings:
            click.echo(f"  warning: {w}")


@main.command()
@click.option("--scope", "scopes", multiple=True, metavar="CGROUP|node[:NETNS]",
              help="Only this scope: its cgroup path, or the node scope as `status` names it (repeatable).  "
                   "Default: every scope.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def events(scopes, as_json) -> None:
    """Stream the packets ksbpf blocks, as they are blocked.

    Samples are rate-limited in the kernel (--events-rate at attach; counters
    stay exact).  One reader at a time: two readers share the samples."""
    from ksbpf.observability.events import stream

    preflight.require_root()
    wanted = [os.path.realpath(s) if s.startswith("/") else s for s in scopes]
    stop: list[int] = []
    import signal as _signal
    for sig in (_signal.SIGINT, _signal.SIGTERM):
        _signal.signal(sig, lambda signum, _f: stop.append(signum))

    def show(ev) -> None:
        click.echo(json.dumps(ev.to_dict()) if as_json else str(ev))
        sys.stdout.flush()

    click.echo("ksbpf: streaming blocked packets (Ctrl-C to stop)", err=True)
    if stream(wanted or None, show, lambda: bool(stop)) == 0:
        raise KsbpfError("no protected scope" + (f" matches {', '.join(scopes)}" if scopes else ""),
                         "see `ksbpf status`; protect one with `ksbpf attach`")


@main.command()
def metrics() -> None:
    """Print the Prometheus metrics once, read from the pins (no daemon needed)."""
    from ksbpf.observability.metrics import render

    preflight.require_root()
    click.echo(render().decode(), nl=False)


@main.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.option("--cgroup", "cgroup_path", required=True, metavar="PATH")
@click.option("--user", "user", metavar="USER",
              help="Run as USER (name or uid): its groups, gid and uid, a clean environment, no capabilities, "
                   "no-new-privileges.  Default: the sudo caller when run through sudo.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(cgroup_path, user, command) -> None:
    """Run COMMAND inside a protected scope (joins the cgroup, then execs)."""
    from ksbpf.kernel import privileges

    cg = cgroup.resolve(cgroup_path)
    cgroups.require_protected(cg)
    user = user or privileges.default_user(dict(os.environ))
    target = privileges.Target.lookup(user) if user else None
    cgroup.join(cg)
    env = dict(os.environ)
    if target is not None:
        env = target.environment(env)
        privileges.drop_to(target)
    elif os.geteuid() == 0:
        click.echo("ksbpf: warning: running the command as root with every capability (raw sockets bypass "
                   "the scope); give --user USER", err=True)
    try:
        os.execvpe(command[0], list(command), env)
    except OSError as exc:
        raise KsbpfError(f"cannot run {command[0]!r}: {exc.strerror}", "check the command name and PATH") from None


LOG_FORMAT = click.Choice(["text", "json"])


@main.command()
@click.option("--config", "config_path", default="/etc/ksbpf/ksbpf.toml", show_default=True, metavar="FILE")
@click.option("--log-format", type=LOG_FORMAT, default=None,
              help="text (default) or json; overrides [daemon] log_format.")
def daemon(config_path, log_format) -> None:
    """Keep the configured scopes in step with the kernel's interfaces.

    SIGHUP reloads the configuration.  SIGTERM/SIGINT exit without detaching:
    enforcement stays in the kernel (`ksbpf detach --all` removes it)."""
    from ksbpf.daemon.config import load
    from ksbpf.daemon.log import EventLog
    from ksbpf.daemon.service import Daemon

    preflight.require_root()
    cfg = load(config_path)   # refuse a bad file before changing anything
    sys.exit(Daemon(config_path, EventLog(log_format or cfg.log_format)).run())


@main.command()
@click.option("--config", "config_path", default="/etc/ksbpf/ksbpf.toml", show_default=True, metavar="FILE")
@click.option("--log-format", type=LOG_FORMAT, default=None)
def apply(config_path, log_format) -> None:
    """Put the configured scopes in force once and exit (the boot unit runs this
    before any network is up).  Scopes already in force are adopted untouched."""
    from ksbpf.daemon.config import load
    from ksbpf.daemon.log import EventLog
    from ksbpf.daemon.service import apply_once

    preflight.require_root()
    cfg = load(config_path)
    sys.exit(apply_once(config_path, EventLog(log_format or cfg.log_format)))


@main.command()
@click.option("--keep-going", is_flag=True, help="Run every step even after one misbehaves.")
def demo(keep_going) -> None:
    """Build a lab (namespaces + real WireGuard tunnel) and show the kill switch."""
    from ksbpf.lab.demo import run_demo

    sys.exit(0 if run_demo(keep_going=keep_going) else 1)


@main.command(name="check-config")
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def check_config(file, as_json) -> None:
    """Validate the daemon's configuration FILE; needs no root, changes nothing.

    Every problem is printed as FILE:LINE: KEY: message (exit status 1)."""
    from ksbpf.daemon.config import load

    try:
        cfg = load(file)
    except ConfigError as exc:
        if as_json:
            _emit_json({"valid": False, "errors": [i.to_dict() for i in exc.errors], "scopes": []})
        else:
            for issue in exc.errors:
                click.echo(str(issue), err=True)
        raise SystemExit(1)
    if as_json:
        _emit_json({"valid": True, "errors": [], **cfg.to_dict()})
        return
    click.echo(f"{file}: valid; {len(cfg.scopes)} scope(s); metrics on {cfg.listen}; log format {cfg.log_format}")
    for sc in cfg.scopes:
        p = sc.policy
        click.echo(f"  {sc.cgroup} (line {sc.line}){', created if missing' if sc.create_cgroup else ''}")
        click.echo(f"    tunnels   {', '.join(p.tunnels)} (netns {p.netns or 'own'}; kinds {', '.join(p.tunnel_kinds)})")
        click.echo(f"    endpoints {', '.join(p.endpoint_specs()) or 'none'}")
        opts = [k for k, on in p.options.to_dict().items() if on]
        click.echo(f"    options   {', '.join(opts) or 'none (strict)'}")
        _print_vpn(p, indent="    ", width=9)
        if p.options.dns:
            now = ", ".join(map(str, p.dns)) or "none known yet"
            click.echo(f"    dns       {now}{' (auto: followed by the daemon)' if p.dns_auto else ''}")
    if cfg.node is not None:
        n, p = cfg.node.node, cfg.node.node.policy
        click.echo(f"  node mode (line {cfg.node.line}): netns {p.netns or 'own'}, guards every interface but the tunnels "
                   f"and the internal ones ({' '.join(n.internal) or 'none'}); tc mode {n.tc_mode}")
        click.echo(f"    tunnels   {', '.join(p.tunnels)} (kinds {', '.join(p.tunnel_kinds)})")
        click.echo(f"    endpoints {', '.join(p.endpoint_specs()) or 'none'}")
        click.echo(f"    options   {', '.join(k for k, on in p.options.to_dict().items() if on) or 'none (strict)'}")
        _print_vpn(p, indent="    ", width=9)
        if p.options.dns:
            now = ", ".join(map(str, p.dns)) or "none known yet"
            click.echo(f"    dns       {now}{' (auto: followed by the daemon)' if p.dns_auto else ''} "
                       "(dropped elsewhere, not redirected in node mode)")
        if n.exempt_cgroups:
            click.echo(f"    exempt    {', '.join(n.exempt_cgroups)}")
    if cfg.kubernetes.enabled:
        k = cfg.kubernetes
        click.echo(f"  kubernetes: pods of node {k.node_name or '$NODE_NAME'} annotated {k.annotation_prefix}*; "
                   f"credentials {k.kubeconfig or 'in-cluster'}; cgroups under {k.cgroup_root or 'the cgroup v2 mount'}")



@main.command()
@click.option("--timeout", type=click.FloatRange(min=0), default=60, show_default=True, metavar="SECONDS",
              help="Give up (non-zero exit) after this long.")
@click.option("--tunnel-kind", "kinds", multiple=True, metavar="KIND",
              help=f"Link kinds not probed, as tunnels (default: {', '.join(DEFAULT_TUNNEL_KINDS)}).")
@click.option("--annotations", default="/etc/ksbpf-pod/annotations", show_default=True, metavar="FILE",
              help="The pod's annotations (a downward API volume): the daemon's ksbpf.io/protected is read there.")
@click.option("--prefix", default="ksbpf.io/", show_default=True, help="The annotation prefix the daemon uses.")
def gate(timeout, kinds, annotations, prefix) -> None:
    """Wait until ksbpf protects this pod (a pod's first init container).

    Unprivileged.  Passes when the daemon's ksbpf.io/protected annotation (read from
    --annotations) matches the pod's ksbpf annotations AND a UDP datagram with TTL 1 to
    192.0.2.1 / 2001:db8::1 through each interface that is up and not a tunnel is refused
    by the kernel (IPv6: or has no route); exits 1 at the timeout."""
    from ksbpf.kubernetes import gate as gate_mod
    ok = gate_mod.wait(timeout, lambda msg: click.echo(f"ksbpf gate: {msg}", err=True),
                       tuple(kinds) or DEFAULT_TUNNEL_KINDS, annotations=annotations, prefix=prefix)
    sys.exit(0 if ok else 1)


@main.command("warm-cache")
def warm_cache() -> None:
    """Compile every common option set into the image cache (helper processes).

    Run at `make install` and by the DaemonSet's init container on each node: the
    compiled programs depend on the kernel, so the first pod of each option set is
    then protected without waiting for the compiler."""
    from ksbpf.kernel import bpf
    from ksbpf.kernel.compiler import warm
    preflight.require_root()
    try:
        n = warm(_progress)
    except RuntimeError as exc:
        raise KsbpfError(f"compiling failed: {exc}", "check `make setup` (bcc, kernel headers)") from None
    click.echo(f"image cache {bpf.cache_dir()}: {n} option set(s) compiled now, the others were there")


@main.command()
@click.option("--scope", "scope", metavar="PATH|node[:NETNS]", help="Check only this scope: a protected cgroup, or the node scope.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--strict", is_flag=True, help="Warnings fail too (exit status 1).")
@click.option("--fix", is_flag=True, help="Close the scopes' sockets created outside them (SOCK_DESTROY): "
              "their applications see the connections reset.")
@click.option("--lab", is_flag=True, help="Instead: the leak matrix with real packets in throwaway namespaces.")
def verify(scope, as_json, strict, fix, lab) -> None:
    """Prove every protected scope does what its policy says, without sending a
    packet; list what could still get around it.  Exit status 0 only when
    nothing failed (--strict: and nothing warned)."""
    if lab:
        from ksbpf.verify.lab import run_lab
        sys.exit(0 if run_lab(as_json=as_json) else 1)
    from ksbpf.verify import check

    report = check.verify(scope, fix=fix)
    if as_json:
        _emit_json(report.to_dict(strict))
    else:
        click.echo(check.render(report), nl=False)
    sys.exit(0 if report.ok(strict) else 1)


if __name__ == "__main__":
    main()
