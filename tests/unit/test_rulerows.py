"""status's rule rows against the plain path: Rule objects sorted by RuleSet.order, shown
with api._rule_json and json.dumps; the filters against a scan of every rule."""

from __future__ import annotations

import ipaddress
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sklookupctl import api, image, layout
from sklookupctl.plan import Slotted
from sklookupctl.rulerows import RuleRows, prefix_text
from sklookupctl.rules import Rule, RuleSet, make_rule

from ..rulegen import TARGETS, random_rules


def rows_of(rs: RuleSet, seed: int) -> tuple[RuleRows, list[Rule], list[tuple[int, ...]]]:
    targets = {
        n: Slotted(n, n.split("-")[0], 10, ipaddress.ip_address("::"), 80, i, 1)
        for i, n in enumerate(TARGETS)
    }
    img = image.encode(rs, targets, image.MetaInfo(1, 0, 0, "t"))
    count, raw = img.maps["rules"]
    names = sorted(targets)
    rng = random.Random(seed)
    # every rule's own counts, or a few counts many rules share (all zero, most often)
    pool = [(0,) * 5] + [tuple(rng.randrange(0, 1 << 40) for _ in range(5)) for _ in range(3)]
    shared = seed % 2 == 1
    counts = [
        rng.choice(pool) if shared else tuple(rng.randrange(0, 1 << 40) for _ in range(5))
        for _ in range(count - 1)
    ]
    decoded = image.decode_rules(raw, count - 1, names)
    rules = [Rule(k, *eff) for k, eff in decoded.items()]
    return RuleRows.from_records(raw, count - 1, names, counts), rules, counts


def plain(rules: list[Rule], counts: list[tuple[int, ...]]) -> list[dict[str, object]]:
    pairs = sorted(zip(rules, counts, strict=True), key=lambda rc: RuleSet.order(rc[0]))
    return [
        api._rule_json(r, dict(zip(layout.COUNTER_NAMES, image.counter_view(c), strict=True)))
        for r, c in pairs
    ]


@pytest.mark.parametrize("seed", range(8))
def test_rows_are_what_the_plain_path_shows(seed: int) -> None:
    rs, _ = random_rules(random.Random(seed), 300)
    rows, rules, counts = rows_of(rs, seed)
    want = plain(rules, counts)
    assert rows.dicts() == want
    assert [json.loads(line) for line in rows.json_lines()] == want
    assert [json.dumps(d, sort_keys=True, separators=(",", ":")) for d in want] == list(
        rows.json_lines()
    )
    total = [sum(c[j] for c in counts) for j in range(5)]
    assert list(rows.totals().values()) == total


@pytest.mark.parametrize("seed", range(8))
def test_filters_are_a_scan_of_every_rule(seed: int) -> None:
    rng = random.Random(seed)
    rs, anchors = random_rules(rng, 300)
    rows, rules, counts = rows_of(rs, seed)
    everything = plain(rules, counts)
    for _ in range(20):
        a = rng.choice(anchors)
        net = ipaddress.ip_network(f"{a}/{rng.randrange(0, a.max_prefixlen + 1)}", strict=False)
        proto = rng.choice([None, "tcp", "udp"])
        target = rng.choice([None, *TARGETS])
        want = [
            d
            for d in everything
            if (proto is None or d["protocol"] == proto)
            and (target is None or d["target"] == target)
            and ipaddress.ip_network(str(d["prefix"])).overlaps(net)
            and ipaddress.ip_network(str(d["prefix"])).version == net.version
        ]
        assert rows.filtered(proto, net, target).dicts() == want


@settings(max_examples=2000)
@given(st.integers(0, (1 << 128) - 1), st.integers(0, 128), st.sampled_from([0, 1, 2]))
def test_prefix_text_is_ipaddress(n: int, plen: int, shape: int) -> None:
    if shape == 1:
        n &= (1 << 32) - 1  # ::a.b.c.d, which glibc writes with an IPv4 tail
    elif shape == 2:
        n = (0xFFFF << 32) | (n & 0xFFFFFFFF)  # ::ffff:a.b.c.d
    net = ipaddress.IPv6Network((n, plen), strict=False)
    addr = net.network_address.packed
    assert prefix_text(6, addr, plen) == str(net)
    v4 = ipaddress.IPv4Network((n & 0xFFFFFFFF, min(plen, 32)), strict=False)
    assert prefix_text(4, v4.network_address.packed + bytes(12), v4.prefixlen) == str(v4)


def test_a_v6_rule_next_to_its_v4_tail() -> None:
    rs = RuleSet()
    rs.add(make_rule("tcp", "::1.2.3.0/120", "80", drop=True))
    rs.add(make_rule("tcp", "::fffe:0:0/95", "80", drop=True))
    rs.add(make_rule("tcp", "::1:0:0:0/80", "80", drop=True))
    rs.add(make_rule("tcp", "::/0", "80", drop=True))
    rows, rules, counts = rows_of(rs, 0)
    want = plain(rules, counts)
    assert rows.dicts() == want
    assert list(rows.json_lines()) == [
        json.dumps(d, sort_keys=True, separators=(",", ":")) for d in want
    ]


@pytest.mark.parametrize("seed", range(4))
def test_group_sums_are_per_target_and_per_protocols_drop_rules(seed: int) -> None:
    rs, _ = random_rules(random.Random(seed), 200)
    _, rules, counts = rows_of(rs, seed)
    names = sorted(TARGETS)
    targets = {
        n: Slotted(n, n.split("-")[0], 10, ipaddress.ip_address("::"), 80, i, 1)
        for i, n in enumerate(names)
    }
    img = image.encode(rs, targets, image.MetaInfo(1, 0, 0, "t"))
    count, raw = img.maps["rules"]
    keys = image.groups(names)
    ids = image.rule_groups(raw, count - 1, len(names))
    columns = [list(c) for c in zip(*counts, strict=True)]
    sums, sizes = image.sum_groups(ids, columns, len(keys))
    for gi, g in enumerate(keys):
        mine = [
            c
            for r, c in zip(rules, counts, strict=True)
            if (r.action == "drop" and g == ("drop", r.key.proto))
            or (r.action == "steer" and g == ("target", r.target))
        ]
        assert sizes[gi] == len(mine)
        assert sums[gi] == [sum(c[j] for c in mine) for j in range(5)]
