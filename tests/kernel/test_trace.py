"""`trace`: live decisions of real connections, and the plain program back however it ends."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sklookupctl import bpfsys, compiler, layout, program
from sklookupctl import netns as nsmod

from .conftest import NS

BPF_JMP_CALL = 0x85
BPF_FUNC_ktime_get_ns = 5
BPF_FUNC_ringbuf_output = 130


def running_program(ns: NS) -> tuple[int, str]:
    """(id, name) of the one sk_lookup program attached to the namespace."""
    with nsmod.open_netns(ns.name) as n:
        ids = bpfsys.query_netns_programs(n.fd)
    assert len(ids) == 1, ids
    with bpfsys.Program.from_id(ids[0]) as p:
        info = p.info()
        return int(info.id), bytes(info.name).rstrip(b"\0").decode()


def state_dir(ns: NS) -> str:
    top = os.path.join(ns.bpffs, "sklookupctl")
    (d,) = [os.path.join(top, n) for n in os.listdir(top) if n.startswith("ns-")]
    return d


def trace_dirs(ns: NS) -> list[str]:
    return [n for n in os.listdir(state_dir(ns)) if n.startswith("trace-")]


def start_trace(ns: NS, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`trace` in a process of its own, returned once the traced copy runs."""
    before = ns.status()["program_id"]
    proc = subprocess.Popen(
        ns.script_argv("trace", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pid, name = running_program(ns)
        if pid != before and name == "skl_trace":
            return proc
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the traced program never ran")


@contextlib.contextmanager
def tracing(ns: NS, *args: str) -> Iterator[subprocess.Popen[str]]:
    """start_trace, and the process killed on the way out if it is still running."""
    proc = start_trace(ns, *args)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def steered_ns(ns: NS) -> tuple[int, int]:
    web = ns.proxy(tcp="127.0.0.1:0", udp="127.0.0.1:0", tag="web")
    ns.ok("attach", "tcp", "192.0.2.0/24", "80-89", "--to", f"127.0.0.1:{web.port}")
    ns.ok("attach", "udp", "192.0.2.0/24", "53", "--to", f"127.0.0.1:{web.port}", "--name", "dns")
    ns.ok("attach", "tcp", "198.51.100.0/24", "all", "--drop")
    return web.port, ns.status()["program_id"]  # type: ignore[return-value]


def test_plain_program_has_no_tracing_instruction() -> None:
    """Tracing costs nothing when off: the program the link runs calls no ring buffer or clock
    helper and refers only to the maps of a program that never heard of tracing."""
    plain, _ = program.image()
    traced, _ = program.image(traced=True)

    def calls(insns: bytes) -> set[int]:
        out = set()
        for off in range(0, len(insns), 8):
            code = insns[off]
            imm = int.from_bytes(insns[off + 4 : off + 8], "little", signed=True)
            if code == BPF_JMP_CALL and not insns[off + 1] >> 4:
                out.add(imm)
            if code == compiler.BPF_LD_IMM64 and insns[off + 1] >> 4:
                out.add(-1000 - imm)  # a map reference, by index
        return out

    helpers = {BPF_FUNC_ktime_get_ns, BPF_FUNC_ringbuf_output}
    assert not calls(plain) & helpers
    assert helpers <= calls(traced)
    maps = {-1000 - i for i in range(len(layout.PROGRAM_MAPS))}
    assert {c for c in calls(plain) if c <= -1000} <= maps
    assert {-1000 - layout.TRACE_MAPS.index("events")} <= calls(traced)


def test_compiles_twice_in_one_process() -> None:
    """The plain program and its traced variant compiled by one process (tempfile once kept
    the first compile's removed private directory)."""
    a = compiler.compile_image(program.source(traced=True), program.maps_of(True))
    b = compiler.compile_image()
    assert a != b and len(b) % 8 == 0


def test_trace_shows_real_connections(ns: NS) -> None:
    _, plain = steered_ns(ns)
    with tracing(ns, "--json", "--count", "4") as proc:
        assert ns.dial("tcp", "192.0.2.5", 81).startswith("192.0.2.5 81")
        assert ns.dial("tcp", "198.51.100.3", 22) == "refused"
        assert ns.dial("tcp", "203.0.113.1", 5000) == "refused"
        assert ns.dial("udp", "192.0.2.9", 53).startswith("192.0.2.9 53")
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    seen = {(d["protocol"], d["destination"], d["destination_port"]): d for d in got}
    steer = seen[("tcp", "192.0.2.5", 81)]
    assert (steer["verdict"], steer["reason"]) == ("steer", "steered")
    assert steer["target"] == ns.status()["targets"][1]["name"]  # type: ignore[index]
    assert steer["rule"] == {"protocol": "tcp", "prefix": "192.0.2.0/24", "ports": "80-89"}
    drop = seen[("tcp", "198.51.100.3", 22)]
    assert (drop["verdict"], drop["reason"], drop["target"]) == ("drop", "drop-rule", None)
    none = seen[("tcp", "203.0.113.1", 5000)]
    assert (none["verdict"], none["reason"], none["rule"]) == ("pass", "no-rule", None)
    dns = seen[("udp", "192.0.2.9", 53)]
    assert (dns["verdict"], dns["target"]) == ("steer", "dns")
    assert len(got) == 4
    # the plain program is back, the trace directory gone, and counting went on throughout
    assert running_program(ns)[0] == plain
    assert not trace_dirs(ns)
    st: dict[str, Any] = ns.status()
    assert st["tracing"] is None
    counts = {(r["prefix"], r["ports"]): r["counters"] for r in st["rules"]}
    assert counts[("192.0.2.0/24", "80-89")]["steered"] == 1
    assert counts[("198.51.100.0/24", "all")]["dropped"] == 1


def test_trace_filters(ns: NS) -> None:
    steered_ns(ns)
    with tracing(ns, "--json", "--count", "1", "--verdict", "drop", "--port", "20-30") as proc:
        ns.dial("tcp", "192.0.2.5", 81)  # steer: not shown
        ns.dial("tcp", "198.51.100.3", 80)  # drop, another port: not shown
        ns.dial("tcp", "198.51.100.3", 22)  # shown
        out, _ = proc.communicate(timeout=30)
    (d,) = [json.loads(line) for line in out.splitlines()]
    assert (d["destination"], d["destination_port"], d["verdict"]) == ("198.51.100.3", 22, "drop")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_the_trace_and_restores_the_plain_program(ns: NS, sig: int) -> None:
    _, plain = steered_ns(ns)
    proc = start_trace(ns)
    assert ns.status()["tracing"]["pid"] == proc.pid  # type: ignore[index]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "trace ended" in err
    assert running_program(ns)[0] == plain
    assert not trace_dirs(ns)
    assert ns.dial("tcp", "192.0.2.5", 81).startswith("192.0.2.5 81")


def test_killed_trace_is_undone_by_the_next_command(ns: NS) -> None:
    _, plain = steered_ns(ns)
    proc = start_trace(ns)
    proc.kill()
    proc.wait()
    # the traced copy still runs, and still steers
    assert running_program(ns)[1] == "skl_trace"
    assert ns.dial("tcp", "192.0.2.5", 81).startswith("192.0.2.5 81")
    st = ns.status()  # a reader: puts the plain program back
    assert st["tracing"] is None and st["program_id"] == plain
    assert running_program(ns)[0] == plain
    ns.ok("gc")  # a writer: removes what the trace left
    assert not trace_dirs(ns)
    assert ns.dial("tcp", "192.0.2.5", 81).startswith("192.0.2.5 81")


def test_killed_trace_is_undone_by_a_writer(ns: NS) -> None:
    steered_ns(ns)
    proc = start_trace(ns)
    proc.kill()
    proc.wait()
    ns.ok("attach", "tcp", "203.0.113.0/24", "all", "--drop")
    assert running_program(ns)[1] == "skl_dispatch"
    assert not trace_dirs(ns)
    assert ns.dial("tcp", "203.0.113.1", 80) == "refused"
    assert ns.dial("tcp", "192.0.2.5", 81).startswith("192.0.2.5 81")


def test_trace_follows_a_rule_set_change(ns: NS) -> None:
    steered_ns(ns)
    other = ns.proxy(tcp="127.0.0.1:0", tag="other")
    with tracing(ns, "--json", "--count", "2") as proc:
        assert ns.dial("tcp", "192.0.2.5", 81).startswith("192.0.2.5 81")
        ns.ok("attach", "tcp", "203.0.113.0/24", "443", "--to", f"127.0.0.1:{other.port}")
        deadline = time.monotonic() + 20
        while running_program(ns)[1] != "skl_trace" and time.monotonic() < deadline:
            time.sleep(0.05)  # the trace follows the new generation
        assert ns.dial("tcp", "203.0.113.7", 443).startswith("203.0.113.7 443")
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert [(d["destination"], d["verdict"]) for d in got] == [
        ("192.0.2.5", "steer"),
        ("203.0.113.7", "steer"),
    ]
    assert "rule set changed" in err
    assert running_program(ns)[1] == "skl_dispatch"
    assert not trace_dirs(ns)


def test_one_trace_at_a_time(ns: NS) -> None:
    steered_ns(ns)
    proc = start_trace(ns)
    try:
        second = ns.script("trace", "--seconds", "1")
        assert second.returncode == 4
        assert f"pid {proc.pid}" in second.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert running_program(ns)[1] == "skl_dispatch"


def test_trace_ends_when_the_dispatcher_is_removed(ns: NS) -> None:
    steered_ns(ns)
    proc = start_trace(ns)
    ns.ok("detach", "--all")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "trace ends" in err
    assert not os.path.exists(os.path.join(ns.bpffs, "sklookupctl", "ns-x"))


def test_nothing_to_trace(ns: NS) -> None:
    res = ns.script("trace", "--seconds", "1")
    assert res.returncode == 1
    assert "nothing to trace" in res.stderr


@pytest.mark.parametrize(
    "fault",
    ["trace.pinned:1:KILL", "trace.swapped:1:KILL", "trace.swapped:1:INT", "trace.swapped:1:TERM"],
)
def test_trace_killed_while_starting(ns: NS, fault: str) -> None:
    """Killed (or interrupted) between pinning its copy and swapping it in, or right after:
    steering never stops, and the next commands leave the plain program and nothing else."""
    _, plain = steered_ns(ns)
    res = subprocess.run(
        ns.script_argv("trace", "--seconds", "5"),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SKLOOKUPCTL_FAULT": fault},
    )
    assert res.returncode in (-signal.SIGKILL, 130, 143, 0), res
    assert "Traceback" not in res.stderr
    assert ns.dial("tcp", "192.0.2.5", 81).startswith("192.0.2.5 81")
    st = ns.status()
    assert st["tracing"] is None and st["program_id"] == plain
    assert running_program(ns)[0] == plain
    ns.ok("gc")
    assert not trace_dirs(ns)
    assert ns.dial("tcp", "192.0.2.5", 81).startswith("192.0.2.5 81")


@pytest.mark.parametrize("reader", [("metrics",), ("status", "--all"), ("doctor",)])
def test_any_reader_undoes_a_killed_trace(ns: NS, reader: tuple[str, ...]) -> None:
    _, plain = steered_ns(ns)
    proc = start_trace(ns)
    proc.kill()
    proc.wait()
    res = ns.cli(*reader)
    assert res.exit_code == 0, res.output
    assert running_program(ns)[0] == plain


def test_a_writer_that_changes_nothing_leaves_the_trace_alone(ns: NS) -> None:
    web, _ = steered_ns(ns)
    proc = start_trace(ns)
    try:
        traced = running_program(ns)
        ns.ok("attach", "tcp", "192.0.2.0/24", "80-89", "--to", f"127.0.0.1:{web}")  # no change
        assert running_program(ns) == traced
        # a second trace meanwhile: refused, naming the first, also while the first is stopped
        os.kill(proc.pid, signal.SIGSTOP)
        ns.ok("attach", "tcp", "203.0.113.0/24", "all", "--drop")  # a change: plain again
        second = ns.script("trace", "--seconds", "1")
        assert second.returncode == 4 and f"pid {proc.pid}" in second.stderr, second.stderr
        os.kill(proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 20
        while running_program(ns)[1] != "skl_trace":  # it follows the change
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "rule set changed" in err
    assert running_program(ns)[1] == "skl_dispatch"


def test_a_reader_opening_as_the_trace_ends(ns: NS, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tracer swaps back and unpins without the lock: a reader that saw the traced copy
    running and then finds its pin gone reads the plain program (it once failed, exit 4)."""
    from sklookupctl import store

    _, plain = steered_ns(ns)
    proc = start_trace(ns)
    real = store.Program.from_pin

    calls = []

    def end_the_trace_first(path: str, readonly: bool = False) -> store.Program:
        # the first open finds the traced copy's id; the link is then found running it; the
        # trace ends before the second open, which takes the copy to hold it
        if "/trace-" in path:
            calls.append(path)
            if len(calls) == 2:
                proc.terminate()
                proc.wait(timeout=30)
        return real(path, readonly)

    monkeypatch.setattr(store.Program, "from_pin", staticmethod(end_the_trace_first))
    st = ns.status()
    assert proc.returncode == 0 and len(calls) >= 2
    assert st["tracing"] is None and st["program_id"] == plain


@pytest.mark.parametrize("how", ["TERM", "INT"])
def test_a_signal_while_the_trace_follows_a_change_ends_it(ns: NS, how: str) -> None:
    """A signal that arrives while the tracer swaps the plain program back to follow a change
    (signals held meanwhile) still ends the trace, once the swap is done (it was dropped: the
    trace went on until its --seconds)."""
    steered_ns(ns)
    proc = start_trace(ns, "--seconds", "60", env={"SKLOOKUPCTL_FAULT": f"trace.stopping:1:{how}"})
    try:
        ns.ok("attach", "tcp", "203.0.113.0/24", "all", "--drop")  # a change: the trace follows
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert f"trace ended (SIG{how})" in err, err
    assert running_program(ns)[1] == "skl_dispatch"
