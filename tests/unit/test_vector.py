"""vector.py (numpy, for large rule sets) against the Python build it stands in for
(rules.compile_rules + trie.build + image's packing): every map of the generation the same,
the trie the same node for node (numbered otherwise: compared from the roots down)."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import random
import struct
import sys
from typing import Any

import pytest

from sklookupctl import image, layout
from sklookupctl.plan import Slotted
from sklookupctl.rules import DROP, STEER, Rule, RuleSet, make_rule

from ..rulegen import random_rules

ROUNDS = int(os.environ.get("SKLOOKUPCTL_VECTOR_ROUNDS", "60"))
_NODE = struct.Struct("<QQQIBBH")

TARGETS = {
    name: Slotted(
        name, name.split("-")[0], 10, ipaddress.ip_address("::"), 80, 3 + 7 * i, 1 + i, i == 1
    )
    for i, name in enumerate(["tcp-live", "tcp-gone", "udp-live", "udp-gone"])
}


def trie(nodes: bytes, entries: bytes) -> tuple[Any, ...]:
    """The trie as nested tuples from its roots down, whatever the nodes' numbering."""
    table = [_NODE.unpack_from(nodes, i) for i in range(0, len(nodes), _NODE.size)]
    values = struct.unpack(f"<{len(entries) // 8}Q", entries)

    def node(i: int) -> tuple[Any, ...]:
        fallback, bits, leaf, base, skip, stride, _pad = table[i]
        if not stride:
            return (fallback, bits, skip, leaf)
        below = tuple(
            node(v & ~layout.NODE_FLAG) if v & layout.NODE_FLAG else v
            for v in values[base : base + (1 << stride)]
        )
        return (fallback, bits, skip, stride, below)

    return tuple(node(r) for r in range(len(layout.ROOTS)))


def same(rs: RuleSet) -> None:
    meta = image.MetaInfo(3, 1, 2, "t")
    python = image.encode(rs, TARGETS, meta, vectored=False)
    vectored = image.encode(rs, TARGETS, meta, vectored=True)
    assert python.rules == vectored.rules
    for name, (count, data) in python.maps.items():
        other = vectored.maps[name]
        if name in ("nodes", "entries"):
            assert count == other[0], name
        else:
            assert (count, data) == other, name
    assert trie(python.maps["nodes"][1], python.maps["entries"][1]) == trie(
        vectored.maps["nodes"][1], vectored.maps["entries"][1]
    )


def shaped(rng: random.Random, count: int) -> RuleSet:
    """Rules in the shapes large sets have: unrelated prefixes of a few lengths or of any,
    each with one port, a range, all ports, nested ranges, disjoint ranges or many ranges
    (more than vector.OWN_MAX); some /0 rules; some prefixes inside others."""
    rs = RuleSet()
    used: set[tuple[str, str]] = set()
    few = rng.random() < 0.5
    while len(rs) < count:
        v = rng.choice([4, 6])
        width = 32 if v == 4 else 128
        plen = rng.choice([24, 32] if v == 4 else [64, 128]) if few else rng.randrange(width + 1)
        if rng.random() < 0.03:
            plen = 0
        net = rng.getrandbits(width) >> (width - plen) << (width - plen) if plen else 0
        if rs.rules and rng.random() < 0.1:  # inside (or around) an existing prefix
            k = rng.choice(list(rs.rules))
            if k.version == v:
                plen = rng.randrange(width + 1)
                net = k.net >> (width - plen) << (width - plen) if plen else 0
        prefix = str(ipaddress.ip_network((net, plen)))
        proto = rng.choice(["tcp", "udp"])
        if (proto, prefix) in used:
            continue  # each prefix's ranges are made at once: nested or disjoint
        used.add((proto, prefix))
        shape = rng.random()
        if shape < 0.3:
            ranges = [(1, 65535)]
        elif shape < 0.5:
            p = rng.randrange(1, 65536)
            ranges = [(p, p)]
        elif shape < 0.65:
            lo = rng.randrange(1, 65536)
            ranges = [(lo, rng.randrange(lo, 65536))]
        elif shape < 0.8:  # nested: all, a range in it, a port in that (maybe at the edges)
            lo = rng.choice([1, 2, rng.randrange(1, 60000)])
            hi = rng.choice([65535, lo + rng.randrange(0, 5000)])
            hi = min(hi, 65535)
            p = rng.choice([lo, hi, rng.randrange(lo, hi + 1)])
            ranges = [(1, 65535), (lo, hi), (p, p)]
        elif shape < 0.9:  # disjoint pieces
            cuts = sorted(rng.sample(range(1, 65536), rng.choice([2, 4, 6])))
            ranges = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts), 2)]
        else:  # many single ports, and maybe the whole range around them
            ports = rng.sample(range(1, 65536), rng.randrange(2, 20))
            ranges = [(p, p) for p in ports] + ([(1, 65535)] if rng.random() < 0.5 else [])
        for lo, hi in ranges:
            r = rng.random()
            target = None if r < 0.15 else f"{proto}-{'live' if r < 0.6 else 'gone'}"
            rule = make_rule(
                proto,
                prefix,
                f"{lo}-{hi}",
                target=target,
                drop=target is None,
                on_missing=rng.choice(["drop", "pass"]) if target else "drop",
            )
            rs.rules[rule.key] = rule
    return rs


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_shaped_rule_sets_build_the_same(seed: int) -> None:
    rng = random.Random(seed)
    same(shaped(rng, rng.choice([1, 10, 100, 1000])))


@pytest.mark.parametrize("seed", range(ROUNDS // 2))
def test_nested_rule_sets_build_the_same(seed: int) -> None:
    rng = random.Random(1000 + seed)
    rs, _anchors = random_rules(rng, rng.choice([1, 5, 30, 200, 600]))
    same(rs)


def test_edge_rule_sets_build_the_same() -> None:
    cases = [
        [],
        [("tcp", "0.0.0.0/0", "all")],
        [("udp", "::/0", "1-65535"), ("udp", "::/0", "443")],
        [("tcp", "192.0.2.7", "1"), ("tcp", "192.0.2.7", "65535")],
        [("tcp", "2001:db8::1", "1-2"), ("tcp", "2001:db8::/32", "2-65535")],
        [("tcp", "192.0.2.0/24", f"{p}") for p in range(1, 40)],  # many rules, one prefix
    ]
    for rules in cases:
        rs = RuleSet()
        for proto, prefix, ports in rules:
            rs.add(make_rule(proto, prefix, ports, target=f"{proto}-live"))
        same(rs)


def test_large_rule_sets_take_numpy_and_small_ones_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    from sklookupctl import vector

    calls: list[int] = []
    build = vector.build
    monkeypatch.setattr(
        vector, "build", lambda rules, *a: calls.append(len(rules)) or build(rules, *a)
    )
    rng = random.Random(7)
    image.encode(shaped(rng, 20), TARGETS, image.MetaInfo(1, 1, 1, "t"))
    assert calls == []
    image.encode(shaped(rng, image.VECTOR_MIN), TARGETS, image.MetaInfo(1, 1, 1, "t"))
    assert calls == [image.VECTOR_MIN]


def test_small_commands_do_not_import_numpy() -> None:
    """numpy takes 60-90 ms to import (and 20 MB): a command on a small rule set must not
    pay it, nor a reader of a large one (status, metrics: Python's sums cost it less)."""
    code = (
        "import sys, ipaddress\n"
        "from sklookupctl import image\n"
        "from sklookupctl.plan import Slotted\n"
        "from sklookupctl.rules import DROP, STEER, Rule, RuleSet, make_rule\n"
        "rs = RuleSet()\n"
        "rs.add(make_rule('tcp', '192.0.2.0/24', '80', target='t'))\n"
        "t = {'t': Slotted('t', 'tcp', 2, ipaddress.ip_address('127.0.0.1'), 80, 0, 1)}\n"
        "image.encode(rs, t, image.MetaInfo(1, 1, 1, 'x'))\n"
        "from sklookupctl import cli, api, store, explain, metrics, doctor\n"
        "n = image.VECTOR_MIN\n"  # readers of large sets (status, metrics) too
        "c = image.Counted(bytes(32 * (n + 1)), n, b'', b'', 2, b'', ['t'])\n"
        "assert len(c.group_stats()[0]) == 3 and len(c.columns()[0]) == n\n"
        "assert 'numpy' not in sys.modules, 'numpy imported'\n"
    )
    import subprocess

    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=os.path.dirname(image.__file__) + "/.."
    )


def _counted(rng: random.Random, rs: RuleSet, targets: dict[str, Slotted]) -> image.Counted:
    """A generation of `rs` that counted: random base, per-CPU counters and tbase, some of
    them zero and some near 2**64 (sums wrap)."""
    img = image.encode(rs, targets, image.MetaInfo(1, 1, 1, "t"), vectored=False)
    n = img.rules
    cpus = rng.choice([1, 2, 3, 8])

    def words(k: int) -> bytes:
        pick = [0, 0, 1, 7, 1 << 40, (1 << 64) - 3]
        return struct.pack(f"<{k}Q", *(rng.choice(pick) for _ in range(k)))

    quiet = rng.random() < 0.2  # most rules counted nothing
    base = words((n + 1) * 5) if not quiet else bytes((n + 1) * 40)
    raw = words((n + 1) * 5 * cpus) if not quiet else bytes((n + 1) * 40 * cpus)
    names = sorted(targets)
    tbase = words((len(names) + 2) * 5) if rng.random() < 0.8 else b""
    return image.Counted(img.maps["rules"][1], n, base, raw, cpus, tbase, names)


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_counters_carry_the_same(seed: int) -> None:
    """vector.carry against image.carry: an old
    generation that counted, a new one keeping some of its rules (some with another action or
    target: another group), adding others, with targets added and gone (indexes shift)."""
    from sklookupctl import vector

    rng = random.Random(5000 + seed)
    old_rs = shaped(rng, rng.choice([0, 1, 10, 100, 600]))
    old_targets = {**TARGETS, "tcp-old": dataclasses.replace(TARGETS["tcp-gone"], name="tcp-old")}
    old = _counted(rng, old_rs, old_targets)
    new_rs = RuleSet()
    for key, rule in old_rs.rules.items():
        r = rng.random()
        if r < 0.6:
            new_rs.rules[key] = rule
        elif r < 0.75:  # the same rule, another group
            drop = rule.target is not None
            proto = key.proto
            new_rs.rules[key] = Rule(key, DROP) if drop else Rule(key, STEER, f"{proto}-live")
    for key, rule in shaped(rng, rng.choice([0, 5, 50])).rules.items():
        new_rs.rules.setdefault(key, rule)
    new_targets = {**TARGETS, "a-first": dataclasses.replace(TARGETS["tcp-live"], name="a-first")}
    img = image.encode(new_rs, new_targets, image.MetaInfo(2, 1, 1, "t"), vectored=False)
    names = sorted(new_targets)
    ids = [
        vector._identities(vector._records(r, n))
        for r, n in ((old.rules, old.count), (img.maps["rules"][1], img.rules))
    ]
    hashed, whole = vector._matches(*ids), vector._matches_sorted(*ids)
    assert sorted(zip(*hashed, strict=True)) == sorted(zip(*whole, strict=True))
    for tbase in (True, False):
        want = image.carry(old, img.maps["rules"][1], img.rules, names, tbase)
        got = vector.carry(old, img.maps["rules"][1], img.rules, names, tbase)
        assert got == want


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_counters_carry_the_same_after_an_edit(seed: int) -> None:
    """vector.carry's way for a generation edited (the same targets, a few rules added,
    removed or put in another group, in one place or several) against image.carry."""
    from sklookupctl import vector

    rng = random.Random(7000 + seed)
    old_rs = shaped(rng, rng.choice([1, 10, 100, 600]))
    old = _counted(rng, old_rs, TARGETS)
    new_rs = RuleSet(dict(old_rs.rules))
    keys = list(old_rs.rules)
    for _ in range(rng.choice([1, 1, 2, 5])):
        r, key = rng.random(), rng.choice(keys)
        if r < 0.3:
            new_rs.rules.pop(key, None)
        elif r < 0.6 and key in new_rs.rules:  # the same rule, another group
            rule = new_rs.rules[key]
            to = None if rule.target is not None else f"{key.proto}-live"
            new_rs.rules[key] = Rule(key, DROP) if to is None else Rule(key, STEER, to)
        else:
            for k, rule in shaped(rng, 1).rules.items():
                new_rs.rules.setdefault(k, rule)
    img = image.encode(new_rs, TARGETS, image.MetaInfo(2, 1, 1, "t"), vectored=False)
    names = sorted(TARGETS)
    recs = [
        vector._records(r, n)
        for r, n in ((old.rules, old.count), (img.maps["rules"][1], img.rules))
    ]
    for tbase in (True, False):
        want = image.carry(old, img.maps["rules"][1], img.rules, names, tbase)
        edited = vector._carry_edited(old, *recs, vector._totals(old), tbase)
        assert edited is not None, "an edit of a few rules not carried as one"
        assert edited == want
        assert vector.carry(old, img.maps["rules"][1], img.rules, names, tbase) == want


def test_identities_whose_hashes_collide_are_told_apart() -> None:
    """Two identities of one hash (made so: w0 + m1, w1 - m0 hashes as w0, w1): a new rule
    with the other's hash is no match; two old rules of one hash have every identity compared
    whole."""
    import numpy as np

    from sklookupctl import vector

    m0, m1 = 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F
    mask = (1 << 64) - 1
    a = [5, 6, 7, 8]
    b = [(5 + m1) & mask, (6 - m0) & mask, 7, 8]
    c = [1, 2, 3, 4]

    def words(*rows: list[int]) -> Any:
        return np.array(rows, dtype="<u8")

    def pairs(found: tuple[Any, Any]) -> list[tuple[int, int]]:
        return sorted((int(i), int(j)) for i, j in zip(*found, strict=True))

    assert pairs(vector._matches(words(a, c), words(b))) == []
    assert pairs(vector._matches(words(a, c), words(c, b, a))) == [(0, 2), (1, 0)]
    assert pairs(vector._matches(words(a, b, c), words(b, c))) == [(1, 0), (2, 1)]
