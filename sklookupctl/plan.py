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

import dataclasses
import socket
from collections.abc import Callable, ItemsView, Iterator, KeysView, Mapping, ValuesView
from dataclasses import dataclass, field
from typing import Any

from . import slots as slotsmod
from .errors import NotFound, RuleConflict, TargetMismatch
from .rules import DROP, IPAddress, Rule, RuleKey, RuleSet, format_endpoint

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
    plan that keeps them as they are never looks)."""

    def __init__(self, decode: Callable[[], dict[RuleKey, Effect]], count: int) -> None:
        self._decode: Callable[[], dict[RuleKey, Effect]] | None = decode
        self._rules: dict[RuleKey, Effect] = {}
        self.count = count

    @property
    def rules(self) -> dict[RuleKey, Effect]:
        if self._decode is not None:
            self._rules, self._decode = self._decode(), None
        return self._rules

    def __getitem__(self, key: RuleKey) -> Effect:
        return self.rules[key]

    def __iter__(self) -> Iterator[RuleKey]:
        return iter(self.rules)

    def __len__(self) -> int:
        return self.count

    # the dict's own, in C (Mapping's would look every key up again, in Python)
    def __contains__(self, key: object) -> bool:
        return key in self.rules

    def get(self, key: RuleKey, default: Any = None) -> Any:
        return self.rules.get(key, default)

    def items(self) -> ItemsView[RuleKey, Effect]:
        return self.rules.items()

    def keys(self) -> KeysView[RuleKey]:
        return self.rules.keys()

    def values(self) -> ValuesView[Effect]:
        return self.rules.values()


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
    if not live.capacity and (rules is None or not rules.rules):
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
    for key, rule in rules.rules.items():
        target = rule.target
        if target is not None and (why := refused.get((target, key.version))) is not None:
            raise TargetMismatch(f"{why[0]} {key}", why[1], target, key)


def _diff_rules(plan: Plan, old: Mapping[RuleKey, Effect], new: RuleSet) -> None:
    """Added and changed rules in the new set's order, removed ones in the old set's."""
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
    """The live rule set as Rule objects (to edit one rule of it)."""
    out = RuleSet()
    effects = live.rules.rules if isinstance(live.rules, LazyEffects) else live.rules
    new = tuple.__new__  # Rule() checks what a generation's record already guarantees
    out.rules = {
        key: new(Rule, (key, action, None if action == DROP else target, on_missing))
        for key, (action, target, on_missing) in effects.items()
    }
    return out
