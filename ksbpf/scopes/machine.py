"""Every scope on the machine at once: the status of all of them, and the
escape hatch that removes them all."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ksbpf.errors import KsbpfError
from ksbpf.kernel import features, pins, preflight
from ksbpf.scopes import cgroups, common, node


@dataclass
class MachineStatus:
    cgroups: list[cgroups.ScopeStatus]
    nodes: list[node.NodeStatus]
    unreadable: list[str]   # pin directories that could not be read, with why

    def to_dict(self) -> dict:
        return {"scopes": [s.to_dict() for s in self.cgroups], "nodes": [n.to_dict() for n in self.nodes],
                "unreadable": self.unreadable, "kernel": features.as_dict()}


def status(bpffs: str = pins.BPFFS) -> MachineStatus:
    preflight.require_root()
    scopes, unreadable = cgroups.status(bpffs)
    nodes = []
    for d in pins.list_node_dirs(bpffs):
        try:
            nodes.append(node.read_node(d))
        except (OSError, KsbpfError, ValueError) as exc:
            unreadable.append(f"{d}: {exc}")
    return MachineStatus(scopes, nodes, unreadable)


@dataclass
class DetachAllResult:
    detached_prog_ids: list[int] = field(default_factory=list)      # cgroup programs
    detached_link_ids: list[int] = field(default_factory=list)      # tcx and netfilter links
    removed_pins: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"cgroup": None, "detached_prog_ids": self.detached_prog_ids,
                "detached_link_ids": self.detached_link_ids, "removed_pins": self.removed_pins}


def detach_all(bpffs: str = pins.BPFFS, progress: common.Progress = common.quiet) -> DetachAllResult:
    """The escape hatch: every node scope's guards, every ksbpf program on
    every cgroup, on any interface's tcx egress and at any namespace's
    netfilter hooks, and every pin."""
    preflight.require_root()
    result = DetachAllResult()
    with pins.locked():
        progress("removing node scopes and every tcx and netfilter link of a ksbpf program")
        nodes = node.detach_all(bpffs)
        result.detached_link_ids = nodes.detached_links
        result.detached_prog_ids = cgroups.detach_every_cgroup(progress)
        root = pins.pin_root(bpffs)
        if os.path.isdir(root):
            result.removed_pins = nodes.removed_pins + pins.list_scope_dirs(bpffs)
            pins.remove_dir(root)
    return result
