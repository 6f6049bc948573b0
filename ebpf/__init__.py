"""The BPF C sources of ksbpf, shipped as package data (ksbpf.ebpf)."""
