"""The data path's tables without a kernel: the program's walk (in Python) against the rules."""

from __future__ import annotations

import random

from sklookupctl import layout, trie
from sklookupctl.rules import RuleSet, make_rule

from ..rulegen import TARGETS, near, port_near, random_rules


def test_tables_walk_matches_the_reference() -> None:
    rng = random.Random(7)
    for round_ in range(120):
        rs, anchors = random_rules(rng, rng.choice([1, 3, 10, 40, 150]))
        compiled = rs.compile()
        t = trie.build(compiled, {name: (i, 1, 0) for i, name in enumerate(TARGETS)})
        assert t.depth() <= layout.NODE_STEPS
        for _ in range(300):
            proto = rng.choice(["tcp", "udp"])
            addr = near(rng, rng.choice(anchors))
            port = port_near(rng, rs)
            want = rs.match(proto, addr, port)
            seg = t.segment_at(t.walk(proto, addr.version, int(addr)), port)
            number = seg[4] if seg is not None and seg[1] != layout.ACTION_NONE else 0
            got = compiled.rules[number - 1] if number else None
            assert got == want, (round_, proto, addr, port)


def test_sparse_and_dense_prefixes_cost_few_steps() -> None:
    rs = RuleSet()
    for i in range(256):
        rs.add(make_rule("tcp", f"198.51.{i}.0/24", "all", target="web"))
    t = trie.build(rs.compile(), {"web": (1, 1, 0)})
    assert t.runs == 256
    assert t.depth() <= 2  # one skip of 8 bits and a stride of 10 covers them
    # a lone /128 under a /48 costs a few nodes, not one per 4 bits
    rs = RuleSet()
    rs.add(make_rule("tcp", "2001:db8::/48", "all", target="web"))
    rs.add(make_rule("tcp", "2001:db8::1/128", "443", target="web"))
    t = trie.build(rs.compile(), {"web": (1, 1, 0)})
    assert t.depth() <= 5


def test_empty_rule_set_walks_to_no_rule() -> None:
    t = trie.build(RuleSet().compile(), {})
    for proto, version in layout.ROOTS:
        assert t.walk(proto, version, 12345) == 0
