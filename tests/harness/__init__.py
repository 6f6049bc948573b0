"""Test-only harness: real Podman and Docker containers and the far side they reach
(containers), a replaying Kubernetes API server (kubeapi), the kubelet's cgroup
layouts (kubelet).  Not shipped: the benchmarks that need them put tests/ on sys.path."""
