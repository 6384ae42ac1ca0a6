"""Every bad input: a one-line message that says what is wrong, exit 1, no traceback, and the
state exactly as it was (same pins, same status)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from sklookupctl import compiler
from sklookupctl.cli import cli

from .conftest import CONSOLE_SCRIPT, NS, Proxy


@dataclass(frozen=True)
class Bad:
    desc: str
    args: Callable[[NS, Proxy], list[str]]
    message: str


def to(p: Proxy) -> str:
    return f"127.0.0.1:{p.port}"


BAD = [
    Bad(
        "malformed prefix",
        lambda n, p: ["attach", "tcp", "192.0.2.300/24", "all", "--to", to(p)],
        "is not an IP address or prefix",
    ),
    Bad(
        "malformed v6 prefix",
        lambda n, p: ["attach", "tcp", "2001:db8::g/64", "all", "--to", to(p)],
        "is not an IP address or prefix",
    ),
    Bad(
        "host bits set",
        lambda n, p: ["attach", "tcp", "192.0.2.1/24", "all", "--to", to(p)],
        "has host bits set (did you mean 192.0.2.0/24?)",
    ),
    Bad(
        "port 0",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "0", "--to", to(p)],
        "port 0 is not a port",
    ),
    Bad(
        "port too large",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "65536", "--to", to(p)],
        "port 65536 is too large",
    ),
    Bad(
        "reversed range",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "2000-1000", "--to", to(p)],
        "port range 2000-1000 is reversed",
    ),
    Bad(
        "non-numeric range",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "80-http", "--to", to(p)],
        "is not a number",
    ),
    Bad(
        "unknown protocol",
        lambda n, p: ["attach", "sctp", "192.0.2.0/24", "all", "--to", to(p)],
        "unknown protocol 'sctp'",
    ),
    Bad(
        "no socket at --to",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "all", "--to", "127.0.0.1:1"],
        "no tcp socket listens at 127.0.0.1:1",
    ),
    Bad(
        "--to without port",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "all", "--to", "127.0.0.1"],
        "has no port",
    ),
    Bad(
        "v6 --to without brackets",
        lambda n, p: ["attach", "tcp", "2001:db8::/64", "all", "--to", "::1:80"],
        "in brackets",
    ),
    Bad(
        "pid does not exist",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "all", "--pid", "4194303", "--fd", "3"],
        "no process with pid",
    ),
    Bad(
        "fd does not exist",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "all", "--pid", str(p.pid), "--fd", "999"],
        "has no fd 999",
    ),
    Bad(
        "fd is not a socket",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "all", "--pid", str(p.pid), "--fd", "1"],
        "is not a socket",
    ),
    Bad(
        "tcp socket not listening (--to)",
        lambda n, p: [
            "attach",
            "tcp",
            "192.0.2.0/24",
            "all",
            "--to",
            f"127.0.0.1:{p.ready['tcp_bound_port']}",
        ],
        "is not listening",
    ),
    Bad(
        "tcp socket not listening (--fd)",
        lambda n, p: [
            "attach",
            "tcp",
            "192.0.2.0/24",
            "all",
            "--pid",
            str(p.pid),
            "--fd",
            str(p.ready["tcp_bound_fd"]),
        ],
        "TCP socket that is not listening",
    ),
    Bad(
        "connected udp (--to)",
        lambda n, p: [
            "attach",
            "udp",
            "192.0.2.0/24",
            "all",
            "--to",
            f"127.0.0.1:{p.ready['udp_connected_port']}",
        ],
        "is connected",
    ),
    Bad(
        "connected udp (--fd)",
        lambda n, p: [
            "attach",
            "udp",
            "192.0.2.0/24",
            "all",
            "--pid",
            str(p.pid),
            "--fd",
            str(p.ready["udp_connected_fd"]),
        ],
        "connected UDP socket",
    ),
    Bad(
        "wrong protocol",
        lambda n, p: [
            "attach",
            "udp",
            "192.0.2.0/24",
            "all",
            "--pid",
            str(p.pid),
            "--fd",
            str(p.tcp_fd),
        ],
        "is a tcp socket, not udp",
    ),
    Bad(
        "wrong protocol (--to)",
        lambda n, p: ["attach", "udp", "192.0.2.0/24", "all", "--to", to(p)],
        "no udp socket is bound",
    ),
    Bad(
        "wrong family",
        lambda n, p: ["attach", "tcp", "2001:db8::/64", "all", "--to", to(p)],
        "is IPv4 and cannot take IPv6 rule",
    ),
    Bad(
        "--to and --drop",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "all", "--to", to(p), "--drop"],
        "give exactly one of",
    ),
    Bad(
        "--pid without --fd",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "all", "--pid", str(p.pid)],
        "--pid and --fd go together",
    ),
    Bad(
        "detach of a rule that does not exist",
        lambda n, p: ["detach", "tcp", "192.0.2.0/24", "1-2"],
        "no rule tcp 192.0.2.0/24 1-2",
    ),
    Bad(
        "conflicting rule",
        lambda n, p: ["attach", "tcp", "198.51.100.0/24", "all", "--drop"],
        "already exists",
    ),
    Bad(
        "range end too large",
        lambda n, p: ["attach", "tcp", "198.51.100.0/24", "100-70000", "--drop"],
        "too large",
    ),
    Bad(
        "bad target name",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "all", "--to", to(p), "--name", "a b"],
        "is not valid",
    ),
    Bad(
        "target name with a final newline",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "all", "--to", to(p), "--name", "web\n"],
        "is not valid",
    ),
    Bad(
        "pid 0",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "all", "--pid", "0", "--fd", "3"],
        "--pid '0' is not a process id (pids are 1-4194304)",
    ),
    Bad(
        "negative pid",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "all", "--pid", "-1", "--fd", "3"],
        "--pid '-1' is not a process id",
    ),
    Bad(
        "20-digit pid",
        lambda n, p: [
            "attach",
            "tcp",
            "192.0.2.0/24",
            "all",
            "--pid",
            "99999999999999999999",
            "--fd",
            "3",
        ],
        "--pid '99999999999999999999' is not a process id",
    ),
    Bad(
        "negative fd",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "all", "--pid", str(p.pid), "--fd", "-4"],
        "--fd '-4' is not a file descriptor",
    ),
    Bad(
        "a superscript digit as port",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "\u00b2", "--to", to(p)],
        "port '\u00b2' is not a number",
    ),
    Bad(
        "Arabic-Indic digits as port",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "\u0668\u0660", "--drop"],
        "is not a number",
    ),
    Bad(
        "a 5,000-digit port",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "9" * 5000, "--drop"],
        "port '99999",
    ),
    Bad(
        "a prefix with a scope id",
        lambda n, p: ["attach", "tcp", "fe80::1%lo", "80", "--drop"],
        "'fe80::1%lo' has a scope id",
    ),
    Bad(
        "an IPv4-mapped prefix",
        lambda n, p: ["attach", "tcp", "::ffff:192.0.2.1", "80", "--drop"],
        "is an IPv4-mapped IPv6 prefix, which no packet ever has (write the IPv4 prefix: "
        "192.0.2.1)",
    ),
    Bad(
        "a target name with a final newline",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "80", "--to", to(p), "--name", "web\n"],
        "target name 'web\\n' is not valid",
    ),
    Bad(
        "an escape sequence in a target name",
        lambda n, p: ["attach", "tcp", "192.0.2.0/24", "80", "--to", to(p), "--name", "\x1b[2J"],
        "target name '\\x1b[2J' is not valid",
    ),
    Bad(
        "a deeply nested rule file",
        lambda n, p: ["apply", _file(n, "x = " + "[" * 5000 + "]" * 5000 + "\n")],
        "nested too deeply to be a rule file",
    ),
    Bad(
        "a list as protocol",
        lambda n, p: [
            "apply",
            _file(
                n,
                '[[rules]]\nprotocol = ["tcp"]\nprefix = "192.0.2.0/24"\nports = "all"\n'
                'action = "drop"\n',
            ),
        ],
        "rules[0].protocol: must be a string, not list",
    ),
    Bad(
        "a huge pid in a rule file",
        lambda n, p: [
            "apply",
            _file(
                n,
                "[targets.t]\npid = " + "9" * 18 + "\nfd = 3\n[[rules]]\nprotocol = "
                '"tcp"\nprefix = "192.0.2.0/24"\nports = "all"\ntarget = "t"\n',
            ),
        ],
        "targets.t.pid: pid '999999999999999999' is not a process id",
    ),
    Bad(
        "a kernel file as rule file (reading /proc/kmsg would block, and consume the log)",
        lambda n, p: ["apply", "/proc/kmsg"],
        "'/proc/kmsg' is a kernel file, not a rule file",
    ),
    Bad(
        "a device as rule file",
        lambda n, p: ["apply", "/dev/zero"],
        "'/dev/zero' is not a file or a pipe",
    ),
]


_FILES = tempfile.TemporaryDirectory(prefix="sklt-files-")  # removed when the tests end


def _file(ns: NS, text: str) -> str:
    """A rule file holding `text`."""
    path = os.path.join(_FILES.name, f"{ns.name}-{hashlib.sha256(text.encode()).hexdigest()}")
    with open(path, "w") as f:
        f.write(text)
    return path


def _bad_proxy(ns: NS) -> Proxy:
    return ns.proxy(
        tcp="127.0.0.1:0", extra=("--tcp-bound", "127.0.0.1:0", "--udp-connected", "127.0.0.1:0")
    )


def _assert_refused(ns: NS, args: list[str], message: str, code: int = 1) -> None:
    files, st = ns.files(), ns.status()
    res = ns.cli(*args)
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert message in lines[0]
    assert ns.files() == files
    assert ns.status() == st


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.desc)
def test_bad_input_with_dispatcher_loaded(ns: NS, case: Bad) -> None:
    p = _bad_proxy(ns)
    ns.ok("attach", "tcp", "198.51.100.0/24", "all", "--to", to(p))  # state to keep intact
    _assert_refused(ns, case.args(ns, p), case.message)
    assert ns.dial("tcp", "198.51.100.1", 80) == "198.51.100.1 80"


@pytest.mark.parametrize(
    "case",
    [c for c in BAD if c.desc not in ("conflicting rule", "detach of a rule that does not exist")],
    ids=lambda c: c.desc,
)
def test_bad_input_before_any_dispatcher(ns: NS, case: Bad) -> None:
    p = _bad_proxy(ns)
    _assert_refused(ns, case.args(ns, p), case.message)
    assert ns.files() == []


def test_detach_without_dispatcher(ns: NS) -> None:
    res = ns.cli("detach", "tcp", "192.0.2.0/24", "all")
    assert res.exit_code == 1 and "no sklookupctl dispatcher" in res.output


def test_partial_overlap(ns: NS) -> None:
    ns.ok("attach", "tcp", "192.0.2.0/24", "100-200", "--drop")
    _assert_refused(ns, ["attach", "tcp", "192.0.2.0/24", "150-300", "--drop"], "partly overlap")


def test_socket_in_another_netns_is_refused(ns: NS, ns2: NS) -> None:
    other = ns2.proxy(tcp="127.0.0.1:0")
    _assert_refused(
        ns,
        [
            "attach",
            "tcp",
            "192.0.2.0/24",
            "all",
            "--pid",
            str(other.pid),
            "--fd",
            str(other.tcp_fd),
        ],
        "lives in another network namespace",
    )


def test_v6only_socket_refuses_v4_rule(ns: NS) -> None:
    p = ns.proxy(tcp="[::]:0", v6only=True)
    _assert_refused(
        ns,
        ["attach", "tcp", "192.0.2.0/24", "all", "--pid", str(p.pid), "--fd", str(p.tcp_fd)],
        "IPv6-only",
    )


def test_netns_that_does_not_exist_is_not_created(ns: NS) -> None:
    res = ns.cli("--netns", "sklt-no-such-ns", "attach", "tcp", "192.0.2.0/24", "all", "--drop")
    assert res.exit_code == 1
    assert "network namespace 'sklt-no-such-ns' does not exist" in res.output
    assert not os.path.exists("/run/netns/sklt-no-such-ns")
    for cmd in (["status"], ["addr", "list"], ["detach", "--all"]):
        res = ns.cli("--netns", "/proc/4194303/ns/net", *cmd)
        assert res.exit_code == 1 and "does not exist" in res.output, cmd


def test_bpffs_that_is_not_bpffs(ns: NS) -> None:
    res = ns.cli("--bpffs", "/tmp", "attach", "tcp", "192.0.2.0/24", "all", "--drop")
    assert res.exit_code == 4 and "/tmp is not a bpffs mount" in res.output
    assert not os.path.exists("/tmp/sklookupctl")


def test_unprivileged_caller(ns: NS) -> None:
    # root without any capability: what sklookupctl checks (and what the kernel checks) is the
    # capabilities, and this works wherever the repository lives (a non-root uid may not be able
    # to read a checkout under /root)
    drop_all = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"]
    for cmd in (
        ["attach", "tcp", "192.0.2.0/24", "all", "--drop"],
        ["status"],
        ["detach", "--all"],
        ["addr", "add", "192.0.2.0/24"],
    ):
        out = subprocess.run(
            [*drop_all, *ns.script_argv(*cmd)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 3, out
        assert out.stderr.startswith("error: sklookupctl needs root"), out.stderr
        assert "Traceback" not in out.stderr
    assert ns.files() == []


def test_bcc_missing(ns: NS, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # an empty cache: the program must be compiled, and BCC is not there to do it
    monkeypatch.setenv("SKLOOKUPCTL_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "bcc", None)
    _assert_refused(
        ns,
        ["attach", "tcp", "192.0.2.0/24", "all", "--drop"],
        "BCC's Python module (import bcc) is missing",
        code=4,
    )
    assert ns.files() == []


def test_compile_error_shows_the_log(ns: NS, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        compiler,
        "read_source",
        lambda: "int dispatch(struct bpf_sk_lookup *c){ return undefined_thing; }",
    )
    res = ns.cli("attach", "tcp", "192.0.2.0/24", "all", "--drop")
    assert res.exit_code == 4
    assert "error: the dispatcher failed to compile" in res.output
    assert "undefined_thing" in res.output  # the compiler's own words
    assert "Traceback" not in res.output
    assert ns.files() == []


def test_verifier_rejection_shows_the_log(ns: NS, monkeypatch: pytest.MonkeyPatch) -> None:
    # compiles, but reads a map value without checking the lookup found one
    bad = (
        "BPF_ARRAY(entries, u64, 1);\n"
        "int dispatch(struct bpf_sk_lookup *ctx) {\n"
        "  u32 k = ctx->local_port; u64 *v = entries.lookup(&k);\n"
        "  return *v ? SK_PASS : SK_DROP;\n"
        "}\n"
    )
    monkeypatch.setattr(compiler, "read_source", lambda: bad)
    res = ns.cli("attach", "tcp", "192.0.2.0/24", "all", "--drop")
    assert res.exit_code == 4
    assert "error: the kernel's verifier rejected the dispatcher" in res.output
    assert "invalid mem access 'map_value_or_null'" in res.output  # the verifier's log
    assert "Traceback" not in res.output
    assert ns.files() == []


def test_quiet_when_all_is_well(ns: NS) -> None:
    out = ns.script("attach", "tcp", "192.0.2.0/24", "all", "--drop")
    assert out.returncode == 0 and out.stderr == ""


def test_a_read_only_bpffs(ns: NS, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "bpf", "-o", "ro", "bpf", str(ro)], check=True)
    try:
        for args in (["attach", "tcp", "192.0.2.0/24", "all", "--drop"], ["gc"]):
            res = CliRunner().invoke(cli, ["--netns", ns.name, "--bpffs", str(ro), *args])
            assert res.exit_code == 4 and "Traceback" not in res.output, res.output
            assert res.output.startswith("error: cannot create") and "read-write" in res.output
            assert res.output.count("\n") == 1
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_a_target_name_with_a_newline_in_a_file(ns: NS, tmp_path: Path) -> None:
    f = tmp_path / "nl.toml"
    f.write_text(
        '[targets."a\\n"]\nto = "127.0.0.1:1"\n[[rules]]\nprotocol = "tcp"\n'
        'prefix = "192.0.2.0/24"\nports = "all"\ntarget = "a\\n"\n'
    )
    res = ns.cli("apply", str(f))
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert "targets.'a\\n'" in res.output


def test_netns_arguments_that_are_not_namespaces(ns: NS, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = {
        str(fifo): "is not a network namespace",  # opened, it would block forever
        f"{ns.path}/": "is not a network namespace",  # trailing slash
        str(tmp_path): "is not a network namespace",
        "/dev/null": "is not a network namespace",
        "": "the netns is empty",  # an empty variable must not mean the caller's own
        "..": "netns name '..' is not valid",
    }
    for spec, message in cases.items():
        out = subprocess.run(
            [*ns.script_argv("status")[:1], "--netns", spec, "--bpffs", ns.bpffs, "status"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 1, (spec, out)
        assert out.stderr.count("\n") == 1 and message in out.stderr, (spec, out.stderr)


def test_json_errors_are_one_json_object(ns: NS) -> None:
    out = ns.script("status", "--json", "--bogus")
    assert out.returncode == 2 and out.stdout == ""
    doc = json.loads(out.stderr)
    assert doc["exit_code"] == 2 and "--bogus" in doc["error"] and doc["hint"]
    out = ns.script("attach", "tcp", "192.0.2.0/24", "\u00b2", "--drop", "--json")
    assert out.returncode == 1 and out.stdout == ""
    assert json.loads(out.stderr) == {
        "error": "port '\u00b2' is not a number",
        "hint": "ports are 1-65535",
        "exit_code": 1,
    }


def test_bpffs_must_be_the_mount_itself(ns: NS) -> None:
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--drop")
    inner = os.path.join(ns.bpffs, "sklookupctl")
    for args in (["attach", "tcp", "198.51.100.0/24", "80", "--drop"], ["status"]):
        res = CliRunner().invoke(cli, ["--netns", ns.name, "--bpffs", inner, *args])
        assert res.exit_code == 4, res.output
        assert "is inside a bpffs mount, not the mount itself" in res.output
    assert sorted(os.listdir(inner)) == sorted(
        ["lock", *(n for n in os.listdir(inner) if n.startswith("ns-"))]
    )
    assert len(ns.status()["other_programs"]) == 0  # type: ignore[arg-type]


def test_json_errors_follow_the_option_as_parsed(ns: NS) -> None:
    # `--to --json`: --json is the value of --to here, so the error is text
    res = ns.cli("attach", "tcp", "192.0.2.0/24", "80", "--to", "--json")
    assert res.exit_code == 1 and res.stderr == (
        "error: '--json' has no port (write ADDR:PORT, such as 127.0.0.1:8080 or [::1]:8080)\n"
    )
    res = ns.cli("attach", "tcp", "192.0.2.0/24", "80", "--to", "127.0.0.1:1", "--name", "--json")
    assert res.exit_code == 1 and "target name '--json' is not valid" in res.stderr


@pytest.mark.parametrize("closed", [">&-", "2>&-", ">&- 2>&-"])
def test_closed_output_streams_change_nothing_in_the_outcome(ns: NS, closed: str) -> None:
    """stdout or stderr closed when the command starts (Python makes them None): the command
    does what it does and ends with its own exit status, never a traceback's."""
    import shlex

    def run(*args: str) -> int:
        line = " ".join(shlex.quote(a) for a in ns.script_argv(*args)) + " " + closed
        return subprocess.run(["sh", "-c", line], timeout=60).returncode

    assert run("--version") == 0
    assert run("attach", "tcp", "192.0.2.0/24", "80", "--drop") == 0
    assert [r["prefix"] for r in ns.status()["rules"]] == ["192.0.2.0/24"]  # type: ignore[index]
    assert run("attach", "tcp", "192.0.2.0/24", "80", "--to", "127.0.0.1:9") == 1  # conflict
    assert run("status", "--json") == 0
    assert run("export") == 0
    assert run("detach", "tcp", "192.0.2.0/24", "80") == 0
    assert run("detach", "tcp", "192.0.2.0/24", "80") == 1  # no such rule
    assert ns.status()["rules"] == []


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_change_whose_report_cannot_be_written_is_not_a_failure(
    ns: NS, json_flag: list[str], tmp_path: Path
) -> None:
    """stdout on a full device (/dev/full: ENOSPC on every write): a command that changed
    something exits 0, and a note on stderr says the change was made and its report lost;
    one that changed nothing (a reader, a repeated attach, an error) fails with 4 as before.
    With stderr full too, the same exit statuses."""

    def run(*args: str, err: str = "pipe") -> subprocess.CompletedProcess[str]:
        with open("/dev/full", "w") as full:
            return subprocess.run(
                ns.script_argv(*args, *json_flag),
                stdout=full,
                stderr=full if err == "full" else subprocess.PIPE,
                text=True,
                timeout=60,
            )

    note = "note: the change was made, but cannot write the output: No space left on device"
    web = ns.proxy(tcp="127.0.0.1:0", tag="web")
    to = ("--to", f"127.0.0.1:{web.port}")
    assert ns.dial("tcp", "192.0.2.5", 80) == "refused"
    r = run("attach", "tcp", "192.0.2.0/24", "80", *to)
    assert (r.returncode, r.stderr.strip()) == (0, note)
    assert ns.dial("tcp", "192.0.2.5", 80) == "192.0.2.5 80 web"  # the change is live
    r = run("attach", "tcp", "192.0.2.0/24", "80", *to)  # nothing to change
    assert r.returncode == 4 and "cannot write the output" in r.stderr
    assert "note:" not in r.stderr
    assert run("status").returncode == 4
    assert run("addr", "add", "2001:db8:99::/48").returncode == 0
    assert run("addr", "add", "2001:db8:99::/48").returncode == 4  # there already
    assert run("addr", "del", "2001:db8:99::/48", err="full").returncode == 0
    assert run("detach", "tcp", "192.0.2.0/24", "80", err="full").returncode == 0
    assert ns.dial("tcp", "192.0.2.5", 80) == "refused"
    assert run("detach", "tcp", "192.0.2.0/24", "80").returncode == 1  # no such rule
    assert run("detach", "tcp", "192.0.2.0/24", "80", err="full").returncode == 1
    # apply --exit-code: 5 when it changed something, whether or not its report was written
    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rules]]\nprotocol = "tcp"\nprefix = "192.0.2.0/24"\nports = "80"\naction = "drop"\n'
    )
    r = run("apply", str(rules), "--exit-code")
    assert (r.returncode, r.stderr.strip()) == (5, note)
    assert run("apply", str(rules), "--exit-code").returncode == 4  # nothing changed
    # the demo: its output is what it is for, and its namespace is gone afterwards
    name = f"{ns.name}-demo"
    with open("/dev/full", "w") as full:
        r = subprocess.run(
            [CONSOLE_SCRIPT, "-n", name, "--bpffs", ns.bpffs, "demo", "--samples", "2", *json_flag],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert r.returncode == 4 and "note:" not in r.stderr, r.stderr
    assert not os.path.exists(f"/run/netns/{name}")
