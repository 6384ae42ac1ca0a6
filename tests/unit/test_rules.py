"""The rule model without a kernel: parsing, precedence, conflicts, compilation."""

from __future__ import annotations

import ipaddress
import random

import pytest

from sklookupctl.errors import InvalidArgument, NotFound, RuleConflict
from sklookupctl.rules import (
    DROP,
    STEER,
    Rule,
    RuleSet,
    format_endpoint,
    format_ports,
    make_rule,
    parse_endpoint,
    parse_ports,
    parse_prefix,
    parse_protocol,
)
from sklookupctl.validate import MAPPED

from ..rulegen import near, port_near, random_rules


@pytest.mark.parametrize(
    ("text", "lo", "hi"),
    [
        ("80", 80, 80),
        ("1-65535", 1, 65535),
        ("all", 1, 65535),
        ("ALL", 1, 65535),
        (" 8000-8080 ", 8000, 8080),
        ("65535", 65535, 65535),
        ("5-5", 5, 5),
    ],
)
def test_parse_ports(text: str, lo: int, hi: int) -> None:
    assert parse_ports(text) == (lo, hi)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "port 0 is not a port"),
        ("65536", "too large"),
        ("2000-1000", "reversed"),
        ("http", "not a number"),
        ("1-", "not a number"),
        ("-5", "not a number"),
        ("0-10", "range start 0"),
        ("1-70000", "range end 70000 is too large"),
        ("", "not a number"),
    ],
)
def test_parse_ports_rejects(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as e:
        parse_ports(text)
    assert e.value.hint


@pytest.mark.parametrize(
    ("text", "net"),
    [
        ("192.0.2.0/24", "192.0.2.0/24"),
        ("192.0.2.7", "192.0.2.7/32"),
        ("2001:db8::/64", "2001:db8::/64"),
        ("2001:db8::1", "2001:db8::1/128"),
        ("0.0.0.0/0", "0.0.0.0/0"),
    ],
)
def test_parse_prefix(text: str, net: str) -> None:
    assert parse_prefix(text) == ipaddress.ip_network(net)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("192.0.2.1/24", "host bits set"),
        ("192.0.2.300", "not an IP address"),
        ("2001:db8::/129", "not an IP address"),
        ("edge", "not an IP address"),
        ("192.0.2.0/33", "not an IP address"),
    ],
)
def test_parse_prefix_rejects(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_prefix(text)


def test_host_bits_hint_names_the_network() -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_prefix("192.0.2.1/24")
    assert e.value.hint == "did you mean 192.0.2.0/24?"


@pytest.mark.parametrize(
    ("text", "addr", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("[::1]:80", "::1", 80),
        ("[2001:db8::1]:443", "2001:db8::1", 443),
    ],
)
def test_parse_endpoint(text: str, addr: str, port: int) -> None:
    a, p = parse_endpoint(text)
    assert (str(a), p) == (addr, port)
    assert format_endpoint(a, p) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1", "has no port"),
        ("[::1]", "has no port"),
        ("::1:80", "in brackets"),
        ("localhost:80", "not an IP address"),
        ("127.0.0.1:0", "not a port"),
        ("127.0.0.1:x", "not a number"),
    ],
)
def test_parse_endpoint_rejects(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_endpoint(text)


def test_parse_protocol() -> None:
    assert parse_protocol("TCP") == "tcp"
    with pytest.raises(InvalidArgument, match="unknown protocol 'sctp'"):
        parse_protocol("sctp")


def test_format_ports() -> None:
    assert format_ports(1, 65535) == "all"
    assert format_ports(80, 80) == "80"
    assert format_ports(80, 90) == "80-90"


def r(proto: str, prefix: str, ports: str, target: str | None, on_missing: str = "drop") -> Rule:
    return make_rule(
        proto, prefix, ports, target=target, drop=target is None, on_missing=on_missing
    )


def test_rule_needs_a_target_or_drop() -> None:
    with pytest.raises(InvalidArgument):
        Rule(r("tcp", "192.0.2.0/24", "80", "x").key, STEER, None)
    with pytest.raises(InvalidArgument):
        Rule(r("tcp", "192.0.2.0/24", "80", "x").key, DROP, "x")


def test_identical_rule_is_a_no_op_and_another_effect_needs_replace() -> None:
    rs = RuleSet()
    assert rs.add(r("tcp", "192.0.2.0/24", "all", "a"))
    assert not rs.add(r("tcp", "192.0.2.0/24", "all", "a"))
    with pytest.raises(RuleConflict, match="already exists") as e:
        rs.add(r("tcp", "192.0.2.0/24", "all", "b"))
    assert "--replace" in e.value.hint
    with pytest.raises(RuleConflict):
        rs.add(r("tcp", "192.0.2.0/24", "all", "a", on_missing="pass"))
    assert rs.add(r("tcp", "192.0.2.0/24", "all", None), replace=True)
    assert len(rs) == 1 and rs.sorted()[0].action == DROP


@pytest.mark.parametrize(
    ("first", "second", "ok"),
    [
        ("100-200", "150-300", False),
        ("100-200", "50-150", False),
        ("100-200", "200-300", False),
        ("100-200", "120-130", True),
        ("100-200", "1-65535", True),
        ("100-200", "201-300", True),
        ("100-200", "100-200", True),
        ("all", "80", True),
    ],
)
def test_port_ranges_nest_or_are_disjoint(first: str, second: str, ok: bool) -> None:
    rs = RuleSet()
    rs.add(r("tcp", "192.0.2.0/24", first, None))
    rule = r("tcp", "192.0.2.0/24", second, None)
    if ok:
        rs.add(rule)
    else:
        with pytest.raises(RuleConflict, match="partly overlap"):
            rs.add(rule)
    # other prefixes and protocols are independent
    rs.add(r("udp", "192.0.2.0/24", second, None))
    rs.add(r("tcp", "192.0.2.0/25", second, None))


def test_remove_missing_rule() -> None:
    with pytest.raises(NotFound, match=r"no rule tcp 192\.0\.2\.0/24 80"):
        RuleSet().remove(r("tcp", "192.0.2.0/24", "80", None).key)


PRECEDENCE = [
    r("tcp", "192.0.2.0/24", "all", "a"),
    r("tcp", "192.0.2.0/24", "80-90", "b"),
    r("tcp", "192.0.2.0/24", "85", "c"),
    r("tcp", "192.0.2.128/25", "1000-2000", "d"),
    r("tcp", "192.0.2.129", "1500", None),
    r("udp", "192.0.2.0/24", "53", "e"),
    r("tcp", "2001:db8::/64", "all", "f"),
]


@pytest.mark.parametrize(
    ("proto", "addr", "port", "want"),
    [
        ("tcp", "192.0.2.1", 22, "a"),
        ("tcp", "192.0.2.1", 80, "b"),
        ("tcp", "192.0.2.1", 85, "c"),
        ("tcp", "192.0.2.200", 1000, "d"),
        ("tcp", "192.0.2.200", 85, "c"),
        ("tcp", "192.0.2.129", 1500, "drop"),
        ("tcp", "192.0.2.129", 1499, "d"),
        ("udp", "192.0.2.1", 53, "e"),
        ("udp", "192.0.2.1", 54, None),
        ("tcp", "198.51.100.1", 80, None),
        ("tcp", "2001:db8::1", 80, "f"),
        ("udp", "2001:db8::1", 80, None),
        ("tcp", "::ffff:192.0.2.1", 80, None),
    ],
)
def test_precedence(proto: str, addr: str, port: int, want: str | None) -> None:
    rs = RuleSet()
    for rule in PRECEDENCE:
        rs.add(rule)
    a = ipaddress.ip_address(addr)
    for found in (rs.match(proto, a, port), rs.compile().lookup(proto, a, port)):
        got = None if found is None else (found.target or "drop")
        assert got == want


def test_segments_are_merged_and_cover_the_port_space() -> None:
    rs = RuleSet()
    rs.add(r("tcp", "192.0.2.0/24", "all", "a"))
    rs.add(r("tcp", "192.0.2.0/24", "80", "a"))  # same effect as its neighbours? no: new rule
    compiled = rs.compile()
    segs = compiled.groups[("tcp", 4)][(int(ipaddress.IPv4Address("192.0.2.0")), 24)]
    # the rule from port 1 starts the run (port 0 never reaches a rule)
    assert [lo for lo, _ in segs] == [0, 80, 81]
    assert [compiled.rules[n - 1].key.lo for _, n in segs] == [1, 80, 1]
    rs = RuleSet()
    rs.add(r("tcp", "192.0.2.0/24", "2-9", "a"))
    segs = rs.compile().groups[("tcp", 4)][(int(ipaddress.IPv4Address("192.0.2.0")), 24)]
    assert segs == ((0, 0), (2, 1), (10, 0))
    assert rs.compile().lookup("tcp", ipaddress.ip_address("192.0.2.1"), 0) is None


def test_compiled_lookup_matches_the_reference() -> None:
    """Differential: the segment structure the kernel walks against the definition."""
    rng = random.Random(2026)
    for _ in range(150):
        rs, anchors = random_rules(rng, rng.randrange(1, 25))
        compiled = rs.compile()
        for _ in range(200):
            proto = rng.choice(["tcp", "udp"])
            addr = near(rng, rng.choice(anchors))
            port = port_near(rng, rs)
            assert compiled.lookup(proto, addr, port) == rs.match(proto, addr, port)


def test_quick_prefix_parsing_agrees_with_ipaddress() -> None:
    rng = random.Random(3)
    texts = [
        "192.0.2.0/24",
        "192.0.2.1",
        "0.0.0.0/0",
        "::/0",
        "2001:db8::/32",
        "2001:db8::1",
        "::ffff:192.0.2.1",
        "192.0.2.0/024",
        "192.000.2.0/24",
        "01.2.3.4",
        "1.2.3",
        "1.2.3.4/33",
        "2001:db8::/129",
        "fe80::1%eth0",
        "192.0.2.0/",
        "/24",
        "",
        " 192.0.2.0/24 ",
        "1.2.3.4/+8",
        "2001:DB8::/32",
        "1.2.3.4/٣",
        "1.2.3.4/8",
    ]
    for _ in range(500):
        v6 = rng.random() < 0.5
        width = 128 if v6 else 32
        n = rng.getrandbits(width)
        plen = rng.randrange(width + 1)
        if rng.random() < 0.7:
            n = n >> (width - plen) << (width - plen)
        a = ipaddress.IPv6Address(n) if v6 else ipaddress.IPv4Address(n)
        texts.append(f"{a}/{plen}")
    for text in texts:
        try:
            want: object = ipaddress.ip_network(text.strip(), strict=True)
        except ValueError:
            want = None
        if isinstance(want, ipaddress.IPv6Network) and want.subnet_of(MAPPED):
            want = None  # IPv4-mapped: refused (no packet has such an address)
        if "%" in text:
            want = None  # a scope id: refused, not dropped silently
        try:
            got: object = parse_prefix(text)
        except InvalidArgument:
            got = None
        assert got == want, text
