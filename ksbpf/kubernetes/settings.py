"""The [kubernetes] table of the daemon's configuration: parsed and checked
here, reported by ksbpf.daemon.config with the file's line numbers."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ksbpf.errors import KsbpfError

KEYS = ("enabled", "node_name", "annotation_prefix", "kubeconfig", "cgroup_root")
DEFAULT_PREFIX = "ksbpf.io/"
NODE_NAME_ENV = "NODE_NAME"   # set from the downward API (spec.nodeName) in the DaemonSet
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@dataclass(frozen=True)
class KubernetesSettings:
    enabled: bool = False
    node_name: str = ""                    # "" -> $NODE_NAME
    annotation_prefix: str = DEFAULT_PREFIX
    kubeconfig: str = ""                   # "" -> in-cluster service-account credentials
    cgroup_root: str = ""                  # where to look for the kubelet's pods; "" -> the cgroup v2 mount

    def node(self) -> str:
        """The node whose pods are watched (raises when it is not known)."""
        name = self.node_name or os.environ.get(NODE_NAME_ENV, "")
        if not name:
            raise KsbpfError("[kubernetes] is enabled but the node name is unknown",
                             f"set node_name, or give ${NODE_NAME_ENV} from the downward API (fieldRef spec.nodeName)")
        return name

    def to_dict(self) -> dict:
        return dict(vars(self))


def check(table: dict) -> tuple[KubernetesSettings, list[tuple[str, str]]]:
    """The settings of a [kubernetes] table and its problems as (key, message);
    unknown keys are reported by the caller (KEYS)."""
    issues: list[tuple[str, str]] = []
    values: dict = {}
    for key, kind, expected in (("enabled", bool, "true or false"), ("node_name", str, "a node name"),
                                ("annotation_prefix", str, f'a prefix such as "{DEFAULT_PREFIX}"'),
                                ("kubeconfig", str, 'a kubeconfig path ("" for in-cluster credentials)'),
                                ("cgroup_root", str, 'a cgroup v2 directory ("" for the cgroup v2 mount)')):
        if key in table:
            if isinstance(table[key], kind):
                values[key] = table[key]
            else:
                issues.append((key, f"expected {expected}"))
    prefix = values.get("annotation_prefix", DEFAULT_PREFIX)
    if not prefix.endswith("/"):
        prefix += "/"
    if len(prefix) > 254 or not _DNS_SUBDOMAIN.fullmatch(prefix[:-1]):
        issues.append(("annotation_prefix", f"{prefix!r} is not an annotation prefix: a DNS subdomain and "
                                            f"a slash, e.g. \"{DEFAULT_PREFIX}\""))
    values["annotation_prefix"] = prefix
    kubeconfig = values.get("kubeconfig", "")
    if kubeconfig and not os.path.isfile(kubeconfig):
        issues.append(("kubeconfig", f"{kubeconfig} is not a file; give a kubeconfig, or \"\" to use the "
                                     "pod's service-account credentials (in-cluster)"))
    root = values.get("cgroup_root", "")
    if root and not os.path.isabs(root):
        issues.append(("cgroup_root", f"{root!r} is not an absolute path; give a directory of the cgroup v2 "
                                      "hierarchy, or \"\" for its mount point"))
    node = values.get("node_name", "")
    if node and (len(node) > 253 or not _DNS_SUBDOMAIN.fullmatch(node)):
        issues.append(("node_name", f"{node!r} is not a node name (a DNS subdomain); leave it \"\" to "
                                    f"take ${NODE_NAME_ENV} from the downward API"))
    return KubernetesSettings(**values), issues
