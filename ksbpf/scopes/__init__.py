"""What ksbpf protects and how: a scope is a cgroup (cgroup_skb egress) or a
whole network namespace (node mode, tc egress); attach, detach, status."""
