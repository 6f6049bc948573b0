"""/metrics for the daemon, fast with many scopes (1,000 pods: one scrape
well under 0.1 s).

The one-shot collector (metrics.KsbpfCollector) reads every scope from its
pins: it opens every map, dumps every namespace's links and renders through
prometheus_client -- ~1 s for 1,000 scopes.  The daemon knows more: it
already follows each namespace's links through netlink, and its scopes do
not change between scrapes.  So a Scraper keeps, per scope, the few maps a
scrape reads open (counters, bucket, tunnels) with the label text
precomputed, and the scope's cgroup; reads the per-CPU counters and the
tunnels map each in one batched system call (with the GIL held: see
libbpf._held) and asks the cgroup for its programs -- three system calls a
scope; takes the tunnels' links from the daemon's namespaces; and writes
the exposition text itself.  A scope the daemon does not own (attached by
hand) and node scopes are read the one-shot way.  The output is the
collector's, sample for sample (tests/test_scrape.py compares them), except
that a pod's scope is named by its pod (scope="pod/NAMESPACE/NAME",
namespace, pod), never by its cgroup.

Counters are written only once they are not zero (a thousand pods would
otherwise make 10 MB of zeros); gauges (attached, tunnel up) always.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Iterable

from ksbpf.errors import KsbpfError
from ksbpf.kernel import bpf, features, libbpf, pins
from ksbpf.observability.families import KERNEL_FEATURE_HELP, ksbpf_version, verify_text
from ksbpf.reasons import FAMILY_MAX, Family, Hook, Reason
from ksbpf.scopes import cgroups, node

_COUNTER = struct.Struct("=QQ")
_BUCKET = struct.Struct("=QQQQ")
_U32 = struct.Struct("=I")
_TUNNEL_KEY = struct.Struct("=QII")
N_COUNTERS = len(Reason) * FAMILY_MAX
_CGROUP = Hook.CGROUP.label
# label text by counter index, computed once
DROP_LABELS = [(r * FAMILY_MAX + f, f'reason="{r.label}",family="{f.label}') for r in Reason if not r.allowed for f in Family]
ALLOWED_INDEXES = [(r.label, [r * FAMILY_MAX + f for f in Family]) for r in Reason if r.allowed]


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@dataclass
class Row:
    """What one scope contributes to a scrape."""

    name: str
    hook: str
    packets: list[int]        # by counter index: reason * FAMILY_MAX + family
    nbytes: list[int]
    tunnels: list             # (tunnel name, up)
    attached: bool
    suppressed: int
    unguarded: int | None = None   # node scopes
    labels: dict | None = None     # a source's names (kubernetes: namespace, pod)
    labels_text: str | None = None   # scope_labels(name, labels), when already made


class _Open:
    """A daemon-owned cgroup scope with what its scrape reads kept open: the
    counters and tunnels maps (each read in one batched system call into
    buffers made once), the bucket, and the cgroup itself (its attached
    programs are one query away).  A scrape of an idle scope is three
    system calls."""

    def __init__(self, pin_dir: str, dir_ino: int):
        self.dir_ino = dir_ino
        self.cgroup_id = int(os.path.basename(pin_dir))
        self.fds = {}
        try:
            for name in ("counters", "bucket", "tunnels", "meta"):
                self.fds[name] = libbpf.obj_get(os.path.join(pin_dir, name))
            meta_size = libbpf.map_info(self.fds["meta"]).value_size
            raw = libbpf.map_lookup(self.fds["meta"], _U32.pack(0), meta_size) or b""
            os.close(self.fds.pop("meta"))
            import json
            meta = json.loads(raw.split(b"\0", 1)[0] or b"{}")
            prog_fd = libbpf.obj_get(os.path.join(pin_dir, "prog"))
            try:
                self.prog_id = libbpf.prog_info(prog_fd).id
            finally:
                os.close(prog_fd)
            # the cgroup, held open: a scope is its cgroup's id (the pin directory's name), so a cgroup
            # made again at the same path is another scope, and this one is checked as long as it lives
            # (gone, or another one at its path: the scope is not attached, as the one-shot collector says)
            try:
                cg = os.open(meta["cgroup"], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                cg = None
            if cg is not None and os.fstat(cg).st_ino != self.cgroup_id:
                os.close(cg)
                cg = None
            if cg is not None:
                self.fds["cgroup"] = cg
                self._query = libbpf.AttachedQuery(cg, libbpf.BPF_CGROUP_INET_EGRESS)
        except BaseException:
            self.close()
            raise
        self.cgroup = meta["cgroup"]
        self.tunnel_names = list(meta["policy"]["tunnels"])
        self.base = [(0, 0)] * N_COUNTERS
        for key, (p, b) in meta.get("counters_base", {}).items():
            reason, family = key.split("/")
            r = next(x for x in Reason if x.label == reason)
            f = next(x for x in Family if x.label == family)
            self.base[r * FAMILY_MAX + f] = (p, b)
        ncpu = libbpf.num_possible_cpus()
        self.ncpu = ncpu
        self.stride_counters = (libbpf.map_info(self.fds["counters"]).value_size + 7) // 8 * 8
        self.stride_bucket = (libbpf.map_info(self.fds["bucket"]).value_size + 7) // 8 * 8
        self._counters = libbpf.BatchReader(self.fds["counters"], 4, self.stride_counters * ncpu, N_COUNTERS)
        self._zero = bytes(len(self._counters.values))
        tunnels = libbpf.map_info(self.fds["tunnels"])
        self._tunnels = libbpf.BatchReader(self.fds["tunnels"], _TUNNEL_KEY.size, tunnels.value_size,
                                           tunnels.max_entries)
        self.base_counters = ([p for p, _ in self.base], [b for _, b in self.base])
        self.base_dropped = any(self.base_counters[0][i] for i, _ in DROP_LABELS)
        self.labels_text: str | None = None   # the scope's label text, made once (scope_labels)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def counters(self) -> tuple[list[int], list[int], bool]:
        """(packets, bytes) by counter index (reason * FAMILY_MAX + family), one
        batched read; and whether any packet was dropped."""
        n = self._counters.read()
        values = self._counters.values.raw
        if values == self._zero:   # nothing counted yet (most pods of a node, most of the time): no per-CPU sums
            return self.base_counters[0], self.base_counters[1], self.base_dropped
        size = self.stride_counters * self.ncpu
        q = memoryview(values)[:n * size].cast("Q").tolist()
        step, w = self.stride_counters // 8, size // 8
        packets = [sum(q[j:j + w:step]) + bp for j, (bp, _) in zip(range(0, n * w, w), self.base)]
        nbytes = [sum(q[j + 1:j + w:step]) + bb for j, (_, bb) in zip(range(0, n * w, w), self.base)]
        packets += [p for p, _ in self.base[n:]]
        nbytes += [b for _, b in self.base[n:]]
        return packets, nbytes, any(packets[i] for i, _ in DROP_LABELS)

    def suppressed(self) -> int:
        raw = libbpf.map_lookup(self.fds["bucket"], _U32.pack(0), self.stride_bucket * self.ncpu) or b""
        return sum(_BUCKET.unpack_from(raw, cpu * self.stride_bucket)[3] for cpu in range(len(raw) // self.stride_bucket))

    def registered(self, cookie: int | None) -> set[int]:
        """The interfaces of the namespace `cookie` the tunnels map allows (one batched read)."""
        n = self._tunnels.read()
        keys = self._tunnels.keys.raw
        return {ifindex for c, ifindex, _ in _TUNNEL_KEY.iter_unpack(keys[:n * _TUNNEL_KEY.size]) if c == cookie}

    def attached(self) -> bool:
        fd = self.fds.get("cgroup")
        if fd is None:
            return False
        try:
            return self._query.has(self.prog_id)
        except (OSError, KsbpfError):   # the cgroup was removed (ENOENT): not attached
            return False


def scope_labels(name: str, labels: dict | None) -> str:
    """The label text naming a scope: its name (a cgroup path, node:...), or
    for a pod scope="pod/NAMESPACE/NAME",namespace="...",pod="..."."""
    if labels and labels.get("pod"):
        ns, pod = _esc(labels.get("namespace", "")), _esc(labels["pod"])
        return f'scope="pod/{ns}/{pod}",namespace="{ns}",pod="{pod}"'
    return f'scope="{_esc(name)}"'


class Scraper:
    def __init__(self, daemon, bpffs: str = pins.BPFFS):
        self.daemon = daemon
        self.bpffs = bpffs
        self._open: dict[str, _Open] = {}

    def _rows(self) -> Iterable[Row]:
        by_pin = {st.pin_dir: st for st in list(self.daemon.scopes.values()) if st.pin_dir and not st.error}
        spaces = dict(self.daemon.namespaces)
        seen_dirs = set()
        for pin_dir, dir_ino in pins.scope_dir_inodes(self.bpffs).items():
            seen_dirs.add(pin_dir)
            st = by_pin.get(pin_dir)
            space = spaces.get(st.ns.inode) if st and st.ns else None
            try:
                if st is None or space is None:
                    yield self._slow(cgroups.read_scope(pin_dir))
                    continue
                cached = self._open.get(pin_dir)
                if cached is None or cached.dir_ino != dir_ino:   # new, or replaced (make-before-break)
                    if cached:
                        cached.close()
                        del self._open[pin_dir]
                    cached = self._open[pin_dir] = _Open(pin_dir, dir_ino)
                registered = cached.registered(space.cookie)
                by_name = {link.name: link for link in space.links.values()}
                tunnels = [(t, bool(by_name.get(t)) and by_name[t].ifindex in registered) for t in cached.tunnel_names]
                packets, nbytes, dropped = cached.counters()
                if cached.labels_text is None:
                    cached.labels_text = scope_labels(cached.cgroup, st.labels)
                # a sample is suppressed only when a packet was dropped: no drop, no read of the bucket
                yield Row(cached.cgroup, _CGROUP, packets, nbytes, tunnels, cached.attached(),
                          cached.suppressed() if dropped else 0, labels=st.labels, labels_text=cached.labels_text)
            except (OSError, ValueError, KeyError, KsbpfError):
                continue   # replaced or removed while we read: the next scrape sees it
        for pin_dir in [d for d in self._open if d not in seen_dirs]:
            self._open.pop(pin_dir).close()
        for pin_dir in pins.list_node_dirs(self.bpffs):
            try:
                st = node.read_node(pin_dir, {})
            except (OSError, ValueError, KsbpfError):
                continue
            row = self._slow(st)
            row.unguarded = sum(1 for i in st.interfaces if i.unguarded)
            yield row

    @staticmethod
    def _slow(st) -> Row:
        packets, nbytes = [0] * N_COUNTERS, [0] * N_COUNTERS
        for (r, f), (p, b) in st.counters.items():
            packets[r * FAMILY_MAX + f], nbytes[r * FAMILY_MAX + f] = p, b
        return Row(st.name, st.hook.label, packets, nbytes, [(t.name, t.registered) for t in st.tunnels],
                   st.attached, st.events[1])

    def render(self) -> bytes:
        rows = list(self._rows())
        out: list[str] = []
        names = {r.name: r.labels_text or scope_labels(r.name, r.labels) for r in rows}
        counted = [r for r in rows if any(r.packets)]   # the rows with a counter that is not zero

        def family(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}\n# TYPE {name} {kind}\n")

        for metric, attr, help_ in (("ksbpf_dropped_packets_total", "packets", "Packets dropped by ksbpf"),
                                    ("ksbpf_dropped_bytes_total", "nbytes", "Bytes dropped by ksbpf")):
            family(metric, "counter", help_)
            for r in counted:
                values, head = getattr(r, attr), f'{metric}{{{names[r.name]},'
                tail = f'",hook="{r.hook}"}} '
                out.extend(f"{head}{labels}{tail}{values[i]}.0\n" for i, labels in DROP_LABELS if r.packets[i])
        for metric, attr, help_ in (("ksbpf_allowed_packets_total", "packets", "Packets let through, by path"),
                                    ("ksbpf_allowed_bytes_total", "nbytes", "Bytes let through, by path")):
            family(metric, "counter", help_)
            for r in counted:
                values, head = getattr(r, attr), f'{metric}{{{names[r.name]},path="'
                out.extend(f'{head}{label}"}} {sum(values[i] for i in indexes)}.0\n' for label, indexes in ALLOWED_INDEXES
                           if any(r.packets[i] for i in indexes))
        configured = [st for st in list(self.daemon.scopes.values()) if st.cgroup not in names]
        family("ksbpf_tunnel_up", "gauge", "1 when the tunnel exists and the scope's map allows it")
        for r in rows:
            out.extend(f'ksbpf_tunnel_up{{{names[r.name]},tunnel="{_esc(t)}"}} {1 if up else 0}.0\n'
                       for t, up in r.tunnels)
        for st in configured:
            out.extend(f'ksbpf_tunnel_up{{{scope_labels(st.cgroup, st.labels)},tunnel="{_esc(t)}"}} 0.0\n'
                       for t in st.policy.tunnels)
        family("ksbpf_scope_attached", "gauge", "1 when the scope is enforced: its program attached to its cgroup, "
               "or (node mode) a guard on every interface that needs one")
        out.extend(f'ksbpf_scope_attached{{{names[r.name]}}} {1 if r.attached else 0}.0\n' for r in rows)
        out.extend(f'ksbpf_scope_attached{{{scope_labels(st.cgroup, st.labels)}}} 0.0\n' for st in configured)
        family("ksbpf_events_suppressed_total", "counter",
               "Blocked-packet samples not streamed (in-kernel rate limit or full ring buffer)")
        out.extend(f'ksbpf_events_suppressed_total{{{names[r.name]}}} {r.suppressed}.0\n' for r in rows if r.suppressed)
        family("ksbpf_unguarded_interfaces", "gauge",
               "Node mode: interfaces that should carry a guard and do not (their traffic is not judged)")
        out.extend(f'ksbpf_unguarded_interfaces{{{names[r.name]}}} {r.unguarded}.0\n'
                   for r in rows if r.unguarded is not None)
        family("ksbpf_build_info", "gauge", "ksbpf's version")
        out.append(f'ksbpf_build_info{{version="{_esc(ksbpf_version())}"}} 1.0\n')
        family("ksbpf_kernel_feature", "gauge", KERNEL_FEATURE_HELP)
        out.extend(f'ksbpf_kernel_feature{{feature="{f.name}"}} {1 if f.present else 0}.0\n' for f in features.probe())
        family("ksbpf_netlink_events_total", "counter", "Netlink messages the daemon handled")
        out.extend(f'ksbpf_netlink_events_total{{type="{_esc(k)}"}} {n}.0\n'
                   for k, n in sorted(dict(self.daemon.netlink_events).items()))
        family("ksbpf_guards_displaced_total", "counter", "Node mode: times the daemon found a program "
               "running in front of a guard (it then puts the guard first again)")
        out.append(f"ksbpf_guards_displaced_total {getattr(self.daemon, 'guards_displaced', 0)}.0\n")
        family("ksbpf_route_alerts_total", "counter", "Routes added outside a tunnel while a scope was protected (TunnelVision)")
        out.append(f"ksbpf_route_alerts_total {self.daemon.route_alerts}.0\n")
        verifier = getattr(self.daemon, "verifier", None)
        if verifier is not None:   # the daemon's zero-traffic check: few samples
            out.append(verify_text(verifier))
        return "".join(out).encode()
