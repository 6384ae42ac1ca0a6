"""A generation's contents, as bytes for its maps, and back. Pure Python, no kernel.

`encode` turns a plan's rule set and targets into what every map of a generation holds: the
tables the program reads (nodes, entries, segments: see trie.py) and the records kept for
userspace (rules, targets, meta). The decoders read the records back for the store's snapshot.
The store (store.py) only creates maps of these sizes and copies the bytes in.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
import sys
import threading
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import __version__, layout, record, trie
from .plan import Effect, LiveEdit, Slotted
from .rules import DROP, PROTO_NAMES, PROTOCOLS, STEER, IPAddress, Rule, RuleKey, RuleSet

RULE = struct.Struct("<BBBBB3xHHI16s")  # mirrors layout.RuleRecord, and is record.RULE
TARGET = struct.Struct("<64sBBHBBHI16s4x")  # mirrors layout.TargetRecord
COUNTERS = struct.Struct("<5Q")  # mirrors layout.Counters
assert RULE.size == 32 and TARGET.size == 96 and COUNTERS.size == 40
assert RULE.format == record.RULE.format
assert (layout.ACTION_STEER, layout.ACTION_DROP) == (record.STEER_CODE, record.DROP_CODE)
assert {layout.MISSING_DROP: "drop", layout.MISSING_PASS: "pass"} == record.MISSING

_ACTIONS = {layout.ACTION_DROP: DROP, layout.ACTION_STEER: STEER}
_MISSING = {layout.MISSING_PASS: "pass", layout.MISSING_DROP: "drop"}


@dataclass
class Image:
    """Entries and contents of each map of a generation (the SOCKMAP aside)."""

    maps: dict[str, tuple[int, bytes] | Later]
    rules: int  # rules in it (rule numbers 1..rules)


class Later:
    """A map's entries and contents made by another thread: a large rule set's record is
    compressed (zlib lets go of the GIL) while the other maps are made and the program is
    loaded (store.build)."""

    def __init__(self, make: Callable[[], tuple[int, bytes]]) -> None:
        self._out: tuple[int, bytes] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(make,), daemon=True)
        self._thread.start()

    def _run(self, make: Callable[[], tuple[int, bytes]]) -> None:
        try:
            self._out = make()
        except BaseException as e:  # handed to the caller of result()
            self._error = e

    def result(self) -> tuple[int, bytes]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._out is not None
        return self._out


@dataclass(frozen=True)
class MetaInfo:
    generation: int
    netns_cookie: int
    netns_inode: int
    label: str


# From this many rules on, the tables are built with numpy (vector.py): below it, importing
# numpy (60-90 ms) costs more than the Python build saves
VECTOR_MIN = 10_000


def encode(
    rules: RuleSet,
    targets: dict[str, Slotted],
    meta: MetaInfo,
    vectored: bool | None = None,
    source: str = "",
    later: bool = False,
) -> Image:
    """`vectored`: build the tables with numpy (vector.py) or in Python (rules.compile_rules
    and trie.build, the reference); None: numpy from VECTOR_MIN rules on. Both give the same
    lookups, the same segments and the same rule records. `source`: the digest of the rule
    file the rules were read from, kept in the record. `later`: the record is made by
    another thread (Later)."""
    blocks = {
        n: (t.slot, t.slots, layout.TARGET_EXACT if t.exact else 0) for n, t in targets.items()
    }
    names = sorted(targets)
    index = {name: i for i, name in enumerate(names)}
    if vectored is None:
        vectored = len(rules) >= VECTOR_MIN
    if vectored:
        from . import vector

        if isinstance(rules, LiveEdit) and not rules.whole and rules.base.searchable:
            # the live rules edited (attach, detach): from the records, no Rule per live rule
            base = rules.base
            built = vector.build_edited(
                base.raw(), base.count, base.names, *rules.changes(), blocks, index
            )
        else:
            built = vector.build(list(rules.rules.values()), blocks, index)
        n = built.rules
        if n >= 1 << 31 or built.segment_count >= 1 << 31:
            raise ValueError(f"{n} rules is more than a generation holds")
        tables = (
            (built.node_count, built.nodes),
            (built.entry_count, built.entries),
            (built.segment_count, built.segments),
        )
        records = [bytes(RULE.size), built.records]
    else:
        compiled = rules.compile()
        python = trie.build(compiled, blocks)
        n = len(compiled.rules)
        if n >= 1 << 31 or len(python.segments) >= 1 << 31:
            raise ValueError(f"{n} rules is more than a generation holds")
        tables = (
            (len(python.nodes), python.pack_nodes()),
            (max(1, len(python.entries)), python.pack_entries()),
            (max(1, len(python.segments)), python.pack_segments()),
        )
        records = [bytes(RULE.size), *_records(compiled.rules, index)]
    target_records = [_pack_target(targets[name]) for name in names]
    m = layout.Meta(
        layout=layout.LAYOUT_VERSION,
        rules=n,
        targets=len(names),
        netns_cookie=meta.netns_cookie,
        netns_inode=meta.netns_inode,
        generation=meta.generation,
    )
    # the label, then after a NUL the version that wrote it (`status` shows both); copied in
    # whole: ctypes would stop at the NUL
    label = meta.label.encode()[:40] + b"\0" + f"v{__version__}".encode()[:22]
    ctypes.memmove(ctypes.addressof(m) + layout.Meta.label.offset, label, len(label))
    declared = {n: (t.proto, t.addr, t.port, t.exact) for n, t in targets.items()}

    def make_record() -> tuple[int, bytes]:
        return record.chunks(record.encode(b"".join(records[1:]), declared, source))

    return Image(
        {
            "nodes": tables[0],
            "entries": tables[1],
            "segments": tables[2],
            "counters": (n + 1, b""),
            "rules": (n + 1, b"".join(records)),
            "base": (n + 1, b""),
            "tbase": (len(names) + len(DROP_GROUPS), b""),
            "targets": (max(1, len(names)), b"".join(target_records)),
            "meta": (1, bytes(m)),
            # the rules map's records are the record's too (record.py defines them for itself)
            "record": Later(make_record) if later else make_record(),
        },
        n,
    )


def _records(rules: list[Rule], index: dict[str, int]) -> Iterator[bytes]:
    """The rules map's record of each rule, in rule-number order (record.RULE: the same)."""
    return (record.pack_rule(r, index) for r in rules)


def _pack_target(t: Slotted) -> bytes:
    flags = (
        (layout.TARGET_EXACT if t.exact else 0)
        | (layout.TARGET_WAITING if t.waiting else 0)
        | (layout.TARGET_V6ONLY if t.v6only else 0)
        | (layout.TARGET_ADDR_V6 if t.addr.version == 6 else 0)
    )
    return TARGET.pack(
        t.name.encode(),
        PROTOCOLS[t.proto],
        t.family,
        t.port,
        t.slots,
        flags,
        0,
        t.slot,
        t.addr.packed.ljust(16, b"\0"),
    )


def decode_meta(raw: bytes) -> layout.Meta:
    return layout.Meta.from_buffer_copy(raw[: ctypes.sizeof(layout.Meta)])


def written_by(meta: layout.Meta) -> str:
    """The version that wrote a generation ("" for one written before versions were kept)."""
    raw = bytes(meta)[layout.Meta.label.offset : layout.Meta.label.offset + layout.Meta.label.size]
    parts = raw.rstrip(b"\0").split(b"\0", 1)
    return parts[1].decode(errors="replace") if len(parts) > 1 else ""


def decode_targets(raw: bytes, count: int) -> list[Slotted]:
    """The targets, by index (rule records refer to them by index)."""
    out = []
    for name, proto, family, port, slots, flags, _pad, slot, addr in TARGET.iter_unpack(
        raw[: count * TARGET.size]
    ):
        # the address as declared: IPv4 even when a dual-stack IPv6 socket serves it
        a: IPAddress = (
            ipaddress.IPv6Address(addr)
            if flags & layout.TARGET_ADDR_V6
            else ipaddress.IPv4Address(addr[:4])
        )
        out.append(
            Slotted(
                name.rstrip(b"\0").decode(),
                PROTO_NAMES[proto],
                family,
                a,
                port,
                slot,
                slots,
                bool(flags & layout.TARGET_EXACT),
                bool(flags & layout.TARGET_V6ONLY),
                bool(flags & layout.TARGET_WAITING),
            )
        )
    return out


def decode_rules(raw: bytes, count: int, names: list[str]) -> dict[RuleKey, Effect]:
    """The rules as key -> (action, target, on_missing), in rule-number order (counters are
    kept by rule number)."""
    out: dict[RuleKey, Effect] = {}
    body = raw[RULE.size : (count + 1) * RULE.size]
    # records() inlined, and each effect made once per (action, target, on_missing): a large
    # rule set is decoded by every writer that edits it
    new, v4, from_bytes, drop = tuple.__new__, socket.AF_INET, int.from_bytes, layout.ACTION_DROP
    effects: dict[tuple[int, int, int], Effect] = {}
    for proto, family, plen, action, miss, lo, hi, target, addr in RULE.iter_unpack(body):
        if family == v4:
            key = new(RuleKey, (PROTO_NAMES[proto], 4, from_bytes(addr[:4], "big"), plen, lo, hi))
        else:
            key = new(RuleKey, (PROTO_NAMES[proto], 6, from_bytes(addr, "big"), plen, lo, hi))
        effect = effects.get((action, miss, target))
        if effect is None:
            if action == drop:
                effect = (DROP, None, "drop")
            else:
                effect = (_ACTIONS[action], names[target], _MISSING[miss])
            effects[action, miss, target] = effect
        out[key] = effect
    return out


# Counters are also kept per group of rules, for totals that only grow (metrics): a target's
# rules, or the drop rules of a protocol. A group's total is the sum of its rules' counters plus
# the generation's `tbase` entry for it (mod 2**64: it may stand for a negative number), which
# holds what rules no longer in the group counted (see store._carry_counters). `tbase` entries:
# one per target, by target index, then one per DROP_GROUPS.
DROP_GROUPS = ("tcp", "udp")
Group = tuple[str, str]  # ("target", name) or ("drop", protocol)


def groups(names: list[str]) -> list[Group]:
    """The groups of a generation, in `tbase` order (`names`: its targets by index)."""
    return [("target", n) for n in names] + [("drop", p) for p in DROP_GROUPS]


def rule_groups(raw: bytes, count: int, ntargets: int) -> list[int]:
    """The group of each rule as its index in `groups` (by rule number from 1; `raw`: the
    rules map, `ntargets`: the generation's targets)."""
    body = raw[RULE.size : (count + 1) * RULE.size]
    drop = {PROTOCOLS[p]: ntargets + i for i, p in enumerate(DROP_GROUPS)}
    ad = layout.ACTION_DROP
    # the fields as columns, by slicing (RULE: protocol at byte 0, action at 3, the target
    # index the fourth 32-bit word), not a record unpacked at a time
    targets = _words(body, count * RULE.size // 4, "I")[3 :: RULE.size // 4]
    return [
        drop[p] if a == ad else t
        for p, a, t in zip(body[0 :: RULE.size], body[3 :: RULE.size], targets, strict=True)
    ]


def sum_groups(
    ids: list[int], columns: list[list[int]], ngroups: int
) -> tuple[list[list[int]], list[int]]:
    """Each group's counters added up, and its number of rules, from each rule's group index
    and the rules' counters as columns (one list per counter, by rule number from 1): one
    pass to collect each group's rule indexes, then sums over the columns, in C."""
    counted = [col.count(0) != len(col) for col in columns]
    if not any(counted):  # nothing counted yet (a new rule set): only the groups' sizes
        sizes = [0] * ngroups
        for g, k in Counter(ids).items():
            sizes[g] = k
        return [[0] * len(columns) for _ in range(ngroups)], sizes
    members: list[list[int]] = [[] for _ in range(ngroups)]
    for i, g in enumerate(ids):
        members[g].append(i)
    sums = [
        [
            sum(map(col.__getitem__, idx)) if c else 0
            for col, c in zip(columns, counted, strict=True)
        ]
        for idx in members
    ]
    return sums, [len(idx) for idx in members]


def _words(data: bytes | bytearray, count: int, code: str = "Q") -> array[int]:
    """The first `count` little-endian unsigned words of `data` (array typecode `code`: Q 64
    bits, I 32), zeros past its end, copied once."""
    words = array(code)
    size = words.itemsize
    words.frombytes(memoryview(data)[: min(len(data), count * size) // size * size])
    if sys.byteorder != "little":
        words.byteswap()
    if len(words) < count:
        words.extend([0] * (count - len(words)))
    return words


@dataclass
class Counted:
    """What a generation counted, as read from its maps: the rules map (entry 0 unused), each
    rule's `base` and per-CPU counters (entry 0 unused), `tbase` (b"": the generation has
    none), and its targets' names by index."""

    rules: bytes
    count: int
    base: bytes
    raw: bytes | bytearray  # the per-CPU counters map: `cpus` copies of COUNTERS per entry
    cpus: int
    tbase: bytes
    names: list[str]

    def anything(self) -> bool:
        """Whether any counter of any rule or group is non-zero."""
        return any(b != bytes(len(b)) for b in (self.base, self.raw, self.tbase))

    def columns(self) -> list[list[int]]:
        """Each rule's counters (layout.KERNEL_COUNTERS), every CPU's plus `base`, as one list
        per counter, by rule number from 1. Summed in C, without numpy: readers (status,
        metrics) take this for every rule set (numpy's import and arrays would cost them more
        memory than the sums take time)."""
        n, size, ncpu = self.count, COUNTERS.size, self.cpus
        width = size // 8
        base = _words(self.base, (n + 1) * width)
        per = _words(self.raw, (n + 1) * ncpu * width)
        # column j of rule i on cpu c is per[(i * ncpu + c) * width + j]: sum whole columns,
        # leaving out those that are all zeros (CPUs that looked nothing up, a base that
        # carried nothing: most of them on a large host, all of them for a new rule set)
        stride = ncpu * width
        columns = []
        for j in range(width):
            parts = [per[c * width + j :: stride] for c in range(ncpu)] + [base[j::width]]
            parts = [p for p in parts if p.count(0) != len(p)]
            if not parts:
                columns.append([0] * n)
            elif len(parts) == 1:
                columns.append(parts[0].tolist()[1:])
            else:
                columns.append(list(map(sum, zip(*parts, strict=True)))[1:])
        return columns

    def group_stats(
        self, columns: list[list[int]] | None = None
    ) -> tuple[dict[Group, tuple[int, ...]], dict[Group, int]]:
        """Each group's counters as they grew since the group was made (its rules' counters
        plus `tbase`, mod 2**64), and each group's number of rules."""
        keys = groups(self.names)
        cols = self.columns() if columns is None else columns
        ids = rule_groups(self.rules, self.count, len(self.names))
        sums, sizes = sum_groups(ids, cols, len(keys))
        out = {}
        for i, g in enumerate(keys):
            extra = COUNTERS.unpack_from(self.tbase, i * COUNTERS.size) if self.tbase else None
            t = sums[i] if extra is None else [a + b for a, b in zip(sums[i], extra, strict=True)]
            out[g] = tuple(v % (1 << 64) for v in t)
        return out, dict(zip(keys, sizes, strict=True))


def carry(
    old: Counted, rules: bytes, count: int, names: list[str], tbase: bool
) -> tuple[bytes | None, bytes | None]:
    """What a new generation (its rules map `rules` of `count` rules, its targets `names`)
    continues of `old`'s counters: its `base` (each rule in both keeps counting from its old
    total; None when no such rule counted anything) and, when it has a `tbase` (`tbase`), that
    map's contents: each group's old total minus what its rules carried. Assignments, so
    carrying again gives the same result. The reference: vector.carry does the same with numpy
    for large rule sets."""
    columns = old.columns()
    old_counts = list(zip(*columns, strict=True))
    by_key = {ident: i for i, ident in enumerate(rule_identities(old.rules, old.count))}
    out = bytearray(COUNTERS.size * (count + 1))
    carried = False
    idents = rule_identities(rules, count)
    for j, ident in enumerate(idents, 1):
        i = by_key.get(ident)
        if i is not None and any(old_counts[i]):
            COUNTERS.pack_into(out, j * COUNTERS.size, *(v % (1 << 64) for v in old_counts[i]))
            carried = True
    if not tbase:
        return (bytes(out) if carried else None), None
    old_totals = old.group_stats(columns)[0]
    width = len(layout.KERNEL_COUNTERS)
    keys = groups(names)
    adjust = [list(old_totals.get(g, (0,) * width)) for g in keys]
    for ident, g in zip(idents, rule_groups(rules, count, len(names)), strict=True):
        i = by_key.get(ident)
        if i is not None:
            for j in range(width):
                adjust[g][j] -= old_counts[i][j]
    adjusted = b"".join(COUNTERS.pack(*(v % (1 << 64) for v in a)) for a in adjust)
    return (bytes(out) if carried else None), adjusted


def counter_view(kernel: tuple[int, ...]) -> tuple[int, ...]:
    """A rule's counters as layout.COUNTER_NAMES shows them, from the kernel's
    (layout.KERNEL_COUNTERS, the same since layout 3)."""
    st, dr, pa, mi, er = kernel
    return (st + dr + pa, st, dr, pa, mi, er)


def records(body: bytes) -> Iterator[tuple[RuleKey, int, int, int]]:
    """(key, action, on_missing, target index) of each rule record in `body`. The record has
    not changed since layout 3 (legacy.py reads that layout's with this too)."""
    of = RuleKey.of
    for proto, family, plen, action, miss, lo, hi, target, addr in RULE.iter_unpack(body):
        v4 = family == socket.AF_INET
        key = of(
            PROTO_NAMES[proto],
            4 if v4 else 6,
            int.from_bytes(addr[:4] if v4 else addr, "big"),
            plen,
            lo,
            hi,
        )
        yield key, action, miss, target


def rule_identities(raw: bytes, count: int) -> list[tuple[int, int, int, int, int, bytes]]:
    """What identifies each rule across generations, by rule number from 1: (protocol, family,
    prefix length, first port, last port, address). For carrying counters over."""
    body = raw[RULE.size : (count + 1) * RULE.size]
    return [
        (p, f, pl, lo, hi, addr) for p, f, pl, _a, _m, lo, hi, _t, addr in RULE.iter_unpack(body)
    ]
