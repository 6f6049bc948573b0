"""Test-only harness: real Podman and Docker containers and the far side they reach
(containers), a replaying Kubernetes API server (kubeapi), the kubelet's cgroup
layouts (kubelet), a Debian 13 root filesystem with its own bcc (distro_bcc).
Not shipped: the benchmarks that need them put tests/ on sys.path."""
