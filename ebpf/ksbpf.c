/* SPDX-License-Identifier: GPL-2.0 */
/* ksbpf: "these processes may send only through this tunnel, and through NO
 * other interface".
 *
 * One policy, ksbpf_policy(), decides every packet and returns a reason
 * (ksbpf.h).  Each hook is a thin wrapper that feeds it the egress context
 * and turns the reason into its own verdict.  Runtime configuration lives in
 * maps; options are compile-time switches:
 *   -DKSBPF_OPT_LAN         fixed private ranges (map lan4/lan6) are allowed
 *   -DKSBPF_OPT_LAN_DNS     ... including DNS (53, 853) to them
 *   -DKSBPF_OPT_DHCP        DHCPv4/DHCPv6 client traffic is allowed
 *   -DKSBPF_EVENTS_INTERVAL_NS=N, -DKSBPF_EVENTS_BURST=N
 *                           send samples of dropped packets to the ring buffer
 *                           `events`: at most one per N ns and BURST at once,
 *                           per CPU (a token bucket); the rest are counted
 *   -DKSBPF_MAX_TUNNELS=N, -DKSBPF_MAX_ENDPOINTS=N, -DKSBPF_MAX_LAN=N: map sizes
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include "ksbpf.h"

#ifndef KSBPF_MAX_TUNNELS
#define KSBPF_MAX_TUNNELS 64
#endif
#ifndef KSBPF_MAX_ENDPOINTS
#define KSBPF_MAX_ENDPOINTS 1024
#endif
#ifndef KSBPF_MAX_LAN
#define KSBPF_MAX_LAN 64
#endif
#ifndef KSBPF_EVENTS_PAGES
#define KSBPF_EVENTS_PAGES 16
#endif
#define KSBPF_IPV6_MAX_EXTHDRS 6

BPF_HASH(tunnels, struct ksbpf_tunnel_key, __u32, KSBPF_MAX_TUNNELS);
BPF_HASH(endpoints4, struct ksbpf_ep4_key, __u32, KSBPF_MAX_ENDPOINTS);
BPF_HASH(endpoints6, struct ksbpf_ep6_key, __u32, KSBPF_MAX_ENDPOINTS);
BPF_LPM_TRIE(lan4, struct ksbpf_lpm4_key, __u32, KSBPF_MAX_LAN);
BPF_LPM_TRIE(lan6, struct ksbpf_lpm6_key, __u32, KSBPF_MAX_LAN);
BPF_PERCPU_ARRAY(counters, struct ksbpf_counter, KSBPF_REASON_MAX * KSBPF_FAMILY_MAX);
BPF_ARRAY(meta, struct ksbpf_meta, 1);
BPF_RINGBUF_OUTPUT(events, KSBPF_EVENTS_PAGES);
BPF_PERCPU_ARRAY(event_stats, __u64, 2);
BPF_PERCPU_ARRAY(bucket, struct ksbpf_bucket, 1);

/* What the policy needs to know of a packet. */
struct ksbpf_pkt {
	__u8 family;		/* enum ksbpf_family */
	__u8 l4proto;
	__u8 has_ports;		/* TCP/UDP with its ports read */
	__u8 fragment;		/* a non-first fragment */
	__be16 sport;
	__be16 dport;
	union {
		__be32 v4;
		__u8 v6[16];
	} daddr;
};

static __always_inline int ksbpf_load_ports(struct __sk_buff *skb, __u32 off, struct ksbpf_pkt *p)
{
	__be16 ports[2];

	if (p->fragment || (p->l4proto != IPPROTO_TCP && p->l4proto != IPPROTO_UDP))
		return 0;
	if (bpf_skb_load_bytes_relative(skb, off, ports, sizeof(ports), BPF_HDR_START_NET))
		return -1;
	p->sport = ports[0];
	p->dport = ports[1];
	p->has_ports = 1;
	return 0;
}

static __always_inline int ksbpf_parse4(struct __sk_buff *skb, struct ksbpf_pkt *p)
{
	struct iphdr ip;

	if (bpf_skb_load_bytes_relative(skb, 0, &ip, sizeof(ip), BPF_HDR_START_NET))
		return -1;
	if (ip.version != 4 || ip.ihl < 5)
		return -1;
	p->daddr.v4 = ip.daddr;
	p->l4proto = ip.protocol;
	p->fragment = (bpf_ntohs(ip.frag_off) & 0x1fff) != 0;
	return ksbpf_load_ports(skb, ip.ihl * 4, p);
}

static __always_inline int ksbpf_parse6(struct __sk_buff *skb, struct ksbpf_pkt *p)
{
	struct ipv6hdr ip6;
	__u32 off = sizeof(ip6);
	__u8 nexthdr;
	__u8 ext[2];
	__be16 frag_off;
	int i;

	if (bpf_skb_load_bytes_relative(skb, 0, &ip6, sizeof(ip6), BPF_HDR_START_NET))
		return -1;
	if (ip6.version != 6)
		return -1;
	__builtin_memcpy(p->daddr.v6, &ip6.daddr, 16);
	nexthdr = ip6.nexthdr;

#pragma unroll
	for (i = 0; i < KSBPF_IPV6_MAX_EXTHDRS; i++) {
		if (nexthdr != IPPROTO_HOPOPTS && nexthdr != IPPROTO_ROUTING &&
		    nexthdr != IPPROTO_DSTOPTS && nexthdr != IPPROTO_FRAGMENT &&
		    nexthdr != IPPROTO_AH)
			break;
		if (bpf_skb_load_bytes_relative(skb, off, ext, sizeof(ext), BPF_HDR_START_NET))
			return -1;
		if (nexthdr == IPPROTO_FRAGMENT) {
			if (bpf_skb_load_bytes_relative(skb, off + 2, &frag_off, sizeof(frag_off),
							BPF_HDR_START_NET))
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
	return ksbpf_load_ports(skb, off, p);
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

/* The exceptions for traffic that does not leave through a tunnel, in
 * order: endpoint (exact, then its bare address), LAN, DHCP.  Each lookup is
 * made only when the earlier rules did not decide. */
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

static __always_inline int ksbpf_exceptions4(const struct ksbpf_pkt *p)
{
	struct ksbpf_ep4_key ek = { .addr = p->daddr.v4, .port = p->dport, .proto = p->l4proto };

	if (p->fragment)
		return KSBPF_DROP_FRAGMENT;
	if (p->has_ports && endpoints4.lookup(&ek))
		return KSBPF_ALLOW_ENDPOINT;
	ek.port = 0;
	ek.proto = 0;
	if (endpoints4.lookup(&ek))
		return KSBPF_DROP_ENDPOINT_MISMATCH;
#ifdef KSBPF_OPT_LAN
	struct ksbpf_lpm4_key lk = { .prefixlen = 32 };

	__builtin_memcpy(lk.addr, &p->daddr.v4, 4);
	if (lan4.lookup(&lk))
		return ksbpf_lan(p);
#endif
	return ksbpf_last_resort(p, 0);
}

static __always_inline int ksbpf_exceptions6(const struct ksbpf_pkt *p)
{
	struct ksbpf_ep6_key ek = { .port = p->dport, .proto = p->l4proto };

	if (p->fragment)
		return KSBPF_DROP_FRAGMENT;
	__builtin_memcpy(ek.addr, p->daddr.v6, 16);
	if (p->has_ports && endpoints6.lookup(&ek))
		return KSBPF_ALLOW_ENDPOINT;
	ek.port = 0;
	ek.proto = 0;
	if (endpoints6.lookup(&ek))
		return KSBPF_DROP_ENDPOINT_MISMATCH;
#ifdef KSBPF_OPT_LAN
	struct ksbpf_lpm6_key lk = { .prefixlen = 128 };

	__builtin_memcpy(lk.addr, p->daddr.v6, 16);
	if (lan6.lookup(&lk))
		return ksbpf_lan(p);
#endif
	return ksbpf_last_resort(p, 1);
}

/* THE policy.  Returns a reason (ksbpf.h); fills *p as far as it parsed. */
static __always_inline int ksbpf_policy(struct __sk_buff *skb, __u64 netns_cookie, struct ksbpf_pkt *p)
{
	struct ksbpf_tunnel_key tk = { .netns_cookie = netns_cookie, .ifindex = skb->ifindex };

	p->family = skb->protocol == bpf_htons(ETH_P_IP) ? KSBPF_FAMILY_IPV4 :
		    skb->protocol == bpf_htons(ETH_P_IPV6) ? KSBPF_FAMILY_IPV6 : KSBPF_FAMILY_OTHER;
	if (skb->ifindex == 1)		/* LOOPBACK_IFINDEX, the same in every netns */
		return KSBPF_ALLOW_LOOPBACK;
	if (tunnels.lookup(&tk))
		return KSBPF_ALLOW_TUNNEL;
	if (p->family == KSBPF_FAMILY_IPV4) {
		if (ksbpf_parse4(skb, p))
			return KSBPF_DROP_MALFORMED;
		return ksbpf_exceptions4(p);
	}
	if (p->family == KSBPF_FAMILY_IPV6) {
		if (ksbpf_parse6(skb, p))
			return KSBPF_DROP_MALFORMED;
		return ksbpf_exceptions6(p);
	}
	return KSBPF_DROP_NOT_IP;
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
static __always_inline void ksbpf_event_stat(int which)
{
	__u64 *n = event_stats.lookup(&which);

	if (n)
		(*n)++;
}

/* May this CPU send another sample?  A token bucket: one token per
 * KSBPF_EVENTS_INTERVAL_NS, at most KSBPF_EVENTS_BURST saved up. */
static __always_inline int ksbpf_take_token(void)
{
	int zero = 0;
	struct ksbpf_bucket *b = bucket.lookup(&zero);
	__u64 now = bpf_ktime_get_ns(), earned;

	if (!b)
		return 0;
	earned = (now - b->last_ns) / KSBPF_EVENTS_INTERVAL_NS;
	if (earned) {
		b->tokens += earned;
		b->last_ns += earned * KSBPF_EVENTS_INTERVAL_NS;
		if (b->tokens >= KSBPF_EVENTS_BURST) {
			b->tokens = KSBPF_EVENTS_BURST;
			b->last_ns = now;
		}
	}
	if (!b->tokens)
		return 0;
	b->tokens--;
	return 1;
}

static __always_inline void ksbpf_report(struct __sk_buff *skb, int reason, const struct ksbpf_pkt *p,
					 __u64 netns_cookie, int hook)
{
	struct ksbpf_event *ev;

	if (!ksbpf_take_token()) {
		ksbpf_event_stat(KSBPF_EVENTS_SUPPRESSED);
		return;
	}
	ev = events.ringbuf_reserve(sizeof(*ev));
	if (!ev) {
		ksbpf_event_stat(KSBPF_EVENTS_SUPPRESSED);
		return;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts_ns = bpf_ktime_get_ns();
	ev->cgroup_id = bpf_skb_cgroup_id(skb);
	ev->netns_cookie = netns_cookie;
	ev->ifindex = skb->ifindex;
	ev->uid = bpf_get_socket_uid(skb);
	ev->len = skb->len;
	ev->sport = p->sport;
	ev->dport = p->dport;
	ev->reason = reason;
	ev->family = p->family;
	ev->proto = p->l4proto;
	ev->hook = hook;
	if (p->family == KSBPF_FAMILY_IPV4) {
		bpf_skb_load_bytes_relative(skb, offsetof(struct iphdr, saddr), ev->saddr, 4, BPF_HDR_START_NET);
		__builtin_memcpy(ev->daddr, &p->daddr.v4, 4);
	} else if (p->family == KSBPF_FAMILY_IPV6) {
		bpf_skb_load_bytes_relative(skb, offsetof(struct ipv6hdr, saddr), ev->saddr, 16, BPF_HDR_START_NET);
		__builtin_memcpy(ev->daddr, p->daddr.v6, 16);
	}
	events.ringbuf_submit(ev, 0);
	ksbpf_event_stat(KSBPF_EVENTS_SENT);
}
#endif

/* Decide, count, report; returns 1 to let the packet go, 0 to drop it. */
static __always_inline int ksbpf_verdict(struct __sk_buff *skb, __u64 netns_cookie, int hook)
{
	struct ksbpf_pkt p = {};
	int reason = ksbpf_policy(skb, netns_cookie, &p);

	ksbpf_count(skb, reason, &p);
	if (reason < KSBPF_FIRST_DROP)
		return 1;
#ifdef KSBPF_EVENTS_INTERVAL_NS
	ksbpf_report(skb, reason, &p, netns_cookie, hook);
#endif
	return 0;
}

/* cgroup_skb/egress: the processes of one cgroup v2. */
int ksbpf_cg_egress(struct __sk_buff *skb)
{
	return ksbpf_verdict(skb, bpf_get_netns_cookie(skb), KSBPF_HOOK_CGROUP);
}
