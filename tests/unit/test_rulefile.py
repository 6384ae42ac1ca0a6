"""Rule files without a kernel: the TOML subset reader, every validation error, round trips."""

from __future__ import annotations

import ipaddress
import random
import tomllib
from typing import Any

import pytest

from sklookupctl import rulefile
from sklookupctl.rulefile import FileError
from sklookupctl.rules import DROP, STEER

GOOD = """\
# a comment
[targets.web]
to = "127.0.0.1:8080"   # trailing comment

[targets."v6.proxy"]
to = '[::1]:8443'
protocol = "tcp"

[targets.dns]
pid = 1234
fd = 5

[[rules]]
protocol = "tcp"
prefix = "192.0.2.0/24"
ports = "1-65535"
target = "web"

[[rules]]
protocol = "TCP"
prefix = "192.0.2.0/24"
ports = "22"
action = "drop"

[[rules]]
protocol = "tcp"
prefix = "2001:db8::/32"
ports = "all"
target = "v6.proxy"
on_missing = "pass"

[[rules]]
protocol = "udp"
prefix = "198.51.100.53"
ports = "53"
target = "dns"
"""


def test_a_good_file() -> None:
    rf = rulefile.parse(GOOD, "r.toml")
    assert len(rf.rules) == 4
    assert rf.targets["web"].to == (ipaddress.ip_address("127.0.0.1"), 8080)
    assert rf.targets["web"].proto == "tcp"  # inferred from its rules
    assert rf.targets["dns"].proto == "udp" and (rf.targets["dns"].pid, rf.targets["dns"].fd) == (
        1234,
        5,
    )
    rules = {str(r.key): r for r in rf.rules.rules.values()}
    assert rules["tcp 192.0.2.0/24 22"].action == DROP
    assert rules["tcp 2001:db8::/32 all"].on_missing == "pass"
    assert rules["udp 198.51.100.53/32 53"].action == STEER
    assert rf.index(rules["udp 198.51.100.53/32 53"].key) == 3


def test_the_fast_reader_agrees_with_tomllib() -> None:
    fast = rulefile._fast_parse(GOOD)
    assert fast is not None and fast == tomllib.loads(GOOD)


@pytest.mark.parametrize(
    "text",
    [
        'x = "a\\"b"',  # escapes
        "x = 1_000",  # underscores in numbers
        "x = true",
        "x = [1, 2]",
        "[targets]\nweb = {to = '127.0.0.1:80'}",
        '[[rules]]\nprotocol = "tcp"\nprotocol = "udp"',  # duplicate key: an error
        "[targets.a]\n[targets.a]",  # duplicate table: an error
        "x = 01",  # leading zero: an error
        'x = "unterminated',
        "[[rules]\n",
        'x = """multi\nline"""',
        "[rules]\nx = 1\n[[rules]]",
    ],
)
def test_outside_the_subset_tomllib_decides(text: str) -> None:
    assert rulefile._fast_parse(text) is None
    try:
        want: Any = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        with pytest.raises(FileError, match="not valid TOML"):
            rulefile.loads_toml(text, "f")
    else:
        assert rulefile.loads_toml(text, "f") == want


def test_fast_reader_against_tomllib_on_random_lines() -> None:
    rng = random.Random(5)
    pieces = [
        "[[rules]]",
        "[targets.a]",
        "[targets.b-c_1]",
        '[targets."q q"]',
        'k = "v"',
        "k2 = 'lit'",
        "n = 12",
        "n2 = -3",
        "# c",
        "",
        "  ",
        'p = "x" # c',
        "bad line",
        "x = 1.5",
        "[other]",
    ]
    for _ in range(3000):
        text = "\n".join(rng.choice(pieces) for _ in range(rng.randrange(1, 8)))
        fast = rulefile._fast_parse(text)
        try:
            want: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            want = None
        if fast is not None:
            assert fast == want, text


def rule(**fields: object) -> str:
    base: dict[str, object] = {
        "protocol": "tcp",
        "prefix": "192.0.2.0/24",
        "ports": "80",
        "target": "web",
    }
    base.update(fields)
    body = "\n".join(
        f"{k} = {v}" if isinstance(v, int) else f'{k} = "{v}"'
        for k, v in base.items()
        if v is not None
    )
    return f"[[rules]]\n{body}\n"


WEB = '[targets.web]\nto = "127.0.0.1:8080"\n'
OK_RULE = rule(ports="443")


@pytest.mark.parametrize(
    ("text", "where", "words"),
    [
        ("x = ", "f.toml", "not valid TOML"),
        ('colour = "red"', "f.toml: colour", "unknown table"),
        ("rules = 3", "f.toml: rules", "array of tables"),
        ("targets = 3", "f.toml: targets", "must be tables"),
        (WEB + OK_RULE + rule(protocol=None), "f.toml: rules[1].protocol", "missing"),
        (WEB + rule(protocol="sctp"), "f.toml: rules[0].protocol", "unknown protocol"),
        (WEB + rule(protocol=6), "f.toml: rules[0].protocol", "must be a string"),
        (WEB + rule(prefix=None), "f.toml: rules[0].prefix", "missing"),
        (WEB + rule(prefix="192.0.2.1/24"), "f.toml: rules[0].prefix", "host bits"),
        (WEB + rule(prefix="example.com"), "f.toml: rules[0].prefix", "not an IP"),
        (WEB + rule(ports=None), "f.toml: rules[0].ports", "missing"),
        (WEB + rule(ports="90-80"), "f.toml: rules[0].ports", "reversed"),
        (WEB + rule(ports="0"), "f.toml: rules[0].ports", "not a port"),
        (WEB + rule(ports="70000"), "f.toml: rules[0].ports", "too large"),
        (WEB + rule(ports="http"), "f.toml: rules[0].ports", "not a number"),
        (WEB + rule(target=None), "f.toml: rules[0].target", "missing"),
        (WEB + rule(target="nope"), "f.toml: rules[0].target", "no target 'nope'"),
        (WEB + rule(action="drop"), "f.toml: rules[0].target", "drop rule has no target"),
        (WEB + rule(action="reject"), "f.toml: rules[0].action", "not an action"),
        (WEB + rule(on_missing="maybe"), "f.toml: rules[0].on_missing", "not valid"),
        (
            WEB + rule(target=None, action="drop", on_missing="pass"),
            "f.toml: rules[0].on_missing",
            "not to drop rules",
        ),
        (WEB + rule(port="80"), "f.toml: rules[0].port", "unknown field"),
        (WEB + OK_RULE + rule(ports="443"), "f.toml: rules[1]", "also rules[0]"),
        (
            WEB + rule(ports="1-100") + rule(ports="50-150"),
            "f.toml: rules[1].ports",
            "partly overlaps rules[0]",
        ),
        (
            WEB + rule(ports="50-150") + rule(ports="1-100"),
            "f.toml: rules[1].ports",
            "partly overlaps rules[0]",
        ),
        (
            '[targets."bad name!"]\nto = "127.0.0.1:1"\n' + rule(target="bad name!"),
            "f.toml: targets.'bad name!'",
            "not valid",
        ),
        ('[targets.web]\nto = "127.0.0.1"\n' + OK_RULE, "f.toml: targets.web.to", "has no port"),
        ('[targets.web]\nto = "::1:80"\n' + OK_RULE, "f.toml: targets.web.to", "brackets"),
        ("[targets.web]\n" + OK_RULE, "f.toml: targets.web.to", "missing"),
        ("[targets.web]\npid = 1\n" + OK_RULE, "f.toml: targets.web.fd", "missing"),
        (
            '[targets.web]\npid = 1\nfd = "x"\n' + OK_RULE,
            "f.toml: targets.web.fd",
            "is not a file descriptor",
        ),
        (
            "[targets.web]\npid = -1\nfd = 3\n" + OK_RULE,
            "f.toml: targets.web.pid",
            "is not a process id",
        ),
        (
            '[targets.web]\nto = "127.0.0.1:1"\npid = 1\nfd = 3\n' + OK_RULE,
            "f.toml: targets.web",
            "both to and pid/fd",
        ),
        (WEB + 'host = "x"\n' + OK_RULE, "f.toml: targets.web.host", "unknown field"),
        (WEB + 'protocol = "udp"\n' + OK_RULE, "f.toml: targets.web.protocol", "tcp rules use"),
        (WEB + OK_RULE + rule(protocol="udp"), "f.toml: targets.web", "both tcp and udp"),
    ],
)
def test_every_validation_error_names_where(text: str, where: str, words: str) -> None:
    with pytest.raises(FileError) as exc:
        rulefile.parse(text, "f.toml")
    assert exc.value.where == where
    assert words in exc.value.message


def test_unused_targets_are_reported_not_registered() -> None:
    rf = rulefile.parse(WEB + '[targets.spare]\nto = "127.0.0.1:9"\n' + OK_RULE, "f")
    assert rf.unused_targets == ["spare"] and list(rf.targets) == ["web"]


def test_dumps_round_trips() -> None:
    rf = rulefile.parse(GOOD.replace("pid = 1234\nfd = 5", 'to = "198.51.100.1:53"'), "r")
    targets = {n: (t.proto, *t.to, t.exact) for n, t in rf.targets.items() if t.to is not None}
    text = rulefile.dumps(rf.rules, targets, "header\nsecond line")
    assert text.startswith("# header\n# second line\n")
    again = rulefile.parse(text, "export")
    assert again.rules == rf.rules
    assert again.targets == rf.targets
    assert rulefile._fast_parse(text) is not None  # what export writes takes the fast path


def test_progress_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rulefile._Rows, "CHUNK", 2000)  # reported a chunk at a time
    text = WEB + "".join(rule(ports=str(p)) for p in range(1, 501))
    seen: list[tuple[int, int]] = []
    rulefile.parse(text, "f", lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 500) and seen[-1] == (500, 500) and len(seen) > 10


def loopback_targets(rs: Any, exact: Any = lambda: False) -> dict[str, tuple[str, Any, int, bool]]:
    """The targets a random rule set (tests/rulegen) uses, for rulefile.dumps: each at
    127.0.0.1:80, of its protocol, `exact()` deciding reuseport."""
    return {
        t: ("tcp" if t.startswith("tcp") else "udp", ipaddress.ip_address("127.0.0.1"), 80, exact())
        for t in rs.targets_in_use()
    }


def test_canonical_reader_agrees_with_tomllib() -> None:
    """What export writes is read by two regular expressions; any change to that shape must
    either still mean the same to tomllib or send the file down the general path."""
    from ..rulegen import random_rules

    rng = random.Random(11)
    for _ in range(40):
        rs, _anchors = random_rules(rng, rng.choice([1, 5, 30]))
        targets = loopback_targets(rs, lambda: rng.random() < 0.3)
        text = rulefile.dumps(rs, targets, "header")
        assert tables(rulefile._canonical(text)) == tomllib.loads(text)
        for _ in range(30):
            i = rng.randrange(len(text))
            mutated = (
                text[:i]
                + rng.choice(['"', "\\", "#", "\n", " ", "x", "[", "=", ""])
                + text[i + 1 :]
            )
            got = tables(rulefile._canonical(mutated))
            if got is None:
                continue  # not export's shape: the general reader decides
            assert got == tomllib.loads(mutated), mutated


def tables(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    """A document from _canonical with its rules as tables, as tomllib gives them."""
    if doc is None or not isinstance(doc.get("rules"), rulefile._Rows):
        return doc
    try:
        return {**doc, "rules": [rulefile._Rows.table(row) for row in doc["rules"]]}
    except rulefile._NotCanonical:
        return None  # a chunk of rules left the shape


def outcome(text: str) -> object:
    try:
        rf = rulefile.parse(text, "f")
    except FileError as e:
        return ("error", str(e), e.hint)
    return (list(rf.rules.rules.items()), rf.targets, rf.unused_targets)


_ODD_FIELDS = {
    "prefix": [
        "::ffff:192.0.2.0/120",
        "::ffff:198.51.100.7",
        "::ffff:0:0/96",
        "::/0",
        "192.0.2.1/24",
        "192.0.2.0/33",
        "192.0.02.0/24",
        "2001:db8::/032",
        "fe80::1%lo",
        " 192.0.2.0/24",
        "198.51.100.0/0.0.0.255",
    ],
    "ports": ["0", "65536", "90-80", "all", "ALL", " 80", "1-65535", "08", "x"],
    "protocol": ["TCP", "sctp", " udp"],
    "target": ["nobody", "tcp-a", ""],
    "action": ["steer", "Drop", "", "drop"],
}


@pytest.mark.parametrize("chunk", [1 << 20, 150])
def test_the_canonical_way_parses_as_the_general_way(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files in export's shape are made into rules straight from the regular expression's
    rows, a chunk of text at a time; every outcome (the rules in file order, or the error and
    where) must be the one the general reader gives. Random files, then random odd field
    values, duplicates, drop rules with on_missing, and lines that leave the shape (after an
    error, too) dropped into them; in one chunk, and in chunks of about one rule."""
    from ..rulegen import random_rules

    monkeypatch.setattr(rulefile._Rows, "CHUNK", chunk)
    rng = random.Random(23)
    rounds = 0
    for _ in range(60):
        rs, _anchors = random_rules(rng, rng.choice([1, 5, 30]))
        targets = loopback_targets(rs)
        text = rulefile.dumps(rs, targets)
        assert tables(rulefile._canonical(text)) == tomllib.loads(text)  # read whole, chunked
        for _ in range(8):
            lines = text.split("\n")
            for _ in range(rng.randrange(3)):
                i = rng.randrange(len(lines))
                key, eq, _v = lines[i].partition(" = ")
                if eq and key in _ODD_FIELDS:
                    lines[i] = f'{key} = "{rng.choice(_ODD_FIELDS[key])}"'
                elif lines[i] == "[[rules]]" and rng.random() < 0.5:
                    # a whole rule again: a duplicate, or a partial overlap when ports differ
                    j = lines.index("", i) if "" in lines[i:] else len(lines)
                    lines[j:j] = ["", *lines[i:j]]
                elif key == "action" and not lines[i + 1].startswith("on_missing"):
                    lines[i + 1 : i + 1] = ['on_missing = "pass"']
                elif rng.random() < 0.1:
                    # out of export's shape from here on (TOML all the same, or not)
                    lines[i:i] = [rng.choice(["# a comment", "ports = '1'", "[[rules]", ""])]
            mutated = "\n".join(lines)
            want = outcome_general(mutated)
            assert outcome(mutated) == want, mutated
            rounds += 1
    assert rounds == 480


def outcome_general(text: str) -> object:
    import unittest.mock

    with unittest.mock.patch.object(rulefile, "_canonical", lambda _text: None):
        return outcome(text)


@pytest.mark.parametrize(
    ("prefix", "hint"),
    [
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.0/120", "192.0.2.0/24"),
        ("::ffff:0:0/96", "0.0.0.0/0"),
    ],
)
@pytest.mark.parametrize("shape", ["export", "general"])
def test_ipv4_mapped_prefixes_are_refused_in_files_too(prefix: str, hint: str, shape: str) -> None:
    """No packet is looked up with an IPv4-mapped address: `attach` refused these, but files
    took them (the quick parser of the common case skipped the check)."""
    text = WEB + rule(prefix=prefix)
    if shape == "general":
        text = "# a comment first\n" + text.replace('ports = "80"', "ports = '80'")
        assert tables(rulefile._canonical(text)) is None
    else:
        assert tables(rulefile._canonical(text)) is not None
    with pytest.raises(FileError) as e:
        rulefile.parse(text, "f")
    assert e.value.where == "f: rules[0].prefix"
    assert e.value.hint == f"write the IPv4 prefix: {hint}"


def test_files_are_read_from_paths_or_stdin(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    from sklookupctl import api
    from sklookupctl.errors import InvalidArgument, NotFound

    f = tmp_path / "r.toml"
    f.write_text(GOOD)
    assert api._read_file(str(f)) == GOOD
    monkeypatch.setattr(sys, "stdin", io.StringIO(GOOD))
    assert api._read_file("-") == GOOD
    with pytest.raises(NotFound, match="no such file"):
        api._read_file(str(tmp_path / "missing.toml"))
    with pytest.raises(InvalidArgument, match="is a directory"):
        api._read_file(str(tmp_path))
    (tmp_path / "latin1.toml").write_bytes(b"x = '\xe9'\n")
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        api._read_file(str(tmp_path / "latin1.toml"))


def test_an_export_of_a_million_rules_is_a_file_apply_takes() -> None:
    """`export` of a million rules must be a file `apply` reads back (the size limit once
    refused the bench's 1M-rule file, and would have refused such an export)."""
    import contextlib
    import ipaddress
    import random

    from sklookupctl import validate
    from sklookupctl.errors import RuleConflict
    from sklookupctl.rules import RuleSet, make_rule

    rng = random.Random(1)
    rs = RuleSet()
    name = "t" * 63  # the longest target name
    while len(rs) < 2000:
        v6 = rng.random() < 0.5
        width = 128 if v6 else 32
        plen = rng.randrange(1, width + 1)
        net = ipaddress.ip_network(
            (rng.getrandbits(width) >> (width - plen) << (width - plen), plen)
        )
        lo = rng.randrange(1, 60000)
        rule = make_rule("tcp", str(net), f"{lo}-{lo + rng.randrange(1, 5000)}", target=name)
        with contextlib.suppress(RuleConflict):
            rs.add(rule)
    text = rulefile.dumps(rs, {name: ("tcp", ipaddress.ip_address("::1"), 8080, False)})
    per_rule = len(text.encode()) / len(rs)
    assert per_rule * 1_000_000 <= validate.RULE_FILE_MAX, per_rule


def test_a_file_whose_rules_are_live_has_only_its_head_read() -> None:
    """parse with `known` (the targets the live rules use, with their protocols: the live
    rules were read from this very text) reads targets and [netns] as a whole parse does, and
    no rule; a file outside export's shape is read whole all the same."""
    from ..rulegen import random_rules

    rng = random.Random(31)
    for _ in range(30):
        rs, _anchors = random_rules(rng, rng.choice([1, 5, 30]))
        targets = loopback_targets(rs)
        text = rulefile.dumps(rs, targets, "header")
        text = text.replace("[targets.", '[targets.unused]\nto = "127.0.0.1:9"\n\n[targets.', 1)
        whole = rulefile.parse(text, "f")
        known = {t: p for t, (p, *_rest) in targets.items()}
        head = rulefile.parse(text, "f", known=known)
        assert head.same_as_live and head.text == text and not head.rules.rules
        assert (head.targets, head.unused_targets) == (whole.targets, whole.unused_targets)
        assert (head.create_netns, head.addresses) == (whole.create_netns, whole.addresses)
        # rules in another shape: the head still says everything but the rules
        other = rulefile.parse(text.replace('"', "'"), "f", known=known)
        assert other.same_as_live and other.targets == whole.targets
        # a target declared after the rules: read whole
        late = text + '\n[targets.late]\nto = "127.0.0.1:7"\n'
        other = rulefile.parse(late, "f", known=known)
        assert not other.same_as_live and other.rules.rules == whole.rules.rules
        assert "late" in other.unused_targets
        spaced = (
            "[[rules]] \n"
            + rule(prefix="203.0.113.0/24", ports="9", target=None, action="drop")[10:]
        )
        for late in (text + '\n  [targets.late]\nto = "127.0.0.1:7"\n', text + "\n" + spaced):
            assert not rulefile.parse(late, "f", known=known).same_as_live


def test_a_file_digest_is_of_its_text_and_of_the_code() -> None:
    a = rulefile.source_digest("x")
    assert a == rulefile.source_digest("x") and a != rulefile.source_digest("x ")
    assert len(a) == 40
    rulefile._code_digest.cache_clear()
    try:
        import unittest.mock

        with unittest.mock.patch.object(rulefile, "_code_digest", lambda: b"other code"):
            assert rulefile.source_digest("x") not in (a, "")
    finally:
        rulefile._code_digest.cache_clear()


def test_a_steering_rule_without_target_beside_a_target_named_empty() -> None:
    """The quick way makes drop rules too: only an action = "drop" row without a target is
    one (a target named "" in the file must not turn `action = "steer"` into a drop rule)."""
    text = (
        '[targets.""]\nto = "127.0.0.1:9"\n\n'
        + rule(prefix="198.51.100.0/24", target=None, action="drop")  # the caches filled
        + rule(target=None, action="steer")
    )
    assert tables(rulefile._canonical(text)) is not None
    want = outcome_general(text)
    assert outcome(text) == want
    assert want[0] == "error" and "rules[1].target" in str(want[1])


def test_quick_ports_agree_with_parse_ports() -> None:
    from sklookupctl.errors import InvalidArgument
    from sklookupctl.rules import parse_ports

    rng = random.Random(8)
    pieces = ["0", "1", "08", "80", "65535", "65536", "99999", "123456", "", " 1", "x", "١٢"]
    texts = ["all", "ALL", "-", "1-", "-1", "1--2"]
    for _ in range(3000):
        a = rng.choice([*pieces, str(rng.randrange(70000))])
        b = rng.choice([*pieces, str(rng.randrange(70000))])
        texts += [a, f"{a}-{b}"]
    for t in texts:
        quick = rulefile._quick_ports(t)
        try:
            want: object = parse_ports(t)
        except InvalidArgument:
            want = None
        if quick is not None:
            assert quick == want, t
        elif want is not None:
            # left to parse_ports: only texts outside the plain shape
            assert t.lower() == "all" or any(p[:1] == "0" or not p.isdigit() for p in t.split("-"))


@pytest.mark.parametrize("on_missing", [None, "pass"])
def test_an_empty_target_name_is_an_error_with_its_place(on_missing: str | None) -> None:
    """`target = ""` beside a `[targets.""]`: the file is refused with where (it was an error
    without a place, from the rule model, when on_missing was given), the same both ways."""
    text = '[targets.""]\nto = "127.0.0.1:9"\n\n' + rule(target="", on_missing=on_missing)
    want = outcome_general(text)
    assert outcome(text) == want
    assert want[0] == "error" and str(want[1]).startswith("f: "), want


def test_a_deeply_nested_head_is_refused_as_the_general_way_does() -> None:
    """A head that tomllib reads but that nests deeper than a rule file can: the export-shaped
    reader refuses it in the general reader's words (it said `must be a string, not list`)."""
    text = "x = " + "[" * 12 + "]" * 12 + "\n\n" + '[targets.web]\nto = "127.0.0.1:9"\n\n' + rule()
    want = outcome_general(text)
    assert want[0] == "error" and "nested too deeply" in str(want[1]), want
    assert outcome(text) == want
