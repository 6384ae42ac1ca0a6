"""A hostile local user, and text other processes wrote: what issue 8 found, each a test.

The unprivileged steps run as `nobody` through setpriv. Every test works in its own netns and
its own bpffs mounts (the session's, or a fresh one made here and unmounted after).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import stat
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from sklookupctl import compiler, program, trust
from sklookupctl.cli import cli

from .conftest import NS, private_bpffs

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]


def nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AS_NOBODY, *cmd], capture_output=True, text=True, timeout=30)


HOLD = (
    "import fcntl, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX if sys.argv[2] == '-x' else fcntl.LOCK_SH)\n"
    "time.sleep(120)\n"
)


@contextlib.contextmanager
def holding(path: str, how: str, as_nobody: bool) -> Iterator[subprocess.Popen[str]]:
    """A process (one: no child inherits the lock) that holds a flock on `path` (`-s` or
    `-x`) until the block ends."""
    cmd = [*(AS_NOBODY if as_nobody else []), "/usr/bin/python3", "-c", HOLD, path, how]
    proc = subprocess.Popen(cmd, text=True)
    try:
        st = os.stat(path)
        deadline = time.monotonic() + 10
        while proc.pid not in trust.lock_holders(st):
            assert proc.poll() is None, "the lock holder died"
            assert time.monotonic() < deadline, "the lock holder never took the lock"
            time.sleep(0.02)
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def fresh_bpffs(tmp_path: Path) -> contextlib.AbstractContextManager[str]:
    """A bpffs of its own (mode 1777, as every new mount) where nobody can reach it."""
    return private_bpffs("sklt-hostile-", 0o755)


def one_line(res: object) -> str:
    out = getattr(res, "output", "")
    assert "Traceback" not in out, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


# -- the state directory and its lock ----------------------------------------------------------


def test_nobody_cannot_open_lock_or_rename_the_state(ns: NS) -> None:
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--drop")
    base = os.path.join(ns.bpffs, "sklookupctl")
    st = os.stat(base)
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700
    for path in (base, os.path.join(base, "lock")):
        r = nobody("flock", "-n", path, "true")
        assert r.returncode != 0 and "Permission denied" in r.stderr, r
    (nsdir,) = [n for n in os.listdir(base) if n.startswith("ns-")]
    r = nobody("mv", os.path.join(base, nsdir), os.path.join(ns.bpffs, "stolen"))
    assert r.returncode != 0, r
    assert ns.status()["loaded"] is True
    assert ns.dial("tcp", "192.0.2.1", 80) == "refused"


def test_a_lock_taken_through_an_old_open_directory_blocks_nothing(ns: NS) -> None:
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--drop")
    base = os.path.join(ns.bpffs, "sklookupctl")
    os.chmod(base, 0o755)  # as an older version made it: anyone could open it and flock it
    os.chmod(ns.bpffs, 0o1777)
    with holding(base, "-x", as_nobody=True):
        for args in (["attach", "tcp", "198.51.100.0/24", "80", "--drop"], ["status"]):
            t0 = time.monotonic()
            res = ns.cli("--wait", "2", *args)
            assert res.exit_code == 0, res.output  # the lock is base/lock, out of their reach
            assert time.monotonic() - t0 < 2
        # the writer closed the directory on its way, and nobody cannot reach the lock
        assert stat.S_IMODE(os.stat(base).st_mode) == 0o700
    r = nobody("flock", "-n", os.path.join(base, "lock"), "true")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r


def test_a_stuck_writer_never_hangs_a_reader_for_long(ns: NS) -> None:
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--drop")
    lock = os.path.join(ns.bpffs, "sklookupctl", "lock")
    with holding(lock, "-x", as_nobody=False) as holder:
        for args in (["status"], ["status", "--all"], ["export"], ["gc"], ["detach", "--all"]):
            t0 = time.monotonic()
            res = ns.cli("--wait", "0.3", *args)
            assert res.exit_code == 4, (args, res.output)
            line = one_line(res)
            assert f"locked by pid {holder.pid} (/usr/bin/python3 -c import fcntl" in line
            assert "--wait" in line and time.monotonic() - t0 < 2.5
        res = ns.cli("--wait", "0.3", "status", "--json")
        assert res.exit_code == 4 and res.stdout == ""
    assert ns.status()["loaded"] is True


def test_a_reader_does_not_hold_the_lock_while_its_output_waits(ns: NS, tmp_path: Path) -> None:
    # a reader whose output nobody reads (`status | less`, stopped) must not block writers:
    # the lock is released before anything is printed
    rules = "".join(
        f'[[rules]]\nprotocol = "tcp"\nprefix = "192.0.2.{i}"\nports = "all"\naction = "drop"\n'
        for i in range(80)
    )
    (tmp_path / "r.toml").write_text(rules)
    ns.ok("apply", str(tmp_path / "r.toml"))
    r_fd, w_fd = os.pipe()
    fcntl.fcntl(w_fd, 1031, 4096)  # F_SETPIPE_SZ: the table does not fit
    reader = subprocess.Popen(ns.script_argv("status"), stdout=w_fd)
    os.close(w_fd)
    try:
        deadline = time.monotonic() + 20
        # until the reader is stuck writing its output (how much of it the pipe took first
        # depends on how the kernel merges writes into the pipe's one page)
        while not _wchan(reader.pid).endswith("pipe_write") or not _pipe_bytes(r_fd):
            assert time.monotonic() < deadline and reader.poll() is None
            time.sleep(0.1)
        res = ns.cli("--wait", "2", "attach", "tcp", "198.51.100.0/24", "80", "--drop")
        assert res.exit_code == 0, res.output
        assert reader.poll() is None  # still blocked: it never held the lock meanwhile
    finally:
        reader.kill()
        reader.wait(timeout=10)
        os.close(r_fd)


def _wchan(pid: int) -> str:
    """Where in the kernel the process sleeps (blocked writing to a pipe: "pipe_write", or
    "anon_pipe_write" on newer kernels)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pipe_bytes(fd: int) -> bytes:
    """How much is waiting in the pipe, without reading it (FIONREAD)."""
    import array

    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return b"x" * buf[0]


def test_nobody_cannot_plant_the_state_directory(ns: NS, tmp_path: Path) -> None:
    with fresh_bpffs(tmp_path) as bpffs:
        base = os.path.join(bpffs, "sklookupctl")
        cmd = ["--netns", ns.name, "--bpffs", bpffs]
        # a directory made first by nobody
        assert nobody("mkdir", base).returncode == 0
        for args in (["attach", "tcp", "192.0.2.0/24", "all", "--drop"], ["status"], ["gc"]):
            res = CliRunner().invoke(cli, [*cmd, *args])
            assert res.exit_code == 4, (args, res.output)
            assert f"{base} is owned by uid {NOBODY}, not root" in one_line(res)
        assert os.listdir(base) == []
        os.rmdir(base)
        # a symlink made first by nobody, to a directory of theirs
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, NOBODY, NOBODY)
        assert nobody("ln", "-s", str(theirs), base).returncode == 0
        for args in (["attach", "tcp", "192.0.2.0/24", "all", "--drop"], ["status"]):
            res = CliRunner().invoke(cli, [*cmd, *args])
            assert res.exit_code == 4, (args, res.output)
            assert f"{base} is a symlink" in one_line(res)
        assert os.listdir(theirs) == []
        os.unlink(base)
        # and a directory of root's that others may write
        os.mkdir(base, 0o777)
        os.chmod(base, 0o777)
        res = CliRunner().invoke(cli, [*cmd, "status"])
        assert res.exit_code == 4 and "is mode 0777" in one_line(res), res.output
        os.rmdir(base)
        assert ns.dial("tcp", "192.0.2.1", 80) == "refused"  # nothing ever steered


def test_a_bpffs_others_can_rename_in_is_refused(ns: NS, tmp_path: Path) -> None:
    with fresh_bpffs(tmp_path) as bpffs:
        os.chmod(bpffs, 0o777)  # no sticky bit: anyone could rename sklookupctl away
        res = CliRunner().invoke(
            cli,
            ["--netns", ns.name, "--bpffs", bpffs, "attach", "tcp", "192.0.2.0/24", "80", "--drop"],
        )
        assert res.exit_code == 4 and "without the sticky bit" in one_line(res), res.output
        assert "sklookupctl" not in os.listdir(bpffs)


def test_a_read_only_bpffs_is_read_and_refused_in_one_line(ns: NS, tmp_path: Path) -> None:
    with fresh_bpffs(tmp_path) as bpffs:
        cmd = ["--netns", ns.name, "--bpffs", bpffs]
        ns.proxy(tcp="127.0.0.1:9000", tag="web")
        res = CliRunner().invoke(
            cli, [*cmd, "attach", "tcp", "192.0.2.0/24", "all", "--to", "127.0.0.1:9000"]
        )
        assert res.exit_code == 0, res.output
        want = CliRunner().invoke(cli, [*cmd, "export"]).stdout
        subprocess.run(["mount", "-o", "remount,ro", bpffs], check=True)
        try:
            for args in (["status"], ["status", "--all"], ["export"], ["status", "--json"]):
                res = CliRunner().invoke(cli, [*cmd, *args])
                assert res.exit_code == 0, (args, res.output)
            assert CliRunner().invoke(cli, [*cmd, "export"]).stdout == want
            assert "live" in CliRunner().invoke(cli, [*cmd, "status"]).stdout
            for args in (["attach", "tcp", "198.51.100.0/24", "80", "--drop"], ["gc"]):
                res = CliRunner().invoke(cli, [*cmd, *args])
                assert res.exit_code == 4, (args, res.output)
                line = one_line(res)
                assert "Read-only file system" in line and "Errno" not in line, line
                assert "remount it read-write" in line, line
            assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 web"
        finally:
            subprocess.run(["mount", "-o", "remount,rw", bpffs], check=True)
            CliRunner().invoke(cli, [*cmd, "detach", "--all"])


# -- the program cache ---------------------------------------------------------------------------

REFUSE_ALL = bytes([0xB7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])  # r0 = 0; exit


def plant(directory: Path) -> Path:
    """nobody's cache, holding a program that refuses every connection under the right name."""
    directory.mkdir(parents=True, exist_ok=True)
    key = program.cache_key(compiler.read_source())
    img = directory / f"dispatcher-{key}.img"
    img.write_bytes(program.MAGIC + hashlib.sha256(REFUSE_ALL).digest() + REFUSE_ALL)
    for p in [img, *img.parents]:
        if p == directory.parent:
            break
        os.chown(p, NOBODY, NOBODY)
    return img


@pytest.fixture
def user_home(tmp_path: Path) -> Path:
    os.chmod(tmp_path, 0o755)
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    return home


def test_root_never_loads_a_program_from_a_users_cache(
    ns: NS, user_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plant(user_home / ".cache" / "sklookupctl")
    ns.proxy(tcp="127.0.0.1:9000", tag="web")
    # `sudo -E`: root keeps the user's HOME and XDG_CACHE_HOME, and must not use them
    monkeypatch.delenv(compiler.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(user_home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(user_home / ".cache"))
    assert compiler.cache_dir() == compiler.ROOT_CACHE
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", "127.0.0.1:9000")
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 web"
    # named explicitly, a cache of another user's is ignored too, with a note, and compiled
    ns.ok("detach", "--all")
    monkeypatch.setenv(compiler.CACHE_ENV, str(user_home / ".cache" / "sklookupctl"))
    res = ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", "127.0.0.1:9000")
    assert "note: not using the program cache" in res.output
    assert f"is owned by uid {NOBODY}" in res.output
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 web"


def test_a_cache_file_others_can_write_is_not_used(
    ns: NS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    img = plant(cache)
    os.chown(cache, 0, 0)
    os.chmod(cache, 0o700)
    os.chown(img, 0, 0)
    os.chmod(img, 0o666)  # root's, but anyone may have written it
    monkeypatch.setenv(compiler.CACHE_ENV, str(cache))
    ns.proxy(tcp="127.0.0.1:9000", tag="web")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", "127.0.0.1:9000")
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 web"


def test_a_file_where_the_cache_should_be_only_costs_a_compile(
    ns: NS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "file"
    f.write_text("not a directory")
    monkeypatch.setenv(compiler.CACHE_ENV, str(f))
    res = ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--drop")
    assert "note: not using the program cache" in res.output
    assert "Traceback" not in res.output and f.read_text() == "not a directory"


def test_the_cache_is_made_private_and_home_is_never_made(
    ns: NS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = tmp_path / "new" / "cache"
    monkeypatch.setenv(compiler.CACHE_ENV, str(made))
    ns.ok("attach", "tcp", "192.0.2.0/24", "80", "--drop")
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    assert any(n.startswith("dispatcher-") for n in os.listdir(made))
    ns.ok("detach", "--all")
    monkeypatch.delenv(compiler.CACHE_ENV)
    monkeypatch.setenv("HOME", "/nonexistent-sklt")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    ns.ok("attach", "tcp", "192.0.2.0/24", "80", "--drop")
    assert not os.path.exists("/nonexistent-sklt")


def test_an_untrusted_cache_builds_the_header_stand_in_privately(
    ns: NS, user_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nobody's cache holds a poisoned header stand-in (and no program, so root must compile)
    cache = user_home / "c"
    kconfig = cache / "sklookupctl" / "kernel-standin-1" / "include" / "linux" / "kconfig.h"
    kconfig.parent.mkdir(parents=True)
    kconfig.write_text("#error planted by another user\n")
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(cache)], check=True)
    before = sorted(str(p) for p in cache.rglob("*"))
    for env in ({"XDG_CACHE_HOME": str(cache)}, {compiler.CACHE_ENV: str(cache / "sklookupctl")}):
        monkeypatch.delenv(compiler.CACHE_ENV, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(program, "_read_cache", lambda path, maps: None)  # compile each time
        ns.ok("attach", "tcp", "192.0.2.0/24", "80", "--drop")
        ns.ok("detach", "--all")
    # neither the program nor a stand-in went there, and theirs was never used
    assert sorted(str(p) for p in cache.rglob("*")) == before


# -- what other processes wrote reaches the terminal escaped -------------------------------------


def test_process_names_are_shown_escaped_never_as_markup(ns: NS) -> None:
    comm = "[/]\x1b[31mred"
    p = ns.proxy(tcp="127.0.0.1:9000", extra=("--comm", comm, "--uid", str(NOBODY)))
    out = ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", "127.0.0.1:9000").output
    assert "\x1b" not in out and f"pid {p.pid} ([/]\\x1b[31mred) fd" in out, out
    for run in (ns.cli, ns.script):
        res = run("status")
        out = res.stdout if hasattr(res, "stdout") else ""
        code = getattr(res, "exit_code", getattr(res, "returncode", None))
        assert code == 0, out
        assert "\x1b" not in out
        assert f"{p.pid} ([/]\\x1b[31mred) fd" in out, out


def test_names_are_shown_as_they_are(ns: NS) -> None:
    # brackets are allowed in names (the default name of an IPv6 target has them): rich must
    # never read them as markup, in any table
    ns.proxy(tcp="[::]:8082")
    res = ns.ok("attach", "tcp", "2001:db8::/64", "all", "--to", "[::]:8082")
    assert "all -> tcp-[::]:8082" in res.output, res.output
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", "[::]:8082", "--name", "[bold]w[/]")
    out = ns.ok("status").stdout
    for name in ("tcp-[::]:8082", "[bold]w[/]"):
        assert f"steer -> {name}" in out, out  # the rules table
        assert out.count(name) == 2, out  # and the targets table


def test_the_callers_environment_never_chooses_what_is_compiled(
    ns: NS, user_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # `sudo -E` keeps the user's environment: headers of theirs, reached through ARCH (BCC
    # adds arch/$ARCH/include of the kernel tree), CPATH or C_INCLUDE_PATH, must never be read
    evil = user_home / "evil"
    for rel in ("include/linux/log2.h", "include/asm/page.h", "linux/types.h"):
        (evil / rel).parent.mkdir(parents=True, exist_ok=True)
        (evil / rel).write_text("#error planted by another user\n")
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(evil)], check=True)
    monkeypatch.setenv(compiler.CACHE_ENV, str(tmp_path / "fresh"))  # a miss: it compiles
    monkeypatch.setenv("ARCH", "../" * 30 + str(evil).lstrip("/"))
    monkeypatch.setenv("CPATH", str(evil))
    monkeypatch.setenv("C_INCLUDE_PATH", str(evil))
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(evil))
    ns.proxy(tcp="127.0.0.1:9000", tag="web")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", "127.0.0.1:9000")
    ns.ok("attach", "tcp", "192.0.2.7", "22", "--drop")
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 web"
    assert ns.dial("tcp", "192.0.2.7", 22) == "refused"
    assert os.environ["ARCH"].endswith("evil")  # the caller's environment is as it was


def test_tmpdir_is_never_where_the_stand_in_is_built(
    ns: NS, user_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an untrusted cache: the header stand-in is built in a private directory, never under
    # $TMPDIR (a directory of the user's, where they could swap it)
    monkeypatch.setenv(compiler.CACHE_ENV, str(user_home))  # nobody's: not used
    monkeypatch.setenv("TMPDIR", "/proc")  # nothing can be made there
    res = ns.ok("attach", "tcp", "192.0.2.0/24", "80", "--drop")
    assert "note: not using the program cache" in res.output
    assert ns.dial("tcp", "192.0.2.1", 80) == "refused"


def test_a_command_waiting_for_the_lock_stops_on_a_signal_in_one_line(ns: NS) -> None:
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--drop")
    lock = os.path.join(ns.bpffs, "sklookupctl", "lock")
    signals = ((signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated"))
    commands = (["attach", "tcp", "198.51.100.0/24", "80", "--drop"], ["status", "--json"])
    with holding(lock, "-x", as_nobody=False):
        for sig, code, word in signals:
            for args in commands:
                argv = ns.script_argv("--wait", "60", *args)
                p = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
                time.sleep(1.5)  # it waits for the lock now
                p.send_signal(sig)
                _, err = p.communicate(timeout=30)
                assert p.returncode == code, (args, err)
                if "--json" in args:
                    assert json.loads(err)["error"] == f"{word}: nothing was changed", err
                else:
                    assert err == f"error: {word}: nothing was changed\n", err
    assert "198.51.100.0/24" not in ns.ok("export").stdout.split("[[rules]]", 1)[1]


def test_the_working_directory_never_supplies_headers(
    ns: NS, user_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # BCC searches the working directory: root run from a directory of another user's must
    # not compile their headers (round 2 of the adversarial tester)
    evil = user_home / "cwd"
    (evil / "linux").mkdir(parents=True)
    (evil / "linux" / "types.h").write_text("#error planted by another user\n")
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(evil)], check=True)
    monkeypatch.setenv(compiler.CACHE_ENV, str(tmp_path / "fresh"))  # a miss: it compiles
    monkeypatch.chdir(evil)
    ns.proxy(tcp="127.0.0.1:9000", tag="web")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", "127.0.0.1:9000")
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 web"
    assert os.getcwd() == str(evil)  # and the caller is where it was


def test_a_bpffs_root_of_another_user_is_refused(ns: NS, tmp_path: Path) -> None:
    with fresh_bpffs(tmp_path) as bpffs:
        os.chown(bpffs, NOBODY, NOBODY)  # a delegated mount: they could rename the state away
        os.chmod(bpffs, 0o755)
        for args in (["attach", "tcp", "192.0.2.0/24", "80", "--drop"], ["status"]):
            res = CliRunner().invoke(cli, ["--netns", ns.name, "--bpffs", bpffs, *args])
            assert res.exit_code == 4, res.output
            assert f"{bpffs} is owned by uid {NOBODY}, not root" in one_line(res)
        assert "sklookupctl" not in os.listdir(bpffs)


def test_a_cache_that_takes_no_files_only_costs_a_compile(
    ns: NS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # trusted but unwritable (here a directory in a bpffs, which takes directories only)
    with fresh_bpffs(tmp_path) as other:
        monkeypatch.setenv(compiler.CACHE_ENV, os.path.join(other, "cache"))
        res = ns.ok("attach", "tcp", "192.0.2.0/24", "80", "--drop")
        assert "note: cannot write to the program cache" in res.output, res.output
        assert ns.dial("tcp", "192.0.2.1", 80) == "refused"
        ns.ok("detach", "--all")
        for root, dirs, _files in os.walk(os.path.join(other, "cache"), topdown=False):
            for d in dirs:
                os.rmdir(os.path.join(root, d))


def test_apply_from_a_closed_stdin_is_one_line(ns: NS) -> None:
    out = subprocess.run(
        ns.script_argv("apply", "-"), stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    assert out.returncode == 1 and "is empty" in out.stderr, out
    out = subprocess.run(
        ["sh", "-c", '"$0" "$@" <&-', *ns.script_argv("apply", "-")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1, out
    assert out.stderr == (
        "error: cannot read the rule file from stdin: closed (give a TOML rule file (- for "
        "stdin))\n"
    ), out.stderr


def test_readers_back_to_back_do_not_keep_a_writer_out(ns: NS) -> None:
    """flock prefers nobody: readers whose shared locks overlap (metrics scraped back to back)
    kept a writer out until it gave up. The turnstile lets the writer in."""
    import threading

    from sklookupctl import store

    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--drop")
    stop = threading.Event()
    held = [0]

    def reader(offset: float) -> None:
        time.sleep(offset)
        while not stop.is_set():
            with store.Store.locked(ns.bpffs, exclusive=False, wait=30):
                held[0] += 1
                time.sleep(0.3)  # a scrape of a large rule set

    threads = [threading.Thread(target=reader, args=(i * 0.1,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)  # the readers overlap now: the shared lock is never free
        t0 = time.monotonic()
        res = ns.cli("--wait", "3", "attach", "tcp", "198.51.100.0/24", "80", "--drop")
        assert res.exit_code == 0, res.output
        assert time.monotonic() - t0 < 2
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert held[0] >= 3


def test_busy_names_the_holder_not_the_writer_queued_ahead(ns: NS) -> None:
    import threading

    from sklookupctl import store

    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--drop")
    release = threading.Event()
    holding_now = threading.Event()

    def reader() -> None:
        with store.Store.locked(ns.bpffs, exclusive=False, wait=5):
            holding_now.set()
            release.wait(20)

    t = threading.Thread(target=reader)
    t.start()
    writer = None
    try:
        assert holding_now.wait(10)
        writer = subprocess.Popen(
            ns.script_argv("--wait", "15", "attach", "tcp", "198.51.100.0/24", "80", "--drop"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # it holds the turnstile now, waiting for the reader
        res = ns.script("--wait", "0.5", "status")
        assert res.returncode == 4
        line = res.stderr.strip()
        assert f"locked by pid {os.getpid()} " in line, line
        assert f"pid {writer.pid} " in line and "waits for it ahead" in line, line
        assert line.count(f"pid {os.getpid()} ") == 1
    finally:
        release.set()
        t.join(20)
        if writer is not None:
            assert writer.wait(timeout=30) == 0
