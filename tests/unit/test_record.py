"""The layout-independent rule-set record (record.py): what any later version reads back."""

from __future__ import annotations

import ipaddress
import random

import pytest

from sklookupctl import record
from sklookupctl.errors import EnvironmentProblem
from sklookupctl.rules import Rule, RuleKey
from tests.rulegen import random_rules


@pytest.mark.parametrize("seed", range(20))
def test_a_rule_set_comes_back_whole(seed: int) -> None:
    rng = random.Random(seed)
    rs, _ = random_rules(rng, rng.randrange(0, 300))
    names = {r.target for r in rs.rules.values() if r.target is not None}
    targets: record.Targets = {
        n: ("tcp", ipaddress.ip_address(f"127.0.0.{i + 1}"), 8000 + i, i % 2 == 0)
        for i, n in enumerate(sorted(names))
    }
    targets["v6"] = ("udp", ipaddress.ip_address("2001:db8::1"), 53, False)
    n, data = record.chunks(record.encode(rs, targets))
    assert len(data) == n * record.CHUNK
    back, back_targets = record.decode(record.unchunk(data))
    assert back.rules == rs.rules and list(back.rules) == list(rs.rules)  # order kept too
    assert back_targets == targets


def test_names_with_every_allowed_character() -> None:
    from sklookupctl.rules import RuleSet

    key = RuleKey.of("tcp", 4, 0xC0000200, 24, 1, 65535)
    name = "tcp-[::]:8082/@.:_-"
    rs = RuleSet({key: Rule(key, "steer", name, "pass")})
    t: record.Targets = {name: ("tcp", ipaddress.ip_address("::"), 8082, False)}
    back, back_targets = record.decode(record.encode(rs, t))
    assert back.rules == rs.rules and back_targets == t


def test_another_version_is_refused() -> None:
    with pytest.raises(EnvironmentProblem, match="version 2"):
        record.decode(b"sklookupctl-ruleset 2\n")
    with pytest.raises(EnvironmentProblem):
        record.decode(b"something else\n")


def test_a_large_set_is_written_a_slice_at_a_time_as_one_text() -> None:
    """The record is compressed as it is made (8192 rules at a time); what it holds is still
    one line per target, then one per rule, nothing between them."""
    import ipaddress
    import zlib

    from sklookupctl.rules import RuleSet, make_rule

    rs = RuleSet()
    for i in range(20_000):
        net = ipaddress.ip_network((0xC6120000 + i * 4, 30))
        rule = make_rule("tcp", str(net), "80", target="web" if i % 3 else None, drop=i % 3 == 0)
        rs.rules[rule.key] = rule  # disjoint prefixes: no need to check each against all
    for targets in ({}, {"web": ("tcp", ipaddress.ip_address("192.0.2.1"), 80, False)}):
        blob = record.encode(rs, targets)
        text = zlib.decompress(blob.partition(b"\n")[2]).decode()
        lines = text.split("\n")
        assert len(lines) == len(targets) + len(rs)
        assert all(line.startswith("T\t") for line in lines[: len(targets)])
        assert all(line.startswith("R\t") for line in lines[len(targets) :])
        back, _ = record.decode(blob)
        assert back.rules == rs.rules


def test_the_source_line_is_read_alone_and_skipped_by_decode() -> None:
    """The S line (the digest of the file the rules were read from) comes first, is read from
    the first map entry without the rest, and is skipped by decode: version 1 readers of
    before it skip lines of types they do not know."""
    import ipaddress

    from sklookupctl.rules import RuleSet, make_rule

    rs = RuleSet()
    rs.add(make_rule("tcp", "192.0.2.0/24", "80", target="web"))
    targets = {"web": ("tcp", ipaddress.ip_address("192.0.2.1"), 80, False)}
    blob = record.encode(rs, targets, "ab12")
    first = record.chunks(blob)[1][: record.CHUNK]
    assert record.source(first) == "ab12"
    assert record.decode(blob) == record.decode(record.encode(rs, targets))
    assert record.source(record.chunks(record.encode(rs, targets))[1][: record.CHUNK]) == ""
    assert record.source(bytes(record.CHUNK)) == ""  # an empty entry
