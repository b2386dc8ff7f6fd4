// SPDX-License-Identifier: GPL-2.0
/*
 * kextless_guard: the permanent fail-closed guard, and the byte counter of re-injected packets.
 *
 * Attached last (clsact, direct-action, pref 65000) on ingress and egress of every guarded
 * link, after the flow cache (pref 10) and the divert library's program (pref 30001 -
 * priority). libebpfdivert returns TC_ACT_UNSPEC when it cannot take a packet (ring full,
 * stale heartbeat, shutdown, a dead holder): without this program the packet would pass
 * unexamined. Here every IP packet that reaches the end of the chain WITHOUT the library's
 * re-injection mark (0x4D49 in the high 16 bits of skb->mark) is counted and dropped;
 * re-injected packets and non-IP frames go on (TC_ACT_UNSPEC, i.e. pass).
 *
 * A re-injected TCP/UDP packet is one Python let through (the first packets of a connection,
 * TCP SYN/FIN/RST, every packet of a flow without a kernel PASS entry): its application
 * payload is added to `reinjected` under its 5-tuple as the packet carries it, so the
 * bandwidth actor sees the bytes the flow cache does not count. TCP counts only payload
 * beyond the highest sequence number seen here, so a retransmission adds nothing (unlike
 * kextless_pre it never counts a gap: the bytes in one may have passed through the cache). (A re-injected packet of a
 * flow with a PASS entry never gets here: kextless_pre counts it and ends the chain.)
 *
 * A redirected connection's packets are re-injected rewritten (to the name server, the tunnel):
 * `redirected` (written by the capture, kernel_cache.KernelCache.set_redirect) maps the 5-tuple
 * such a packet carries after the rewrite to the one the application sent, and its payload is
 * counted under that one, so the bytes belong to the connection the application sees (as the
 * kext counts them) and nothing to the redirect target's side. The replies need no entry: the
 * capture rewrites them back to the contacted host before re-injecting them.
 *
 * The library's lo re-injection (0x4D4A mark: an inbound packet on its way to its target's
 * ingress, where it arrives again marked 0x4D49) goes on untouched and uncounted. A loopback
 * packet crosses lo twice, egress then ingress, with its mark: it is counted on egress only.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* The divert library's LOOP_PREVENTION_MARK, high half (actors/capture/guard.py). */
#define REINJECT_MARK_HI 0x4D49
/* Its lo re-injection mark (REDIRECT_MARK_MASK), high half. */
#define LO_REDIRECT_MARK_HI 0x4D4A
/* The loopback device's ifindex: 1 in every network namespace. */
#define LO_IFINDEX 1

/* One per-CPU slot (kernel_cache.GuardStats sums them, takes the latest time). */
struct guard_stats {
	__u64 dropped;      /* unmarked IP packets dropped on this CPU */
	__u64 last_drop_ns; /* bpf_ktime_get_ns() of the latest of them, 0 = none */
};

/* Key of `reinjected`: struct flow_key of flowcache.bpf.c (kernel_cache.FlowKey.pack). */
struct flow_key {
	__u8 family;
	__u8 proto;
	__be16 sport;
	__be16 dport;
	__u16 pad;
	__u8 src[16];
	__u8 dst[16];
};

/* Value of `reinjected`, 32 bytes (kernel_cache.ReinjectedEntry). */
struct reinj_val {
	__u64 last_seen_ns; /* bpf_ktime_get_ns() of the last packet counted */
	__u64 packets;
	__u64 payload;      /* TCP/UDP payload bytes, headers excluded */
	__u32 seq_end;      /* TCP: the highest sequence number + length seen (host order) */
	__u32 seq_valid;    /* TCP: seq_end holds a value */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct guard_stats);
} guard_stats SEC(".maps");

/* Bounded: the least recently counted orientation is evicted when it is full (the loader
 * sizes it like `flows`); its counters restart from zero if it comes back. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct reinj_val);
} reinjected SEC(".maps");

/* A redirect's rewritten orientation -> the orientation the application sent (the capture
 * writes and deletes them; LRU, so a leftover can never fill it: an evicted entry only counts
 * that flow's bytes under the rewritten 5-tuple). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct flow_key);
} redirected SEC(".maps");

/* The L2 header's length before the network header (skb->len counts it at TC): 14 when an
 * Ethernet header's type field is there (veth, lo, ...), else 0 (tun, ...). */
static __always_inline __u32 l2_len(struct __sk_buff *skb)
{
	__be16 type;

	if (skb->len >= 14 && !bpf_skb_load_bytes(skb, 12, &type, sizeof(type)) &&
	    type == skb->protocol)
		return 14;
	return 0;
}

/* Count a re-injected packet's payload under its 5-tuple; anything unparsable is not counted. */
static __always_inline void count_reinjected(struct __sk_buff *skb)
{
	struct flow_key key = {};
	__u32 l4, end, hlen, seq = 0;
	__u8 proto;
	int first_frag = 0; /* an IPv4 UDP datagram's first fragment: its UDP length counts */

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes_relative(skb, 0, &ip, sizeof(ip), BPF_HDR_START_NET))
			return;
		if (ip.ihl < 5 || (ip.frag_off & bpf_htons(0x1fff)))
			return; /* a later fragment: no ports (its bytes count with the first) */
		first_frag = !!(ip.frag_off & bpf_htons(0x2000));
		key.family = 4;
		__builtin_memcpy(key.src, &ip.saddr, 4);
		__builtin_memcpy(key.dst, &ip.daddr, 4);
		proto = ip.protocol;
		l4 = ip.ihl * 4;
		end = bpf_ntohs(ip.tot_len);
	} else {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes_relative(skb, 0, &ip6, sizeof(ip6), BPF_HDR_START_NET))
			return;
		key.family = 6;
		__builtin_memcpy(key.src, &ip6.saddr, 16);
		__builtin_memcpy(key.dst, &ip6.daddr, 16);
		proto = ip6.nexthdr;
		l4 = sizeof(ip6);
		end = ip6.payload_len ? sizeof(ip6) + bpf_ntohs(ip6.payload_len) : 0;
		if (proto == IPPROTO_HOPOPTS) {
			__u8 ext[2];

			if (bpf_skb_load_bytes_relative(skb, l4, ext, sizeof(ext), BPF_HDR_START_NET))
				return;
			proto = ext[0];
			l4 += (ext[1] + 1) * 8;
		}
	}
	if (proto == IPPROTO_TCP) {
		struct tcphdr th;

		if (first_frag ||
		    bpf_skb_load_bytes_relative(skb, l4, &th, sizeof(th), BPF_HDR_START_NET))
			return;
		key.sport = th.source;
		key.dport = th.dest;
		hlen = th.doff * 4;
		seq = bpf_ntohl(th.seq);
	} else if (proto == IPPROTO_UDP) {
		struct udphdr uh;

		if (bpf_skb_load_bytes_relative(skb, l4, &uh, sizeof(uh), BPF_HDR_START_NET))
			return;
		key.sport = uh.source;
		key.dport = uh.dest;
		hlen = sizeof(uh);
		if (first_frag)
			end = l4 + bpf_ntohs(uh.len); /* the whole datagram, all fragments */
	} else {
		return;
	}
	key.proto = proto;
	{
		struct flow_key *orig = bpf_map_lookup_elem(&redirected, &key);

		if (orig)
			key = *orig; /* a redirect: counted for the connection the application sees */
	}
	/* No length field: a GSO super-packet of 64 KB or more (lo's do reach 65536 bytes; BIG
	 * TCP) has an IPv4 total length / IPv6 payload length of 0. */
	if (!end)
		end = skb->len - l2_len(skb);

	__u32 payload = end > l4 + hlen ? end - l4 - hlen : 0;
	__u64 now = bpf_ktime_get_ns();
	struct reinj_val *v = bpf_map_lookup_elem(&reinjected, &key);
	int tcp_data = proto == IPPROTO_TCP && payload;

	if (v) {
		v->last_seen_ns = now;
		__sync_fetch_and_add(&v->packets, 1);
		if (tcp_data) {
			/* Only what lies beyond the highest end seen (not atomic, as in flowcache). */
			__u32 end_seq = seq + payload;
			__s32 ahead = (__s32)(end_seq - v->seq_end);

			if (v->seq_valid && ahead <= 0)
				payload = 0;
			else if (v->seq_valid && (__u32)ahead < payload)
				payload = (__u32)ahead;
			if (!v->seq_valid || ahead > 0) {
				v->seq_end = end_seq;
				v->seq_valid = 1;
			}
		}
		if (payload)
			__sync_fetch_and_add(&v->payload, payload);
		return;
	}
	struct reinj_val fresh = {
		.last_seen_ns = now,
		.packets = 1,
		.payload = payload,
		.seq_end = seq + payload,
		.seq_valid = tcp_data,
	};

	/* Two CPUs creating the same entry at once: the loser adds to the winner's. */
	if (bpf_map_update_elem(&reinjected, &key, &fresh, BPF_NOEXIST)) {
		v = bpf_map_lookup_elem(&reinjected, &key);
		if (v) {
			__sync_fetch_and_add(&v->packets, 1);
			__sync_fetch_and_add(&v->payload, payload);
		}
	}
}

SEC("tc")
int kextless_guard(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct guard_stats *s;
	__u32 hi = skb->mark >> 16;

	if (skb->protocol != bpf_htons(ETH_P_IP) && skb->protocol != bpf_htons(ETH_P_IPV6))
		return TC_ACT_UNSPEC;
	if (hi == LO_REDIRECT_MARK_HI)
		return TC_ACT_UNSPEC;
	if (hi == REINJECT_MARK_HI) {
		if (!(skb->ifindex == LO_IFINDEX && skb->ingress_ifindex == LO_IFINDEX))
			count_reinjected(skb);
		return TC_ACT_UNSPEC;
	}
	s = bpf_map_lookup_elem(&guard_stats, &zero);
	if (s) {
		s->dropped += 1;
		s->last_drop_ns = bpf_ktime_get_ns();
	}
	return TC_ACT_SHOT;
}

char LICENSE[] SEC("license") = "GPL";
