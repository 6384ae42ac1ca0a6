"""A generation's records, encoded and decoded back without a kernel."""

from __future__ import annotations

import ipaddress
import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from sklookupctl import image
from sklookupctl.plan import Slotted
from sklookupctl.rules import RuleSet, make_rule

V4, V6 = socket.AF_INET, socket.AF_INET6

addresses = st.one_of(
    st.ip_addresses(v=4),
    st.ip_addresses(v=6),
    st.sampled_from([ipaddress.ip_address(a) for a in ("127.0.0.1", "::", "::ffff:127.0.0.1")]),
)
targets = st.builds(
    Slotted,
    name=st.text("abcdefgh-_.:@/[]0123456789", min_size=1, max_size=63),
    proto=st.sampled_from(["tcp", "udp"]),
    # the socket's family, whatever the address it was declared with: an IPv4 address is often
    # served by a dual-stack IPv6 socket
    family=st.sampled_from([V4, V6]),
    addr=addresses,
    port=st.integers(1, 65535),
    slot=st.integers(0, 2**31),
    slots=st.integers(1, 16),
    exact=st.booleans(),
    v6only=st.booleans(),
)


@settings(max_examples=300)
@given(st.lists(targets, max_size=8, unique_by=lambda t: t.name))
def test_targets_round_trip(ts: list[Slotted]) -> None:
    by_name = {t.name: t for t in ts}
    img = image.encode(RuleSet(), by_name, image.MetaInfo(7, 1, 2, "edge"))
    count, raw = img.maps["targets"]
    assert count == max(1, len(ts))
    assert image.decode_targets(raw, len(ts)) == [by_name[n] for n in sorted(by_name)]


def test_an_ipv4_address_served_by_a_dual_stack_socket() -> None:
    t = Slotted("web", "tcp", V6, ipaddress.ip_address("127.0.0.1"), 8080, 0, 1)
    raw = image.encode(RuleSet(), {"web": t}, image.MetaInfo(1, 1, 1, "x")).maps["targets"][1]
    assert image.decode_targets(raw, 1) == [t]


def test_rules_round_trip() -> None:
    rs = RuleSet()
    rs.add(make_rule("tcp", "192.0.2.0/24", "all", target="web"))
    rs.add(make_rule("udp", "2001:db8::/64", "53", target="dns", on_missing="pass"))
    rs.add(make_rule("tcp", "192.0.2.66", "22", drop=True))
    t = {
        n: Slotted(n, "tcp", V6, ipaddress.ip_address("::"), 1, i, 1)
        for i, n in enumerate(["dns", "web"])
    }
    img = image.encode(rs, t, image.MetaInfo(3, 9, 8, "edge"))
    count, raw = img.maps["rules"]
    got = image.decode_rules(raw, count - 1, ["dns", "web"])
    assert {k: (r.action, r.target, r.on_missing) for k, r in rs.rules.items()} == got
    meta = image.decode_meta(img.maps["meta"][1])
    assert (meta.generation, meta.netns_cookie, meta.netns_inode, meta.label) == (3, 9, 8, b"edge")


@settings(max_examples=300)
@given(
    st.integers(0, 30),
    st.integers(1, 4),
    st.data(),
)
def test_counted_columns_and_group_stats_against_a_plain_sum(
    n: int, ncpu: int, data: st.DataObject
) -> None:
    """Counted.columns (which leaves out the CPUs and the base that are all zeros) and
    group_stats (which skips counters nothing counted) against sums made rule by rule, on
    counters where any CPU, the base, tbase, or everything is zero, and values near 2**64."""
    width = len(image.layout.KERNEL_COUNTERS)
    value = st.one_of(st.just(0), st.integers(0, 3), st.integers((1 << 64) - 3, (1 << 64) - 1))
    zero = data.draw(st.lists(st.booleans(), min_size=ncpu + 2, max_size=ncpu + 2))

    def table(rows: int, off: bool) -> list[list[int]]:
        if off:
            return [[0] * width for _ in range(rows)]
        return data.draw(
            st.lists(st.lists(value, min_size=width, max_size=width), min_size=rows, max_size=rows)
        )

    per = [table(n + 1, zero[c]) for c in range(ncpu)]  # per CPU, by rule number (0 unused)
    base = table(n + 1, zero[ncpu])
    names = ["a", "b"]
    tbase = table(len(names) + len(image.DROP_GROUPS), zero[ncpu + 1])
    rs = RuleSet()
    for i in range(n):
        drop = data.draw(st.booleans())
        rs.add(
            make_rule(
                "tcp" if i % 3 else "udp", f"192.0.2.{i}/32", "80", target=names[i % 2], drop=drop
            )
        )
    targets = {
        t: Slotted(t, "tcp", 2, ipaddress.ip_address("::"), 80, i, 1) for i, t in enumerate(names)
    }
    count, raw = image.encode(rs, targets, image.MetaInfo(1, 0, 0, "t")).maps["rules"]
    assert count == n + 1
    pack = image.COUNTERS.pack
    counted = image.Counted(
        raw,
        n,
        b"".join(pack(*row) for row in base),
        b"".join(pack(*per[c][i]) for i in range(n + 1) for c in range(ncpu)),
        ncpu,
        b"".join(pack(*row) for row in tbase),
        names,
    )
    totals = [
        [base[i][j] + sum(per[c][i][j] for c in range(ncpu)) for j in range(width)]
        for i in range(1, n + 1)
    ]
    assert counted.columns() == [[t[j] for t in totals] for j in range(width)]
    stats, sizes = counted.group_stats()
    records = list(image.RULE.iter_unpack(raw[image.RULE.size :]))
    for gi, g in enumerate(image.groups(names)):
        mine = [
            t
            for t, r in zip(totals, records, strict=True)
            if (
                g[0] == "drop"
                and r[3] == image.layout.ACTION_DROP
                and image.PROTO_NAMES[r[0]] == g[1]
            )
            or (g[0] == "target" and r[3] != image.layout.ACTION_DROP and names[r[7]] == g[1])
        ]
        assert sizes[g] == len(mine)
        want = tuple((sum(t[j] for t in mine) + tbase[gi][j]) % (1 << 64) for j in range(width))
        assert stats[g] == want
