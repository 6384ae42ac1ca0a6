/* sklookupctl dispatcher: the one BPF sk_lookup program and the maps it reads.
 *
 * Compiled once by BCC (sklookupctl/compiler.py); its instructions are cached with the map
 * references left as placeholders, and every rule-set change loads a fresh copy against a fresh
 * set of maps sized to that rule set (sklookupctl/program.py), then swaps it in with one
 * BPF_LINK_UPDATE. A lookup therefore sees the old rule set or the new one, never a mix.
 *
 * The rule set is compiled in userspace (sklookupctl/rules.py, sklookupctl/trie.py) into:
 *   nodes, entries  a multibit trie over the destination address, one root per (protocol,
 *                   family) at nodes[0..3]. Each node may first compare `skip` bits of the
 *                   address (path compression), then indexes `stride` bits into its entries.
 *                   An entry is a child node (NODE_FLAG set) or a leaf: the run of segments
 *                   of the longest prefix there, as start (low 32 bits) and count (high 32
 *                   bits); 0 = no rule.
 *   segments        the port space 0..65535 of one prefix cut into disjoint pieces, each with the
 *                   rule that wins there: longest prefix, then narrowest port range. Rules of
 *                   shorter prefixes are already folded in.
 *   counters        per-CPU, per rule: steered, dropped, passed, missing socket, assign errors.
 *   sockets         SOCKMAP: slot -> socket. A target is a block of slots: one socket, or the
 *                   members of a SO_REUSEPORT group. Successive generations share it (until it
 *                   must grow), so a socket registered once stays in place.
 *
 * Every lookup here is an ARRAY lookup, which the verifier inlines: the cost does not grow with
 * the number of rules, only with the depth of the trie (bounded by NODE_STEPS).
 * Every struct is mirrored in sklookupctl/layout.py; keep the two in step.
 *
 * Every decision ends in DECIDE(verdict, why, rule, slot). The program the link runs is
 * compiled without SKL_TRACE, where DECIDE is `return verdict` and nothing else: the same
 * instructions as a program that never heard of tracing. `sklookupctl trace` swaps in the
 * variant compiled with SKL_TRACE, which also writes each decision to the `events` ring
 * buffer (sklookupctl/trace.py), and swaps the plain one back when it ends.
 */

#define SKL_AF_INET 2
#define SKL_AF_INET6 10
#define SKL_IPPROTO_UDP 17

#define SKL_NODE_FLAG 0x80000000u
/* 4 bits at least per node before the end of the address: 128 / 4 = 32, plus a last node
 * that only compares skip bits, plus slack */
#define SKL_NODE_STEPS 36
/* a run covers at most 65536 ports: 17 halvings always find the segment */
#define SKL_SEARCH_STEPS 17

/* What a segment does with a lookup. */
#define SKL_ACTION_NONE 0  /* no rule covers these ports for this address */
#define SKL_ACTION_STEER 1 /* hand the connection to the rule's target socket */
#define SKL_ACTION_DROP 2  /* refuse it */

/* What a steering rule does when its target has no live socket. */
#define SKL_MISSING_DROP 0
#define SKL_MISSING_PASS 1

/* segment.flags */
#define SKL_TARGET_EXACT 1 /* this socket only: BPF_SK_LOOKUP_F_NO_REUSEPORT */
/* members of a reuseport group registered for one target */
#define SKL_MAX_MEMBERS 16

/* why a lookup ended as it did (the traced variant reports it; layout.WHY mirrors it) */
#define SKL_WHY_NO_RULE 0       /* no rule covers this address and port: normal lookup */
#define SKL_WHY_STEERED 1       /* handed to the rule's target socket */
#define SKL_WHY_DROP_RULE 2     /* a drop rule */
#define SKL_WHY_MISSING 3       /* the target has no live socket: on_missing decided */
#define SKL_WHY_ASSIGN_ERROR 4  /* the socket refused the lookup: on_missing decided */
#define SKL_WHY_NOT_STEERABLE 5 /* port 0, a family sklookupctl does not steer, bad tables */

/* mirrored by layout.Node (ARRAY elements are 8-byte aligned: no padding is wasted) */
struct node {
	u64 fallback;  /* the leaf when the skip bits differ */
	u64 skip_bits; /* the `skip` address bits every address below this node has */
	u64 leaf;      /* stride 0 (nothing below): the leaf when the skip bits match */
	u32 base;      /* first entry of this node */
	u8 skip;       /* 0..64 */
	u8 stride;     /* 0..16 */
	u16 pad;
};

/* mirrored by layout.Segment: applies to ports lo .. (next segment's lo - 1). */
struct segment {
	u16 lo;
	u8 action;
	u8 on_missing;
	u32 slot;  /* the target's first SOCKMAP slot */
	u32 rule;
	u8 slots;  /* the target's block: slot .. slot + slots - 1 */
	u8 flags;  /* SKL_TARGET_* */
	u16 pad;
};

/* mirrored by layout.Counters. Each lookup a rule wins ends steered, dropped or passed (so
 * userspace adds those three up for the number of lookups); missing and errors say why a
 * steering rule dropped or passed instead. */
struct counters {
	u64 steered;
	u64 dropped;
	u64 passed;
	u64 missing;
	u64 errors;
};

/* Declared with one entry: userspace creates the real maps with the sizes a rule set needs. */
BPF_TABLE("sockmap", u32, u64, sockets, 1);
BPF_ARRAY(nodes, struct node, 1);
BPF_ARRAY(entries, u64, 1);
BPF_ARRAY(segments, struct segment, 1);
BPF_PERCPU_ARRAY(counters, struct counters, 1);

#ifdef SKL_TRACE
/* mirrored by layout.Event: one decision, as the traced variant reports it */
struct event {
	u64 time;   /* bpf_ktime_get_ns */
	u32 rule;   /* 0: none */
	u32 slot;   /* the SOCKMAP slot assigned (steered only) */
	u8 family;
	u8 protocol;
	u8 verdict; /* SK_DROP 0, SK_PASS 1 */
	u8 why;     /* SKL_WHY_* */
	u16 local_port;
	u16 remote_port;
	u32 local[4];  /* network order; IPv4 in local[0] */
	u32 remote[4];
};

/* the size here is only that of BCC's throwaway copy at compile time (a multiple of any page
 * size); userspace chooses the real one when it creates the map */
#ifndef PAGE_SIZE
#define PAGE_SIZE 65536
#endif
BPF_RINGBUF_OUTPUT(events, 1);
/* decisions the ring buffer had no room for */
BPF_PERCPU_ARRAY(lost, u64, 1);

static __always_inline int traced(struct bpf_sk_lookup *ctx, int verdict, u8 why, u32 rule,
				  u32 slot)
{
	struct event ev = {};
	ev.time = bpf_ktime_get_ns();
	ev.rule = rule;
	ev.slot = slot;
	ev.family = ctx->family;
	ev.protocol = ctx->protocol;
	ev.verdict = verdict;
	ev.why = why;
	ev.local_port = ctx->local_port;
	ev.remote_port = bpf_ntohs((u16)ctx->remote_port);
	if (ev.family == SKL_AF_INET6) {
		ev.local[0] = ctx->local_ip6[0];
		ev.local[1] = ctx->local_ip6[1];
		ev.local[2] = ctx->local_ip6[2];
		ev.local[3] = ctx->local_ip6[3];
		ev.remote[0] = ctx->remote_ip6[0];
		ev.remote[1] = ctx->remote_ip6[1];
		ev.remote[2] = ctx->remote_ip6[2];
		ev.remote[3] = ctx->remote_ip6[3];
	} else {
		ev.local[0] = ctx->local_ip4;
		ev.remote[0] = ctx->remote_ip4;
	}
	if (events.ringbuf_output(&ev, sizeof(ev), 0)) {
		u32 zero = 0;
		u64 *n = lost.lookup(&zero);
		if (n)
			(*n)++;
	}
	return verdict;
}
#define DECIDE(verdict, why, rule, slot) return traced(ctx, (verdict), (why), (rule), (slot))
#else
#define DECIDE(verdict, why, rule, slot) return (verdict)
#endif

static __always_inline void release_sock(struct bpf_sock **sk)
{
	if (*sk)
		bpf_sk_release(*sk);
}

/* A steering rule that could not steer: its on_missing decides, and the counters say which. */
static __always_inline int not_steered(struct counters *c, u8 on_missing)
{
	if (on_missing == SKL_MISSING_PASS) {
		if (c)
			c->passed++;
		return SK_PASS;
	}
	if (c)
		c->dropped++;
	return SK_DROP;
}

/* `n` (1..64) bits of the 128-bit address hi:lo, starting `pos` bits from the top */
static __always_inline u64 address_bits(u64 hi, u64 lo, u32 pos, u32 n)
{
	u64 w;
	pos &= 127;
	if (pos >= 64)
		w = lo << (pos - 64);
	else if (pos == 0)
		w = hi;
	else
		w = (hi << pos) | (lo >> (64 - pos));
	return w >> ((64 - n) & 63);
}

int dispatch(struct bpf_sk_lookup *ctx)
{
	/* read every ctx field once, into locals (the verifier rejects loads through a moved ctx) */
	u32 family = ctx->family;
	u32 proto = ctx->protocol;
	u32 port = ctx->local_port;
	if (!port)
		/* rules cover ports 1-65535: a run's first segment starts at port 1 */
		DECIDE(SK_PASS, SKL_WHY_NOT_STEERABLE, 0, 0);
	u64 hi, lo;
	if (family == SKL_AF_INET) {
		hi = (u64)bpf_ntohl(ctx->local_ip4) << 32;
		lo = 0;
	} else if (family == SKL_AF_INET6) {
		hi = ((u64)bpf_ntohl(ctx->local_ip6[0]) << 32) | bpf_ntohl(ctx->local_ip6[1]);
		lo = ((u64)bpf_ntohl(ctx->local_ip6[2]) << 32) | bpf_ntohl(ctx->local_ip6[3]);
	} else {
		/* not a family we steer: leave it to the normal lookup */
		DECIDE(SK_PASS, SKL_WHY_NOT_STEERABLE, 0, 0);
	}

	/* roots: 0 tcp/v4, 1 tcp/v6, 2 udp/v4, 3 udp/v6 */
	u32 idx = (proto == SKL_IPPROTO_UDP ? 2 : 0) + (family == SKL_AF_INET6 ? 1 : 0);
	u32 pos = 0;
	u64 leaf = 0;
	for (int i = 0; i < SKL_NODE_STEPS; i++) {
		struct node *n = nodes.lookup(&idx);
		if (!n)
			/* a corrupt trie (userspace bug): do not guess, keep the normal lookup */
			DECIDE(SK_PASS, SKL_WHY_NOT_STEERABLE, 0, 0);
		u32 skip = n->skip;
		if (skip) {
			if (address_bits(hi, lo, pos, skip) != n->skip_bits) {
				/* the address leaves every longer prefix below here */
				leaf = n->fallback;
				break;
			}
			pos += skip;
		}
		u32 stride = n->stride;
		if (!stride) {
			/* nothing below: the prefix that ends here, or the one inherited */
			leaf = n->leaf;
			break;
		}
		u32 e = n->base + (u32)address_bits(hi, lo, pos, stride);
		pos += stride;
		u64 *entry = entries.lookup(&e);
		if (!entry)
			DECIDE(SK_PASS, SKL_WHY_NOT_STEERABLE, 0, 0);
		u64 v = *entry;
		if (!(v & SKL_NODE_FLAG)) {
			leaf = v;
			break;
		}
		idx = (u32)v & ~SKL_NODE_FLAG;
	}
	u32 first = (u32)leaf;
	u32 count = leaf >> 32;
	if (!count)
		/* no rule for this protocol and address: the normal socket lookup goes on */
		DECIDE(SK_PASS, SKL_WHY_NO_RULE, 0, 0);

	/* binary search for the last segment with lo <= port */
	for (int i = 0; i < SKL_SEARCH_STEPS; i++) {
		if (count <= 1)
			break;
		u32 half = count / 2;
		u32 mid = first + half;
		struct segment *probe = segments.lookup(&mid);
		if (!probe)
			DECIDE(SK_PASS, SKL_WHY_NOT_STEERABLE, 0, 0);
		if (probe->lo <= port)
			first = mid;
		count -= half;
	}
	struct segment *seg = segments.lookup(&first);
	if (!seg || seg->action == SKL_ACTION_NONE)
		/* no rule covers this port at this address: the normal socket lookup goes on */
		DECIDE(SK_PASS, SKL_WHY_NO_RULE, 0, 0);

	u32 rule = seg->rule;
	struct counters *c = counters.lookup(&rule);

	if (seg->action == SKL_ACTION_DROP) {
		/* the operator asked for these connections to be refused */
		if (c)
			c->dropped++;
		DECIDE(SK_DROP, SKL_WHY_DROP_RULE, rule, 0);
	}

	u32 slot = seg->slot;
	/* volatile: clang would otherwise derive the loop's trip count from it, and the verifier
	 * then walks every value it may take */
	volatile u32 slots = seg->slots;
	u8 on_missing = seg->on_missing;
	/* F_REPLACE: like the kernel's multi-program rule, the last program to select wins */
	u64 flags = BPF_SK_LOOKUP_F_REPLACE;
	if (seg->flags & SKL_TARGET_EXACT)
		/* the operator chose this socket, not the kernel's pick within its reuseport group */
		flags |= BPF_SK_LOOKUP_F_NO_REUSEPORT;
	/* the first live member of the block; the kernel then picks within its reuseport group
	 * (unless exact), so any live member stands for the whole group */
	for (int i = 0; i < SKL_MAX_MEMBERS; i++) {
		if (i >= slots)
			break;
		u32 k = slot + i;
		struct bpf_sock *sk __attribute__((cleanup(release_sock))) =
			(struct bpf_sock *)sockets.lookup(&k);
		if (!sk)
			/* this member is gone: try the next */
			continue;
		long err = bpf_sk_assign(ctx, sk, flags);
		if (err) {
			/* the socket cannot take this packet (family or protocol mismatch): treat it
			 * as missing, for the reason below */
			if (c)
				c->errors++;
			DECIDE(not_steered(c, on_missing), SKL_WHY_ASSIGN_ERROR, rule, k);
		}
		/* steered */
		if (c)
			c->steered++;
		DECIDE(SK_PASS, SKL_WHY_STEERED, rule, k);
	}
	/* every socket of the target is gone (proxy down?): drop by default, so connections do not
	 * land in some other socket; pass only when the rule says so */
	if (c)
		c->missing++;
	DECIDE(not_steered(c, on_missing), SKL_WHY_MISSING, rule, 0);
}
