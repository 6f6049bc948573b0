#!/usr/bin/env bash
# Provision a Debian 12 machine to try ksbpf in: the one provisioning script of
# the Vagrantfile, and of the VM test (tests/test_vm.py runs it in a chroot of
# the guest image it builds).  Idempotent; run as root.
#
#   vagrant/provision.sh [SRC]      SRC: a copy of the repository (default: /opt/ksbpf-src)
#
# The machine runs its own kernel (the box's): ksbpf probes what that kernel can do and
# says on one line what it cannot (`ksbpf status`).  Nothing here replaces the kernel.
# 1. ksbpf: SRC copied to /opt/ksbpf, `make install` there (= `make setup`: Debian
#    packages, kernel headers, .venv; then ksbpf on PATH and the systemd units).
# 2. A WireGuard peer in a network namespace inside the machine (ksbpf-demo-peer.service):
#    a veth "vpn-uplink" (the machine's "physical" link to 198.51.100.0/24, a documentation
#    network that stands for the internet), a kernel WireGuard server behind it, and an HTTP
#    server on 198.51.100.7.  The machine's tunnel is wg0 (wg-quick@wg0).
# 3. /etc/ksbpf/ksbpf.toml: vpn.slice may send only through wg0 (and to the peer's
#    WireGuard port); ksbpf-early.service and ksbpf.service enabled (and started when booted).
set -euo pipefail
src=${1:-/opt/ksbpf-src}
dest=/opt/ksbpf
here=$src/vagrant
say() { printf 'provision: %s\n' "$*"; }
[ "$(id -u)" -eq 0 ] || { echo "provision: run as root" >&2; exit 1; }
[ -f "$src/Makefile" ] || { echo "provision: $src is not a ksbpf checkout (give its path)" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
booted=; [ -d /run/systemd/system ] && booted=1

dpkg --configure -a   # finish an installation that was interrupted

# --- 1. ksbpf ------------------------------------------------------------------
for tool in make rsync curl; do   # curl: for the demo (vagrant/README.md)
    command -v $tool >/dev/null || { apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
                                     apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends make rsync curl >/dev/null
                                     break; }
done
say "copying $src to $dest"
mkdir -p "$dest"
rsync -a --delete --exclude=.git/ --exclude=.venv/ --exclude='*.egg-info/' --exclude=__pycache__/ \
      --exclude=.pytest_cache/ --exclude=build/ "$src/" "$dest/"
chown -R root:root "$dest"; chmod -R go-w "$dest"
# make install runs make setup (packages, headers for the running kernel -- or for
# KSBPF_KERNEL_RELEASE when set, as when an image is provisioned in a chroot --, .venv)
KSBPF_SETUP_VM_TOOLS=no make -s -C "$dest" install >/dev/null

# --- 2. the WireGuard peer in a namespace ---------------------------------------
mkdir -p /etc/ksbpf-demo /etc/wireguard
chmod 0700 /etc/ksbpf-demo /etc/wireguard
umask 077
for k in peer client; do
    [ -s /etc/ksbpf-demo/$k.key ] || wg genkey > /etc/ksbpf-demo/$k.key
    wg pubkey < /etc/ksbpf-demo/$k.key > /etc/ksbpf-demo/$k.pub
done
umask 022
cat > /etc/wireguard/wg0.conf <<CONF
# The machine's VPN tunnel (kernel WireGuard) to the peer in the namespace "vpnpeer".
[Interface]
PrivateKey = $(cat /etc/ksbpf-demo/client.key)
Address = 10.200.0.2/24

[Peer]
PublicKey = $(cat /etc/ksbpf-demo/peer.pub)
Endpoint = 10.99.0.2:51820
AllowedIPs = 10.200.0.0/24, 198.51.100.0/24
PersistentKeepalive = 25
CONF
chmod 0600 /etc/wireguard/wg0.conf
install -m 0755 "$here/demo-peer.sh" /usr/local/sbin/ksbpf-demo-peer
install -m 0644 "$here/ksbpf-demo-peer.service" /etc/systemd/system/
mkdir -p /etc/ksbpf-demo/www
echo "hello from 198.51.100.7, the far side of the tunnel" > /etc/ksbpf-demo/www/index.html

# --- 3. the kill switch's configuration and units --------------------------------
install -d -m 0755 /etc/ksbpf
cat > /etc/ksbpf/ksbpf.toml <<'CONF'
# Written by vagrant/provision.sh.  Everything in vpn.slice may send only through
# wg0, and to the WireGuard peer's port itself (to build the tunnel).
[daemon]
log_format = "text"

[[scope]]
cgroup = "/sys/fs/cgroup/vpn.slice"
create_cgroup = true
tunnels = ["wg0"]
endpoints = ["10.99.0.2:51820/udp"]
tunnel_kinds = ["wireguard"]
CONF
chmod 0644 /etc/ksbpf/ksbpf.toml
/usr/local/bin/ksbpf check-config /etc/ksbpf/ksbpf.toml >/dev/null
units=(ksbpf-early.service ksbpf.service ksbpf-demo-peer.service wg-quick@wg0.service)
if [ -n "$booted" ]; then
    systemctl daemon-reload
    systemctl enable --now "${units[@]}"
    systemctl reload-or-restart ksbpf.service   # a re-provisioned configuration
    say "ready: try 'sudo ksbpf status' (vagrant/README.md walks through the demo)"
else
    systemctl enable "${units[@]}" >/dev/null 2>&1
    say "units enabled; they start at the next boot"
fi
