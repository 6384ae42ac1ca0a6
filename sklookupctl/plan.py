"""The write pipeline's decision: desired state -> Plan. Pure Python, no kernel.

Every change to a namespace (attach, detach, apply) is the same three steps:

    desired rule set + targets  --make_plan-->  Plan  --Dispatcher.commit-->  live

`make_plan` compares what is live (a `Live` snapshot, read by the store) with what is wanted
(a RuleSet and a `Want` per target, its sockets found by sockets.Discovery) and decides
everything: the difference, which targets keep their SOCKMAP slots and which get fresh ones,
which slots to fill before the switch and which to empty after it, and whether the SOCKMAP must
grow. The commit only carries the plan out, in the order that keeps every lookup on the old or
the new rule set.

A target whose sockets change always gets a fresh block of slots, filled before the switch, so
the old rules reach the old sockets until the switch; its old block is emptied after it.
"""

from __future__ import annotations

import bisect
import dataclasses
import socket
from array import array
from collections.abc import (
    Callable,
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    Mapping,
    ValuesView,
)
from dataclasses import dataclass, field
from typing import Any

from . import layout
from . import slots as slotsmod
from .errors import NotFound, RuleConflict, TargetMismatch
from .record import RULE
from .rules import (
    DROP,
    PROTO_NAMES,
    STEER,
    IPAddress,
    Rule,
    RuleKey,
    RuleSet,
    format_endpoint,
    no_rule,
)

Effect = tuple[str, str | None, str]  # (action, target, on_missing) of a rule


@dataclass(frozen=True)
class Slotted:
    """A target as a generation records it: its name, the address it was declared with, the
    family of its sockets, and its block of SOCKMAP slots."""

    name: str
    proto: str
    family: int
    addr: IPAddress
    port: int
    slot: int
    slots: int
    exact: bool = False  # reuseport "exact": this socket only, not the kernel's pick in its group
    v6only: bool = False
    waiting: bool = False  # loaded before any socket was registered (allow_missing)

    @property
    def endpoint(self) -> str:
        return format_endpoint(self.addr, self.port)

    def block(self) -> range:
        return range(self.slot, self.slot + self.slots)


class LazyEffects(Mapping[RuleKey, Effect]):
    """A generation's rules, decoded when first looked at (a large set takes a while, and a
    plan that keeps them as they are never looks). With the generation's rules map
    (`records`, read when first needed) and its targets' `names`, single rules are found
    without decoding the set: the records are in rule-number order, which is the order of
    `_order` (compile_rules numbers them so), so a binary search finds any key."""

    def __init__(
        self,
        decode: Callable[[], dict[RuleKey, Effect]],
        count: int,
        records: Callable[[], bytes | None] | None = None,
        names: list[str] | None = None,
    ) -> None:
        self._decode: Callable[[], dict[RuleKey, Effect]] | None = decode
        self._rules: dict[RuleKey, Effect] = {}
        self.count = count
        self._records: Callable[[], bytes | None] | None = records
        self._raw: bytes | None = None
        self.names = names or []

    @property
    def rules(self) -> dict[RuleKey, Effect]:
        if self._decode is not None:
            self._rules, self._decode = self._decode(), None
        return self._rules

    @property
    def searchable(self) -> bool:
        """Whether single rules are found in the records: not decoded yet, and `records` gave
        them (it gives None for records it cannot vouch are in order)."""
        if self._decode is None or self._records is None:
            return False
        if self._raw is None:
            self._raw = self._records()
            if self._raw is None:
                self._records = None
                return False
        return True

    def raw(self) -> bytes:
        """The generation's rules map (record 0 unused), when `records` gave it."""
        if self._raw is None and self._records is not None:
            self._raw = self._records()
        assert self._raw is not None, "no records to search"
        return self._raw

    def number(self, key: RuleKey) -> int:
        """The rule number of `key` (0: no such rule), by a binary search of the records."""
        raw = self.raw()
        want = _order(key)
        at = bisect.bisect_left(range(1, self.count + 1), want, key=lambda i: _record_order(raw, i))
        return at + 1 if at < self.count and _record_order(raw, at + 1) == want else 0

    def find(self, key: RuleKey) -> Effect | None:
        if not self.searchable:
            return self.rules.get(key)
        n = self.number(key)
        return _record_effect(self.raw(), n, self.names) if n else None

    def same_prefix(self, key: RuleKey) -> list[RuleKey]:
        """The keys of the rules of `key`'s protocol and prefix."""
        if not self.searchable:
            k = key
            return [
                o
                for o in self.rules
                if (o.proto, o.version, o.net, o.plen) == (k.proto, k.version, k.net, k.plen)
            ]
        raw, count = self.raw(), self.count
        head = _order(key)[:4]
        first = bisect.bisect_left(
            range(1, count + 1), head, key=lambda i: _record_order(raw, i)[:4]
        )
        out = []
        for i in range(first + 1, count + 1):
            if _record_order(raw, i)[:4] != head:
                break
            out.append(_record_key(raw, i))
        return out

    def uses(self, name: str) -> int:
        """How many rules steer to the target `name`."""
        if not self.searchable:
            return sum(1 for _a, target, _m in self.rules.values() if target == name)
        if name not in self.names:
            return 0
        t = self.names.index(name)
        body = self.raw()[_RULE.size : (self.count + 1) * _RULE.size]
        n = array("I", body)[3 :: _RULE.size // 4].count(t)  # the records' target field
        if t == 0:
            n -= body[3 :: _RULE.size].count(_DROP)  # a drop rule's record names target 0
        return n

    def __getitem__(self, key: RuleKey) -> Effect:
        return self.rules[key]

    def __iter__(self) -> Iterator[RuleKey]:
        return iter(self.rules)

    def __len__(self) -> int:
        return self.count

    # the dict's own, in C (Mapping's would look every key up again, in Python)
    def __contains__(self, key: object) -> bool:
        if self.searchable and isinstance(key, RuleKey):
            return bool(self.number(key))
        return key in self.rules

    def get(self, key: RuleKey, default: Any = None) -> Any:
        return self.rules.get(key, default)

    def items(self) -> ItemsView[RuleKey, Effect]:
        return self.rules.items()

    def keys(self) -> KeysView[RuleKey]:
        return self.rules.keys()

    def values(self) -> ValuesView[Effect]:
        return self.rules.values()


_RULE = RULE  # a generation's rules map: struct layout.RuleRecord
_DROP = layout.ACTION_DROP


def _order(key: RuleKey) -> tuple[str, int, int, int, int, int]:
    """Rule-number order: compile_rules' (protocol, version, network, length, lo, -hi)."""
    return key.proto, key.version, key.net, key.plen, key.lo, -key.hi


def _record_key(raw: bytes, i: int) -> RuleKey:
    proto, family, plen, _a, _m, lo, hi, _t, addr = _RULE.unpack_from(raw, i * _RULE.size)
    if family == socket.AF_INET:
        return RuleKey.of(PROTO_NAMES[proto], 4, int.from_bytes(addr[:4], "big"), plen, lo, hi)
    return RuleKey.of(PROTO_NAMES[proto], 6, int.from_bytes(addr, "big"), plen, lo, hi)


def _record_order(raw: bytes, i: int) -> tuple[str, int, int, int, int, int]:
    return _order(_record_key(raw, i))


def _record_effect(raw: bytes, i: int, names: list[str]) -> Effect:
    _p, _f, _l, action, miss, _lo, _hi, target, _addr = _RULE.unpack_from(raw, i * _RULE.size)
    if action == _DROP:
        return (DROP, None, "drop")
    return (STEER, names[target], "pass" if miss == layout.MISSING_PASS else "drop")


class LiveEdit(RuleSet):
    """The live rule set with a few rules added, replaced or removed (attach, detach): the
    edits are kept apart from the live rules, which are looked up one by one in the
    generation's records (LazyEffects) rather than decoded, unless something needs the whole
    set (`rules` then makes it, once). make_plan diffs the edits alone, and the commit builds
    a large set's tables from the records and the edits (vector.build_edited)."""

    def __init__(self, base: LazyEffects) -> None:  # RuleSet.__init__ not called: no dict
        self.base = base
        self.edits: dict[RuleKey, Rule | None] = {}  # None: removed
        self._whole: dict[RuleKey, Rule] | None = None
        self._live: dict[RuleKey, Rule | None] = {}  # the live rules looked up so far
        self.replaced = False  # `rules` was given a whole other set: the edits say nothing

    @property
    def rules(self) -> dict[RuleKey, Rule]:
        if self._whole is None:
            whole = _as_rules(self.base.rules)
            for key, rule in self.edits.items():
                if rule is None:
                    whole.pop(key, None)
                else:
                    whole[key] = rule
            self._whole = whole
        return self._whole

    @rules.setter
    def rules(self, value: dict[RuleKey, Rule]) -> None:
        self._whole, self.replaced = value, True

    @property
    def whole(self) -> bool:
        """Whether the whole set was made (`rules` was looked at)."""
        return self._whole is not None

    def live(self, key: RuleKey) -> Rule | None:
        """The live rule of `key` (before the edits)."""
        if key not in self._live:
            effect = self.base.find(key)
            self._live[key] = None if effect is None else Rule(key, *effect)
        return self._live[key]

    def get(self, key: RuleKey) -> Rule | None:
        if self._whole is not None:
            return self._whole.get(key)
        if key in self.edits:
            return self.edits[key]
        return self.live(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, RuleKey) and self.get(key) is not None

    def __len__(self) -> int:
        if self._whole is not None:
            return len(self._whole)
        n = self.base.count
        for key, rule in self.edits.items():
            n += (rule is not None) - (self.live(key) is not None)
        return n

    def same_prefix(self, key: RuleKey) -> Iterator[RuleKey]:
        if self._whole is not None:
            yield from super().same_prefix(key)
            return
        k = key
        for o in self.base.same_prefix(key):
            if o not in self.edits:
                yield o
        for o, rule in self.edits.items():
            if rule is not None and (o.proto, o.version, o.net, o.plen) == (
                k.proto,
                k.version,
                k.net,
                k.plen,
            ):
                yield o

    def add(self, rule: Rule, replace: bool = False) -> bool:
        if not self.check_add(rule, replace):
            return False
        self._put(rule.key, rule)
        return True

    def remove(self, key: RuleKey) -> Rule:
        rule = self.get(key)
        if rule is None:
            raise no_rule(key)
        self._put(key, None)
        return rule

    def _put(self, key: RuleKey, rule: Rule | None) -> None:
        self.edits[key] = rule
        if self._whole is not None:
            if rule is None:
                self._whole.pop(key, None)
            else:
                self._whole[key] = rule

    def changes(self) -> tuple[list[int], list[Rule]]:
        """The numbers of the live rules the edits remove or replace, and the rules they
        add or put in their place (what vector.build_edited takes); base searchable."""
        gone = [self.base.number(k) for k in self.edits if self.live(k) is not None]
        return gone, [r for r in self.edits.values() if r is not None]

    def targets_in_use(self) -> set[str]:
        if self._whole is not None or not self.base.searchable:
            return super().targets_in_use()
        # the live generation's targets are exactly those its rules use: only a target that
        # the edits take rules from may fall out of use
        delta: dict[str, int] = {}
        for key, rule in self.edits.items():
            for r, d in ((self.live(key), -1), (rule, 1)):
                if r is not None and r.target is not None:
                    delta[r.target] = delta.get(r.target, 0) + d
        used = set(self.base.names) | {t for t, d in delta.items() if d > 0}
        return {t for t in used if delta.get(t, 0) >= 0 or self.base.uses(t) + delta[t] > 0}


@dataclass(frozen=True)
class Live:
    """What is live in a namespace, as the store read it."""

    rules: Mapping[RuleKey, Effect]  # in rule-number order
    targets: dict[str, Slotted]
    filled: dict[int, int]  # slot -> cookie of the socket in it, for the slots holding one
    capacity: int  # slots of the SOCKMAP (0: there is none yet)
    generation: int
    attached: bool  # the link runs the live generation in the namespace
    source: str = ""  # the digest of the rule file its rules were read from (apply), if any

    def alive(self, t: Slotted) -> list[int]:
        """Cookies of the target's sockets that are still there, in slot order."""
        return [self.filled[s] for s in t.block() if s in self.filled]


NOTHING = Live({}, {}, {}, 0, 0, False)


@dataclass(frozen=True)
class Member:
    """A socket found for a target (sockets.Discovery)."""

    cookie: int
    family: int
    v6only: bool = False


@dataclass(frozen=True)
class Want:
    """A target as the caller wants it. `members` are the sockets found for it now, in slot
    order: one socket, or the members of its reuseport group. No members: none was found, and
    the target stays as registered (its rules act as on_missing says) if it is otherwise
    unchanged; a new or changed target needs a socket."""

    name: str
    proto: str
    addr: IPAddress
    port: int
    members: tuple[Member, ...]
    exact: bool = False
    wait: bool = False  # a new target may be loaded without a socket: it waits for one


@dataclass(frozen=True)
class TargetChange:
    name: str
    old: Slotted | None  # None: a new target
    new: Slotted | None  # None: removed (no rule uses it any more)
    why: str  # new | address | protocol | reuseport | socket | members | removed


@dataclass
class Plan:
    rules: RuleSet  # the new rule set (the live one, decoded, for a plan that keeps it)
    targets: dict[str, Slotted]  # the new generation's targets: exactly those its rules use
    fills: dict[int, int]  # slot -> cookie: sockets to put in before the switch
    frees: list[int]  # slots to empty after the switch (in the same SOCKMAP)
    capacity: int  # slots of the SOCKMAP the new generation uses
    new_map: bool  # a new SOCKMAP (the first, or a larger one): `fills` has every live socket
    attach: bool  # the link must be made (the first generation, or the link was detached)
    added: list[Rule] = field(default_factory=list)
    removed: list[Rule] = field(default_factory=list)
    changed: list[tuple[Rule, Rule]] = field(default_factory=list)  # (old, new)
    target_changes: list[TargetChange] = field(default_factory=list)
    kept_missing: list[str] = field(default_factory=list)  # targets kept with no live socket
    source: str = ""  # the digest of the rule file `rules` were read from (apply), if any

    @property
    def rules_differ(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    @property
    def noop(self) -> bool:
        """Nothing to do: the live generation is already this plan."""
        return not (self.rules_differ or self.target_changes or self.attach or self.new_map)


def make_plan(
    live: Live,
    rules: RuleSet | None,
    wants: dict[str, Want],
    *,
    min_capacity: int = slotsmod.MIN_CAPACITY,
) -> Plan:
    """Decide how to go from `live` to `rules` with the targets in `wants` (names the rules do
    not use are ignored). Raises TargetMismatch, NotFound or RuleConflict; changes nothing.

    `rules` None: the live rules, as they are (apply of the file they were read from): they
    are not compared, nor decoded unless the plan changes something else."""
    same = rules is None
    # a generation's targets are exactly those its rules use
    used = set(live.targets) if rules is None else rules.targets_in_use()
    if not live.capacity and (rules is None or not len(rules)):
        # nothing, and none wanted (nothing live: no live rules either)
        plan = Plan(rules or RuleSet(), {}, {}, [], 0, new_map=False, attach=False)
        plan.source = live.source if rules is None else ""
        return plan
    for name in sorted(used):
        if name not in wants:
            raise NotFound(f"no target {name!r}", "declare the target of every rule")
    # which targets keep their block, which need a fresh one
    keep: dict[str, Slotted] = {}
    fresh: dict[str, tuple[Want, str]] = {}
    kept_missing: list[str] = []
    for name in sorted(used):
        want, old = wants[name], live.targets.get(name)
        why = _why_fresh(live, old, want)
        if why is None:
            assert old is not None
            keep[name] = old
            if not live.alive(old):
                kept_missing.append(name)
        elif not want.members and want.wait:
            fresh[name] = (want, why)  # one empty slot: its rules act as missing meanwhile
        elif not want.members:
            raise NotFound(
                f"no socket for target {name} at {format_endpoint(want.addr, want.port)}",
                "start the proxy first",
            )
        elif len(want.members) > slotsmod.MAX_CAPACITY:
            raise RuleConflict(f"target {name} has {len(want.members)} sockets: too many")
        else:
            fresh[name] = (want, why)
    if rules is None and fresh:
        rules = live_rules(live)  # kept targets took these rules already: fresh ones may not
    if rules is not None:
        _check_families(rules, keep, {n: w for n, (w, _) in fresh.items()})

    need = sum(t.slots for t in keep.values()) + sum(_size(w) for w, _ in fresh.values())
    targets, fills, frees, capacity, new_map = _assign(live, keep, fresh, need, min_capacity)

    attach = not live.attached
    plan = Plan(rules or RuleSet(), targets, fills, frees, capacity, new_map, attach)
    plan.kept_missing = kept_missing
    if not same:
        assert rules is not None
        _diff_rules(plan, live.rules, rules)
    for name in sorted(used):
        if name in fresh:
            plan.target_changes.append(
                TargetChange(name, live.targets.get(name), targets[name], fresh[name][1])
            )
    for name in sorted(set(live.targets) - used):
        plan.target_changes.append(TargetChange(name, live.targets[name], None, "removed"))
    if same:
        plan.source = live.source  # still the rules of that file
        if not plan.noop:
            plan.rules = live_rules(live)  # the commit writes them again
        # (a plan that does nothing holds no rules: it is never committed)
    return plan


def _why_fresh(live: Live, old: Slotted | None, want: Want) -> str | None:
    """Why the target needs a fresh block of slots; None when it keeps the one it has."""
    if old is None:
        return "new"
    if old.proto != want.proto:
        return "protocol"
    if (old.addr, old.port) != (want.addr, want.port):
        return "address"
    if old.exact != want.exact:
        return "reuseport"
    if not want.members:
        return None  # nothing listens now: keep what was registered (its rules act as missing)
    if {m.cookie for m in want.members} == set(live.alive(old)):
        return None
    return "members" if len(want.members) > 1 or old.slots > 1 else "socket"


def _size(want: Want) -> int:
    """Slots of a fresh block: one per member; one for a target waiting for its socket."""
    return max(1, len(want.members))


def _family(want: Want) -> tuple[int, bool]:
    """(family, v6only) of the target's sockets: its first member's, or for one waiting, what
    its declared address says (an IPv6 address: a dual-stack socket)."""
    if want.members:
        return want.members[0].family, want.members[0].v6only
    return (socket.AF_INET6 if want.addr.version == 6 else socket.AF_INET), False


def _slotted(want: Want, slot: int) -> Slotted:
    family, v6only = _family(want)
    return Slotted(
        want.name,
        want.proto,
        family,
        want.addr,
        want.port,
        slot,
        _size(want),
        want.exact,
        v6only,
        waiting=not want.members,
    )


def _assign(
    live: Live,
    keep: dict[str, Slotted],
    fresh: dict[str, tuple[Want, str]],
    need: int,
    min_capacity: int,
) -> tuple[dict[str, Slotted], dict[int, int], list[int], int, bool]:
    """(targets, fills, frees, capacity, new map): fresh blocks in the live SOCKMAP when they
    fit beside every live block (the live ones are in use until the switch), otherwise a new
    SOCKMAP sized for the final state, into which the kept sockets are copied."""
    if live.capacity:
        taken = slotsmod.Slots(live.capacity, [(t.slot, t.slots) for t in live.targets.values()])
        targets = dict(keep)
        fills: dict[int, int] = {}
        fits = True
        for name, (want, _why) in fresh.items():
            slot = taken.acquire(_size(want))
            if slot is None:
                fits = False
                break
            targets[name] = _slotted(want, slot)
            for i, m in enumerate(want.members):
                fills[slot + i] = m.cookie
        if fits:
            frees = sorted(
                s for n, t in live.targets.items() if keep.get(n) != t for s in t.block()
            )
            return targets, fills, frees, live.capacity, False
    # a new SOCKMAP: every target packed from slot 0, every live socket copied
    capacity = slotsmod.capacity_for(need, min_capacity)
    if capacity > slotsmod.MAX_CAPACITY:
        raise RuleConflict(
            f"the targets need {need} socket slots, more than {slotsmod.MAX_CAPACITY}",
            "use fewer targets",
        )
    targets, fills, at = {}, {}, 0
    for name in sorted(set(keep) | set(fresh)):
        if name in keep:
            old = keep[name]
            targets[name] = dataclasses.replace(old, slot=at)
            for i, s in enumerate(old.block()):
                if s in live.filled:
                    fills[at + i] = live.filled[s]
        else:
            want = fresh[name][0]
            targets[name] = _slotted(want, at)
            for i, m in enumerate(want.members):
                fills[at + i] = m.cookie
        at += targets[name].slots
    return targets, fills, [], capacity, True


def _check_families(rules: RuleSet, keep: dict[str, Slotted], fresh: dict[str, Want]) -> None:
    """Every steering rule's target must be able to take its IP version: no IPv6 rule on an
    IPv4 socket, no IPv4 rule on an IPv6-only socket. The rules are scanned only when some
    target cannot take one of the versions, and the first rule that may not go there is named
    (a dual-stack socket takes both: nothing to scan)."""
    refused: dict[tuple[str, int], tuple[str, str]] = {}  # (target, version) -> (where, hint)
    for name in {**keep, **fresh}:
        if name in fresh:
            w = fresh[name]
            family, v6only = _family(w)
            where = format_endpoint(w.addr, w.port)
        else:
            t = keep[name]
            family, v6only, where = t.family, t.v6only, t.endpoint
        if family == socket.AF_INET:
            refused[name, 6] = (
                f"the socket at {where} is IPv4 and cannot take IPv6 rule",
                "use an IPv6 socket for IPv6 prefixes",
            )
        elif v6only:
            refused[name, 4] = (
                f"the socket at {where} is IPv6-only (IPV6_V6ONLY) and cannot take IPv4 rule",
                "use an IPv4 socket, or a dual-stack IPv6 one bound to [::]",
            )
    if not refused:
        return
    scan: Iterable[tuple[RuleKey, Rule]] | None = None
    # the live rules of a target that keeps its sockets were checked when they were committed:
    # only the edits may not fit, unless a target with live rules gets other sockets (then
    # every rule is looked at)
    if (
        isinstance(rules, LiveEdit)
        and not rules.replaced
        and not any(rules.base.uses(name) for name in fresh)
    ):
        scan = [(k, r) for k, r in rules.edits.items() if r is not None]
    for key, rule in rules.rules.items() if scan is None else scan:
        target = rule.target
        if target is not None and (why := refused.get((target, key.version))) is not None:
            raise TargetMismatch(f"{why[0]} {key}", why[1], target, key)


def _diff_rules(plan: Plan, old: Mapping[RuleKey, Effect], new: RuleSet) -> None:
    """Added and changed rules in the new set's order, removed ones in the old set's."""
    if isinstance(new, LiveEdit) and new.base is old and not new.replaced:
        # the live rules edited: only the edits can differ (in the orders above: added ones
        # as they were made, changed and removed ones by rule number)
        changed, removed = [], []
        for key, rule in new.edits.items():
            was = new.live(key)
            if was is None:
                if rule is not None:
                    plan.added.append(rule)
            elif rule is None:
                removed.append(was)
            elif (was.action, was.target, was.on_missing) != (
                rule.action,
                rule.target,
                rule.on_missing,
            ):
                changed.append((was, rule))
        number = new.base.number if new.base.searchable else list(new.base).index
        plan.changed = sorted(changed, key=lambda c: number(c[0].key))
        plan.removed = sorted(removed, key=lambda r: number(r.key))
        return
    if isinstance(old, LazyEffects):
        old = old.rules  # the dict itself: its lookups in C
    for key, rule in new.rules.items():
        effect = old.get(key)
        if effect is None:
            plan.added.append(rule)
        elif effect != (rule.action, rule.target, rule.on_missing):
            plan.changed.append((Rule(key, *effect), rule))
    plan.removed = [Rule(k, *eff) for k, eff in old.items() if k not in new.rules]


def live_rules(live: Live) -> RuleSet:
    """The live rule set, to edit (a LiveEdit of a generation's rules), or as Rule objects."""
    if isinstance(live.rules, LazyEffects):
        return LiveEdit(live.rules)
    return RuleSet(_as_rules(live.rules))


def _as_rules(effects: Mapping[RuleKey, Effect]) -> dict[RuleKey, Rule]:
    new = tuple.__new__  # Rule() checks what a generation's record already guarantees
    return {
        key: new(Rule, (key, action, None if action == DROP else target, on_missing))
        for key, (action, target, on_missing) in effects.items()
    }
