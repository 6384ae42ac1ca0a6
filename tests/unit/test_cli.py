"""Every command through click's CliRunner, with the library replaced: arguments reach the
library as given, output is what people and programs expect, errors are one line."""

from __future__ import annotations

import json
from typing import Any

import click
import pytest
from click.testing import CliRunner

from sklookupctl import api, rules
from sklookupctl.cli import cli
from sklookupctl.errors import CompileError, InvalidArgument, NotFound


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def fake(self, name: str, result: Any = None, raises: Exception | None = None) -> Any:
        def f(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            if raises is not None:
                raise raises
            return result

        return f


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    r = Recorder()
    rule = rules.make_rule("tcp", "192.0.2.0/24", "all", target="tcp-127.0.0.1:8080")
    monkeypatch.setattr(
        api,
        "attach",
        r.fake(
            "attach",
            api.AttachResult(
                rule,
                changed=True,
                loaded=True,
                netns="edge",
                target=rule.target,
                socket="127.0.0.1:8080, pid 1 (proxy) fd 3",
            ),
        ),
    )
    monkeypatch.setattr(
        api,
        "detach",
        r.fake("detach", api.DetachResult("edge", "tcp 192.0.2.0/24 all -> x", False)),
    )
    monkeypatch.setattr(
        api,
        "detach_all",
        r.fake("detach_all", api.DetachResult("edge", "dispatcher and all rules", True)),
    )
    monkeypatch.setattr(api, "status", r.fake("status", STATUS))
    monkeypatch.setattr(api, "netns_add", r.fake("netns_add", True))
    monkeypatch.setattr(api, "netns_del", r.fake("netns_del", True))
    monkeypatch.setattr(api, "netns_list", r.fake("netns_list", [{"name": "edge", "inode": 7}]))
    monkeypatch.setattr(api, "addr_add", r.fake("addr_add", True))
    monkeypatch.setattr(api, "addr_del", r.fake("addr_del"))
    monkeypatch.setattr(api, "addr_list", r.fake("addr_list", ["192.0.2.0/24"]))
    return r


STATUS: dict[str, Any] = {
    "netns": "edge",
    "netns_inode": 7,
    "bpffs": "/sys/fs/bpf",
    "loaded": True,
    "path": "/sys/fs/bpf/sklookupctl/7",
    "program_id": 10,
    "link_id": 3,
    "position": 1,
    "other_programs": [],
    "generation": 1,
    "memlock": 3 * 2**20,
    "rules": [
        {
            "protocol": "tcp",
            "prefix": "192.0.2.0/24",
            "ports": "all",
            "action": "steer",
            "target": "web",
            "on_missing": "drop",
            "counters": {"lookups": 12, "steered": 9, "dropped": 3, "missing": 3, "errors": 0},
        }
    ],
    "targets": [
        {
            "name": "web",
            "protocol": "tcp",
            "address": "127.0.0.1:8080",
            "socket": "missing",
            "cookie": None,
            "holders": [],
        }
    ],
}


def run(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def test_attach_passes_everything(rec: Recorder) -> None:
    res = run(
        "--netns",
        "edge",
        "--bpffs",
        "/b",
        "attach",
        "tcp",
        "192.0.2.0/24",
        "1-65535",
        "--to",
        "127.0.0.1:8080",
        "--name",
        "web",
        "--on-missing",
        "pass",
        "--replace",
    )
    assert res.exit_code == 0, res.output
    assert rec.calls == [
        (
            "attach",
            ("edge", "tcp", "192.0.2.0/24", "1-65535"),
            {
                "to": "127.0.0.1:8080",
                "pid": None,
                "fd": None,
                "drop": False,
                "name": "web",
                "on_missing": "pass",
                "replace": True,
                "bpffs": "/b",
            },
        )
    ]
    assert "loaded the dispatcher into edge" in res.output
    assert "added tcp 192.0.2.0/24 all -> tcp-127.0.0.1:8080" in res.output


def test_attach_json(rec: Recorder) -> None:
    res = run("attach", "tcp", "192.0.2.0/24", "all", "--drop", "--json")
    data = json.loads(res.stdout)
    assert data["loaded_dispatcher"] is True and data["rule"]["prefix"] == "192.0.2.0/24"


def test_attach_on_missing_choice(rec: Recorder) -> None:
    res = run("attach", "tcp", "192.0.2.0/24", "all", "--drop", "--on-missing", "maybe")
    assert res.exit_code == 2 and "maybe" in res.output and not rec.calls


def test_detach_one_and_all(rec: Recorder) -> None:
    assert run("-n", "edge", "detach", "tcp", "192.0.2.0/24", "all").exit_code == 0
    res = run("-n", "edge", "detach", "--all", "--json")
    assert json.loads(res.stdout)["dispatcher_removed"] is True
    assert [c[0] for c in rec.calls] == ["detach", "detach_all"]


@pytest.mark.parametrize(
    "args", [["detach"], ["detach", "tcp"], ["detach", "--all", "tcp", "192.0.2.0/24", "all"]]
)
def test_detach_usage(rec: Recorder, args: list[str]) -> None:
    res = run(*args)
    assert res.exit_code == 2 and not rec.calls


def test_status_text_and_json(rec: Recorder) -> None:
    res = run("-n", "edge", "status")
    assert res.exit_code == 0
    assert "program 10, link 3" in res.output and "MISSING" in res.output
    assert "steer -> web" in res.output
    assert "generation 1, 3.0 MiB" in res.output
    row = next(line for line in res.output.splitlines() if "steer -> web" in line)
    assert [c.strip() for c in row.split("│")[-6:-1]] == ["12", "9", "3", "3", "0"]
    assert json.loads(run("status", "--json").stdout) == STATUS


def test_status_not_loaded(rec: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        api,
        "status",
        rec.fake(
            "status",
            {
                "netns": "edge",
                "netns_inode": 7,
                "loaded": False,
                "other_programs": [42],
                "rules": [],
                "targets": [],
            },
        ),
    )
    res = run("status")
    assert "no sklookupctl dispatcher" in res.output and "42" in res.output


def test_netns_commands(rec: Recorder) -> None:
    assert "created network namespace edge" in run("netns", "add", "edge").output
    assert "deleted network namespace edge and its dispatcher" in run("netns", "del", "edge").output
    assert json.loads(run("netns", "list", "--json").stdout) == [{"name": "edge", "inode": 7}]
    assert "edge" in run("netns", "list").output


def test_addr_commands(rec: Recorder) -> None:
    assert "added 192.0.2.0/24" in run("-n", "edge", "addr", "add", "192.0.2.0/24").output
    assert "removed" in run("-n", "edge", "addr", "del", "192.0.2.0/24").output
    assert json.loads(run("addr", "list", "--json").stdout) == ["192.0.2.0/24"]
    assert rec.calls[0] == ("addr_add", ("edge", "192.0.2.0/24"), {})


def test_library_errors_become_one_line(rec: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        api,
        "attach",
        rec.fake(
            "attach",
            raises=NotFound("no tcp socket listens at 127.0.0.1:1", "start the proxy first"),
        ),
    )
    res = run("attach", "tcp", "192.0.2.0/24", "all", "--to", "127.0.0.1:1")
    assert res.exit_code == 1
    assert res.output == ("error: no tcp socket listens at 127.0.0.1:1 (start the proxy first)\n")


def test_compile_errors_show_the_log(rec: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        api,
        "attach",
        rec.fake(
            "attach",
            raises=CompileError("the dispatcher failed to compile", "main.c:3: error: boom"),
        ),
    )
    res = run("attach", "tcp", "192.0.2.0/24", "all", "--drop")
    assert res.exit_code == 1
    assert res.output == "error: the dispatcher failed to compile\nmain.c:3: error: boom\n"


def test_real_parsing_errors_without_root() -> None:
    # the real library: input is checked before privileges, the netns or bpffs
    res = run("--netns", "/nonexistent", "attach", "tcp", "192.0.2.1/24", "all", "--drop")
    assert res.exit_code == 1
    assert "has host bits set (did you mean 192.0.2.0/24?)" in res.output
    res = run("attach", "tcp", "192.0.2.0/24", "all")
    assert "give exactly one of" in res.output
    with pytest.raises(InvalidArgument):
        api.attach(None, "tcp", "192.0.2.0/24", "0", drop=True)


def _walk(group: click.Group, path: list[str]) -> list[tuple[list[str], click.Command]]:
    out = []
    for name, cmd in group.commands.items():
        out.append(([*path, name], cmd))
        if isinstance(cmd, click.Group):
            out += _walk(cmd, [*path, name])
    return out


@pytest.mark.parametrize("path", [p for p, _ in _walk(cli, [])], ids=" ".join)
def test_every_command_has_help(path: list[str]) -> None:
    res = run(*path, "--help")
    assert res.exit_code == 0
    assert "Usage:" in res.output
    cmd = dict((tuple(p), c) for p, c in _walk(cli, []))[tuple(path)]
    assert cmd.help and len(cmd.help) > 20
    for param in cmd.params:
        if isinstance(param, click.Option):
            assert param.help, f"{path} {param.name} has no help"


def test_top_level_help_teaches() -> None:
    out = run("--help").output
    assert "attach tcp 192.0.2.0/24" in out and "--netns" in out
