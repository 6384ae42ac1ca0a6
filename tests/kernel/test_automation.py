"""What fleets and scripts rely on (issue 9, item 5): one JSON shape for every writing command
with `changed` true or false, `apply --exit-code`, idempotent deletes with `--if-exists`,
global options after the command and from the environment, and an audit line per change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sklookupctl import api
from sklookupctl.cli import cli

from .conftest import NS

COMMON = {
    "command",
    "netns",
    "dry_run",
    "changed",
    "loaded_dispatcher",
    "generation",
    "rules",
    "targets",
    "notes",
}
RULES = '[[rules]]\nprotocol = "tcp"\nprefix = "192.0.2.0/24"\nports = "all"\naction = "drop"\n'


def js(ns: NS, *args: str) -> dict[str, object]:
    doc = json.loads(ns.ok(*args, "--json").stdout)
    assert isinstance(doc, dict)
    return doc


def test_every_writing_command_reports_in_one_shape(ns: NS, tmp_path: Path) -> None:
    ns.proxy(tcp="127.0.0.1:9000")
    to = ("--to", "127.0.0.1:9000")
    first = js(ns, "attach", "tcp", "198.51.100.0/24", "80", *to)
    again = js(ns, "attach", "tcp", "198.51.100.0/24", "80", *to)
    f = tmp_path / "r.toml"
    f.write_text(RULES)
    dry = js(ns, "apply", "--dry-run", str(f))
    applied = js(ns, "apply", str(f))
    gone = js(ns, "detach", "tcp", "192.0.2.0/24", "all")
    everything = js(ns, "detach", "--all")
    for doc in (first, again, dry, applied, gone, everything):
        assert set(doc) >= COMMON, doc
        assert isinstance(doc["changed"], bool)
        assert set(doc["rules"]) == set(doc["targets"]) == {"added", "removed", "changed"}  # type: ignore[arg-type]
    assert first["changed"] is True and again["changed"] is False
    assert first["rules"]["added"][0]["prefix"] == "198.51.100.0/24"  # type: ignore[index]
    assert first["targets"]["added"][0]["name"] == "tcp-127.0.0.1:9000"  # type: ignore[index]
    socket = first["sockets"][0]  # type: ignore[index]
    assert socket["address"] == "127.0.0.1:9000" and socket["holders"][0]["fd"] >= 0
    assert dry["changed"] is True and dry["dry_run"] is True and applied["changed"] is True
    assert len(applied["rules"]["removed"]) == 1  # type: ignore[index]
    assert gone["changed"] is True and gone["rules"]["removed"][0]["action"] == "drop"  # type: ignore[index]
    assert everything["changed"] is True and everything["dispatcher_removed"] is True
    assert js(ns, "detach", "--all")["changed"] is False
    gc = js(ns, "gc")
    assert gc["command"] == "gc" and gc["changed"] is False and gc["collected"] == []


def test_apply_exit_code_says_whether_anything_changed(ns: NS, tmp_path: Path) -> None:
    f = tmp_path / "r.toml"
    f.write_text(RULES)
    assert ns.cli("apply", "--dry-run", "--exit-code", str(f)).exit_code == 5
    assert ns.files() == []  # a dry run changes nothing
    assert ns.cli("apply", "--exit-code", str(f)).exit_code == 5
    assert ns.cli("apply", "--exit-code", str(f)).exit_code == 0
    assert ns.cli("apply", "--dry-run", "--exit-code", str(f)).exit_code == 0
    res = ns.cli("apply", "--exit-code", "--json", str(f))
    assert res.exit_code == 0 and json.loads(res.stdout)["changed"] is False
    bad = tmp_path / "bad.toml"
    bad.write_text(RULES.replace("all", "0"))
    assert ns.cli("apply", "--exit-code", str(bad)).exit_code == 1  # an error is not a change


def test_deletes_of_what_is_absent(ns: NS) -> None:
    # without a dispatcher
    res = ns.cli("detach", "tcp", "192.0.2.0/24", "80")
    assert res.exit_code == 1 and "--if-exists" in res.output
    doc = js(ns, "detach", "--if-exists", "tcp", "192.0.2.0/24", "80")
    assert doc["changed"] is False and "no sklookupctl dispatcher" in doc["notes"][0]  # type: ignore[index]
    assert ns.files() == []
    # with one, but not that rule
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--drop")
    files = ns.files()
    assert ns.cli("detach", "tcp", "192.0.2.0/24", "80").exit_code == 1
    res = ns.ok("detach", "tcp", "192.0.2.0/24", "80", "--if-exists")
    assert res.output == "no rule tcp 192.0.2.0/24 80: nothing to remove\n"
    assert ns.files() == files
    # and when it is there, --if-exists removes it
    assert js(ns, "detach", "--if-exists", "tcp", "192.0.2.0/24", "all")["changed"] is True


def test_global_options_after_the_command_and_from_the_environment(ns: NS) -> None:
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--drop")
    runner = CliRunner()
    res = runner.invoke(cli, ["status", "-n", ns.name, "--bpffs", ns.bpffs, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["loaded"] is True, res.output
    res = runner.invoke(
        cli,
        [
            "attach",
            "tcp",
            "198.51.100.0/24",
            "80",
            "--drop",
            "--netns",
            ns.name,
            f"--bpffs={ns.bpffs}",
        ],
    )
    assert res.exit_code == 0, res.output
    env = {"SKLOOKUPCTL_NETNS": ns.name, "SKLOOKUPCTL_BPFFS": ns.bpffs}
    res = runner.invoke(cli, ["export"], env=env)
    assert res.exit_code == 0 and "198.51.100.0/24" in res.stdout, res.output
    res = runner.invoke(cli, ["status", "-n", "sklt-none-such"], env=env)  # the option wins
    assert res.exit_code == 1 and "sklt-none-such" in res.stderr
    res = runner.invoke(cli, ["status"], env={**env, "SKLOOKUPCTL_NETNS": ""})
    assert res.exit_code == 2 and "SKLOOKUPCTL_NETNS is set but empty" in res.stderr


def test_one_audit_line_per_change(ns: NS, monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    monkeypatch.setattr(api, "AUDIT", lines.append)
    monkeypatch.setenv("SUDO_USER", "alice")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--drop")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--drop")  # no change, no line
    ns.ok("detach", "--all")
    assert lines == [
        f"attach in {ns.name}: generation 1, rules +1 -0 ~0, targets +0 -0 ~0; "
        "by uid 0 (sudo from alice)",
        f"detach --all in {ns.name}: removed the dispatcher and all rules; "
        "by uid 0 (sudo from alice)",
    ]


def test_demo_never_takes_a_namespace_it_did_not_make(ns: NS) -> None:
    files = ns.files()
    res = ns.cli("demo")  # -n is that of the test's own namespace, which exists
    assert res.exit_code == 1 and "the demo makes a namespace of its own" in res.output
    assert ns.files() == files


def test_namespaces_and_addresses_in_the_same_shape_and_idempotent(ns: NS) -> None:
    # addresses of the test's namespace (its prefixes are AnyIP already)
    assert js(ns, "addr", "add", "192.0.2.0/24")["changed"] is False
    doc = js(ns, "addr", "add", "2001:db8:99::/48")
    assert set(doc) >= COMMON and doc["command"] == "addr add" and doc["changed"] is True
    assert js(ns, "addr", "del", "2001:db8:99::/48")["changed"] is True
    assert ns.cli("addr", "del", "2001:db8:99::/48").exit_code == 1  # absent: an error
    assert js(ns, "addr", "del", "2001:db8:99::/48", "--if-exists")["changed"] is False
    # a namespace that is not there
    res = ns.cli("netns", "del", "sklt-none-such")
    assert res.exit_code == 1 and "does not exist" in res.output
    doc = js(ns, "netns", "del", "sklt-none-such", "--if-exists")
    assert doc["command"] == "netns del" and doc["changed"] is False
    assert js(ns, "netns", "add", ns.name)["changed"] is False  # it exists
