"""doctor's judgments from given facts, its report (text, JSON, exit code), and that it never
raises nor creates anything, whatever the machine. No root needed."""

from __future__ import annotations

import errno
import json
import os
import resource
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sklookupctl import api, compiler, doctor, store, trust
from sklookupctl.cli import cli
from sklookupctl.doctor import FAIL, OK, WARN, Check, NsFacts, Report
from sklookupctl.errors import ROOT_REFUSED, PermissionDenied, Untrusted

MiB = 1 << 20


def err(code: int) -> OSError:
    return OSError(code, f"load program: {os.strerror(code)}")


# -- kernel, btf, memlock -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("release", "want"),
    [
        ("6.1.0-28-amd64", (6, 1)),
        ("5.9.0", (5, 9)),
        ("6.18.44-fc-v669", (6, 18)),
        ("4", None),
        ("custom", None),
    ],
)
def test_parse_release(release: str, want: tuple[int, int] | None) -> None:
    assert doctor.parse_release(release) == want


def test_kernel_ok_when_the_probe_loads() -> None:
    c = doctor.judge_kernel("6.1.0-28-amd64", None, privileged=True)
    assert (c.name, c.status, c.fix) == ("kernel", OK, "")
    assert c.detail == "6.1.0-28-amd64: sk_lookup supported"


def test_kernel_older_than_5_9_fails_whatever_the_probe() -> None:
    for load in (None, err(errno.EINVAL)):
        c = doctor.judge_kernel("5.8.0", load, privileged=True)
        assert c.status == FAIL and "older than 5.9" in c.detail and "5.9 or newer" in c.fix


def test_kernel_refusing_the_program_fails_with_its_error() -> None:
    c = doctor.judge_kernel("5.10.0", err(errno.EINVAL), privileged=True)
    assert c.status == FAIL
    assert "refused an sk_lookup program: load program: Invalid argument" in c.detail
    assert "5.9+" in c.fix


def test_kernel_without_privileges_is_not_tested_but_not_failed() -> None:
    c = doctor.judge_kernel("6.1.0", err(errno.EPERM), privileged=False)
    assert c.status == WARN and "not tested" in c.detail and c.fix == "run doctor as root"
    # root refused: lockdown, a security module
    c = doctor.judge_kernel("6.1.0", err(errno.EPERM), privileged=True)
    assert c.status == FAIL and ROOT_REFUSED in c.fix


def test_the_probe_is_two_instructions_returning_sk_pass() -> None:
    mov_r0_1, exit_ = bytes.fromhex("b700000001000000"), bytes.fromhex("9500000000000000")
    assert mov_r0_1 + exit_ == doctor.PROBE


def test_btf(tmp_path: Path) -> None:
    present = tmp_path / "vmlinux"
    present.write_bytes(b"")
    assert doctor.check_btf(str(present)).status == OK
    c = doctor.check_btf(str(tmp_path / "missing"))
    assert c.status == WARN and "CONFIG_DEBUG_INFO_BTF" in c.fix


def test_memlock_does_not_matter_from_5_11() -> None:
    c = doctor.judge_memlock("6.1.0", 8 * MiB, 8 * MiB)
    assert c.status == OK and "8 MiB" in c.detail and "memory cgroup" in c.detail


@pytest.mark.parametrize(
    ("soft", "status"),
    [(8 * MiB, WARN), (64 * 1024, WARN), (64 * MiB, OK), (resource.RLIM_INFINITY, OK)],
)
def test_memlock_before_5_11(soft: int, status: str) -> None:
    c = doctor.judge_memlock("5.10.0-30-amd64", soft, resource.RLIM_INFINITY)
    assert c.status == status
    if status == WARN:
        assert "LimitMEMLOCK=infinity" in c.fix and "ulimit -l unlimited" in c.fix
    else:
        assert c.fix == ""
    if soft == resource.RLIM_INFINITY:
        assert "unlimited" in c.detail


# -- bpffs ---------------------------------------------------------------------------------


def test_a_directory_that_is_no_bpffs_fails_with_the_mount_and_fstab_fix(tmp_path: Path) -> None:
    c = doctor.check_bpffs(str(tmp_path))
    assert c.status == FAIL and "is not a bpffs mount" in c.detail
    assert f"mount -t bpf bpf {tmp_path}" in c.fix
    assert f"bpffs {tmp_path} bpf defaults 0 0" in c.fix and "/etc/fstab" in c.fix
    assert list(tmp_path.iterdir()) == []  # nothing made


def test_a_missing_bpffs_says_to_make_the_directory(tmp_path: Path) -> None:
    c = doctor.check_bpffs(str(tmp_path / "nope"))
    assert c.status == FAIL and "does not exist" in c.detail
    assert c.fix.startswith(f"mkdir -p {tmp_path / 'nope'}; mount -t bpf bpf")
    assert not (tmp_path / "nope").exists()


@pytest.fixture
def fake_bpffs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path taken for a bpffs mount: base_dir says so; trust checks stay real unless a test
    replaces them."""
    base = tmp_path / store.TOP
    monkeypatch.setattr(store, "base_dir", lambda bpffs: str(base))
    return tmp_path


def test_bpffs_without_state_is_ok_and_stays_so(
    fake_bpffs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[bool] = []

    def nothing(bpffs: str, path: str, create: bool) -> None:
        asked.append(create)
        return None

    monkeypatch.setattr(trust, "open_state_dir", nothing)
    c = doctor.check_bpffs(str(fake_bpffs))
    assert c.status == OK and "no state yet" in c.detail
    assert asked == [False]  # doctor never makes the state directory
    assert list(fake_bpffs.iterdir()) == []


def test_bpffs_with_trusted_state(fake_bpffs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = fake_bpffs / store.TOP
    base.mkdir(mode=0o700)
    monkeypatch.setattr(
        trust, "open_state_dir", lambda bpffs, path, create: os.open(path, os.O_RDONLY)
    )
    c = doctor.check_bpffs(str(fake_bpffs))
    assert c.status == OK and f"state in {base}" in c.detail
    base.chmod(0o755)  # an older version's
    c = doctor.check_bpffs(str(fake_bpffs))
    assert c.status == WARN and c.fix == f"chmod 0700 {base}"


def test_bpffs_untrusted_state_fails_with_the_commands_own_hint(
    fake_bpffs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def untrusted(bpffs: str, path: str, create: bool) -> int:
        assert create is False
        raise Untrusted(f"{path} is owned by uid 1000, not root", "check what it holds")

    monkeypatch.setattr(trust, "open_state_dir", untrusted)
    c = doctor.check_bpffs(str(fake_bpffs))
    assert c.status == FAIL and "owned by uid 1000" in c.detail
    assert c.fix == "check what it holds"


def test_bpffs_state_not_readable_without_root_is_a_warning(
    fake_bpffs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(bpffs: str, path: str, create: bool) -> int:
        raise PermissionDenied(f"cannot open {path}", "run as root")

    monkeypatch.setattr(trust, "open_state_dir", denied)
    c = doctor.check_bpffs(str(fake_bpffs))
    assert c.status == WARN and "not checked" in c.detail and c.fix == "run doctor as root"


def test_lock_problem(tmp_path: Path) -> None:
    assert doctor.lock_problem(str(tmp_path / "lock")) == ""  # not there yet: fine
    (tmp_path / "lock").write_text("")
    assert "not a directory" in doctor.lock_problem(str(tmp_path / "lock"))


# -- privileges ----------------------------------------------------------------------------


def caps(*bits: int) -> int:
    return sum(1 << b for b in bits)


def test_privileges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "_effective_caps", lambda: 0)
    c = doctor.check_privileges()
    assert c.status == FAIL and "CAP_BPF" in c.detail and c.fix == "run it with sudo"
    assert doctor.has_privileges() is False
    every = caps(api.CAP_SYS_ADMIN, api.CAP_NET_ADMIN, api.CAP_BPF, api.CAP_SYS_PTRACE)
    monkeypatch.setattr(api, "_effective_caps", lambda: every)
    assert doctor.check_privileges().status == OK and doctor.has_privileges()
    monkeypatch.setattr(api, "_effective_caps", lambda: every & ~caps(api.CAP_SYS_PTRACE))
    c = doctor.check_privileges()
    assert c.status == WARN and "CAP_SYS_PTRACE" in c.detail


# -- compiler and cache --------------------------------------------------------------------


def test_compiler_judgment() -> None:
    img = "/var/cache/sklookupctl/dispatcher-x.img"
    assert doctor.judge_compiler("", img).status == OK
    only_bcc = doctor.judge_compiler("", None)
    assert only_bcc.status == WARN and "no cached program image" in only_bcc.detail
    assert "next attach or apply caches it" in only_bcc.fix
    assert "see the cache check" in doctor.judge_compiler("", None, cache_usable=False).fix
    only_image = doctor.judge_compiler("ModuleNotFoundError: No module named 'bcc'", img)
    assert only_image.status == WARN and "python3-bpfcc" in only_image.fix
    neither = doctor.judge_compiler("ModuleNotFoundError: No module named 'bcc'", None)
    assert neither.status == FAIL
    assert "apt-get install python3-bpfcc" in neither.fix and "scripts/setup" in neither.fix


def test_cache_location_is_the_compilers_choice(tmp_path: Path) -> None:
    mine = tmp_path / "cache"
    path, problem = doctor.cache_location(str(mine), os.geteuid(), "", "")
    assert (path, problem) == (str(mine), "") and not mine.exists()  # nothing made
    # compiler.cache_dir would use (and make) the same directory
    assert compiler._cache_dir(str(mine), os.geteuid(), "", "") == path
    assert doctor.cache_location("", 0, "/home/x", "")[0] == compiler.ROOT_CACHE
    xdg = tmp_path / "xdg"
    assert doctor.cache_location("", 1000, "", str(xdg)) == (str(xdg / "sklookupctl"), "")
    assert doctor.cache_location("", 1000, "", "")[1] == "HOME (unset) is not a directory"
    assert doctor.cache_location("a\0b", 1000, "", "") == (None, "its path holds a NUL")


def test_a_cache_others_could_write_is_ignored(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    path, problem = doctor.cache_location(str(shared / "c"), os.geteuid(), "", "")
    assert "writable by others (0777)" in problem
    c = doctor.judge_cache(path, problem, exists=False)
    assert c.status == WARN and "ignored" in c.detail and compiler.CACHE_ENV in c.fix
    assert not (shared / "c").exists()


def test_cache_judgment_ok() -> None:
    c = doctor.judge_cache("/var/cache/sklookupctl", "", exists=False)
    assert c.status == OK and "not made yet" in c.detail
    assert doctor.judge_cache("/var/cache/sklookupctl", "", exists=True).detail.endswith("trusted")


# -- namespaces ----------------------------------------------------------------------------


def entry(state: str, **kw: Any) -> store.Entry:
    e = store.Entry(
        f"/sys/fs/bpf/sklookupctl/ns-{kw.pop('cookie', 7)}", 7, 4026532000, "edge", state
    )
    for k, v in kw.items():
        setattr(e, k, v)
    return e


def steering(**kw: Any) -> NsFacts:
    f = NsFacts(entry("steering", generation=3, rules=2, targets=1), "edge", "edge")
    f.prog_id, f.tag, f.attached, f.current = 40, "ab" * 8, [40], True
    for k, v in kw.items():
        setattr(f, k, v)
    return f


def test_a_steering_namespace_is_ok() -> None:
    c = doctor.judge_namespace(steering())
    assert (c.name, c.status, c.fix) == ("netns edge", OK, "")
    assert c.detail == "steering: generation 3, 2 rules, 1 target"


@pytest.mark.parametrize(
    ("attached", "said"),
    [
        ([12, 40], "12 runs before ours"),
        ([40, 12, 13], "12, 13 run after ours"),
        ([11, 40, 12], "11 runs before ours, 12 runs after ours"),
    ],
)
def test_other_programs_are_named_with_their_order(attached: list[int], said: str) -> None:
    c = doctor.judge_namespace(steering(attached=attached))
    assert c.status == WARN and said in c.detail and "verdicts combine with ours" in c.detail
    others = [p for p in attached if p != 40]
    assert f"bpftool prog show id {others[0]}" in c.fix


def test_a_dispatcher_of_another_version_says_upgrade() -> None:
    c = doctor.judge_namespace(steering(current=False))
    assert c.status == WARN and f"program tag {'ab' * 8}" in c.detail
    assert c.fix == "sklookupctl -n edge upgrade"
    unknown = doctor.judge_namespace(steering(current=None))
    assert unknown.status == OK and "unknown" in unknown.detail


def test_a_killed_trace_says_gc() -> None:
    f = steering()
    f.entry.dead_traces = 1
    c = doctor.judge_namespace(f)
    assert c.status == WARN and "killed `trace`" in c.detail and c.fix == "sklookupctl gc"


def test_stale_generations_say_gc_with_the_bpffs() -> None:
    f = steering()
    f.entry.stale = 2
    c = doctor.judge_namespace(f, "/tmp/b")
    assert c.status == WARN and "2 stale generations" in c.detail
    assert c.fix == "sklookupctl --bpffs /tmp/b gc"


@pytest.mark.parametrize(
    ("state", "status", "fix"),
    [
        ("dead", WARN, "sklookupctl gc"),
        ("unfinished", WARN, "sklookupctl gc"),
        ("damaged-dead", WARN, "sklookupctl gc"),
        ("other-layout-dead", WARN, "sklookupctl gc"),
        ("other-layout", WARN, "sklookupctl upgrade --all"),
        ("damaged", FAIL, "sklookupctl -n edge detach --all"),
        ("detached", WARN, "sklookupctl -n edge detach --all"),
        ("something-new", WARN, "sklookupctl gc"),
    ],
)
def test_each_state(state: str, status: str, fix: str) -> None:
    c = doctor.judge_namespace(
        NsFacts(entry(state, problem="map nodes is missing"), "edge", "edge")
    )
    assert c.status == status and fix in c.fix
    assert "/sys/fs/bpf/sklookupctl/ns-7" in c.detail
    if state.startswith("damaged"):
        assert "map nodes is missing" in c.detail
    if state == "detached":
        assert "apply FILE" in c.fix


# -- the report ----------------------------------------------------------------------------


REPORT = Report(
    [
        Check("kernel", OK, "6.18.0: sk_lookup supported"),
        Check("bpffs", FAIL, "/sys/fs/bpf is not a bpffs mount", "mount -t bpf bpf /sys/fs/bpf"),
        Check("netns edge", WARN, "the namespace is gone", "sklookupctl gc"),
        Check("btf", WARN, "/sys/kernel/btf/vmlinux missing", "a kernel with BTF"),
    ]
)


def test_text_lines() -> None:
    assert REPORT.lines() == [
        "ok    kernel        6.18.0: sk_lookup supported",
        "FAIL  bpffs         /sys/fs/bpf is not a bpffs mount",
        "  fix: mount -t bpf bpf /sys/fs/bpf",
        "warn  netns edge    the namespace is gone",
        "  fix: sklookupctl gc",
        "warn  btf           /sys/kernel/btf/vmlinux missing",
        "  fix: a kernel with BTF",
        "2 warnings, 1 failure",
    ]
    assert Report([Check("btf", WARN, "x", "y")]).lines()[-1] == "1 warning, 0 failures"


def test_json_and_exit_code() -> None:
    doc = REPORT.to_json()
    assert doc["ok"] is False and REPORT.exit_code == 4
    assert doc["summary"] == {"ok": 1, "warn": 2, "fail": 1}
    checks = doc["checks"]
    assert isinstance(checks, list)
    assert checks[1] == {
        "name": "bpffs",
        "status": "fail",
        "detail": "/sys/fs/bpf is not a bpffs mount",
        "fix": "mount -t bpf bpf /sys/fs/bpf",
    }
    warned = Report([Check("btf", WARN, "x", "y"), Check("kernel", OK, "fine")])
    assert warned.ok and warned.exit_code == 0


def test_a_check_that_raises_is_its_own_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(doctor, "bcc_problem", broken)
    (c,) = doctor._safely("compiler", doctor.check_compiler)
    assert c == Check("compiler", FAIL, "the check could not run: RuntimeError: boom", "")


def test_run_on_a_broken_machine_reports_and_makes_nothing(tmp_path: Path) -> None:
    """The real checks (kernel probe included, as whoever runs the tests) against a bpffs that
    is a plain directory: a report, never an exception, and nothing made."""
    report = doctor.run(str(tmp_path), 0.1)
    by = {c.name: c for c in report.checks}
    assert list(by) == [
        "kernel",
        "btf",
        "bpffs",
        "privileges",
        "compiler",
        "cache",
        "memlock",
        "netns",
    ]
    assert by["bpffs"].status == FAIL and by["netns"].status == WARN
    assert not report.ok and report.exit_code == 4
    assert list(tmp_path.iterdir()) == []
    assert all(c.status in (OK, WARN, FAIL) and "\n" not in c.detail for c in report.checks)


# -- the command ---------------------------------------------------------------------------


def test_the_command_prints_the_whole_report_then_exits_4(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, float]] = []

    def fake(bpffs: str, wait: float) -> Report:
        seen.append((bpffs, wait))
        return REPORT

    monkeypatch.setattr(doctor, "run", fake)
    res = CliRunner().invoke(cli, ["--bpffs", "/tmp/b", "--wait", "2", "doctor"])
    assert res.exit_code == 4 and seen == [("/tmp/b", 2.0)]
    assert res.stdout.splitlines() == REPORT.lines()
    res = CliRunner().invoke(cli, ["doctor", "--json"])
    assert res.exit_code == 4 and json.loads(res.stdout) == REPORT.to_json()
    assert res.stderr == ""  # the report is the output, not an error line


def test_the_command_exits_0_with_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "run", lambda bpffs, wait: Report([Check("btf", WARN, "x", "y")]))
    res = CliRunner().invoke(cli, ["doctor", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["ok"] is True


def test_text_is_cleaned(monkeypatch: pytest.MonkeyPatch) -> None:
    hostile = Report([Check("netns \x1b[31mx", WARN, "gone\nok    fake", "gc")])
    monkeypatch.setattr(doctor, "run", lambda bpffs, wait: hostile)
    out = CliRunner().invoke(cli, ["doctor"]).stdout
    assert "\x1b" not in out and "\\x1b[31mx" in out and "gone\\x0aok    fake" in out


def test_help_teaches_the_checks_and_exit_codes() -> None:
    out = CliRunner().invoke(cli, ["doctor", "--help"]).output
    for word in ("kernel", "bpffs", "privileges", "compiler", "memlock", "netns", "only reads"):
        assert word in out
    assert "4  at least one check failed" in out


def test_state_that_only_root_may_read_is_not_checked_in_words(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without root, listing <bpffs>/sklookupctl (root's, 0700) fails with EACCES: a warning
    saying so, not the exception's text."""

    def denied(bpffs: str, wait: float) -> list[doctor.NsFacts]:
        raise PermissionError(13, "Permission denied", f"{bpffs}/sklookupctl")

    monkeypatch.setattr(doctor.store, "base_dir", lambda bpffs: f"{bpffs}/sklookupctl")
    monkeypatch.setattr(doctor, "namespace_facts", denied)
    (check,) = doctor.check_namespaces("/sys/fs/bpf", 1)
    assert check.status == doctor.WARN and check.detail.startswith("not checked: ")
    assert "Errno" not in check.detail and check.fix == "run doctor as root"
