"""A command killed at any point of the write path: steering follows the old rule set or the new
one (never a mix, never nothing), `status` shows what steers, and the next command recovers
with nothing leaked.

Each scenario is run once with a trace of the fault points it passes (faults.py), then once per
point reached, killed there (SIGKILL, from inside, exactly at the point), in a fresh namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from sklookupctl import faults
from sklookupctl.bpfsys import Link

from .conftest import CONSOLE_SCRIPT as CONSOLE
from .conftest import MADE, NS, PREFIXES, assert_no_leaks, kernel_objects, throwaway

Probe = tuple[str, int]  # a TCP dial: (address, port)


@dataclass
class Case:
    """One scenario: `setup` makes the old state (and returns the command that makes the new
    one); `old` and `new` say where each probe lands ("refused" or a proxy's tag)."""

    name: str
    setup: Callable[[NS, Path], list[str]]
    old: dict[Probe, str]
    new: dict[Probe, str]
    old_rules: set[tuple[str, str, str]]
    new_rules: set[tuple[str, str, str]]
    capacities: tuple[int, int] | None = None  # of the SOCKMAP before and after
    old_state: str = "steering"  # what status says of the old state


def _target(name: str, port: int) -> str:
    return f'[targets.{name}]\nto = "127.0.0.1:{port}"\n'


def _rule(prefix: str, target: str | None, ports: str = "all") -> str:
    act = f'target = "{target}"' if target else 'action = "drop"'
    return f'[[rules]]\nprotocol = "tcp"\nprefix = "{prefix}"\nports = "{ports}"\n{act}\n'


def first_attach(ns: NS, tmp: Path) -> list[str]:
    a = ns.proxy(tcp="127.0.0.1:0", tag="a")
    return ["attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{a.port}", "--name", "a"]


def attach_new_target(ns: NS, tmp: Path) -> list[str]:
    a = ns.proxy(tcp="127.0.0.1:0", tag="a")
    b = ns.proxy(tcp="127.0.0.1:0", tag="b")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{a.port}", "--name", "a")
    return ["attach", "tcp", "198.51.100.0/24", "all", "--to", f"127.0.0.1:{b.port}", "--name", "b"]


def detach_one(ns: NS, tmp: Path) -> list[str]:
    a = ns.proxy(tcp="127.0.0.1:0", tag="a")
    b = ns.proxy(tcp="127.0.0.1:0", tag="b")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{a.port}", "--name", "a")
    ns.ok("attach", "tcp", "198.51.100.0/24", "all", "--to", f"127.0.0.1:{b.port}", "--name", "b")
    return ["detach", "tcp", "198.51.100.0/24", "all"]


def apply_moves(ns: NS, tmp: Path) -> list[str]:
    """The target moves to another socket, a rule goes, a drop rule comes."""
    a = ns.proxy(tcp="127.0.0.1:0", tag="a")
    b = ns.proxy(tcp="127.0.0.1:0", tag="b")
    ns.proxy(tcp="203.0.113.1:80", tag="n")  # a normal listener
    old = tmp / "old.toml"
    old.write_text(
        _target("a", a.port) + _rule("192.0.2.0/24", "a") + _rule("198.51.100.0/24", "a")
    )
    ns.ok("apply", str(old))
    new = tmp / "new.toml"
    new.write_text(
        _target("a", b.port) + _rule("192.0.2.0/24", "a") + _rule("203.0.113.0/24", None)
    )
    return ["apply", str(new)]


def apply_grows(ns: NS, tmp: Path) -> list[str]:
    """40 targets (a SOCKMAP of 128 slots: twice the need) move to new sockets and 50 more
    come: the 40 old and 90 new blocks do not fit together, so the new generation gets a larger
    SOCKMAP, with every socket in it."""
    ns.proxy(extra=("--tcp-range", "127.0.0.1:21000-21039"), tag="x")
    ns.proxy(extra=("--tcp-range", "127.0.0.1:22000-22089"), tag="y")
    old = "".join(_target(f"t{i}", 21000 + i) for i in range(40))
    old += "".join(_rule(f"192.0.2.{i}", f"t{i}") for i in range(40))
    (tmp / "old.toml").write_text(old)
    ns.ok("apply", str(tmp / "old.toml"))
    new = "".join(_target(f"t{i}", 22000 + i) for i in range(90))
    new += "".join(_rule(f"192.0.2.{i}", f"t{i}") for i in range(90))
    (tmp / "new.toml").write_text(new)
    return ["apply", str(tmp / "new.toml")]


def reattach(ns: NS, tmp: Path) -> list[str]:
    """Something else detached the link; the next change attaches the dispatcher again."""
    a = ns.proxy(tcp="127.0.0.1:0", tag="a")
    b = ns.proxy(tcp="127.0.0.1:0", tag="b")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{a.port}", "--name", "a")
    with Link.from_pin(os.path.join(str(ns.status()["path"]), "link")) as link:
        link.detach()
    return ["attach", "tcp", "198.51.100.0/24", "all", "--to", f"127.0.0.1:{b.port}", "--name", "b"]


def detach_all(ns: NS, tmp: Path) -> list[str]:
    a = ns.proxy(tcp="127.0.0.1:0", tag="a")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{a.port}", "--name", "a")
    ns.ok("attach", "tcp", "198.51.100.0/24", "80", "--drop")
    return ["detach", "--all"]


def apply_live_rules(ns: NS, tmp: Path) -> list[str]:
    """The file's rules are live again (a rule attached and detached since it was applied):
    the apply changes nothing, and notes the file with the live generation."""
    a = ns.proxy(tcp="127.0.0.1:0", tag="a")
    f = tmp / "live.toml"
    f.write_text(_target("a", a.port) + _rule("192.0.2.0/24", "a"))
    ns.ok("apply", str(f))
    ns.ok("attach", "tcp", "198.51.100.0/24", "80", "--drop")
    ns.ok("detach", "tcp", "198.51.100.0/24", "80")
    return ["apply", str(f)]


P1, P2, P3 = ("192.0.2.1", 80), ("198.51.100.1", 80), ("203.0.113.1", 80)
A = ("tcp", "192.0.2.0/24", "a")
B = ("tcp", "198.51.100.0/24", "b")
CASES = [
    Case("first attach", first_attach, {P1: "refused"}, {P1: "a"}, set(), {A}),
    Case(
        "attach a new target",
        attach_new_target,
        {P1: "a", P2: "refused"},
        {P1: "a", P2: "b"},
        {A},
        {A, B},
    ),
    Case("detach", detach_one, {P1: "a", P2: "b"}, {P1: "a", P2: "refused"}, {A, B}, {A}),
    Case(
        "apply",
        apply_moves,
        {P1: "a", P2: "a", P3: "n"},
        {P1: "b", P2: "refused", P3: "refused"},
        {A, ("tcp", "198.51.100.0/24", "a")},
        {A, ("tcp", "203.0.113.0/24", "drop")},
    ),
    Case(
        "apply that grows the SOCKMAP",
        apply_grows,
        {("192.0.2.3", 1): "21003 x", ("192.0.2.85", 1): "refused"},
        {("192.0.2.3", 1): "22003 y", ("192.0.2.85", 1): "22085 y"},
        {("tcp", f"192.0.2.{i}/32", f"t{i}") for i in range(40)},
        {("tcp", f"192.0.2.{i}/32", f"t{i}") for i in range(90)},
        capacities=(128, 256),
    ),
    Case(
        "re-attach a detached link",
        reattach,
        {P1: "refused", P2: "refused"},
        {P1: "a", P2: "b"},
        {A},
        {A, B},
        old_state="detached",
    ),
    Case("apply of the live rules", apply_live_rules, {P1: "a"}, {P1: "a"}, {A}, {A}),
    Case(
        "detach --all",
        detach_all,
        {P1: "a", P2: "refused"},
        {P1: "refused", P2: "refused"},
        {A, ("tcp", "198.51.100.0/24", "drop")},
        set(),
    ),
]


def landed(ns: NS, probes: dict[Probe, str]) -> dict[Probe, str]:
    out = {}
    for host, port in probes:
        got = ns.dial("tcp", host, port)
        out[(host, port)] = got if got in ("refused", "timeout") else got.split(" ", 2)[2]
    return out


def rules_of(st: dict[str, object]) -> set[tuple[str, str, str]]:
    return {
        (r["protocol"], r["prefix"], r["target"] or r["action"])  # type: ignore[index]
        for r in st["rules"]  # type: ignore[attr-defined]
    }


def run(ns: NS, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ns.script_argv(*argv),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_killed_at_every_point(bpffs: str, tmp_path: Path, case: Case) -> None:
    # the points this command passes, in order
    trace = tmp_path / "trace"
    with throwaway(bpffs, PREFIXES) as ns:
        argv = case.setup(ns, tmp_path)
        assert landed(ns, case.old) == case.old
        if case.capacities:
            assert ns.status()["sockmap"]["capacity"] == case.capacities[0]  # type: ignore[index]
        res = run(ns, argv, SKLOOKUPCTL_FAULT_TRACE=str(trace))
        assert res.returncode == 0, res.stderr
        assert landed(ns, case.new) == case.new
        if case.capacities:
            assert ns.status()["sockmap"]["capacity"] == case.capacities[1]  # type: ignore[index]
    points = trace.read_text().split()
    assert points, "the command passed no fault point"
    assert set(points) <= set(faults.POINTS)
    seen: dict[str, int] = {}
    for point in points:
        seen[point] = seen.get(point, 0) + 1
        kill_at = f"{point}:{seen[point]}"
        base = kernel_objects()
        with throwaway(bpffs, PREFIXES) as ns:
            argv = case.setup(ns, tmp_path)
            res = run(ns, argv, SKLOOKUPCTL_FAULT=kill_at)
            assert res.returncode == -signal.SIGKILL, (kill_at, res.returncode, res.stderr)
            side = check_after_kill(ns, case, kill_at)
            # the next command recovers and makes the new rule set (a detach that happened is
            # not repeated: detaching a rule that is not there is an error)
            if side == "old" or case.name != "detach":
                again = run(ns, argv)
                assert again.returncode == 0, (kill_at, again.stderr)
            assert landed(ns, case.new) == case.new, kill_at
            assert rules_of(ns.status()) == case.new_rules, kill_at
            assert_files(ns, case, kill_at)
            assert_no_leaks(bpffs, base)
            ns.ok("detach", "--all")
            assert ns.files() == [], kill_at
        assert_no_leaks(bpffs, base)


def check_after_kill(ns: NS, case: Case, kill_at: str) -> str:
    """Old or new, never a mix; status agrees with what steers, before and after a gc.
    Returns which it is."""
    got = landed(ns, case.old)
    side = "old" if got == case.old else "new"
    if side == "new":
        got = landed(ns, case.new)
        assert got == case.new, f"killed at {kill_at}: steering is neither old nor new: {got}"
    for _ in range(2):
        st = ns.status()
        want = case.old_rules if side == "old" else case.new_rules
        assert rules_of(st) == want, (kill_at, side, st)
        assert st["loaded"] == bool(want), (kill_at, st)
        if want and case.name != "detach --all":
            assert st["state"] == (case.old_state if side == "old" else "steering"), (kill_at, st)
        all_ = json.loads(ns.ok("status", "--all", "--json").stdout)
        assert all(e["state"] != "dead" for e in all_), all_
        ns.ok("gc")
    assert landed(ns, case.old if side == "old" else case.new) == (
        case.old if side == "old" else case.new
    ), kill_at
    return side


def assert_files(ns: NS, case: Case, kill_at: str) -> None:
    """One namespace directory: its link and one generation, nothing else (nothing at all
    when the new state is no dispatcher)."""
    if not case.new_rules:
        assert ns.files() == [], (kill_at, ns.files())
        return
    files = [os.path.relpath(f, os.path.join(ns.bpffs, "sklookupctl")) for f in ns.files()]
    dirs = {f.split("/")[0] for f in files}
    inside = {f.split("/")[1] for f in files if "/" in f}
    assert len(dirs) == 1, (kill_at, files)
    assert len(inside) == 2 and "link" in inside, (kill_at, files)


# -- what is reported: a change that happened is never reported as failed ------------------------


def _two_rules(ns: NS) -> tuple[list[str], Probe]:
    a = ns.proxy(tcp="127.0.0.1:0", tag="a")
    b = ns.proxy(tcp="127.0.0.1:0", tag="b")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{a.port}", "--name", "a")
    argv = ["attach", "tcp", "198.51.100.0/24", "all", "--to", f"127.0.0.1:{b.port}", "--name", "b"]
    return argv, P2


@pytest.mark.parametrize("how", ["INT", "TERM"])
@pytest.mark.parametrize("point", ["commit.switched", "retire.carried", "retire.freed"])
def test_a_signal_after_the_switch_waits_for_the_end(ns: NS, how: str, point: str) -> None:
    argv, probe = _two_rules(ns)
    res = run(ns, argv, SKLOOKUPCTL_FAULT=f"{point}:1:{how}")
    assert res.returncode == 0, res.stderr
    assert "added tcp 198.51.100.0/24" in res.stdout
    assert f"note: SIG{how} arrived after the change was made" in res.stderr
    assert ns.dial("tcp", *probe).endswith(" b")
    inside = {os.path.relpath(f, ns.bpffs).split("/")[2] for f in ns.files() if f.count("/") > 4}
    assert len([g for g in inside if g.startswith("gen-")]) == 1  # retired all the same


def test_a_library_caller_is_told_of_a_signal_after_the_switch(ns: NS) -> None:
    """Without the CLI, signals are held until the old generation is retired, and the result
    says they came."""
    from sklookupctl import api, faults

    argv, probe = _two_rules(ns)
    faults.arm("retire.carried:1:INT")
    try:
        res = api.attach(
            ns.name, "tcp", "198.51.100.0/24", "all", to=argv[5], name="b", bpffs=ns.bpffs
        )
    finally:
        faults.arm("")
    assert "SIGINT arrived after the switch: the change was finished first" in res.notes
    assert ns.dial("tcp", *probe).endswith(" b")


def test_a_signal_before_the_switch_changes_nothing(ns: NS) -> None:
    argv, probe = _two_rules(ns)
    files, st = ns.files(), ns.status()
    res = run(ns, argv, SKLOOKUPCTL_FAULT="commit.filled:1:INT")
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert ns.files() == files and ns.status() == st
    assert ns.dial("tcp", *probe) == "refused"


def test_a_failure_after_the_switch_is_a_note(ns: NS) -> None:
    argv, probe = _two_rules(ns)
    res = run(ns, argv, SKLOOKUPCTL_FAULT="retire.freed:1:RAISE")
    assert res.returncode == 0, res.stderr
    assert "the change is live, but removing the previous generation failed" in res.stdout
    assert ns.dial("tcp", *probe).endswith(" b")
    ns.ok("gc")  # the next command finishes the clean-up
    st = ns.status()
    assert {r["prefix"] for r in st["rules"]} == {"192.0.2.0/24", "198.51.100.0/24"}  # type: ignore[attr-defined]
    inside = {os.path.relpath(f, ns.bpffs).split("/")[2] for f in ns.files() if f.count("/") > 4}
    assert len([g for g in inside if g.startswith("gen-")]) == 1


@pytest.mark.parametrize("nth", [1, 2, 3])
def test_a_killed_gc_of_a_dead_namespace_is_finished_by_the_next(bpffs: str, nth: int) -> None:
    """gc killed while it removes a deleted namespace's state: the next gc removes the rest,
    whichever pins the kill left, and nothing is leaked."""
    import uuid

    from sklookupctl import api

    base = kernel_objects()
    name = f"sklt-{uuid.uuid4().hex[:10]}"
    MADE.add(name)
    api.netns_add(name)
    dead = NS(name, bpffs)
    dead.ok("attach", "tcp", "192.0.2.0/24", "80", "--drop")
    dead.ok("attach", "tcp", "192.0.2.0/24", "81", "--drop")  # the live gen-N sorts after link
    subprocess.run(["ip", "netns", "del", name], check=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = [e["state"] for e in json.loads(dead.ok("status", "--all", "--json").stdout)]
        if "dead" in states:
            break
        time.sleep(0.05)
    res = subprocess.run(
        [CONSOLE, "--bpffs", bpffs, "gc"],
        capture_output=True,
        text=True,
        env={**os.environ, "SKLOOKUPCTL_FAULT": f"unpin.partial:{nth}"},
    )
    assert res.returncode in (0, -signal.SIGKILL), res.stderr
    done = json.loads(dead.ok("gc", "--json").stdout)["collected"]
    assert all(e["state"] in ("dead", "unfinished") for e in done), done
    assert dead.files() == [] and json.loads(dead.ok("status", "--all", "--json").stdout) == []
    assert_no_leaks(bpffs, base)


@pytest.mark.parametrize("how", ["INT", "TERM"])
def test_a_signal_while_the_report_is_written_waits_for_it(ns: NS, how: str) -> None:
    argv, probe = _two_rules(ns)
    res = run(ns, argv, SKLOOKUPCTL_FAULT=f"report.write:1:{how}")
    assert res.returncode == 0, res.stderr
    assert "added tcp 198.51.100.0/24" in res.stdout  # the whole report
    assert f"note: SIG{how} arrived after the change was made" in res.stderr
    assert ns.dial("tcp", *probe).endswith(" b")


def test_a_reader_that_goes_away_does_not_fail_the_change(ns: NS) -> None:
    argv, probe = _two_rules(ns)
    r, w = os.pipe()
    os.close(r)  # like `| head -1` that has already left
    try:
        res = subprocess.run(ns.script_argv(*argv), stdout=w, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(w)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert ns.dial("tcp", *probe).endswith(" b")
