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
 *
 * The hot path is written for few instructions (each costs about 0.05-0.08 ns here, and a
 * steered lookup runs ~250 of them): the walk is unrolled (no loop counter; the verifier also
 * processes fewer instructions than for the loop), IPv4 walks a 64-bit word (no 128-bit
 * shifts), the address is shifted as its bits are used (no bit position to carry), short port
 * runs are scanned from their end instead of binary-searched (no index arithmetic, one lookup
 * fewer), and the first member of a target is tried outside the member loop.
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

/* each of these takes its key by value: the key's stack slot is the function's own, so the
 * callers keep their indexes in registers */
static __always_inline struct node *node_at(u32 i)
{
	return nodes.lookup(&i);
}

static __always_inline u64 *entry_at(u32 i)
{
	return entries.lookup(&i);
}

static __always_inline struct segment *segment_at(u32 i)
{
	return segments.lookup(&i);
}

/* the top `n` (1..64) bits of w */
#define TOP(w, n) ((w) >> ((64 - (n)) & 63))
/* what walk() returns for a corrupt trie: no leaf is this (its count would be 2^32 - 1) */
#define SKL_CORRUPT (~0ULL)

/* The trie walk from root `idx` to the leaf of the address hi:lo (as trie.py's Tables.walk),
 * or SKL_CORRUPT. The address is shifted left as its bits are used, so the next bits are
 * always the top of hi. IPv4 (v6 0) has all its 32 bits in hi: no 128-bit shifts (a valid trie
 * never skips past them). Unrolled, NODE_STEPS times: no loop counter on the hot path. */
static __always_inline u64 walk(u64 hi, u64 lo, u32 idx, const int v6)
{
#pragma unroll
	for (int i = 0; i < SKL_NODE_STEPS; i++) {
		struct node *n = node_at(idx);
		if (!n)
			return SKL_CORRUPT;
		u32 skip = n->skip;
		u32 stride = n->stride;
		if (skip) {
			if (TOP(hi, skip) != n->skip_bits)
				return n->fallback;
			if (!v6) {
				hi <<= skip;
			} else if (skip >= 64) {
				hi = lo;
				lo = 0;
			} else {
				hi = (hi << skip) | ((lo >> 1) >> (63 - skip));
				lo <<= skip;
			}
		}
		if (!stride)
			return n->leaf;
		u64 *entry = entry_at(n->base + (u32)TOP(hi, stride));
		if (!entry)
			return SKL_CORRUPT;
		u64 v = *entry;
		if (!(v & SKL_NODE_FLAG))
			return v;
		if (v6) {
			hi = (hi << stride) | ((lo >> 1) >> (63 - stride));
			lo <<= stride;
		} else {
			hi <<= stride;
		}
		idx = (u32)v & ~SKL_NODE_FLAG;
	}
	return 0;
}

/* runs of up to this many segments are scanned from their end, longer ones binary-searched */
#define SKL_LINEAR 6

/* one step of the binary search for the last segment with lo <= port */
#define SEARCH_STEP                                                                            \
	if (count > 1) {                                                                        \
		u64 half = count >> 1;                                                          \
		struct segment *probe = segment_at(first + half);                               \
		if (!probe)                                                                     \
			DECIDE(SK_PASS, SKL_WHY_NOT_STEERABLE, 0, 0);                           \
		if (probe->lo <= port)                                                          \
			first += half;                                                          \
		count -= half;                                                                  \
	}

/* one step of the scan back from the run's last segment (segments are sorted by lo, and the
 * run's first one starts at port 1, so the scan finds what the binary search would) */
#define BACK_STEP                                                                              \
	if (seg->lo > port && last != first) {                                                  \
		last--;                                                                         \
		seg = segment_at(last);                                                         \
		if (!seg)                                                                       \
			DECIDE(SK_PASS, SKL_WHY_NOT_STEERABLE, 0, 0);                           \
	}

int dispatch(struct bpf_sk_lookup *ctx)
{
	/* read every ctx field once, into locals (the verifier rejects loads through a moved ctx) */
	u64 port = ctx->local_port;
	if (!port)
		/* rules cover ports 1-65535: a run's first segment starts at port 1 */
		DECIDE(SK_PASS, SKL_WHY_NOT_STEERABLE, 0, 0);
	u32 family = ctx->family;
	/* roots: 0 tcp/v4, 1 tcp/v6, 2 udp/v4, 3 udp/v6 */
	u32 root = ctx->protocol == SKL_IPPROTO_UDP ? 2 : 0;
	u64 leaf;
	if (family == SKL_AF_INET) {
		/* IPv4: the address in the top of one 64-bit word, no 128-bit slicing */
		leaf = walk((u64)bpf_ntohl(ctx->local_ip4) << 32, 0, root, 0);
	} else if (family == SKL_AF_INET6) {
		u64 hi = ((u64)bpf_ntohl(ctx->local_ip6[0]) << 32) | bpf_ntohl(ctx->local_ip6[1]);
		u64 lo = ((u64)bpf_ntohl(ctx->local_ip6[2]) << 32) | bpf_ntohl(ctx->local_ip6[3]);
		leaf = walk(hi, lo, root + 1, 1);
	} else {
		/* not a family we steer: leave it to the normal lookup */
		DECIDE(SK_PASS, SKL_WHY_NOT_STEERABLE, 0, 0);
	}
	if (leaf == SKL_CORRUPT)
		/* a corrupt trie (userspace bug): do not guess, keep the normal lookup */
		DECIDE(SK_PASS, SKL_WHY_NOT_STEERABLE, 0, 0);
	u32 first = (u32)leaf;
	u64 count = leaf >> 32;
	if (!count)
		/* no rule for this protocol and address: the normal socket lookup goes on */
		DECIDE(SK_PASS, SKL_WHY_NO_RULE, 0, 0);

	/* the last segment with lo <= port. Runs are short: up to SKL_LINEAR segments are scanned
	 * from the last one back (no index arithmetic to carry from step to step, and the winner
	 * is the last segment read); longer runs are binary-searched (a run covers at most 65536
	 * ports: SKL_SEARCH_STEPS halvings always find the segment), then their winner read. */
	struct segment *seg;
	if (count > SKL_LINEAR) {
		/* SKL_SEARCH_STEPS (17) steps */
		SEARCH_STEP SEARCH_STEP SEARCH_STEP SEARCH_STEP SEARCH_STEP SEARCH_STEP
		SEARCH_STEP SEARCH_STEP SEARCH_STEP SEARCH_STEP SEARCH_STEP SEARCH_STEP
		SEARCH_STEP SEARCH_STEP SEARCH_STEP SEARCH_STEP SEARCH_STEP
		seg = segment_at(first);
		if (!seg)
			DECIDE(SK_PASS, SKL_WHY_NO_RULE, 0, 0);
	} else {
		u32 last = first + (u32)count - 1;
		seg = segment_at(last);
		if (!seg)
			DECIDE(SK_PASS, count > 1 ? SKL_WHY_NOT_STEERABLE : SKL_WHY_NO_RULE, 0, 0);
		/* SKL_LINEAR - 1 (5) steps */
		BACK_STEP BACK_STEP BACK_STEP BACK_STEP BACK_STEP
	}
	u8 action = seg->action;
	if (action == SKL_ACTION_NONE)
		/* no rule covers this port at this address: the normal socket lookup goes on */
		DECIDE(SK_PASS, SKL_WHY_NO_RULE, 0, 0);

	u32 rule = seg->rule;
	struct counters *c = counters.lookup(&rule);

	if (action == SKL_ACTION_DROP) {
		/* the operator asked for these connections to be refused */
		if (c)
			c->dropped++;
		DECIDE(SK_DROP, SKL_WHY_DROP_RULE, rule, 0);
	}

	u32 slot = seg->slot;
	u32 slots = seg->slots;
	u8 on_missing = seg->on_missing;
	/* F_REPLACE: like the kernel's multi-program rule, the last program to select wins */
	u64 flags = BPF_SK_LOOKUP_F_REPLACE;
	if (seg->flags & SKL_TARGET_EXACT)
		/* the operator chose this socket, not the kernel's pick within its reuseport group */
		flags |= BPF_SK_LOOKUP_F_NO_REUSEPORT;
	if (slots) {
		/* the first member: the common case, outside the loop */
		u32 k0 = slot;
		struct bpf_sock *sk = (struct bpf_sock *)sockets.lookup(&k0);
		if (sk) {
			long err = bpf_sk_assign(ctx, sk, flags);
			bpf_sk_release(sk);
			if (err) {
				/* the socket cannot take this packet (family or protocol mismatch): treat
				 * it as missing, for the reason below */
				if (c)
					c->errors++;
				DECIDE(not_steered(c, on_missing), SKL_WHY_ASSIGN_ERROR, rule, k0);
			}
			/* steered */
			if (c)
				c->steered++;
			DECIDE(SK_PASS, SKL_WHY_STEERED, rule, k0);
		}
		/* the first live member of the rest of the block; the kernel then picks within its
		 * reuseport group (unless exact), so any live member stands for the whole group.
		 * volatile: clang would otherwise derive the loop's trip count from it, and the
		 * verifier then walks every value it may take */
		volatile u32 rest = slots;
		for (int i = 1; i < SKL_MAX_MEMBERS; i++) {
			if (i >= rest)
				break;
			u32 k = slot + i;
			struct bpf_sock *sk = (struct bpf_sock *)sockets.lookup(&k);
			if (!sk)
				continue;
			long err = bpf_sk_assign(ctx, sk, flags);
			bpf_sk_release(sk);
			if (err) {
				if (c)
					c->errors++;
				DECIDE(not_steered(c, on_missing), SKL_WHY_ASSIGN_ERROR, rule, k);
			}
			if (c)
				c->steered++;
			DECIDE(SK_PASS, SKL_WHY_STEERED, rule, k);
		}
	}
	/* every socket of the target is gone (proxy down?): drop by default, so connections do not
	 * land in some other socket; pass only when the rule says so */
	if (c)
		c->missing++;
	DECIDE(not_steered(c, on_missing), SKL_WHY_MISSING, rule, 0);
}
