"""Live decisions: what the dispatcher decides for each lookup, as it happens (`trace`).

Tracing is opt-in and costs nothing when off: the program the link normally runs is compiled
without SKL_TRACE (bpf/dispatcher.c), so it holds no tracing instruction at all. `Trace` swaps
in a traced copy of the live generation's program (the same maps, plus a ring buffer its
decisions go to) with one BPF_LINK_UPDATE, and swaps the plain one back when it ends (also on
Ctrl-C and SIGTERM: the CLI turns them into exceptions). If the tracer is killed, the next
sklookupctl command puts the plain program back (store.Dispatcher.untrace).

A writer that changes the rule set while a trace runs first puts the plain program back; the
trace notices and traces the new generation (the lookups in between are not traced: it says
so).
"""

from __future__ import annotations

import ipaddress
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import interrupts, layout, store, trust
from .errors import Busy, EnvironmentProblem, NotLoaded
from .netns import Netns
from .rules import PROTOCOLS, IPAddress, IPNetwork, Rule, format_ports

RING_SIZE = 1 << 21  # bytes: 32k decisions of 64 bytes between two reads
POLL = 0.2  # seconds between checks that the traced copy still runs
NAMES = {v: k for k, v in PROTOCOLS.items()}
VERDICTS = ("steer", "drop", "pass")


@dataclass
class Decision:
    """One lookup the dispatcher decided."""

    time: float  # seconds since the epoch
    protocol: str
    source: IPAddress
    source_port: int
    destination: IPAddress
    destination_port: int
    verdict: str  # steer | drop | pass
    reason: str  # layout.WHY
    rule: Rule | None
    target: str | None

    def to_json(self) -> dict[str, Any]:
        r = self.rule
        return {
            "time": round(self.time, 6),
            "protocol": self.protocol,
            "source": str(self.source),
            "source_port": self.source_port,
            "destination": str(self.destination),
            "destination_port": self.destination_port,
            "verdict": self.verdict,
            "reason": self.reason,
            "rule": None
            if r is None
            else {
                "protocol": r.key.proto,
                "prefix": str(r.key.prefix),
                "ports": format_ports(r.key.lo, r.key.hi),
            },
            "target": self.target,
        }


@dataclass
class Filter:
    """Which decisions to show: all of them when a field is empty."""

    prefixes: list[IPNetwork] = field(default_factory=list)  # destination address in one
    ports: list[tuple[int, int]] = field(default_factory=list)  # destination port in one
    verdicts: set[str] = field(default_factory=set)

    def matches(self, d: Decision) -> bool:
        if self.verdicts and d.verdict not in self.verdicts:
            return False
        if self.ports and not any(lo <= d.destination_port <= hi for lo, hi in self.ports):
            return False
        return not self.prefixes or any(
            d.destination.version == p.version and d.destination in p for p in self.prefixes
        )


def _address(family: int, raw: bytes) -> IPAddress:
    return ipaddress.ip_address(raw if family == 10 else raw[:4])


def decode(raw: bytes, rules: list[Rule | None], clock: float) -> Decision:
    """A ring buffer record (layout.Event) as a Decision; `rules` by rule number, `clock` the
    wall time at monotonic 0."""
    ev = layout.Event.from_buffer_copy(raw.ljust(len(bytes(layout.Event())), b"\0"))
    rule = rules[ev.rule] if 0 < ev.rule < len(rules) else None
    steered = ev.why == 1 and ev.verdict == 1
    verdict = "steer" if steered else "drop" if ev.verdict == 0 else "pass"
    return Decision(
        time=clock + ev.time / 1e9,
        protocol=NAMES.get(ev.protocol, str(ev.protocol)),
        source=_address(ev.family, bytes(ev.remote)),
        source_port=ev.remote_port,
        destination=_address(ev.family, bytes(ev.local)),
        destination_port=ev.local_port,
        verdict=verdict,
        reason=layout.WHY[ev.why] if ev.why < len(layout.WHY) else str(ev.why),
        rule=rule,
        target=rule.target if rule is not None and rule.action == "steer" else None,
    )


class Trace:
    """A trace of one namespace's decisions, from `start` to `stop` (a context manager)."""

    def __init__(self, ns: Netns, bpffs: str, wait: float, size: int = RING_SIZE) -> None:
        self.ns = ns
        self.bpffs = bpffs
        self.wait = wait
        self.size = size
        self.tracing: store.Tracing | None = None
        self.rules: list[Rule | None] = [None]
        self.generation = 0
        self.lost = 0  # decisions the ring buffers had no room for, over every generation

    def __enter__(self) -> Trace:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Swap in the traced copy of the live generation (under the lock, like a writer; a
        trace another tracer left running because it was killed is ended first)."""
        with store.session(self.bpffs, self.ns, write=True, wait=self.wait) as s:
            d = s.dispatcher
            if d is None or d.gen is None:
                raise NotLoaded(
                    f"nothing is attached in {self.ns.label}: there is nothing to trace",
                    "attach or apply rules first",
                )
            if d.state != "steering":
                raise EnvironmentProblem(
                    f"the dispatcher in {self.ns.label} is {d.state}: nothing runs to trace",
                    "apply the rules again to attach it",
                )
            running = [t for t in d.trace_dirs().values() if store.tracer_alive(t)]
            if d.tracing is not None or running:
                where = d.tracing or running[0]
                pid = store.tracer_pid(where)
                who = trust.describe_pid(pid) if pid else where
                raise Busy(
                    f"another trace runs in {self.ns.label}: {who}",
                    "one trace per namespace at a time: end the other one first",
                )
            gen = d.gen
            names = [t.name for t in gen.targets()]
            self.rules = [None] + [Rule(k, *eff) for k, eff in gen.effects(names).items()]
            self.generation = int(gen.meta().generation)
            self.tracing = d.trace(self.size)

    def stop(self) -> None:
        """Swap the plain program back (SIGINT and SIGTERM wait until it is done, and are then
        acted on: one that came meanwhile still ends the trace)."""
        t = self.tracing
        if t is None:
            return
        interrupts.hold()
        try:
            self.lost += t.lost_count()
            t.stop()
        finally:
            self.tracing = None
            caught = interrupts.release()
        for name in caught:
            signal.raise_signal(signal.Signals[name])

    def _follow(self) -> str:
        """The traced copy no longer runs: a writer changed the rule set (trace the new
        generation), or the dispatcher is gone (end). Returns a note; "" to end."""
        self.stop()
        try:
            self.start()
        except NotLoaded:
            return ""
        except EnvironmentProblem as e:
            if isinstance(e, Busy):
                raise
            return ""
        return (
            f"the rule set changed (generation {self.generation}): tracing it now; "
            "lookups during the change were not traced"
        )

    def decisions(
        self, seconds: float | None = None, flt: Filter | None = None
    ) -> Iterator[Decision | str]:
        """Decisions as they happen (and notes, as str), until `seconds` pass (None: until
        stopped). Ends by itself when the dispatcher is removed or detached."""
        flt = flt or Filter()
        deadline = None if seconds is None else time.monotonic() + seconds
        clock = time.time() - time.monotonic()
        while self.tracing is not None:
            t = self.tracing
            left = POLL if deadline is None else min(POLL, deadline - time.monotonic())
            if left > 0:
                t.events.wait(left)
            for raw in t.events.drain():
                d = decode(raw, self.rules, clock)
                if flt.matches(d):
                    yield d
            if deadline is not None and time.monotonic() >= deadline:
                return
            if not t.running():
                for raw in t.events.drain(limit=1 << 30):
                    d = decode(raw, self.rules, clock)
                    if flt.matches(d):
                        yield d
                note = self._follow()
                if not note:
                    yield f"the dispatcher in {self.ns.label} was removed or detached: trace ends"
                    return
                yield note
