"""The systemd units shipped in docs/systemd/ pass `systemd-analyze verify` with nothing to say
(unknown keys are only warnings there: any output fails the test)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "docs" / "systemd"
COMMAND = os.path.join(os.path.dirname(sys.executable), "sklookupctl")


def test_the_units_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: scripts/setup --dev installs systemd")
    names = sorted(p.name for p in UNITS.iterdir() if p.suffix in (".service", ".socket"))
    assert "sklookupctl-restore@.service" in names and "example-proxy.socket" in names
    for name in names:
        text = (UNITS / name).read_text()
        # the units name /usr/local/bin/sklookupctl (the README links it there) and a proxy
        # of your own: here, what exists on this machine
        text = text.replace("/usr/local/bin/sklookupctl", COMMAND)
        text = text.replace("/usr/local/bin/example-proxy", "/bin/true")
        (tmp_path / name).write_text(text)
    instances = ["sklookupctl-restore@edge.service", "sklookupctl-register@example-proxy.service"]
    plain = [n for n in names if "@" not in n]
    # systemd-analyze leaves a marker in /run/systemd where systemd is not running: removed
    # again when this made it, so the test leaves the machine as it found it
    marker = Path("/run/systemd/systemd-units-load")
    had = marker.parent.exists(), marker.exists()
    try:
        out = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", *instances, *plain],
            cwd=tmp_path,
            env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        if not had[1] and marker.exists():
            marker.unlink()
        if not had[0] and marker.parent.exists() and not any(marker.parent.iterdir()):
            marker.parent.rmdir()
    assert out.returncode == 0 and out.stderr == "" and out.stdout == "", out


def test_syscalls_and_headers_follow_the_architecture() -> None:
    from sklookupctl import bpfsys, compiler

    assert bpfsys.SYS_BPF_BY_MACHINE["x86_64"] == 321
    assert bpfsys.SYS_BPF_BY_MACHINE["aarch64"] == 280  # the generic table (asm-generic)
    arm = compiler.uapi_dirs("aarch64")
    assert arm["arch/arm64/include/uapi/asm"] == "/usr/include/aarch64-linux-gnu/asm"
    assert "arch/arm64/include/asm/page.h" in compiler.empty_headers("aarch64")
    here = compiler.uapi_dirs()
    assert all(os.path.isdir(src) for src in here.values()), here  # this machine's exist


def test_shell_completion() -> None:
    env = {
        **os.environ,
        "COMP_WORDS": "sklookupctl sta",
        "COMP_CWORD": "1",
        "_SKLOOKUPCTL_COMPLETE": "bash_complete",
    }
    out = subprocess.run([COMMAND], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "plain,status" in out.stdout.split(), out
