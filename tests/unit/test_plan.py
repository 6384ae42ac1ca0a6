"""The plan, without a kernel: the difference, which targets keep their slots, which get fresh
ones, what is filled before and emptied after the switch, when the SOCKMAP grows."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sklookupctl import slots as slotsmod
from sklookupctl.errors import NotFound, TargetMismatch
from sklookupctl.plan import (
    NOTHING,
    LazyEffects,
    Live,
    Member,
    Slotted,
    Want,
    live_rules,
    make_plan,
)
from sklookupctl.rules import DROP, STEER, Rule, RuleKey, RuleSet, make_rule

V4 = socket.AF_INET
V6 = socket.AF_INET6
LO = ipaddress.ip_address("127.0.0.1")


def slotted(name: str, slot: int, slots: int = 1, port: int = 8080, **kw: object) -> Slotted:
    fields: dict[str, object] = dict(
        name=name, proto="tcp", family=V4, addr=LO, port=port, slot=slot, slots=slots
    )
    fields.update(kw)
    return Slotted(**fields)  # type: ignore[arg-type]


def want(name: str, *cookies: int, port: int = 8080, family: int = V4, **kw: object) -> Want:
    members = tuple(Member(c, family, bool(kw.pop("v6only", False))) for c in cookies)
    return Want(name, "tcp", LO, port, members, **kw)  # type: ignore[arg-type]


def rules(*specs: tuple[str, str, str | None]) -> RuleSet:
    rs = RuleSet()
    for prefix, ports, target in specs:
        rs.add(make_rule("tcp", prefix, ports, target=target, drop=target is None))
    return rs


def live_of(rs: RuleSet, targets: list[Slotted], filled: dict[int, int], capacity: int) -> Live:
    return Live(
        {k: (r.action, r.target, r.on_missing) for k, r in rs.rules.items()},
        {t.name: t for t in targets},
        filled,
        capacity,
        generation=3,
        attached=True,
    )


WEB = ("192.0.2.0/24", "all", "web")
API = ("198.51.100.0/24", "443", "api")


def test_first_plan_makes_a_map_and_a_link() -> None:
    p = make_plan(NOTHING, rules(WEB), {"web": want("web", 11)})
    assert p.attach and p.new_map and not p.noop
    assert p.capacity == slotsmod.MIN_CAPACITY
    assert p.targets["web"].block() == range(0, 1)
    assert p.fills == {0: 11} and p.frees == []
    assert [c.why for c in p.target_changes] == ["new"]
    assert [r.key for r in p.added] == list(rules(WEB).rules)


def test_nothing_wanted_where_nothing_is_is_a_noop() -> None:
    p = make_plan(NOTHING, RuleSet(), {})
    assert p.noop and not p.attach and not p.new_map


def test_unchanged_is_a_noop_and_keeps_every_slot() -> None:
    rs = rules(WEB, API)
    live = live_of(rs, [slotted("web", 4), slotted("api", 9, port=9443)], {4: 11, 9: 22}, 64)
    p = make_plan(live, rs, {"web": want("web", 11), "api": want("api", 22, port=9443)})
    assert p.noop
    assert p.targets == live.targets and p.fills == {} and p.frees == []


def test_a_changed_rule_is_reported_as_changed() -> None:
    old = rules(WEB, API)
    new = rules(("192.0.2.0/24", "all", "api"), API)
    live = live_of(old, [slotted("web", 4), slotted("api", 9, port=9443)], {4: 11, 9: 22}, 64)
    p = make_plan(live, new, {"api": want("api", 22, port=9443)})
    assert [(a.target, b.target) for a, b in p.changed] == [("web", "api")]
    assert p.added == [] and p.removed == []
    # web is no longer used: its slot is emptied after the switch, api keeps its own
    assert [(c.name, c.why) for c in p.target_changes] == [("web", "removed")]
    assert p.frees == [4] and p.fills == {} and p.targets["api"].slot == 9


def test_added_and_removed_rules() -> None:
    old = rules(WEB, ("203.0.113.0/24", "22", None))
    new = rules(WEB, ("192.0.2.7", "22", None))
    live = live_of(old, [slotted("web", 0)], {0: 11}, 64)
    p = make_plan(live, new, {"web": want("web", 11)})
    assert [str(r.key) for r in p.added] == ["tcp 192.0.2.7/32 22"]
    assert [str(r.key) for r in p.removed] == ["tcp 203.0.113.0/24 22"]
    assert p.changed == [] and not p.noop


def test_a_new_socket_gets_a_fresh_block_and_the_old_one_is_freed() -> None:
    rs = rules(WEB)
    live = live_of(rs, [slotted("web", 0)], {0: 11}, 64)
    p = make_plan(live, rs, {"web": want("web", 12)})
    (change,) = p.target_changes
    assert change.why == "socket"
    new_slot = p.targets["web"].slot
    assert new_slot != 0  # the old rules keep reaching socket 11 until the switch
    assert p.fills == {new_slot: 12} and p.frees == [0]
    assert not p.new_map and not p.noop


def test_a_target_declared_at_another_address_of_the_same_socket() -> None:
    """127.0.0.1:8080 and 0.0.0.0:8080 may be the same wildcard socket: the target still moves
    (its record says where it was declared, and export writes that)."""
    rs = rules(WEB)
    live = live_of(rs, [slotted("web", 0)], {0: 11}, 64)
    wild = Want("web", "tcp", ipaddress.ip_address("0.0.0.0"), 8080, (Member(11, V4),))
    p = make_plan(live, rs, {"web": wild})
    assert [c.why for c in p.target_changes] == ["address"]
    assert str(p.targets["web"].addr) == "0.0.0.0" and p.frees == [0]


def test_a_dead_socket_is_kept_as_registered() -> None:
    rs = rules(WEB)
    live = live_of(rs, [slotted("web", 5)], {}, 64)  # slot 5 emptied: the proxy closed it
    p = make_plan(live, rs, {"web": want("web")})
    assert p.noop and p.kept_missing == ["web"]
    # and a restarted proxy is registered afresh
    p = make_plan(live, rs, {"web": want("web", 13)})
    assert p.fills == {p.targets["web"].slot: 13} and p.frees == [5]


def test_a_new_target_needs_a_socket() -> None:
    with pytest.raises(NotFound):
        make_plan(NOTHING, rules(WEB), {"web": want("web")})
    with pytest.raises(NotFound):
        make_plan(NOTHING, rules(WEB), {})


def test_moved_targets_grow_the_map_when_old_and_new_do_not_fit() -> None:
    """Every target moves: until the switch the old blocks stay in use, so old + new must fit;
    when they do not, a new SOCKMAP is sized from the final state and the kept sockets are
    copied into it."""
    n = 6
    rs = RuleSet()
    for i in range(n):
        rs.add(make_rule("tcp", f"192.0.2.{i}", "all", target=f"t{i}"))
    targets = [slotted(f"t{i}", i, port=1000 + i) for i in range(n)]
    live = live_of(rs, targets, {i: 100 + i for i in range(n)}, 8)
    wants = {f"t{i}": want(f"t{i}", 200 + i, port=1000 + i) for i in range(n - 1)}
    wants["t5"] = want("t5", 105, port=1005)  # t5 stays
    p = make_plan(live, rs, wants, min_capacity=8)
    assert p.new_map and p.frees == []
    assert p.capacity == 16  # twice the 6 slots needed, as a power of two
    blocks = sorted((t.slot, t.slots) for t in p.targets.values())
    assert blocks == [(i, 1) for i in range(n)]  # packed from 0
    assert sorted(p.fills.values()) == [105, 200, 201, 202, 203, 204]  # the kept one copied
    # two moves fit beside the six live blocks: no growth
    few = dict(wants)
    for i in range(2, n):
        few[f"t{i}"] = want(f"t{i}", 100 + i, port=1000 + i)
    p = make_plan(live, rs, few, min_capacity=8)
    assert not p.new_map and p.capacity == 8
    assert sorted(p.frees) == [0, 1]
    assert sorted(p.fills) == [6, 7]


def test_a_detached_link_is_made_again() -> None:
    rs = rules(WEB)
    live = live_of(rs, [slotted("web", 0)], {0: 11}, 64)
    detached = Live(live.rules, live.targets, live.filled, 64, 3, attached=False)
    p = make_plan(detached, rs, {"web": want("web", 11)})
    assert p.attach and not p.noop and not p.new_map


def test_families() -> None:
    v6 = rules(("2001:db8::/64", "all", "web"))
    with pytest.raises(TargetMismatch) as e:
        make_plan(NOTHING, v6, {"web": want("web", 1)})  # an IPv4 socket
    assert e.value.target == "web" and e.value.rule == next(iter(v6.rules))
    with pytest.raises(TargetMismatch):
        make_plan(NOTHING, rules(WEB), {"web": want("web", 1, family=V6, v6only=True)})
    make_plan(NOTHING, rules(WEB), {"web": want("web", 1, family=V6)})  # dual-stack: fine
    # a target kept without a socket is checked by what was recorded of it
    live = live_of(rules(WEB), [slotted("web", 0, family=V6, v6only=True)], {}, 64)
    with pytest.raises(TargetMismatch):
        make_plan(live, rules(WEB, ("203.0.113.0/24", "80", "web")), {"web": want("web")})


def test_reuseport_group_members() -> None:
    rs = rules(WEB)
    p = make_plan(NOTHING, rs, {"web": want("web", 1, 2, 3)})
    assert p.targets["web"].slots == 3 and p.fills == {0: 1, 1: 2, 2: 3}
    live = live_of(rs, [p.targets["web"]], {0: 1, 2: 3}, 64)  # member 2 died
    assert make_plan(live, rs, {"web": want("web", 1, 3)}).noop  # the survivors: no change
    q = make_plan(live, rs, {"web": want("web", 1, 3, 4)})  # a new member joined
    assert [c.why for c in q.target_changes] == ["members"]
    assert q.targets["web"].slots == 3 and sorted(q.frees) == [0, 1, 2]
    r = make_plan(live, rs, {"web": want("web", 1, 3, exact=True)})
    assert [c.why for c in r.target_changes] == ["reuseport"]


# -- properties over random live states and wishes -----------------------------------------------

NAMES = [f"t{i}" for i in range(6)]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Live, RuleSet, dict[str, Want], int]:
    capacity = draw(st.sampled_from([0, 8, 16, 64]))
    rng_cookie = iter(range(1000, 100000))
    live_targets: list[Slotted] = []
    filled: dict[int, int] = {}
    taken = slotsmod.Slots(capacity)
    for name in draw(st.lists(st.sampled_from(NAMES), unique=True)) if capacity else []:
        count = draw(st.integers(1, 3))
        slot = taken.acquire(count)
        if slot is None:
            break
        t = slotted(name, slot, count, port=NAMES.index(name) + 1)
        live_targets.append(t)
        for s in t.block():
            if draw(st.booleans()):
                filled[s] = next(rng_cookie)
    old_rules = RuleSet()
    for i, t in enumerate(live_targets):
        old_rules.add(make_rule("tcp", f"192.0.2.{i}", "all", target=t.name))
    live = (
        Live(
            {k: (r.action, r.target, r.on_missing) for k, r in old_rules.rules.items()},
            {t.name: t for t in live_targets},
            filled,
            capacity,
            1,
            draw(st.booleans()),
        )
        if capacity
        else NOTHING
    )
    new_rules = RuleSet()
    wants: dict[str, Want] = {}
    for j, name in enumerate(draw(st.lists(st.sampled_from(NAMES), unique=True))):
        old = live.targets.get(name)
        kind = draw(st.sampled_from(["same", "new", "gone", "moved"] if old else ["new"]))
        port = NAMES.index(name) + 1
        if kind in ("same", "moved") and old is not None:
            members = tuple(Member(c, V4) for c in live.alive(old))
            port += 100 if kind == "moved" else 0  # another address of the same sockets
        elif kind == "gone":
            members = ()
        else:
            members = tuple(Member(next(rng_cookie), V4) for _ in range(draw(st.integers(1, 3))))
        wants[name] = Want(name, "tcp", LO, port, members)
        new_rules.add(make_rule("tcp", f"198.51.100.{j}", "all", target=name))
    if draw(st.booleans()):
        new_rules.add(make_rule("tcp", "203.0.113.0/24", "all", drop=True))
    return live, new_rules, wants, draw(st.sampled_from([4, 8, 1024]))


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_plan_properties(case: tuple[Live, RuleSet, dict[str, Want], int]) -> None:
    live, rs, wants, minimum = case
    try:
        p = make_plan(live, rs, wants, min_capacity=minimum)
    except NotFound:
        # only for a target that needs a socket and has none
        assert any(
            not w.members and (w.name not in live.targets or live.targets[w.name].port != w.port)
            for w in wants.values()
        )
        return
    used = rs.targets_in_use()
    assert set(p.targets) == used
    # the new generation's blocks: disjoint, inside the map
    seen: set[int] = set()
    for t in p.targets.values():
        assert t.slot >= 0 and t.slot + t.slots <= p.capacity
        assert not seen & set(t.block())
        seen |= set(t.block())
    in_new = {s for t in p.targets.values() for s in t.block()}
    assert set(p.fills) <= in_new
    live_slots = {s for t in live.targets.values() for s in t.block()}
    if not p.new_map:
        # fresh blocks never touch a live block: the old generation's lookups are undisturbed
        # until the switch; afterwards exactly the live blocks no longer used are emptied
        assert not set(p.fills) & live_slots
        assert set(p.frees) == live_slots - in_new
        assert p.capacity == live.capacity
    else:
        assert p.frees == []
        assert p.capacity >= 2 * len(in_new) and p.capacity & (p.capacity - 1) == 0
    changed = {c.name for c in p.target_changes}
    for name, t in p.targets.items():
        w, old = wants[name], live.targets.get(name)
        assert (t.proto, t.addr, t.port, t.exact) == (w.proto, w.addr, w.port, w.exact)
        cookies = [p.fills.get(s) for s in t.block()]
        if name in changed:  # registered afresh: its sockets fill its new block
            assert w.members and cookies == [m.cookie for m in w.members]
            continue
        # kept: what was found is what lives there (or nothing was found)
        assert old is not None and (old.proto, old.addr, old.port) == (w.proto, w.addr, w.port)
        assert {m.cookie for m in w.members} in (set(), set(live.alive(old)))
        if p.new_map:  # copied into the new map, member by member
            assert cookies == [live.filled.get(s) for s in old.block()]
        else:
            assert t == old and cookies == [None] * t.slots
    # the difference rebuilds the new rule set from the old one
    rebuilt = {k: Rule(k, *eff) for k, eff in live.rules.items()}
    for r in p.removed:
        del rebuilt[r.key]
    for r in p.added:
        rebuilt[r.key] = r
    for _old, r in p.changed:
        rebuilt[r.key] = r
    assert rebuilt == rs.rules
    assert p.noop == (
        not (p.added or p.removed or p.changed)
        and all(live.targets.get(n) == t for n, t in p.targets.items())
        and set(live.targets) == used
        and (live.attached or not (live.capacity or rs.rules))
    )


def test_rule_keys_and_effects_are_what_the_diff_compares() -> None:
    """A drop rule and a steering rule with the same key differ; so do on_missing values."""
    key = RuleKey("tcp", ipaddress.ip_network("192.0.2.0/24"), 1, 65535)
    live = Live({key: (STEER, "web", "drop")}, {"web": slotted("web", 0)}, {0: 1}, 8, 1, True)
    for new in (Rule(key, DROP), Rule(key, STEER, "web", "pass")):
        p = make_plan(live, RuleSet({key: new}), {"web": want("web", 1)})
        assert [b for _a, b in p.changed] == [new]


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_a_plan_that_keeps_the_live_rules_as_they_are(
    case: tuple[Live, RuleSet, dict[str, Want], int],
) -> None:
    """make_plan(live, None, wants) (apply of the file the live rules came from) decides what
    make_plan(live, the live rules, wants) decides, without comparing or decoding the rules
    unless it must commit."""
    live, _rs, wants, minimum = case
    same = live_rules(live)
    for name, t in live.targets.items():  # every live target wanted: the scenario's, or kept
        wants.setdefault(name, Want(name, t.proto, t.addr, t.port, ()))
    try:
        want_plan = make_plan(live, same, wants, min_capacity=minimum)
    except (NotFound, TargetMismatch) as e:
        with pytest.raises(type(e)):
            make_plan(live, None, wants, min_capacity=minimum)
        return
    looked: list[bool] = []
    lazy = Live(
        LazyEffects(lambda: (looked.append(True), dict(live.rules))[1], len(live.rules)),
        live.targets,
        live.filled,
        live.capacity,
        live.generation,
        live.attached,
        "digest",
    )
    p = make_plan(lazy, None, wants, min_capacity=minimum)
    for f in ("targets", "fills", "frees", "capacity", "new_map", "attach", "target_changes"):
        assert getattr(p, f) == getattr(want_plan, f), f
    assert p.noop == want_plan.noop and not (p.added or p.removed or p.changed)
    assert p.source == "digest"
    if p.noop:
        assert not looked  # nothing decoded
    else:
        assert p.rules.rules == same.rules


def _families_reference(rules: RuleSet, sockets: dict[str, tuple[int, bool]]) -> object:
    """The check as it was written first: the first rule of each (target, version), in the
    order they appear, each checked against its target's socket."""
    firsts: dict[tuple[str, int], RuleKey] = {}
    for key, rule in rules.rules.items():
        if rule.target is not None:
            firsts.setdefault((rule.target, key.version), key)
    for (name, version), key in firsts.items():
        family, v6only = sockets[name]
        if (version == 6 and family == V4) or (version == 4 and family == V6 and v6only):
            return (name, key)
    return None


@settings(max_examples=300, deadline=None)
@given(
    picks=st.lists(
        st.tuples(st.integers(0, 5), st.sampled_from(["a", "b", "c", None])), max_size=12
    ),
    kinds=st.tuples(*[st.sampled_from([(V4, False), (V6, False), (V6, True)])] * 3),
)
def test_families_name_the_rule_the_first_check_named(
    picks: list[tuple[int, str | None]], kinds: tuple[tuple[int, bool], ...]
) -> None:
    """Which rule a family mismatch names: the first that may not go to its target (the
    check scans the rules only when some target refuses a version)."""
    prefixes = ["192.0.2.0/24", "2001:db8::/64", "198.51.100.7", "2001:db8::1", "0.0.0.0/0", "::/0"]
    rs = RuleSet()
    for i, (p, target) in enumerate(picks):
        rule = make_rule("tcp", prefixes[p], str(1000 + i), target=target, drop=target is None)
        rs.rules[rule.key] = rule
    sockets = dict(zip("abc", kinds, strict=True))
    wants = {n: want(n, 1, family=f, v6only=v) for n, (f, v) in sockets.items()}
    expected = _families_reference(rs, sockets)
    try:
        make_plan(NOTHING, rs, wants)
    except TargetMismatch as e:
        assert (e.target, e.rule) == expected
    else:
        assert expected is None
