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
 *                    header (tun, ppp, ...)  Runtime configuration lives in
 * maps; options are compile-time switches:
 *   -DKSBPF_OPT_LAN         the fixed private ranges (ksbpf_lan4/6) are allowed
 *   -DKSBPF_OPT_LAN_DNS     ... including DNS (53, 853) to them
 *   -DKSBPF_OPT_DHCP        DHCPv4/DHCPv6 client traffic is allowed
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
#define KSBPF_IPV6_MAX_EXTHDRS 6
#define KSBPF_VLAN_HLEN 4
#define KSBPF_ICMPV6 58

BPF_HASH(tunnels, struct ksbpf_tunnel_key, __u32, KSBPF_MAX_TUNNELS);
BPF_ARRAY(tunnel_ifindex, __u64, KSBPF_IFINDEX_FILTER);
BPF_HASH(endpoints4, __be32, struct ksbpf_endpoint, KSBPF_MAX_ENDPOINTS);
BPF_HASH(endpoints6, struct ksbpf_ep6_key, struct ksbpf_endpoint, KSBPF_MAX_ENDPOINTS);
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

/* What the policy needs to know of a packet. */
struct ksbpf_pkt {
	__u8 family;		/* enum ksbpf_family */
	__u8 l4proto;
	__u8 has_ports;		/* TCP/UDP with its ports read */
	__u8 fragment;		/* a non-first fragment */
	__u8 icmp_type;		/* tc: the ICMPv6 type */
	__u8 hop_limit;		/* tc: the IPv6 hop limit */
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
	struct __sk_buff *skb;
	void *data;		/* skb->data and skb->data_end, read once by the entry point */
	void *end;
	__u32 nh;
	int hook;
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
	if (at->hook == KSBPF_HOOK_TC && p->l4proto == KSBPF_ICMPV6)
		return ksbpf_load(at, off, &p->icmp_type, 1);
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
	struct iphdr ip;

	if (ksbpf_load(at, 0, &ip, sizeof(ip)))
		return -1;
	if (ip.version != 4 || ip.ihl < 5)
		return -1;
	p->daddr.v4 = ip.daddr;
	p->l4proto = ip.protocol;
	p->fragment = (bpf_ntohs(ip.frag_off) & 0x1fff) != 0;
	return ksbpf_load_ports(at, ip.ihl * 4, p);
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

static __always_inline int ksbpf_is_dns(const struct ksbpf_pkt *p)
{
	return p->has_ports && (p->dport == bpf_htons(53) || p->dport == bpf_htons(853));
}

static __always_inline int ksbpf_is_dhcp_client(const struct ksbpf_pkt *p, int v6)
{
	if (!p->has_ports || p->l4proto != IPPROTO_UDP)
		return 0;
	if (v6)
		return p->sport == bpf_htons(546) && p->dport == bpf_htons(547);
	return p->sport == bpf_htons(68) && p->dport == bpf_htons(67);
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
	return (a[0] == 0xfe && (a[1] & 0xc0) == 0x80) ||	/* fe80::/10 */
	       (a[0] & 0xfe) == 0xfc ||				/* fc00::/7 */
	       (a[0] == 0xff && a[1] == 0x02);			/* ff02::/16, link-local multicast */
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

static __always_inline int ksbpf_last_resort(const struct ksbpf_pkt *p, int v6)
{
#ifdef KSBPF_OPT_DHCP
	if (ksbpf_is_dhcp_client(p, v6))
		return KSBPF_ALLOW_DHCP;
#endif
	return KSBPF_DROP_NOT_TUNNEL;
}

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

static __always_inline int ksbpf_exceptions4(const struct ksbpf_pkt *p)
{
	__be32 addr = p->daddr.v4;
	struct ksbpf_endpoint *ep;

	if (p->fragment)
		return KSBPF_DROP_FRAGMENT;
	ep = endpoints4.lookup(&addr);
	if (ep)
		return ksbpf_endpoint(p, ep);
	if (ksbpf_allowed_cidr(p))
		return KSBPF_ALLOW_LAN;
#ifdef KSBPF_OPT_LAN
	if (ksbpf_lan4(addr))
		return ksbpf_lan(p);
#endif
	return ksbpf_last_resort(p, 0);
}

static __always_inline int ksbpf_exceptions6(const struct ksbpf_pkt *p)
{
	struct ksbpf_ep6_key key;
	struct ksbpf_endpoint *ep;

	if (p->fragment)
		return KSBPF_DROP_FRAGMENT;
	__builtin_memcpy(key.addr, p->daddr.v6, 16);
	ep = endpoints6.lookup(&key);
	if (ep)
		return ksbpf_endpoint(p, ep);
	if (ksbpf_allowed_cidr(p))
		return KSBPF_ALLOW_LAN;
#ifdef KSBPF_OPT_LAN
	if (ksbpf_lan6(key.addr))
		return ksbpf_lan(p);
#endif
	return ksbpf_last_resort(p, 1);
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

	if (at->hook != KSBPF_HOOK_TC) {
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
	tk.netns_cookie = ksbpf_netns_cookie(at);
	if (who != KSBPF_TUNNEL_SEVERAL)
		return who == tk.netns_cookie;
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

static __always_inline int ksbpf_decide(const struct ksbpf_at *at, __be16 proto, struct ksbpf_pkt *p)
{
	struct __sk_buff *skb = at->skb;
	__u32 ifindex = skb->ifindex;	/* read once */

	p->family = proto == bpf_htons(ETH_P_IP) ? KSBPF_FAMILY_IPV4 :
		    proto == bpf_htons(ETH_P_IPV6) ? KSBPF_FAMILY_IPV6 : KSBPF_FAMILY_OTHER;
	if (ifindex == 1)		/* LOOPBACK_IFINDEX, the same in every netns */
		return KSBPF_ALLOW_LOOPBACK;
	if (ksbpf_via_tunnel(at, ifindex))
		return KSBPF_ALLOW_TUNNEL;
	if (p->family == KSBPF_FAMILY_IPV4) {
		if (ksbpf_parse4(at, p))
			return KSBPF_DROP_MALFORMED;
		return ksbpf_exceptions4(p);
	}
	if (p->family == KSBPF_FAMILY_IPV6) {
		if (ksbpf_parse6(at, p))
			return KSBPF_DROP_MALFORMED;
		if (at->hook == KSBPF_HOOK_TC && ksbpf_is_nd(p))
			return KSBPF_ALLOW_NEIGH;
		return ksbpf_exceptions6(p);
	}
	if (at->hook == KSBPF_HOOK_TC && proto == bpf_htons(ETH_P_ARP))
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

static __always_inline void ksbpf_count(struct __sk_buff *skb, int reason, const struct ksbpf_pkt *p)
{
	int key = reason * KSBPF_FAMILY_MAX + p->family;
	struct ksbpf_counter *c = counters.lookup(&key);

	if (c) {
		c->packets++;
		c->bytes += skb->len;
	}
}

#ifdef KSBPF_EVENTS_INTERVAL_NS
/* May this CPU send another sample?  A token bucket: one token per
 * KSBPF_EVENTS_INTERVAL_NS, at most KSBPF_EVENTS_BURST saved up.  It reads
 * the coarse clock (no TSC read: a flood pays little for being limited). */
static __always_inline int ksbpf_take_token(struct ksbpf_bucket *b)
{
	__u64 now, earned;

	if (!b->tokens) {
#ifdef KSBPF_NO_COARSE_CLOCK
		now = bpf_ktime_get_ns();
#else
		now = bpf_ktime_get_coarse_ns();
#endif
		earned = (now - b->last_ns) / KSBPF_EVENTS_INTERVAL_NS;
		if (!earned)
			return 0;
		b->tokens = earned < KSBPF_EVENTS_BURST ? earned : KSBPF_EVENTS_BURST;
		b->last_ns = earned < KSBPF_EVENTS_BURST ? b->last_ns + earned * KSBPF_EVENTS_INTERVAL_NS : now;
	}
	b->tokens--;
	return 1;
}

static __always_inline void ksbpf_report(const struct ksbpf_at *at, int reason, const struct ksbpf_pkt *p)
{
	struct __sk_buff *skb = at->skb;
	int zero = 0;
	struct ksbpf_bucket *b = bucket.lookup(&zero);
	struct ksbpf_event *ev;

	if (!b)
		return;
	if (!ksbpf_take_token(b)) {
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
	ev->cgroup_id = bpf_skb_cgroup_id(skb);
	ev->netns_cookie = ksbpf_netns_cookie(at);
	ev->ifindex = skb->ifindex;
	ev->uid = bpf_get_socket_uid(skb);
	ev->len = skb->len;
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

	if (ksbpf_verify_run(at->skb))
		return reason < KSBPF_FIRST_DROP;
	ksbpf_count(at->skb, reason, &p);
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
 * namespace's non-local traffic.  (A scope of one namespace marks it known.) */
BPF_HASH(netns_known, __u64, __u32, KSBPF_MAX_NETNS);
BPF_RINGBUF_OUTPUT(netns_events, 1);

int ksbpf_sk_create(struct bpf_sock *sk)
{
	__u64 cookie = bpf_get_netns_cookie(sk);
	__u32 reported = KSBPF_NETNS_REPORTED;
	struct ksbpf_netns_event *ev;
#ifndef KSBPF_NETNS_HELPER
	struct ksbpf_sk *st = sk_netns.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);

	if (!st)
		return 0;
	st->netns_cookie = cookie;
#endif
	if (netns_known.lookup(&cookie))
		return 1;
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
