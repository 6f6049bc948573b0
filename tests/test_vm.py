"""The VM test (`make vm-test`; part of `make test`): the systemd units, boot-time
protection, node mode, a netns = "each" scope, the leak matrix, a
NetworkManager WireGuard connection and wg-quick's full tunnel in a booted Debian 12 guest, on real kernels: Debian 12's and Debian 13's own, and the
newest (pinned in tests/vm/kernels.py).

The guest image is built once into /var/cache/ksbpf-vm (keyed by its inputs)
by running vagrant/provision.sh -- the Vagrantfile's provisioning -- in a
chroot of a debootstrap'd tree that holds every kernel; each scenario boots it
afresh on a throw-away overlay with qemu (TCG, -nic none: no network device at
all), on one kernel (direct kernel boot).  The boots run a few at a time
(tests/vm/schedule.py: a guest keeps about one core busy); each test waits
for the boots it judges.  The guest
measures (tests/vm/guest.py) and this file judges.  Leaks are counted on the
far side of the guest's "physical" veth, and every "nothing arrives" is paired
with traffic that must arrive.

At the end: a table kernel x scenario (pass / not supported there and why /
FAIL), printed and written to build/vm-kernels.md (KSBPF_VM_TABLE).  "Not
supported" only where ksbpf itself refused, on one line, because the kernel
lacks a feature -- and never on the newest kernel, where everything must pass.
A boot that dies before userspace is retried once and said so in the table.

KSBPF_VM_KERNELS chooses the kernels (tests/vm/kernels.py): unset, the Debian
ones; `make vm-test-ubuntu` adds Ubuntu 22.04's and 24.04's GA kernels, from
archive.ubuntu.com (opt-in: CI cannot reach it).
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest
from vm.image import ensure_image
from vm.kernels import Kernel, selected
from vm.qemu import Boot, Guest
from vm.schedule import Job, Schedule, default_parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCOPE = "/sys/fs/cgroup/vpn.slice"
TABLE = os.environ.get("KSBPF_VM_TABLE", os.path.join(REPO, "build", "vm-kernels.md"))
pytestmark = [pytest.mark.root, pytest.mark.vm]
SCENARIOS = {   # column -> what it is; the newest kernel runs all, the others all but NEWEST_ONLY
    "lab": "leak matrix (verify --lab)", "boot": "boot-time protection", "daemon": "daemon under systemd",
    "escape": "escape hatch + reboot", "node": "node mode", "each": 'netns = "each" scope',
    "raw": "no raw sockets past the policy (BPF LSM: scope and node)",
    "nm": "NetworkManager: nmcli up/down, server switch, endpoints/dns auto + vpn_mark",
    "wgquick": "wg-quick: kernel WireGuard full tunnel, up/down, server switch, endpoints/dns auto + vpn_mark"}
NEWEST_ONLY = {"escape": "not run here (newest kernel only, for CI time: no kernel feature involved)",
               "wgquick": "not run here (newest kernel only, for CI time: scenario nm runs kernel WireGuard with "
                          "its fwmark, endpoints/dns auto and vpn_mark on every kernel)"}
CELLS: dict[tuple[str, str], str] = {}
KERNELS = selected()   # KSBPF_VM_KERNELS


class Unsupported(Exception):
    pass


@contextlib.contextmanager
def cell(kernel: Kernel, scenario: str):
    """Record the outcome of one table cell; a refusal is a skip, never a pass."""
    notes: list[str] = []
    try:
        yield notes
    except Unsupported as exc:
        CELLS[(kernel.name, scenario)] = f"not supported: {exc}"
        pytest.skip(f"{kernel.name}: not supported: {exc}")
    except BaseException as exc:
        if isinstance(exc, pytest.skip.Exception):
            CELLS[(kernel.name, scenario)] = f"not run: {exc}"
        else:
            CELLS[(kernel.name, scenario)] = "FAIL: " + (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise
    else:
        CELLS[(kernel.name, scenario)] = "pass" + "".join(f" ({n})" for n in notes)


def render_table() -> str:
    lines = ["| kernel | " + " | ".join(SCENARIOS[s] for s in SCENARIOS) + " |",
             "|---" * (len(SCENARIOS) + 1) + "|"]
    for k in reversed(KERNELS):   # oldest first
        row = [CELLS.get((k.name, s), "not run") for s in SCENARIOS]
        lines.append(f"| {k.label}: `{k.package}` {k.version} | " + " | ".join(r.replace("|", "/") for r in row) + " |")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def say(pytestconfig):
    """Print a line now, through pytest's capture (the time of each slow step)."""
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def write(msg: str) -> None:
        with capture.global_and_fixture_disabled():   # else it is shown only when a test fails
            reporter.write_line(f"[vm] {msg}")
    return write


@pytest.fixture(scope="module", autouse=True)
def table(say):
    """The kernels pinned (printed first), and the table kernel x scenario (printed last, and written)."""
    for k in KERNELS:
        say(f"kernel {k.name}: {k}")
    start = time.monotonic()
    yield
    text = render_table()
    say(f"kernel x scenario ({time.monotonic() - start:.0f} s in all):")
    for line in text.splitlines():
        say(line)
    os.makedirs(os.path.dirname(TABLE), exist_ok=True)
    with open(TABLE, "w") as f:
        f.write(text)
    say(f"table written to {TABLE}")


@pytest.fixture(scope="module")
def image(say):
    img = ensure_image(REPO, log=say, chosen=KERNELS)
    say(f"image {img.key}: {'built' if img.built else 'from the cache'} in {img.seconds:.0f} s ({img.directory})")
    return img


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("vm"))


@pytest.fixture(scope="module", params=KERNELS, ids=[k.name for k in KERNELS])
def kernel(request) -> Kernel:
    return request.param


# The guests' boots, run by a Schedule (tests/vm/schedule.py) a few at a time: job -> (the boots of
# its guest, in sequence: (scenario, timeout s)), the seconds one took on this machine (which chains
# start first), the job whose machine it boots again (None: a machine that never booted), the tests
# that judge it.
JOBS = {
    # scenarios 1 and 2 in one boot: the machine's very first boot (boot-time protection), then the
    # daemon under systemd.  The jobs "escape" and "labeach" boot this machine again (on overlays of its
    # disk): the program compiled at its first boot is in its cache, which saves each of them bcc's
    # ~1.5 min of compiling under emulation.
    "boot": ((("boot+daemon", 900),), 240, None,
             ("test_boot_protects_before_the_network", "test_daemon_under_systemd")),
    "escape": ((("escape", 900), ("escape-rebooted", 900)), 230, "boot",
               ("test_escape_hatch_and_reboot_leave_nothing",)),
    "node": ((("node", 900),), 190, None, ("test_node_mode_blocks_forwarded_traffic_from_the_first_boot",)),
    # scenarios 5-7 in one boot: on kernels without the BPF LSM (Ubuntu's) scenario 7 took 433 s in the
    # guest on a loaded machine (node mode's compile), after the leak matrix's 200-380 s
    "labeach": ((("lab+each+raw", 1500),), 480, "boot",
                ("test_leak_matrix", "test_netns_each_scope", "test_raw_sockets_refused_in_a_scope")),
    # (two compiles under emulation in each: the first boot's policy, then the VPN client's configuration's)
    "nm": ((("nm", 1800),), 620, None, ("test_networkmanager_connection",)),
    "wgquick": ((("wgquick", 1800),), 650, None, ("test_wg_quick_full_tunnel",)),
}


def not_run(kernel: Kernel, scenario: str) -> str | None:
    """Why this kernel's cell is left out of this run, or None."""
    return NEWEST_ONLY[scenario] if scenario in NEWEST_ONLY and not kernel.strict else None


def wanted_jobs(items) -> set[tuple[str, str]]:
    """(kernel, job) of the VM tests selected in this session (-k and the like), but the cells not run."""
    tests = {t: job for job, (_, _, _, names) in JOBS.items() for t in names}
    out = set()
    for item in items:
        name = getattr(item, "originalname", item.name)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if name in tests and "kernel" in params:
            k, job = params["kernel"], tests[name]
            if not_run(k, job):   # a job of a cell this kernel leaves out (NEWEST_ONLY: job and cell share a name)
                continue
            out.add((k.name, job))
    return out


@pytest.fixture(scope="module")
def schedule(request, image, workdir, say):
    """Every boot the selected tests need, started now, `KSBPF_VM_PARALLEL` at a time (default: the
    host's cores, at most 3); the overlays are removed at the end (the serial logs stay)."""
    wanted = wanted_jobs(request.session.items)
    s = Schedule(default_parallel())
    made: list[Guest] = []

    def add(k: Kernel, name: str) -> Job:
        if (k.name, name) in s.jobs:
            return s.jobs[(k.name, name)]
        boots, estimate, parent, _ = JOBS[name]
        after = add(k, parent) if parent else None

        def make(prev: Guest | None) -> Guest:
            made.append(Guest(image, workdir, f"{k.name}-{name}", k, prev))
            return made[-1]
        return s.add(Job((k.name, name), make, boots, estimate, after))
    for k in KERNELS:
        for name in JOBS:
            if (k.name, name) in wanted:
                add(k, name)
    say(f"{len(s.jobs)} guests to boot, {s.parallel} at a time (KSBPF_VM_PARALLEL)")
    s.start()
    try:
        yield s
    finally:
        s.stop()
        for g in made:
            g.kill()
        s.join()
        for g in made:
            with contextlib.suppress(OSError):
                os.unlink(g.disk)


def boots(schedule: Schedule, kernel: Kernel, job: str, say) -> tuple[Guest, list[Boot]]:
    """The job's guest and boots (done), each said with its time."""
    g, bs = schedule.result((kernel.name, job), say)
    job_obj = schedule.jobs[(kernel.name, job)]
    for b in bs:
        if not getattr(b, "said", False):
            b.said = True
            say(f"{kernel.name} boot {b.scenario}: {b.seconds:.0f} s (boot, scenarios, power-off; started at "
                f"+{job_obj.started - schedule.origin:.0f} s; logs {b.console})")
    return g, bs


@pytest.fixture(scope="module")
def first_boot(schedule, say, kernel):
    """Scenarios 1 and 2: the machine's first boot (JOBS["boot"])."""
    g, (b,) = boots(schedule, kernel, "boot", say)
    return g, b


@pytest.fixture(scope="module")
def lab_and_each(schedule, say, kernel):
    """Scenarios 5, 6 and 7 in one later boot of the first machine."""
    g, (b,) = boots(schedule, kernel, "labeach", say)
    return g, b


def run(g: Guest, scenario: str, say, label: str, notes: list[str], b: Boot, running: bool = True) -> dict:
    """The result of `scenario` in boot b of guest g, judged for what every scenario needs."""
    k = g.kernel
    if b.retried:
        say(f"{k.name} {label}: {b.retried}")
        notes.append(b.retried.split(" (console:")[0])
    assert b.died is None, f"the guest died before userspace twice on {k.release}: {b.retried}; then: {b.died}"
    assert not b.timed_out, f"the guest did not finish {scenario} in time\n{b.tail()}"
    assert b.result is not None, f"no result from the guest\n{b.tail()}"
    r = b.result["parts"].get(scenario)
    assert r is not None, f"the guest did not run {scenario}: {b.result}\n{b.tail()}"
    r["features"] = b.result.get("features", "")
    assert r.get("kernel") == k.release, f"booted {r.get('kernel')}, not {k.release}"
    if r["features"]:
        say(f"{k.name} {label}: ksbpf on this kernel: {r['features']}")
    if r.get("refusal") and not k.strict:
        raise Unsupported(r["refusal"])
    assert "error" not in r, f"{r['error']}\n{r.get('traceback', '')}\n{r.get('journal_ksbpf', '')}\n{b.tail(2000)}"
    if running:
        assert r["system"] == "running", f"guest state {r['system']}: {r.get('failed_units')}"
        assert r["wireguard_module"] and r["wg0_kind"] == "wireguard", "kernel WireGuard is not what carries wg0"
    return r


def progs(items: list[dict]) -> list[int]:
    return sorted(p["id"] for p in items)


def test_boot_protects_before_the_network(kernel, first_boot, say):
    """Scenario 1: from the first boot, the protected slice sends UDP and TCP
    before the network exists; nothing arrives over the physical link, the
    control does, and once wg-quick brings the tunnel up the same traffic
    passes through it."""
    with cell(kernel, "boot") as notes:
        _boot(first_boot, say, notes)


def _boot(first_boot, say, notes):
    r = run(first_boot[0], "boot", say, "scenario 1 (boot-time protection, first boot)", notes, first_boot[1])
    say(f"{first_boot[0].kernel.name} scenario 1: {r['guest_seconds']} s in the guest")
    t = r["times"]
    early, sender = t["ksbpf-early.service"], r["protected"]
    link_made = t["ksbpf-demo-peer.service"]["InactiveExitTimestampMonotonic"]
    assert r["units"]["ksbpf-early.service"]["Result"] == "success", r["journal_early"]
    assert 0 < early["ExecMainExitTimestampMonotonic"] <= t["ksbpf-vmtest-protected.service"]["ExecMainStartTimestampMonotonic"]
    assert 0 < sender["first_send_mono"] <= t["network-pre.target"]["ActiveEnterTimestampMonotonic"] <= link_made, t
    assert link_made < t["wg-quick@wg0.service"]["ActiveEnterTimestampMonotonic"], t

    c, g = r["counters"], r["growth"]
    assert c["leak_udp"] == 0 and c["leak_tcp"] == 0, f"protected traffic arrived over the physical link: {c}"
    assert c["control_udp"] > 0 and c["control_tcp"] > 0, f"the control never arrived: {c}"
    assert g["tunnel_udp"] > 0 and g["tunnel_tcp"] > 0, g   # (the control now goes through the tunnel too)
    assert g["leak_udp"] == 0 and g["leak_tcp"] == 0, g
    assert sender["udp_err"].get("EPERM", 0) > 0, f"no send was refused before the tunnel: {sender}"
    # nothing listens on the far side: a refused connection is a round trip through the tunnel
    assert sender["tcp_err"].get("ECONNREFUSED", 0) > 0, f"no TCP answer through the tunnel: {sender}"

    scope = next(s for s in r["status"]["scopes"] if s["cgroup"] == SCOPE)
    assert scope["attached"] and scope["counters"]["not_tunnel"]["packets"] > 0, scope
    assert scope["counters"]["tunnel"]["packets"] > 0, scope
    assert set(r["exposure"]) == {"ksbpf.service", "ksbpf-early.service"}, r["exposure"]
    assert all(score <= 4.0 for score in r["exposure"].values()), r["exposure"]
    modes = r["pin_modes"]   # path -> mode of everything under /sys/fs/bpf/ksbpf
    assert modes.get("/sys/fs/bpf/ksbpf") == "0o700", modes
    scope_dirs = [p for p in modes if os.path.basename(p).isdigit()]
    assert scope_dirs and all(modes[p] == "0o700" for p in scope_dirs), modes
    pinned = [p for p in modes if os.path.dirname(p) in scope_dirs]
    assert pinned and all(int(modes[p], 8) & 0o077 == 0 for p in pinned), modes


def test_daemon_under_systemd(kernel, first_boot, say):
    """Scenario 2: wg-quick down/up, kill -9 (Restart=always adopts), reload
    with a changed configuration, stop: never a leak, traffic resumes."""
    with cell(kernel, "daemon") as notes:
        _daemon(first_boot, say, notes)


def _daemon(first_boot, say, notes):
    r = run(first_boot[0], "daemon", say, "scenario 2 (daemon under systemd)", notes, first_boot[1])
    say(f"{first_boot[0].kernel.name} scenario 2: {r['guest_seconds']} s in the guest")
    c = r["counters"]
    assert c["leak_udp"] == 0 and c["leak_tcp"] == 0, f"a leak at some point of the scenario: {c}"
    assert all(s < 15 for s in r["flap_resume_s"]), r["flap_resume_s"]

    rs = r["restart"]
    assert progs(rs["progs_before"]) and progs(r["progs_while_killed"]) == progs(rs["progs_before"])
    assert r["growth_while_killed"] == {"leak_udp": 0, "leak_tcp": 0}
    assert int(rs["after"]["NRestarts"]) >= 1 and rs["after"]["MainPID"] != rs["before"]["MainPID"], rs
    assert progs(rs["progs_after"]) == progs(rs["progs_before"]), "the restarted daemon re-attached instead of adopting"
    assert "scope_adopted" in r["journal"], r["journal"]
    assert r["resume_after_restart_s"] < 15

    rl = r["after_reload"]
    scope = next(s for s in rl["status"]["scopes"] if s["cgroup"] == SCOPE)
    assert [t["name"] for t in scope["tunnels"]] == ["wg0", "wg1"], scope["tunnels"]
    # the egress program (where socket storage records namespaces, the scope's sock_create program is there too)
    egress = [p for p in rl["progs"] if p.get("attach_type") == "cgroup_inet_egress"]
    egress_before = [p for p in rs["progs_after"] if p.get("attach_type") == "cgroup_inet_egress"]
    assert len(egress) == 1 and progs(egress) != progs(egress_before), f"reload did not replace the program: {rl['progs']}"
    assert rl["growth"]["tunnel_udp"] > 0 and rl["growth"]["leak_udp"] == 0, rl["growth"]

    st = r["after_stop"]
    assert st["unit"]["ActiveState"] == "inactive", st["unit"]
    assert progs(st["progs"]) == progs(rl["progs"]), "stopping the daemon detached the program"
    assert st["growth"]["leak_udp"] == 0 and st["growth"]["leak_tcp"] == 0 and st["growth"]["tunnel_udp"] == 0, st
    assert st["protected"]["udp_err"].get("EPERM", 0) > 0


def test_escape_hatch_and_reboot_leave_nothing(kernel, schedule, say):
    """Scenario 3: disable the units, detach --all, reboot: traffic flows
    (outside the tunnel too) and nothing of ksbpf is left.  On the newest
    kernel only (it exercises no kernel feature the others do not)."""
    with cell(kernel, "escape") as notes:
        if not_run(kernel, "escape"):
            pytest.skip(not_run(kernel, "escape"))
        _escape(schedule, kernel, say, notes)


def _escape(schedule, kernel, say, notes):
    g, bs = boots(schedule, kernel, "escape", say)
    r = run(g, "escape", say, "scenario 3 (escape hatch), first boot", notes, bs[0])
    assert r["progs_before"], "nothing was enforced before the escape hatch"
    assert r["escape"]["rc"] == 0, r["escape"]
    assert r["progs_after"] == [] and not r["pins_left"], r
    assert len(bs) == 2, "the guest did not boot again after the escape hatch"
    r = run(g, "escape-rebooted", say, "scenario 3 (escape hatch), after the reboot", notes, bs[1])
    for unit, state in r["units"].items():
        assert state["UnitFileState"] == "disabled" and state["ActiveState"] == "inactive", (unit, state)
    assert not r["pins_left"] and r["progs"] == [] and r["all_ksbpf_progs"] == [], r
    grown = r["growth_without_tunnel"]
    assert grown["leak_udp"] > 0 and grown["leak_tcp"] > 0, f"without ksbpf the traffic should flow: {grown}"


def test_node_mode_blocks_forwarded_traffic_from_the_first_boot(kernel, schedule, say):
    """Scenario 4: with a [node] table, the first boot guards the physical link
    (present at boot like a NIC, configured after network-pre): forwarded
    traffic from a container namespace, sent from before the network exists,
    never arrives over it; the tunnel's own handshake does, and once wg-quick
    brings the tunnel up the container's traffic passes through it.  tcx where
    the kernel has it, clsact where not."""
    with cell(kernel, "node") as notes:
        _node(schedule, kernel, say, notes)


def _node(schedule, kernel, say, notes):
    g, (b,) = boots(schedule, kernel, "node", say)
    r = run(g, "node", say, "scenario 4 (node mode, first boot)", notes, b)
    t = r["times"]
    assert r["units"]["ksbpf-early.service"]["Result"] == "success", r["journal_early"]
    assert 0 < t["ksbpf-early.service"]["ExecMainExitTimestampMonotonic"] \
        <= t["ksbpf-vmtest-ctr.service"]["ExecMainStartTimestampMonotonic"]
    assert 0 < r["ctr"]["first_send_mono"] <= t["network-pre.target"]["ActiveEnterTimestampMonotonic"] \
        <= t["ksbpf-demo-peer.service"]["InactiveExitTimestampMonotonic"], t
    c, g = r["counters"], r["growth"]
    assert c["node_leak_udp"] == 0 and c["node_leak_tcp"] == 0, f"forwarded traffic leaked over the physical link: {c}"
    assert c["wireguard"] > 0, f"nothing at all arrived over the physical link: {c}"
    assert g["node_tunnel_udp"] > 0 and g["node_tunnel_tcp"] > 0 and g["node_leak_udp"] == 0, g
    assert r["ctr"]["udp_ok"] > 0, r["ctr"]
    nodes = r["status"]["nodes"]
    assert len(nodes) == 1 and nodes[0]["attached"], r["status"]
    ifaces = {i["name"]: i for i in nodes[0]["interfaces"]}
    assert ifaces["vpn-uplink"]["guarded"] and ifaces["vpn-uplink"]["role"] == "guarded", ifaces
    assert ifaces["veth-ctr"]["role"] == "internal" and ifaces["wg0"]["role"] == "tunnel", ifaces
    notes.append(nodes[0].get("tc_mode", "?"))


def test_leak_matrix(kernel, lab_and_each, say):
    """Scenario 5: `ksbpf verify --lab` -- the leak matrix with real packets and
    a control per cell -- on this kernel: no vector leaks, every control arrives."""
    with cell(kernel, "lab") as notes:
        r = run(lab_and_each[0], "lab", say, "scenario 5 (leak matrix)", notes, lab_and_each[1], running=False)
        say(f"{kernel.name} leak matrix: {r['lab_seconds']} s in the guest")
        out = r["lab"]
        assert out is not None, f"verify --lab printed no JSON (exit {r['lab_rc']}): {r['lab_stderr']}\n{r.get('lab_stdout')}"
        bad = [c for c in out["cells"] if not (c["leaked"] == 0 and c["control"] > 0 and c["verdict"] == "ok")]
        assert not bad and out["ok"] and r["lab_rc"] == 0, f"cells that failed: {bad}\n{r['lab_stderr']}"
        assert len(out["cells"]) >= 18, [c["vector"] for c in out["cells"]]
        if "bpf_lsm_cgroup yes" in r["features"]:   # a root sender of the scope, its AF_PACKET socket refused
            assert "AF_PACKET with CAP_NET_RAW" in [c["vector"] for c in out["cells"]], out["cells"]


def test_netns_each_scope(kernel, lab_and_each, say):
    """Scenario 6: a container-like scope with netns = "each" (added to the
    configuration, systemctl reload): its process lives in its own network
    namespace; without a tunnel there nothing of it leaves over the physical
    link while a control from the same namespace does; with that namespace's
    own wg0 its traffic passes through it."""
    with cell(kernel, "each") as notes:
        r = run(lab_and_each[0], "each", say, 'scenario 6 (netns = "each")', notes, lab_and_each[1])
        g0, g1 = r["growth_without_tunnel"], r["growth_with_tunnel"]
        assert g0["each_control_udp"] > 0, f"the control from the container namespace never arrived: {g0}"
        assert g0["each_leak_udp"] == 0 and g0["each_leak_tcp"] == 0, f"the container's traffic leaked: {g0}"
        assert r["sender_without_tunnel"]["udp_err"].get("EPERM", 0) > 0, r["sender_without_tunnel"]
        assert g1["each_tunnel_udp"] > 0 and g1["each_tunnel_tcp"] > 0, g1
        assert g1["each_leak_udp"] == 0 and g1["each_leak_tcp"] == 0, g1
        assert r["counters"]["each_leak_udp"] == 0 and r["counters"]["each_leak_tcp"] == 0, r["counters"]
        scope = next(s for s in r["status"]["scopes"] if s["cgroup"] == "/sys/fs/cgroup/ctr.slice")
        assert scope["counters"]["not_tunnel"]["packets"] > 0 and scope["counters"]["tunnel"]["packets"] > 0, scope


def test_raw_sockets_refused_in_a_scope(kernel, lab_and_each, say):
    """Scenario 7: where the kernel runs BPF LSM programs (Debian's kernels do:
    `bpf` is in their default LSM list), a root process of the protected
    slice, holding CAP_NET_RAW, cannot make an AF_PACKET socket (SOCK_PACKET
    included) or an AF_XDP socket -- whose frames would pass no cgroup hook --
    while the same process outside the slice can (the control).  And node mode's
    counterpart: `ksbpf attach --node` in a namespace of its own refuses
    PACKET_QDISC_BYPASS and AF_XDP binds (the two raw paths that never reach a
    tc guard) to a root process there, not to one of the exempt cgroup nor to
    one of another namespace (the controls), and no more after detach."""
    with cell(kernel, "raw") as notes:
        r = run(lab_and_each[0], "raw", say, "scenario 7 (raw sockets)", notes, lab_and_each[1])
        if "bpf_lsm_cgroup yes" not in r["features"]:
            line = next((f for f in r["features"].split("; ") if f.startswith("bpf_lsm_cgroup")), r["features"])
            if kernel.strict:
                raise AssertionError(f"the newest kernel must run the raw-socket LSM program: {line}")
            raise Unsupported(line)
        inside, outside = r["raw_in_scope"], r["raw_outside"]
        assert outside == {"packet": "ok", "packet_dgram": "ok", "sock_packet": "ok", "xdp": "ok"}, \
            f"the control (outside the scope) could not make raw sockets: {outside}"
        assert inside == {"packet": "EPERM", "packet_dgram": "EPERM", "sock_packet": "EPERM", "xdp": "EPERM"}, \
            f"a raw socket was made inside the scope: {inside}"
        scope = next(s for s in r["status"]["scopes"] if s["cgroup"] == SCOPE)
        assert scope["raw_sockets"] == "refused", scope
        # node mode: PACKET_QDISC_BYPASS and AF_XDP binds, the raw paths that skip the tc guards
        assert "bpf_lsm_mac yes" in r["features"], r["features"]   # the kernel ran the cgroup program above
        ok = {"qdisc_bypass": "ok", "xdp_bind": "ok"}
        assert r["node_attach_rc"] == 0, r["node_attach_err"]
        assert r["node_attach"].get("raw_sockets") == "refused", r["node_attach"]
        assert r["node_raw_before"] == ok, f"the control before attaching failed: {r['node_raw_before']}"
        assert r["node_raw_exempt"] == ok, f"the exempt cgroup was refused: {r['node_raw_exempt']}"
        assert r["node_raw_other_ns"] == ok, f"another namespace was refused: {r['node_raw_other_ns']}"
        assert r["node_raw_inside"] == {"qdisc_bypass": "EPERM", "xdp_bind": "EPERM"}, \
            f"a raw path past the tc guards was open in the guarded namespace: {r['node_raw_inside']}"
        assert r["node_raw_status"] == ["refused"], r["node_raw_status"]
        assert r["node_raw_detached"] == ok, f"detach left the programs behind: {r['node_raw_detached']}"
        notes.append("node mode: PACKET_QDISC_BYPASS and AF_XDP binds refused")


def assert_down_blocks(r: dict, what: str) -> None:
    """While the VPN's `what` was down: nothing of the slice leaked, the control arrived, the slice's
    sends were refused (the guest's down_growth and the sender's errors before and after)."""
    g = r["down_growth"]
    assert g["leak_udp"] == 0 and g["leak_tcp"] == 0, f"traffic of the slice leaked with the {what} down: {g}"
    assert g["control_udp"] > 0 and g["control_tcp"] > 0, f"the control did not arrive while down: {g}"
    assert g["tunnel_udp"] == 0, g
    refused = r["down_sender"]["udp_err"].get("EPERM", 0) - r["before_down_sender"]["udp_err"].get("EPERM", 0)
    assert refused > 0, f"no send of the slice was refused while the {what} was down: {r['down_sender']}"


def test_networkmanager_connection(kernel, schedule, say):
    """Scenario 8: NetworkManager's WireGuard connection, imported from a wg-quick
    file and brought up and down with nmcli; ksbpf runs the shipped example
    configuration (deploy/networkmanager/ksbpf.toml: endpoints auto, vpn_mark, dns
    auto -- no address typed) and the shipped dispatcher script.  Down: nothing of
    the slice leaves (the control does); up: it flows again; a server switch keeps
    it flowing -- a second connection (another server's wg-quick file, another
    resolver) brought up after the first is brought down; the slice cannot reach
    either server outside the tunnel (the control can); DNS only to the active
    connection's resolver, and to its new one once the connection's DNS changes."""
    with cell(kernel, "nm") as notes:
        if not_run(kernel, "nm"):
            pytest.skip(not_run(kernel, "nm"))
        _nm(schedule, kernel, say, notes)


def _nm(schedule, kernel, say, notes):
    g, (b,) = boots(schedule, kernel, "nm", say)
    r = run(g, "nm", say, "scenario 8 (NetworkManager)", notes, b)
    say(f"{r['kernel']} scenario 8: reload {r['reload_s']} s, traffic after up {r['up_s']} s, after down/up "
        f"{r['up_again_s']} s, after the server switch {r['switch_s']} s (its resolver in {r['switch_dns_s']} s), "
        f"dns followed in {r['dns_follow_s']} s; nmcli editing a peer: {r['nmcli_modify_peer']}")
    assert r["wg_fwmark"] == "0xca6c", (r["nm_fwmark"], r["wg_fwmark"])   # the mark vpn_mark names
    assert "10.200.0.1" in r["nmcli_device_dns"], r["nmcli_device_dns"]
    # the scope followed the tunnel: its endpoint read from NetworkManager's interface, not typed
    scope = next(s for s in r["status_up"]["scopes"] if s["cgroup"] == SCOPE)
    assert [t["name"] for t in scope["tunnels"]] == ["wg-home"], scope["tunnels"]
    assert "10.99.0.2" in str(scope["followed"]), scope["followed"]
    assert scope["dns"]["resolvers"] == ["10.200.0.1"], scope["dns"]   # dns auto: NetworkManager's resolver
    if r.get("route_metric_set"):
        notes.append("ipv4.route-metric 50 set: NetworkManager's route was not preferred")
    # vpn_mark: the slice's datagrams to the endpoint never arrive; the control's do
    assert r["ep"]["control"] > 0, f"the control never reached the endpoint: {r['ep']}"
    assert r["ep"]["scope"] == 0, f"the slice reached the VPN server outside the tunnel: {r['ep']} ({r['ep_scope_send']})"
    # DNS: to the connection's resolver through the tunnel; a query to another resolver never reaches it
    d = r["dns"]
    assert d["dns_vpn"] > 0, f"DNS to the connection's resolver did not arrive: {d} {r['dns_vpn_send']}"
    assert d["dns_other_control"] > 0, f"the control's DNS to another resolver did not arrive: {d}"
    assert d["dns_other_scope"] == 0 and d["dns_leak"] == 0, f"DNS of the slice reached another resolver: {d}"
    # down: nothing leaks, the control arrives, the slice is refused; up: flows again
    assert_down_blocks(r, "connection")
    # the server switch through NetworkManager (down wg-home, up wg-home-2: another server, another resolver):
    # the new server is reached, traffic flows through the tunnel again, no ksbpf edit
    assert r["switch_active"] == "wg-home-2", r["switch_active"]
    assert "10.99.0.3:51820" in r["switch_wg_endpoints"], r["switch_wg_endpoints"]
    assert r["wg_server2"] > 0, "the tunnel never reached the second server"
    assert r["switch_growth"]["tunnel_udp"] > 0 and r["switch_growth"]["tunnel_tcp"] > 0, r["switch_growth"]
    assert r["switch_growth"]["leak_udp"] == 0 and r["switch_growth"]["leak_tcp"] == 0, r["switch_growth"]
    scope = next(s for s in r["status_switched"]["scopes"] if s["cgroup"] == SCOPE)
    assert "10.99.0.3" in str(scope["followed"]) and "10.99.0.2" not in str(scope["followed"]), scope["followed"]
    assert scope["dns"]["resolvers"] == ["10.200.0.53"], scope["dns"]   # the new connection's resolver
    # neither server reachable by the slice outside the tunnel; DNS not to the old resolver nor another
    assert r["ep2"]["control"] > 0, f"the control never reached the second server: {r['ep2']}"
    assert r["ep2"]["scope"] == 0, f"the slice reached a VPN server outside the tunnel: {r['ep2']} " \
                                   f"({r['ep2_scope_send']}, {r['ep1_scope_send']})"
    d = r["dns2"]
    assert d["dns_vpn"] == 0 and d["dns_other_scope"] == 0 and d["dns_leak"] == 0, \
        f"DNS of the slice reached a resolver not the connection's after the switch: {d}"
    # the connection's DNS changed: the dispatcher script had the daemon re-read it
    assert "reloading ksbpf.service" in r["dispatcher_log"], r["dispatcher_log"]
    scope = next(s for s in r["status_dns_changed"]["scopes"] if s["cgroup"] == SCOPE)
    assert scope["dns"]["resolvers"] == ["10.200.0.1"], scope["dns"]
    c = r["counters"]
    assert c["leak_udp"] == 0 and c["leak_tcp"] == 0, f"a leak at some point of the scenario: {c}"


def test_wg_quick_full_tunnel(kernel, schedule, say):
    """Scenario 9: wg-quick brings up kernel WireGuard from a provider's file with a
    full tunnel (wg-quick marks its packets 51820 and routes the rest into the tunnel)
    and a DNS = line (openresolv's resolvconf); ksbpf runs README's wg-quick recipe
    (endpoints auto, vpn_mark 51820, dns auto -- no address typed).  Up: the slice's
    traffic goes through the tunnel; down: nothing of it leaves (the control does); up
    again: it flows; a server switch (down, the other server's file, up) and an Endpoint
    edited and applied with `wg syncconf`: the tunnel works with the new server, no
    ksbpf edit; a process of the slice bound to the physical link never reaches the
    endpoint (the control does); DNS of the slice is answered only by the file's
    resolver, and follows the switch."""
    with cell(kernel, "wgquick") as notes:
        if not_run(kernel, "wgquick"):
            pytest.skip(not_run(kernel, "wgquick"))
        _wgquick(schedule, kernel, say, notes)


def _wgquick(schedule, kernel, say, notes):
    g, (b,) = boots(schedule, kernel, "wgquick", say)
    r = run(g, "wgquick", say, "scenario 9 (wg-quick)", notes, b)
    say(f"{r['kernel']} scenario 9: reload {r['reload_s']} s, traffic after up {r['up_s']} s, after down/up "
        f"{r['up_again_s']} s, after the server switch {r['switch_s']} s, dns followed in {r['dns_follow_s']} s")
    assert r["wg_fwmark"] == "0xca6c", (r["wg_fwmark"], r["wg_quick_up"])   # wg-quick's own mark: vpn_mark 51820
    assert "not from all fwmark 0xca6c lookup 51820" in r["ip_rules"], r["ip_rules"]   # a full tunnel
    assert "nameserver 10.200.0.1" in r["resolv_conf"], (r["resolv_conf"], r["wg_quick_up"])   # resolvconf ran
    scope = next(s for s in r["status_up"]["scopes"] if s["cgroup"] == SCOPE)
    assert [t["name"] for t in scope["tunnels"]] == ["wg0"], scope["tunnels"]
    assert "10.99.0.2" in str(scope["followed"]), scope["followed"]   # endpoints auto: read from wg0
    assert scope["vpn_mark"] == "0xca6c", scope
    assert scope["dns"]["resolvers"] == ["10.200.0.1"], scope["dns"]   # dns auto: the file's DNS =
    g = r["up_growth"]
    assert g["tunnel_udp"] > 0 and g["tunnel_tcp"] > 0 and g["leak_udp"] == 0 and g["leak_tcp"] == 0, g
    for tag, endpoint, resolver in (("a", "10.99.0.2", "10.200.0.1"), ("b", "10.99.0.3", "10.200.0.53")):
        ep = r[f"{tag}_ep"]
        assert ep["control"] > 0, f"server {tag}: the control never reached the endpoint {endpoint}: {ep}"
        assert ep["scope"] == 0, f"server {tag}: the slice reached {endpoint} outside the tunnel: {ep} " \
                                 f"(sent: {r[f'{tag}_ep_scope_send']})"
        assert ep["endpoint_not_vpn"] > 0, f"server {tag}: no endpoint_not_vpn drop counted: {ep}"
        # DNS: the file's resolver answers the slice, through the tunnel; another resolver never does
        dv, do, dc, d = r[f"{tag}_dns_vpn"], r[f"{tag}_dns_other"], r[f"{tag}_dns_control"], r[f"{tag}_dns"]
        assert dv["answers"] and set(dv["answers"]) == {f"ANSWER {resolver}"}, f"server {tag}: {dv}"
        assert set(do["answers"]) <= {f"ANSWER {resolver}"}, f"server {tag}: another resolver answered the slice: {do}"
        assert dc["answers"] and set(dc["answers"]) == {"ANSWER 198.51.100.7"}, f"server {tag}: the control: {dc}"
        assert d["dns_other_scope"] == 0 and d["dns_leak"] == 0, f"server {tag}: DNS of the slice reached another: {d}"
        assert d["dns_other_control"] > 0, d
    # down: nothing leaks, the control arrives, the slice is refused; up: flows again
    assert_down_blocks(r, "tunnel")
    # the server switch: server B reached, the tunnel carries the slice's traffic, the endpoint followed
    assert r["wg_server2"] > 0, "the tunnel never reached server B"
    g = r["switch_growth"]
    assert g["tunnel_udp"] > 0 and g["tunnel_tcp"] > 0 and g["leak_udp"] == 0, g
    scope = next(s for s in r["status_switched"]["scopes"] if s["cgroup"] == SCOPE)
    assert "10.99.0.3" in str(scope["followed"]) and "10.99.0.2" not in str(scope["followed"]), scope["followed"]
    assert scope["dns"]["resolvers"] == ["10.200.0.53"], scope["dns"]
    assert r["b_ep_a"]["scope"] == 0, r["b_ep_a"]   # nor the old server
    # wg syncconf back to server A's address: the tunnel's packets go there, traffic flows
    g = r["syncconf_growth"]
    assert g["wireguard"] > 0 and g["wg_server2"] == 0, g
    assert g["tunnel_udp"] > 0 and g["leak_udp"] == 0 and g["leak_tcp"] == 0, g
    scope = next(s for s in r["status_syncconf"]["scopes"] if s["cgroup"] == SCOPE)
    assert "10.99.0.2" in str(scope["followed"]), scope["followed"]
    c = r["counters"]
    assert c["leak_udp"] == 0 and c["leak_tcp"] == 0, f"a leak at some point of the scenario: {c}"
