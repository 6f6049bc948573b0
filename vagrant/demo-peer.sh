#!/usr/bin/env bash
# ksbpf-demo-peer up|down: the far side of this machine's "physical" link, in a
# network namespace (installed by vagrant/provision.sh, run by ksbpf-demo-peer.service).
#   this machine:  vpn-uplink 10.99.0.1/24   --veth--   uplink 10.99.0.2/24  (namespace vpnpeer)
#                  wg0 10.200.0.2 (wg-quick)  ==WireGuard==  wgs 10.200.0.1, UDP 51820
#   198.51.100.0/24 ("the internet") is routed over vpn-uplink (metric 100) and, while
#   wg0 is up, through wg0; 198.51.100.7 lives in vpnpeer and serves HTTP.
set -euo pipefail
ns=vpnpeer
keys=/etc/ksbpf-demo
case "${1:-}" in
up)
    [ -e /run/netns/$ns ] || ip netns add $ns          # may exist already (counters added first)
    ip -n $ns link del wgs 2>/dev/null || true
    # the link may exist already, like a NIC found at boot: then it is only configured here
    ip link show vpn-uplink >/dev/null 2>&1 || ip link add vpn-uplink type veth peer name uplink netns $ns
    ip addr flush dev vpn-uplink
    ip -n $ns addr flush dev uplink
    ip -n $ns link set lo up
    ip -n $ns addr add 198.51.100.7/32 dev lo
    ip -n $ns addr add 10.99.0.2/24 dev uplink
    ip -n $ns link set uplink up
    ip -n $ns link add wgs type wireguard
    ip netns exec $ns wg set wgs private-key $keys/peer.key listen-port 51820 \
        peer "$(cat $keys/client.pub)" allowed-ips 10.200.0.2/32
    ip -n $ns addr add 10.200.0.1/24 dev wgs
    ip -n $ns link set wgs up
    ip addr add 10.99.0.1/24 dev vpn-uplink
    ip link set vpn-uplink up
    ip route replace 198.51.100.0/24 via 10.99.0.2 dev vpn-uplink metric 100
    ;;
down)
    ip link del vpn-uplink 2>/dev/null || true
    ip netns del $ns 2>/dev/null || true
    ;;
*)
    echo "usage: $0 up|down" >&2; exit 2 ;;
esac
