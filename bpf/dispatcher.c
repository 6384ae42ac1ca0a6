/* sklookupctl dispatcher: the one BPF sk_lookup program and every map it uses.
 *
 * Compiled by BCC (sklookupctl/compiler.py), attached to one network namespace with
 * BPF_LINK_CREATE, and pinned with its maps in <bpffs>/sklookupctl/<netns inode>/.
 *
 * Userspace owns the rule set (map `rules`) and compiles it into a lookup structure:
 *   prefixes  LPM trie: (generation, protocol, family, address) -> a run of segments
 *   segments  array: for each prefix, the port space 0..65535 cut into disjoint runs, each with
 *             the rule that wins there (longest prefix, then narrowest port range; rules of
 *             shorter prefixes are folded into longer ones in userspace)
 * Two generations of that structure exist while userspace rewrites it; `config.gen` says which
 * one the program reads, so one 4-byte array update switches the whole rule set at once.
 *
 * Every struct here is mirrored in sklookupctl/layout.py; keep the two in step.
 */

#ifndef SKL_MAX_TARGETS
#define SKL_MAX_TARGETS 4096
#endif
#ifndef SKL_MAX_RULES
#define SKL_MAX_RULES 65536
#endif
#ifndef SKL_MAX_PREFIXES
#define SKL_MAX_PREFIXES 131072
#endif
#ifndef SKL_SEGMENTS_PER_GEN
#define SKL_SEGMENTS_PER_GEN 262144
#endif

#define SKL_AF_INET 2
#define SKL_AF_INET6 10

/* What a segment does with a lookup. */
#define SKL_ACTION_NONE 0  /* no rule covers these ports for this address */
#define SKL_ACTION_STEER 1 /* hand the connection to the rule's target socket */
#define SKL_ACTION_DROP 2  /* refuse it */

/* What a steering rule does when its target has no live socket. */
#define SKL_MISSING_DROP 0
#define SKL_MISSING_PASS 1

/* mirrored by layout.LpmKey. prefixlen counts the 32 bits of gen/proto/family/pad. */
struct lpm_key {
	u32 prefixlen;
	u8 gen;
	u8 proto;
	u8 family;
	u8 pad;
	u32 addr[4]; /* network byte order; IPv4 uses addr[0] */
};

/* mirrored by layout.LpmValue: segments[start .. start+count) belong to this prefix. */
struct lpm_value {
	u32 start;
	u32 count;
};

/* mirrored by layout.Segment: applies to ports lo .. (next segment's lo - 1). */
struct segment {
	u16 lo;
	u8 action;
	u8 on_missing;
	u32 target;
	u32 rule;
};

/* mirrored by layout.Config */
struct config {
	u32 gen;
	u32 layout;
	u64 netns_cookie;
};

/* mirrored by layout.RuleKey; userspace only: the rule set itself. */
struct rule_key {
	u8 proto;
	u8 family;
	u8 prefixlen;
	u8 pad;
	u16 port_lo;
	u16 port_hi;
	u32 addr[4];
};

/* mirrored by layout.RuleValue; userspace only. */
struct rule_value {
	u32 target;
	u32 id;
	u8 action;
	u8 on_missing;
	u16 pad;
};

/* mirrored by layout.TargetInfo; userspace only: what a target is called and where it listens. */
struct target_info {
	char name[64];
	u8 proto;
	u8 family;
	u16 port;
	u32 addr[4];
	u64 cookie;
};

/* target index -> socket. An entry vanishes when its socket is destroyed: the map never keeps a
 * socket alive. */
BPF_TABLE("sockmap", u32, u64, sockets, SKL_MAX_TARGETS);
BPF_LPM_TRIE(prefixes, struct lpm_key, struct lpm_value, SKL_MAX_PREFIXES);
BPF_ARRAY(segments, struct segment, 2 * SKL_SEGMENTS_PER_GEN);
BPF_ARRAY(config, struct config, 1);
BPF_HASH(rules, struct rule_key, struct rule_value, SKL_MAX_RULES);
BPF_HASH(targets, u32, struct target_info, SKL_MAX_TARGETS);

static __always_inline void release_sock(struct bpf_sock **sk)
{
	if (*sk)
		bpf_sk_release(*sk);
}

int dispatch(struct bpf_sk_lookup *ctx)
{
	u32 zero = 0;
	struct config *cfg = config.lookup(&zero);
	if (!cfg)
		/* cannot happen (array of one); never break the namespace's traffic */
		return SK_PASS;

	/* read every ctx field once, into locals (the verifier rejects loads through a moved ctx) */
	u32 family = ctx->family;
	u32 proto = ctx->protocol;
	u32 port = ctx->local_port;

	struct lpm_key key = {};
	key.gen = cfg->gen;
	key.proto = proto;
	key.family = family;
	if (family == SKL_AF_INET) {
		key.prefixlen = 32 + 32;
		key.addr[0] = ctx->local_ip4;
	} else if (family == SKL_AF_INET6) {
		key.prefixlen = 32 + 128;
		key.addr[0] = ctx->local_ip6[0];
		key.addr[1] = ctx->local_ip6[1];
		key.addr[2] = ctx->local_ip6[2];
		key.addr[3] = ctx->local_ip6[3];
	} else {
		/* not a family we steer: leave it to the normal lookup */
		return SK_PASS;
	}

	struct lpm_value *pv = prefixes.lookup(&key);
	if (!pv)
		/* no rule for this protocol and address: the normal socket lookup goes on */
		return SK_PASS;

	/* binary search for the last segment with lo <= port; segments of a prefix start at 0 and
	 * number at most 2^17, so 17 halvings always finish (a bounded loop) */
	u32 first = pv->start;
	u32 n = pv->count;
	for (int i = 0; i < 17; i++) {
		if (n <= 1)
			break;
		u32 half = n / 2;
		u32 mid = first + half;
		struct segment *probe = segments.lookup(&mid);
		if (!probe)
			/* a corrupt run (userspace bug): do not guess, keep the normal lookup */
			return SK_PASS;
		if (probe->lo <= port)
			first = mid;
		n -= half;
	}
	struct segment *seg = segments.lookup(&first);
	if (!seg || seg->action == SKL_ACTION_NONE)
		/* no rule covers this port at this address: the normal socket lookup goes on */
		return SK_PASS;

	if (seg->action == SKL_ACTION_DROP)
		/* the operator asked for these connections to be refused */
		return SK_DROP;

	u32 target = seg->target;
	u8 on_missing = seg->on_missing;
	struct bpf_sock *sk __attribute__((cleanup(release_sock))) =
		(struct bpf_sock *)sockets.lookup(&target);
	if (!sk)
		/* the target's socket is gone (proxy down?): drop by default, so connections do not
		 * land in some other socket; pass only when the rule says so */
		return on_missing == SKL_MISSING_PASS ? SK_PASS : SK_DROP;

	/* F_REPLACE: like the kernel's multi-program rule, the last program to select wins */
	long err = bpf_sk_assign(ctx, sk, BPF_SK_LOOKUP_F_REPLACE);
	if (err)
		/* the socket cannot take this packet (family or protocol mismatch): treat it as
		 * missing, for the same reason */
		return on_missing == SKL_MISSING_PASS ? SK_PASS : SK_DROP;

	/* steered */
	return SK_PASS;
}
