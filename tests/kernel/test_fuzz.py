"""Fuzzing the command line against a real namespace with live state: argument vectors and rule
files made of valid and hostile pieces. Whatever comes in:

- the exit code is one of the documented ones (0-4), and no traceback is printed;
- stderr has at most one line (with --json: one JSON object with error, hint, exit_code);
- a command that fails changes nothing: `export` and the pins are as they were.

Bounded in CI (SKLOOKUPCTL_FUZZ_EXAMPLES, default 150 per fuzzer); longer runs through it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sklookupctl.cli import cli
from tests.unit.test_validate import HOSTILE, _mutations, _nested, _values

from .conftest import NS, PREFIXES, throwaway

EXAMPLES = int(os.environ.get("SKLOOKUPCTL_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
CODES = {0, 1, 2, 3, 4}


class Target:
    """The namespace under fuzz: a proxy, rules, and the paths the fuzzer may name."""

    def __init__(self, ns: NS, tmp: str) -> None:
        self.ns = ns
        self.tmp = tmp
        self.fifo = os.path.join(tmp, "fifo")
        os.mkfifo(self.fifo)
        self.plain = os.path.join(tmp, "plain")
        with open(self.plain, "w") as f:
            f.write("not a namespace\n")
        self.pipe_r, w = os.pipe()  # empty, its writer closed: reads as an empty file
        os.close(w)

    def fifo_writer(self) -> str:
        """A FIFO with a rule file's worth behind it, as `apply <(...)` gives (a pipe)."""
        return f"/dev/fd/{self.pipe_r}"

    def netns_choices(self) -> list[str]:
        # never anything that names the root namespace: only this namespace, or no namespace
        return [
            self.ns.name,
            self.ns.name,
            self.ns.name,
            self.ns.path,
            self.ns.path + "/",
            self.fifo,
            self.plain,
            "/nonexistent-sklt",
            "",
            "..",
            "sklt-\x1b[2J",
            self.tmp,
        ]


@pytest.fixture(scope="module")
def target(bpffs: str) -> Iterator[Target]:
    with throwaway(bpffs, PREFIXES) as ns, tempfile.TemporaryDirectory() as tmp:
        ns.proxy(tcp="127.0.0.1:9000", udp="127.0.0.1:9000", tag="web")
        ns.proxy(tcp="[::]:9001", tag="v6")
        ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", "127.0.0.1:9000", "--name", "web")
        ns.ok("attach", "udp", "198.51.100.0/24", "53", "--to", "127.0.0.1:9000")
        ns.ok("attach", "tcp", "2001:db8::/64", "1-1000", "--to", "[::]:9001")
        ns.ok("attach", "tcp", "203.0.113.7", "22", "--drop")
        yield Target(ns, tmp)
        ns.ok("detach", "--all")


def field(good: list[str], bad: list[str] = []) -> st.SearchStrategy[str]:  # noqa: B006
    """Mostly a good value, else a bad or hostile one, or any text."""
    return st.one_of(
        st.sampled_from(good),
        st.sampled_from(good),
        st.sampled_from(good),
        st.sampled_from([*bad, *HOSTILE]),
        st.text(max_size=10),
        st.integers(-(2**70), 2**70).map(str),
    )


PROTOS = field(["tcp", "udp"], ["TCP", "sctp", ""])
PREFIXES_ = field(
    ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.7", "2001:db8::/64", "192.0.2.128/25"],
    ["192.0.2.1/24", "192.0.2.300", "2001:db8::g", "0.0.0.0/0", "::/0", "1.2.3.4/33"],
)
PORTS = field(["all", "80", "1-1000", "53", "22", "443"], ["0", "65536", "1000-1", "80-", "-80"])
ENDPOINTS = field(["127.0.0.1:9000", "[::]:9001", "127.0.0.1:1"], ["127.0.0.1", "::1:80", "[::1]"])
NUMBERS = field(["1", "3", "0", "-1", "4194304", "4194305"], ["99999999999999999999", "+3"])
NAMES = field(["web", "v6", "other", "tcp-[::]:9001"], ["", "a b", "x" * 64, "web\n"])


def options() -> st.SearchStrategy[list[str]]:
    one = st.one_of(
        st.just(["--drop"]),
        ENDPOINTS.map(lambda v: ["--to", v]),
        NUMBERS.map(lambda v: ["--pid", v]),
        NUMBERS.map(lambda v: ["--fd", v]),
        NAMES.map(lambda v: ["--name", v]),
        field(["drop", "pass"]).map(lambda v: ["--on-missing", v]),
        st.just(["--replace"]),
        st.just(["--no-reuseport"]),
        st.just(["--json"]),
        st.just(["--all"]),
        st.just(["--help"]),
        st.just(["--bogus"]),
        st.just(["--"]),
    )
    return st.lists(one, max_size=3).map(lambda xs: [w for x in xs for w in x])


def command(t: Target) -> st.SearchStrategy[list[str]]:
    rule = st.tuples(PROTOS, PREFIXES_, PORTS).map(list)
    files = st.sampled_from([t.fifo_writer(), t.plain, "/dev/zero", "/nonexistent", t.tmp, "-"])
    return st.one_of(
        st.tuples(rule, options()).map(lambda x: ["attach", *x[0], *x[1]]),
        st.tuples(rule, options()).map(lambda x: ["detach", *x[0], *x[1]]),
        st.just(["detach", "--all", "--json"]),
        st.tuples(files, st.sampled_from([[], ["-N"], ["--json"]])).map(
            lambda x: ["apply", *x[1], x[0]]
        ),
        st.sampled_from(
            [["export"], ["status"], ["status", "--json"], ["status", "--all"], ["gc", "--json"]]
        ),
        st.sampled_from([["addr", "list"], ["netns", "list", "--json"], ["nosuch"], ["netns"]]),
        st.lists(st.text(max_size=10), max_size=5).map(lambda xs: ["attach", *xs]),
    )


def check(t: Target, argv: list[str]) -> None:
    ns = t.ns
    before_export, before_files = ns.ok("export").stdout, ns.files()
    res = CliRunner().invoke(cli, argv)
    out = res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), (argv, out)
    assert res.exit_code in CODES, (argv, res.exit_code, out)
    assert "Traceback" not in out, (argv, out)
    err = res.stderr.splitlines()
    assert len(err) <= 1, (argv, res.stderr)
    if res.exit_code != 0:
        if "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv:
            doc = json.loads(res.stderr)
            assert set(doc) == {"error", "hint", "exit_code"}, doc
            assert doc["exit_code"] == res.exit_code
        else:
            assert err and err[0].startswith("error: "), (argv, res.stderr)
        assert ns.ok("export").stdout == before_export, argv
        assert ns.files() == before_files, argv


@FUZZ
@given(data=st.data())
def test_argument_vectors(target: Target, data: st.DataObject) -> None:
    t = target
    netns = data.draw(st.sampled_from(t.netns_choices()), label="netns")
    glob = ["--bpffs", t.ns.bpffs, "--netns", netns, "--wait", "5"]
    extra = data.draw(
        st.sampled_from([[], [], [], ["--wait", "0"], ["--wait", "nan"], ["--cache-dir", t.plain]])
    )
    argv = data.draw(command(t), label="command")
    check(t, [*glob, *extra, *argv])


@FUZZ
@given(data=st.data())
def test_rule_files(target: Target, data: st.DataObject) -> None:
    t = target
    export = t.ns.ok("export").stdout
    text = data.draw(
        st.one_of(
            _mutations(),
            _nested(),
            _values(),
            st.just(export),
            st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")),
        ),
        label="file",
    )
    path = os.path.join(t.tmp, "rules.toml")
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)
    flags = data.draw(st.sampled_from([[], ["--dry-run"], ["--json"], ["-N", "--json"]]))
    argv = ["--bpffs", t.ns.bpffs, "--netns", t.ns.name, "apply", *flags, path]
    check(t, argv)
    if text == export:  # an export always applies, and changes nothing
        res = CliRunner().invoke(cli, argv)
        assert res.exit_code == 0, res.output
