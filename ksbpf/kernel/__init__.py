"""The kernel interface: BPF syscalls (libbpf), the program and its maps, pins,
cgroup v2, network namespaces, route netlink, and the checks before any of it."""
