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
                rule_changed=True,
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
            "counters": {
                "lookups": 12,
                "steered": 9,
                "dropped": 3,
                "passed": 0,
                "missing": 3,
                "errors": 0,
            },
        }
    ],
    "targets": [
        {
            "name": "web",
            "protocol": "tcp",
            "address": "127.0.0.1:8080",
            "reuseport": "group",
            "socket": "missing",
            "cookie": None,
            "cookies": [],
            "members": 1,
            "alive": 0,
            "slots": [0, 0],
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
                "exact": False,
                "allow_missing": False,
                "bpffs": "/b",
                "wait": 10.0,
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
    assert [c.strip() for c in row.split("│")[-7:-1]] == ["12", "9", "3", "0", "3", "0"]
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
    assert res.exit_code == 4
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


def apply_result(dry_run: bool, n_added: int = 3) -> api.ApplyResult:
    web = [rules.make_rule("tcp", f"198.51.100.{i}", "443", target="web") for i in range(n_added)]
    old = rules.make_rule("tcp", "192.0.2.0/24", "all", target="web")
    return api.ApplyResult(
        "edge",
        "r.toml",
        dry_run,
        rules=n_added + 1,
        applied=not dry_run,
        generation=4,
        added=web,
        changed=[(old, rules.Rule(old.key, rules.DROP))],
        removed=[rules.make_rule("udp", "203.0.113.0/24", "53", target="dns")],
        targets_added=["web 127.0.0.1:8080"],
        targets_removed=["dns 127.0.0.1:53"],
        notes=["target spare is not used by any rule: not registered"],
    )


def test_apply_passes_everything_and_prints_the_difference(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "apply", rec.fake("apply", apply_result(dry_run=True)))
    res = run("-n", "edge", "--bpffs", "/b", "apply", "--dry-run", "r.toml")
    assert res.exit_code == 0, res.output
    assert rec.calls == [
        (
            "apply",
            ("edge", "r.toml"),
            {
                "dry_run": True,
                "bpffs": "/b",
                "progress": None,
                "wait": 10.0,
                "allow_missing": False,
            },
        )
    ]
    lines = res.output.splitlines()
    assert lines[0] == "note: target spare is not used by any rule: not registered"
    assert "  + target web 127.0.0.1:8080" in lines
    assert "  - target dns 127.0.0.1:53" in lines
    assert "  + tcp 198.51.100.0/32 443 -> web" in lines
    assert "  ~ tcp 192.0.2.0/24 all drop (was -> web)" in lines
    assert "  - udp 203.0.113.0/24 53 -> dns" in lines
    assert lines[-1].startswith("dry run: would apply r.toml to edge: 3 added, 1 changed")


def test_apply_shows_at_most_so_many_lines(rec: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "apply", rec.fake("apply", apply_result(False, n_added=250)))
    res = run("apply", "r.toml")
    assert res.exit_code == 0
    assert "... and 54 more (--json lists them all)" in res.output  # 2 targets + 250 + 1 + 1
    assert res.output.splitlines()[-1].startswith("applied r.toml to edge (generation 4)")
    data = json.loads(run("apply", "--json", "r.toml").stdout)
    assert data["command"] == "apply" and data["changed"] is True
    assert len(data["rules"]["added"]) == 250
    assert data["rules"]["changed"][0]["to"]["action"] == "drop"


def test_apply_nothing_to_change(rec: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    same = api.ApplyResult("edge", "r.toml", False, rules=7)
    monkeypatch.setattr(api, "apply", rec.fake("apply", same))
    assert run("apply", "r.toml").output == "r.toml: 7 rules, nothing to change in edge\n"


def test_apply_errors_are_one_line(rec: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    from sklookupctl.rulefile import FileError

    err = FileError("r.toml: rules[3].ports", "port range 90-80 is reversed", "write 80-90")
    monkeypatch.setattr(api, "apply", rec.fake("apply", raises=err))
    res = run("apply", "r.toml")
    assert res.exit_code == 1
    assert res.output == (
        "error: r.toml: rules[3].ports: port range 90-80 is reversed (write 80-90)\n"
    )


def test_export_prints_the_file(rec: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "export", rec.fake("export", "# x\n[[rules]]\n"))
    res = run("-n", "edge", "export")
    assert res.output == "# x\n[[rules]]\n"
    assert rec.calls == [("export", ("edge",), {"bpffs": api.DEFAULT_BPFFS, "wait": 10.0})]


def test_progress_bar_only_for_big_files_on_a_terminal(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import sys

    from sklookupctl import render

    small, big = tmp_path / "s.toml", tmp_path / "b.toml"
    small.write_text("x")
    big.write_text("x" * (render.PROGRESS_BYTES + 1))
    with render.progress_for(str(big), quiet=False) as p:
        assert p is None  # pytest's stderr is not a terminal

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    for path, quiet in ((small, False), (big, True), ("-", False)):
        with render.progress_for(str(path), quiet=quiet) as p:
            assert p is None
    with render.progress_for(str(big), quiet=False) as p:
        assert p is not None
        p("checking", 0, 100)
        p("checking", 100, 100)
        p("loading", 1, 1)
    assert "checking" in tty.getvalue()  # the bar was drawn on the terminal


def test_status_shows_at_most_so_many_rules(rec: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    from sklookupctl import render

    many = dict(STATUS, rules=[dict(STATUS["rules"][0], ports=str(p)) for p in range(1, 151)])
    monkeypatch.setattr(api, "status", rec.fake("status", many))
    res = run("status")
    assert res.exit_code == 0
    assert sum("steer -> web" in line for line in res.output.splitlines()) == render.RULES_SHOWN
    assert f"... and {150 - render.RULES_SHOWN} more rules, 150 in all" in res.output
    assert len(json.loads(run("status", "--json").stdout)["rules"]) == 150


CHILD = """
import builtins, os, runpy, signal, sys
real = builtins.__import__
SIG = int(sys.argv[1])
def imp(name, *args, **kwargs):
    if name == "click":  # while sklookupctl.cli loads its modules
        os.kill(os.getpid(), SIG)
    return real(name, *args, **kwargs)
builtins.__import__ = imp
sys.argv = ["sklookupctl", "--version"]
runpy.run_module("sklookupctl", run_name="__main__")
"""


@pytest.mark.parametrize(
    ("sig", "code", "word"), [(2, 130, "interrupted"), (15, 143, "terminated")]
)
def test_a_signal_while_the_modules_load_ends_in_one_line(sig: int, code: int, word: str) -> None:
    """Ctrl-C or SIGTERM while the modules load ends the command with one line and 130 or 143,
    as it would later, never a traceback."""
    import signal
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-I", "-c", CHILD, str(sig)],
        capture_output=True,
        text=True,
        timeout=30,
        # a signal the parent ignores stays ignored in the child: make sure it is not
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert p.returncode == code, p
    assert p.stderr == f"error: {word}: nothing was changed\n", p.stderr


EXITING = """
import atexit, runpy, sys
atexit.register(lambda: sys.stdout.write("atexit ran\\n"))  # not flushed
sys.argv = ["sklookupctl", *sys.argv[1:]]
runpy.run_module("sklookupctl", run_name="__main__")
"""


@pytest.mark.parametrize(
    ("args", "code", "out", "err"),
    [
        (["--version"], 0, "sklookupctl, version", ""),
        (["nosuch"], 2, "", "No such command"),
        (["attach", "tcp", "192.0.2.0/24", "99999", "--drop"], 1, "", "error: port 99999"),
    ],
)
def test_the_command_ends_without_tearing_the_interpreter_down(
    args: list[str], code: int, out: str, err: str
) -> None:
    """The console script ends with os._exit once its output is flushed (a large rule set's
    objects are not freed one by one): the exit status, the output and atexit handlers as a
    normal exit has them."""
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-I", "-c", EXITING, *args], capture_output=True, text=True, timeout=30
    )
    assert p.returncode == code, p
    assert out in p.stdout and p.stdout.rstrip().endswith("atexit ran"), p.stdout
    assert err in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_output_cut_short_by_its_reader_ends_quietly() -> None:
    """`sklookupctl --help | head -c 20`: the reader goes away, the command ends as it
    would, with no complaint about the pipe."""
    import subprocess
    import sys

    script = f"{sys.executable} -I -m sklookupctl --help | head -c 20"
    p = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert p.stdout == "Usage: sklookupctl [" and p.stderr == "", p


PARSING = """
import os, signal, sys
import click
made = click.Group.make_context
def make_context(self, *a, **k):
    os.kill(os.getpid(), int(sys.argv[1]))  # while click parses the arguments
    return made(self, *a, **k)
click.Group.make_context = make_context
from sklookupctl.cli import main
main(["--version"])
"""


@pytest.mark.parametrize(
    ("sig", "code", "word"), [(2, 130, "interrupted"), (15, 143, "terminated")]
)
def test_a_signal_while_click_parses_ends_as_it_would_later(sig: int, code: int, word: str) -> None:
    """Ctrl-C or SIGTERM while click parses the arguments (click turns either into its Abort):
    130 or 143, as later."""
    import signal
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-c", PARSING, str(sig)],
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert p.returncode == code, p
    assert f"error: {word}: nothing was changed" in p.stderr, p.stderr


def test_commands_import_only_what_they_use() -> None:
    """Every command starts Python and imports the CLI: what only compiling the program or
    printing a traceback needs (tempfile, shutil, importlib.resources, traceback: a few ms)
    is imported when it is needed."""
    import os
    import subprocess
    import sys

    import sklookupctl

    code = (
        "import sys\n"
        "from sklookupctl import api, cli, program, store\n"
        "heavy = ('tempfile', 'shutil', 'importlib.resources', 'traceback')\n"
        "got = [m for m in heavy if m in sys.modules]\n"
        "assert not got, got\n"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=os.path.dirname(os.path.dirname(sklookupctl.__file__)),
    )
