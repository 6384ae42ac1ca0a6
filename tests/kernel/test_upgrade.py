"""`upgrade` from the state of the version at commit 0a5435a (layout 3), installed into a
temporary venv from this repository's history: it loads rules, then this version upgrades them
under a connection storm. Zero refused connections, the same rules and targets, counters kept."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from sklookupctl import echo, rulefile
from sklookupctl import netns as nsmod

from .conftest import NS

REPO = Path(__file__).resolve().parents[2]
OLD = "0a5435a"


@pytest.fixture(scope="module")
def old_sklookupctl(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The command of version 0a5435a, installed into a venv of its own."""
    d = tmp_path_factory.mktemp(f"sklookupctl-{OLD}")
    src = d / "src"
    src.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", OLD], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    venv = d / "venv"
    subprocess.run(
        ["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True
    )
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(src)],
        check=True,
        capture_output=True,
        timeout=900,
    )
    return str(venv / "bin" / "sklookupctl")


def storm(ns: NS, stop: threading.Event, seen: list[str]) -> None:
    """Connections one after another until told to stop (at most 60 s)."""
    deadline = time.monotonic() + 60
    with nsmod.open_netns(ns.name) as n, nsmod.enter(n):
        i = 0
        while not stop.is_set() and time.monotonic() < deadline:
            i += 1
            seen.append(echo.dial_tcp(f"192.0.2.{1 + i % 200}", 80 + i % 1000))


def rules_of(text: str) -> tuple[object, object]:
    rf = rulefile.parse(text, "export")
    return rf.rules.rules, {n: (t.proto, t.to) for n, t in rf.targets.items()}


def test_upgrade_from_layout_3_refuses_no_connection(ns: NS, old_sklookupctl: str) -> None:
    old = [old_sklookupctl, "--netns", ns.name, "--bpffs", ns.bpffs]
    ns.proxy(tcp="127.0.0.1:9000", tag="web")
    for args in (
        ["attach", "tcp", "192.0.2.0/24", "all", "--to", "127.0.0.1:9000", "--name", "web"],
        ["attach", "tcp", "192.0.2.66", "22", "--drop"],
        ["attach", "tcp", "203.0.113.0/24", "443", "--to", "127.0.0.1:9000", "--name", "web"],
    ):
        subprocess.run([*old, *args], check=True, capture_output=True, timeout=120)
    before = subprocess.run([*old, "export"], check=True, capture_output=True, text=True)
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 web"
    # a rule the storm does not touch: its counters must come over exactly
    for i in range(7):
        assert ns.dial("tcp", f"203.0.113.{i + 1}", 443) == f"203.0.113.{i + 1} 443 web"
    # this version reads it as it is
    assert rules_of(ns.ok("export").stdout) == rules_of(before.stdout)
    st = ns.status()
    assert st["state"] == "other-layout" and st["layout"] == 3 and len(st["rules"]) == 3  # type: ignore[arg-type]
    assert "sklookupctl upgrade" in ns.ok("status").stdout
    # and refuses to write there, saying what to do
    res = ns.cli("attach", "tcp", "198.51.100.0/24", "80", "--drop")
    assert res.exit_code == 4 and "sklookupctl upgrade" in res.output, res.output
    stop, seen = threading.Event(), []
    threads = [threading.Thread(target=storm, args=(ns, stop, seen)) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    try:
        doc = json.loads(ns.ok("upgrade", "--json").stdout)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    bad = [s for s in seen if not s.endswith(" web")]
    print(f"upgrade storm: {len(seen)} connections, {len(bad)} not steered")
    assert seen and not bad, bad[:5]
    assert doc["command"] == "upgrade" and doc["changed"] is True and doc["from_layout"] == 3
    assert not [n for n in os.listdir(os.path.join(ns.bpffs, "sklookupctl")) if n.isdigit()]
    after = ns.ok("export").stdout
    assert rules_of(after) == rules_of(before.stdout)
    st = ns.status()
    (quiet,) = [r for r in st["rules"] if r["prefix"] == "203.0.113.0/24"]  # type: ignore[union-attr]
    # carried over (a late packet of a closed connection may add a lookup: at least those 7)
    assert quiet["counters"]["steered"] >= 7, quiet  # type: ignore[index]
    assert ns.dial("tcp", "192.0.2.66", 22) == "refused"
    ns.ok("attach", "tcp", "198.51.100.0/24", "80", "--drop")  # writing works again
    assert json.loads(ns.ok("upgrade", "--json").stdout)["changed"] is False


def test_a_new_dispatcher_of_the_same_layout_goes_live_with_upgrade(
    ns: NS, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sklookupctl import program

    ns.proxy(tcp="127.0.0.1:9000", tag="web")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", "127.0.0.1:9000", "--name", "web")
    st = ns.status()
    assert st["program_current"] is True and st["written_by"] == "v0.1.0"
    assert json.loads(ns.ok("upgrade", "--json").stdout)["changed"] is False
    # a later version whose dispatcher differs (a fix in bpf/dispatcher.c, same layout)
    monkeypatch.setattr(program, "tags", lambda compile_=True: {"0" * 16})
    assert ns.status()["program_current"] is False
    assert "`sklookupctl upgrade` loads it" in ns.ok("status").stdout
    doc = json.loads(ns.ok("upgrade", "--json").stdout)
    assert doc["changed"] is True and doc["generation"] == st["generation"] + 1  # type: ignore[operator]
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 web"
    assert ns.status()["rules"] == st["rules"] or len(ns.status()["rules"]) == 1  # type: ignore[arg-type]


def test_every_generation_keeps_its_rule_set_in_a_layout_free_record(ns: NS) -> None:
    from sklookupctl import store
    from sklookupctl.netns import open_netns

    ns.proxy(tcp="127.0.0.1:9000", tag="web")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", "127.0.0.1:9000", "--name", "web")
    ns.ok("attach", "tcp", "198.51.100.0/24", "22-23", "--drop")
    with open_netns(ns.name) as n, store.session(ns.bpffs, n, write=False) as s:
        assert s.dispatcher is not None and s.dispatcher.gen is not None
        got = s.dispatcher.gen.ruleset()
        live = s.live
    assert got is not None
    rules, targets = got
    assert {k: (r.action, r.target, r.on_missing) for k, r in rules.rules.items()} == live.rules
    assert targets == {"web": ("tcp", live.targets["web"].addr, 9000, False)}


def test_an_upgrade_cut_short_is_finished_and_never_wedges(
    ns: NS, old_sklookupctl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # round 4 of the adversarial tester: killed after this version's program was attached
    # (both states steer), then after the old link was unpinned; and two upgrades at once
    from sklookupctl import store

    old = [old_sklookupctl, "--netns", ns.name, "--bpffs", ns.bpffs]
    ns.proxy(tcp="127.0.0.1:9000", tag="web")
    args = ["attach", "tcp", "192.0.2.0/24", "all", "--to", "127.0.0.1:9000", "--name", "web"]
    subprocess.run([*old, *args], check=True, capture_output=True, timeout=120)

    def killed(self: object, n: object) -> bool:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(store.Store, "remove_legacy", killed)
        assert ns.cli("upgrade").exit_code == 130
    base = os.path.join(ns.bpffs, "sklookupctl")
    legacy = [n for n in os.listdir(base) if n.isdigit()]
    assert legacy and any(n.startswith("ns-") for n in os.listdir(base))  # both are there
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 web"
    assert ns.status()["state"] == "steering"  # readers see this version's
    os.unlink(os.path.join(base, legacy[0], "link"))  # and cut shorter still: no old link
    assert ns.status()["state"] == "steering"
    doc = json.loads(ns.ok("upgrade", "--json").stdout)
    assert doc["changed"] is True and "finished an upgrade" in doc["notes"][0]
    assert not [n for n in os.listdir(base) if n.isdigit()]
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 web"
    # a writer finishes it too
    subprocess.run([*old, "detach", "--all"], capture_output=True, timeout=60)
    ns.ok("detach", "--all")
    subprocess.run([*old, *args], check=True, capture_output=True, timeout=120)
    with monkeypatch.context() as m:
        m.setattr(store.Store, "remove_legacy", killed)
        assert ns.cli("upgrade").exit_code == 130
    ns.ok("attach", "tcp", "198.51.100.0/24", "80", "--drop")
    assert not [n for n in os.listdir(base) if n.isdigit()]
    # two upgrades at once: one does it, the other finds nothing (or finishes), both exit 0
    ns.ok("detach", "--all")
    subprocess.run([*old, *args], check=True, capture_output=True, timeout=120)
    both = [
        subprocess.Popen(ns.script_argv("upgrade", "--json"), stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in both]
    assert [p.returncode for p in both] == [0, 0], outs
    assert sum(json.loads(o)["changed"] for o in outs) >= 1
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 web"


def test_status_never_compiles_to_compare_programs(
    ns: NS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns.ok("attach", "tcp", "192.0.2.0/24", "80", "--drop")
    empty = tmp_path / "cache"
    monkeypatch.setenv("SKLOOKUPCTL_CACHE_DIR", str(empty))
    assert ns.status()["program_current"] is None  # cannot tell without a compiled image
    assert not [p for p in empty.iterdir() if p.name.startswith("dispatcher-")]
