# ksbpf — see README.md.  Every target runs as root.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test vm-test vm-test-ubuntu bench install clean fuzz image

## setup: Debian packages, kernel headers for bcc, .venv with ksbpf (idempotent)
setup:
	@bash deploy/setup-host.sh $(abspath $(VENV))

## demo: build a namespace lab with a real WireGuard tunnel and show the kill switch
demo: setup
	@$(VENV)/bin/ksbpf demo

## test: the whole suite (unit, BPF_PROG_TEST_RUN, namespace integration, demo)
test: setup
	@$(PY) -m pytest $(PYTEST_ARGS)

## vm-test: the systemd units, boot-time protection and kernel WireGuard in a booted Debian guest
##          (qemu; the image is cached in /var/cache/ksbpf-vm; also part of `make test`)
vm-test: setup
	@$(PY) -m pytest tests/test_vm.py $(PYTEST_ARGS)

## vm-test-ubuntu: the same on Ubuntu 22.04's and 24.04's GA kernels (5.15, 6.8) besides the newest;
##                 opt-in: their packages come from archive.ubuntu.com (KSBPF_VM_KERNELS chooses)
vm-test-ubuntu: setup
	@KSBPF_VM_KERNELS=$${KSBPF_VM_KERNELS:-newest,ubuntu2204,ubuntu2404} $(PY) -m pytest tests/test_vm.py $(PYTEST_ARGS)

## fuzz: differential fuzzing, the policy model against the real programs (ksbpf/verify/fuzz.py);
## disagreements are saved in tests/fuzz_regressions/, which `make test` replays
FUZZ_PACKETS ?= 1000000
fuzz: setup
	@$(PY) -m ksbpf.verify.fuzz --packets $(FUZZ_PACKETS)

## bench: benchmarks (never part of `make test`); results in benchmarks/results/
bench: setup
	@$(PY) benchmarks/packet_cost.py
	@$(PY) benchmarks/nf_cost.py
	@$(PY) benchmarks/netns_identity.py --rounds 15 --packets 40000
	@$(PY) benchmarks/throughput.py --rounds 5 --seconds 3
	@$(PY) benchmarks/scaling.py --sizes 1,100,10000,100000 --rounds 3 --seconds 2
	@$(PY) benchmarks/reaction.py --flaps 200
	@$(PY) benchmarks/endpoint_follow.py --switches 200
	@$(PY) benchmarks/dns_cost.py --rounds 5 --calls 20000
	@$(PY) benchmarks/node_throughput.py --rounds 5 --seconds 2
	@$(PY) benchmarks/node_reaction.py --interfaces 200
	@$(PY) benchmarks/new_uplink.py --tries 20
	@$(PY) benchmarks/footprint.py
	@$(PY) benchmarks/scrape.py --scopes 1000
	@$(PY) benchmarks/verify_cost.py --rounds 31
	@$(PY) benchmarks/containers.py --flaps 200 --late 50
	@$(PY) benchmarks/kubernetes.py --pods 1000 --more 50
	@$(PY) benchmarks/summary.py

## install: ksbpf on PATH, the example config and the systemd units (see README)
PREFIX ?= /usr/local
install: setup
	install -d /etc/ksbpf /etc/systemd/system $(PREFIX)/bin
	[ -e /etc/ksbpf/ksbpf.toml ] || install -m 0644 deploy/ksbpf.toml.example /etc/ksbpf/ksbpf.toml
	ln -sfn $(abspath $(VENV))/bin/ksbpf $(PREFIX)/bin/ksbpf
	install -m 0644 deploy/systemd/ksbpf-early.service deploy/systemd/ksbpf.service /etc/systemd/system/
	$(VENV)/bin/ksbpf warm-cache || echo "install: the program cache was not warmed (no BPF here: a chroot, an image build?); the first attach compiles instead"
	@echo "installed. Next: edit /etc/ksbpf/ksbpf.toml, check it with 'ksbpf check-config /etc/ksbpf/ksbpf.toml',"
	@echo "then: systemctl daemon-reload && systemctl enable --now ksbpf-early.service ksbpf.service"

## image: the container image (Dockerfile) with podman: localhost/ksbpf:VERSION
IMAGE ?= localhost/ksbpf:$(shell $(PY) -c 'import importlib.metadata as m; print(m.version("ksbpf"))' 2>/dev/null || echo latest)
image: setup
	rm -rf build/wheels && $(PY) -m pip wheel -q --disable-pip-version-check --wheel-dir build/wheels .
	podman build --network=host -t $(IMAGE) -f Dockerfile .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
