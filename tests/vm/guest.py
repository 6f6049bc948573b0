"""Runs INSIDE the VM test's guest (standard library only, run as a file by the
units in units/): packet counters on the far side of the guest's "physical"
link, traffic senders, and the scenarios.  Each scenario measures and acts;
the host (tests/test_vm.py) judges.  The result is one line on the second
serial port: KSBPF-VM-RESULT {json}.

The guest's network (vagrant/provision.sh, ksbpf-demo-peer.service):
  vpn-uplink 10.99.0.1 --veth-- uplink 10.99.0.2 (namespace vpnpeer), 198.51.100.7 behind it;
  wg0 10.200.0.2 (kernel WireGuard, wg-quick) == wgs 10.200.0.1 in vpnpeer.
The protected sender (vpn.slice) sends UDP 5001 and TCP 5002 to 198.51.100.7, the
control (system.slice) UDP 6001 and TCP 6002; nftables counters in vpnpeer count
what arrives over the veth ("leak_*", "control_*") and through the tunnel ("tunnel_*").
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
import traceback
import urllib.request

NS = "vpnpeer"
TARGET = "198.51.100.7"
STATE = os.environ.get("KSBPF_VMTEST_STATE", "/run/ksbpf-vmtest")
RESULTS_TTY = "/dev/ttyS1"
CONFIG = "/etc/ksbpf/ksbpf.toml"
SCOPE = "/sys/fs/cgroup/vpn.slice"
COUNTERS = ("leak_udp", "leak_tcp", "tunnel_udp", "tunnel_tcp", "control_udp", "control_tcp",
            "node_leak_udp", "node_leak_tcp", "node_tunnel_udp", "node_tunnel_tcp", "wireguard",
            "each_leak_udp", "each_leak_tcp", "each_tunnel_udp", "each_tunnel_tcp", "each_control_udp")
# ksbpf's own one-line refusal of a kernel that lacks a feature: the error of a command (a KsbpfError,
# "ksbpf: error: this kernel lacks ...") or of a scope (scope_failed error="this kernel ..."); not a
# verifier finding or a notice that merely mentions the kernel
REFUSAL = re.compile(r'(?:error: |scope_failed .*error=")(this kernel (?:lacks|cannot|has no|has neither|does not)\b[^"]*)')
# scenario "each": a container-like namespace whose processes are in a netns = "each" scope
EACH_NS, EACH_CGROUP = "ctr1", "/sys/fs/cgroup/ctr.slice"
EACH_CONFIG = """
[[scope]]
cgroup = "/sys/fs/cgroup/ctr.slice"
netns = "each"
tunnels = ["wg0"]
endpoints = ["10.99.0.2:51820/udp"]
"""
NODE_CONFIG = """
[node]
tunnels = ["wg0"]
endpoints = ["10.99.0.2:51820/udp"]
"""
NFT = """
table inet ksbpfvm {
%s
    chain pre {
        type filter hook prerouting priority -300; policy accept;
        iifname "uplink" ip daddr %s udp dport 5001 counter name leak_udp
        iifname "uplink" ip daddr %s tcp dport 5002 counter name leak_tcp
        iifname "wgs" ip daddr %s udp dport 5001 counter name tunnel_udp
        iifname "wgs" ip daddr %s tcp dport 5002 counter name tunnel_tcp
        iifname "uplink" ip daddr %s udp dport 6001 counter name control_udp
        iifname "uplink" ip daddr %s tcp dport 6002 counter name control_tcp
        iifname "uplink" ip daddr %s udp dport 7001 counter name node_leak_udp
        iifname "uplink" ip daddr %s tcp dport 7002 counter name node_leak_tcp
        iifname "wgs" ip daddr %s udp dport 7001 counter name node_tunnel_udp
        iifname "wgs" ip daddr %s tcp dport 7002 counter name node_tunnel_tcp
        iifname "uplink" ip daddr 10.99.0.2 udp dport 51820 counter name wireguard
        iifname "uplink" ip daddr %s udp dport 8001 counter name each_leak_udp
        iifname "uplink" ip daddr %s tcp dport 8002 counter name each_leak_tcp
        iifname "wgs" ip daddr %s udp dport 8001 counter name each_tunnel_udp
        iifname "wgs" ip daddr %s tcp dport 8002 counter name each_tunnel_tcp
        iifname "uplink" ip daddr %s udp dport 8003 counter name each_control_udp
    }
}
""" % ("\n".join(f"    counter {c} {{ }}" for c in COUNTERS), *[TARGET] * 15)


# --- helpers ------------------------------------------------------------------

def sh(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def log(msg: str) -> None:
    line = f"KSBPF-VM-LOG {time.monotonic():8.2f} {msg}"
    print(line, flush=True)
    try:
        with open(RESULTS_TTY, "w") as tty:
            tty.write(line + "\n")
    except OSError:
        pass


def counters() -> dict[str, int]:
    data = json.loads(sh("ip", "netns", "exec", NS, "nft", "-j", "list", "counters", "table", "inet", "ksbpfvm"))
    out = {}
    for item in data["nftables"]:
        if "counter" in item:
            out[item["counter"]["name"]] = item["counter"]["packets"]
    return out


def sender(name: str) -> dict:
    with open(os.path.join(STATE, f"{name}.json")) as f:
        return json.load(f)


def wait_for(what: str, cond, timeout: float, step: float = 0.2):
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > end:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def unit_times(unit: str) -> dict[str, int]:
    props = ("ExecMainStartTimestampMonotonic", "ExecMainExitTimestampMonotonic",
             "ActiveEnterTimestampMonotonic", "InactiveExitTimestampMonotonic")
    out = sh("systemctl", "show", unit, "-p", ",".join(props))
    return {k: int(v or 0) for k, v in (line.split("=", 1) for line in out.splitlines() if "=" in line)}


def unit_state(unit: str) -> dict[str, str]:
    out = sh("systemctl", "show", unit, "-p", "ActiveState,SubState,Result,MainPID,NRestarts,UnitFileState")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(unit: str) -> str:
    return sh("journalctl", "-b", "-u", unit, "-o", "cat", "--no-pager", check=False)


def ready() -> bool:
    """The daemon's own readiness endpoint says every scope is in force and in step."""
    try:
        with urllib.request.urlopen("http://127.0.0.1:12479/readyz", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def log_events(unit: str, event: str) -> int:
    """How many times the unit's ksbpf log (text format) has logged `event` this boot."""
    return sum(1 for line in journal(unit).splitlines() if line.split()[2:3] == [event])


# The cgroup programs attached, asked through ksbpf's own libbpf binding (bpf_prog_query without
# per-program attach flags): bpftool 7.1 (Debian 12's) always asks for those, and kernels before
# 6.0 (Ubuntu 22.04's 5.15) refuse such a query (EINVAL), so it lists nothing there.
_CGROUP_QUERY = """
import json, os, sys
from ksbpf.kernel import libbpf
names = {0: "cgroup_inet_ingress", 1: "cgroup_inet_egress", 2: "cgroup_inet_sock_create", 6: "cgroup_device",
         10: "cgroup_inet4_connect", 11: "cgroup_inet6_connect", 14: "cgroup_udp4_sendmsg",
         15: "cgroup_udp6_sendmsg", 43: "lsm_cgroup"}
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
out = []
for attach_type in range(64):
    try:
        ids = libbpf.prog_query(fd, attach_type)
    except OSError:
        continue
    out += [{"id": i, "attach_type": names.get(attach_type, f"type {attach_type}"), "name": libbpf.prog_name(i) or ""}
            for i in ids]
print(json.dumps(out))
"""


def attached_progs(cgroup: str = SCOPE) -> list[dict]:
    """ksbpf's programs attached to the cgroup (by the kernel's program name): bpftool's
    list, or where it has none, the query above (see _CGROUP_QUERY)."""
    out = json.loads(sh("bpftool", "-j", "cgroup", "show", cgroup, check=False).strip() or "[]")
    if not out and os.path.isdir(cgroup):
        out = json.loads(sh("/opt/ksbpf/.venv/bin/python", "-c", _CGROUP_QUERY, cgroup, check=False).strip() or "[]")
    return [p for p in out if p.get("name", "").startswith("ksbpf")]


def status() -> dict:
    return json.loads(sh("ksbpf", "status", "--json"))


def exposure() -> dict[str, float]:
    out = sh("systemd-analyze", "security", "--no-pager", "ksbpf.service", "ksbpf-early.service", check=False)
    found = re.findall(r"(\S+\.service)\s+([\d.]+)\s", out)
    return {u: float(x) for u, x in found}


def pin_modes() -> dict[str, str]:
    out = {}
    for root, dirs, files in os.walk("/sys/fs/bpf/ksbpf"):
        for name in [root, *(os.path.join(root, f) for f in files)]:
            out[name] = oct(os.lstat(name).st_mode & 0o777)
    return out


def growth(names: tuple[str, ...], seconds: float) -> dict[str, int]:
    before = counters()
    time.sleep(seconds)
    after = counters()
    return {n: after[n] - before[n] for n in names}


def tunnel_flowing(timeout: float = 60) -> float:
    """Seconds until protected traffic arrives through the tunnel (UDP and TCP)."""
    t = time.monotonic()
    base = counters()
    wait_for("traffic through the tunnel", lambda: all(counters()[c] > base[c] for c in ("tunnel_udp", "tunnel_tcp")),
             timeout)
    return round(time.monotonic() - t, 2)


def wg(action: str) -> None:
    sh("wg-quick", action, "wg0")


def system_running() -> str:
    return sh("systemctl", "is-system-running", "--wait", check=False).strip()


# --- on the far side ------------------------------------------------------------

def cmd_counters() -> None:
    """Create the peer namespace and its counters before the link exists."""
    if not os.path.exists(f"/run/netns/{NS}"):
        sh("ip", "netns", "add", NS)
    subprocess.run(["ip", "netns", "exec", NS, "nft", "-f", "-"], input=NFT, text=True, check=True)


def cmd_node_setup() -> None:
    """Scenario 4's machine, before ksbpf-early: node mode in the configuration, a
    "container" (namespace ctr behind veth-ctr, masqueraded, forwarded), and the
    physical link present but not configured, as a NIC found at boot."""
    with open(CONFIG, "a") as f:
        f.write(NODE_CONFIG)
    if not os.path.exists(f"/run/netns/{NS}"):
        sh("ip", "netns", "add", NS)
    sh("ip", "link", "add", "vpn-uplink", "type", "veth", "peer", "name", "uplink", "netns", NS)
    sh("ip", "netns", "add", "ctr")
    sh("ip", "link", "add", "veth-ctr", "type", "veth", "peer", "name", "eth0", "netns", "ctr")
    for argv in (["ip", "addr", "add", "10.88.0.1/24", "dev", "veth-ctr"], ["ip", "link", "set", "veth-ctr", "up"],
                 ["ip", "-n", "ctr", "link", "set", "lo", "up"],
                 ["ip", "-n", "ctr", "addr", "add", "10.88.0.2/24", "dev", "eth0"],
                 ["ip", "-n", "ctr", "link", "set", "eth0", "up"],
                 ["ip", "-n", "ctr", "route", "add", "default", "via", "10.88.0.1"],
                 ["sysctl", "-qw", "net.ipv4.ip_forward=1"]):
        sh(*argv)
    subprocess.run(["nft", "-f", "-"], check=True, text=True, input="""
table ip ksbpfvmnat {
    chain post {
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr 10.88.0.0/24 oifname != "veth-ctr" masquerade
    }
}
""")


# --- a sender ---------------------------------------------------------------------

def notify_ready() -> None:
    """sd_notify(READY=1), without libsystemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1", "\0" + addr[1:] if addr.startswith("@") else addr)


def cmd_send(name: str, udp_port: int, tcp_port: int) -> None:
    """UDP every 20 ms and a TCP connection attempt every 200 ms to TARGET, from
    the first moment; counts what the kernel said, in STATE/<name>.json."""
    os.makedirs(STATE, exist_ok=True)
    st = {"name": name, "pid": os.getpid(), "start_mono": int(time.monotonic() * 1e6), "first_send_mono": 0,
          "udp_ok": 0, "udp_err": {}, "tcp_attempts": 0, "tcp_connected": 0, "tcp_err": {}}
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pending: dict[socket.socket, float] = {}
    next_tcp = next_write = 0.0
    while True:
        now = time.monotonic()
        try:
            udp.sendto(b"ksbpf-vm-test", (TARGET, udp_port))
            st["udp_ok"] += 1
        except OSError as exc:
            key = errno.errorcode.get(exc.errno, str(exc.errno))
            st["udp_err"][key] = st["udp_err"].get(key, 0) + 1
        if not st["first_send_mono"]:
            st["first_send_mono"] = int(now * 1e6)
            notify_ready()   # Type=notify: the boot goes on only once this sender is sending
        if now >= next_tcp:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            st["tcp_attempts"] += 1
            rc = s.connect_ex((TARGET, tcp_port))
            if rc in (0, errno.EINPROGRESS):
                pending[s] = now
            else:
                key = errno.errorcode.get(rc, str(rc))
                st["tcp_err"][key] = st["tcp_err"].get(key, 0) + 1
                s.close()
            next_tcp = now + 0.2
        if pending:
            _, done, _ = select.select([], list(pending), [], 0)
            for s in done:
                rc = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if rc == 0:
                    st["tcp_connected"] += 1
                else:
                    key = errno.errorcode.get(rc, str(rc))
                    st["tcp_err"][key] = st["tcp_err"].get(key, 0) + 1
                del pending[s]
                s.close()
            for s, t in list(pending.items()):
                if now - t > 3:
                    del pending[s]
                    s.close()
        if now >= next_write:
            tmp = os.path.join(STATE, f".{name}.json")
            with open(tmp, "w") as f:
                json.dump(st, f)
            os.replace(tmp, os.path.join(STATE, f"{name}.json"))
            next_write = now + 0.25
        time.sleep(0.02)


# --- scenarios ----------------------------------------------------------------------

def refusal(*texts: str) -> str | None:
    """ksbpf's one-line refusal of this kernel (it lacks a feature), if one of the texts has it."""
    for text in texts:
        for line in text.splitlines():
            m = REFUSAL.search(line)
            if m:
                return m[1].strip()
    return None


def unit_refusal(*units: str) -> str | None:
    """The refusal of a ksbpf unit that failed (or restarted) because of this kernel."""
    for unit in units:
        st = unit_state(unit)
        if st.get("Result", "success") != "success" or int(st.get("NRestarts") or 0) > 0 \
                or st.get("ActiveState") == "failed":
            found = refusal(journal(unit))
            if found:
                return found
    return None


def features() -> str:
    """What ksbpf's feature probes say about this kernel (one line), if this ksbpf has them."""
    out = subprocess.run(["/opt/ksbpf/.venv/bin/python", "-c",
                          "from ksbpf.kernel import features; print(features.summary())"],
                         capture_output=True, text=True)
    return out.stdout.strip()[-1000:] if out.returncode == 0 else ""


def common() -> dict:
    return {"kernel": os.uname().release, "system": system_running(),
            "failed_units": sh("systemctl", "--failed", "--plain", "--no-legend", check=False).strip(),
            "wireguard_module": os.path.isdir("/sys/module/wireguard"),
            "wg0_kind": "wireguard" if "wireguard" in sh("ip", "-d", "link", "show", "wg0", check=False) else "?"}


def boot_order(sender_unit: str) -> dict:
    """When the units of this boot started and ended (CLOCK_MONOTONIC, µs), and how the kill switch's went."""
    units = ("ksbpf-early.service", sender_unit, "network-pre.target", "ksbpf-demo-peer.service",
             "wg-quick@wg0.service", "ksbpf.service")
    return {"times": {u: unit_times(u) for u in units},
            "units": {u: unit_state(u) for u in ("ksbpf-early.service", "ksbpf.service")}}


def scenario_boot() -> dict:
    """First boot: protected before the network, nothing leaks, the tunnel then carries it."""
    r = common()
    r.update(boot_order("ksbpf-vmtest-protected.service"))
    r["tunnel_after_boot_s"] = tunnel_flowing()
    wait_for("the control's traffic", lambda: counters()["control_udp"] > 0 and counters()["control_tcp"] > 0, 30)
    r["growth"] = growth(COUNTERS, 3)
    r["counters"] = counters()
    r["protected"] = sender("protected")
    r["control"] = sender("control")
    r["status"] = status()
    r["exposure"] = exposure()
    r["pin_modes"] = pin_modes()
    r["journal_early"] = journal("ksbpf-early.service")[-3000:]
    return r


def scenario_daemon() -> dict:
    """The daemon under systemd: tunnel flaps, kill -9, reload, stop."""
    r = common()
    r["tunnel_after_boot_s"] = tunnel_flowing()
    flaps = []
    for _ in range(3):
        wg("down")
        time.sleep(0.5)
        wg("up")
        flaps.append(tunnel_flowing(30))
    r["flap_resume_s"] = flaps
    r["after_flaps"] = counters()

    before = unit_state("ksbpf.service")
    progs_before = attached_progs()
    os.kill(int(before["MainPID"]), 9)
    wg("down")                  # the tunnel goes while no daemon runs
    r["growth_while_killed"] = growth(("leak_udp", "leak_tcp"), 1.0)
    r["progs_while_killed"] = attached_progs()
    wait_for("the daemon restarted", lambda: unit_state("ksbpf.service")["MainPID"] not in ("0", before["MainPID"])
             and unit_state("ksbpf.service")["ActiveState"] == "active", 60)
    wait_for("the restarted daemon's /readyz", ready, 120, 0.5)
    wg("up")
    r["resume_after_restart_s"] = tunnel_flowing(60)
    r["restart"] = {"before": before, "after": unit_state("ksbpf.service"),
                    "progs_before": progs_before, "progs_after": attached_progs()}

    # a second tunnel: a changed policy that needs no new compile (one would take minutes under emulation)
    text = open(CONFIG).read().replace('tunnels = ["wg0"]', 'tunnels = ["wg0", "wg1"]', 1)
    with open(CONFIG, "w") as f:
        f.write(text)
    sh("systemctl", "reload", "ksbpf.service")
    wait_for("the reloaded policy", lambda: any("wg1" in [t["name"] for t in sc["tunnels"]] for sc in status()["scopes"]),
             300, 0.5)
    wait_for("the reloaded daemon's /readyz", ready, 60, 0.5)
    r["after_reload"] = {"status": status(), "progs": attached_progs(), "growth": growth(COUNTERS, 2)}

    sh("systemctl", "stop", "ksbpf.service")
    wg("down")
    r["after_stop"] = {"unit": unit_state("ksbpf.service"), "progs": attached_progs(),
                       "growth": growth(COUNTERS, 2), "protected": sender("protected")}
    r["counters"] = counters()
    r["journal"] = journal("ksbpf.service")[-4000:]
    return r


def scenario_escape() -> dict:
    """The escape hatch, then a reboot (the host boots the same disk again)."""
    r = common()
    r["tunnel_after_boot_s"] = tunnel_flowing()
    r["progs_before"] = attached_progs()
    proc = subprocess.run("systemctl disable --now ksbpf.service ksbpf-early.service && ksbpf detach --all",
                          shell=True, capture_output=True, text=True)
    r["escape"] = {"rc": proc.returncode, "out": proc.stdout[-2000:], "err": proc.stderr[-2000:]}
    r["progs_after"] = attached_progs()
    r["pins_left"] = os.path.exists("/sys/fs/bpf/ksbpf")
    r["then"] = "reboot"
    return r


def scenario_escape_rebooted() -> dict:
    r = common()
    r["units"] = {u: unit_state(u) for u in ("ksbpf-early.service", "ksbpf.service")}
    r["pins_left"] = os.path.exists("/sys/fs/bpf/ksbpf")
    r["progs"] = attached_progs()
    r["all_ksbpf_progs"] = [p for p in json.loads(sh("bpftool", "-j", "prog", "show") or "[]")
                            if p.get("name", "").startswith("ksbpf")]
    r["tunnel_after_boot_s"] = tunnel_flowing()
    wg("down")
    time.sleep(0.5)
    r["growth_without_tunnel"] = growth(COUNTERS, 3)
    r["protected"] = sender("protected")
    return r


def diagnostics() -> dict:
    """What the guest looked like when a scenario failed."""
    out = {}
    for name, argv in {"wg": ["wg", "show", "all"], "routes": ["ip", "route"],
                       "routes_51820": ["ip", "route", "show", "table", "51820"], "rules": ["ip", "rule"], "links": ["ip", "-br", "link"],
                       "peer_addr": ["ip", "-n", NS, "-br", "addr"], "peer_wg": ["ip", "netns", "exec", NS, "wg", "show"],
                       "nft": ["ip", "netns", "exec", NS, "nft", "list", "ruleset"],
                       "status": ["ksbpf", "status"], "failed": ["systemctl", "--failed", "--no-legend"],
                       "wg_quick": ["journalctl", "-b", "-u", "wg-quick@wg0", "-u", "ksbpf-demo-peer", "-o", "cat"],
                       "senders": ["journalctl", "-b", "-u", "ksbpf-vmtest-protected", "-u", "ksbpf-vmtest-control",
                                   "-o", "cat"]}.items():
        out[name] = sh(*argv, check=False)[-2000:]
    for name in ("protected", "control"):
        try:
            out[name] = sender(name)
        except OSError as exc:
            out[name] = str(exc)
    return out


def scenario_node() -> dict:
    """First boot with node mode: forwarded traffic from a container is blocked on
    the physical link from the start, and passes once the tunnel is up."""
    r = common()
    r.update(boot_order("ksbpf-vmtest-ctr.service"))
    t = time.monotonic()
    base = counters()
    wait_for("forwarded traffic through the tunnel",
             lambda: all(counters()[c] > base[c] for c in ("node_tunnel_udp", "node_tunnel_tcp")), 60)
    r["tunnel_after_boot_s"] = round(time.monotonic() - t, 2)
    r["growth"] = growth(COUNTERS, 3)
    r["counters"] = counters()
    r["ctr"] = sender("ctr")
    r["status"] = status()
    r["journal_early"] = journal("ksbpf-early.service")[-3000:]
    return r


def scenario_lab() -> dict:
    """The leak matrix with its controls: `ksbpf verify --lab` on this kernel."""
    r = common()
    t = time.monotonic()
    proc = subprocess.run(["ksbpf", "verify", "--lab", "--json"], capture_output=True, text=True, timeout=1500)
    r["lab_seconds"] = round(time.monotonic() - t, 1)
    r["lab_rc"] = proc.returncode
    r["lab_stderr"] = proc.stderr[-3000:]
    try:
        r["lab"] = json.loads(proc.stdout)
    except ValueError:
        r["lab"] = None
        r["lab_stdout"] = proc.stdout[-3000:]
    err = proc.stderr.strip().splitlines()
    if proc.returncode != 0 and r["lab"] is None and err:
        r["refusal"] = refusal(err[-1])
    return r


def each_counters() -> dict[str, int]:
    return {k: v for k, v in counters().items() if k.startswith("each_")}


def cmd_each_setup() -> None:
    """A container-like namespace ctr1 (veth to the machine, forwarded and masqueraded out of
    the physical link), no tunnel in it yet."""
    sh("ip", "netns", "add", EACH_NS)
    sh("ip", "link", "add", "veth-c1", "type", "veth", "peer", "name", "eth0", "netns", EACH_NS)
    for argv in (["ip", "addr", "add", "10.87.0.1/24", "dev", "veth-c1"], ["ip", "link", "set", "veth-c1", "up"],
                 ["ip", "-n", EACH_NS, "link", "set", "lo", "up"],
                 ["ip", "-n", EACH_NS, "addr", "add", "10.87.0.2/24", "dev", "eth0"],
                 ["ip", "-n", EACH_NS, "link", "set", "eth0", "up"],
                 ["ip", "-n", EACH_NS, "route", "add", "default", "via", "10.87.0.1"],
                 # ctr1's forwarded traffic leaves by the physical link, as a container's would: not into
                 # the machine's own wg0, whose route to the target network the boot scenario added (the
                 # control from ctr1 would then arrive through wgs, and a leak would pass for tunnel traffic)
                 ["ip", "rule", "add", "from", "10.87.0.0/24", "lookup", "87", "priority", "1000"],
                 ["ip", "route", "add", "198.51.100.0/24", "via", "10.99.0.2", "dev", "vpn-uplink", "table", "87"],
                 ["sysctl", "-qw", "net.ipv4.ip_forward=1"]):
        sh(*argv)
    subprocess.run(["nft", "-f", "-"], check=True, text=True, input="""
table ip ksbpfvmeach {
    chain post {
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr 10.87.0.0/24 oifname != "veth-c1" masquerade
    }
}
""")


def each_tunnel() -> None:
    """The container's own tunnel: a kernel WireGuard interface made here (its socket stays in
    this namespace, as with a VPN container's), moved into ctr1 and named wg0 there; the peer
    accepts it as a second client."""
    key = sh("wg", "genkey").strip()
    pub = subprocess.run(["wg", "pubkey"], input=key, capture_output=True, text=True, check=True).stdout.strip()
    keyfile = os.path.join(STATE, "each.key")
    with open(os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(key + "\n")
    peer_pub = open("/etc/ksbpf-demo/peer.pub").read().strip()
    sh("ip", "netns", "exec", NS, "wg", "set", "wgs", "peer", pub, "allowed-ips", "10.200.0.3/32")
    sh("ip", "link", "add", "wgc1", "type", "wireguard")
    sh("wg", "set", "wgc1", "private-key", keyfile, "peer", peer_pub, "endpoint", "10.99.0.2:51820",
       "allowed-ips", "0.0.0.0/0", "persistent-keepalive", "1")
    sh("ip", "link", "set", "wgc1", "netns", EACH_NS)
    sh("ip", "-n", EACH_NS, "link", "set", "wgc1", "name", "wg0")
    sh("ip", "-n", EACH_NS, "addr", "add", "10.200.0.3/24", "dev", "wg0")
    sh("ip", "-n", EACH_NS, "link", "set", "wg0", "up")
    sh("ip", "-n", EACH_NS, "route", "add", "198.51.100.0/24", "dev", "wg0")


def each_sender(name: str, slice_: str, udp: int, tcp: int) -> None:
    """A sender living in ctr1, in a cgroup of `slice_`, started as a container runtime would."""
    sh("systemd-run", f"--unit=ksbpf-vmtest-{name}", f"--slice={slice_}", "-p", "Type=notify",
       "-p", f"NetworkNamespacePath=/run/netns/{EACH_NS}", "/usr/bin/python3", os.path.abspath(__file__),
       "send", name, str(udp), str(tcp))


def scenario_each() -> dict:
    """A container-like scope with netns = "each": its process lives in its own namespace
    ctr1.  Without a tunnel in ctr1 nothing of it leaves the machine (the control from the
    same namespace does); with ctr1's own wg0 its traffic goes through that tunnel."""
    r = common()
    cmd_each_setup()
    # the container's cgroup exists before the scope names it (as a runtime makes it): a reloading
    # daemon cannot create it (create_cgroup: EACCES under the unit's sandbox), and its processes'
    # sockets must be born under the scope (where socket storage records namespaces)
    os.makedirs(EACH_CGROUP, exist_ok=True)
    with open(CONFIG, "a") as f:
        f.write(EACH_CONFIG)
    wait_for("the daemon's /readyz", ready, 300, 0.5)
    sh("systemctl", "reload", "ksbpf.service")

    def attached() -> bool:
        if any(sc["cgroup"] == EACH_CGROUP and sc.get("attached") for sc in status()["scopes"]):
            return True
        text = journal("ksbpf.service")[-6000:]
        found = refusal(text)
        failed = [line for line in text.splitlines() if "scope_failed" in line and EACH_CGROUP in line]
        if len(failed) >= 3 and not found:
            raise RuntimeError(f"the daemon cannot attach the netns each scope: {failed[-1]}")
        if found:
            exc = RuntimeError(f"the daemon did not attach the netns each scope: {found}")
            exc.refusal = found   # type: ignore[attr-defined]
            raise exc
        return False
    log("scenario each: reloaded, waiting for the scope")
    wait_for("the netns each scope", attached, 420, 1)
    log("scenario each: scope attached")
    # the container starts once its scope is in force; then the daemon must be ready again (seen on
    # 6.1: a netns "each" scope whose subtree has no process yet made the daemon's verifier report
    # "network namespace each is gone or was replaced" and /readyz fail)
    each_sender("each", "ctr.slice", 8001, 8002)
    each_sender("eachctl", "system.slice", 8003, 8004)
    wait_for("the reloaded daemon's /readyz", ready, 120, 0.5)
    wait_for("the control from ctr1", lambda: counters()["each_control_udp"] > 0, 60)
    r["growth_without_tunnel"] = growth(COUNTERS, 3)
    r["sender_without_tunnel"] = sender("each")
    each_tunnel()
    t = time.monotonic()
    base = counters()
    wait_for("ctr1's traffic through its own tunnel",
             lambda: all(counters()[c] > base[c] for c in ("each_tunnel_udp", "each_tunnel_tcp")), 90)
    r["tunnel_after_s"] = round(time.monotonic() - t, 2)
    r["growth_with_tunnel"] = growth(COUNTERS, 3)
    r["counters"] = counters()
    r["sender"] = sender("each")
    r["status"] = status()
    r["journal"] = journal("ksbpf.service")[-3000:]
    return r


# socket(family, type) as a process would: each family that sends frames past the cgroup egress hook
RAW_PROBE = r'''
import errno, json, socket
out = {}
for name, family, kind in (("packet", 17, socket.SOCK_RAW), ("packet_dgram", 17, socket.SOCK_DGRAM),
                           ("sock_packet", socket.AF_INET, 10), ("xdp", 44, socket.SOCK_RAW)):
    try:
        socket.socket(family, kind, 0).close()
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(out))
'''


def scenario_raw() -> dict:
    """Raw sockets in a scope: AF_PACKET (SOCK_PACKET too) and AF_XDP made by a
    root process with CAP_NET_RAW of the protected slice, and the same outside
    it (the control)."""
    r = common()

    def probe(slice_: str | None) -> dict:
        argv = ["systemd-run", "--quiet", "--wait", "--pipe", "--collect",
                *(["--slice", slice_] if slice_ else []), "python3", "-c", RAW_PROBE]
        return json.loads(sh(*argv).strip().splitlines()[-1])
    r["raw_in_scope"] = probe("vpn.slice")
    r["raw_outside"] = probe(None)
    r["status"] = status()
    r.update(raw_node())
    return r


# The two raw paths that skip node mode's tc guards: PACKET_QDISC_BYPASS on an AF_PACKET socket, and
# binding an AF_XDP socket (with a UMEM and rings, in copy mode: what works on a veth). argv: the
# namespace to enter, the cgroup to move into first ("" stays), the interface to bind to.
NODE_RAW_PROBE = r'''
import ctypes, errno, json, mmap, os, socket, struct, sys
netns, cg, ifname = sys.argv[1:4]
if cg:
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write("0")
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open("/run/netns/" + netns, os.O_RDONLY)
assert libc.setns(fd, 0x40000000) == 0, "setns"
def err(e):
    return errno.errorcode.get(e.errno, str(e.errno))
out = {}
try:
    s = socket.socket(17, socket.SOCK_RAW, 0)
    s.setsockopt(263, 20, 1)    # SOL_PACKET, PACKET_QDISC_BYPASS
    out["qdisc_bypass"] = "ok"
except OSError as e:
    out["qdisc_bypass"] = err(e)
try:
    x = socket.socket(44, socket.SOCK_RAW, 0)
    area = mmap.mmap(-1, 16 * 4096)
    base = ctypes.addressof(ctypes.c_char.from_buffer(area))
    x.setsockopt(283, 4, struct.pack("=QQII", base, 16 * 4096, 4096, 0))   # SOL_XDP, XDP_UMEM_REG (v1)
    for opt in (5, 6, 3):   # fill ring, completion ring, TX ring
        x.setsockopt(283, opt, 16)
    addr = struct.pack("=HHIII", 44, 2, socket.if_nametoindex(ifname), 0, 0)   # AF_XDP, XDP_COPY, queue 0
    buf = ctypes.create_string_buffer(addr, len(addr))
    if libc.bind(x.fileno(), buf, len(addr)) != 0:
        raise OSError(ctypes.get_errno(), "bind")
    out["xdp_bind"] = "ok"
except OSError as e:
    out["xdp_bind"] = err(e)
print(json.dumps(out))
'''
RAW_NODE_NS, RAW_CTL_NS, RAW_EXEMPT = "ksbpf-rawnode", "ksbpf-rawctl", "/sys/fs/cgroup/ksbpf-rawok"


def raw_node() -> dict:
    """Node mode's raw-socket layer: one-shot `ksbpf attach --node` in a namespace of its own with an
    exempt cgroup; PACKET_QDISC_BYPASS and an AF_XDP bind tried there from an ordinary root process
    (refused), from the exempt cgroup and from another namespace (the controls: both work), and again
    after `ksbpf detach --node` (works: the programs went with the scope)."""
    r: dict = {}
    for ns in (RAW_NODE_NS, RAW_CTL_NS):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "add", "rv0", "type", "veth", "peer", "name", "rv1")
        sh("ip", "-n", ns, "link", "set", "rv0", "up")
        sh("ip", "-n", ns, "link", "set", "rv1", "up")
    os.makedirs(RAW_EXEMPT, exist_ok=True)

    def probe(ns: str, cg: str = "") -> dict:
        proc = subprocess.run(["python3", "-c", NODE_RAW_PROBE, ns, cg, "rv0"], capture_output=True, text=True)
        try:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"error": (proc.stdout + proc.stderr)[-800:]}
    try:
        r["node_raw_before"] = probe(RAW_NODE_NS)
        attach = subprocess.run(["ksbpf", "attach", "--node", "--netns", RAW_NODE_NS, "--tunnel", "wg9",
                                 "--exempt-cgroup", RAW_EXEMPT, "--json"], capture_output=True, text=True)
        r["node_attach_rc"], r["node_attach_err"] = attach.returncode, attach.stderr[-2000:]
        try:
            r["node_attach"] = {k: v for k, v in json.loads(attach.stdout).items()
                                if k in ("raw_sockets", "from_birth", "tc_mode")}
        except ValueError:
            r["node_attach"] = {"stdout": attach.stdout[-1000:]}
        r["node_raw_inside"] = probe(RAW_NODE_NS)
        r["node_raw_exempt"] = probe(RAW_NODE_NS, RAW_EXEMPT)
        r["node_raw_other_ns"] = probe(RAW_CTL_NS)
        st = json.loads(sh("ksbpf", "status", "--json"))
        r["node_raw_status"] = [n.get("raw_sockets") for n in st.get("nodes", []) if RAW_NODE_NS in str(n.get("netns"))]
        sh("ksbpf", "detach", "--node", "--netns", RAW_NODE_NS)
        r["node_raw_detached"] = probe(RAW_NODE_NS)
    finally:
        sh("ksbpf", "detach", "--node", "--netns", RAW_NODE_NS, check=False)
        for ns in (RAW_NODE_NS, RAW_CTL_NS):
            sh("ip", "netns", "del", ns, check=False)
        try:
            os.rmdir(RAW_EXEMPT)
        except OSError:
            pass
    return r


# --- scenario "nm": NetworkManager's WireGuard connection ----------------------------------------

NM_IFACE = "wg-home"           # the interface and connection nmcli makes from wg-home.conf (the shipped example's)
NM_IFACE2 = "wg-home-2"        # the second server's connection (its interface renamed wg-home)
NM_ADDR, NM_DNS, NM_DNS2 = "10.200.0.4", "10.200.0.1", "10.200.0.53"
NM_SERVER2 = "10.99.0.3"       # the same peer at a second address of vpnpeer: "another server"
NM_FWMARK = "0xca6c"   # (nmcli reads wireguard.fwmark as hexadecimal: "51820" is 0x51820)
# UDP payloads that tell who sent to the endpoint (WireGuard's messages start with 1-4 and three zeros)
NM_FROM_SCOPE, NM_FROM_CONTROL = b"KSBS", b"KSBC"
NM_DNS_SCOPE, NM_DNS_CONTROL = b"DNSS", b"DNSC"
NM_COUNTERS = ("ep_scope", "ep_control", "dns_vpn", "dns_vpn2", "dns_other_scope", "dns_other_control", "dns_leak",
               "wg_server2")
NM_NFT = """
table inet ksbpfnm {
%s
    chain pre {
        type filter hook prerouting priority -290; policy accept;
        iifname "uplink" udp dport 51820 @th,64,32 0x%s counter name ep_scope
        iifname "uplink" udp dport 51820 @th,64,32 0x%s counter name ep_control
        iifname "wgs" ip daddr %s udp dport 53 counter name dns_vpn
        iifname "wgs" ip daddr %s udp dport 53 counter name dns_vpn2
        iifname "wgs" ip daddr %s udp dport 53 @th,64,32 0x%s counter name dns_other_scope
        iifname "wgs" ip daddr %s udp dport 53 @th,64,32 0x%s counter name dns_other_control
        iifname "uplink" udp dport 53 counter name dns_leak
        iifname "uplink" ip daddr %s udp dport 51820 counter name wg_server2
    }
}
""" % ("\n".join(f"    counter {c} {{ }}" for c in NM_COUNTERS), NM_FROM_SCOPE.hex(), NM_FROM_CONTROL.hex(),
       NM_DNS, NM_DNS2, TARGET, NM_DNS_SCOPE.hex(), TARGET, NM_DNS_CONTROL.hex(), NM_SERVER2)
NM_CONF = "[keyfile]\nunmanaged-devices=*,except:type:wireguard\n"   # NetworkManager touches only WireGuard
# n UDP datagrams to (addr, port), from a process of a slice (or none); prints how many the kernel took
# (a 5th argument: the interface to bind the socket to, SO_BINDTODEVICE, past the routes)
BURST = r"""
import errno, json, socket, sys, time
addr, port, payload, n = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if len(sys.argv) > 5:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, sys.argv[5].encode())
out = {"ok": 0, "err": {}}
for _ in range(n):
    try:
        s.sendto(payload + b"-ksbpf-vm-test", (addr, port))
        out["ok"] += 1
    except OSError as e:
        k = errno.errorcode.get(e.errno, str(e.errno))
        out["err"][k] = out["err"].get(k, 0) + 1
    time.sleep(0.02)
print(json.dumps(out))
"""


def nm_counters() -> dict[str, int]:
    data = json.loads(sh("ip", "netns", "exec", NS, "nft", "-j", "list", "counters", "table", "inet", "ksbpfnm"))
    return {i["counter"]["name"]: i["counter"]["packets"] for i in data["nftables"] if "counter" in i}


def burst(slice_: str | None, addr: str, port: int, payload: bytes, n: int = 20, dev: str = "") -> dict:
    argv = ["systemd-run", "--quiet", "--wait", "--pipe", "--collect", *(["--slice", slice_] if slice_ else []),
            "python3", "-c", BURST, addr, str(port), payload.decode(), str(n), *([dev] if dev else [])]
    return json.loads(sh(*argv).strip().splitlines()[-1])


def nm_grew(name: str, before: dict, settle: float = 1.5) -> int:
    time.sleep(settle)   # (the counters are read on the far side: the datagrams have arrived or never will)
    return nm_counters()[name] - before[name]


def nmcli(*args: str, check: bool = True) -> str:
    # (nmcli waits 10 s for a deactivation by default: seen to time out under emulation on a loaded machine)
    return sh("nmcli", "--wait", "120", *args, check=check)


def scenario_nm() -> dict:
    """NetworkManager: a WireGuard connection imported from a wg-quick file, brought
    up and down with nmcli; ksbpf protects vpn.slice with the shipped example
    configuration (endpoints auto, vpn_mark, dns auto: no address typed) and the
    shipped dispatcher script.  Down: nothing leaks (the control arrives); up: the
    traffic flows again; a server switch (a second connection) keeps it flowing; the scope cannot reach the
    endpoint (the control can); DNS only to the connection's resolver, which follows
    a change of the connection's DNS."""
    r = common()
    r["tunnel_after_boot_s"] = tunnel_flowing()
    subprocess.run(["ip", "netns", "exec", NS, "nft", "-f", "-"], input=NM_NFT, text=True, check=True)
    sh("systemctl", "stop", "wg-quick@wg0.service")    # NetworkManager's tunnel replaces wg-quick's
    # the far side: the same server for a second client, and at a second address ("another server")
    key = sh("wg", "genkey").strip()
    pub = subprocess.run(["wg", "pubkey"], input=key, capture_output=True, text=True, check=True).stdout.strip()
    sh("ip", "netns", "exec", NS, "wg", "set", "wgs", "peer", pub, "allowed-ips", f"{NM_ADDR}/32")
    sh("ip", "-n", NS, "addr", "add", f"{NM_DNS2}/32", "dev", "wgs")
    sh("ip", "-n", NS, "addr", "add", f"{NM_SERVER2}/24", "dev", "uplink")
    peer_pub = open("/etc/ksbpf-demo/peer.pub").read().strip()

    # NetworkManager as a user has it, managing only WireGuard here, with ksbpf's dispatcher script installed
    os.makedirs("/etc/NetworkManager/conf.d", exist_ok=True)
    with open("/etc/NetworkManager/conf.d/90-ksbpf-vmtest.conf", "w") as f:
        f.write(NM_CONF)
    sh("install", "-m", "0755", "/opt/ksbpf/deploy/networkmanager/90-ksbpf", "/etc/NetworkManager/dispatcher.d/")
    # (the image disabled NetworkManager and, through its Also=, the dispatcher a user has enabled with it)
    sh("systemctl", "enable", "NetworkManager-dispatcher.service")
    sh("systemctl", "start", "NetworkManager.service")
    wait_for("NetworkManager", lambda: subprocess.run(["nmcli", "general", "status"], capture_output=True).returncode == 0,
             120, 0.5)
    # the user's wg-quick file, NOT under /etc/wireguard (dns auto must find the resolver in NetworkManager)
    os.makedirs("/root/vpn", mode=0o700, exist_ok=True)
    conf = f"/root/vpn/{NM_IFACE}.conf"
    with open(os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(f"[Interface]\nPrivateKey = {key}\nAddress = {NM_ADDR}/24\nDNS = {NM_DNS}\n\n"
                f"[Peer]\nPublicKey = {peer_pub}\nEndpoint = 10.99.0.2:51820\n"
                f"AllowedIPs = 10.200.0.0/24, 198.51.100.0/24\nPersistentKeepalive = 5\n")
    r["import"] = nmcli("connection", "import", "type", "wireguard", "file", conf).strip()
    # the VPN client's mark: NetworkManager's own setting (as deploy/networkmanager/ksbpf.toml says)
    nmcli("connection", "modify", NM_IFACE, "wireguard.fwmark", NM_FWMARK)
    r["nm_fwmark"] = nmcli("-g", "wireguard.fwmark", "connection", "show", NM_IFACE).strip()
    r["nm_dns_setting"] = nmcli("-g", "ipv4.dns", "connection", "show", NM_IFACE).strip()
    nmcli("connection", "up", NM_IFACE)
    r["route"] = sh("ip", "route", "get", TARGET).strip()
    if f"dev {NM_IFACE}" not in r["route"]:   # NetworkManager's route metric above the physical link's (100)
        nmcli("connection", "modify", NM_IFACE, "ipv4.route-metric", "50")
        nmcli("connection", "up", NM_IFACE)
        r["route_metric_set"] = sh("ip", "route", "get", TARGET).strip()
    r["nmcli_device_dns"] = nmcli("-g", "IP4.DNS,IP6.DNS", "device", "show", NM_IFACE, check=False)
    r["wg_fwmark"] = sh("wg", "show", NM_IFACE, "fwmark").strip()

    # ksbpf: the shipped example configuration, installed as is
    sh("install", "-m", "0644", "/opt/ksbpf/deploy/networkmanager/ksbpf.toml", CONFIG)
    r["check_config"] = sh("ksbpf", "check-config", CONFIG)
    t = time.monotonic()
    sh("systemctl", "reload", "ksbpf.service")
    log("scenario nm: reloaded with the NetworkManager configuration, waiting for the scope")

    def in_force() -> bool:
        sc = next((s for s in status()["scopes"] if s["cgroup"] == SCOPE), None)
        return bool(sc and [t["name"] for t in sc["tunnels"]] == [NM_IFACE] and sc.get("followed"))
    wait_for("the scope with the NetworkManager tunnel", in_force, 600, 1)
    wait_for("the reloaded daemon's /readyz", ready, 120, 0.5)
    r["reload_s"] = round(time.monotonic() - t, 1)
    r["up_s"] = tunnel_flowing(90)
    r["status_up"] = status()
    r["ksbpf_status_text"] = sh("ksbpf", "status", check=False)[-3000:]

    # the endpoint is the VPN client's only (vpn_mark): the scope's datagrams to it go nowhere, the control's arrive
    b = nm_counters()
    r["ep_scope_send"] = burst("vpn.slice", "10.99.0.2", 51820, NM_FROM_SCOPE)
    r["ep_control_send"] = burst(None, "10.99.0.2", 51820, NM_FROM_CONTROL)
    r["ep"] = {"scope": nm_grew("ep_scope", b), "control": nm_grew("ep_control", b, 0)}
    # DNS: to the connection's resolver through the tunnel; to another resolver: never (redirected or dropped)
    b = nm_counters()
    r["dns_vpn_send"] = burst("vpn.slice", NM_DNS, 53, NM_DNS_SCOPE, 10)
    r["dns_other_send"] = burst("vpn.slice", TARGET, 53, NM_DNS_SCOPE, 10)
    r["dns_control_send"] = burst(None, TARGET, 53, NM_DNS_CONTROL, 10)
    time.sleep(1.5)
    after = nm_counters()
    r["dns"] = {k: after[k] - b[k] for k in NM_COUNTERS}

    # down: nothing leaves (the control does); up: it flows again
    r["before_down_sender"] = sender("protected")
    nmcli("connection", "down", NM_IFACE)
    wait_for("the tunnel gone", lambda: NM_IFACE not in sh("ip", "-br", "link"), 30)
    r["down_growth"] = growth(COUNTERS, 3)
    r["down_sender"] = sender("protected")
    nmcli("connection", "up", NM_IFACE)
    r["up_again_s"] = tunnel_flowing(90)

    # a server switch as NetworkManager makes it: a second connection, imported from the other server's
    # wg-quick file (server 2, its own resolver), its interface named as the first's (the tunnel ksbpf's
    # configuration names); down the one, up the other
    conf2 = f"/root/vpn/{NM_IFACE2}.conf"
    with open(os.open(conf2, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(open(conf).read().replace("Endpoint = 10.99.0.2:51820", f"Endpoint = {NM_SERVER2}:51820")
                .replace(f"DNS = {NM_DNS}", f"DNS = {NM_DNS2}"))
    r["import2"] = nmcli("connection", "import", "type", "wireguard", "file", conf2).strip()
    r["import2_active"] = nmcli("-g", "GENERAL.STATE", "connection", "show", NM_IFACE2, check=False).strip()
    nmcli("connection", "modify", NM_IFACE2, "connection.autoconnect", "no", "connection.interface-name", NM_IFACE,
          "wireguard.fwmark", NM_FWMARK, *(["ipv4.route-metric", "50"] if r.get("route_metric_set") else []))
    if r["import2_active"]:   # (an imported connection may autoconnect, on an interface of its own name)
        nmcli("connection", "down", NM_IFACE2, check=False)

    def dns_arrives(addr: str, counter: str) -> bool:
        before = nm_counters()[counter]
        burst("vpn.slice", addr, 53, NM_DNS_SCOPE, 3)
        return nm_grew(counter, {counter: before}, 1.0) > 0
    b = nm_counters()
    nmcli("connection", "down", NM_IFACE)
    nmcli("connection", "up", NM_IFACE2)
    r["switch_s"] = tunnel_flowing(90)
    r["switch_active"] = nmcli("-g", "GENERAL.CONNECTION", "device", "show", NM_IFACE, check=False).strip()
    r["switch_wg_endpoints"] = sh("wg", "show", NM_IFACE, "endpoints").strip()
    t = time.monotonic()
    wait_for("DNS from the scope to server 2's resolver", lambda: dns_arrives(NM_DNS2, "dns_vpn2"), 300, 2)
    r["switch_dns_s"] = round(time.monotonic() - t, 1)
    r["switch_growth"] = growth(COUNTERS, 2)
    r["wg_server2"] = nm_counters()["wg_server2"] - b["wg_server2"]
    r["status_switched"] = status()
    b = nm_counters()
    r["ep2_scope_send"] = burst("vpn.slice", NM_SERVER2, 51820, NM_FROM_SCOPE)
    r["ep2_control_send"] = burst(None, NM_SERVER2, 51820, NM_FROM_CONTROL)
    r["ep1_scope_send"] = burst("vpn.slice", "10.99.0.2", 51820, NM_FROM_SCOPE)   # nor the old server
    r["ep2"] = {"scope": nm_grew("ep_scope", b), "control": nm_grew("ep_control", b, 0)}
    b = nm_counters()
    r["dns2_other_send"] = burst("vpn.slice", TARGET, 53, NM_DNS_SCOPE, 10)
    r["dns2_old_send"] = burst("vpn.slice", NM_DNS, 53, NM_DNS_SCOPE, 10)
    time.sleep(1.5)
    after = nm_counters()
    r["dns2"] = {k: after[k] - b[k] for k in NM_COUNTERS}

    # the connection's DNS changes: the dispatcher script has the daemon re-read dns auto
    nmcli("connection", "modify", NM_IFACE2, "ipv4.dns", NM_DNS)
    nmcli("connection", "up", NM_IFACE2)
    t = time.monotonic()
    wait_for("DNS from the scope to the connection's new resolver", lambda: dns_arrives(NM_DNS, "dns_vpn"), 300, 2)
    r["dns_follow_s"] = round(time.monotonic() - t, 1)
    r["status_dns_changed"] = status()
    r["dispatcher_log"] = sh("journalctl", "-b", "-t", "ksbpf-nm", "-o", "cat", "--no-pager", check=False)[-2000:]
    r["up_after_dns_s"] = tunnel_flowing(90)

    # can Debian's nmcli edit a peer's endpoint in place (NetworkManager >= 1.44's wireguard.peers)? recorded only
    p = subprocess.run(["nmcli", "connection", "modify", NM_IFACE, "wireguard.peers",
                        f"{peer_pub} endpoint=10.99.0.2:51820 allowed-ips=10.200.0.0/24;198.51.100.0/24"],
                       capture_output=True, text=True)
    r["nmcli_modify_peer"] = {"rc": p.returncode, "err": p.stderr.strip()[-300:],
                              "version": nmcli("--version", check=False).strip()}

    r["counters"] = counters()
    r["nm_counters"] = nm_counters()
    r["protected"] = sender("protected")
    r["journal"] = journal("ksbpf.service")[-4000:]
    r["nm_journal"] = journal("NetworkManager.service")[-2000:]
    return r


# --- scenario "wgquick": kernel WireGuard through wg-quick, a full tunnel ----------------------------

WQ_CONF = "/etc/wireguard/wg0.conf"
WQ_CONFIG = """# /etc/ksbpf/ksbpf.toml as README's wg-quick recipe has it: no address typed
[daemon]
log_format = "text"

[[scope]]
cgroup = "/sys/fs/cgroup/vpn.slice"
create_cgroup = true
tunnels = ["wg0"]
tunnel_kinds = ["wireguard"]
endpoints = ["auto"]
vpn_mark = 51820
dns = ["auto"]
"""
# far-side resolvers: each answers a query with the address it was asked at ("ANSWER 10.200.0.1")
RESOLVERS = r"""
import select, socket, sys
socks = []
for addr in sys.argv[1:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_IP, 15, 1)   # IP_FREEBIND
    s.bind((addr, 53))
    socks.append(s)
while True:
    for s in select.select(socks, [], [])[0]:
        data, peer = s.recvfrom(2048)
        s.sendto(b"ANSWER " + s.getsockname()[0].encode(), peer)
"""
# one query from a process of a slice: the answers it got, and from which address
QUERY = r"""
import errno, json, socket, sys
addr, payload = sys.argv[1], sys.argv[2].encode()
out = {"answers": [], "from": [], "err": {}}
for _ in range(3):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    try:
        s.sendto(payload + b"-query", (addr, 53))
        data, peer = s.recvfrom(2048)
        out["answers"].append(data.decode(errors="replace"))
        out["from"].append(peer[0])
    except OSError as e:
        k = "timeout" if isinstance(e, socket.timeout) else errno.errorcode.get(e.errno, str(e.errno))
        out["err"][k] = out["err"].get(k, 0) + 1
    s.close()
print(json.dumps(out))
"""


def wq_file(endpoint: str, dns: str) -> str:
    """A provider's wg-quick file: a full tunnel (wg-quick then marks its own packets 51820 and
    routes everything else into the tunnel by policy routing) and the VPN's resolver."""
    return (f"[Interface]\nPrivateKey = {open('/etc/ksbpf-demo/client.key').read().strip()}\n"
            f"Address = 10.200.0.2/24\nDNS = {dns}\n\n"
            f"[Peer]\nPublicKey = {open('/etc/ksbpf-demo/peer.pub').read().strip()}\nEndpoint = {endpoint}\n"
            f"AllowedIPs = 0.0.0.0/0, ::/0\nPersistentKeepalive = 5\n")


def install_wq(text: str) -> None:
    with open(os.open(WQ_CONF, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)


def query(slice_: str | None, addr: str, payload: bytes) -> dict:
    argv = ["systemd-run", "--quiet", "--wait", "--pipe", "--collect", *(["--slice", slice_] if slice_ else []),
            "python3", "-c", QUERY, addr, payload.decode()]
    return json.loads(sh(*argv).strip().splitlines()[-1])


def scope_status() -> dict:
    return next(s for s in status()["scopes"] if s["cgroup"] == SCOPE)


def drops(name: str) -> int:
    return int(scope_status()["counters"].get(name, {}).get("packets", 0))


def wq_checks(r: dict, tag: str, endpoint: str, resolver: str) -> None:
    """With the tunnel up to `endpoint`: the scope cannot reach the endpoint outside the
    tunnel (bound to the physical link, unmarked: endpoint_not_vpn), the control can; DNS
    from the scope is answered by `resolver` only, the control's by whom it asked."""
    b, d0 = nm_counters(), drops("endpoint_not_vpn")
    r[f"{tag}_ep_scope_send"] = burst("vpn.slice", endpoint, 51820, NM_FROM_SCOPE, dev="vpn-uplink")
    r[f"{tag}_ep_control_send"] = burst(None, endpoint, 51820, NM_FROM_CONTROL, dev="vpn-uplink")
    r[f"{tag}_ep"] = {"scope": nm_grew("ep_scope", b), "control": nm_grew("ep_control", b, 0),
                      "endpoint_not_vpn": drops("endpoint_not_vpn") - d0}
    b = nm_counters()
    r[f"{tag}_dns_vpn"] = query("vpn.slice", resolver, NM_DNS_SCOPE)
    r[f"{tag}_dns_other"] = query("vpn.slice", TARGET, NM_DNS_SCOPE)
    r[f"{tag}_dns_control"] = query(None, TARGET, NM_DNS_CONTROL)
    time.sleep(1.5)
    after = nm_counters()
    r[f"{tag}_dns"] = {k: after[k] - b[k] for k in NM_COUNTERS}


def scenario_wgquick() -> dict:
    r: dict = {}
    try:
        return _scenario_wgquick(r)
    except Exception as exc:
        exc.partial = {k: v for k, v in r.items() if k != "journal"}   # type: ignore[attr-defined]
        raise


def _scenario_wgquick(r: dict) -> dict:
    """wg-quick: kernel WireGuard from a provider's file with a full tunnel and a DNS = line
    (resolvconf: openresolv); ksbpf protects vpn.slice with README's recipe (endpoints auto,
    vpn_mark 51820 -- wg-quick's own mark --, dns auto: no address typed).  The scope's
    traffic goes through the tunnel; `wg-quick down`: nothing leaks (the control arrives);
    `up`: flows again; a server switch (another server's file, down/up) and an Endpoint
    edited with `wg syncconf`: the tunnel works with the new server, no ksbpf edit; the
    scope never reaches the endpoint outside the tunnel; DNS answered only by the file's
    resolver, which follows the switch."""
    r.update(common())
    r["tunnel_after_boot_s"] = tunnel_flowing()
    subprocess.run(["ip", "netns", "exec", NS, "nft", "-f", "-"], input=NM_NFT, text=True, check=True)
    sh("ip", "-n", NS, "addr", "add", f"{NM_DNS2}/32", "dev", "wgs")      # server B's resolver
    sh("ip", "-n", NS, "addr", "add", f"{NM_SERVER2}/24", "dev", "uplink")  # server B: the peer at a second address
    sh("systemd-run", "--unit=ksbpf-vmtest-resolvers", "-p", f"NetworkNamespacePath=/run/netns/{NS}",
       "/usr/bin/python3", "-c", RESOLVERS, NM_DNS, NM_DNS2, TARGET)
    r["resolvconf"] = os.path.realpath(shutil.which("resolvconf") or "")

    # the provider's files for two servers; server A's installed as wg0, the only name ksbpf knows
    os.makedirs("/root/vpn", mode=0o700, exist_ok=True)
    servers = {"a": wq_file("10.99.0.2:51820", NM_DNS), "b": wq_file(f"{NM_SERVER2}:51820", NM_DNS2)}
    for name, text in servers.items():
        with open(os.open(f"/root/vpn/server-{name}.conf", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(text)
    sh("systemctl", "stop", "wg-quick@wg0.service")   # (the provisioning's split tunnel)
    # the physical link as a machine has it: a default route (not the demo's route to 198.51.100.0/24, more
    # specific than a default: wg-quick's full tunnel leaves the main table's non-default routes in force)
    sh("ip", "route", "del", "198.51.100.0/24", "via", "10.99.0.2", "dev", "vpn-uplink")
    sh("ip", "route", "add", "default", "via", "10.99.0.2", "dev", "vpn-uplink", "metric", "100")
    install_wq(servers["a"])
    r["wg_quick_up"] = subprocess.run(["wg-quick", "up", "wg0"], capture_output=True, text=True).stderr[-3000:]
    r["wg_fwmark"] = sh("wg", "show", "wg0", "fwmark").strip()
    r["ip_rules"] = sh("ip", "rule").strip()
    r["resolv_conf"] = open("/etc/resolv.conf").read() if os.path.exists("/etc/resolv.conf") else ""
    r["route"] = sh("ip", "route", "get", TARGET).strip()

    with open(CONFIG, "w") as f:
        f.write(WQ_CONFIG)
    r["check_config"] = sh("ksbpf", "check-config", CONFIG)
    t = time.monotonic()
    sh("systemctl", "reload", "ksbpf.service")
    log("scenario wgquick: reloaded with the wg-quick configuration, waiting for the scope")

    def in_force() -> bool:
        sc = next((s for s in status()["scopes"] if s["cgroup"] == SCOPE), None)
        return bool(sc and sc.get("followed") and sc.get("dns", {}).get("resolvers") == [NM_DNS]
                    and sc.get("vpn_mark") == "0xca6c")
    wait_for("the scope with endpoints and dns auto", in_force, 600, 1)
    wait_for("the reloaded daemon's /readyz", ready, 120, 0.5)
    r["reload_s"] = round(time.monotonic() - t, 1)
    r["up_s"] = tunnel_flowing(90)
    r["up_growth"] = growth(COUNTERS, 2)
    r["status_up"] = status()
    r["ksbpf_status_text"] = sh("ksbpf", "status", check=False)[-3000:]
    wq_checks(r, "a", "10.99.0.2", NM_DNS)

    # down: nothing of the slice leaves (the control does); up: it flows again
    r["before_down_sender"] = sender("protected")
    sh("wg-quick", "down", "wg0")
    r["down_growth"] = growth(COUNTERS, 3)
    r["down_sender"] = sender("protected")
    sh("wg-quick", "up", "wg0")
    r["up_again_s"] = tunnel_flowing(90)

    # a server switch as a user makes it: down, the other server's file, up (endpoint and resolver change)
    b = nm_counters()
    sh("wg-quick", "down", "wg0")
    install_wq(servers["b"])
    sh("wg-quick", "up", "wg0")
    r["switch_s"] = tunnel_flowing(90)
    t = time.monotonic()
    wait_for("dns auto: server B's resolver", lambda: scope_status()["dns"].get("resolvers") == [NM_DNS2], 120, 1)
    r["dns_follow_s"] = round(time.monotonic() - t, 1)
    r["switch_growth"] = growth(COUNTERS, 2)
    r["wg_server2"] = nm_counters()["wg_server2"] - b["wg_server2"]
    r["status_switched"] = status()
    wq_checks(r, "b", NM_SERVER2, NM_DNS2)
    b, d0 = nm_counters(), drops("endpoint_not_vpn")
    r["b_ep_a_send"] = burst("vpn.slice", "10.99.0.2", 51820, NM_FROM_SCOPE, dev="vpn-uplink")
    r["b_ep_a"] = {"scope": nm_grew("ep_scope", b), "endpoint_not_vpn": drops("endpoint_not_vpn") - d0}

    # the Endpoint edited in place and applied without taking the tunnel down (wg syncconf)
    install_wq(servers["b"].replace(f"Endpoint = {NM_SERVER2}:51820", "Endpoint = 10.99.0.2:51820"))
    stripped = sh("wg-quick", "strip", "wg0")
    subprocess.run(["wg", "syncconf", "wg0", "/dev/stdin"], input=stripped, text=True, check=True)
    time.sleep(2)   # (then the tunnel's packets go to server A again, none to B)
    b, nb = counters(), nm_counters()
    time.sleep(3)
    r["syncconf_growth"] = {**{k: v - b[k] for k, v in counters().items()},
                            "wg_server2": nm_counters()["wg_server2"] - nb["wg_server2"]}
    r["status_syncconf"] = status()

    r["counters"] = counters()
    r["nm_counters"] = nm_counters()
    r["protected"] = sender("protected")
    r["journal"] = journal("ksbpf.service")[-4000:]
    return r


SCENARIOS = {"boot": scenario_boot, "raw": scenario_raw, "lab": scenario_lab, "each": scenario_each, "daemon": scenario_daemon, "escape": scenario_escape,
             "escape-rebooted": scenario_escape_rebooted, "node": scenario_node, "nm": scenario_nm,
             "wgquick": scenario_wgquick}


# the scenarios that judge ksbpf's units: a unit that failed because ksbpf refused this kernel explains them
UNIT_SCENARIOS = ("boot", "daemon", "node", "each")


def run_part(name: str) -> dict:
    t = time.monotonic()
    log(f"scenario {name}: waiting for the system to be running")
    part: dict = {"scenario": name, "kernel": os.uname().release}
    try:
        part.update(SCENARIOS[name]())
    except Exception as exc:  # reported to the host, which fails the test with it
        # a scenario that failed where ksbpf said this kernel lacks a feature (the host decides what that means)
        part["refusal"] = getattr(exc, "refusal", None) or refusal(journal("ksbpf.service")[-6000:],
                                                                   journal("ksbpf-early.service")[-3000:])
        part["error"] = f"{type(exc).__name__}: {exc}"
        part["traceback"] = traceback.format_exc()[-3000:]
        part["journal_ksbpf"] = journal("ksbpf.service")[-3000:] + journal("ksbpf-early.service")[-2000:]
        part["diagnostics"] = diagnostics()
        if getattr(exc, "partial", None):
            part["partial"] = exc.partial   # type: ignore[attr-defined]
    if not part.get("refusal") and name in UNIT_SCENARIOS:
        part["refusal"] = unit_refusal("ksbpf-early.service", "ksbpf.service")
    part["guest_seconds"] = round(time.monotonic() - t, 1)
    log(f"scenario {name}: done in {part['guest_seconds']} s")
    return part


def cmd_drive() -> None:
    """Run the scenarios named on the kernel command line (ksbpf.scenario=A+B: A, then B, in
    this one boot), each into its own part of the result."""
    m = re.search(r"\bksbpf\.scenario=(\S+)", open("/proc/cmdline").read())
    names = m[1].split("+") if m else ["?"]
    t = time.monotonic()
    result: dict = {"scenario": "+".join(names), "parts": {}}
    try:
        for name in names:
            result["parts"][name] = run_part(name)
        result["features"] = features()
        result["guest_seconds"] = round(time.monotonic() - t, 1)
        result["uptime_s"] = float(open("/proc/uptime").read().split()[0])
        with open(RESULTS_TTY, "w") as tty:
            tty.write("KSBPF-VM-RESULT " + json.dumps(result) + "\n")
    finally:
        then = result["parts"].get(names[-1], {}).get("then")
        subprocess.run(["systemctl", "reboot" if then == "reboot" else "poweroff", "--no-block"])


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "counters":
        cmd_counters()
    elif cmd == "send":
        cmd_send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "drive":
        cmd_drive()
    elif cmd == "node-setup":
        cmd_node_setup()
    else:
        sys.exit("usage: guest.py counters | send NAME UDP_PORT TCP_PORT | drive | node-setup")
