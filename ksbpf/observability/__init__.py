"""What ksbpf tells: Prometheus metrics and the stream of blocked packets."""
