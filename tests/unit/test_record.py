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
