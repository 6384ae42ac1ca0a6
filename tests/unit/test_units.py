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
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *instances, *plain],
        cwd=tmp_path,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stderr == "" and out.stdout == "", out
