// SPDX-License-Identifier: GPL-2.0
/*
 * kextless_guard: the permanent fail-closed guard.
 *
 * Attached last (clsact, direct-action, pref 65000) on ingress and egress of every guarded
 * link, after the flow cache (pref 10) and the divert library's program (pref 30001 -
 * priority). libebpfdivert returns TC_ACT_UNSPEC when it cannot take a packet (ring full,
 * stale heartbeat, shutdown, a dead holder): without this program the packet would pass
 * unexamined. Here every IP packet that reaches the end of the chain WITHOUT the library's
 * re-injection mark (0x4D49 in the high 16 bits of skb->mark) is counted and dropped;
 * re-injected packets and non-IP frames go on (TC_ACT_UNSPEC, i.e. pass).
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* The divert library's LOOP_PREVENTION_MARK, high half (actors/capture/guard.py). */
#define REINJECT_MARK_HI 0x4D49

/* One per-CPU slot (kernel_cache.GuardStats sums them, takes the latest time). */
struct guard_stats {
	__u64 dropped;      /* unmarked IP packets dropped on this CPU */
	__u64 last_drop_ns; /* bpf_ktime_get_ns() of the latest of them, 0 = none */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct guard_stats);
} guard_stats SEC(".maps");

SEC("tc")
int kextless_guard(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct guard_stats *s;

	if (skb->protocol != bpf_htons(ETH_P_IP) && skb->protocol != bpf_htons(ETH_P_IPV6))
		return TC_ACT_UNSPEC;
	if ((skb->mark >> 16) == REINJECT_MARK_HI)
		return TC_ACT_UNSPEC;
	s = bpf_map_lookup_elem(&guard_stats, &zero);
	if (s) {
		s->dropped += 1;
		s->last_drop_ns = bpf_ktime_get_ns();
	}
	return TC_ACT_SHOT;
}

char LICENSE[] SEC("license") = "GPL";
