/* SPDX-License-Identifier: GPL-2.0 */
/* ksbpf: the one place where decisions, map keys and map values are defined.
 *
 * Every packet the policy sees ends in exactly one reason.  Reasons below
 * KSBPF_FIRST_DROP let the packet go, the others drop it.  The Python mirror
 * is ksbpf/reasons.py; tests/test_reasons.py checks that the two agree.
 */
#ifndef KSBPF_H
#define KSBPF_H

enum ksbpf_reason {
	KSBPF_ALLOW_LOOPBACK = 0,	/* leaves through lo: local traffic */
	KSBPF_ALLOW_TUNNEL = 1,		/* leaves through a registered tunnel */
	KSBPF_ALLOW_ENDPOINT = 2,	/* to a VPN endpoint: address + port + protocol */
	KSBPF_ALLOW_LAN = 3,		/* --allow-lan: fixed private ranges */
	KSBPF_ALLOW_DHCP = 4,		/* --allow-dhcp: DHCPv4/DHCPv6 client traffic */
	KSBPF_ALLOW_NEIGH = 5,		/* tc: ARP; IPv6 router/neighbour solicitation and advertisement */
	KSBPF_ALLOW_EXEMPT = 6,		/* tc: from a local socket of an exempted cgroup subtree */
	KSBPF_DROP_NOT_TUNNEL = 7,	/* non-tunnel interface and no exception matched */
	KSBPF_DROP_ENDPOINT_MISMATCH = 8, /* endpoint address, other port/protocol (TunnelCrack ServerIP) */
	KSBPF_DROP_LAN_DNS = 9,		/* DNS (53, 853) to a LAN address without --allow-lan-dns */
	KSBPF_DROP_FRAGMENT = 10,	/* a non-first fragment: no ports to match an exception */
	KSBPF_DROP_MALFORMED = 11,	/* truncated or unparsable IP header chain */
	KSBPF_DROP_NOT_IP = 12,		/* neither IPv4 nor IPv6 (nor ARP/ND at tc) */
	KSBPF_DROP_TUNNEL_SOURCE = 13,	/* netfilter: a registered tunnel's source address, leaving elsewhere */
	KSBPF_DROP_ENDPOINT_NOT_VPN = 14, /* to an endpoint, but not from the VPN client (--vpn-mark / --vpn-cgroup) */
	KSBPF_DROP_DNS_NOT_VPN = 15,	/* DNS (53, 853) to a resolver that is not the VPN's (--dns) */
	KSBPF_REASON_MAX = 16,
};

#define KSBPF_FIRST_DROP KSBPF_DROP_NOT_TUNNEL

/* Counters are kept per (reason, family): index reason * KSBPF_FAMILY_MAX + family. */
enum ksbpf_family {
	KSBPF_FAMILY_IPV4 = 0,
	KSBPF_FAMILY_IPV6 = 1,
	KSBPF_FAMILY_OTHER = 2,
	KSBPF_FAMILY_MAX = 3,
};

/* Where the decision was taken (the metrics' "hook" label). */
enum ksbpf_hook {
	KSBPF_HOOK_CGROUP = 0,		/* cgroup_skb/egress: the sockets of one cgroup subtree */
	KSBPF_HOOK_TC = 1,		/* tc egress: everything leaving a guarded interface */
	KSBPF_HOOK_NF = 2,		/* netfilter POST_ROUTING: every IP packet leaving the namespace */
	KSBPF_HOOK_MAX = 3,
};

/* Tunnels are keyed by (network-namespace cookie, ifindex): ifindex numbers
 * repeat across namespaces.  tunnel_ifindex[ifindex] (a __u64, for ifindex
 * below KSBPF_IFINDEX_FILTER) says which namespaces have a tunnel with that
 * ifindex: 0 none -- "not a tunnel" without the cookie and the hash lookup;
 * the namespace's cookie when exactly one has -- "a tunnel" iff the packet's
 * namespace is that one, without the hash lookup (the hot path);
 * KSBPF_TUNNEL_SEVERAL when more than one has -- the hash decides.  (Cookies
 * count up from 1: neither 0 nor all ones is a namespace.) */
#define KSBPF_IFINDEX_FILTER 4096
#define KSBPF_TUNNEL_SEVERAL 0xffffffffffffffffULL
struct ksbpf_tunnel_key {
	__u64 netns_cookie;
	__u32 ifindex;
	__u32 pad;
};

/* Endpoints: one entry per VPN server address (map endpoints4 keyed by the
 * __be32 address, endpoints6 by struct ksbpf_ep6_key), holding the (port,
 * protocol) pairs allowed to it.  The same lookup tells "endpoint" from "the
 * endpoint's address on another port or protocol" (TunnelCrack ServerIP). */
#define KSBPF_EP_PORTS 8


struct ksbpf_ep6_key {
	__u8 addr[16];
};

struct ksbpf_ep_port {
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct ksbpf_endpoint {
	__u32 n;
	struct ksbpf_ep_port ports[KSBPF_EP_PORTS];
};

/* ep_slots: an array in front of the endpoint hashes, so that most packets
 * learn with an array load (the verifier inlines it) what a hash lookup
 * would tell.  An address's slot: IPv4 a[2] ^ a[3] (0-255), IPv6 256 +
 * (a[14] ^ a[15]).  count: how many endpoint addresses fall into the slot --
 * 0: the address is no endpoint; 1: it is one iff it is addr (IPv4 in the
 * first 4 bytes, the rest 0), whose ports ep holds; more: the hash decides. */
#define KSBPF_EP_SLOTS 512
struct ksbpf_ep_slot {
	__u32 count;
	__u8 addr[16];
	struct ksbpf_endpoint ep;
};

/* Node mode: local sockets of these cgroup subtrees pass the tc guard (a
 * management plane).  A cgroup is matched as the ancestor at its level of
 * the sending socket's cgroup; the first slot with cgroup_id 0 ends the list. */
#define KSBPF_MAX_EXEMPT 8
struct ksbpf_exempt {
	__u64 cgroup_id;
	__u32 level;		/* depth in the cgroup v2 hierarchy, the root being 0 */
	__u32 pad;
};

/* --vpn-mark / --vpn-cgroup (KSBPF_OPT_VPN_MARK, KSBPF_OPT_VPN_CGROUP): the
 * endpoint exception belongs to the VPN client.  A packet to an endpoint
 * passes only when skb->mark & mask == mark (map vpn_mark, one entry) or
 * when its local socket is in one of the cgroup subtrees of map vpn_cgroups
 * (struct ksbpf_exempt, matched as node mode's exempt cgroups; the first
 * slot with cgroup_id 0 ends the list); else KSBPF_DROP_ENDPOINT_NOT_VPN.
 * With either, an endpoint may be any address on a (port, protocol): map
 * ep_any, keyed by struct ksbpf_ep_any_key. */
#define KSBPF_MAX_VPN_CGROUPS 8
#define KSBPF_MAX_EP_ANY 64
struct ksbpf_vpn_mark {
	__u32 mark;
	__u32 mask;
};

struct ksbpf_ep_any_key {
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* Cgroup scopes: the addresses of their tunnels, per namespace (map
 * tunnel_src).  A packet with such a source address may leave only through
 * that tunnel: the kernel sends some for a scope without the scope's socket
 * (TIME_WAIT answers, RSTs from TCP's control socket, ICMP errors), which the
 * cgroup hook never sees.  IPv4 addresses are IPv4-mapped (::ffff:a.b.c.d).
 * ifindex 0: the tunnel is gone (its last-known addresses are kept).  A
 * packet leaves "through the tunnel" when its output device has the tunnel's
 * ifindex or, without the daemon to follow a re-created tunnel, its name. */
#define KSBPF_MAX_TUNNEL_ADDRS 256
struct ksbpf_src_key {
	__u64 netns_cookie;
	__u8 addr[16];
};

struct ksbpf_src {
	__u32 ifindex;
	__u32 pad;
	char name[16];		/* the tunnel's name: a tunnel re-created (new ifindex) by that name is still it */
};

struct ksbpf_counter {
	__u64 packets;
	__u64 bytes;
};

/* A sample of a dropped packet, sent to the ring buffer `events` (rate
 * limited in the kernel by a per-CPU token bucket, struct ksbpf_bucket). */
struct ksbpf_event {
	__u64 ts_ns;		/* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 cgroup_id;	/* the sending socket's cgroup */
	__u64 netns_cookie;	/* the namespace of the egress interface */
	__u32 ifindex;		/* egress interface */
	__u32 uid;		/* socket owner; overflowuid when unknown */
	__u32 len;		/* packet length */
	__be16 sport;
	__be16 dport;
	__u8 reason;
	__u8 family;
	__u8 proto;
	__u8 hook;
	__u8 saddr[16];		/* IPv4 in the first 4 bytes */
	__u8 daddr[16];
};

/* The per-CPU token bucket of the event stream, and what it let through. */
struct ksbpf_bucket {
	__u64 tokens;
	__u64 last_ns;
	__u64 sent;		/* samples sent to the ring buffer */
	__u64 suppressed;	/* rate-limited, or the ring buffer was full */
	__u64 last_jiffies;	/* when the clock was last read: within a tick it cannot have moved */
};

/* The scope's policy as the user gave it (JSON), read back by `ksbpf status`. */
#define KSBPF_META_SIZE 8192
struct ksbpf_meta {
	char json[KSBPF_META_SIZE];
};

/* ksbpf verify: a test run whose skb->cb[0..3] equals the scope's nonce
 * (map verify_nonce; the first word is never 0) is decided as any packet,
 * but neither counted nor reported.  A test run has no socket of the scope:
 * where the cgroup hook reads the namespace from the socket (sk_netns), a
 * verify run stands for a socket of namespace netns_cookie. */
struct ksbpf_nonce {
	__u32 w[4];
	__u64 netns_cookie;
};

/* The network namespace a socket of the scope was created in (map sk_netns:
 * socket-local storage, on kernels whose cgroup_skb programs cannot ask
 * bpf_get_netns_cookie). */
struct ksbpf_sk {
	__u64 netns_cookie;
};

/* --netns each: the network namespaces the daemon knows (netns_known, keyed
 * by cookie), and what the sock_create entry point reports to it (ring
 * buffer netns_events) when a socket of the scope is created in another. */
#define KSBPF_MAX_NETNS 1024
/* netns_fast: may the cgroup hook trust the tunnel filter's namespace without
 * asking each packet's?  Key ALLOWED is written by the loader (1: a scope of
 * one namespace, attached before any process ran in it), key FOREIGN by the
 * sock_create program (1, for good: a socket of the scope was made in another
 * namespace).  Zero-filled, the map says "ask": the safe default. */
#define KSBPF_FAST_ALLOWED 0
#define KSBPF_FAST_FOREIGN 1

#define KSBPF_NETNS_KNOWN 1	/* registered by the daemon */
#define KSBPF_NETNS_REPORTED 2	/* reported once by the program, not known yet */
struct ksbpf_netns_event {
	__u64 netns_cookie;
	__u64 cgroup_id;	/* the creating task's cgroup */
	__u32 pid;		/* the creating task (tgid) */
	__u32 pad;
};

/* --dns (KSBPF_OPT_DNS): the VPN's resolvers (maps dns4, keyed by the __be32
 * address, and dns6, by struct ksbpf_ep6_key; value 1).  DNS (TCP/UDP to 53
 * or 853) of the scope to any other address is dropped (dns_not_vpn), and so
 * is DNS to a resolver that does not leave through the tunnel.  Where the
 * kernel has cgroup sock_addr programs, connect4/6 and sendmsg4/6 rewrite a
 * DNS destination that is no resolver to dns_target's (the first resolver of
 * the family), recording the original destination per socket (dns_orig, keyed
 * by socket cookie); recvmsg4/6 give the application back the source it
 * expects.  IPv4 in struct ksbpf_dns_orig is IPv4-mapped (::ffff:a.b.c.d). */
#define KSBPF_MAX_DNS 16
#define KSBPF_DNS_ORIG_MAX 16384
struct ksbpf_dns_target {
	__be32 v4;		/* valid when has4 */
	__u8 v6[16];		/* valid when has6 */
	__u8 has4;
	__u8 has6;
	__u8 pad[2];
};

struct ksbpf_dns_orig {
	__u8 addr[16];		/* the destination the application gave */
	__u8 resolver[16];	/* what it was rewritten to */
	__u32 port;		/* user_port as the application gave it (network order, low 16 bits) */
	__u32 pad;
};

#endif
