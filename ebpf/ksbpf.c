/* SPDX-License-Identifier: GPL-2.0 */
/* ksbpf: "this traffic may leave only through this tunnel, and through NO
 * other interface".
 *
 * One policy, ksbpf_policy(), decides every packet and returns a reason
 * (ksbpf.h).  Each hook is a thin wrapper that tells it where the network
 * header starts and which hook it is, and turns the reason into its own
 * verdict:
 *   ksbpf_cg_egress  cgroup_skb/egress: the sockets of one cgroup subtree
 *   ksbpf_tc_eth     tc egress of a guarded Ethernet interface (node mode)
 *   ksbpf_tc_l3      tc egress of a guarded interface without a link-layer
 *                    header (tun, ppp, ...)
 *   ksbpf_nf         netfilter NF_INET_POST_ROUTING of a node scope's
 *                    namespace (IPv4 and IPv6): every IP packet leaving it,
 *                    on every interface, also one created after attaching
 *                    (compiled only when the loader passes the kernel's
 *                    struct offsets, -DKSBPF_OFF_*, read from its BTF)
 * Runtime configuration lives in maps; options are compile-time switches:
 *   -DKSBPF_OPT_LAN         the fixed private ranges (ksbpf_lan4/6) are allowed
 *   -DKSBPF_OPT_LAN_DNS     ... including DNS (53, 853) to them
 *   -DKSBPF_OPT_DHCP        DHCPv4/DHCPv6 client traffic is allowed (the machine's
 *                           own client, to the link's servers, size-bounded)
 *   -DKSBPF_OPT_CIDRS       the allow_cidrs tries (cidrs4/6) are looked up
 *   -DKSBPF_OPT_VPN_MARK    the endpoint exception takes only packets carrying
 *                           the VPN client's firewall mark (map vpn_mark)
 *   -DKSBPF_OPT_VPN_CGROUP  ... or only packets of local sockets of the VPN
 *                           client's cgroup subtrees (map vpn_cgroups); with
 *                           either, endpoints may be any address on a (port,
 *                           protocol) (map ep_any)
 *   -DKSBPF_OPT_DNS         --dns: the cgroup hook parses every packet (loopback and
 *                           tunnel ones too) and drops DNS to anything but the VPN's
 *                           resolvers (dns4/6) or outside the tunnel; the sock_addr
 *                           entry points (ksbpf_dns_*) redirect DNS to a resolver.
 *                           Node mode (tc, netfilter): DNS outside the tunnel is
 *                           dropped, and packets out through a tunnel are parsed
 *                           (the netfilter hook sees them) for DNS to other resolvers
 *   -DKSBPF_EVENTS_INTERVAL_NS=N, -DKSBPF_EVENTS_BURST=N
 *                           send samples of dropped packets to the ring buffer
 *                           `events`: at most one per N ns and BURST at once,
 *                           per CPU (a token bucket); the rest are counted
 *   -DKSBPF_MAX_TUNNELS=N, -DKSBPF_MAX_ENDPOINTS=N: map sizes
 *   -DKSBPF_NETNS_HELPER    the cgroup hook asks bpf_get_netns_cookie(skb) for
 *                           the namespace (Linux >= 6.17 lets cgroup_skb call
 *                           it); without it the namespace is the one the
 *                           socket was created in, recorded by ksbpf_sk_create
 *                           in socket-local storage (sk_netns, Linux >= 5.12)
 *   -DKSBPF_TC_NETNS_HELPER tc programs may ask bpf_get_netns_cookie (Linux
 *                           6.15): node mode's DHCP exception checks that the
 *                           socket is the node namespace's own
 *   -DKSBPF_NO_COARSE_CLOCK the event bucket reads bpf_ktime_get_ns (kernels
 *                           without bpf_ktime_get_coarse_ns, < 5.11)
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include "ksbpf.h"

#ifndef KSBPF_MAX_TUNNELS
#define KSBPF_MAX_TUNNELS 64
#endif
#ifndef KSBPF_MAX_ENDPOINTS
#define KSBPF_MAX_ENDPOINTS 1024
#endif
#ifndef KSBPF_EVENTS_PAGES
#define KSBPF_EVENTS_PAGES 16
#endif
/* bpf_probe_read_kernel by its number (BPF_FUNC_probe_read_kernel): bcc
 * defines the name as bpf_probe_read wherever its own probe of the helper
 * fails (a container without the privileges it probes with), and netfilter
 * programs may not call bpf_probe_read. */
static long (*ksbpf_read_kernel)(void *dst, __u32 size, const void *src) = (void *)113;
#define KSBPF_IPV6_MAX_EXTHDRS 6
#define KSBPF_VLAN_HLEN 4
#define KSBPF_ICMPV6 58
/* The exceptions carry no data: size bounds, counted from the network
 * header (skb->len, never a header's claim). */
#define KSBPF_ND_MAX 104	/* IPv6 header + RS/NS/NA + up to 5 8-byte options (or fewer, longer ones) */
#define KSBPF_DHCP_MAX 576	/* the DHCP message size every agent must accept (RFC 2131); DHCPv6 alike */
#define KSBPF_ARP_LEN 28	/* Ethernet/IPv4 ARP */
#define KSBPF_ARP_MAX 46	/* ... padded with zeros to Ethernet's minimum frame (60 bytes) */
#define KSBPF_AF_INET6 10
#define KSBPF_FIB_DIRECT 1	/* BPF_FIB_LOOKUP_DIRECT: the main table, no rules */
#define KSBPF_FIB_OUTPUT 2	/* BPF_FIB_LOOKUP_OUTPUT: a lookup for output through params.ifindex */
#define KSBPF_FIB_NO_NEIGH 7	/* BPF_FIB_LKUP_RET_NO_NEIGH: the route was found, its neighbour is not resolved */

BPF_HASH(tunnels, struct ksbpf_tunnel_key, __u32, KSBPF_MAX_TUNNELS);
BPF_ARRAY(tunnel_ifindex, __u64, KSBPF_IFINDEX_FILTER);
BPF_HASH(endpoints4, __be32, struct ksbpf_endpoint, KSBPF_MAX_ENDPOINTS);
BPF_HASH(endpoints6, struct ksbpf_ep6_key, struct ksbpf_endpoint, KSBPF_MAX_ENDPOINTS);
/* In front of the endpoint hashes (ksbpf.h): a drop would pay a hash lookup
 * only to learn that its destination is no endpoint. */
BPF_ARRAY(ep_slots, struct ksbpf_ep_slot, KSBPF_EP_SLOTS);
BPF_PERCPU_ARRAY(counters, struct ksbpf_counter, KSBPF_REASON_MAX * KSBPF_FAMILY_MAX);
BPF_ARRAY(meta, struct ksbpf_meta, 1);
BPF_RINGBUF_OUTPUT(events, KSBPF_EVENTS_PAGES);
BPF_PERCPU_ARRAY(bucket, struct ksbpf_bucket, 1);
BPF_ARRAY(exempt, struct ksbpf_exempt, KSBPF_MAX_EXEMPT);
/* tc: the cookie of the node scope's namespace, where every guarded interface
 * lives (bpf_get_netns_cookie answers init_net's for a packet without a
 * socket, such as a forwarded one). */
BPF_ARRAY(scope_netns, __u64, 1);
BPF_ARRAY(verify_nonce, struct ksbpf_nonce, 1);
/* cgroup hook: see KSBPF_FAST_ALLOWED (ksbpf.h); shared by a scope's
 * successive programs, as sk_netns is. */
BPF_ARRAY(netns_fast, __u32, 2);

#ifndef KSBPF_NETNS_HELPER
/* The network namespace of each socket of the scope, written by
 * ksbpf_sk_create when the socket is created (a socket never changes
 * namespace) and read by the cgroup hook.  BPF_F_CLONE: an accepted
 * connection inherits its listener's.  A socket without it was created
 * before the scope's programs were attached (or by the kernel, as MPTCP's
 * subflows are): its namespace is unknown, and unknown is never a tunnel's. */
#define KSBPF_BPF_F_CLONE (1U << 9)
struct sk_netns_table_t {
	int key;
	struct ksbpf_sk leaf;
	void *(*sk_storage_get)(void *, void *, int);
	int (*sk_storage_delete)(void *);
	u32 flags;
};
__attribute__((section("maps/sk_storage")))
struct sk_netns_table_t sk_netns = { .flags = BPF_F_NO_PREALLOC | KSBPF_BPF_F_CLONE };
BPF_ANNOTATE_KV_PAIR(sk_netns, int, struct ksbpf_sk);
#endif

/* allow_cidrs (Kubernetes: the cluster's service and pod ranges, so cluster
 * DNS works without letting DNS out of the tunnel): destinations allowed
 * outside the tunnel, DNS included, counted as KSBPF_ALLOW_LAN.  Longest-
 * prefix-match tries keyed by (prefix length, address); empty unless set. */
struct ksbpf_cidr4_key { __u32 prefixlen; __u8 addr[4]; };
struct ksbpf_cidr6_key { __u32 prefixlen; __u8 addr[16]; };
BPF_LPM_TRIE(cidrs4, struct ksbpf_cidr4_key, __u8, 256);
BPF_LPM_TRIE(cidrs6, struct ksbpf_cidr6_key, __u8, 256);

#if defined(KSBPF_OPT_VPN_MARK) || defined(KSBPF_OPT_VPN_CGROUP)
#define KSBPF_OPT_VPN
/* The VPN client (ksbpf.h): its firewall mark, its cgroup subtrees, and the
 * (port, protocol) pairs on which any address is an endpoint. */
BPF_ARRAY(vpn_mark, struct ksbpf_vpn_mark, 1);
BPF_ARRAY(vpn_cgroups, struct ksbpf_exempt, KSBPF_MAX_VPN_CGROUPS);
BPF_HASH(ep_any, struct ksbpf_ep_any_key, __u32, KSBPF_MAX_EP_ANY);
#endif

#ifdef KSBPF_OPT_DNS
/* --dns: the VPN's resolvers, the redirect target and the original
 * destinations of redirected sockets (ksbpf.h) */
BPF_HASH(dns4, __be32, __u8, KSBPF_MAX_DNS);
BPF_HASH(dns6, struct ksbpf_ep6_key, __u8, KSBPF_MAX_DNS);
BPF_ARRAY(dns_target, struct ksbpf_dns_target, 1);
BPF_TABLE("lru_hash", __u64, struct ksbpf_dns_orig, dns_orig, KSBPF_DNS_ORIG_MAX);
#endif

/* What the policy needs to know of a packet. */
struct ksbpf_pkt {
	__u8 family;		/* enum ksbpf_family */
	__u8 l4proto;
	__u8 has_ports;		/* TCP/UDP with its ports read */
	__u8 fragment;		/* a non-first fragment */
	__u8 icmp_type;		/* tc: the ICMPv6 type */
	__u8 hop_limit;		/* tc: the IPv6 hop limit */
	__u64 src64;		/* tc: the first 64 bits of the IPv6 source (its /64) */
	__be16 sport;
	__be16 dport;
	union {
		__be32 v4;
		__u8 v6[16];
	} daddr;
};

/* Where the packet is: the context, the network header's offset from
 * skb->data (0 at the cgroup hook and on L3 devices; 14 or 18 after an
 * Ethernet header at tc) and the hook, a constant that folds away the other
 * hooks' code. */
struct ksbpf_at {
	struct __sk_buff *skb;	/* cgroup and tc; NULL at netfilter */
	void *data;		/* skb->data and skb->data_end, read once by the entry point;
				 * netfilter: the network header (kernel memory) */
	void *end;
	__u32 nh;
	int hook;
	__u32 ifindex;		/* netfilter: the output device */
	__u32 len;		/* netfilter: skb->len */
	void *sk;		/* netfilter: skb->sk (none: a forwarded packet) */
	__u32 mark;		/* netfilter: skb->mark (with KSBPF_OPT_VPN_MARK) */
	__u32 linear;		/* netfilter: bytes from the network header to the linear data's end */
};

#define KSBPF_AT(ctx, hook_) { .skb = (ctx), .data = (void *)(long)(ctx)->data, \
			       .end = (void *)(long)(ctx)->data_end, .nh = 0, .hook = (hook_) }

/* Copy len bytes at offset off from the network header: straight from the
 * packet when they are in its linear part, else through a helper.  At tc the
 * offsets count from the frame as sent, never from the kernel's idea of the
 * network header, which a raw AF_PACKET sender sets to the frame's start. */
#define KSBPF_DIRECT_MAX_OFF 512
static __always_inline int ksbpf_load(const struct ksbpf_at *at, __u32 off, void *to, const __u32 len)
{
	struct __sk_buff *skb = at->skb;
	void *p;

	if (at->hook == KSBPF_HOOK_NF) {
		/* The IP stack keeps the headers in the linear part. */
		if (off > KSBPF_DIRECT_MAX_OFF || off + len > at->linear)
			return -1;
		return ksbpf_read_kernel(to, len, at->data + off);
	}
	if (off <= KSBPF_DIRECT_MAX_OFF && at->nh <= KSBPF_DIRECT_MAX_OFF) {
		p = at->data + at->nh + off;
		if (p + len <= at->end) {
			__builtin_memcpy(to, p, len);
			return 0;
		}
	}
	if (at->hook == KSBPF_HOOK_TC)
		return bpf_skb_load_bytes(skb, at->nh + off, to, len);
	return bpf_skb_load_bytes_relative(skb, off, to, len, BPF_HDR_START_NET);
}

static __always_inline int ksbpf_load_ports(const struct ksbpf_at *at, __u32 off, struct ksbpf_pkt *p)
{
	__be16 ports[2];

	if (p->fragment)
		return 0;
	if (at->hook != KSBPF_HOOK_CGROUP && p->family == KSBPF_FAMILY_IPV6 && p->l4proto == KSBPF_ICMPV6)
		return ksbpf_load(at, off, &p->icmp_type, 1);	/* IPv6 only: protocol 58 in IPv4 is no ICMPv6 */
	if (p->l4proto != IPPROTO_TCP && p->l4proto != IPPROTO_UDP)
		return 0;
	if (ksbpf_load(at, off, ports, sizeof(ports)))
		return -1;
	p->sport = ports[0];
	p->dport = ports[1];
	p->has_ports = 1;
	return 0;
}

static __always_inline int ksbpf_parse4(const struct ksbpf_at *at, struct ksbpf_pkt *p)
{
	struct {
		struct iphdr ip;
		__be16 ports[2];
	} h;
	int whole = 0;

	/* netfilter reads packet bytes through a helper: one call for the
	 * header and, without IP options, the ports right after it */
	if (at->hook == KSBPF_HOOK_NF && !ksbpf_load(at, 0, &h, sizeof(h)))
		whole = 1;
	else if (ksbpf_load(at, 0, &h.ip, sizeof(h.ip)))
		return -1;
	if (h.ip.version != 4 || h.ip.ihl < 5)
		return -1;
	p->daddr.v4 = h.ip.daddr;
	p->l4proto = h.ip.protocol;
	p->fragment = (bpf_ntohs(h.ip.frag_off) & 0x1fff) != 0;
	if (whole && h.ip.ihl == 5 && !p->fragment &&
	    (p->l4proto == IPPROTO_TCP || p->l4proto == IPPROTO_UDP)) {
		p->sport = h.ports[0];
		p->dport = h.ports[1];
		p->has_ports = 1;
		return 0;
	}
	return ksbpf_load_ports(at, h.ip.ihl * 4, p);
}

static __always_inline int ksbpf_parse6(const struct ksbpf_at *at, struct ksbpf_pkt *p)
{
	struct ipv6hdr ip6;
	__u32 off = sizeof(ip6);
	__u8 nexthdr;
	__u8 ext[2];
	__be16 frag_off;
	int i;

	if (ksbpf_load(at, 0, &ip6, sizeof(ip6)))
		return -1;
	if (ip6.version != 6)
		return -1;
	__builtin_memcpy(p->daddr.v6, &ip6.daddr, 16);
	p->hop_limit = ip6.hop_limit;
	__builtin_memcpy(&p->src64, &ip6.saddr, 8);
	nexthdr = ip6.nexthdr;

#pragma unroll
	for (i = 0; i < KSBPF_IPV6_MAX_EXTHDRS; i++) {
		if (nexthdr != IPPROTO_HOPOPTS && nexthdr != IPPROTO_ROUTING &&
		    nexthdr != IPPROTO_DSTOPTS && nexthdr != IPPROTO_FRAGMENT &&
		    nexthdr != IPPROTO_AH)
			break;
		if (ksbpf_load(at, off, ext, sizeof(ext)))
			return -1;
		if (nexthdr == IPPROTO_FRAGMENT) {
			if (ksbpf_load(at, off + 2, &frag_off, sizeof(frag_off)))
				return -1;
			if (bpf_ntohs(frag_off) & 0xfff8)
				p->fragment = 1;
			off += 8;
		} else if (nexthdr == IPPROTO_AH) {
			off += (ext[1] + 2) * 4;
		} else {
			off += (ext[1] + 1) * 8;
		}
		nexthdr = ext[0];
	}
	if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
	    nexthdr == IPPROTO_DSTOPTS || nexthdr == IPPROTO_FRAGMENT || nexthdr == IPPROTO_AH)
		return -1;	/* longer chain than we follow: fail closed */
	p->l4proto = nexthdr;
	return ksbpf_load_ports(at, off, p);
}

/* IPv6 router solicitation, neighbour solicitation and advertisement: with
 * hop limit 255, so no router forwards them (RFC 4861).  The machine needs
 * them to reach its gateway and the VPN server; DHCPv6 is the DHCP rule. */
static __always_inline int ksbpf_is_nd(const struct ksbpf_pkt *p)
{
	return p->l4proto == KSBPF_ICMPV6 && !p->fragment && p->hop_limit == 255 &&
	       (p->icmp_type == 133 || p->icmp_type == 135 || p->icmp_type == 136);
}

/* The length from the network header to the end of the packet. */
static __always_inline __u32 ksbpf_l3_len(const struct ksbpf_at *at)
{
	__u32 len = at->hook == KSBPF_HOOK_NF ? at->len : at->skb->len;

	return len > at->nh ? len - at->nh : 0;
}

static __always_inline int ksbpf_link_local6(const __u8 *a)
{
	return a[0] == 0xfe && (a[1] & 0xc0) == 0x80;		/* fe80::/10 */
}

static __always_inline int ksbpf_link_mcast6(const __u8 *a)
{
	return a[0] == 0xff && a[1] == 0x02;			/* ff02::/16 */
}

/* tc: is the IPv6 destination a neighbour directly connected through the
 * egress interface itself?  The main table's route to it (for output through
 * that interface) has no gateway and leaves through that interface.  A route
 * through a gateway, another interface, none, or an interface that does not
 * forward IPv6 (the helper answers nothing then): no. */
static __always_inline int ksbpf_on_link6(const struct ksbpf_at *at, const struct ksbpf_pkt *p)
{
	struct bpf_fib_lookup f = {};
	__u32 ifindex = at->skb->ifindex;
	__u32 d[4];
	long rc;

	f.family = KSBPF_AF_INET6;
	f.ifindex = ifindex;
	__builtin_memcpy(f.ipv6_dst, p->daddr.v6, 16);
	rc = bpf_fib_lookup(at->skb, &f, sizeof(f), KSBPF_FIB_DIRECT | KSBPF_FIB_OUTPUT);
	if (rc != 0 && rc != KSBPF_FIB_NO_NEIGH)
		return 0;
	/* a route through a gateway puts the gateway's address in ipv6_dst */
	__builtin_memcpy(d, p->daddr.v6, 16);
	return f.ifindex == ifindex && f.ipv6_dst[0] == d[0] && f.ipv6_dst[1] == d[1] &&
	       f.ipv6_dst[2] == d[2] && f.ipv6_dst[3] == d[3];
}

/* tc: neighbour discovery toward the link itself -- to a link-local or
 * link-scoped multicast address, or to a neighbour on that link -- and no
 * bigger than ND needs.  ND to a routed destination is not ND.  A global
 * neighbour shares the /64 of the address ND is sent from (its own on that
 * link): checked first, so that ND to a routed address is dropped without
 * the FIB lookup (~150 ns), which decides the rest. */
static __always_inline int ksbpf_nd(const struct ksbpf_at *at, const struct ksbpf_pkt *p)
{
	__u64 dst64;

	if (!ksbpf_is_nd(p) || ksbpf_l3_len(at) > KSBPF_ND_MAX)
		return 0;
	if (ksbpf_link_local6(p->daddr.v6) || ksbpf_link_mcast6(p->daddr.v6))
		return 1;
	__builtin_memcpy(&dst64, p->daddr.v6, 8);
	/* netfilter (an interface not guarded yet): no FIB helper there, so
	 * only ND to link-local and link-scoped multicast addresses */
	return dst64 == p->src64 && at->hook == KSBPF_HOOK_TC && ksbpf_on_link6(at, p);
}

/* tc: an ARP message -- Ethernet/IPv4, request or reply, 28 bytes, or padded
 * with zeros to the minimum frame.  Anything else under the ARP ethertype is
 * not ARP. */
static __always_inline int ksbpf_arp(const struct ksbpf_at *at)
{
	__u32 len = ksbpf_l3_len(at);
	__u8 h[8];
	__u8 tail[KSBPF_ARP_MAX - KSBPF_ARP_LEN];
	int i;

	if (len < KSBPF_ARP_LEN || len > KSBPF_ARP_MAX || ksbpf_load(at, 0, h, sizeof(h)))
		return 0;
	/* htype 1 (Ethernet), ptype 0x0800 (IPv4), hlen 6, plen 4, op 1 or 2 */
	if (h[0] != 0 || h[1] != 1 || h[2] != 0x08 || h[3] != 0 || h[4] != 6 || h[5] != 4 ||
	    h[6] != 0 || (h[7] != 1 && h[7] != 2))
		return 0;
	if (len == KSBPF_ARP_LEN)
		return 1;
	/* the last bytes of the frame (tc: a helper reads them): the padding is
	 * the last len - 28 of them */
	if (bpf_skb_load_bytes(at->skb, at->nh + len - sizeof(tail), tail, sizeof(tail)))
		return 0;
#pragma unroll
	for (i = 0; i < (int)sizeof(tail); i++)
		if (i >= (int)(KSBPF_ARP_MAX - len) && tail[i])
			return 0;
	return 1;
}

static __always_inline int ksbpf_is_dns(const struct ksbpf_pkt *p)
{
	return p->has_ports && (p->dport == bpf_htons(53) || p->dport == bpf_htons(853));
}

/* The fixed LAN list (ksbpf/policy.py LAN_RANGES; tests check the two agree):
 * never "what the current network says is on-link" (TunnelCrack LocalNet). */
static __always_inline int ksbpf_lan4(__be32 daddr)
{
	__u32 a = bpf_ntohl(daddr);

	return (a >> 24) == 10 ||			/* 10.0.0.0/8 */
	       (a >> 20) == (172 << 4 | 1) ||		/* 172.16.0.0/12 */
	       (a >> 16) == (192 << 8 | 168) ||		/* 192.168.0.0/16 */
	       (a >> 16) == (169 << 8 | 254) ||		/* 169.254.0.0/16 */
	       (a >> 8) == (224 << 16) ||		/* 224.0.0.0/24, link-local multicast */
	       a == 0xffffffff;				/* local broadcast */
}

static __always_inline int ksbpf_lan6(const __u8 *a)
{
	return ksbpf_link_local6(a) ||				/* fe80::/10 */
	       (a[0] & 0xfe) == 0xfc ||				/* fc00::/7 */
	       ksbpf_link_mcast6(a);				/* ff02::/16, link-local multicast */
}

#ifdef KSBPF_OPT_DHCP
/* tc: from a socket of this machine (the node scope's namespace): a forwarded
 * packet has none (IP input orphans it), and a container's bridged frame
 * carries a socket of another namespace.  The cgroup hook: always. */
static __always_inline int ksbpf_own_socket(const struct ksbpf_at *at)
{
	int zero = 0;
	__u64 *cookie;

	if (at->hook == KSBPF_HOOK_CGROUP)
		return 1;
	if (at->hook == KSBPF_HOOK_NF)		/* the hook is the node namespace's: a local socket, or forwarded */
		return at->sk != 0;
	if (!bpf_skb_cgroup_id(at->skb))	/* no full socket */
		return 0;
#ifdef KSBPF_TC_NETNS_HELPER
	cookie = scope_netns.lookup(&zero);
	return cookie && *cookie == bpf_get_netns_cookie(at->skb);
#else
	/* tc programs cannot ask a socket's namespace before Linux 6.15: a
	 * socket, whichever namespace's (the destination and size rules above
	 * still bound what it may send) */
	return 1;
#endif
}

/* DHCP client traffic of the machine's own client: DHCPv4 68 -> 67 to the
 * broadcast address or a LAN server (the fixed private and link-local
 * ranges), DHCPv6 546 -> 547 to ff02::1:2 or a link-local server; no bigger
 * than a DHCP message. */
static __always_inline int ksbpf_dhcp(const struct ksbpf_at *at, const struct ksbpf_pkt *p)
{
	const __u8 *a = p->daddr.v6;
	__u32 d;

	if (!p->has_ports || p->l4proto != IPPROTO_UDP || ksbpf_l3_len(at) > KSBPF_DHCP_MAX)
		return 0;
	if (p->family == KSBPF_FAMILY_IPV6) {
		if (p->sport != bpf_htons(546) || p->dport != bpf_htons(547))
			return 0;
		if (!ksbpf_link_local6(a) &&
		    !(a[0] == 0xff && a[1] == 0x02 && a[2] == 0 && a[3] == 0 && a[4] == 0 && a[5] == 0 &&
		      a[6] == 0 && a[7] == 0 && a[8] == 0 && a[9] == 0 && a[10] == 0 && a[11] == 0 &&
		      a[12] == 0 && a[13] == 1 && a[14] == 0 && a[15] == 2))	/* ff02::1:2 */
			return 0;
	} else {
		if (p->sport != bpf_htons(68) || p->dport != bpf_htons(67))
			return 0;
		d = bpf_ntohl(p->daddr.v4);
		if (!(d == 0xffffffff || (d >> 24) == 10 || (d >> 20) == (172 << 4 | 1) ||
		      (d >> 16) == (192 << 8 | 168) || (d >> 16) == (169 << 8 | 254)))
			return 0;
	}
	return ksbpf_own_socket(at);
}
#endif

/* The endpoint entry of an address: its slot, or the hash when the slot is
 * shared; 0 when the address is no endpoint. */
static __always_inline struct ksbpf_endpoint *ksbpf_endpoint4(__be32 addr)
{
	const __u8 *a = (const __u8 *)&addr;
	__u32 slot = a[2] ^ a[3];
	struct ksbpf_ep_slot *s = ep_slots.lookup(&slot);
	__u32 n;

	if (!s)
		return 0;
	n = s->count;
	if (n == 1)
		return *(__u32 *)s->addr == addr ? &s->ep : 0;
	return n ? endpoints4.lookup(&addr) : 0;
}

static __always_inline struct ksbpf_endpoint *ksbpf_endpoint6(struct ksbpf_ep6_key *key)
{
	const __u32 *a = (const __u32 *)key->addr;
	__u32 slot = 256 + (key->addr[14] ^ key->addr[15]);
	struct ksbpf_ep_slot *s = ep_slots.lookup(&slot);
	const __u32 *b;
	__u32 n;

	if (!s)
		return 0;
	n = s->count;
	if (n == 1) {
		b = (const __u32 *)s->addr;
		return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] ? &s->ep : 0;
	}
	return n ? endpoints6.lookup(key) : 0;
}

/* The exceptions for traffic that does not leave through a tunnel, in
 * order: endpoint (one lookup: the address, then its ports), LAN, DHCP. */
static __always_inline int ksbpf_endpoint(const struct ksbpf_pkt *p, const struct ksbpf_endpoint *ep)
{
	int i;

	if (p->has_ports) {
#pragma unroll
		for (i = 0; i < KSBPF_EP_PORTS; i++) {
			if (i >= ep->n)
				break;
			if (ep->ports[i].port == p->dport && ep->ports[i].proto == p->l4proto)
				return KSBPF_ALLOW_ENDPOINT;
		}
	}
	return KSBPF_DROP_ENDPOINT_MISMATCH;
}

static __always_inline int ksbpf_lan(const struct ksbpf_pkt *p)
{
#ifndef KSBPF_OPT_LAN_DNS
	if (ksbpf_is_dns(p))
		return KSBPF_DROP_LAN_DNS;
#endif
	return KSBPF_ALLOW_LAN;
}

static __always_inline int ksbpf_last_resort(const struct ksbpf_at *at, const struct ksbpf_pkt *p)
{
#ifdef KSBPF_OPT_DHCP
	if (ksbpf_dhcp(at, p))
		return KSBPF_ALLOW_DHCP;
#endif
	return KSBPF_DROP_NOT_TUNNEL;
}

#ifdef KSBPF_OPT_CIDRS
static __always_inline int ksbpf_allowed_cidr(const struct ksbpf_pkt *p)
{
	struct ksbpf_cidr4_key k4 = { .prefixlen = 32 };
	struct ksbpf_cidr6_key k6 = { .prefixlen = 128 };

	if (p->family == KSBPF_FAMILY_IPV4) {
		__builtin_memcpy(k4.addr, &p->daddr.v4, 4);
		return cidrs4.lookup(&k4) != 0;
	}
	__builtin_memcpy(k6.addr, p->daddr.v6, 16);
	return cidrs6.lookup(&k6) != 0;
}
#endif

#ifdef KSBPF_OPT_VPN
/* Is the packet the VPN client's own?  Its firewall mark (which only
 * CAP_NET_ADMIN can set, and which the kernel clears when a packet crosses
 * into another namespace) or its socket's cgroup.  Netfilter programs have
 * no cgroup helper: there only the mark tells (fail closed). */
static __always_inline int ksbpf_vpn_client(const struct ksbpf_at *at)
{
#ifdef KSBPF_OPT_VPN_MARK
	{
		int zero = 0;
		struct ksbpf_vpn_mark *m = vpn_mark.lookup(&zero);
		__u32 mark = at->hook == KSBPF_HOOK_NF ? at->mark : at->skb->mark;

		if (m && (mark & m->mask) == m->mark)
			return 1;
	}
#endif
#ifdef KSBPF_OPT_VPN_CGROUP
	if (at->hook != KSBPF_HOOK_NF) {
		int i;

#pragma unroll
		for (i = 0; i < KSBPF_MAX_VPN_CGROUPS; i++) {
			int k = i;
			struct ksbpf_exempt *e = vpn_cgroups.lookup(&k);

			if (!e || !e->cgroup_id)
				return 0;
			if (bpf_skb_ancestor_cgroup_id(at->skb, e->level) == e->cgroup_id)
				return 1;
		}
	}
#endif
	return 0;
}

/* An endpoint's packet passes only when it is the VPN client's. */
static __always_inline int ksbpf_vpn_only(const struct ksbpf_at *at, int reason)
{
	if (reason != KSBPF_ALLOW_ENDPOINT || ksbpf_vpn_client(at))
		return reason;
	return KSBPF_DROP_ENDPOINT_NOT_VPN;
}

/* A wildcard endpoint: any address on this (port, protocol). */
static __always_inline int ksbpf_ep_any(const struct ksbpf_pkt *p)
{
	struct ksbpf_ep_any_key k = { .port = p->dport, .proto = p->l4proto };

	return p->has_ports && ep_any.lookup(&k) != 0;
}
#define KSBPF_ENDPOINT(at, p, ep) ksbpf_vpn_only(at, ksbpf_endpoint(p, ep))
#else
#define KSBPF_ENDPOINT(at, p, ep) ksbpf_endpoint(p, ep)
#endif

static __always_inline int ksbpf_exceptions4(const struct ksbpf_at *at, const struct ksbpf_pkt *p)
{
	__be32 addr = p->daddr.v4;
	struct ksbpf_endpoint *ep;

	if (p->fragment)
		return KSBPF_DROP_FRAGMENT;
	ep = ksbpf_endpoint4(addr);
	if (ep)
		return KSBPF_ENDPOINT(at, p, ep);
#ifdef KSBPF_OPT_DNS
	/* --dns: DNS outside the tunnel goes nowhere (the VPN's own endpoint above
	 * excepted), on every hook: a LAN resolver with --allow-lan too */
	if (ksbpf_is_dns(p))
		return KSBPF_DROP_DNS_NOT_VPN;
#endif
#ifdef KSBPF_OPT_CIDRS
	if (ksbpf_allowed_cidr(p))
		return KSBPF_ALLOW_LAN;
#endif
#ifdef KSBPF_OPT_LAN
	if (ksbpf_lan4(addr))
		return ksbpf_lan(p);
#endif
#ifdef KSBPF_OPT_VPN
	if (ksbpf_ep_any(p))
		return ksbpf_vpn_only(at, KSBPF_ALLOW_ENDPOINT);
#endif
	return ksbpf_last_resort(at, p);
}

static __always_inline int ksbpf_exceptions6(const struct ksbpf_at *at, const struct ksbpf_pkt *p)
{
	struct ksbpf_ep6_key key;
	struct ksbpf_endpoint *ep;

	if (p->fragment)
		return KSBPF_DROP_FRAGMENT;
	__builtin_memcpy(key.addr, p->daddr.v6, 16);
	ep = ksbpf_endpoint6(&key);
	if (ep)
		return KSBPF_ENDPOINT(at, p, ep);
#ifdef KSBPF_OPT_DNS
	/* --dns: DNS outside the tunnel goes nowhere (the VPN's own endpoint above
	 * excepted), on every hook: a LAN resolver with --allow-lan too */
	if (ksbpf_is_dns(p))
		return KSBPF_DROP_DNS_NOT_VPN;
#endif
#ifdef KSBPF_OPT_CIDRS
	if (ksbpf_allowed_cidr(p))
		return KSBPF_ALLOW_LAN;
#endif
#ifdef KSBPF_OPT_LAN
	if (ksbpf_lan6(key.addr))
		return ksbpf_lan(p);
#endif
#ifdef KSBPF_OPT_VPN
	if (ksbpf_ep_any(p))
		return ksbpf_vpn_only(at, KSBPF_ALLOW_ENDPOINT);
#endif
	return ksbpf_last_resort(at, p);
}

/* Is this a `ksbpf verify` test run (skb->cb carries the scope's nonce)?  A
 * real packet never is: the kernel zeroes cb before a cgroup_skb program
 * that reads it runs, and at tc whatever another layer left in cb does not
 * guess 128 random bits.  One context load on every path; the map only
 * when cb[0] is not zero. */
static __always_inline int ksbpf_verify_run(struct __sk_buff *skb)
{
	struct ksbpf_nonce *n;
	int zero = 0;
	__u32 c0 = skb->cb[0];

	if (!c0)
		return 0;
	n = verify_nonce.lookup(&zero);
	return n && n->w[0] == c0 && n->w[1] == skb->cb[1] && n->w[2] == skb->cb[2] && n->w[3] == skb->cb[3];
}

/* A `ksbpf verify` test run carries no socket of the scope: the namespace it
 * stands for is the nonce's. */
static __always_inline __u64 ksbpf_verify_netns(struct __sk_buff *skb)
{
	struct ksbpf_nonce *n;
	int zero = 0;

	if (!ksbpf_verify_run(skb))
		return 0;
	n = verify_nonce.lookup(&zero);
	return n ? n->netns_cookie : 0;
}

/* The network namespace of the egress interface: at the cgroup hook the
 * namespace of the sending socket (a packet leaves through an interface of
 * its socket's namespace); at tc the node scope's, where every guarded
 * interface lives.  0 when unknown: no namespace has cookie 0. */
static __always_inline __u64 ksbpf_netns_cookie(const struct ksbpf_at *at)
{
	int zero = 0;
	__u64 *cookie;

	if (at->hook == KSBPF_HOOK_CGROUP) {
#ifdef KSBPF_NETNS_HELPER
		return bpf_get_netns_cookie(at->skb);
#else
		struct bpf_sock *sk = at->skb->sk;
		struct ksbpf_sk *st;

		/* the helper takes the socket as the hook has it (a full socket
		 * at egress; it checks) since Linux 5.11: no bpf_sk_fullsock */
		if (sk) {
			st = sk_netns.sk_storage_get(sk, 0, 0);
			if (st)
				return st->netns_cookie;
		}
		return ksbpf_verify_netns(at->skb);
#endif
	}
	cookie = scope_netns.lookup(&zero);
	return cookie ? *cookie : 0;
}

/* Cgroup hook, a scope of one namespace: is every socket that can send here
 * in that namespace?  Then the tunnel filter's answer (the one namespace with
 * a tunnel of this ifindex, the scope's own) needs no per-packet check of the
 * packet's namespace, which costs a helper call.  The loader allows it only
 * for a scope attached while no process ran in it (no socket older than the
 * sock_create program), and the sock_create program forbids it for good at
 * the first socket made in another namespace -- before that socket can send.
 * A verify run (cb[0] set: the kernel zeroes cb for real packets when a
 * cgroup program reads it) always asks: it stands for a namespace. */
static __always_inline int ksbpf_netns_fast(struct __sk_buff *skb)
{
	int allowed = KSBPF_FAST_ALLOWED, foreign = KSBPF_FAST_FOREIGN;
	__u32 *a, *f;

	if (skb->cb[0])
		return 0;
	a = netns_fast.lookup(&allowed);
	if (!a || !*a)
		return 0;	/* a scope that asks on every packet pays one lookup here */
	f = netns_fast.lookup(&foreign);
	return f && !*f;
}

/* Does the packet leave through a registered tunnel?  The ifindex filter
 * (an array: inlined by the verifier, no helper call, no hashing) rules most
 * interfaces out, and when a single namespace has a tunnel with that ifindex
 * it holds that namespace's cookie, which decides; only an ifindex that is a
 * tunnel in several namespaces (or one past the filter) takes the (netns
 * cookie, ifindex) hash.  (In node mode tunnels carry no guard, so only a
 * guarded interface that became a tunnel gets past the filter.) */
static __always_inline int ksbpf_via_tunnel(const struct ksbpf_at *at, __u32 ifindex)
{
	struct ksbpf_tunnel_key tk = { .ifindex = ifindex };
	__u64 who = KSBPF_TUNNEL_SEVERAL;
	__u64 *f;

	if (ifindex < KSBPF_IFINDEX_FILTER) {
		f = tunnel_ifindex.lookup(&ifindex);
		who = f ? *f : 0;	/* read once: the daemon may rewrite it meanwhile */
		if (!who)
			return 0;
	}
	if (who != KSBPF_TUNNEL_SEVERAL) {
		if (at->hook == KSBPF_HOOK_CGROUP && ksbpf_netns_fast(at->skb))
			return 1;
		return who == ksbpf_netns_cookie(at);
	}
	tk.netns_cookie = ksbpf_netns_cookie(at);
	return tunnels.lookup(&tk) != 0;
}

/* Node mode: is the packet from a local socket of an exempted cgroup
 * subtree?  (A forwarded packet has no socket: never.) */
static __always_inline int ksbpf_exempted(struct __sk_buff *skb)
{
	struct ksbpf_exempt *e;
	int i;

#pragma unroll
	for (i = 0; i < KSBPF_MAX_EXEMPT; i++) {
		int k = i;

		e = exempt.lookup(&k);
		if (!e || !e->cgroup_id)
			return 0;
		if (bpf_skb_ancestor_cgroup_id(skb, e->level) == e->cgroup_id)
			return 1;
	}
	return 0;
}

#ifdef KSBPF_OPT_DNS
/* Is the destination one of the VPN's resolvers? */
static __always_inline int ksbpf_resolver(const struct ksbpf_pkt *p)
{
	struct ksbpf_ep6_key k;
	__be32 a;

	if (p->family == KSBPF_FAMILY_IPV4) {
		a = p->daddr.v4;
		return dns4.lookup(&a) != 0;
	}
	__builtin_memcpy(k.addr, p->daddr.v6, 16);
	return dns6.lookup(&k) != 0;
}

/* The cgroup hook with --dns: the packet is parsed before the loopback and
 * tunnel rules, so that DNS to a resolver that is not the VPN's is dropped
 * wherever it goes -- a stub resolver on loopback (127.0.0.53, which would
 * forward it outside the scope), another resolver through the tunnel.  A
 * packet that does not parse keeps the rules it had: loopback and the tunnel
 * let it go, anything else drops it as malformed. */
static __always_inline int ksbpf_decide_dns(const struct ksbpf_at *at, __u32 ifindex, struct ksbpf_pkt *p)
{
	int bad = 1;

	if (p->family == KSBPF_FAMILY_IPV4)
		bad = ksbpf_parse4(at, p);
	else if (p->family == KSBPF_FAMILY_IPV6)
		bad = ksbpf_parse6(at, p);
	if (ifindex == 1 || ksbpf_via_tunnel(at, ifindex)) {
		if (!bad && ksbpf_is_dns(p) && !ksbpf_resolver(p))
			return KSBPF_DROP_DNS_NOT_VPN;
		return ifindex == 1 ? KSBPF_ALLOW_LOOPBACK : KSBPF_ALLOW_TUNNEL;
	}
	if (p->family == KSBPF_FAMILY_OTHER)
		return KSBPF_DROP_NOT_IP;
	if (bad)
		return KSBPF_DROP_MALFORMED;
	return p->family == KSBPF_FAMILY_IPV4 ? ksbpf_exceptions4(at, p) : ksbpf_exceptions6(at, p);
}

/* Node mode with --dns (tc, netfilter): a packet out through a registered
 * tunnel is parsed, and DNS in it to a resolver that is not the VPN's (a
 * hard-coded 8.8.8.8, a container's own choice) is dropped.  Loopback stays
 * allowed there: a local stub resolver's upstream queries leave the node and
 * are judged themselves.  A packet that does not parse goes through the
 * tunnel as without --dns. */
static __always_inline int ksbpf_tunnel_dns(const struct ksbpf_at *at, struct ksbpf_pkt *p)
{
	int bad = 1;

	if (p->family == KSBPF_FAMILY_IPV4)
		bad = ksbpf_parse4(at, p);
	else if (p->family == KSBPF_FAMILY_IPV6)
		bad = ksbpf_parse6(at, p);
	if (!bad && ksbpf_is_dns(p) && !ksbpf_resolver(p))
		return KSBPF_DROP_DNS_NOT_VPN;
	return KSBPF_ALLOW_TUNNEL;
}
#endif

static __always_inline int ksbpf_decide(const struct ksbpf_at *at, __be16 proto, struct ksbpf_pkt *p)
{
	__u32 ifindex = at->hook == KSBPF_HOOK_NF ? at->ifindex : at->skb->ifindex;	/* read once */

	p->family = proto == bpf_htons(ETH_P_IP) ? KSBPF_FAMILY_IPV4 :
		    proto == bpf_htons(ETH_P_IPV6) ? KSBPF_FAMILY_IPV6 : KSBPF_FAMILY_OTHER;
#ifdef KSBPF_OPT_DNS
	if (at->hook == KSBPF_HOOK_CGROUP)
		return ksbpf_decide_dns(at, ifindex, p);
#endif
	if (ifindex == 1)		/* LOOPBACK_IFINDEX, the same in every netns */
		return KSBPF_ALLOW_LOOPBACK;
	if (ksbpf_via_tunnel(at, ifindex)) {
#ifdef KSBPF_OPT_DNS
		return ksbpf_tunnel_dns(at, p);	/* node mode (the cgroup hook decided above) */
#else
		return KSBPF_ALLOW_TUNNEL;
#endif
	}
	if (p->family == KSBPF_FAMILY_IPV4) {
		if (ksbpf_parse4(at, p))
			return KSBPF_DROP_MALFORMED;
		return ksbpf_exceptions4(at, p);
	}
	if (p->family == KSBPF_FAMILY_IPV6) {
		if (ksbpf_parse6(at, p))
			return KSBPF_DROP_MALFORMED;
		if (at->hook != KSBPF_HOOK_CGROUP && ksbpf_nd(at, p))
			return KSBPF_ALLOW_NEIGH;
		return ksbpf_exceptions6(at, p);
	}
	if (at->hook == KSBPF_HOOK_TC && proto == bpf_htons(ETH_P_ARP) && ksbpf_arp(at))
		return KSBPF_ALLOW_NEIGH;
	return KSBPF_DROP_NOT_IP;
}

/* THE policy.  proto is the packet's ethertype as sent.  Returns a reason
 * (ksbpf.h); fills *p as far as it parsed. */
static __always_inline int ksbpf_policy(const struct ksbpf_at *at, __be16 proto, struct ksbpf_pkt *p)
{
	int reason = ksbpf_decide(at, proto, p);

	if (at->hook == KSBPF_HOOK_TC && reason >= KSBPF_FIRST_DROP && ksbpf_exempted(at->skb))
		return KSBPF_ALLOW_EXEMPT;
	return reason;
}

static __always_inline void ksbpf_count(const struct ksbpf_at *at, int reason, const struct ksbpf_pkt *p)
{
	int key = reason * KSBPF_FAMILY_MAX + p->family;
	struct ksbpf_counter *c = counters.lookup(&key);

	if (c) {
		c->packets++;
		c->bytes += at->hook == KSBPF_HOOK_NF ? at->len : at->skb->len;
	}
}

#ifdef KSBPF_EVENTS_INTERVAL_NS
/* May this CPU send another sample?  A token bucket: one token per
 * KSBPF_EVENTS_INTERVAL_NS, at most KSBPF_EVENTS_BURST saved up.  It reads
 * the coarse clock (no TSC read: a flood pays little for being limited). */
static __always_inline int ksbpf_take_token(struct ksbpf_bucket *b, int hook)
{
	__u64 now, earned;

	if (!b->tokens) {
#ifdef KSBPF_NO_COARSE_CLOCK
		now = bpf_ktime_get_ns();
#else
		/* No token is earned within the tick of the last reading (the
		 * interval is at least a tick): bpf_jiffies64 is a load (the
		 * verifier inlines it), a clock a helper call, so a flood of drops
		 * pays the load.  Netfilter programs may not read the coarse
		 * clock: they read the precise one, once a tick. */
		now = bpf_jiffies64();
		if (now == b->last_jiffies)
			return 0;
		b->last_jiffies = now;
		now = hook == KSBPF_HOOK_NF ? bpf_ktime_get_ns() : bpf_ktime_get_coarse_ns();
#endif
		if (now - b->last_ns < KSBPF_EVENTS_INTERVAL_NS)
			return 0;	/* no token earned yet, and no division */
		earned = (now - b->last_ns) / KSBPF_EVENTS_INTERVAL_NS;
		b->tokens = earned < KSBPF_EVENTS_BURST ? earned : KSBPF_EVENTS_BURST;
		b->last_ns = earned < KSBPF_EVENTS_BURST ? b->last_ns + earned * KSBPF_EVENTS_INTERVAL_NS : now;
	}
	b->tokens--;
	return 1;
}

static __always_inline void ksbpf_report(const struct ksbpf_at *at, int reason, const struct ksbpf_pkt *p)
{
	int zero = 0;
	struct ksbpf_bucket *b = bucket.lookup(&zero);
	struct ksbpf_event *ev;

	if (!b)
		return;
	if (!ksbpf_take_token(b, at->hook)) {
		b->suppressed++;
		return;
	}
	ev = events.ringbuf_reserve(sizeof(*ev));
	if (!ev) {
		b->suppressed++;
		return;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts_ns = bpf_ktime_get_ns();
	ev->netns_cookie = ksbpf_netns_cookie(at);
	if (at->hook == KSBPF_HOOK_NF) {
		ev->ifindex = at->ifindex;	/* no cgroup helpers at netfilter: cgroup 0 */
		ev->uid = 65534;
		ev->len = at->len;
	} else {
		ev->cgroup_id = bpf_skb_cgroup_id(at->skb);
		ev->ifindex = at->skb->ifindex;
		ev->uid = bpf_get_socket_uid(at->skb);
		ev->len = at->skb->len;
	}
	ev->sport = p->sport;
	ev->dport = p->dport;
	ev->reason = reason;
	ev->family = p->family;
	ev->proto = p->l4proto;
	ev->hook = at->hook;
	if (p->family == KSBPF_FAMILY_IPV4) {
		ksbpf_load(at, offsetof(struct iphdr, saddr), ev->saddr, 4);
		__builtin_memcpy(ev->daddr, &p->daddr.v4, 4);
	} else if (p->family == KSBPF_FAMILY_IPV6) {
		ksbpf_load(at, offsetof(struct ipv6hdr, saddr), ev->saddr, 16);
		__builtin_memcpy(ev->daddr, p->daddr.v6, 16);
	}
	events.ringbuf_submit(ev, 0);
	b->sent++;
}
#endif

/* Decide, count, report; returns 1 to let the packet go, 0 to drop it. */
static __always_inline int ksbpf_verdict(const struct ksbpf_at *at, __be16 proto)
{
	struct ksbpf_pkt p = {};
	int reason = ksbpf_policy(at, proto, &p);

	if (at->hook != KSBPF_HOOK_NF && ksbpf_verify_run(at->skb))
		return reason < KSBPF_FIRST_DROP;
	ksbpf_count(at, reason, &p);
	if (reason < KSBPF_FIRST_DROP)
		return 1;
#ifdef KSBPF_EVENTS_INTERVAL_NS
	ksbpf_report(at, reason, &p);
#endif
	return 0;
}

/* cgroup_skb/egress: the processes of one cgroup v2.  skb->data is the
 * network header; the kernel set skb->protocol for the socket's packet. */
int ksbpf_cg_egress(struct __sk_buff *skb)
{
	struct ksbpf_at at = KSBPF_AT(skb, KSBPF_HOOK_CGROUP);

	return ksbpf_verdict(&at, skb->protocol);
}

/* tc egress of an Ethernet interface: the frame as it will be sent.  The
 * ethertype is read from the frame (a raw sender chooses skb->protocol),
 * looking through one 802.1Q/802.1ad tag.  Allow = TC_ACT_UNSPEC, which is
 * TCX_NEXT: the next program on the interface decides. */
int ksbpf_tc_eth(struct __sk_buff *skb)
{
	struct ksbpf_at at = KSBPF_AT(skb, KSBPF_HOOK_TC);
	__be16 proto = 0;

	ksbpf_load(&at, ETH_HLEN - 2, &proto, sizeof(proto));
	at.nh = ETH_HLEN;
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
		proto = 0;
		ksbpf_load(&at, 2, &proto, sizeof(proto));	/* the tag's inner ethertype */
		at.nh = ETH_HLEN + KSBPF_VLAN_HLEN;
	}
	return ksbpf_verdict(&at, proto) ? TC_ACT_UNSPEC : TC_ACT_SHOT;
}

/* tc egress of an interface without a link-layer header (tun, ppp, ...):
 * the frame is the IP packet; its version says which. */
int ksbpf_tc_l3(struct __sk_buff *skb)
{
	struct ksbpf_at at = KSBPF_AT(skb, KSBPF_HOOK_TC);
	__u8 v = 0;
	__be16 proto = 0;

	if (!ksbpf_load(&at, 0, &v, 1))
		proto = v >> 4 == 4 ? bpf_htons(ETH_P_IP) : v >> 4 == 6 ? bpf_htons(ETH_P_IPV6) : 0;
	return ksbpf_verdict(&at, proto) ? TC_ACT_UNSPEC : TC_ACT_SHOT;
}

#ifdef KSBPF_OFF_NF_HOOK_STATE_OUT
/* Netfilter NF_INET_POST_ROUTING (node mode, IPv4 and IPv6 links): every IP
 * packet leaving the namespace, local or forwarded, with its output device --
 * on interfaces created after attaching too, which no tc guard can cover
 * before it exists.  nf_pass[ifindex] (kept by the loader and the daemon) is
 * set for the interfaces this hook leaves to others: loopback, the tunnels,
 * the internal interfaces and the interfaces whose tc guard is in force (the
 * guard judges and counts them, exemptions included).  Everything else is
 * decided by the policy.  Struct offsets come from the running kernel's BTF
 * (-DKSBPF_OFF_*, ksbpf/kernel/btf.py); struct fields are plain loads the
 * verifier checks against BTF, packet bytes are read with
 * bpf_probe_read_kernel within the linear data.  Returns NF_DROP (0) or
 * NF_ACCEPT (1). */
#define KSBPF_NF_DROP 0
#define KSBPF_NF_ACCEPT 1
#define KSBPF_NFPROTO_IPV4 2
#define KSBPF_NFPROTO_IPV6 10
BPF_ARRAY(nf_pass, __u32, KSBPF_IFINDEX_FILTER);

struct ksbpf_nf_ctx {	/* struct bpf_nf_ctx */
	void *state;	/* const struct nf_hook_state * */
	void *skb;	/* struct sk_buff * */
};

int ksbpf_nf(struct ksbpf_nf_ctx *ctx)
{
	void *state = ctx->state;
	void *kskb = ctx->skb;
	void *dev = 0, *head = 0, *sk = 0;
	__u32 *pass, ifindex = 0, tail = 0, len = 0, mark = 0;
	__u16 nh = 0;
	__u8 pf = 0;

	/* Plain loads, checked by the verifier against the kernel's BTF (and
	 * fault-safe: a NULL device reads as ifindex 0). */
	dev = *(void **)(state + KSBPF_OFF_NF_HOOK_STATE_OUT);
	ifindex = *(__u32 *)(dev + KSBPF_OFF_NET_DEVICE_IFINDEX);
	pass = nf_pass.lookup(&ifindex);
	if (pass && *pass)
		return KSBPF_NF_ACCEPT;
	pf = *(__u8 *)(state + KSBPF_OFF_NF_HOOK_STATE_PF);
	head = *(void **)(kskb + KSBPF_OFF_SK_BUFF_HEAD);
	nh = *(__u16 *)(kskb + KSBPF_OFF_SK_BUFF_NETWORK_HEADER);
	tail = *(__u32 *)(kskb + KSBPF_OFF_SK_BUFF_TAIL);
	len = *(__u32 *)(kskb + KSBPF_OFF_SK_BUFF_LEN);
	sk = *(void **)(kskb + KSBPF_OFF_SK_BUFF_SK);
#ifdef KSBPF_OPT_VPN_MARK
	mark = *(__u32 *)(kskb + KSBPF_OFF_SK_BUFF_MARK);
#endif
	{
		/* built after the reads: its hook must be a constant the compiler sees */
		struct ksbpf_at at = { .skb = 0, .data = head + nh, .end = 0, .nh = 0, .hook = KSBPF_HOOK_NF,
				       .ifindex = ifindex, .len = len, .linear = tail > nh ? tail - nh : 0, .sk = sk,
				       .mark = mark };

		return ksbpf_verdict(&at, pf == KSBPF_NFPROTO_IPV4 ? bpf_htons(ETH_P_IP) :
					  pf == KSBPF_NFPROTO_IPV6 ? bpf_htons(ETH_P_IPV6) : 0) ?
		       KSBPF_NF_ACCEPT : KSBPF_NF_DROP;
	}
}
/* Netfilter NF_INET_POST_ROUTING in each namespace where a cgroup scope's
 * tunnel lives (IPv4 and IPv6 links): a packet whose SOURCE address is one of
 * the scope's tunnel addresses (map tunnel_src, kept by the loader and the
 * daemon) may leave only through that tunnel (or another registered tunnel
 * of the namespace: the hot path, one array lookup, decides without the
 * packet).  The kernel sends packets for a
 * scope without the scope's socket -- TIME_WAIT answers and RSTs from TCP's
 * control socket (whose cgroup is the root), ICMP errors -- which the cgroup
 * hook never sees; here they are dropped (tunnel_source) when the tunnel is
 * gone or a route sends them elsewhere.  Everything else is not this hook's
 * business: NF_ACCEPT. */
BPF_HASH(tunnel_src, struct ksbpf_src_key, struct ksbpf_src, KSBPF_MAX_TUNNEL_ADDRS);

int ksbpf_nf_src(struct ksbpf_nf_ctx *ctx)
{
	void *state = ctx->state;
	void *kskb = ctx->skb;
	struct ksbpf_src_key key = {};
	struct ksbpf_src *src;
	void *dev, *head, *net;
	__u32 ifindex, tail, len, linear;
	__u16 nh;
	__u8 pf;

	dev = *(void **)(state + KSBPF_OFF_NF_HOOK_STATE_OUT);
	ifindex = *(__u32 *)(dev + KSBPF_OFF_NET_DEVICE_IFINDEX);
	if (ifindex == 1)	/* loopback: to the machine itself */
		return KSBPF_NF_ACCEPT;
	net = *(void **)(state + KSBPF_OFF_NF_HOOK_STATE_NET);
	key.netns_cookie = *(__u64 *)(net + KSBPF_OFF_NET_NET_COOKIE);
	if (ifindex < KSBPF_IFINDEX_FILTER) {
		/* the hot path: out through a registered tunnel of this namespace, whatever the source */
		__u64 *f = tunnel_ifindex.lookup(&ifindex);

		if (f && *f == key.netns_cookie)
			return KSBPF_NF_ACCEPT;
	}
	pf = *(__u8 *)(state + KSBPF_OFF_NF_HOOK_STATE_PF);
	head = *(void **)(kskb + KSBPF_OFF_SK_BUFF_HEAD);
	nh = *(__u16 *)(kskb + KSBPF_OFF_SK_BUFF_NETWORK_HEADER);
	tail = *(__u32 *)(kskb + KSBPF_OFF_SK_BUFF_TAIL);
	linear = tail > nh ? tail - nh : 0;
	if (pf == KSBPF_NFPROTO_IPV4) {
		if (linear < sizeof(struct iphdr) ||
		    ksbpf_read_kernel(&key.addr[12], 4, head + nh + offsetof(struct iphdr, saddr)))
			return KSBPF_NF_ACCEPT;
		key.addr[10] = 0xff;
		key.addr[11] = 0xff;
	} else if (pf == KSBPF_NFPROTO_IPV6) {
		if (linear < sizeof(struct ipv6hdr) ||
		    ksbpf_read_kernel(key.addr, 16, head + nh + offsetof(struct ipv6hdr, saddr)))
			return KSBPF_NF_ACCEPT;
	} else {
		return KSBPF_NF_ACCEPT;
	}
	src = tunnel_src.lookup(&key);
	if (!src)
		return KSBPF_NF_ACCEPT;
	if (src->ifindex && src->ifindex == ifindex)
		return KSBPF_NF_ACCEPT;
	{
		char name[16] = {};
		__u64 *a = (__u64 *)name, *b = (__u64 *)src->name;

		if (!ksbpf_read_kernel(name, sizeof(name), dev + KSBPF_OFF_NET_DEVICE_NAME) &&
		    src->name[0] && a[0] == b[0] && a[1] == b[1])
			return KSBPF_NF_ACCEPT;	/* the tunnel, re-created with another ifindex */
	}
	len = *(__u32 *)(kskb + KSBPF_OFF_SK_BUFF_LEN);
	{
		struct ksbpf_at at = { .skb = 0, .data = head + nh, .end = 0, .nh = 0, .hook = KSBPF_HOOK_NF,
				       .ifindex = ifindex, .len = len, .linear = linear };
		struct ksbpf_pkt p = {};

		p.family = pf == KSBPF_NFPROTO_IPV4 ? KSBPF_FAMILY_IPV4 : KSBPF_FAMILY_IPV6;
		if (p.family == KSBPF_FAMILY_IPV4)
			ksbpf_parse4(&at, &p);	/* for the event sample only: the verdict is made */
		else
			ksbpf_parse6(&at, &p);
		ksbpf_count(&at, KSBPF_DROP_TUNNEL_SOURCE, &p);
#ifdef KSBPF_EVENTS_INTERVAL_NS
		ksbpf_report(&at, KSBPF_DROP_TUNNEL_SOURCE, &p);
#endif
	}
	return KSBPF_NF_DROP;
}
#endif

/* cgroup/sock_create: a socket of the scope is being created.
 *
 * Without KSBPF_NETNS_HELPER it records the socket's network namespace in
 * sk_netns, where the cgroup hook reads it; a socket whose storage cannot be
 * made is refused (EPERM now, rather than a socket whose every packet is
 * dropped).
 *
 * --netns each: it also reports a socket created in a network namespace the
 * daemon does not know yet -- a process that moved into an already populated
 * cgroup, or that entered another namespace, raises no cgroup event.  The
 * first socket of each unknown namespace is reported to the daemon (one
 * report per namespace: the entry marked "reported" is the rate limit); it
 * looks the namespace's tunnels up.  Until then the egress policy drops that
 * namespace's non-local traffic.  (A scope of one namespace marks it known.)
 *
 * A socket in a namespace the scope does not know also ends netns_fast: the
 * egress program asks every packet's namespace from then on. */
BPF_HASH(netns_known, __u64, __u32, KSBPF_MAX_NETNS);
BPF_RINGBUF_OUTPUT(netns_events, 1);

int ksbpf_sk_create(struct bpf_sock *sk)
{
	__u64 cookie = bpf_get_netns_cookie(sk);
	__u32 reported = KSBPF_NETNS_REPORTED, *foreign;
	int key = KSBPF_FAST_FOREIGN;
	struct ksbpf_netns_event *ev;
#ifndef KSBPF_NETNS_HELPER
	struct ksbpf_sk *st = sk_netns.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);

	if (!st)
		return 0;
	st->netns_cookie = cookie;
#endif
	if (netns_known.lookup(&cookie))
		return 1;
	/* a namespace that is not the scope's: the egress program asks each
	 * packet of the scope for its namespace from now on */
	foreign = netns_fast.lookup(&key);
	if (foreign)
		*foreign = 1;
	if (netns_known.insert(&cookie, &reported))
		return 1;	/* reported meanwhile by another CPU, or the map is full */
	ev = netns_events.ringbuf_reserve(sizeof(*ev));
	if (!ev)
		return 1;
	ev->netns_cookie = cookie;
	ev->cgroup_id = bpf_get_current_cgroup_id();
	ev->pid = bpf_get_current_pid_tgid() >> 32;
	ev->pad = 0;
	netns_events.ringbuf_submit(ev, 0);
	return 1;
}

#ifdef KSBPF_OPT_DNS
/* --dns, cgroup/connect4/6 and cgroup/sendmsg4/6: a DNS destination (TCP or
 * UDP, port 53 or 853) that is not one of the VPN's resolvers is rewritten to
 * the first resolver of its family (dns_target), and the destination the
 * application gave is recorded under the socket's cookie (dns_orig);
 * cgroup/recvmsg4/6 give an answer from that resolver the source the
 * application expects.  A libc or an application that asks 127.0.0.53 or
 * 8.8.8.8 gets its answer from the VPN's resolver, through the tunnel, and
 * nothing else sees the query.  cgroup/getpeername4/6 do the same for
 * a TCP connection's peer.  Without a resolver of the family the
 * destination stays, and the egress program drops the query (dns_not_vpn).
 * These programs never refuse a call: the egress program decides. */
static __always_inline int ksbpf_dns_port(__u32 port)
{
	return port == bpf_htons(53) || port == bpf_htons(853);
}

static __always_inline int ksbpf_dns_proto(struct bpf_sock_addr *ctx)
{
	__u32 proto = ctx->protocol;

	return proto == IPPROTO_UDP || proto == IPPROTO_TCP;
}

static __always_inline int ksbpf_dns_orig_differs(const struct ksbpf_dns_orig *a, const struct ksbpf_dns_orig *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;

	return x[0] != y[0] || x[1] != y[1] || x[2] != y[2] || x[3] != y[3] || a->port != b->port;
}

/* addr: the destination as 16 bytes (IPv4-mapped for IPv4).  Returns 1 when
 * it was redirected, with *to the resolver. */
static __always_inline int ksbpf_dns_rewrite(struct bpf_sock_addr *ctx, const __u8 *addr, int v4, __u8 *to)
{
	int zero = 0;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct ksbpf_dns_target *t;
	struct ksbpf_dns_orig o = {}, *old;
	struct ksbpf_ep6_key k;
	__be32 a4;

	if (v4) {
		__builtin_memcpy(&a4, addr + 12, 4);
		if (dns4.lookup(&a4))
			goto direct;
	} else {
		__builtin_memcpy(k.addr, addr, 16);
		if (dns6.lookup(&k))
			goto direct;
	}
	t = dns_target.lookup(&zero);
	if (!t || !(v4 ? t->has4 : t->has6))
		return 0;	/* no resolver of the family: the egress program drops the query */
	__builtin_memcpy(o.addr, addr, 16);
	if (v4) {
		o.resolver[10] = 0xff;
		o.resolver[11] = 0xff;
		__builtin_memcpy(o.resolver + 12, &t->v4, 4);
	} else {
		__builtin_memcpy(o.resolver, t->v6, 16);
	}
	o.port = ctx->user_port;
	/* a socket that sends query after query to one place: recorded once
	 * (a lookup costs less than the LRU's update) */
	old = dns_orig.lookup(&cookie);
	if (!old || ksbpf_dns_orig_differs(old, &o))
		dns_orig.update(&cookie, &o);
	__builtin_memcpy(to, o.resolver, 16);
	return 1;
direct:
	/* to a resolver itself: an earlier redirect of this socket no longer applies */
	if (dns_orig.lookup(&cookie))
		dns_orig.delete(&cookie);
	return 0;
}

static __always_inline int ksbpf_dns_out4(struct bpf_sock_addr *ctx)
{
	__u8 addr[16] = {}, to[16];
	__be32 a = ctx->user_ip4;

	if (!ksbpf_dns_port(ctx->user_port) || !ksbpf_dns_proto(ctx))
		return 1;
	addr[10] = 0xff;
	addr[11] = 0xff;
	__builtin_memcpy(addr + 12, &a, 4);
	if (ksbpf_dns_rewrite(ctx, addr, 1, to)) {
		__builtin_memcpy(&a, to + 12, 4);
		ctx->user_ip4 = a;
	}
	return 1;
}

static __always_inline int ksbpf_dns_v4mapped(const __u32 *w)
{
	return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0xffff);
}

static __always_inline int ksbpf_dns_out6(struct bpf_sock_addr *ctx)
{
	__u32 w[4], t[4];

	if (!ksbpf_dns_port(ctx->user_port) || !ksbpf_dns_proto(ctx))
		return 1;
	w[0] = ctx->user_ip6[0];
	w[1] = ctx->user_ip6[1];
	w[2] = ctx->user_ip6[2];
	w[3] = ctx->user_ip6[3];
	/* an IPv4-mapped destination of a dual-stack socket is IPv4 DNS */
	if (!ksbpf_dns_rewrite(ctx, (__u8 *)w, ksbpf_dns_v4mapped(w), (__u8 *)t))
		return 1;
	ctx->user_ip6[0] = t[0];
	ctx->user_ip6[1] = t[1];
	ctx->user_ip6[2] = t[2];
	ctx->user_ip6[3] = t[3];
	return 1;
}

/* recvmsg: a datagram from the resolver a socket's query was redirected to
 * reads as coming from where the application sent it; getpeername: a TCP
 * connection to it reads as connected there. */
static __always_inline struct ksbpf_dns_orig *ksbpf_dns_in(struct bpf_sock_addr *ctx, const __u32 *from)
{
	__u64 cookie;
	struct ksbpf_dns_orig *o;
	__u32 r[4];

	if (!ksbpf_dns_port(ctx->user_port))
		return 0;
	cookie = bpf_get_socket_cookie(ctx);
	o = dns_orig.lookup(&cookie);
	if (!o)
		return 0;
	__builtin_memcpy(r, o->resolver, 16);
	if (r[0] != from[0] || r[1] != from[1] || r[2] != from[2] || r[3] != from[3] || o->port != ctx->user_port)
		return 0;
	return o;
}

int ksbpf_dns_conn4(struct bpf_sock_addr *ctx)
{
	return ksbpf_dns_out4(ctx);
}

int ksbpf_dns_send4(struct bpf_sock_addr *ctx)
{
	return ksbpf_dns_out4(ctx);
}

int ksbpf_dns_conn6(struct bpf_sock_addr *ctx)
{
	return ksbpf_dns_out6(ctx);
}

int ksbpf_dns_send6(struct bpf_sock_addr *ctx)
{
	return ksbpf_dns_out6(ctx);
}

static __always_inline int ksbpf_dns_restore4(struct bpf_sock_addr *ctx)
{
	__u32 from[4] = { 0, 0, bpf_htonl(0xffff), ctx->user_ip4 };
	struct ksbpf_dns_orig *o = ksbpf_dns_in(ctx, from);
	__be32 a;

	if (o) {
		__builtin_memcpy(&a, o->addr + 12, 4);
		ctx->user_ip4 = a;
	}
	return 1;
}

static __always_inline int ksbpf_dns_restore6(struct bpf_sock_addr *ctx)
{
	__u32 from[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	struct ksbpf_dns_orig *o = ksbpf_dns_in(ctx, from);
	__u32 w[4];

	if (o) {
		__builtin_memcpy(w, o->addr, 16);
		ctx->user_ip6[0] = w[0];
		ctx->user_ip6[1] = w[1];
		ctx->user_ip6[2] = w[2];
		ctx->user_ip6[3] = w[3];
	}
	return 1;
}
/* recvmsg (UDP) and getpeername (a TCP connection's peer) give back the
 * address the application asked for */
int ksbpf_dns_recv4(struct bpf_sock_addr *ctx)
{
	return ksbpf_dns_restore4(ctx);
}

int ksbpf_dns_recv6(struct bpf_sock_addr *ctx)
{
	return ksbpf_dns_restore6(ctx);
}

int ksbpf_dns_peer4(struct bpf_sock_addr *ctx)
{
	return ksbpf_dns_restore4(ctx);
}

int ksbpf_dns_peer6(struct bpf_sock_addr *ctx)
{
	return ksbpf_dns_restore6(ctx);
}
#endif
