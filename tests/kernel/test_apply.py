"""apply, --dry-run and export on a real netns: delivery, round trips, all-or-nothing, and
atomic switches under a stream of connections."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

from sklookupctl import api, echo
from sklookupctl import netns as nsmod

from .conftest import NS


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def rule(proto: str, prefix: str, ports: str, target: str | None, **extra: str) -> str:
    lines = [
        "[[rules]]",
        f'protocol = "{proto}"',
        f'prefix = "{prefix}"',
        f'ports = "{ports}"',
        f'target = "{target}"' if target else 'action = "drop"',
    ]
    lines += [f'{k} = "{v}"' for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def target(name: str, to: str) -> str:
    return f'[targets.{name}]\nto = "{to}"\n'


def web_file(tmp_path: Path, web: Any, host: str = "127.0.0.1") -> str:
    """A file of one target, web (the proxy `web`, listening on `host`), and one rule: all of
    192.0.2.0/24 over TCP to it."""
    text = target("web", f"{host}:{web.port}") + rule("tcp", "192.0.2.0/24", "all", "web")
    return write(tmp_path, "r.toml", text)


def test_apply_steers_and_export_round_trips(ns: NS, tmp_path: Path) -> None:
    web = ns.proxy(tcp="127.0.0.1:0", tag="web")
    dns = ns.proxy(udp="127.0.0.1:0", tag="dns")
    six = ns.proxy(tcp="[::]:0", tag="six")
    text = (
        target("web", f"127.0.0.1:{web.port}")
        + target("dns", f"127.0.0.1:{dns.port}")
        + target("six", f"[::]:{six.port}")
        + rule("tcp", "192.0.2.0/24", "all", "web")
        + rule("tcp", "192.0.2.0/25", "22", None)
        + rule("udp", "198.51.100.0/24", "53", "dns")
        + rule("tcp", "2001:db8::/64", "443-444", "six", on_missing="pass")
    )
    f = write(tmp_path, "rules.toml", text)
    res = ns.ok("apply", f)
    assert "applied" in res.output and "loaded the dispatcher" in res.output
    assert ns.dial("tcp", "192.0.2.200", 22) == "192.0.2.200 22 web"  # /25 drop is 0-127
    assert ns.dial("tcp", "192.0.2.5", 22) == "refused"
    assert ns.dial("tcp", "192.0.2.5", 8443) == "192.0.2.5 8443 web"
    assert ns.dial("udp", "198.51.100.9", 53) == "198.51.100.9 53 dns"
    assert ns.dial("tcp", "2001:db8::7", 444) == "2001:db8::7 444 six"
    assert ns.dial("tcp", "2001:db8::7", 445) == "refused"  # no rule, no listener

    st = ns.status()
    gen = st["generation"]
    exported = ns.ok("export").stdout
    again = write(tmp_path, "export.toml", exported)
    dry = json.loads(ns.ok("apply", "--dry-run", "--json", again).stdout)
    assert dry["changed"] is False and dry["dry_run"] is True
    assert not dry["rules"]["added"] and not dry["rules"]["removed"]
    assert not dry["rules"]["changed"]
    assert not dry["targets"]["added"] and not dry["targets"]["changed"]
    res = ns.ok("apply", again)
    assert "nothing to change" in res.output
    assert ns.status()["generation"] == gen  # nothing was rebuilt
    assert ns.ok("export").stdout == exported


def test_dry_run_touches_nothing(ns: NS, tmp_path: Path) -> None:
    web = ns.proxy(tcp="127.0.0.1:0", tag="web")
    f = web_file(tmp_path, web)
    res = ns.ok("apply", "--dry-run", f)
    assert "dry run: would apply" in res.output and "+ tcp 192.0.2.0/24 all -> web" in res.output
    assert ns.files() == [] and not ns.status()["loaded"]
    assert ns.dial("tcp", "192.0.2.1", 80) == "refused"

    ns.ok("apply", f)
    files, st = ns.files(), ns.status()
    g = write(
        tmp_path,
        "g.toml",
        target("web", f"127.0.0.1:{web.port}") + rule("tcp", "198.51.100.0/24", "80", "web"),
    )
    res = ns.ok("apply", "-N", g)
    assert "+ tcp 198.51.100.0/24 80 -> web" in res.output
    assert "- tcp 192.0.2.0/24 all -> web" in res.output
    assert ns.files() == files and ns.status() == st


def test_a_file_that_cannot_be_applied_changes_nothing(ns: NS, tmp_path: Path) -> None:
    web = ns.proxy(tcp="127.0.0.1:0", tag="web")
    v4only = ns.proxy(tcp="127.0.0.2:0", tag="v4")
    udp = ns.proxy(udp="127.0.0.1:0", tag="u")
    good = target("web", f"127.0.0.1:{web.port}") + rule("tcp", "192.0.2.0/24", "all", "web")
    ns.ok("apply", write(tmp_path, "good.toml", good))
    files, st = ns.files(), ns.status()
    cases = [
        (
            target("web", "127.0.0.1:1") + rule("tcp", "192.0.2.0/24", "all", "web"),
            "targets.web.to: no tcp socket listens at 127.0.0.1:1",
        ),
        (
            target("web", f"127.0.0.2:{v4only.port}")
            + rule("tcp", "192.0.2.0/24", "all", "web")
            + rule("tcp", "2001:db8::/64", "all", "web"),
            "rules[1].target: the socket at 127.0.0.2",
        ),
        (
            target("web", f"127.0.0.1:{udp.port}") + rule("tcp", "192.0.2.0/24", "all", "web"),
            "targets.web.to: no tcp socket listens",
        ),
        (good + rule("tcp", "192.0.2.0/24", "80-90", "web") + "ports = 3\n", "not valid TOML"),
        (good + rule("tcp", "192.0.2.0/24", "90-80", "web"), "rules[1].ports: port range"),
        (
            "[targets.web]\npid = 999999999\nfd = 3\n" + rule("tcp", "192.0.2.0/24", "1", "web"),
            "targets.web.pid",
        ),
    ]
    for i, (text, words) in enumerate(cases):
        f = write(tmp_path, f"bad{i}.toml", text)
        res = ns.cli("apply", f)
        assert res.exit_code == 1, res.output
        assert res.output.startswith(f"error: {f}: "), res.output
        assert words in res.output, res.output
        assert "Traceback" not in res.output and res.output.count("\n") == 1
        assert ns.files() == files and ns.status() == st
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 web"
    missing = ns.cli("apply", str(tmp_path / "nope.toml"))
    assert missing.exit_code != 0 and "nope.toml" in missing.output


def test_a_target_moved_to_another_socket(ns: NS, tmp_path: Path) -> None:
    a = ns.proxy(tcp="127.0.0.1:0", tag="a")
    b = ns.proxy(tcp="127.0.0.1:0", tag="b")
    rules = rule("tcp", "192.0.2.0/24", "all", "web")
    ns.ok("apply", write(tmp_path, "a.toml", target("web", f"127.0.0.1:{a.port}") + rules))
    assert ns.dial("tcp", "192.0.2.1", 80).endswith(" a")
    res = ns.ok("apply", write(tmp_path, "b.toml", target("web", f"127.0.0.1:{b.port}") + rules))
    assert f"~ target web 127.0.0.1:{a.port} -> 127.0.0.1:{b.port}" in res.output
    assert ns.dial("tcp", "192.0.2.1", 80).endswith(" b")
    st = ns.status()
    assert [t["address"] for t in st["targets"]] == [f"127.0.0.1:{b.port}"]  # old slot freed


def test_applies_under_a_stream_of_connections(ns: NS, tmp_path: Path) -> None:
    """Two rule sets that each accept every port of 192.0.2.0/24, through different rules and
    different proxies: every connection reaches one of them, whatever the moment."""
    x = ns.proxy(tcp="127.0.0.1:0", tag="x")
    y = ns.proxy(tcp="127.0.0.1:0", tag="y")
    one = target("x", f"127.0.0.1:{x.port}") + rule("tcp", "192.0.2.0/24", "all", "x")
    two = (
        target("y", f"127.0.0.1:{y.port}")
        + rule("tcp", "192.0.2.0/25", "1-30000", "y")
        + rule("tcp", "192.0.2.0/25", "30001-65535", "y")
        + rule("tcp", "192.0.2.128/25", "all", "y")
    )
    files = [write(tmp_path, "one.toml", one), write(tmp_path, "two.toml", two)]
    api.apply(ns.name, files[0], bpffs=ns.bpffs)
    stop = threading.Event()
    bad: list[str] = []
    seen = {"x": 0, "y": 0}

    def client() -> None:
        rng = random.Random(1)
        with nsmod.open_netns(ns.name) as n, nsmod.enter(n):
            while not stop.is_set():
                host, port = f"192.0.2.{rng.randrange(256)}", rng.randrange(1, 65536)
                got = echo.dial_tcp(host, port)
                if got in (f"{host} {port} x", f"{host} {port} y"):
                    seen[got[-1]] += 1
                else:
                    bad.append(f"{host}:{port} -> {got}")

    t = threading.Thread(target=client)
    t.start()
    try:
        for i in range(30):
            api.apply(ns.name, files[(i + 1) % 2], bpffs=ns.bpffs)
            time.sleep(0.01)
    finally:
        stop.set()
        t.join(timeout=30)
    assert not bad, bad[:5]
    assert seen["x"] > 20 and seen["y"] > 20, seen
    st = ns.status()
    assert st["generation"] == 31


def _rules_not_read(monkeypatch: Any) -> list[str]:
    """Make reading a file's rules fail loudly, and count the reads of a file's head only."""
    from sklookupctl import rulefile

    seen: list[str] = []
    parse = rulefile.parse

    def spy(text: str, name: str, progress: Any = None, known: Any = None) -> Any:
        seen.append("head" if known is not None else "whole")
        return parse(text, name, progress, known)

    monkeypatch.setattr(rulefile, "parse", spy)
    return seen


def test_the_same_file_again_is_not_read_again(ns: NS, tmp_path: Path, monkeypatch: Any) -> None:
    """apply keeps a digest of the file (and of the code that read it) with the rules; the
    same file applied again has only its head read (targets, [netns]), as long as nothing
    changed the rules since. Anything that did (attach, detach, another file, another apply
    between the look and the lock) has the file read whole."""
    web = ns.proxy(tcp="127.0.0.1:0", tag="web")
    rules = rule("tcp", "192.0.2.0/24", "all", "web") + rule("tcp", "192.0.2.0/25", "22", None)
    f = write(tmp_path, "r.toml", target("web", f"127.0.0.1:{web.port}") + rules)
    seen = _rules_not_read(monkeypatch)
    ns.ok("apply", f)
    gen = ns.status()["generation"]
    res = json.loads(ns.ok("apply", "--json", f).stdout)
    assert seen == ["whole", "head"]
    assert res["changed"] is False and res["rule_count"] == 2
    assert ns.status()["generation"] == gen
    assert ns.dial("tcp", "192.0.2.200", 22).endswith(" web")
    assert ns.dial("tcp", "192.0.2.5", 22) == "refused"

    # a rule attached: the live rules are no longer the file's; the file puts them back
    ns.ok("attach", "tcp", "192.0.2.0/24", "80", "--drop")
    seen.clear()
    res = json.loads(ns.ok("apply", "--json", f).stdout)
    assert seen == ["whole"] and res["changed"] is True
    assert [r["ports"] for r in res["rules"]["removed"]] == ["80"]
    assert ns.dial("tcp", "192.0.2.9", 80).endswith(" web")
    seen.clear()
    ns.ok("apply", f)
    assert seen == ["head"]

    # the same file, its target's socket replaced: the rules are kept as they are, and are
    # still the file's afterwards
    web.stop()
    ns.proxy(tcp=f"127.0.0.1:{web.port}", tag="again")  # the same address, another socket
    seen.clear()
    res = json.loads(ns.ok("apply", "--json", f).stdout)
    assert seen == ["head"] and res["changed"] is True and res["rule_count"] == 2
    assert ns.dial("tcp", "192.0.2.200", 22).endswith(" again")
    assert ns.dial("tcp", "192.0.2.5", 22) == "refused"
    assert [r["ports"] for r in ns.status()["rules"]] == ["22", "all"]
    seen.clear()
    assert json.loads(ns.ok("apply", "--json", f).stdout)["changed"] is False
    assert seen == ["head"]

    # a file with the same rules but other bytes: read whole (and nothing changes)
    g = write(tmp_path, "g.toml", "# another file\n" + f_text(f))
    seen.clear()
    assert json.loads(ns.ok("apply", "--json", g).stdout)["changed"] is False
    assert seen == ["whole"]


def test_a_file_found_live_is_noted(ns: NS, tmp_path: Path, monkeypatch: Any) -> None:
    """An apply that reads a file whole and finds its rules live (here: a rule attached and
    detached since the file was applied) notes the file with the live generation: the same
    file again reads only its head. A dry run notes nothing; any change forgets the note."""
    web = ns.proxy(tcp="127.0.0.1:0", tag="web")
    f = web_file(tmp_path, web)
    seen = _rules_not_read(monkeypatch)
    ns.ok("apply", f)
    ns.ok("attach", "tcp", "192.0.2.0/24", "80", "--drop")
    ns.ok("detach", "tcp", "192.0.2.0/24", "80")
    gen = ns.status()["generation"]
    seen.clear()
    assert json.loads(ns.ok("apply", "--dry-run", "--json", f).stdout)["changed"] is False
    assert json.loads(ns.ok("apply", "--json", f).stdout)["changed"] is False
    assert seen == ["whole", "whole"]  # the dry run noted nothing
    seen.clear()
    assert json.loads(ns.ok("apply", "--json", f).stdout)["changed"] is False
    assert seen == ["head"]
    assert ns.status()["generation"] == gen  # noted, not rebuilt
    assert ns.dial("tcp", "192.0.2.9", 80).endswith(" web")

    ns.ok("attach", "tcp", "192.0.2.0/24", "80", "--drop")  # a change: the note goes with it
    seen.clear()
    res = json.loads(ns.ok("apply", "--json", f).stdout)
    assert seen == ["whole"] and res["changed"] is True
    seen.clear()
    ns.ok("apply", f)
    assert seen == ["head"]
    assert ns.dial("tcp", "192.0.2.9", 80).endswith(" web")


def f_text(path: str) -> str:
    return Path(path).read_text()


def test_rules_changed_between_the_look_and_the_lock(
    ns: NS, tmp_path: Path, monkeypatch: Any
) -> None:
    """The look at the live rules' source happens before the lock: a writer in between (here:
    an attach made just after the look) has the file's rules read under the lock after all."""
    from sklookupctl import api as apimod

    web = ns.proxy(tcp="127.0.0.1:0", tag="web")
    f = web_file(tmp_path, web)
    ns.ok("apply", f)
    look = apimod._live_from

    def look_then_attach(netns: Any, bpffs: str, source: str) -> Any:
        known = look(netns, bpffs, source)
        assert known == {"web": "tcp"}
        monkeypatch.setattr(apimod, "_live_from", look)
        ns.ok("attach", "tcp", "192.0.2.0/24", "80", "--drop")
        return known

    monkeypatch.setattr(apimod, "_live_from", look_then_attach)
    res = json.loads(ns.ok("apply", "--json", f).stdout)
    assert res["changed"] is True and [r["ports"] for r in res["rules"]["removed"]] == ["80"]
    assert ns.dial("tcp", "192.0.2.9", 80).endswith(" web")
    assert [r["ports"] for r in ns.status()["rules"]] == ["all"]


def test_the_same_file_again_when_a_socket_cannot_take_its_rules(ns: NS, tmp_path: Path) -> None:
    """The same file again, its target's socket now IPv6-only beside an IPv4 rule: the error
    names the rule in the file, as for any other file (it was a KeyError: the file's rules had
    not been read)."""
    web = ns.proxy(tcp="[::]:0", tag="web")
    f = web_file(tmp_path, web, "[::]")
    ns.ok("apply", f)
    web.stop()
    ns.proxy(tcp=f"[::]:{web.port}", v6only=True, tag="six")
    for args in (("apply", f), ("apply", "--dry-run", f)):
        res = ns.cli(*args)
        assert res.exit_code == 1, res.output
        assert f"{f}: rules[0].target: the socket at [::]:{web.port} is IPv6-only" in res.output


def _steer_and_count(ns: NS, tmp_path: Path) -> list[tuple[str, str, int, int]]:
    """apply, connections, attach one more rule, connections, detach it: each rule's
    (prefix, ports, steered, dropped) at the end, and the target's totals last (which keep
    what the detached rule counted)."""
    web = ns.proxy(tcp="127.0.0.1:0", tag="web")
    text = (
        target("web", f"127.0.0.1:{web.port}")
        + rule("tcp", "192.0.2.0/24", "all", "web")
        + rule("tcp", "192.0.2.0/25", "22", None)
        + rule("tcp", "203.0.113.0/24", "443", "web")
    )
    ns.ok("apply", write(tmp_path, "rules.toml", text))
    # lookups by the live program: one each (a real connection may be looked up again)
    for _ in range(3):
        assert ns.look("tcp", "192.0.2.5", 80) == "steer"
    assert ns.look("tcp", "192.0.2.5", 22) == "drop"
    ns.ok("attach", "tcp", "192.0.2.200/32", "80", "--to", f"127.0.0.1:{web.port}", "--name", "web")
    assert ns.look("tcp", "192.0.2.200", 80) == "steer"
    assert ns.look("tcp", "192.0.2.6", 80) == "steer"
    ns.ok("detach", "tcp", "192.0.2.200/32", "80")
    assert ns.look("tcp", "203.0.113.1", 443) == "steer"
    st = ns.status()
    rows = [
        (r["prefix"], r["ports"], r["counters"]["steered"], r["counters"]["dropped"])
        for r in st["rules"]  # type: ignore[attr-defined]
    ]
    (web_total,) = [t["counters"] for t in st["targets"] if t["name"] == "web"]  # type: ignore[attr-defined]
    return [*rows, ("web", "", web_total["steered"], web_total["dropped"])]


def test_large_rule_set_paths_steer_count_and_carry(
    ns: NS, tmp_path: Path, monkeypatch: Any
) -> None:
    """What only large rule sets take (tables built with numpy, the counters map made by
    another thread, counters carried and added up with numpy), taken by a small set with
    image.VECTOR_MIN lowered, against the small set's own paths: the same steering, and the
    same counters carried across attach and detach (the live rules edited: tables built from
    the records). A build that fails leaks nothing, nor does a record that fails to be made
    (by another thread)."""
    from sklookupctl import image, record, store, vector

    from .conftest import PREFIXES, assert_no_leaks, kernel_objects, throwaway

    base = kernel_objects()
    calls: dict[str, int] = {"carry": 0, "ahead": 0, "edited": 0}
    carry, ahead, edited = vector.carry, store._Ahead.__init__, vector.build_edited

    def counting_carry(*a: Any) -> Any:
        calls["carry"] += 1
        return carry(*a)

    def counting_edited(*a: Any) -> Any:
        calls["edited"] += 1
        return edited(*a)

    def counting_ahead(self: Any, rules: int) -> None:
        calls["ahead"] += 1
        ahead(self, rules)

    monkeypatch.setattr(vector, "carry", counting_carry)
    monkeypatch.setattr(vector, "build_edited", counting_edited)
    monkeypatch.setattr(store._Ahead, "__init__", counting_ahead)
    small = _steer_and_count(ns, tmp_path)
    assert calls == {"carry": 0, "ahead": 0, "edited": 0}
    monkeypatch.setattr(image, "VECTOR_MIN", 1)
    with throwaway(ns.bpffs, PREFIXES) as ns2:
        large = _steer_and_count(ns2, tmp_path)
        assert calls["carry"] >= 2 and calls["ahead"] >= 3 and calls["edited"] >= 2

        def fail(*a: Any, **k: Any) -> Any:
            raise RuntimeError("injected")

        encode = image.encode
        monkeypatch.setattr(image, "encode", fail)
        res = ns2.cli("attach", "tcp", "203.0.113.0/24", "80", "--drop")
        assert res.exit_code == 70 and "injected" in res.output, res.output
        assert_no_leaks(ns.bpffs, base)
        monkeypatch.setattr(image, "encode", encode)
        monkeypatch.setattr(record, "encode", fail)  # in the thread that makes the record
        files = ns2.files()
        res = ns2.cli("attach", "tcp", "203.0.113.0/24", "80", "--drop")
        assert res.exit_code == 70 and "injected" in res.output, res.output
        assert ns2.files() == files
        assert_no_leaks(ns.bpffs, base)
    assert large == small
    assert small == [
        ("192.0.2.0/25", "22", 0, 1),
        ("192.0.2.0/24", "all", 4, 0),
        ("203.0.113.0/24", "443", 1, 0),
        ("web", "", 6, 0),
    ]


def test_counters_made_ahead_for_the_size_expected(
    ns: NS, tmp_path: Path, monkeypatch: Any
) -> None:
    """attach and detach of a large set start making the new generation's counters map (slow
    for the kernel) before they plan, for one rule more or less; the generation then uses
    that map. A change of another size (--replace keeps the count) makes its own, and one
    that changes nothing (detach --if-exists of no rule) discards it: no map left behind, and
    every generation's counters map has one entry per rule (and entry 0)."""
    import glob
    import os

    from sklookupctl import api, image, store

    from .conftest import assert_no_leaks, kernel_objects

    monkeypatch.setattr(image, "VECTOR_MIN", 1)
    events: list[str] = []
    ahead, make_plan = store._Ahead.__init__, api.make_plan

    def logged_ahead(self: Any, rules: int) -> None:
        events.append(f"ahead {rules}")
        ahead(self, rules)

    def logged_plan(*a: Any, **k: Any) -> Any:
        events.append("plan")
        return make_plan(*a, **k)

    monkeypatch.setattr(store._Ahead, "__init__", logged_ahead)
    monkeypatch.setattr(api, "make_plan", logged_plan)
    web = ns.proxy(tcp="127.0.0.1:0", tag="web")
    to = ("--to", f"127.0.0.1:{web.port}", "--name", "web")
    text = (
        target("web", f"127.0.0.1:{web.port}")
        + rule("tcp", "192.0.2.0/24", "all", "web")
        + rule("tcp", "198.51.100.0/24", "80", None)
    )
    ns.ok("apply", write(tmp_path, "rules.toml", text))
    base = kernel_objects()

    def counters() -> tuple[int, int]:
        (path,) = glob.glob(os.path.join(ns.bpffs, "sklookupctl", "ns-*", store.GEN_PREFIX + "*"))
        with store.Generation.open(path, readonly=True) as g:
            return g.meta().rules, int(g.maps["counters"].info().max_entries)

    steered, new = "192.0.2.5 80 web", "203.0.113.5 80 web"
    # (the command, what it logs, the rules after it, where connections to 192.0.2.5:80 and
    # 203.0.113.5:80 then land)
    cases = [
        (("attach", "tcp", "203.0.113.0/24", "80", *to), ["ahead 3", "plan"], 3, steered, new),
        (("detach", "tcp", "203.0.113.0/24", "80"), ["ahead 2", "plan"], 2, steered, "refused"),
        # --replace of a rule that is there: one rule more was expected, the count stays
        (
            ("attach", "tcp", "192.0.2.0/24", "all", "--drop", "--replace"),
            ["ahead 3", "plan", "ahead 2"],
            2,
            "refused",
            "refused",
        ),
        (
            ("detach", "tcp", "203.0.113.0/24", "80", "--if-exists"),
            ["ahead 1", "plan"],
            2,
            "refused",
            "refused",
        ),
    ]
    for args, want, rules, at_steered, at_new in cases:
        events.clear()
        ns.ok(*args)
        assert events == want, args
        assert counters() == (rules, rules + 1), args
        assert_no_leaks(ns.bpffs, base)
        assert ns.dial("tcp", "192.0.2.5", 80) == at_steered, args
        assert ns.dial("tcp", "203.0.113.5", 80) == at_new, args
    got = [(r["prefix"], r["action"]) for r in ns.status()["rules"]]  # type: ignore[index]
    assert got == [("192.0.2.0/24", "drop"), ("198.51.100.0/24", "drop")]
