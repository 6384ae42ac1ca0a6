"""The data path's tables for large rule sets, vectorised with numpy.

The same tables as rules.compile_rules + trie.build + image's packing (those stay the reference,
and build every small rule set: importing numpy costs more than they do below `image.VECTOR_MIN`
rules), made with whole-array operations instead of a Python loop per rule:

- the rules are sorted once (np.lexsort) into the order compile_rules numbers them;
- the segments of the common prefix (one rule, no shorter prefix around it) are written for all
  such prefixes at once; the others (several rules of one prefix, or prefixes inside others,
  where rules fold into each other) go through rules.py's own functions, one by one;
- the trie is built a level at a time: for every node of a level at once, the skip, the
  stride, the prefixes ending in it (expanded over their entries, shorter first) and the
  children below it. A node's contents depend only on its prefixes, its position and what it
  inherits, so every node is the one trie.build makes; only the numbering differs (trie.build
  numbers depth first, this breadth first), which no lookup can tell.

Addresses are 128-bit, as two uint64 words (hi, lo), IPv4 left-aligned in hi: a bit's position
is the same for both families, and an IPv4 prefix's length is its length.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from socket import AF_INET6
from socket import IPPROTO_UDP as PROTO_UDP
from typing import Any

import numpy as np

from . import layout
from .rules import DROP, NO_RULE, Rule, Segments, _overlay, _overlay_one, _own_segments

U64 = np.uint64
M64 = (1 << 64) - 1

NODE = np.dtype(
    [
        ("fallback", "<u8"),
        ("skip_bits", "<u8"),
        ("leaf", "<u8"),
        ("base", "<u4"),
        ("skip", "u1"),
        ("stride", "u1"),
        ("pad", "<u2"),
    ]
)
SEGMENT = np.dtype(
    [
        ("lo", "<u2"),
        ("action", "u1"),
        ("on_missing", "u1"),
        ("slot", "<u4"),
        ("rule", "<u4"),
        ("slots", "u1"),
        ("flags", "u1"),
        ("pad", "<u2"),
    ]
)
RULE = np.dtype(
    [
        ("proto", "u1"),
        ("family", "u1"),
        ("plen", "u1"),
        ("action", "u1"),
        ("on_missing", "u1"),
        ("pad", "V3"),
        ("lo", "<u2"),
        ("hi", "<u2"),
        ("target", "<u4"),
        ("addr_hi", ">u8"),
        ("addr_lo", ">u8"),
    ]
)
assert NODE.itemsize == 32 and SEGMENT.itemsize == 16 and RULE.itemsize == 32

Block = tuple[int, int, int]  # a target's (first slot, slots, flags), as trie.Block
OWN_MAX = 8  # prefixes with up to this many rules (and none around) are done a count at a time


@dataclass
class Built:
    """What image.encode needs of a rule set: how many rules, and each map's bytes."""

    rules: int
    nodes: bytes
    node_count: int
    entries: bytes
    entry_count: int
    segments: bytes
    segment_count: int
    records: bytes  # the rules map's records from rule number 1 (image adds entry 0)
    runs: int


def build(rules: Sequence[Rule], blocks: dict[str, Block], index: dict[str, int]) -> Built:
    """`blocks`: each target's SOCKMAP block; `index`: each target's index in the targets map."""
    if not rules:
        return _empty()
    return _build(list(_columns(rules, index)), blocks, index)


# A rule set as columns, one entry per rule: root (layout.ROOTS), address (hi, lo words), prefix
# length, ports (lo, hi), IP version, steers (else drops), on_missing (layout.MISSING_*), target
# index (a drop rule: the number of targets)
Columns = tuple[Any, Any, Any, Any, Any, Any, Any, Any, Any, Any]


def _columns(rules: Sequence[Rule], index: dict[str, int]) -> Columns:
    """Rule objects as columns, in their order."""
    n = len(rules)
    # transposed in C (zip) rather than picked out rule by rule
    keys, actions, targets, on_missing = zip(*rules, strict=True)
    protos, versions, nets, plens, los, his = zip(*keys, strict=True)
    # arrays typed Any: numpy's stubs follow dtypes through few of the operations below
    version: Any = np.array(versions, np.uint8)
    v6 = version == 6
    root: Any = (np.fromiter(map("udp".__eq__, protos), bool, n) * 2 + v6).astype(np.uint8)
    big = np.array(nets, object)  # Python ints of up to 128 bits
    hi: Any = np.where(v6, big >> 64, big << 32).astype(U64)
    lo: Any = np.where(v6, big & M64, 0).astype(U64)
    plen: Any = np.array(plens, np.int64)
    plo: Any = np.array(los, np.int64)
    phi: Any = np.array(his, np.int64)
    del keys, protos, versions, nets, plens, los, his, big  # large rule sets: memory counts
    steer = np.fromiter(map(DROP.__ne__, actions), bool, n)
    missing = np.fromiter(map("pass".__eq__, on_missing), bool, n)
    missing = np.where(missing, layout.MISSING_PASS, layout.MISSING_DROP).astype(np.uint8)
    of: dict[str | None, int] = {None: len(index)}
    of.update(index)
    tid = np.fromiter(map(of.__getitem__, targets), np.int64, n)
    return root, hi, lo, plen, plo, phi, version, steer, missing, tid


def _record_columns(raw: bytes, count: int, names: list[str], index: dict[str, int]) -> Columns:
    """A generation's rules map (records 1..count, its targets `names` by index) as columns,
    with target indexes in `index` (another generation's targets)."""
    recs = np.frombuffer(raw, RULE, count=count, offset=RULE.itemsize)
    steer = recs["action"] == layout.ACTION_STEER
    # a drop rule's record names target 0: its index is the number of targets
    remap = np.array([index.get(n, len(index)) for n in names] + [len(index)], np.int64)
    tid = np.where(steer, remap[np.minimum(recs["target"], len(names))], len(index))
    version = np.where(recs["family"] == AF_INET6, 6, 4).astype(np.uint8)
    return (*_record_keys(recs), version, steer, recs["on_missing"].astype(np.uint8), tid)


def _record_keys(recs: Any) -> tuple[Any, Any, Any, Any, Any, Any]:
    """Records' root, address words, prefix length and ports: rule-number order is theirs
    (the high port descending)."""
    root = ((recs["proto"] == PROTO_UDP) * 2 + (recs["family"] == AF_INET6)).astype(np.uint8)
    return (
        root,
        recs["addr_hi"].astype(U64),
        recs["addr_lo"].astype(U64),
        recs["plen"].astype(np.int64),
        recs["lo"].astype(np.int64),
        recs["hi"].astype(np.int64),
    )


def in_rule_order(raw: bytes, count: int) -> bool:
    """Whether a rules map's records 1..count are in rule-number order, strictly (each rule
    once): what plan.LazyEffects' binary search needs."""
    if count < 2:
        return True
    root, hi, lo, plen, plo, phi = _record_keys(
        np.frombuffer(raw, RULE, count=count, offset=RULE.itemsize)
    )
    keys = (root, hi, lo, plen, plo, -phi)
    before = np.zeros(count - 1, bool)  # row i comes before row i + 1: decided
    tied = np.ones(count - 1, bool)
    for k in keys:
        a, b = k[:-1], k[1:]
        before |= tied & (a < b)
        tied &= a == b
    return bool(before.all())


def build_edited(
    raw: bytes,
    count: int,
    names: list[str],
    drop: list[int],
    add: Sequence[Rule],
    blocks: dict[str, Block],
    index: dict[str, int],
) -> Built:
    """build() of a generation's rules (its rules map `raw` of `count` rules, targets `names`)
    without the rules numbered in `drop` and with the rules `add`: the same bytes, without a
    Rule object per live rule (a one-rule attach or detach of a large set)."""
    # the records are in rule-number order (plan.LazyEffects took them only so), and stay so
    # without the dropped ones: the added ones are put in their places, no sort
    cols = _record_columns(raw, count, names, index)
    if drop:
        keep = np.ones(count, bool)
        keep[np.array(drop, np.int64) - 1] = False
        cols = tuple(c[keep] for c in cols)
    if add:
        more = _columns(add, index)
        mine = sorted(range(len(add)), key=lambda j: _order_of(more, j))
        kept = len(cols[0])
        at = [
            bisect.bisect_left(range(kept), _order_of(more, j), key=lambda i: _order_of(cols, i))
            for j in mine
        ]
        cols = tuple(np.insert(a, at, b[mine]) for a, b in zip(cols, more, strict=True))  # type: ignore[assignment]
    if not len(cols[0]):
        return _empty()
    return _build(cols, blocks, index, ordered=True)


def _order_of(cols: Columns, i: int) -> tuple[int, ...]:
    """Row i's place in rule-number order (as _build sorts)."""
    root, hi, lo, plen, plo, phi = (int(c[i]) for c in cols[:6])
    return root, hi, lo, plen, plo, -phi


def _build(
    cols: Columns | list[Any],
    blocks: dict[str, Block],
    index: dict[str, int],
    ordered: bool = False,
) -> Built:
    """The tables of rules given as columns; `ordered`: already in rule-number order."""
    root, hi, lo, plen, plo, phi, version, steer, missing, tid = cols
    n = len(root)
    if not ordered:
        # rule-number order: compile_rules' (protocol, family, network, length, lo, -hi);
        # one column at a time, each unsorted one freed as its sorted copy is made (large
        # rule sets: memory counts), when the caller handed its columns over (a list, emptied)
        order = np.lexsort((-phi, plo, plen, lo, hi, root))
        if isinstance(cols, list):
            cols.clear()
        root = root[order]
        hi = hi[order]
        lo = lo[order]
        plen = plen[order]
        plo = plo[order]
        phi = phi[order]
        version = version[order]
        steer = steer[order]
        missing = missing[order]
        tid = tid[order]

    # -- per rule: what its segments say (index 0: no rule)
    names = sorted(index, key=index.__getitem__)
    by_index = np.array([blocks[t] for t in names] + [(0, 0, 0)], np.int64).reshape(-1, 3)
    what_action = np.zeros(n + 1, np.uint8)
    what_action[1:] = np.where(steer, layout.ACTION_STEER, layout.ACTION_DROP)
    what_missing = np.zeros(n + 1, np.uint8)
    what_missing[1:] = missing
    what_slot = np.zeros(n + 1, np.uint32)
    what_slots = np.zeros(n + 1, np.uint8)
    what_flags = np.zeros(n + 1, np.uint8)
    what_slot[1:] = by_index[tid, 0]
    what_slots[1:] = by_index[tid, 1]
    what_flags[1:] = by_index[tid, 2]

    # -- prefixes: runs of rules of one (root, network, length)
    new = np.ones(n, bool)
    if n:
        new[1:] = (root[1:] != root[:-1]) | (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        new[1:] |= plen[1:] != plen[:-1]
    first = np.flatnonzero(new)  # each prefix's first rule (0-based row)
    count = np.diff(np.append(first, n))
    proot, phi_, plo_, pplen = root[first], hi[first], lo[first], plen[first]
    p = len(first)

    # each prefix's last address, and which prefixes contain or are inside another
    host = _mask_below(pplen)  # (hi, lo) of the host bits
    lhi, llo = phi_ | host[0], plo_ | host[1]
    contains = np.zeros(p, bool)
    if p > 1:
        same = proot[1:] == proot[:-1]
        # a prefix that contains any other contains the next one (sorted by address, length)
        contains[:-1] = same & _le(lhi[1:], llo[1:], lhi[:-1], llo[:-1])
    inside = _inside(proot, lhi, llo)
    nested = contains | inside
    irregular = nested | (count > 1)

    # -- segments: the common prefix by formula, one rule count at a time for prefixes with
    # several rules and none around them, the rest by rules.py's functions
    seg_count = 1 + (plo[first] != 1).astype(np.int64) + (phi[first] < 65535)
    parts: list[tuple[Any, Any, Any, Any]] = []  # (prefixes, their lengths, lo, rule numbers)
    own = ~nested & (count > 1) & (count <= OWN_MAX)
    for c in np.unique(count[own]).tolist():
        which = np.flatnonzero(own & (count == c))
        parts.append((which, *_own_segments_of(first[which], c, plo, phi)))
    rest = np.flatnonzero(irregular & ~own)
    if len(rest):
        special = _irregular(
            rest, first, count, proot, phi_, plo_, pplen, lhi, llo, plo, phi, nested
        )  # fmt: skip
        lens = np.fromiter(map(len, special), np.int64, len(rest))
        flat = [x for segs in special for pair in segs for x in pair]
        parts.append((rest, lens, np.array(flat[0::2], np.int64), np.array(flat[1::2], np.int64)))
    for which, lens, _lo, _rule in parts:
        seg_count[which] = lens
    start = np.zeros(p, np.int64)
    start[1:] = np.cumsum(seg_count)[:-1]
    total = int(seg_count.sum())
    seg_lo = np.zeros(total, np.int64)
    seg_rule = np.zeros(total, np.int64)
    reg = np.flatnonzero(~irregular)
    if len(reg):
        number = first[reg] + 1
        rlo, rhi, at = plo[first[reg]], phi[first[reg]], start[reg]
        from1 = rlo == 1
        # lo == 1: (0, n) [, (hi + 1, 0)]; else (0, 0), (lo, n) [, (hi + 1, 0)]
        seg_lo[at] = 0
        seg_rule[at] = np.where(from1, number, 0)
        second = at[~from1]
        seg_lo[second + 1] = rlo[~from1]
        seg_rule[second + 1] = number[~from1]
        tail = rhi < 65535
        where = at + np.where(from1, 1, 2)
        seg_lo[where[tail]] = rhi[tail] + 1
        seg_rule[where[tail]] = 0
    for which, lens, flat_lo, flat_rule in parts:
        at = np.repeat(start[which] - (np.cumsum(lens) - lens), lens) + np.arange(len(flat_lo))
        seg_lo[at] = flat_lo
        seg_rule[at] = flat_rule
    segments = np.zeros(max(1, total), SEGMENT)
    segments["lo"][:total] = seg_lo
    segments["action"][:total] = what_action[seg_rule]
    segments["on_missing"][:total] = what_missing[seg_rule]
    segments["slot"][:total] = what_slot[seg_rule]
    segments["rule"][:total] = seg_rule
    segments["slots"][:total] = what_slots[seg_rule]
    segments["flags"][:total] = what_flags[seg_rule]
    leaf = start.astype(U64) | (seg_count.astype(U64) << U64(32))

    nodes, entries = _trie(proot, phi_, plo_, pplen, leaf)

    # -- the rules map's records
    records = np.zeros(n, RULE)
    records["proto"] = np.where(root >= 2, 17, 6)  # roots: tcp v4, tcp v6, udp v4, udp v6
    records["family"] = np.where(version == 6, 10, 2)
    records["plen"] = plen
    records["action"] = what_action[1:]
    records["on_missing"] = missing
    records["lo"] = plo
    records["hi"] = phi
    records["target"] = np.where(tid < len(names), tid, 0)
    records["addr_hi"] = hi
    records["addr_lo"] = lo
    return Built(
        n,
        nodes.tobytes(),
        len(nodes),
        entries.tobytes() if len(entries) else bytes(8),
        max(1, len(entries)),
        segments.tobytes(),
        max(1, total),
        records.tobytes(),
        p,
    )


def _empty() -> Built:
    """No rules: four root nodes with nothing below them."""
    nodes = np.zeros(len(layout.ROOTS), NODE)
    return Built(0, nodes.tobytes(), len(nodes), bytes(8), 1, bytes(SEGMENT.itemsize), 1, b"", 0)


def _le(ahi: Any, alo: Any, bhi: Any, blo: Any) -> Any:
    """a <= b for 128-bit values as (hi, lo) arrays."""
    return (ahi < bhi) | ((ahi == bhi) & (alo <= blo))


def _mask_below(plen: Any) -> tuple[Any, Any]:
    """(hi, lo) words with the bits after the first `plen` (0..128) set."""
    plen = plen.astype(np.int64)
    hi = np.where(plen >= 64, U64(0), _ones(64 - np.minimum(plen, 64)))
    lo = _ones(128 - np.maximum(plen, 64))
    return hi, lo


def _ones(k: Any) -> Any:
    """uint64 words with their lowest `k` (0..64) bits set."""
    k = np.asarray(k, np.int64)
    full = k >= 64
    part = (U64(1) << np.minimum(k, 63).astype(U64)) - U64(1)
    return np.where(full, U64(M64), part)


def _inside(root: Any, lhi: Any, llo: Any) -> Any:
    """Which prefixes lie inside an earlier one of their root (prefixes sorted by address,
    then length): some earlier prefix of the root ends at or after this one's last address."""
    p = len(root)
    out = np.zeros(p, bool)
    if p < 2:
        return out
    # the last addresses as dense ranks, to take running maxima of 128-bit values
    by = np.lexsort((llo, lhi))
    step = np.ones(p, np.int64)
    step[0] = 0
    step[1:] = (lhi[by][1:] != lhi[by][:-1]) | (llo[by][1:] != llo[by][:-1])
    rank = np.empty(p, np.int64)
    rank[by] = np.cumsum(step)
    bounds = np.flatnonzero(np.diff(root.astype(np.int64))) + 1
    for a, b in zip(np.r_[0, bounds], np.r_[bounds, p], strict=True):
        if b - a < 2:
            continue
        best = np.maximum.accumulate(rank[a:b])
        out[a + 1 : b] = best[:-1] >= rank[a + 1 : b]
    return out


def _irregular(
    which: Any,
    first: Any,
    count: Any,
    root: Any,
    hi: Any,
    lo: Any,
    plen: Any,
    lhi: Any,
    llo: Any,
    rule_lo: Any,
    rule_hi: Any,
    nested: Any,
) -> list[Segments]:
    """Segments of the prefixes `which` (in that order), by rules.py's functions: those inside
    or around others, and those with many rules (the containers of a prefix are always
    among the latter, so a stack over them finds the nearest one, as compile_rules does)."""
    out: list[Segments] = []
    stack: list[tuple[int, int, int, Segments]] = []  # (root, network, last, segments)
    rl, rh = rule_lo.tolist(), rule_hi.tolist()
    firsts, counts = first[which].tolist(), count[which].tolist()
    roots, nested_ = root[which].tolist(), nested[which].tolist()
    nets = ((hi[which].astype(object) << 64) | lo[which].astype(object)).tolist()
    lasts = ((lhi[which].astype(object) << 64) | llo[which].astype(object)).tolist()
    for f, c, r, net, last, is_nested in zip(
        firsts, counts, roots, nets, lasts, nested_, strict=True
    ):
        while stack and not (stack[-1][0] == r and stack[-1][1] <= net <= stack[-1][2]):
            stack.pop()
        parent = stack[-1][3] if stack else None
        if c == 1:
            lo_, hi_, number = rl[f], rh[f], f + 1
            if parent is not None:
                segs = _overlay_one(lo_, hi_, number, parent)
            elif lo_ == 1:
                segs = ((0, number), (hi_ + 1, 0)) if hi_ < 65535 else ((0, number),)
            else:
                segs = (
                    ((0, 0), (lo_, number), (hi_ + 1, 0))
                    if hi_ < 65535
                    else ((0, 0), (lo_, number))
                )
        else:
            ranges = [(rl[j], rh[j], j + 1) for j in range(f, f + c)]
            segs = _overlay(_own_segments(ranges), parent if parent is not None else NO_RULE)
        if len(segs) > 1 and segs[1][0] == 1:
            segs = ((0, segs[1][1]), *segs[2:])
        out.append(segs)
        if is_nested:
            stack.append((r, net, last, segs))
    return out


def _own_segments_of(first: Any, c: int, rule_lo: Any, rule_hi: Any) -> tuple[Any, Any, Any]:
    """rules._own_segments (then the port-0 step of compile_rules) for prefixes of `c` rules
    each, nothing around them, all at once: (each one's length, then all their segments' first
    ports and rule numbers, one prefix after the other). `first`: each one's first rule row;
    its rules are sorted by (lo, -hi), nested or disjoint."""
    m = len(first)
    rows = first[:, None] + np.arange(c)
    lo, hi, number = rule_lo[rows], rule_hi[rows], rows + 1
    bounds = np.sort(np.concatenate([np.zeros((m, 1), np.int64), lo, hi + 1], axis=1), axis=1)
    # the narrowest range covering each boundary: of nested or disjoint ranges sorted by
    # (lo, -hi), the last one that covers it
    cover = (lo[:, None, :] <= bounds[:, :, None]) & (bounds[:, :, None] <= hi[:, None, :])
    last = c - 1 - np.argmax(cover[:, :, ::-1], axis=2)
    rule = np.where(cover.any(axis=2), np.take_along_axis(number, last, axis=1), 0)
    keep = bounds <= 65535
    keep[:, 1:] &= rule[:, 1:] != rule[:, :-1]
    # port 0 is no rule's: the piece from port 1, when there is one, starts the run at 0
    one = keep & (bounds == 1)
    rows1 = np.flatnonzero(one.any(axis=1))
    cols1 = np.argmax(one[rows1], axis=1)
    rule[rows1, 0] = rule[rows1, cols1]
    keep[rows1, cols1] = False
    return keep.sum(axis=1), bounds[keep], rule[keep]


def _bits(hi: Any, lo: Any, pos: Any, n: Any) -> Any:
    """`n` (1..64) bits of each 128-bit address from bit `pos` (0..127) on, as uint64: the
    dispatcher's address_bits."""
    pos = pos.astype(np.int64)
    a = np.clip(pos - 64, 0, 63).astype(U64)
    b = np.clip(pos, 0, 63).astype(U64)
    c = np.clip(64 - pos, 1, 63).astype(U64)
    w = np.where(pos >= 64, lo << a, np.where(pos == 0, hi, (hi << b) | (lo >> c)))
    return w >> (64 - n.astype(np.int64)).astype(U64)


def _bit_length(x: Any) -> Any:
    """int.bit_length of each uint64."""
    x = x.astype(U64)
    r = np.zeros(len(x), np.int64)
    for s in (32, 16, 8, 4, 2, 1):
        big = (x >> U64(s)) != 0
        r += np.where(big, s, 0)
        x = np.where(big, x >> U64(s), x)
    return r + (x != 0)


def _trie(root: Any, hi: Any, lo: Any, plen: Any, leaf: Any) -> tuple[Any, Any]:
    """trie.build's nodes and entries, a level of the trie at a time."""
    widths = np.array([32 if v == 4 else 128 for (_p, v) in layout.ROOTS], np.int64)
    nroots = len(layout.ROOTS)
    items = np.flatnonzero(plen > 0)  # /0 prefixes are the roots' inherited leaves
    inherited = np.zeros(nroots, U64)
    zero = np.flatnonzero(plen == 0)
    inherited[root[zero]] = leaf[zero]

    node_parts: list[Any] = []
    entry_parts: list[Any] = []
    entry_total = 0
    # a level's nodes (numbered from next_id on), each with its position, its inherited
    # leaf and its items (a contiguous range of `items`, in address order)
    pos = np.zeros(nroots, np.int64)
    width = widths.copy()
    owner = root[items].astype(np.int64)  # the node (index within the level) of each item
    next_id = nroots
    while len(pos):
        m = len(pos)
        cnt = np.bincount(owner, minlength=m)
        begin = np.zeros(m, np.int64)
        begin[1:] = np.cumsum(cnt)[:-1]
        rec = np.zeros(m, NODE)
        rec["fallback"] = inherited
        ihi, ilo, ipl = hi[items], lo[items], plen[items]

        # skip: the bits every item of the node shares, up to the shortest item and 64
        has = cnt > 0
        hb = np.flatnonzero(has)
        skip = np.zeros(m, np.int64)
        if len(hb):
            f, last = begin[hb], begin[hb] + cnt[hb] - 1
            dhi, dlo = ihi[f] ^ ihi[last], ilo[f] ^ ilo[last]
            bl = np.where(dhi != 0, 64 + _bit_length(dhi), _bit_length(dlo))
            common = 128 - bl - pos[hb]
            shortest = np.minimum.reduceat(ipl, begin[hb]) if len(items) else 0
            skip[hb] = np.minimum(np.minimum(64, shortest - pos[hb]), common)
        sk = np.flatnonzero(skip > 0)
        skip_bits = np.zeros(m, U64)
        if len(sk):
            skip_bits[sk] = _bits(ihi[begin[sk]], ilo[begin[sk]], pos[sk], skip[sk])
        rec["skip"] = skip
        rec["skip_bits"] = skip_bits
        pos = pos + skip
        # an item that ends exactly there is what the node's entries inherit
        mine = pos[owner]
        ends_here = ipl == mine
        inh = inherited.copy()
        inh[owner[ends_here]] = leaf[items[ends_here]]
        keep = ~ends_here
        items, owner, ipl, ihi, ilo = (
            items[keep], owner[keep], ipl[keep], ihi[keep], ilo[keep]
        )  # fmt: skip
        cnt = np.bincount(owner, minlength=m)
        # no items left: a leaf node
        rec["leaf"] = np.where(cnt == 0, inh, U64(0))
        inner = np.flatnonzero(cnt > 0)
        stride = np.zeros(m, np.int64)
        c4 = _bit_length((4 * cnt[inner]).astype(U64)) - 1
        stride[inner] = np.minimum(
            np.maximum(layout.MIN_STRIDE, np.minimum(layout.MAX_STRIDE, c4)),
            width[inner] - pos[inner],
        )
        rec["stride"] = stride
        size = np.where(cnt > 0, np.int64(1) << stride, 0)
        base_local = np.zeros(m, np.int64)
        base_local[1:] = np.cumsum(size)[:-1]
        rec["base"] = np.where(cnt > 0, base_local + entry_total, 0)
        block = np.repeat(inh, size)
        # items ending in the node's stride, expanded over their entries, shorter first
        end = pos + stride
        iend = end[owner]
        chunk = _bits(ihi, ilo, pos[owner], np.maximum(stride[owner], 1)).astype(np.int64)
        ending = ipl <= iend
        e = np.flatnonzero(ending)
        if len(e):
            for length in np.unique(ipl[e]):
                sel = e[ipl[e] == length]
                span = np.int64(1) << (iend[sel] - length)
                at = base_local[owner[sel]] + chunk[sel]
                offs = np.repeat(at - np.cumsum(np.r_[0, span[:-1]]), span)
                idx = offs + np.arange(int(span.sum()))
                block[idx] = np.repeat(leaf[items[sel]], span)
        # the rest go to children, one per (node, chunk), in order
        below = np.flatnonzero(~ending)
        items, owner, chunk = items[below], owner[below], chunk[below]
        child_new = np.ones(len(items), bool)
        if len(items):
            child_new[1:] = (owner[1:] != owner[:-1]) | (chunk[1:] != chunk[:-1])
        heads = np.flatnonzero(child_new)
        slot_at = base_local[owner[heads]] + chunk[heads]
        child_inherited = block[slot_at]
        child_ids = next_id + np.arange(len(heads))
        block[slot_at] = U64(layout.NODE_FLAG) | child_ids.astype(U64)
        node_parts.append(rec)
        entry_parts.append(block)
        entry_total += len(block)
        # the next level
        next_id += len(heads)
        parent = owner[heads]
        pos = end[parent]
        width = width[parent]
        inherited = child_inherited
        owner = np.cumsum(child_new) - 1
    nodes = np.concatenate(node_parts) if node_parts else np.zeros(0, NODE)
    entries = np.concatenate(entry_parts) if entry_parts else np.zeros(0, U64)
    return nodes, entries


# -- counters -----------------------------------------------------------------------------------

WIDTH = len(layout.KERNEL_COUNTERS)


def _totals(counted: Any) -> Any:
    """Each rule's counters, every CPU's plus `base`, mod 2**64: a (rules + 1, WIDTH) array
    (image.Counted.columns, as an array)."""
    n, ncpu = counted.count, counted.cpus
    size = WIDTH * 8
    base = np.zeros((n + 1) * WIDTH, dtype="<u8")
    got = np.frombuffer(
        counted.base, dtype="<u8", count=min(len(counted.base), (n + 1) * size) // 8
    )
    base[: got.size] = got
    per = np.zeros((n + 1) * ncpu * WIDTH, dtype="<u8")
    raw = np.frombuffer(
        counted.raw, dtype="<u8", count=min(len(counted.raw), (n + 1) * ncpu * size) // 8
    )
    per[: raw.size] = raw
    total: Any = base.reshape(n + 1, WIDTH) + per.reshape(n + 1, ncpu, WIDTH).sum(
        axis=1, dtype="<u8"
    )
    return total


def _records(raw: bytes, count: int) -> Any:
    return np.frombuffer(raw, dtype=RULE, count=count + 1)[1:]


def _identities(recs: Any) -> Any:
    """What identifies each rule across generations (image.rule_identities: protocol, family,
    prefix length, ports, address) as four uint64 words per rule."""
    raw = recs.view("u1").reshape(-1, 32).copy()
    raw[:, 3:8] = 0  # action, on_missing, pad
    raw[:, 12:16] = 0  # target
    return raw.view("<u8")


def _matches(old: Any, new: Any) -> tuple[Any, Any]:
    """The pairs (old index, new index) of rules with the same identity (four words each).

    Each identity is hashed to one word; the new hashes are looked up among the sorted old
    ones, and a hit counts only when all four words are equal. Identities are unique within a
    generation, so when the old hashes are too, each new rule has at most one candidate. When
    two old identities share a hash (never seen: 2**-64 per pair), the words are sorted whole
    instead."""
    mult = np.array(
        [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93],
        dtype="<u8",
    )

    def hashed(words: Any) -> Any:
        h: Any = (words * mult).sum(axis=1, dtype="<u8")
        return h ^ (h >> U64(29))

    if len(old) == 0 or len(new) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    ho, hn = hashed(old), hashed(new)
    order = np.argsort(ho, kind="stable")
    sorted_ho = ho[order]
    if np.any(sorted_ho[1:] == sorted_ho[:-1]):
        return _matches_sorted(old, new)
    at = np.minimum(np.searchsorted(sorted_ho, hn), len(old) - 1)
    olds = order[at]
    hit = (sorted_ho[at] == hn) & np.all(old[olds] == new, axis=1)
    return olds[hit], np.nonzero(hit)[0]


def _matches_sorted(old: Any, new: Any) -> tuple[Any, Any]:
    """_matches by sorting every identity whole: a run of equal words in the sorted union is
    one old and one new."""
    both = np.concatenate([old, new])
    order = np.lexsort(both.T[::-1])
    ranked = both[order]
    same = np.all(ranked[1:] == ranked[:-1], axis=1)
    first, second = order[:-1][same], order[1:][same]
    n = len(old)
    olds = np.where(first < n, first, second)
    news = np.where(first < n, second, first) - n
    return olds, news


def _group_ids(recs: Any, ntargets: int) -> Any:
    """Each rule's group (image.rule_groups): its target's index, or a drop group after them."""
    from .rules import PROTOCOLS

    ids = recs["target"].astype(np.int64)
    drop = recs["action"] == layout.ACTION_DROP
    udp = recs["proto"] == PROTOCOLS["udp"]
    ids[drop] = ntargets + udp[drop]
    return ids


EDITED_MAX = 4096  # rules between the common start and end of two generations: the edit


def _carry_edited(
    old: Any, old_recs: Any, new_recs: Any, totals: Any, tbase: bool
) -> tuple[bytes | None, bytes | None] | None:
    """carry() when the new generation is the old one edited (attach, detach: the same
    targets, and the same records but for a few in one place): the records both start with
    and end with are the same rules in the same groups, so only those between are matched,
    and only they move counts between groups. None when more than EDITED_MAX records differ."""
    na, nb = len(old_recs), len(new_recs)
    m = min(na, nb)
    wo = old_recs.view("<u8").reshape(-1, 4)
    wn = new_recs.view("<u8").reshape(-1, 4)
    differ = np.flatnonzero(np.any(wo[:m] != wn[:m], axis=1))
    head = int(differ[0]) if len(differ) else m
    differ = np.flatnonzero(np.any(wo[na - (m - head) :] != wn[nb - (m - head) :], axis=1))
    tail = (m - head) - (int(differ[-1]) + 1 if len(differ) else 0)
    if (na - head - tail) + (nb - head - tail) > EDITED_MAX:
        return None
    mid_o, mid_n = _matches(
        _identities(old_recs[head : na - tail]), _identities(new_recs[head : nb - tail])
    )
    mid_o, mid_n = mid_o + head, mid_n + head
    out = np.zeros((nb + 1, WIDTH), dtype="<u8")
    out[1 : head + 1] = totals[1 : head + 1]
    out[nb - tail + 1 : nb + 1] = totals[na - tail + 1 : na + 1]
    out[mid_n + 1] = totals[mid_o + 1]
    base = out.tobytes() if np.any(out) else None
    if not tbase:
        return base, None
    from .image import DROP_GROUPS

    groups = len(old.names) + len(DROP_GROUPS)  # after the targets
    adjust = np.zeros((groups, WIDTH), dtype="<u8")
    if old.tbase:
        adjust += np.frombuffer(old.tbase, dtype="<u8", count=groups * WIDTH).reshape(-1, WIDTH)
    # what the old rules in between counted leaves their groups; what the new ones there
    # carried comes out of theirs (the rules at both ends cancel out)
    np.add.at(
        adjust,
        _group_ids(old_recs[head : na - tail], len(old.names)),
        totals[head + 1 : na - tail + 1],
    )
    np.subtract.at(adjust, _group_ids(new_recs[mid_n], len(old.names)), totals[mid_o + 1])
    return base, adjust.tobytes()


def carry(
    old: Any, rules: bytes, count: int, names: list[str], tbase: bool
) -> tuple[bytes | None, bytes | None]:
    """image.carry, the same bytes, with whole-array operations (for large rule sets)."""
    from . import image

    totals = _totals(old)
    old_recs, new_recs = _records(old.rules, old.count), _records(rules, count)
    if old.names == names:
        edited = _carry_edited(old, old_recs, new_recs, totals, tbase)
        if edited is not None:
            return edited
    olds, news = _matches(_identities(old_recs), _identities(new_recs))
    out = np.zeros((count + 1, WIDTH), dtype="<u8")
    out[news + 1] = totals[olds + 1]
    carried = bool(np.any(out))
    base = out.tobytes() if carried else None
    if not tbase:
        return base, None
    old_keys = image.groups(old.names)
    sums = np.zeros((len(old_keys), WIDTH), dtype="<u8")
    np.add.at(sums, _group_ids(old_recs, len(old.names)), totals[1:])
    if old.tbase:
        extra = np.frombuffer(old.tbase, dtype="<u8", count=len(old_keys) * WIDTH)
        sums += extra.reshape(-1, WIDTH)
    where = {g: i for i, g in enumerate(old_keys)}
    keys = image.groups(names)
    adjust = np.zeros((len(keys), WIDTH), dtype="<u8")
    for i, g in enumerate(keys):
        if g in where:
            adjust[i] = sums[where[g]]
    taken = np.zeros((len(keys), WIDTH), dtype="<u8")
    np.add.at(taken, _group_ids(new_recs, len(names))[news], totals[olds + 1])
    adjust -= taken
    return base, adjust.tobytes()
