"""Counters across rule-set changes, explored: a hypothesis state machine attaches, re-targets and
detaches rules and runs lookups through the live programs, in two namespaces at once: one through
the paths of small rule sets, one through those of large ones (image.VECTOR_MIN lowered to 1:
tables built with numpy, the counters map made by another thread, counters carried with numpy).
After every step both must show the same counters, per rule and per target, and they must agree
with a plain model: a rule's counters follow it while it exists (and start again from zero when it
comes back), a target's totals only grow, by exactly the lookups its rules took. Some changes are
killed after their switch, before (or after) they carried the counters over: readers then make that
carry themselves, and must show the same. (Lookups by BPF_PROG_TEST_RUN, not connections: a
connection may be looked up more than once, when a segment arrives after its socket is gone.)

Bounded for CI (25 examples of up to 12 steps, the same ones every run); longer with
SKLOOKUPCTL_COUNTERS_EXAMPLES and SKLOOKUPCTL_COUNTERS_STEPS, new examples each run with
SKLOOKUPCTL_MODEL_RANDOM=1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from sklookupctl import image

from .conftest import PREFIXES, machine_settings, throwaway

EXAMPLES = int(os.environ.get("SKLOOKUPCTL_COUNTERS_EXAMPLES", "25"))
STEPS = int(os.environ.get("SKLOOKUPCTL_COUNTERS_STEPS", "12"))

# nested and disjoint prefixes, ranges that nest; what is looked up
RULES = [
    ("192.0.2.0/24", "all"),
    ("192.0.2.0/25", "80"),
    ("192.0.2.7/32", "1000-2000"),
    ("192.0.2.7/32", "1500"),
    ("203.0.113.0/24", "80"),
]
LOOKUPS = [("192.0.2.7", 1500), ("192.0.2.7", 1999), ("192.0.2.7", 80), ("192.0.2.200", 80),
         ("203.0.113.9", 80), ("192.0.2.100", 443)]  # fmt: skip
TARGETS = ("a", "b", "drop")


def _covers(prefix: str, ports: str, addr: str, port: int) -> bool:
    import ipaddress

    if ipaddress.ip_address(addr) not in ipaddress.ip_network(prefix):
        return False
    lo, _, hi = ports.replace("all", "1-65535").partition("-")
    return int(lo) <= port <= int(hi or lo)


def _span(ports: str) -> int:
    lo, _, hi = ports.replace("all", "1-65535").partition("-")
    return int(hi or lo) - int(lo)


@contextlib.contextmanager
def _vector_min(value: int) -> Iterator[None]:
    old = image.VECTOR_MIN
    image.VECTOR_MIN = value
    try:
        yield
    finally:
        image.VECTOR_MIN = old


class Counting(RuleBasedStateMachine):
    def __init__(self, bpffs: str) -> None:
        super().__init__()
        self.stack = contextlib.ExitStack()
        self.small = self.stack.enter_context(throwaway(bpffs, PREFIXES))
        self.large = self.stack.enter_context(throwaway(bpffs, PREFIXES))
        self.ports: dict[tuple[str, str], int] = {}  # (namespace, target) -> its proxy's port
        for n in (self.small, self.large):
            for t in ("a", "b"):
                self.ports[n.name, t] = n.proxy(tcp="127.0.0.1:0", tag=t).port
        self.rules: dict[tuple[str, str], str] = {}  # (prefix, ports) -> target or "drop"
        self.rule_counts: Counter[tuple[str, str, str]] = Counter()  # (prefix, ports, kind)
        self.totals: Counter[tuple[str, str]] = Counter()  # (target, kind)
        self.built = False  # whether the namespaces have a generation (from the first change)

    def teardown(self) -> None:
        self.stack.close()

    def both(self, *args: str, target: str | None = None) -> None:
        for n, vmin in ((self.small, 10**9), (self.large, 1)):
            extra: tuple[str, ...] = ()
            if target is not None:
                extra = ("--to", f"127.0.0.1:{self.ports[n.name, target]}", "--name", target)
            with _vector_min(vmin):
                n.ok(*args, *extra)

    @rule(which=st.sampled_from(RULES), to=st.sampled_from(TARGETS))
    def attach(self, which: tuple[str, str], to: str) -> None:
        target = to
        prefix, ports = which
        if target == "drop":
            self.both("attach", "tcp", prefix, ports, "--drop", "--replace")
        else:
            self.both("attach", "tcp", prefix, ports, "--replace", target=target)
        # a rule given another effect is the same rule: its counters go on, in another group
        self.rules[which] = target
        self.built = True
        self._forget_gone_targets()

    @rule(
        which=st.sampled_from(RULES),
        to=st.sampled_from((*TARGETS, None)),
        point=st.sampled_from(("commit.switched", "retire.carried")),
    )
    def killed(self, which: tuple[str, str], to: str | None, point: str) -> None:
        """A change (attach, re-target, or detach: `to` None) killed after its switch: it
        happened, and the generation it replaced is left pinned for the next writer."""
        prefix, ports = which
        for n, vmin in ((self.small, 10**9), (self.large, 1)):
            if to is None:
                args: tuple[str, ...] = ("detach", "tcp", prefix, ports, "--if-exists")
            elif to == "drop":
                args = ("attach", "tcp", prefix, ports, "--drop", "--replace")
            else:
                port = self.ports[n.name, to]
                args = ("attach", "tcp", prefix, ports, "--replace")
                args += ("--to", f"127.0.0.1:{port}", "--name", to)
            # the CLI in a process of its own, with the paths of the namespace's rule-set size
            code = (
                "import sys; from sklookupctl import image; "
                f"image.VECTOR_MIN = {vmin}; from sklookupctl.cli import main; main(sys.argv[1:])"
            )
            argv = [sys.executable, "-c", code, "--netns", n.name, "--bpffs", n.bpffs, *args]
            res = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "SKLOOKUPCTL_FAULT": point},
            )
            unchanged = which not in self.rules if to is None else self.rules.get(which) == to
            if unchanged or (point == "retire.carried" and not self.built):
                # nothing to change, or no generation replaced: nothing killed
                assert res.returncode == 0, res.stderr
            else:
                assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr)
        if to is None:
            if self.rules.pop(which, None) is not None:
                for kind in ("steered", "dropped"):
                    self.rule_counts.pop((prefix, ports, kind), None)
        else:
            self.rules[which] = to
            self.built = True
        self._forget_gone_targets()
        self.check()

    @rule(which=st.sampled_from(RULES))
    def detach(self, which: tuple[str, str]) -> None:
        prefix, ports = which
        self.both("detach", "tcp", prefix, ports, "--if-exists")
        if self.rules.pop(which, None) is not None:
            for kind in ("steered", "dropped"):
                self.rule_counts.pop((prefix, ports, kind), None)
        self._forget_gone_targets()

    def _forget_gone_targets(self) -> None:
        """A target no rule uses is removed; made again, it counts from zero."""
        used = set(self.rules.values())
        for key in [k for k in self.totals if k[0] not in used]:
            del self.totals[key]

    @rule(lookups=st.lists(st.sampled_from(LOOKUPS), min_size=1, max_size=4))
    def look(self, lookups: list[tuple[str, int]]) -> None:
        """Lookups by each namespace's live program (BPF_PROG_TEST_RUN, counted in the live
        maps): exactly one each, where a real connection may be looked up more than once."""
        for addr, port in lookups:
            matched = [k for k in self.rules if _covers(*k, addr, port)]
            # the longest prefix, then the narrowest range
            best = max(
                matched,
                key=lambda k: (int(k[0].split("/")[1]), -_span(k[1])),
                default=None,
            )
            for n in (self.small, self.large):
                got = n.look("tcp", addr, port)
                if best is None:
                    assert got == "pass", (addr, port, got)
                elif self.rules[best] == "drop":
                    assert got == "drop", (addr, port, got)
                else:
                    assert got == "steer", (addr, port, got)
            if best is None:
                continue
            target = self.rules[best]
            kind = "dropped" if target == "drop" else "steered"
            # both namespaces took it: the model counts it once
            self.rule_counts[(*best, kind)] += 1
            if target != "drop":
                self.totals[target, kind] += 1
        self.check()

    def check(self) -> None:
        shown = []
        for n, vmin in ((self.small, 10**9), (self.large, 1)):
            with _vector_min(vmin):
                st_ = n.status()
            rules = {
                (r["prefix"], r["ports"]): r
                for r in st_["rules"]  # type: ignore[attr-defined]
            }
            targets = {t["name"]: t for t in st_["targets"]}  # type: ignore[attr-defined]
            shown.append(
                (
                    {
                        k: (r["counters"]["steered"], r["counters"]["dropped"])
                        for k, r in rules.items()
                    },
                    {k: t["counters"]["steered"] for k, t in targets.items()},
                )
            )
        assert shown[0] == shown[1], shown
        rule_view, target_view = shown[0]
        want_rules = {
            k: (self.rule_counts[(*k, "steered")], self.rule_counts[(*k, "dropped")])
            for k in self.rules
        }
        assert rule_view == want_rules
        want_targets = {t: self.totals[t, "steered"] for t in set(self.rules.values()) - {"drop"}}
        assert target_view == want_targets


def test_counters_follow_rules_and_targets_on_both_paths(bpffs: str) -> None:
    run_state_machine_as_test(lambda: Counting(bpffs), settings=machine_settings(EXAMPLES, STEPS))
