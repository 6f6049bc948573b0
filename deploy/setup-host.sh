#!/usr/bin/env bash
# Prepare a Debian 12 (or newer) host for ksbpf: idempotent, run as root.
#   deploy/setup-host.sh [VENV]     (default VENV: .venv next to this repo)
# 1. Debian packages: bcc's Python module, bpftool, wireguard-go/-tools, tools for the lab
#    and the tests (prometheus: its server and promtool, for the observability tests;
#    its service is NOT left enabled or running).
# 2. Kernel headers where bcc looks (/lib/modules/$(uname -r)/build).
# 3. A virtualenv that sees the distribution's bcc (and only it) and has ksbpf installed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$repo/.venv}
say() { printf 'setup: %s\n' "$*"; }
apt_updated=
apt_install() {   # apt_install PKG...: install without recommends, updating the lists once
    export DEBIAN_FRONTEND=noninteractive
    local wait=(-o DPkg::Lock::Timeout=600)   # another apt (a second checkout's setup) may hold the lock
    if [ -z "$apt_updated" ]; then apt-get "${wait[@]}" update -q >/dev/null; apt_updated=1; fi
    apt-get "${wait[@]}" install -y -q --no-install-recommends "$@" >/dev/null
}

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root (it installs packages and kernel headers); try: sudo make setup" >&2
    exit 1
fi

# --- 1. packages -------------------------------------------------------------
pkgs=(python3 python3-venv python3-bpfcc libbpf1 bpftool iproute2 wireguard-go wireguard-tools
      tcpdump iperf3 nftables iptables iputils-ping procps prometheus)
# container tests: real Podman and Docker (runc), images from busybox-static; no service is started
pkgs+=(podman runc netavark aardvark-dns busybox-static docker.io)
pkgs+=(openvpn)   # --endpoint auto: a real OpenVPN 2.6 client and servers in the lab (no service is started)
pkgs+=(debootstrap)   # the Kubernetes image test: podman build from a debootstrapped Debian base
# the VM test (tests/test_vm.py) builds and boots a Debian guest (vagrant/provision.sh: not in a VM)
[ "${KSBPF_SETUP_VM_TOOLS:-yes}" = no ] || pkgs+=(qemu-system-x86 qemu-utils debootstrap e2fsprogs rsync systemd)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    # start no service while installing (Debian's prometheus would start one on :9090)
    no_start=/usr/sbin/policy-rc.d
    [ -e "$no_start" ] || { printf '#!/bin/sh\nexit 101\n' > "$no_start"; chmod +x "$no_start"; trap 'rm -f "$no_start"' EXIT; }
    apt_install "${missing[@]}"
    if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
        systemctl disable prometheus.service >/dev/null 2>&1 || true   # works without a running systemd
        say "installed prometheus for the tests only: its service is disabled and was not started"
    fi
else
    say "Debian packages present"
fi
command -v systemctl >/dev/null && systemctl disable docker.service docker.socket containerd.service >/dev/null 2>&1 || true

# --- 2. kernel headers for bcc -------------------------------------------------
rel=${KSBPF_KERNEL_RELEASE:-$(uname -r)}   # set when provisioning an image for another kernel
mod=/lib/modules/$rel
if [ -e "$mod/build/include/linux/kconfig.h" ] || [ -e "$mod/source/include/linux/kconfig.h" ] \
   || [ -e /sys/kernel/kheaders.tar.xz ]; then
    say "kernel headers for $rel present"
elif apt_install "linux-headers-$rel" 2>/dev/null; then
    say "installed linux-headers-$rel"
else
    # No headers package for this kernel (a custom or cloud kernel).  ksbpf's
    # packet programs need only UAPI structs, which the distribution's generic
    # headers provide.
    if ! ls -d /usr/src/linux-headers-*-common >/dev/null 2>&1; then
        apt_install "linux-headers-$(dpkg --print-architecture)"
    fi
    arch_dir=$(ls -d /usr/src/linux-headers-*-"$(dpkg --print-architecture)" 2>/dev/null | sort -V | tail -n1)
    common_dir=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
    if [ -z "$arch_dir" ] || [ -z "$common_dir" ]; then
        echo "setup: no kernel headers for $rel and no generic headers could be installed; install your kernel's headers package" >&2
        exit 1
    fi
    mkdir -p "$mod"
    ln -sfn "$arch_dir" "$mod/build"
    ln -sfn "$common_dir" "$mod/source"
    say "NOTICE: no headers package for kernel $rel; linked the distribution's generic headers ($(basename "$arch_dir")) at $mod/build and $mod/source (enough for ksbpf's packet programs)"
fi

# --- 3. virtualenv -------------------------------------------------------------
py=/usr/bin/python3       # the interpreter Debian's python3-bpfcc is built for
if [ ! -x "$venv/bin/python" ]; then
    say "creating virtualenv $venv"
    "$py" -m venv "$venv"
fi
bccdir=$("$py" -c 'import bcc, os; print(os.path.dirname(os.path.dirname(bcc.__file__)))')
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Expose only the distribution's bcc module, not all of dist-packages.
mkdir -p "$venv/system-bcc"
ln -sfn "$bccdir/bcc" "$venv/system-bcc/bcc"
echo "$venv/system-bcc" > "$site/ksbpf-system-bcc.pth"
"$venv/bin/python" -c 'import bcc' || { echo "setup: bcc is not importable from $venv" >&2; exit 1; }
say "installing ksbpf and its test and benchmark dependencies into $venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$repo[test,bench]"
say "ready: $venv/bin/ksbpf"
