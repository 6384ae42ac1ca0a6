"""The data path's tables: a compiled rule set laid out as the BPF program reads it.

Pure Python, no kernel. See bpf/dispatcher.c for how the program walks these tables.

The trie is a multibit trie with a stride chosen per node and path compression:

- every node first compares `skip` address bits that all prefixes below it share (so a lone
  /128 under a /48 costs three nodes, not twenty);
- then indexes `stride` bits into its entries. The stride grows with the number of prefixes
  below the node (4 bits for a handful, 16 for tens of thousands), so dense parts of the
  address space are crossed in few steps and sparse parts cost little memory;
- prefixes that end inside a node's stride are expanded over the entries they cover, shorter
  ones first, so an entry holds the longest prefix ending in that node.

Each prefix's leaf is a run: the prefix's segments (port pieces, shorter prefixes' rules
folded in), as start | count << 32 (0: no rule). Prefixes with the same segments share a run.
"""

from __future__ import annotations

import operator
import struct
from array import array
from dataclasses import dataclass, field

from . import layout
from .rules import DROP, Compiled, Segments

_NODE = struct.Struct("<QQQIBBH")
_SEGMENT = struct.Struct("<HBBIIBBH")  # mirrors struct segment

Item = tuple[int, int, int]  # (network as an int, prefix length, leaf)
# a target's block of SOCKMAP slots as segments carry it: (first slot, slots, flags)
Block = tuple[int, int, int]
# (first port, action, on_missing, first slot, rule number, slots, flags): mirrors struct segment
SegmentRow = tuple[int, int, int, int, int, int, int]
# (base, fallback leaf, skip bits, skip, stride, leaf when stride is 0)
Node = tuple[int, int, int, int, int, int]


@dataclass
class Tables:
    """What the program reads, as Python values; `pack_*` give the bytes for the maps."""

    nodes: list[Node] = field(default_factory=list)
    entries: array[int] = field(default_factory=lambda: array("Q"))
    segments: list[SegmentRow] = field(default_factory=list)
    runs: int = 0  # distinct runs

    def pack_nodes(self) -> bytes:
        return b"".join(
            _NODE.pack(fb, bits, leaf, base, skip, stride, 0)
            for base, fb, bits, skip, stride, leaf in self.nodes
        )

    def pack_entries(self) -> bytes:
        return self.entries.tobytes() or bytes(8)

    def pack_segments(self) -> bytes:
        return b"".join(_SEGMENT.pack(*s, 0) for s in self.segments) or bytes(_SEGMENT.size)

    def depth(self) -> int:
        """The most nodes a lookup visits."""
        best = 0
        todo = [(i, 1) for i in range(len(layout.ROOTS))]
        while todo:
            idx, d = todo.pop()
            best = max(best, d)
            base, _fb, _bits, _skip, stride, _leaf = self.nodes[idx]
            if not stride:
                continue
            for v in self.entries[base : base + (1 << stride)]:
                if v & layout.NODE_FLAG:
                    todo.append((v & ~layout.NODE_FLAG, d + 1))
        return best

    # -- the program's walk, in Python (unit tests compare it with the rule model) -------------

    def walk(self, proto: str, version: int, addr: int) -> int:
        """The leaf the program finds for an address (an int, `version` 4 or 6)."""
        width = 32 if version == 4 else 128
        idx = layout.ROOTS[(proto, version)]
        pos = 0
        for _ in range(layout.NODE_STEPS):
            base, fallback, skip_bits, skip, stride, leaf = self.nodes[idx]
            if skip:
                if (addr >> (width - pos - skip)) & ((1 << skip) - 1) != skip_bits:
                    return fallback
                pos += skip
            if not stride:
                return leaf
            v = self.entries[base + ((addr >> (width - pos - stride)) & ((1 << stride) - 1))]
            pos += stride
            if not v & layout.NODE_FLAG:
                return v
            idx = v & ~layout.NODE_FLAG
        raise AssertionError("trie deeper than the program walks")

    def segment_at(self, leaf: int, port: int) -> SegmentRow | None:
        start, count = leaf & 0xFFFFFFFF, leaf >> 32
        if not count or not port:
            return None
        best = self.segments[start]
        for s in self.segments[start : start + count]:
            if s[0] <= port:
                best = s
        return best


def build(compiled: Compiled, blocks: dict[str, Block]) -> Tables:
    """Lay out `compiled`; `blocks` gives each target's block of SOCKMAP slots."""
    t = Tables()
    interned: dict[Segments, int] = {}
    # (action, on_missing, first slot, rule number, slots, flags) by rule number; 0: no rule
    what: list[tuple[int, int, int, int, int, int]] = [(layout.ACTION_NONE, 0, 0, 0, 0, 0)]
    for number, r in enumerate(compiled.rules, 1):
        missing = layout.MISSING_PASS if r.on_missing == "pass" else layout.MISSING_DROP
        if r.action == DROP:
            what.append((layout.ACTION_DROP, missing, 0, number, 0, 0))
        else:
            slot, slots, flags = blocks[r.target or ""]
            what.append((layout.ACTION_STEER, missing, slot, number, slots, flags))

    def run_of(segs: Segments) -> int:
        leaf = interned.get(segs)
        if leaf is None:
            leaf = len(t.segments) | len(segs) << 32
            interned[segs] = leaf
            t.runs += 1
            t.segments.extend([(lo, *what[number]) for lo, number in segs])
        return leaf

    t.nodes.extend([(0, 0, 0, 0, 0, 0)] * len(layout.ROOTS))
    for (proto, version), root in layout.ROOTS.items():
        width = 32 if version == 4 else 128
        prefixes = compiled.groups.get((proto, version), {})
        inherited = 0
        items: list[Item] = []
        for (net, plen), segs in prefixes.items():
            if plen == 0:
                inherited = run_of(segs)
            else:
                items.append((net, plen, run_of(segs)))
        items.sort()  # already in address order from compile_rules: cheap, and then certain
        _node(t, items, 0, inherited, width, root)
    return t


def _stride(count: int, left: int) -> int:
    """Bits a node indexes: about 4 entries per prefix below it, within 4..16 bits."""
    s = max(layout.MIN_STRIDE, min(layout.MAX_STRIDE, (4 * count).bit_length() - 1))
    return min(s, left)


_length = operator.itemgetter(1)


def _node(t: Tables, items: list[Item], pos: int, inherited: int, width: int, idx: int) -> None:
    """Fill node `idx` for `items` (prefixes longer than `pos` that share its first `pos` bits,
    sorted by address); `inherited` is the leaf of the longest prefix of at most `pos` bits
    above them."""
    fallback = inherited
    if len(items) == 1 and items[0][1] - pos <= layout.MAX_SKIP:
        # the common case deep in a trie: one prefix below, all of it skipped
        net, plen, leaf = items[0]
        skip = plen - pos
        skip_bits = (net >> (width - plen)) & ((1 << skip) - 1)
        t.nodes[idx] = (0, fallback, skip_bits, skip, 0, leaf)
        return
    skip = skip_bits = 0
    if items:
        # items come sorted by address: the first and the last share what all of them share
        first = items[0][0]
        diff = first ^ items[-1][0]
        shortest = min(items, key=_length)[1]
        common = width - diff.bit_length() - pos
        skip = min(layout.MAX_SKIP, shortest - pos, common)
        if skip:
            skip_bits = (first >> (width - pos - skip)) & ((1 << skip) - 1)
            pos += skip
            rest: list[Item] = []
            for it in items:
                if it[1] == pos:
                    inherited = it[2]  # the one prefix that ends exactly here
                else:
                    rest.append(it)
            items = rest
    if not items:
        t.nodes[idx] = (0, fallback, skip_bits, skip, 0, inherited)
        return
    stride = _stride(len(items), width - pos)
    end = pos + stride
    shift = width - end
    mask = (1 << stride) - 1
    slots = [inherited] * (1 << stride)
    below: dict[int, list[Item]] = {}
    ending = []
    for it in items:
        if it[1] <= end:
            ending.append(it)
        else:
            below.setdefault((it[0] >> shift) & mask, []).append(it)
    ending.sort(key=_length)  # shorter first: longer prefixes overwrite them
    for net, plen, run in ending:
        a = (net >> shift) & mask
        n = 1 << (end - plen)
        slots[a : a + n] = [run] * n
    base = len(t.entries)
    nodes, entries = t.nodes, t.entries
    nodes[idx] = (base, fallback, skip_bits, skip, stride, 0)
    entries.extend(slots)
    for chunk, group in below.items():
        child = len(nodes)
        entries[base + chunk] = _FLAG | child
        if len(group) == 1 and group[0][1] - end <= _MAX_SKIP:
            # most children: one prefix below, all of it skipped (as _node would make it)
            net, plen, leaf = group[0]
            n = plen - end
            nodes.append((0, slots[chunk], (net >> (width - plen)) & ((1 << n) - 1), n, 0, leaf))
        else:
            nodes.append((0, 0, 0, 0, 0, 0))
            _node(t, group, end, slots[chunk], width, child)


_FLAG, _MAX_SKIP = layout.NODE_FLAG, layout.MAX_SKIP
