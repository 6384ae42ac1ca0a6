"""The data path's tables without a kernel: the program's walk (in Python) against the rules."""

from __future__ import annotations

import contextlib
import ipaddress
import random

from sklookupctl import layout, trie
from sklookupctl.errors import RuleConflict
from sklookupctl.rules import IPAddress, RuleSet, make_rule


def random_rules(rng: random.Random, count: int) -> tuple[RuleSet, list[IPAddress]]:
    """Rules on prefixes of every length around a few anchor addresses, so they nest."""
    anchors: list[IPAddress] = []
    for _ in range(rng.randrange(1, 6)):
        anchors.append(ipaddress.IPv4Address(rng.getrandbits(32)))
        anchors.append(ipaddress.IPv6Address(rng.getrandbits(128)))
    rs = RuleSet()
    for _ in range(count):
        a = rng.choice(anchors)
        plen = rng.randrange(0, a.max_prefixlen + 1)
        net = ipaddress.ip_network(f"{a}/{plen}", strict=False)
        lo = rng.randrange(1, 65536)
        hi = min(65535, lo + rng.choice([0, 1, 10, 1000, 65535]))
        target = rng.choice([None, "a", "b"])
        rule = make_rule(
            rng.choice(["tcp", "udp"]),
            str(net),
            f"{lo}-{hi}",
            target=target,
            drop=target is None,
            on_missing=rng.choice(["drop", "pass"]),
        )
        with contextlib.suppress(RuleConflict):
            rs.add(rule)
    return rs, anchors


def near(rng: random.Random, a: IPAddress) -> IPAddress:
    """The anchor itself, or it with one bit flipped, or with its low bits randomised."""
    width = a.max_prefixlen
    n = int(a)
    choice = rng.random()
    if choice < 0.3:
        pass
    elif choice < 0.7:
        n ^= 1 << rng.randrange(width)
    else:
        low = rng.randrange(width + 1)
        n = (n >> low << low) | rng.getrandbits(low) if low else n
    return ipaddress.ip_address(n) if width == 32 else ipaddress.IPv6Address(n)


def test_tables_walk_matches_the_reference() -> None:
    rng = random.Random(7)
    for round_ in range(120):
        rs, anchors = random_rules(rng, rng.choice([1, 3, 10, 40, 150]))
        compiled = rs.compile()
        t = trie.build(compiled, {"a": 1, "b": 2})
        assert t.depth() <= layout.NODE_STEPS
        for _ in range(300):
            proto = rng.choice(["tcp", "udp"])
            addr = near(rng, rng.choice(anchors))
            port = rng.randrange(1, 65536) if rng.random() < 0.5 else rng.choice([1, 65535])
            want = rs.match(proto, addr, port)
            seg = t.segment_at(t.walk(proto, addr.version, int(addr)), port)
            number = seg[4] if seg is not None and seg[1] != layout.ACTION_NONE else 0
            got = compiled.rules[number - 1] if number else None
            assert got == want, (round_, proto, addr, port)


def test_sparse_and_dense_prefixes_cost_few_steps() -> None:
    rs = RuleSet()
    for i in range(256):
        rs.add(make_rule("tcp", f"198.51.{i}.0/24", "all", target="web"))
    t = trie.build(rs.compile(), {"web": 1})
    assert t.runs == 256
    assert t.depth() <= 2  # one skip of 8 bits and a stride of 10 covers them
    # a lone /128 under a /48 costs a few nodes, not one per 4 bits
    rs = RuleSet()
    rs.add(make_rule("tcp", "2001:db8::/48", "all", target="web"))
    rs.add(make_rule("tcp", "2001:db8::1/128", "443", target="web"))
    t = trie.build(rs.compile(), {"web": 1})
    assert t.depth() <= 5


def test_empty_rule_set_walks_to_no_rule() -> None:
    t = trie.build(RuleSet().compile(), {})
    for proto, version in layout.ROOTS:
        assert t.walk(proto, version, 12345) == 0
