"""Kubernetes: the node daemon protects the annotated pods of its node.

settings.py ([kubernetes] configuration), annotations.py (ksbpf.io/* ->
policy), discovery.py (a pod's cgroup and network namespace from its UID),
api.py (the watch and Events, official client), pods.py (pods -> scopes of
the daemon), gate.py (`ksbpf gate`, the init container).
"""
