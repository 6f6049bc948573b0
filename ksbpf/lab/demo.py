"""`ksbpf demo`: the kill switch shown on a throwaway lab.

Builds two network namespaces joined by a veth (the "physical link") and a
real WireGuard tunnel (wireguard-go), protects a fresh cgroup in the client
with the real `ksbpf` command, and shows -- by counting what arrives on the
far side -- that traffic passes through the tunnel, is blocked on the
physical link, does not leak when the tunnel dies, and flows again when it
returns; then node mode: a container behind a bridge, whose forwarded
traffic no cgroup rule sees, loses the tunnel and nothing leaks.
Everything is removed at the end, whatever happened.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

import click

from ksbpf.kernel import cgroup
from ksbpf.lab.namespaces import Lab, Sniffer, TcpEchoServer, UdpEchoServer, new_lab, probe
from ksbpf.scopes import cgroups, common, machine, node

KINDS = ("tcp", "udp", "icmp")


class StepFailed(Exception):
    pass


@dataclass
class Demo:
    keep_going: bool
    passed: int = 0
    failed: list[str] = field(default_factory=list)

    # -- output --------------------------------------------------------------
    def section(self, title: str) -> None:
        click.echo("")
        click.secho(title, bold=True)

    def check(self, ok: bool, what: str) -> None:
        if ok:
            self.passed += 1
            click.echo(f"  {click.style('✓', fg='green')} {what}")
            return
        self.failed.append(what)
        click.echo(f"  {click.style('✗', fg='red')} {what}")
        if not self.keep_going:
            raise StepFailed(what)

    def ksbpf(self, *args: str) -> subprocess.CompletedProcess:
        click.echo(click.style("  $ ksbpf " + " ".join(shlex.quote(a) for a in args), fg="cyan"))
        proc = subprocess.run([sys.executable, "-m", "ksbpf.cli", *args], capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            click.echo("    " + line)
        if proc.returncode != 0:
            click.echo("    " + proc.stderr.strip())
        self.check(proc.returncode == 0, f"ksbpf {args[0]} succeeded")
        return proc

    # -- traffic ---------------------------------------------------------------
    def expect(self, where: Lab | str, servers: dict, cg: str | None, dst: str, allowed: bool, via: str,
               lab: Lab | None = None) -> None:
        """tcp, udp and ping to dst from the cgroup in the lab's client namespace
        (or from the namespace `where` names, a container of `lab`); count what
        crosses the physical link."""
        lab = lab or where
        with Sniffer(lab) as sniffer:
            results = {k: probe(where, cg, k, dst, servers[k], timeout=2.0 if allowed else 1.0) for k in KINDS}
        summary = ", ".join(f"{k} {'ok' if r.ok else 'blocked'}" for k, r in results.items())
        if allowed:
            self.check(all(r.ok for r in results.values()), f"{dst} {via}: {summary}")
        else:
            self.check(not any(r.ok for r in results.values()), f"{dst} {via}: {summary}")
            self.check(sniffer.count == 0,
                       f"packets from the client that reached the server over the physical link: {sniffer.count}")


def _node_drops(lab: Lab) -> str:
    (n,) = [n for n in machine.status().nodes if n.netns_label == lab.client_path]
    parts = [f"{r.label} {p}" for r, (p, _b) in common.by_reason(n.counters).items() if p and not r.allowed]
    return ", ".join(parts) or "none"


def _drops(cg: str) -> str:
    (s,) = [s for s in cgroups.status()[0] if s.cgroup == cg]
    parts = [f"{r.label} {p}" for r, (p, _b) in common.by_reason(s.counters).items() if p and not r.allowed]
    return ", ".join(parts) or "none"


def run_demo(keep_going: bool = False) -> bool:
    demo = Demo(keep_going)
    lab = new_lab("ksbpf-demo")
    cg = os.path.join(cgroup.cgroup2_root(), f"ksbpf-demo-{lab.tag}")
    click.secho("ksbpf demo: a kill switch, shown on a throwaway lab", bold=True)
    click.echo("Everything happens inside two network namespaces made for the demo; nothing leaves this machine.")
    try:
        lab.create()
        lab.tunnel_up()
        os.mkdir(cg)
        with TcpEchoServer(lab) as tcp, UdpEchoServer(lab) as udp:
            servers = {"tcp": tcp.port, "udp": udp.port, "icmp": 0}
            _story(demo, lab, cg, servers)
    except StepFailed:
        pass
    finally:
        click.echo("")
        click.echo("Cleaning up: detaching, removing the cgroup and the namespaces.")
        try:
            cgroups.remove_cgroup_tree(cg)
            if os.path.exists(lab.client_path):
                node.detach(lab.client_path)
        finally:
            lab.destroy()
    click.echo("")
    if demo.failed:
        click.secho(f"{len(demo.failed)} check(s) FAILED: " + "; ".join(demo.failed), fg="red", bold=True)
        return False
    click.secho(f"All {demo.passed} checks passed.", fg="green", bold=True)
    return True


def _story(demo: Demo, lab: Lab, cg: str, servers: dict) -> None:
    click.echo(f"""
  client namespace {lab.client_ns}            server namespace {lab.server_ns}
    {lab.phy4_client:<15} ──── physical link (veth) ────  {lab.phy4_server}
    {lab.tun4_client:<15} ════ WireGuard tunnel {lab.wg_client} ═══  {lab.tun4_server}
  "The internet" is {lab.net4_server} / {lab.net6_server}, behind the server. The client's default
  route goes into the tunnel, and falls back to the physical link when the tunnel is gone.
  The app runs in the cgroup {cg}.""")

    demo.section("1. Without ksbpf, the app can use any interface")
    demo.expect(lab, servers, cg, lab.phy4_server, True, "over the physical link")

    demo.section("2. Protect the cgroup: only the tunnel (and the VPN server, to build it)")
    demo.ksbpf("attach", "--cgroup", cg, "--tunnel", lab.wg_client, "--netns", lab.client_ns,
               "--endpoint", lab.endpoint4)
    click.echo("  ksbpf has exited; the kernel enforces the rule from here on.")

    demo.section("3. Through the tunnel: allowed")
    demo.expect(lab, servers, cg, lab.tun4_server, True, "through the tunnel")
    demo.expect(lab, servers, cg, lab.net4_server, True, "to the internet, default route via the tunnel")
    demo.expect(lab, servers, cg, lab.net6_server, True, "to the internet over IPv6, via the tunnel")

    demo.section("4. The same over the physical link: blocked")
    demo.expect(lab, servers, cg, lab.phy4_server, False, "over the physical link")
    demo.expect(lab, servers, cg, lab.phy6_server, False, "over the physical link (IPv6)")

    demo.section("5. The tunnel dies: the default route now leads over the physical link")
    lab.tunnel_down()
    click.echo(f"  deleted {lab.wg_client}; this is where route-based kill switches leak")
    demo.expect(lab, servers, cg, lab.net4_server, False, "to the internet, tunnel down")
    demo.expect(lab, servers, cg, lab.net6_server, False, "to the internet over IPv6, tunnel down")
    with Sniffer(lab) as control:
        outside = probe(lab, None, "udp", lab.net4_server, servers["udp"]).ok
    demo.check(outside and control.count > 0,
               f"control: a process OUTSIDE the cgroup still gets out over the physical link "
               f"({control.count} packet(s) seen): that is the leak ksbpf closes")
    demo.check(_drops(cg) != "none", f"drops counted by reason: {_drops(cg)}")

    demo.section("6. The tunnel comes back (a new interface, new ifindex): attach again, no gap")
    lab.tunnel_up()
    demo.ksbpf("attach", "--cgroup", cg, "--tunnel", lab.wg_client, "--netns", lab.client_ns,
               "--endpoint", lab.endpoint4)
    demo.expect(lab, servers, cg, lab.net4_server, True, "to the internet, via the new tunnel")

    demo.section("7. What ksbpf saw")
    demo.ksbpf("status")

    demo.section("8. The escape hatch: detach, and the physical link works again")
    demo.ksbpf("detach", "--cgroup", cg)
    demo.expect(lab, servers, cg, lab.phy4_server, True, "over the physical link")

    _node_act(demo, lab, servers)


def _node_act(demo: Demo, lab: Lab, servers: dict) -> None:
    """Node mode: containers behind a bridge, forwarded and masqueraded out of
    the physical link -- no socket of theirs is in any protected cgroup."""
    (box,) = lab.add_containers(1)
    demo.section("9. The whole machine: a container behind a bridge (node mode)")
    click.echo(f"""  The client namespace now also runs a container ({box}) behind the bridge {lab.bridge},
  forwarding and masquerading its traffic. No cgroup rule sees forwarded packets: node mode
  guards the way out of the machine instead (tc egress on every interface but the tunnel).""")
    demo.ksbpf("attach", "--node", "--netns", lab.client_path, "--tunnel", lab.wg_client,
               "--endpoint", lab.endpoint4)
    demo.expect(box, servers, None, lab.net4_server, True, "from the container, via the tunnel", lab)
    lab.tunnel_down()
    click.echo(f"  deleted {lab.wg_client}: the container's traffic would now be forwarded over the physical link")
    demo.expect(box, servers, None, lab.net4_server, False, "from the container, tunnel down", lab)
    demo.expect(lab, servers, None, lab.net6_server, False, "from the host itself (IPv6), tunnel down")
    drops = _node_drops(lab)
    demo.check(drops != "none", f"node mode counted why (hook tc): {drops}")
    demo.ksbpf("detach", "--node", "--netns", lab.client_path)
    demo.expect(box, servers, None, lab.net4_server, True, "from the container, node mode detached", lab)
