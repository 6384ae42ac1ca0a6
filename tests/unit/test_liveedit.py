"""plan.LiveEdit (the live rules edited by attach and detach: single rules found in the
generation's records by binary search, the edits kept apart) and vector.build_edited (a large
set's tables from the records and the edits) against a plain RuleSet edited the same way:
the same answers and errors for every operation, the same diff, and every map of the new
generation the same bytes. Random rule sets and random edits (SKLOOKUPCTL_VECTOR_ROUNDS)."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import random
import socket
from typing import Any

import pytest

from sklookupctl import image, vector
from sklookupctl.errors import SklookupError
from sklookupctl.plan import LazyEffects, Live, LiveEdit, Member, Plan, Want, _diff_rules, make_plan
from sklookupctl.rules import Rule, RuleSet, make_rule

from .test_vector import TARGETS, shaped

ROUNDS = int(os.environ.get("SKLOOKUPCTL_VECTOR_ROUNDS", "60"))
META = image.MetaInfo(3, 1, 2, "t")


def _live(rs: RuleSet, vectored: bool, in_order: bool = True) -> tuple[LazyEffects, list[Any]]:
    """A generation of `rs` as the store reads it: its rules map searchable (or not)."""
    used = {n: TARGETS[n] for n in rs.targets_in_use()}
    img = image.encode(rs, used, META, vectored=vectored)
    count, raw = img.maps["rules"]
    count -= 1
    names = sorted(used)
    if not in_order:  # records out of order: binary search must not be trusted
        size = image.RULE.size
        recs = [raw[i * size : (i + 1) * size] for i in range(1, count + 1)]
        random.Random(count).shuffle(recs)
        raw = raw[:size] + b"".join(recs)
    assert vector.in_rule_order(raw, count) == (in_order or count < 2 or _sorted(raw, count))
    decoded: list[int] = []

    def decode() -> dict[Any, Any]:
        decoded.append(1)
        return image.decode_rules(raw, count, names)

    records = (lambda: raw if vector.in_rule_order(raw, count) else None) if count else None
    lazy = LazyEffects(decode, count, records, names)
    lazy.plain = RuleSet(  # type: ignore[attr-defined]
        {k: Rule(k, *e) for k, e in image.decode_rules(raw, count, names).items()}
    )
    return lazy, decoded


def _plain(lazy: LazyEffects) -> RuleSet:
    """The live rules as a writer decodes them (in rule-number order), to edit as they are."""
    rs: RuleSet = lazy.plain  # type: ignore[attr-defined]
    return RuleSet(dict(rs.rules))


def _sorted(raw: bytes, count: int) -> bool:
    from sklookupctl.plan import _record_order

    keys = [_record_order(raw, i) for i in range(1, count + 1)]
    return keys == sorted(keys)


def _rule(rng: random.Random, rs: RuleSet) -> Rule:
    """A rule to add: an existing one (same effect or another), one on an existing prefix
    (ranges that nest, are disjoint, or partly overlap), or a new prefix."""
    proto = rng.choice(["tcp", "udp"])
    target = rng.choice([None, f"{proto}-live", f"{proto}-gone"])
    miss = rng.choice(["drop", "pass"]) if target else "drop"
    pick = rng.random()
    if rs.rules and pick < 0.6:
        k = rng.choice(list(rs.rules))
        proto, prefix = k.proto, str(k.prefix)
        target = rng.choice([None, f"{proto}-live", f"{proto}-gone"])
        miss = rng.choice(["drop", "pass"]) if target else "drop"
        if pick < 0.3:
            ports = f"{k.lo}-{k.hi}"
        else:
            lo = rng.choice([k.lo, k.hi, rng.randrange(1, 65536)])
            ports = f"{lo}-{min(65535, lo + rng.choice([0, 5, 500]))}"
    else:
        v = rng.choice([4, 6])
        width = 32 if v == 4 else 128
        plen = rng.choice([0, 8, 24, 32, width])
        net = rng.getrandbits(width) >> (width - plen) << (width - plen) if plen else 0
        prefix = str(ipaddress.ip_network((net, plen)))
        lo = rng.randrange(1, 65536)
        ports = f"{lo}-{min(65535, lo + rng.choice([0, 5, 65535]))}"
    return make_rule(proto, prefix, ports, target=target, drop=target is None, on_missing=miss)


def _outcome(f: Any, *args: Any) -> Any:
    try:
        return ("ok", f(*args))
    except SklookupError as e:
        return (type(e).__name__, e.message, e.hint)


def _edit_both(rng: random.Random, rs: RuleSet, edit: LiveEdit, plain: RuleSet) -> None:
    for _ in range(rng.randrange(1, 7)):
        if rng.random() < 0.6:
            r, replace = _rule(rng, plain), rng.random() < 0.5
            assert _outcome(edit.add, r, replace) == _outcome(plain.add, r, replace), r
        else:
            key = rng.choice(list(rs.rules) or [_rule(rng, rs).key])
            if rng.random() < 0.3:
                key = _rule(rng, rs).key
            assert _outcome(edit.remove, key) == _outcome(plain.remove, key), key
        assert len(edit) == len(plain)
        assert edit.targets_in_use() == plain.targets_in_use()
        for k in rng.sample(list(rs.rules), min(5, len(rs.rules))):
            assert (k in edit) == (k in plain) and edit.get(k) == plain.get(k)


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_edits_of_the_live_rules_answer_and_build_as_a_plain_rule_set(seed: int) -> None:
    rng = random.Random(seed)
    rs = shaped(rng, rng.choice([1, 5, 40, 200]))
    vectored = rng.random() < 0.7
    lazy, decoded = _live(rs, vectored)
    assert lazy.searchable
    edit, plain = LiveEdit(lazy), _plain(lazy)
    _edit_both(rng, rs, edit, plain)
    assert not decoded, "an edit decoded the whole live set"

    # the diff: only the edits, as the plain diff finds them
    ours, theirs = (Plan(RuleSet(), {}, {}, [], 0, False, False) for _ in range(2))
    _diff_rules(ours, lazy, edit)
    assert not decoded
    _diff_rules(
        theirs,
        {k: (r.action, r.target, r.on_missing) for k, r in _plain(lazy).rules.items()},
        plain,
    )
    assert ours.added == theirs.added and ours.removed == theirs.removed
    assert sorted(ours.changed) == sorted(theirs.changed)

    # the new generation, built from the records and the edits (a large set's way)
    used = {n: TARGETS[n] for n in plain.targets_in_use()}
    mine = image.encode(edit, used, META, vectored=True)
    assert not edit.whole and not decoded, "the build made a Rule of every live rule"
    want = image.encode(plain, used, META, vectored=True)
    assert mine.rules == want.rules
    assert mine.maps == want.maps
    assert edit.rules == plain.rules  # and the whole set, when something asks for it


@pytest.mark.parametrize("seed", range(ROUNDS // 4))
def test_records_out_of_order_are_decoded_instead(seed: int) -> None:
    """Records not in rule-number order (another version's numbering, damage): the binary
    search is not used; every answer still comes right, from the decoded set."""
    rng = random.Random(seed)
    rs = shaped(rng, 40)
    lazy, decoded = _live(rs, True, in_order=False)
    assert not lazy.searchable, "shuffled records taken as in order"
    edit, plain = LiveEdit(lazy), _plain(lazy)
    _edit_both(rng, rs, edit, plain)
    used = {n: TARGETS[n] for n in plain.targets_in_use()}
    assert image.encode(edit, used, META, vectored=True).maps == (
        image.encode(plain, used, META, vectored=True).maps
    )
    assert decoded


def test_a_generation_of_no_rules_is_edited_too() -> None:
    lazy, _ = _live(RuleSet(), True)
    edit = LiveEdit(lazy)
    r = make_rule("tcp", "192.0.2.0/24", "80", drop=True)
    assert edit.add(r) and len(edit) == 1 and r.key in edit
    used: dict[str, Any] = {}
    assert image.encode(edit, used, META, vectored=True).maps == (
        image.encode(RuleSet({r.key: r}), used, META, vectored=True).maps
    )


def _family_fits(family: int, v6only: bool, versions: set[int]) -> bool:
    return not ((family == socket.AF_INET and 6 in versions) or (v6only and 4 in versions))


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_plans_of_edits_are_the_plans_of_a_plain_rule_set(seed: int) -> None:
    """make_plan of the live rules edited (a LiveEdit, its family check looking only at the
    edits unless a target with live rules gets other sockets) against make_plan of a plain
    RuleSet edited the same way: the same plan, or the same error naming the same rule."""
    rng = random.Random(9000 + seed)
    rs = shaped(rng, rng.choice([1, 5, 40, 200]))
    lazy, _ = _live(rs, vectored=True)
    kinds = [(socket.AF_INET, False), (socket.AF_INET6, False), (socket.AF_INET6, True)]
    targets, filled = {}, {}
    for i, name in enumerate(sorted(rs.targets_in_use())):
        versions = {k.version for k, r in rs.rules.items() if r.target == name}
        family, v6only = rng.choice([k for k in kinds if _family_fits(*k, versions)])
        t = dataclasses.replace(TARGETS[name], slot=i, slots=1, family=family, v6only=v6only)
        targets[name] = t
        if rng.random() < 0.8:
            filled[i] = 100 + i
    live_lazy = Live(lazy, targets, filled, 64, 3, True)
    live_plain = Live(
        dict(image.decode_rules(lazy.raw(), lazy.count, lazy.names)), targets, filled, 64, 3, True
    )
    edit, plain = LiveEdit(lazy), _plain(lazy)
    _edit_both(rng, rs, edit, plain)
    wants = {}
    for name in TARGETS:
        old = targets.get(name)
        if old is not None and rng.random() < 0.7:  # the same sockets
            members = tuple(Member(c, old.family, old.v6only) for c in live_lazy.alive(old))
        else:  # other sockets, of any family
            family, v6only = rng.choice(kinds)
            members = (Member(500 + len(wants), family, v6only),)
        t = TARGETS[name]
        wants[name] = Want(name, t.proto, t.addr, t.port, members, t.exact)

    def plan_of(live: Live, rules: RuleSet) -> Any:
        try:
            p = make_plan(live, rules, wants)
        except SklookupError as e:
            return (
                type(e).__name__,
                e.message,
                getattr(e, "target", None),
                getattr(e, "rule", None),
            )
        return (
            p.added, p.removed, sorted(p.changed), p.targets, p.fills, sorted(p.frees),
            p.capacity, p.new_map, p.attach, p.target_changes, p.noop,
        )  # fmt: skip

    assert plan_of(live_lazy, edit) == plan_of(live_plain, plain)


def test_a_target_falls_out_of_use_with_its_last_rule() -> None:
    """The first target (index 0 in the records, as drop rules' records say too) and the
    others: in use while a rule steers to them, whatever the drop rules around."""
    rs = RuleSet()
    for prefix, target in [
        ("192.0.2.0/24", "tcp-gone"),  # index 0
        ("192.0.2.0/25", None),
        ("198.51.100.0/24", None),
        ("203.0.113.0/24", "tcp-live"),
        ("203.0.113.0/25", "tcp-live"),
    ]:
        rs.add(make_rule("tcp", prefix, "80", target=target, drop=target is None))
    lazy, decoded = _live(rs, vectored=True)
    assert lazy.uses("tcp-gone") == 1 and lazy.uses("tcp-live") == 2 and lazy.uses("x") == 0
    edit = LiveEdit(lazy)
    assert edit.targets_in_use() == {"tcp-gone", "tcp-live"}
    edit.remove(make_rule("tcp", "203.0.113.0/24", "80", drop=True).key)
    assert edit.targets_in_use() == {"tcp-gone", "tcp-live"}
    edit.remove(make_rule("tcp", "192.0.2.0/24", "80", drop=True).key)
    assert edit.targets_in_use() == {"tcp-live"}
    edit.add(make_rule("tcp", "192.0.2.0/24", "80", target="tcp-gone"))
    assert edit.targets_in_use() == {"tcp-gone", "tcp-live"}
    assert not decoded
