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
    n, data = record.chunks(record.encode_rules(rs, targets))
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
    back, back_targets = record.decode(record.encode_rules(rs, t))
    assert back.rules == rs.rules and back_targets == t


def test_another_version_is_refused() -> None:
    with pytest.raises(EnvironmentProblem, match="version 3"):
        record.decode(b"sklookupctl-ruleset 3\n")
    with pytest.raises(EnvironmentProblem):
        record.decode(b"something else\n")


def test_version_1_records_are_still_read() -> None:
    """Generations written before version 2 keep their text record: an upgrade reads it."""
    import zlib

    text = (
        "S\tab12\n"
        "T\tweb\ttcp\t192.0.2.1\t80\t0\n"
        "T\tdns\tudp\t2001:db8::1\t53\t1\n"
        f"R\ttcp\t4\t{0xC0000200}\t24\t1\t65535\tsteer\tweb\tpass\n"
        f"R\tudp\t6\t{0x20010DB8 << 96}\t32\t53\t53\tsteer\tdns\tdrop\n"
        f"R\ttcp\t4\t{0xC0000200}\t25\t22\t22\tdrop\t-\tdrop"
    )
    blob = b"sklookupctl-ruleset 1\n" + zlib.compress(text.encode())
    rs, targets = record.decode(blob)
    assert targets == {
        "web": ("tcp", ipaddress.ip_address("192.0.2.1"), 80, False),
        "dns": ("udp", ipaddress.ip_address("2001:db8::1"), 53, True),
    }
    assert [str(r.key) for r in rs.rules.values()] == [
        "tcp 192.0.2.0/24 all",
        "udp 2001:db8::/32 53",
        "tcp 192.0.2.0/25 22",
    ]
    assert [r.describe() for r in rs.rules.values()] == [
        "-> web, on missing socket: pass",
        "-> dns",
        "drop",
    ]
    assert record.source(record.chunks(blob)[1][: record.CHUNK]) == "ab12"


def test_a_generation_s_record_is_its_rules_map() -> None:
    """image.encode writes the rules map's records into the record as they are: decoding the
    record gives the rule set back, in rule-number order, both builds."""
    from sklookupctl import image
    from sklookupctl.plan import Slotted

    rng = random.Random(4)
    rs, _ = random_rules(rng, 400)
    targets = {
        n: Slotted(n, n.split("-")[0], 10, ipaddress.ip_address("::"), 80, i, 1)
        for i, n in enumerate(["tcp-live", "tcp-gone", "udp-live", "udp-gone"])
    }
    for vectored in (False, True):
        img = image.encode(rs, targets, image.MetaInfo(1, 1, 1, "t"), vectored, "cafe")
        blob = record.unchunk(img.maps["record"][1])
        back, back_targets = record.decode(blob)
        assert back.rules == rs.rules
        assert list(back.rules) == [r.key for r in rs.compile().rules]
        assert set(back_targets) == set(targets)
        assert record.source(img.maps["record"][1][: record.CHUNK]) == "cafe"


def test_the_source_line_is_read_alone() -> None:
    """The S line (the digest of the file the rules were read from) comes first, and is read
    from the first map entry without the rest."""
    import ipaddress

    from sklookupctl.rules import RuleSet, make_rule

    rs = RuleSet()
    rs.add(make_rule("tcp", "192.0.2.0/24", "80", target="web"))
    targets = {"web": ("tcp", ipaddress.ip_address("192.0.2.1"), 80, False)}
    blob = record.encode_rules(rs, targets, "ab12")
    first = record.chunks(blob)[1][: record.CHUNK]
    assert record.source(first) == "ab12"
    assert record.decode(blob) == record.decode(record.encode_rules(rs, targets))
    assert record.source(record.chunks(record.encode_rules(rs, targets))[1][: record.CHUNK]) == ""
    assert record.source(bytes(record.CHUNK)) == ""  # an empty entry
