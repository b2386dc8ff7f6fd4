// SPDX-License-Identifier: GPL-2.0
/*
 * kextless_pre: the kernel flow verdict cache (the kext's connection cache, in the kernel).
 *
 * Attached first (clsact, direct-action, pref 10) on ingress and egress of every guarded
 * link, before the divert library's program (pref 30001 - priority) and the fail-closed
 * guard (guard.bpf.c, pref 65000). Its answers:
 *   TC_ACT_OK     ends the filter chain: the packet passes, the divert program never sees it;
 *   TC_ACT_SHOT   drops it;
 *   TC_ACT_UNSPEC goes on down the chain, to the divert program (and so to Python).
 *
 * A flow not in `flows` always goes on (a miss), so an LRU eviction can only cause a re-ask,
 * never a wrong pass. Python (actors/capture/kernel_cache.py) writes both orientations of a
 * decided flow; the key is the 5-tuple as seen in the packet.
 *
 * A PASS entry counts its direction's packets, wire bytes and application payload bytes (IP
 * payload minus the TCP/UDP header, from the IP length fields, so a GSO/GRO super-packet
 * counts its one header once): the bandwidth actor reads them (actors/bandwidth/). TCP
 * counts stream bytes, as the kext's stream layer does: how far the span of sequence numbers
 * seen grew, so a retransmission adds nothing and a reordered segment is not lost (nor one
 * Python re-injects late, below the first one the entry saw). A loopback packet crosses lo
 * twice, egress then ingress: it is counted on egress only.
 *
 * Packets the divert library re-injects INBOUND travel out of lo marked 0x4D4Axxxx (its
 * REDIRECT_MARK_MASK | target ifindex); its own program on lo ingress then redirects them to
 * the target link's ingress, re-marked 0x4D49xxxx, where they meet this program again. On lo
 * such a packet goes on untouched (TC_ACT_UNSPEC, ST_LO_REDIRECT): never passed into lo's own
 * stack, never counted (it is counted once, at the target).
 *
 * Owners: an EGRESS packet of a local socket that goes on to the divert program as a flow's
 * opener (a TCP SYN without ACK, a UDP datagram of a flow not in `flows`) records in `owners`,
 * under its key, the tgid of the current task, the socket cookie and the time. At TC egress
 * (before the qdisc) such a packet is still in the context of the process that called
 * connect()/sendmsg(), so Python learns the pid without waiting for a socket event. Not
 * recorded: ingress (softirq: the current task is whoever was interrupted), SYN-ACKs and
 * other TCP (sent from softirq/timers on ACK clocking), the library's re-injections (the
 * capture's own context), packets without a socket (forwarded), tgid 0 (a kernel thread),
 * and a packet whose socket already owns the key (its cookie is there): a retransmitted SYN,
 * sent from the retransmission timer in whatever task the timer interrupted, so it never
 * overwrites the pid of the connect(). A new socket reusing the 5-tuple has a new cookie
 * and records afresh. One lookup per diverted egress opener, one update per new socket.
 * ICMP/ICMPv6 echo requests are recorded too, under their addresses with ports 0 (the key
 * the capture gives an ICMP flow): a raw or ping socket's sendto() reaches TC egress in the
 * sender's context, and no socket event names their flow (the SOCKET layer only reports an
 * ICMP socket's close, without addresses). Other ICMP is not: errors and echo replies are the
 * kernel's own, sent from softirq. The one known blind spot is shared with the openers above:
 * a first packet to a neighbour not yet resolved leaves later, from softirq (whoever was
 * interrupted; often tgid 0, which is skipped).
 *
 * Parking: a packet bound for the divert program while no capture reads it would be lost: a
 * killed capture's orphaned divert program still takes packets into its dead ring (for ~2.5 s),
 * and with no divert program the guard drops them; TCP then resends a SYN only after 1 s (then
 * 3 s). So the capture names itself the reader: one of its sockets in `reader` (a SOCKMAP: the
 * kernel removes a socket from it when its last fd closes) and its pid in `park_ctl`, with
 * `enabled` (never with --fail-open). A killed process's fds close only late in its exit
 * (after its memory is unmapped: tens of ms), so the pid's task is looked at too: exiting
 * (PF_EXITING, set as the kill is taken), stopped or traced, or gone counts as no reader; the
 * socket covers a reused pid. While there is no reader every packet that would go on to the
 * divert program is copied from its network header into `parked` (a ring buffer that lives
 * with the program) and dropped. The next capture, or the same one once it runs again (the
 * ring wakes its loop), replays each one through its core as if it had just been diverted
 * (actors/capture/parked.py): a connection opened during a restart waits for the restart, not
 * for TCP's resend. Never parked: the library's re-injections (already decided), lo ingress
 * (its egress copy is the one diverted). A packet larger than PARK_MAX, or a full ring: dropped
 * and counted (fail closed, as the guard would).
 *
 * Shadow SYNs: a SYN that reached the divert program just before its capture was killed dies
 * in the library's ring or queue, or in the capture before it asked about it; its connection
 * would wait for TCP's 1 s resend. So while a capture reads, each TCP opener (SYN without ACK)
 * sent on to the divert program is also copied into `syn_shadow`, a per-CPU circle of the last
 * SYN_SLOTS. A new capture replays those of them from just before its predecessor's last
 * heartbeat on whose flow has no verdict in `flows` (parked.recent_syns): a SYN that was
 * decided already is not asked again, and one sent twice is harmless to TCP.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmpv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* The two fields of the kernel's task_struct parking reads (CO-RE: libbpf finds their offsets
 * in the running kernel's BTF at load), and the kfuncs that find a task by pid. */
struct task_struct {
	unsigned int __state;
	unsigned int flags;
} __attribute__((preserve_access_index));

extern struct task_struct *bpf_task_from_pid(__s32 pid) __ksym;
extern void bpf_task_release(struct task_struct *p) __ksym;

/* include/linux/sched.h: a task in do_exit(); stopped (SIGSTOP) or traced. */
#define PF_EXITING 0x00000004
#define TASK_STOPPED_OR_TRACED 0x0000000c

/* The loopback device's ifindex: 1 in every network namespace. */
#define LO_IFINDEX 1

/* The divert library's re-injection mark (LOOP_PREVENTION_MARK), high half. */
#define REINJECT_MARK_HI 0x4D49

/* The divert library's lo re-injection mark, high half (REDIRECT_MARK_MASK). */
#define LO_REDIRECT_MARK_HI 0x4D4A

/* The largest packet (from its network header) a park record holds; parked.PARK_MAX. */
#define PARK_MAX 2048
/* The last SYN_SLOTS TCP openers each CPU sent on to the divert program, up to SYN_MAX bytes
 * each (parked.SYN_SLOTS, SYN_MAX): see "Shadow SYNs" in the head comment. */
#define SYN_SLOTS 64
#define SYN_MAX 128

/* Key of `flows`, 40 bytes; kernel_cache.FlowKey.pack() writes the same layout. */
struct flow_key {
	__u8 family;  /* 4 or 6 */
	__u8 proto;   /* IPPROTO_TCP / IPPROTO_UDP */
	__be16 sport; /* network byte order, as in the packet */
	__be16 dport;
	__u16 pad;    /* always 0 */
	__u8 src[16]; /* IPv4: first 4 bytes, the rest 0 */
	__u8 dst[16];
};

/* What the cache does with a flow it finds; any other value is treated as a miss. */
enum flow_action {
	ACTION_PASS = 1,
	ACTION_DROP = 2,
};

/* Value of `flows`, 48 bytes: Python writes action/verdict with zero counters; the program
 * counts this direction's packets, bytes (skb->len, L2 header included) and payload bytes
 * (TCP/UDP payload, headers excluded; TCP: new stream bytes only). */
struct flow_val {
	__u64 last_seen_ns; /* bpf_ktime_get_ns() of the last packet, 0 = none since the put */
	__u64 packets;
	__u64 bytes;
	__u64 payload;
	__u8 action;        /* enum flow_action */
	__u8 verdict;       /* opaque to the kernel: the verdict Python decided */
	__u8 seq_valid;     /* TCP: seq_start/seq_end hold a span (0 after a put) */
	__u8 pad;
	__u32 seq_start;    /* TCP: the lowest sequence number seen (host order) */
	__u32 seq_end;      /* TCP: the highest sequence number + length seen */
	__u32 pad2;
};

/* A jump of the stream further than this past what was seen is not believed (a stale entry
 * reused by a new connection, a forged segment): only the packet's own payload counts. */
#define MAX_SEQ_ADVANCE (1U << 26)

/* The payload bytes a TCP segment adds to its direction's stream: how far it grows the span
 * [seq_start, seq_end) seen so far. Upwards the whole advance counts (a gap is filled by
 * segments that arrive later and then add nothing); downwards only the segment's own bytes
 * below the span. A retransmission adds nothing. Not atomic: two CPUs on one flow direction
 * at once (rare: a socket sends in order) can count one segment twice or not at all. */
static __always_inline __u32 stream_advance(struct flow_val *v, __u32 seq, __u32 payload)
{
	__u32 end = seq + payload;
	__s32 ahead = (__s32)(end - v->seq_end);
	__s32 below = (__s32)(v->seq_start - seq);
	__u32 add = 0;

	if (!payload)
		return 0;
	if (!v->seq_valid || ahead > (__s32)(payload + MAX_SEQ_ADVANCE) ||
	    below > (__s32)(payload + MAX_SEQ_ADVANCE)) {
		v->seq_valid = 1;
		v->seq_start = seq;
		v->seq_end = end;
		return payload;
	}
	if (ahead > 0) {
		add += (__u32)ahead;
		v->seq_end = end;
	}
	if (below > 0) {
		add += (__u32)below < payload ? (__u32)below : payload;
		v->seq_start = seq;
	}
	return add;
}

/* Value of `owners`, 24 bytes (base/kernel_maps.OWNER_VAL). */
struct owner_val {
	__u32 tgid;   /* the process (thread group) that sent the packet */
	__u32 pad;
	__u64 cookie; /* bpf_get_socket_cookie(): tells a new socket on the same 5-tuple */
	__u64 ktime;  /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) when recorded */
};

/* Key of `pass_ports`: traffic with either port here skips the divert (our own control). */
struct pass_port {
	__u16 port; /* host byte order */
	__u8 proto;
	__u8 pad;
};

/* Index of the per-CPU counters in `stats` (kernel_cache.PreStat mirrors it). */
enum stat {
	ST_PASSED = 0,    /* cached PASS: TC_ACT_OK */
	ST_DROPPED,       /* cached DROP: TC_ACT_SHOT */
	ST_MISSED,        /* TCP/UDP not in the cache: on to divert */
	ST_NON_IP,        /* not IPv4/IPv6 (ARP...): TC_ACT_OK */
	ST_NEIGHBOUR,     /* IPv6 ND / MLD: TC_ACT_OK */
	ST_PASS_PORT,     /* a port in pass_ports: TC_ACT_OK */
	ST_TCP_CONTROL,   /* TCP SYN (no ACK), FIN, RST: on to divert */
	ST_UNCACHED,      /* other protocols, fragments, VLAN, unparsable: on to divert */
	ST_LO_REDIRECT,   /* the library's lo re-injection (0x4D4A mark): on, untouched */
	ST_PARKED,        /* no capture reading: copied into `parked`, dropped */
	ST_PARK_LOST,     /* no capture reading, `parked` full or the packet too big: dropped */
	ST_COUNT,
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536); /* the loader sets the real size before load */
	__type(key, struct flow_key);
	__type(value, struct flow_val);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536); /* the loader sets the real size before load */
	__type(key, struct flow_key);
	__type(value, struct owner_val);
} owners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct pass_port);
	__type(value, __u8);
} pass_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ST_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* The running capture's liveness: one of its sockets (empty: none reads the divert ring). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u64)); /* an fd from user space (a cookie when read) */
} reader SEC(".maps");

/* Value of `park_ctl` (parked.ParkControl): whether to park at all, and the reader's pid. */
struct park_ctl {
	__u32 enabled; /* 1: park while there is no reader; 0: never (fail open, or not set yet) */
	__u32 pid;     /* the reading capture (init pid namespace); 0: judge by `reader` alone */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct park_ctl);
} park_ctl SEC(".maps");

/* The head of a parked packet and of a shadow SYN (parked.PARK_HDR); `len` bytes from the
 * network header follow it. */
struct park_hdr {
	__u64 ktime;           /* bpf_ktime_get_ns() when copied */
	__u32 ifindex;         /* skb->ifindex: the link it was on */
	__u32 ingress_ifindex; /* == ifindex on ingress; 0 (local) or another link on egress */
	__u32 len;             /* 0: an empty shadow slot */
	__u32 pad;
};

struct park_rec {
	struct park_hdr h;
	__u8 data[PARK_MAX];
};

/* The ring of parked packets, 2 MiB (about 20 000 SYNs). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 21);
} parked SEC(".maps");

struct syn_slot {
	struct park_hdr h;
	__u8 data[SYN_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SYN_SLOTS);
	__type(key, __u32);
	__type(value, struct syn_slot);
} syn_shadow SEC(".maps");

/* Each CPU's next slot in `syn_shadow` (counts up; the slot is it modulo SYN_SLOTS). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} syn_next SEC(".maps");

/* Per-CPU room to build a record in (too big for the 512-byte stack). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct park_rec);
} park_buf SEC(".maps");

static __always_inline int count(__u32 what, int verdict)
{
	__u64 *n = bpf_map_lookup_elem(&stats, &what);

	if (n)
		*n += 1; /* per-CPU slot: no atomics needed */
	return verdict;
}

/* Echo request types (ICMP_ECHO of linux/icmp.h, ICMPV6_ECHO_REQUEST of linux/icmpv6.h). */
#define ICMP_ECHO_REQUEST 8
#define ICMPV6_ECHO_REQUEST_TYPE 128

/* ICMPv6 types of neighbour discovery and MLD: the link must keep working unasked. */
static __always_inline int is_neighbour(__u8 type)
{
	return (type >= 130 && type <= 137) || type == 143;
}

static __always_inline int passed_port(__u8 proto, __be16 port)
{
	struct pass_port k = { .port = bpf_ntohs(port), .proto = proto };

	return bpf_map_lookup_elem(&pass_ports, &k) != NULL;
}

/* Remember who sent this egress opener (see the head comment for what is skipped, and why).
 * Egress of a locally made packet: no ingress device (lo ingress has ifindex 1 there). */
static __always_inline void record_owner(struct __sk_buff *skb, struct flow_key *key)
{
	struct owner_val *o, fresh = {};
	__u64 cookie;

	if (skb->ingress_ifindex || (skb->mark >> 16) == REINJECT_MARK_HI)
		return;
	cookie = bpf_get_socket_cookie(skb);
	if (!cookie)
		return;
	o = bpf_map_lookup_elem(&owners, key);
	if (o && o->cookie == cookie)
		return;
	fresh.tgid = bpf_get_current_pid_tgid() >> 32;
	if (!fresh.tgid)
		return;
	fresh.cookie = cookie;
	fresh.ktime = bpf_ktime_get_ns();
	bpf_map_update_elem(&owners, key, &fresh, BPF_ANY);
}

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

/* What parking makes of a packet bound for the divert program (reader_state). */
enum park_state {
	PS_OFF,     /* parking off (fail open, not set yet), or a packet never parked */
	PS_READING, /* a running capture reads the divert program's ring */
	PS_PARK,    /* none does: park it */
};

static __always_inline enum park_state reader_state(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct park_ctl *c = bpf_map_lookup_elem(&park_ctl, &zero);
	struct bpf_sock *sk;
	struct task_struct *t;
	int gone;

	if (!c || !c->enabled)
		return PS_OFF;
	if ((skb->mark >> 16) == REINJECT_MARK_HI)
		return PS_OFF; /* re-injected: decided already, the divert program lets it by */
	if (skb->ifindex == LO_IFINDEX && skb->ingress_ifindex == LO_IFINDEX)
		return PS_OFF; /* lo ingress: the egress copy is the one that is diverted */
	sk = bpf_map_lookup_elem(&reader, &zero);
	if (!sk)
		return PS_PARK;
	bpf_sk_release(sk);
	if (!c->pid)
		return PS_READING;
	t = bpf_task_from_pid(c->pid);
	if (!t)
		return PS_PARK;
	gone = (t->flags & PF_EXITING) || (t->__state & TASK_STOPPED_OR_TRACED);
	bpf_task_release(t);
	return gone ? PS_PARK : PS_READING;
}

/* Fill `h` for the packet's `len` bytes, just copied after it. */
static __always_inline void fill_hdr(struct park_hdr *h, struct __sk_buff *skb, __u32 len)
{
	h->ktime = bpf_ktime_get_ns();
	h->ifindex = skb->ifindex;
	h->ingress_ifindex = skb->ingress_ifindex;
	h->len = len;
	h->pad = 0;
}

/* Copy the packet from its network header into `parked` and drop it (see the head comment). */
static __always_inline int park(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct park_rec *r = bpf_map_lookup_elem(&park_buf, &zero);
	__u32 len = skb->len - l2_len(skb);

	if (!r || len < 1 || len > PARK_MAX)
		return count(ST_PARK_LOST, TC_ACT_SHOT);
	/* The same value, in a form the verifier can bound in the register passed on (clang
	 * would otherwise test a copy): PARK_MAX is a power of two. */
	asm volatile("" : "+r"(len));
	len = ((len - 1) & (PARK_MAX - 1)) + 1;
	if (bpf_skb_load_bytes_relative(skb, 0, r->data, len, BPF_HDR_START_NET))
		return count(ST_PARK_LOST, TC_ACT_SHOT);
	fill_hdr(&r->h, skb, len);
	if (bpf_ringbuf_output(&parked, r, sizeof(r->h) + len, 0))
		return count(ST_PARK_LOST, TC_ACT_SHOT);
	return count(ST_PARKED, TC_ACT_SHOT);
}

/* Copy a TCP opener on its way to the divert program into this CPU's `syn_shadow`. */
static __always_inline void shadow_syn(struct __sk_buff *skb)
{
	__u32 zero = 0, slot, len = skb->len - l2_len(skb);
	__u32 *next = bpf_map_lookup_elem(&syn_next, &zero);
	struct syn_slot *r;

	if (!next || len < 1 || len > SYN_MAX)
		return;
	slot = *next % SYN_SLOTS;
	*next += 1;
	r = bpf_map_lookup_elem(&syn_shadow, &slot);
	if (!r)
		return;
	asm volatile("" : "+r"(len)); /* as in park(): a bound the verifier sees */
	len = ((len - 1) & (SYN_MAX - 1)) + 1;
	if (bpf_skb_load_bytes_relative(skb, 0, r->data, len, BPF_HDR_START_NET)) {
		r->h.len = 0;
		return;
	}
	fill_hdr(&r->h, skb, len);
}

/* On to the divert program (counted as `what`), or parked while no capture reads it; a TCP
 * opener (`syn`) going on is also kept in `syn_shadow`. */
static __always_inline int on(struct __sk_buff *skb, __u32 what, int syn)
{
	enum park_state st;

	count(what, 0);
	st = reader_state(skb);
	if (st == PS_PARK)
		return park(skb);
	if (syn && st == PS_READING)
		shadow_syn(skb);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int kextless_pre(struct __sk_buff *skb)
{
	struct flow_key key = {};
	__u32 l4;  /* offset of the L4 header from the network header */
	__u32 end; /* the IP packet's length from its header's length field; 0 = unknown */
	__u32 hlen; /* the TCP/UDP header's length */
	__u32 seq = 0;
	__u8 proto;

	if ((skb->mark >> 16) == LO_REDIRECT_MARK_HI)
		return count(ST_LO_REDIRECT, TC_ACT_UNSPEC);

	/* Offsets below are from the network header (BPF_HDR_START_NET), so VLAN offload and
	 * devices without an L2 header need no special case. */
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes_relative(skb, 0, &ip, sizeof(ip), BPF_HDR_START_NET))
			return on(skb, ST_UNCACHED, 0);
		/* A fragment has no (or not only) ports: leave it to the divert program. */
		if (ip.ihl < 5 || (ip.frag_off & bpf_htons(0x3fff)))
			return on(skb, ST_UNCACHED, 0);
		key.family = 4;
		__builtin_memcpy(key.src, &ip.saddr, 4);
		__builtin_memcpy(key.dst, &ip.daddr, 4);
		proto = ip.protocol;
		l4 = ip.ihl * 4;
		end = bpf_ntohs(ip.tot_len);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes_relative(skb, 0, &ip6, sizeof(ip6), BPF_HDR_START_NET))
			return on(skb, ST_UNCACHED, 0);
		key.family = 6;
		__builtin_memcpy(key.src, &ip6.saddr, 16);
		__builtin_memcpy(key.dst, &ip6.daddr, 16);
		proto = ip6.nexthdr;
		l4 = sizeof(ip6);
		/* 0 is a jumbogram (BIG TCP), then the fallback below. */
		end = ip6.payload_len ? sizeof(ip6) + bpf_ntohs(ip6.payload_len) : 0;
		/* One hop-by-hop options header (MLD carries a router alert in it). */
		if (proto == IPPROTO_HOPOPTS) {
			__u8 ext[2]; /* next header, length in 8-byte units beyond the first 8 */

			if (bpf_skb_load_bytes_relative(skb, l4, ext, sizeof(ext), BPF_HDR_START_NET))
				return on(skb, ST_UNCACHED, 0);
			proto = ext[0];
			l4 += (ext[1] + 1) * 8;
		}
		if (proto == IPPROTO_ICMPV6) {
			__u8 type;

			if (bpf_skb_load_bytes_relative(skb, l4, &type, 1, BPF_HDR_START_NET))
				return on(skb, ST_UNCACHED, 0);
			if (is_neighbour(type))
				return count(ST_NEIGHBOUR, TC_ACT_OK);
		}
	} else if (skb->protocol == bpf_htons(ETH_P_8021Q) ||
		   skb->protocol == bpf_htons(ETH_P_8021AD)) {
		/* An un-offloaded VLAN tag: the divert program parses it. */
		return on(skb, ST_UNCACHED, 0);
	} else {
		/* ARP and every other ethertype: the divert program must never see them, it would
		 * misread them as IP (actors/capture/filters.py). */
		return count(ST_NON_IP, TC_ACT_OK);
	}

	if (proto == IPPROTO_TCP) {
		struct tcphdr th;

		if (bpf_skb_load_bytes_relative(skb, l4, &th, sizeof(th), BPF_HDR_START_NET))
			return on(skb, ST_UNCACHED, 0);
		key.sport = th.source;
		key.dport = th.dest;
		hlen = th.doff * 4;
		seq = bpf_ntohl(th.seq);
		if (passed_port(proto, th.source) || passed_port(proto, th.dest))
			return count(ST_PASS_PORT, TC_ACT_OK);
		/* Openers and ends go to Python: it sees every connection start and finish. A
		 * SYN-ACK is neither: it answers an opener Python already decided, so a flow the
		 * map passes passes it too (one capture hop less per connect; no payload, so the
		 * stream count below is untouched). */
		if (th.syn && !th.ack) {
			key.proto = proto;
			record_owner(skb, &key);
			return on(skb, ST_TCP_CONTROL, 1);
		}
		if (th.fin || th.rst)
			return on(skb, ST_TCP_CONTROL, 0);
	} else if (proto == IPPROTO_UDP) {
		struct udphdr uh;

		if (bpf_skb_load_bytes_relative(skb, l4, &uh, sizeof(uh), BPF_HDR_START_NET))
			return on(skb, ST_UNCACHED, 0);
		key.sport = uh.source;
		key.dport = uh.dest;
		hlen = sizeof(uh);
		if (passed_port(proto, uh.source) || passed_port(proto, uh.dest))
			return count(ST_PASS_PORT, TC_ACT_OK);
	} else {
		__u8 type;

		/* An echo request's sender (see the head comment); ports stay 0 in the key. */
		if (((key.family == 4 && proto == IPPROTO_ICMP) ||
		     (key.family == 6 && proto == IPPROTO_ICMPV6)) &&
		    !bpf_skb_load_bytes_relative(skb, l4, &type, 1, BPF_HDR_START_NET) &&
		    type == (key.family == 4 ? ICMP_ECHO_REQUEST : ICMPV6_ECHO_REQUEST_TYPE)) {
			key.proto = proto;
			record_owner(skb, &key);
		}
		return on(skb, ST_UNCACHED, 0);
	}
	key.proto = proto;

	struct flow_val *v = bpf_map_lookup_elem(&flows, &key);

	if (!v) {
		if (proto == IPPROTO_UDP)
			record_owner(skb, &key);
		return on(skb, ST_MISSED, 0);
	}
	if (v->action == ACTION_DROP) {
		__sync_fetch_and_add(&v->packets, 1);
		return count(ST_DROPPED, TC_ACT_SHOT);
	}
	if (v->action != ACTION_PASS)
		return on(skb, ST_MISSED, 0);
	/* The entry is shared by all CPUs: atomic adds, a plain store of the time. */
	v->last_seen_ns = bpf_ktime_get_ns();
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, skb->len);
	/* No length field: a GSO super-packet of 64 KB or more (lo's do reach 65536 bytes; BIG
	 * TCP) has an IPv4 total length / IPv6 payload length of 0. */
	if (!end)
		end = skb->len - l2_len(skb);
	/* lo ingress: the same packet was counted on lo egress. */
	if (end > l4 + hlen && !(skb->ifindex == LO_IFINDEX && skb->ingress_ifindex == LO_IFINDEX)) {
		__u32 payload = end - l4 - hlen;

		if (proto == IPPROTO_TCP)
			payload = stream_advance(v, seq, payload);
		if (payload)
			__sync_fetch_and_add(&v->payload, payload);
	}
	return count(ST_PASSED, TC_ACT_OK);
}

char LICENSE[] SEC("license") = "GPL";
