"""`doctor` on the real machine: a steered namespace is ok, a bpffs that is not one fails with
exit code 4, a deleted namespace's state is a warning with the gc fix, and another tool's
sk_lookup program beside ours is named with its run order. doctor changes nothing."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from sklookupctl import api, doctor
from sklookupctl import netns as nsmod
from sklookupctl.bpfsys import Link, Program
from sklookupctl.cli import cli

from .conftest import CONSOLE_SCRIPT, MADE, NS, private_bpffs


def run_doctor(bpffs: str) -> tuple[int, dict[str, Any]]:
    res = CliRunner().invoke(cli, ["--bpffs", bpffs, "doctor", "--json"])
    return res.exit_code, json.loads(res.stdout)


def by_name(doc: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in doc["checks"]}


def test_a_steered_namespace_is_ok(ns: NS, bpffs: str) -> None:
    ns.ok("attach", "tcp", "192.0.2.0/24", "80", "--drop")
    code, doc = run_doctor(bpffs)
    checks = by_name(doc)
    assert code == 0 and doc["ok"] is True, doc
    assert (
        checks["kernel"]["status"] == "ok" and "sk_lookup supported" in checks["kernel"]["detail"]
    )
    assert (checks["bpffs"]["status"], checks["bpffs"]["fix"]) == ("ok", "")
    detail = checks["bpffs"]["detail"]
    assert detail.startswith(f"{bpffs} is a bpffs mount (mode ")
    assert detail.endswith(f"state in {bpffs}/sklookupctl (root's, 0700)")
    mine = checks[f"netns {ns.name}"]
    assert mine["status"] == "ok" and mine["detail"].startswith("steering: generation 1, 1 rule")
    assert doc["summary"]["fail"] == 0
    assert set(doc["summary"]) == {"ok", "warn", "fail"}
    text = CliRunner().invoke(cli, ["--bpffs", bpffs, "doctor"]).stdout.splitlines()
    assert any(line.startswith("ok    bpffs         ") for line in text), text
    assert text[-1].endswith(", 0 failures")


def test_doctor_makes_no_state_directory() -> None:
    with private_bpffs("sklt-doctor-") as fresh:
        before = os.listdir(fresh)  # the kernel's own *.debug files
        code, doc = run_doctor(fresh)
        assert code == 0 and by_name(doc)["bpffs"]["status"] == "ok", doc
        assert "no state yet" in by_name(doc)["bpffs"]["detail"]
        assert by_name(doc)["netns"]["status"] == "ok"
        assert os.listdir(fresh) == before and "sklookupctl" not in before


def test_a_tmpfs_over_sys_fs_bpf_fails_and_exits_4() -> None:
    """In a private mount namespace only: /sys/fs/bpf covered by a tmpfs."""
    if not os.path.isdir("/sys/fs/bpf"):
        pytest.skip("no /sys/fs/bpf on this machine")
    had_state = os.path.lexists("/sys/fs/bpf/sklookupctl")
    # /sys made private in the new mount namespace first (not `--propagation private`, which
    # needs / to be a mount point: it is not in a chroot); nothing is mounted if that fails
    script = (
        "mount --make-rprivate /sys && mount -t tmpfs tmpfs /sys/fs/bpf && "
        'exec "$0" doctor --bpffs /sys/fs/bpf "$@"'
    )
    argv = ["unshare", "-m", "--propagation", "unchanged", "sh", "-c", script, CONSOLE_SCRIPT]
    res = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 4, res.stderr
    doc = json.loads(res.stdout)
    bpffs = by_name(doc)["bpffs"]
    assert doc["ok"] is False and bpffs["status"] == "fail"
    assert bpffs["detail"] == "/sys/fs/bpf is not a bpffs mount"
    assert "mount -t bpf bpf /sys/fs/bpf" in bpffs["fix"]
    assert "bpffs /sys/fs/bpf bpf defaults 0 0" in bpffs["fix"]
    assert doc["summary"]["fail"] >= 1
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert res.returncode == 4 and res.stderr == ""  # the report is the output
    lines = res.stdout.splitlines()
    i = lines.index("FAIL  bpffs         /sys/fs/bpf is not a bpffs mount")
    assert lines[i + 1].startswith("  fix: mount -t bpf bpf /sys/fs/bpf")
    assert "1 failure" in lines[-1]
    # the machine's own /sys/fs/bpf was never covered, and doctor made nothing in it
    assert os.path.lexists("/sys/fs/bpf/sklookupctl") == had_state


@contextlib.contextmanager
def doomed(bpffs: str) -> Iterator[NS]:
    """A namespace the test deletes behind sklookupctl's back; its state is collected after."""
    name = f"sklt-{uuid.uuid4().hex[:10]}"
    MADE.add(name)
    api.netns_add(name)
    try:
        yield NS(name, bpffs)
    finally:
        if os.path.exists(f"/run/netns/{name}"):
            api.netns_del(name, bpffs=bpffs)
        api.gc_state(bpffs=bpffs)


def test_a_deleted_namespace_warns_with_the_gc_fix(bpffs: str) -> None:
    with doomed(bpffs) as gone:
        gone.ok("attach", "tcp", "192.0.2.0/24", "80", "--drop")
        subprocess.run(["ip", "netns", "del", gone.name], check=True)  # not through sklookupctl
        deadline = time.monotonic() + 10  # the kernel detaches the link from a work queue
        while True:
            code, doc = run_doctor(bpffs)
            check = by_name(doc).get(f"netns {gone.name}")
            assert check is not None, doc
            if "gone" in check["detail"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert check["status"] == "warn" and "the namespace is gone" in check["detail"], check
        assert check["fix"] == f"sklookupctl --bpffs {bpffs} gc"
        assert code == 0  # a warning, not a failure
        # doctor removed nothing: gc does
        assert by_name(run_doctor(bpffs)[1])[f"netns {gone.name}"] == check
        gone.ok("gc")
        assert f"netns {gone.name}" not in by_name(run_doctor(bpffs)[1])


@contextlib.contextmanager
def foreign_program(n: NS) -> Iterator[int]:
    """Another tool's sk_lookup program (r0 = SK_PASS; exit) attached to the test namespace
    by a link this test holds; closing it detaches it. Yields the program's id."""
    prog = Program.load_sk_lookup(doctor.PROBE, "sklt_foreign")
    try:
        with nsmod.open_netns(n.name) as ns_:
            link = Link.create_netns(prog, ns_.fd)
        try:
            yield int(prog.info().id)
        finally:
            link.close()
    finally:
        prog.close()


@pytest.mark.parametrize("foreign_first", [True, False], ids=["foreign-before", "foreign-after"])
def test_a_foreign_program_is_reported_with_its_order(
    ns: NS, bpffs: str, foreign_first: bool
) -> None:
    attach = ("attach", "tcp", "192.0.2.0/24", "80", "--drop")
    if not foreign_first:
        ns.ok(*attach)
    with foreign_program(ns) as foreign_id:
        if foreign_first:
            ns.ok(*attach)
        code, doc = run_doctor(bpffs)
        check = by_name(doc)[f"netns {ns.name}"]
        when = "before" if foreign_first else "after"
        assert check["status"] == "warn", check
        assert f"{foreign_id} runs {when} ours" in check["detail"]
        assert "verdicts combine with ours" in check["detail"]
        assert f"bpftool prog show id {foreign_id}" in check["fix"]
        assert code == 0
    # gone with its link: ok again
    assert by_name(run_doctor(bpffs)[1])[f"netns {ns.name}"]["status"] == "ok"


def test_a_read_only_bpffs_warns() -> None:
    with private_bpffs("sklt-doctor-ro-") as fresh:
        subprocess.run(["mount", "-o", "remount,ro", fresh], check=True)
        try:
            code, doc = run_doctor(fresh)
        finally:
            subprocess.run(["mount", "-o", "remount,rw", fresh], check=True)
        check = by_name(doc)["bpffs"]
        assert code == 0 and check["status"] == "warn", check
        assert "read-only" in check["detail"] and check["fix"] == f"mount -o remount,rw {fresh}"
