"""A model-based fault test on the real kernel.

A hypothesis state machine drives sklookupctl through what a host does to it: rules attached,
detached and applied, exports applied back, proxies killed and restarted, reuseport members
coming and going, the CLI killed at a fault point, the namespace deleted and collected. After
every step it compares the kernel with a plain model: exit status and message, `status --json`
and `export`, the live program's verdicts on random lookups (BPF_PROG_TEST_RUN), a few real
connections, and that every kernel object sklookupctl made is pinned (nothing leaked).

Bounded for CI (30 examples of up to 15 steps, the same ones every run); longer with
SKLOOKUPCTL_MODEL_EXAMPLES and SKLOOKUPCTL_MODEL_STEPS, new examples each run with
SKLOOKUPCTL_MODEL_RANDOM=1:

    SKLOOKUPCTL_MODEL_RANDOM=1 SKLOOKUPCTL_MODEL_EXAMPLES=500 SKLOOKUPCTL_MODEL_STEPS=40 \
        .venv/bin/pytest -s tests/kernel/test_model.py
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import random
import signal
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from sklookupctl import api, faults, rulefile, testrun
from sklookupctl.bpfsys import BpfError, Program
from sklookupctl.rules import DROP, STEER, Rule, RuleKey, RuleSet, make_rule

from .conftest import MADE, NS, Objects, Proxy, assert_no_leaks, kernel_objects

EXAMPLES = int(os.environ.get("SKLOOKUPCTL_MODEL_EXAMPLES", "30"))
STEPS = int(os.environ.get("SKLOOKUPCTL_MODEL_STEPS", "15"))

PORTS = (7001, 7002, 7003)  # where targets are declared, on 127.0.0.1
# where proxies listen (always SO_REUSEPORT): an IPv4 address, or a dual-stack IPv6 wildcard
# that serves it
LISTEN = {7001: "127.0.0.1", 7002: "127.0.0.1", 7003: "[::]"}
NAMES = ("a", "b", "c")
PREFIXES = ("192.0.2.0/24", "192.0.2.0/25", "192.0.2.128/25", "192.0.2.7/32", "198.51.100.0/24")
RANGES = ("all", "80", "1000-2000", "1500")
ADDRS = ("192.0.2.1", "192.0.2.7", "192.0.2.100", "192.0.2.130", "198.51.100.5", "203.0.113.1")
LOOKUP_PORTS = (1, 80, 81, 999, 1000, 1500, 2000, 2001, 65535)
ANYIP = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")

KEYS = [make_rule("tcp", p, r, drop=True).key for p in PREFIXES for r in RANGES]

# what the run did, so that a run that exercised nothing fails instead of passing
STATS: Counter[str] = Counter()

# rule files the machine writes: removed when the tests end
FILES = tempfile.TemporaryDirectory(prefix="sklt-model-")


@dataclass(frozen=True)
class Effect:
    """What a rule does: drop, or steer to a target declared at 127.0.0.1:port."""

    target: str | None
    port: int = 0
    exact: bool = False
    on_missing: str = "drop"

    def rule(self, key: RuleKey) -> Rule:
        if self.target is None:
            return Rule(key, DROP)
        return Rule(key, STEER, self.target, self.on_missing)


effects = st.one_of(
    st.just(Effect(None)),
    st.builds(
        Effect,
        st.sampled_from(NAMES),
        st.sampled_from(PORTS),
        st.booleans(),
        st.sampled_from(["drop", "pass"]),
    ),
)


@dataclass(frozen=True)
class MTarget:
    port: int
    exact: bool
    registered: frozenset[int]  # cookies of the sockets registered (some may have died)
    slots: int


@dataclass
class Model:
    loaded: bool = False  # a dispatcher is in the namespace
    rules: dict[RuleKey, Rule] = field(default_factory=dict)
    targets: dict[str, MTarget] = field(default_factory=dict)


@dataclass
class Member:
    proxy: Proxy
    cookie: int
    tag: str


@dataclass
class Command:
    """A command, what the model expects of it, and how the model changes if it succeeds."""

    argv: list[str]
    error: str | None  # a word of the expected one-line error; None: it succeeds
    after: Callable[[dict[str, object]], Model]  # the new model, given status after it


class Steering(RuleBasedStateMachine):
    def __init__(self, bpffs: str) -> None:
        super().__init__()
        self.bpffs = bpffs
        self.base: Objects = kernel_objects()
        self.name = f"sklt-m{uuid.uuid4().hex[:9]}"
        self.ns = self._new_ns()
        self.model = Model()
        self.members: dict[int, list[Member]] = {p: [] for p in PORTS}
        self.rng = random.Random(0)
        self.tags = 0

    def _new_ns(self) -> NS:
        MADE.add(self.name)
        api.netns_add(self.name)
        for p in ANYIP:
            api.addr_add(self.name, p)
        return NS(self.name, self.bpffs)

    def teardown(self) -> None:
        for members in self.members.values():
            for m in members:
                m.proxy.stop()
        if os.path.exists(f"/run/netns/{self.name}"):
            api.netns_del(self.name, bpffs=self.bpffs)
        api.gc_state(bpffs=self.bpffs)  # what a failed step may have left of a deleted netns
        assert_no_leaks(self.bpffs, self.base)

    # -- proxies

    def alive(self, port: int) -> dict[int, Member]:
        return {m.cookie: m for m in self.members[port]}

    @initialize(port=st.sampled_from(PORTS))
    def first_proxy(self, port: int) -> None:
        self.start_member(port)

    @precondition(lambda self: all(len(m) < 6 for m in self.members.values()))
    @rule(port=st.sampled_from(PORTS))
    def start_member(self, port: int) -> None:
        """A proxy, or one more member of its reuseport group."""
        self.tags += 1
        STATS["proxy started"] += 1
        tag = f"m{self.tags}"
        p = self.ns.proxy(tcp=f"{LISTEN[port]}:{port}", tag=tag, extra=("--reuseport",))
        cookie = self._cookie_of(p)
        self.members[port].append(Member(p, cookie, tag))
        self.check()

    def _cookie_of(self, p: Proxy) -> int:
        from sklookupctl import netns as nsmod
        from sklookupctl import sockets

        with nsmod.open_netns(self.ns.name) as n, sockets.Discovery(n) as d:
            for e in d.at_port("tcp", p.port):
                if e.receives() and any(h.pid == p.pid for h in d.holders(e.inode)):
                    return e.cookie
        raise AssertionError("the proxy's socket was not found")

    @precondition(lambda self: any(self.members.values()))
    @rule(i=st.integers(0, 10**6))
    def kill_member(self, i: int) -> None:
        every = [m for p in PORTS for m in self.members[p]]
        m = every[i % len(every)]
        port = m.proxy.port
        m.proxy.stop()
        STATS["proxy killed"] += 1
        self.members[port].remove(m)
        self.check()

    # -- commands

    def run(self, cmd: Command) -> None:
        res = self.ns.cli(*cmd.argv)
        STATS[f"{cmd.argv[0]} {'failed' if res.exit_code else 'ok'}"] += 1
        self.settle(cmd, res.exit_code, res.output)
        self.check(strict=True)

    def settle(self, cmd: Command, code: int, output: str) -> None:
        if cmd.error is not None:
            assert code == 1, (cmd.argv, output)
            assert output.startswith("error: ") and cmd.error in output, (cmd.argv, output)
            assert "Traceback" not in output and output.count("\n") == 1, output
            return
        assert code == 0, (cmd.argv, output)
        self.model = cmd.after(self.ns.status())

    @rule(key=st.sampled_from(KEYS), effect=effects, replace_=st.booleans())
    def attach(self, key: RuleKey, effect: Effect, replace_: bool) -> None:
        self.run(self.attach_cmd(key, effect, replace_))

    @rule(data=st.data())
    def detach(self, data: st.DataObject) -> None:
        self.run(self.detach_cmd(self.some_key(data)))

    def some_key(self, data: st.DataObject) -> RuleKey:
        """Mostly a rule that is there; sometimes any. (The draws do not depend on the state,
        so that hypothesis can replay them.)"""
        there = sorted(self.model.rules)
        pick, i = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 10**6))
        return there[i % len(there)] if there and pick else KEYS[i % len(KEYS)]

    @rule(data=st.data())
    def apply(self, data: st.DataObject) -> None:
        self.run(self.apply_cmd(data))

    @rule()
    def export_apply(self) -> None:
        text = self.ns.ok("export").stdout
        path = os.path.join(FILES.name, f"{self.name}-export.toml")
        with open(path, "w") as f:
            f.write(text)
        res = self.ns.cli("apply", path)
        assert res.exit_code == 0, res.output
        STATS["export applied"] += 1
        before = self.model
        self.model = self.registered(self.model, set(self.model.targets), self.ns.status())
        assert self.model.rules == before.rules
        os.unlink(path)
        self.check(strict=True)

    @rule(data=st.data(), point=st.sampled_from(faults.POINTS))
    def cli_killed(self, data: st.DataObject, point: str) -> None:
        """A command killed at a fault point (or running to its end if it does not get there):
        what steers is the old rule set or the new one, and status says which."""
        kind = data.draw(st.sampled_from(["attach", "detach", "apply", "detach-all"]))
        if kind == "attach":
            cmd = self.attach_cmd(data.draw(st.sampled_from(KEYS)), data.draw(effects), False)
        elif kind == "detach":
            cmd = self.detach_cmd(self.some_key(data))
        elif kind == "apply":
            cmd = self.apply_cmd(data)
        else:
            cmd = Command(["detach", "--all"], None, lambda st_: Model())
        res = subprocess.run(
            self.ns.script_argv(*cmd.argv),
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "SKLOOKUPCTL_FAULT": f"{point}:1"},
        )
        STATS["cli killed" if res.returncode == -signal.SIGKILL else "cli not killed"] += 1
        if res.returncode != -signal.SIGKILL:
            self.settle(cmd, res.returncode, res.stderr + res.stdout)
            self.check(strict=True)
            return
        # killed: in the change itself, or in the repair of what an earlier kill left. What
        # steers must be the new state or the old one, all of it (rules, targets, verdicts)
        st_ = self.ns.status()
        old = self.model
        try:
            new = cmd.after(st_) if cmd.error is None else None
        except (AssertionError, KeyError, ValueError):
            new = None  # status cannot be the new state
        if new is not None:
            self.model = new
            try:
                self.check()
                return
            except AssertionError:
                self.model = old
        self.check()

    @rule()
    def namespace_deleted(self) -> None:
        """Every proxy stops (they keep the namespace alive), the namespace is deleted behind
        sklookupctl's back, gc removes its state, and a new namespace takes the name."""
        for members in self.members.values():
            for m in members:
                m.proxy.stop()
            members.clear()
        subprocess.run(["ip", "netns", "del", self.name], check=True)
        if self.model.loaded:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                listed = json.loads(self.ns.ok("status", "--all", "--json").stdout)
                if [e["state"] for e in listed if e["label"] == self.name] == ["dead"]:
                    break
                time.sleep(0.05)
            else:
                raise AssertionError(f"the deleted namespace is not seen dead: {listed}")
        gone = json.loads(self.ns.ok("gc", "--json").stdout)["collected"]
        dead = [e["label"] for e in gone if e["state"] == "dead"]
        assert dead == ([self.name] if self.model.loaded else []), gone
        assert {e["state"] for e in gone} <= {"dead", "unfinished"}, gone
        assert self.ns.files() == []
        assert_no_leaks(self.bpffs, self.base)
        STATS["namespace deleted"] += 1
        self.ns = self._new_ns()
        self.model = Model()
        self.check()

    # -- what the model expects of each command

    def attach_cmd(self, key: RuleKey, e: Effect, replace_: bool) -> Command:
        argv = ["attach", "tcp", str(key.prefix), _ports(key)]
        if e.target is None:
            argv.append("--drop")
        else:
            argv += [
                "--to",
                f"127.0.0.1:{e.port}",
                "--name",
                e.target,
                "--on-missing",
                e.on_missing,
            ]
            argv += ["--no-reuseport"] if e.exact else []
        if replace_:
            argv.append("--replace")
        m = self.model
        error = None
        t = m.targets.get(e.target or "")
        if e.target is not None:
            kept = t is not None and (t.port, t.exact) == (e.port, e.exact)
            if not self.alive(e.port) and not kept:
                error = "no tcp socket listens"
            elif t is not None and t.port != e.port and not replace_:
                error = "points at"
            elif t is not None and t.exact != e.exact and not replace_:
                error = "steers to"
        if error is None:
            error = _add_error(m.rules, e.rule(key), replace_)

        def after(st_: dict[str, object]) -> Model:
            rules = dict(m.rules)
            rules[key] = e.rule(key)
            new = Model(True, rules, dict(m.targets))
            if e.target is not None:
                new.targets[e.target] = MTarget(e.port, e.exact, frozenset(), 0)
            return self.registered(new, {e.target} if e.target else set(), st_, m)

        return Command(argv, error, after)

    def detach_cmd(self, key: RuleKey) -> Command:
        m = self.model
        if not m.loaded:
            error: str | None = "no sklookupctl dispatcher"
        elif key not in m.rules:
            error = "no rule"
        else:
            error = None

        def after(st_: dict[str, object]) -> Model:
            rules = {k: r for k, r in m.rules.items() if k != key}
            return self.registered(Model(True, rules, dict(m.targets)), set(), st_, m)

        return Command(["detach", "tcp", str(key.prefix), _ports(key)], error, after)

    def apply_cmd(self, data: st.DataObject) -> Command:
        rs = RuleSet()
        specs: dict[str, Effect] = {}
        for key in data.draw(st.lists(st.sampled_from(KEYS), max_size=6, unique=True)):
            e = data.draw(effects)
            if e.target is not None:
                e = specs.setdefault(e.target, e)  # one declaration per target
                e = replace(e, on_missing=data.draw(st.sampled_from(["drop", "pass"])))
            if _add_error(rs.rules, e.rule(key), False) is None:
                rs.add(e.rule(key))
        used = rs.targets_in_use()
        lines = []
        for name in sorted(used):
            e = specs[name]
            lines += [f"[targets.{name}]", f'to = "127.0.0.1:{e.port}"']
            lines += ['reuseport = "exact"'] if e.exact else []
        # a comment first: an empty rule set is applied on purpose (an empty file is refused)
        text = "# the model's rule set\n" + "\n".join(lines) + "\n" + rulefile.dumps(rs, {})
        path = os.path.join(FILES.name, f"{self.name}-apply-{uuid.uuid4().hex[:6]}.toml")
        with open(path, "w") as f:
            f.write(text)
        m = self.model
        error = None
        for name in sorted(used):
            e, t = specs[name], m.targets.get(name)
            kept = t is not None and (t.port, t.exact) == (e.port, e.exact)
            if not self.alive(e.port) and not kept:
                error = f"targets.{name}.to: no tcp socket listens"
                break

        def after(st_: dict[str, object]) -> Model:
            if not m.loaded and not rs.rules:
                return Model()  # nothing to do where nothing is
            targets = {}
            for name in used:
                e, t = specs[name], m.targets.get(name)
                same = t is not None and (t.port, t.exact) == (e.port, e.exact)
                targets[name] = t if same and t else MTarget(e.port, e.exact, frozenset(), 0)
            new = Model(True, dict(rs.rules), targets)
            return self.registered(new, used, st_, m)

        return Command(["apply", path], error, after)

    def registered(
        self, new: Model, looked_up: set[str], st_: dict[str, object], old: Model | None = None
    ) -> Model:
        """Targets after a command that looked for the sockets of `looked_up`: registered
        afresh when what listens there changed, else as they were. Exact targets take one
        socket of the group; which one, status says. Targets no rule uses are gone."""
        used = {r.target for r in new.rules.values() if r.target}
        out: dict[str, MTarget] = {}
        by_name = {t["name"]: t for t in st_["targets"]}  # type: ignore[attr-defined]
        for name in used:
            t = new.targets[name]
            before = (old or new).targets.get(name)
            same = before is not None and (before.port, before.exact) == (t.port, t.exact)
            alive = set(self.alive(t.port))
            if name in looked_up and alive:
                if t.exact:
                    keep = same and before is not None and before.registered & alive
                    if keep:
                        out[name] = before  # type: ignore[assignment]
                    else:
                        (cookie,) = by_name[name]["cookies"]
                        assert cookie in alive
                        out[name] = MTarget(t.port, True, frozenset([cookie]), 1)
                elif same and before is not None and before.registered & alive == alive:
                    out[name] = before
                else:
                    out[name] = MTarget(t.port, False, frozenset(alive), len(alive))
            else:
                assert same and before is not None, (name, "kept without a socket")
                out[name] = before
        return Model(new.loaded, new.rules, out)

    # -- the comparison

    def check(self, strict: bool = False) -> None:
        st_ = self.ns.status()
        m = self.model
        assert st_["loaded"] == m.loaded, st_
        if not m.loaded:
            assert self.ns.files() == [] or not strict, self.ns.files()
            return
        assert st_["state"] == "steering"
        assert {r.key: r for r in _rules(st_)} == m.rules
        targets = {t["name"]: t for t in st_["targets"]}  # type: ignore[attr-defined]
        assert set(targets) == set(m.targets)
        for name, mt in m.targets.items():
            t = targets[name]
            alive = set(self.alive(mt.port))
            assert t["address"] == f"127.0.0.1:{mt.port}"
            assert t["reuseport"] == ("exact" if mt.exact else "group")
            assert set(t["cookies"]) == mt.registered & alive, (name, t, mt, alive)
            assert t["members"] == mt.slots
        exported = rulefile.parse(self.ns.ok("export").stdout, "export")
        assert exported.rules.rules == m.rules
        for name, spec in exported.targets.items():
            assert spec.to == (ipaddress.ip_address("127.0.0.1"), m.targets[name].port)
            assert spec.exact == m.targets[name].exact
        self.check_verdicts(int(st_["program_id"]))  # type: ignore[call-overload]
        self.check_dials()
        if strict:
            inside = {
                tuple(os.path.relpath(f, os.path.join(self.bpffs, "sklookupctl")).split("/"))
                for f in self.ns.files()
            }
            assert {p[0] for p in inside} == {str(st_["path"]).rsplit("/", 1)[1]}
            assert {p[1] for p in inside if len(p) > 1} == {"link", f"gen-{st_['program_id']}"}
        assert_no_leaks(self.bpffs, self.base)

    def expected(self, addr: str, port: int) -> tuple[str, object]:
        """What the model says a lookup ends in: ("pass"|"drop", None), ("steer", cookie) for
        an exact target, ("group", alive cookies) for a reuseport group."""
        rule = RuleSet(self.model.rules).match("tcp", ipaddress.ip_address(addr), port)
        if rule is None or port == 0:
            return "pass", None
        if rule.action == DROP:
            return "drop", None
        t = self.model.targets[rule.target or ""]
        alive = t.registered & set(self.alive(t.port))
        if not alive:
            return rule.on_missing, None
        if t.exact:
            (cookie,) = alive
            return "steer", cookie
        return "group", alive

    def check_verdicts(self, prog_id: int) -> None:
        with Program.from_id(prog_id) as prog:
            for _ in range(25):
                addr, port = self.rng.choice(ADDRS), self.rng.choice(LOOKUP_PORTS)
                kind, what = self.expected(addr, port)
                ctx = testrun.lookup_ctx("tcp", ipaddress.ip_address(addr), port)
                try:
                    out = testrun.run(prog, ctx)
                except BpfError as e:
                    # a test run cannot pick within a reuseport group: the kernel refuses it
                    assert e.errno == errno.EOPNOTSUPP and kind == "group", (addr, port, kind, e)
                    continue
                got = {
                    (testrun.SK_PASS, 0): ("pass", None),
                    (testrun.SK_DROP, 0): ("drop", None),
                }.get((out.verdict, out.cookie), ("steer", out.cookie))
                assert got == (kind, what), (addr, port, got, kind, what, self.model)

    def check_dials(self) -> None:
        for _ in range(3):
            addr, port = self.rng.choice(ADDRS), self.rng.choice(LOOKUP_PORTS)
            kind, what = self.expected(addr, port)
            got = self.ns.dial("tcp", addr, port)
            if kind in ("pass", "drop"):
                assert got == "refused", (addr, port, kind, got)  # nothing listens there
                continue
            rule = RuleSet(self.model.rules).match("tcp", ipaddress.ip_address(addr), port)
            t = self.model.targets[rule.target or ""]  # type: ignore[union-attr]
            members = self.alive(t.port)
            # an exact target is that socket; a group is the kernel's pick among all of its
            # members, registered or not
            want = {members[what].tag} if kind == "steer" else {m.tag for m in members.values()}  # type: ignore[index]
            assert got.startswith(f"{addr} {port} ") and got.rsplit(" ", 1)[1] in want, (
                addr,
                port,
                got,
                want,
            )


def _ports(key: RuleKey) -> str:
    return (
        "all"
        if (key.lo, key.hi) == (1, 65535)
        else (str(key.lo) if key.lo == key.hi else f"{key.lo}-{key.hi}")
    )


def _add_error(rules: dict[RuleKey, Rule], rule: Rule, replace_: bool) -> str | None:
    """What RuleSet.check_add says, as the word of its error."""
    old = rules.get(rule.key)
    if old is not None:
        return None if old.same_effect(rule) or replace_ else "already exists"
    k = rule.key
    for o in rules:
        if (o.net, o.plen) != (k.net, k.plen):
            continue
        if not (k.hi < o.lo or o.hi < k.lo) and not (
            (k.lo <= o.lo and o.hi <= k.hi) or (o.lo <= k.lo and k.hi <= o.hi)
        ):
            return "partly overlap"
    return None


def _rules(st_: dict[str, object]) -> list[Rule]:
    out = []
    for r in st_["rules"]:  # type: ignore[attr-defined]
        lo, _, hi = r["ports"].replace("all", "1-65535").partition("-")
        key = RuleKey("tcp", ipaddress.ip_network(r["prefix"]), int(lo), int(hi or lo))
        out.append(Rule(key, r["action"], r["target"], r["on_missing"]))
    return out


def test_steering_follows_the_model(bpffs: str) -> None:
    STATS.clear()
    start = time.monotonic()
    run_state_machine_as_test(
        lambda: Steering(bpffs),
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=not os.environ.get("SKLOOKUPCTL_MODEL_RANDOM"),
        ),
    )
    took = time.monotonic() - start
    print(f"\nmodel run: {EXAMPLES} examples of up to {STEPS} steps, {took:.0f} s:", dict(STATS))
    for what in (
        "attach ok",
        "attach failed",
        "detach ok",
        "apply ok",
        "export applied",
        "proxy killed",
        "cli killed",
        "namespace deleted",
    ):
        assert STATS[what] > 0, (what, dict(STATS))
