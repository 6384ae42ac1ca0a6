"""The validation layer and the output cleaner, without root: properties over generated input,
and a fuzzer of the rule-file parser (bounded here; SKLOOKUPCTL_FUZZ_EXAMPLES for longer runs).
"""

from __future__ import annotations

import ipaddress
import os
import stat
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sklookupctl import render, rulefile, validate
from sklookupctl.errors import InvalidArgument
from sklookupctl.rules import parse_endpoint, parse_port, parse_ports, parse_prefix

EXAMPLES = int(os.environ.get("SKLOOKUPCTL_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the cleaner -------------------------------------------------------------------------------


@given(st.text())
def test_clean_output_is_printable_and_keeps_printable_text(text: str) -> None:
    out = render.clean(text)
    assert out.isprintable()
    if text.isprintable():
        assert out == text


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b[31mred", "\\x1b[31mred"),
        ("a\nb", "a\\x0ab"),
        ("tab\there", "tab\\x09here"),
        ("\u202eevil", "\\u202eevil"),  # right-to-left override
        ("bad\udcffbyte", "bad\\udcffbyte"),  # a byte that was not UTF-8 (surrogateescape)
        ("[/]", "[/]"),
        ("tcp-[::]:8082", "tcp-[::]:8082"),
        (":smile:", ":smile:"),
    ],
)
def test_clean_shows_control_characters_escaped(raw: str, shown: str) -> None:
    assert render.clean(raw) == shown


def test_rich_output_never_reads_markup_or_emoji(capsys: pytest.CaptureFixture[str]) -> None:
    c = render.console()
    render.line(c, "[/] [bold]x[/] :smile: tcp-[::]:8082 \x1b[2J")
    out = capsys.readouterr().out
    assert out == "[/] [bold]x[/] :smile: tcp-[::]:8082 \\x1b[2J\n"


# -- numbers, names, addresses ---------------------------------------------------------------


@given(st.text(max_size=12))
def test_ports_are_ascii_digits_only(text: str) -> None:
    try:
        port = parse_port(text)
    except InvalidArgument:
        t = text.strip()
        assert not (t.isascii() and t.isdigit() and 1 <= int(t) <= 65535 and len(t) <= 5)
        return
    assert text.strip().isascii() and text.strip().isdigit() and 1 <= port <= 65535


@pytest.mark.parametrize("text", ["\u00b2", "\u0668\u0660", "9" * 5000, "+80", "8_0", " ", "1e3"])
def test_ports_that_python_would_take_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_port(text)
    with pytest.raises(InvalidArgument):
        parse_ports(f"{text}-90")


@given(st.integers())
def test_pids_and_fds_are_bounded(n: int) -> None:
    for check, lo, hi in ((validate.pid, 1, validate.PID_MAX), (validate.fd, 0, validate.FD_MAX)):
        if lo <= n <= hi:
            assert check(n) == n
        else:
            with pytest.raises(InvalidArgument):
                check(n)
    for v in (True, 3.0, "3", None):
        with pytest.raises(InvalidArgument):
            validate.pid(v)


@given(st.text(max_size=70))
def test_target_names_are_printable_ascii(name: str) -> None:
    try:
        validate.target_name(name)
    except InvalidArgument as e:
        assert "\n" not in e.message
        return
    assert name.isascii() and name.isprintable() and 1 <= len(name) <= 63
    assert "\n" not in name and " " not in name


def test_a_name_with_a_final_newline_is_refused() -> None:
    for bad in ("web\n", "web\r", "", "a" * 64, "we b", "\x1b"):
        with pytest.raises(InvalidArgument):
            validate.target_name(bad)
    with pytest.raises(InvalidArgument):
        validate.netns_name("edge\n")


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.0/120", "192.0.2.0/24"),
        ("::ffff:0:0/96", "0.0.0.0/0"),
    ],
)
def test_ipv4_mapped_prefixes_are_refused_with_the_ipv4_prefix(text: str, hint: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_prefix(text)
    assert e.value.hint == f"write the IPv4 prefix: {hint}"


def test_a_wide_ipv6_prefix_that_contains_the_mapped_range_is_fine() -> None:
    assert parse_prefix("::/0") == ipaddress.IPv6Network("::/0")


@pytest.mark.parametrize("text", ["fe80::1%lo", "fe80::/64%eth0", "[fe80::1%lo]:80"])
def test_scope_ids_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument, match="scope id"):
        if text.startswith("["):
            parse_endpoint(text)
        else:
            parse_prefix(text)


@given(st.text(max_size=15))
def test_seconds(text: str) -> None:
    try:
        v = validate.seconds(text)
    except InvalidArgument:
        return
    assert 0 <= v <= validate.WAIT_MAX and text.strip().replace(".", "", 1).isdigit()


# -- the rule-file parser, fuzzed --------------------------------------------------------------

GOOD = """\
[targets.web]
to = "127.0.0.1:8080"

[[rules]]
protocol = "tcp"
prefix = "192.0.2.0/24"
ports = "all"
target = "web"

[[rules]]
protocol = "udp"
prefix = "2001:db8::/64"
ports = "53"
action = "drop"
"""

HOSTILE = [
    "\x1b[2J",
    "[/]",
    "\u00b2",
    "\u0668\u0660",
    "9" * 400,
    "-" * 3,
    "::ffff:192.0.2.1",
    "fe80::1%lo",
    "\udcff",
    "\u202e",
    "web\n",
    "1e999",
    "nan",
    "inf",
    "[" * 50,
    "{",
    '"',
    "'''",
    "\\",
    "\x00",
]


def _mutations() -> st.SearchStrategy[str]:
    """The export above, with a piece replaced, inserted, deleted or repeated."""
    piece = st.one_of(
        st.sampled_from(HOSTILE),
        st.text(max_size=20),
        st.text(alphabet=string.printable, max_size=20),
        st.integers().map(str),
        st.sampled_from(["[[rules]]\n", "[targets.x]\n", "pid = 1\n", 'to = "::1"\n', "= ", "\n"]),
    )

    @st.composite
    def mutate(draw: st.DrawFn) -> str:
        text = GOOD
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(text)))
            j = draw(st.integers(i, min(len(text), i + 30)))
            how = draw(st.sampled_from(["replace", "insert", "delete", "repeat"]))
            p = draw(piece)
            if how == "replace":
                text = text[:i] + p + text[j:]
            elif how == "insert":
                text = text[:i] + p + text[i:]
            elif how == "delete":
                text = text[:i] + text[j:]
            else:
                text = text[:i] + text[i:j] * draw(st.integers(2, 50)) + text[j:]
        return text

    return mutate()


def _nested() -> st.SearchStrategy[str]:
    depth = st.integers(1, 3000)
    return st.one_of(
        depth.map(lambda d: "x = " + "[" * d + "]" * d + "\n"),
        depth.map(lambda d: "x = " + "{a = " * d + "1" + "}" * d + "\n"),
        depth.map(lambda d: "[[rules]]\nprotocol = " + "[" * d + '"tcp"' + "]" * d + "\n"),
        depth.map(lambda d: "[" + ".".join(["a"] * d) + "]\n"),
    )


def _values() -> st.SearchStrategy[str]:
    """A rule whose fields take any TOML value."""
    value = st.one_of(
        st.sampled_from(HOSTILE).map(lambda s: '"' + s.encode("unicode_escape").decode() + '"'),
        st.integers(-(2**70), 2**70).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(
            lambda f: "nan" if f != f else ("inf" if f == float("inf") else repr(f))
        ),
        st.sampled_from(["true", "[]", '["tcp"]', "{}", "{a = 1}", "1979-05-27", "[[1]]"]),
    )
    field = st.sampled_from([*rulefile.RULE_FIELDS, "pid", "fd", "to", "reuseport", "x"])

    @st.composite
    def build(draw: st.DrawFn) -> str:
        t = "[targets.web]\n" + "".join(
            f"{f} = {draw(value)}\n" for f in draw(st.lists(field, max_size=4, unique=True))
        )
        r = "[[rules]]\n" + "".join(
            f"{f} = {draw(value)}\n" for f in draw(st.lists(field, max_size=7, unique=True))
        )
        return t + r

    return build()


@FUZZ
@given(
    st.one_of(
        _mutations(),
        _nested(),
        _values(),
        st.binary(max_size=300).map(lambda b: b.decode("utf-8", "replace")),
        st.text(max_size=300),
    )
)
def test_the_rule_file_parser_only_ever_says_what_is_wrong(text: str) -> None:
    try:
        rf = rulefile.parse(text, "f.toml")
    except InvalidArgument as e:
        assert e.message.startswith("f.toml"), e.message
        assert len(render.clean(str(e))) < 5000
        return
    # what parses applies: every rule's target is declared
    for r in rf.rules.rules.values():
        assert r.target is None or r.target in rf.targets or r.target in rf.unused_targets


# -- reading a rule file -------------------------------------------------------------------------


def test_a_fifo_waits_for_its_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)

    def write() -> None:
        time.sleep(0.3)
        fifo.write_text("# rules\n")

    t = threading.Thread(target=write)
    t.start()
    try:
        assert validate.read_text(str(fifo)) == "# rules\n"
    finally:
        t.join()


def test_a_fifo_nobody_writes_to_is_refused_not_read_as_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    monkeypatch.setattr(validate, "PIPE_WAIT", 0.3)
    with pytest.raises(InvalidArgument, match="nothing was written to"):
        validate.read_text(str(fifo))


@pytest.mark.parametrize("text", ["", "\n", "  \n\t\n"])
def test_an_empty_rule_file_is_refused(tmp_path: Path, text: str) -> None:
    f = tmp_path / "r.toml"
    f.write_text(text)
    with pytest.raises(InvalidArgument, match="is empty: applying it would remove every rule"):
        validate.read_text(str(f))
    r, w = os.pipe()
    os.write(w, text.encode())
    os.close(w)
    with pytest.raises(InvalidArgument, match="is empty"):
        validate.read_text(f"/dev/fd/{r}")
    os.close(r)


def test_what_a_rule_file_may_be(tmp_path: Path) -> None:
    f = tmp_path / "r.toml"
    f.write_text("# no rules, on purpose\n")
    assert validate.read_text(str(f)) == "# no rules, on purpose\n"
    with pytest.raises(InvalidArgument, match="is not a file or a pipe"):
        validate.read_text("/dev/zero")
    with pytest.raises(InvalidArgument, match="is a directory"):
        validate.read_text(str(tmp_path))
    f.write_bytes(b"x" * 2000)
    with pytest.raises(InvalidArgument, match="is larger than"):
        validate.read_text(str(f), limit=1000)
    f.write_bytes(b"\xff\xfe")
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        validate.read_text(str(f))
    with pytest.raises(InvalidArgument, match="is not a path"):
        validate.read_text("a\0b")


# -- what round 1 of the adversarial tester found ------------------------------------------------


def test_a_netmask_or_hostmask_is_not_a_prefix_length() -> None:
    for text in ("192.0.2.0/0.0.0.255", "192.0.2.0/255.255.255.0", "2001:db8::/ffff::"):
        with pytest.raises(InvalidArgument, match="the length after / must be a number"):
            parse_prefix(text)


def test_a_target_name_is_never_an_option() -> None:
    for name in ("--json", "-x", "-"):
        with pytest.raises(InvalidArgument):
            validate.target_name(name)
    assert validate.target_name("tcp-[::]:8082") == "tcp-[::]:8082"


def test_every_target_is_checked_used_or_not() -> None:
    rule = '[[rules]]\nprotocol = "tcp"\nprefix = "192.0.2.0/24"\nports = "all"\naction = "drop"\n'
    for body, where in (
        ("pid = true\nfd = 3\n", "targets.spare.pid"),
        ("pid = 1.5\nfd = 3\n", "targets.spare.pid"),
        ("pid = 99999999999999\nfd = 3\n", "targets.spare.pid"),
        ("to = 9000\n", "targets.spare.to"),
        ('to = "127.0.0.1"\n', "targets.spare.to"),
        ('to = "127.0.0.1:1"\nreuseport = "all"\n', "targets.spare.reuseport"),
    ):
        with pytest.raises(InvalidArgument) as e:
            rulefile.parse(f"[targets.spare]\n{body}{rule}", "f.toml")
        assert e.value.message.startswith(f"f.toml: {where}"), e.value.message
    rf = rulefile.parse(f'[targets.spare]\nto = "127.0.0.1:1"\n{rule}', "f.toml")
    assert rf.unused_targets == ["spare"] and "spare" not in rf.targets


def test_root_is_never_told_to_run_as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from sklookupctl import errors

    monkeypatch.setattr(errors.os, "geteuid", lambda: 1000)
    e = errors.denied("cannot open process 1")
    assert isinstance(e, errors.PermissionDenied) and e.hint == "run as root"
    assert e.exit_code == errors.EXIT_PRIVILEGES
    monkeypatch.setattr(errors.os, "geteuid", lambda: 0)
    e = errors.denied("cannot open process 1")
    assert "run as root" not in e.hint and "refused even to root" in e.hint
    assert e.exit_code == errors.EXIT_STATE


def test_a_missing_netns_is_only_offered_to_be_made_when_it_could_be() -> None:
    from sklookupctl import netns
    from sklookupctl.errors import NotFound

    for spec, offered in (("sklt-none-such", True), (" ", False), ("a b", False)):
        with pytest.raises(NotFound) as e:
            netns.open_netns(spec)
        assert ("netns add" in e.value.hint) == offered, e.value.hint


# -- what BCC sees while it compiles (round 3 of the adversarial tester) -------------------------


def test_the_kernel_tree_is_chosen_as_bcc_chooses_it_and_only_when_complete(tmp_path: Path) -> None:
    from sklookupctl import compiler

    build, source = tmp_path / "build", tmp_path / "source"
    build.mkdir()  # a leftover build/ without headers: BCC would fall back to /tmp/kheaders-*
    assert compiler._kernel_tree(str(tmp_path)) is None
    (build / "include" / "linux").mkdir(parents=True)
    (build / "include" / "linux" / "kconfig.h").write_text("")
    assert compiler._kernel_tree(str(tmp_path)) == str(build)
    source.mkdir()  # BCC takes source/ when both are there: then source/ must be complete
    assert compiler._kernel_tree(str(tmp_path)) is None
    (source / "include" / "linux").mkdir(parents=True)
    (source / "include" / "linux" / "kconfig.h").write_text("")
    assert compiler._kernel_tree(str(tmp_path)) == str(source)


def test_bcc_compiles_with_a_fixed_environment_a_kernel_tree_and_a_private_tmpdir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from sklookupctl import compiler

    seen: dict[str, object] = {}

    def fake(bcc: object, src: str, maps: tuple[str, ...]) -> bytes:
        seen.update(env=dict(os.environ), cwd=os.getcwd(), tempdir=tempfile.gettempdir())
        tmp = os.environ["TMPDIR"]
        seen["tmp"] = (tmp, stat.S_IMODE(os.stat(tmp).st_mode), os.stat(tmp).st_uid)
        return b""

    monkeypatch.setattr(compiler, "_compile_here", fake)
    for k, v in {"ARCH": "../evil", "CPATH": "/evil", "TMPDIR": str(tmp_path), "X": "y"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    before = tempfile.gettempdir()
    compiler._compile(None, "", "/the/tree", ())
    env = seen["env"]
    assert isinstance(env, dict)
    assert set(env) == {*compiler.COMPILE_ENV, "TMPDIR", "BCC_KERNEL_SOURCE"}
    assert env["BCC_KERNEL_SOURCE"] == "/the/tree" and seen["cwd"] == "/"
    tmp, mode, uid = seen["tmp"]  # type: ignore[misc]
    assert mode == 0o700 and uid == os.geteuid() and not tmp.startswith(str(tmp_path))
    assert not os.path.exists(tmp)  # removed after
    # tempfile used the private directory too (it caches the first it sees: a second compile
    # in one process would otherwise use the first one's, removed), and is restored after
    assert seen["tempdir"] == tmp and tempfile.gettempdir() == before
    assert os.environ["ARCH"] == "../evil" and os.getcwd() == str(tmp_path)  # restored


def test_the_command_starts_python_isolated(tmp_path: Path) -> None:
    # `sudo -E` keeps PYTHONPATH-like variables from a user (sudo drops only a few:
    # PYTHONPYCACHEPREFIX, PYTHONWARNINGS... pass): the installed command ignores them all
    fake = tmp_path / "sklookupctl"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise SystemExit('planted')\n")
    (fake / "__main__.py").write_text("raise SystemExit('planted')\n")
    command = os.path.join(os.path.dirname(sys.executable), "sklookupctl")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONPYCACHEPREFIX": str(tmp_path)}
    out = subprocess.run(
        [command, "--version"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("sklookupctl, version"), out
