"""docs/runbooks.md, executed: every `sh` block of each runbook, in order, in a namespace of
its own (the `NS=edge` line names it) and a private bpffs; a step that fails fails the test."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from .conftest import MADE

RUNBOOKS = Path(__file__).resolve().parents[2] / "docs" / "runbooks.md"
BLOCK = re.compile(r"```sh\n(.*?)```", re.DOTALL)


def sections() -> dict[str, str]:
    text = RUNBOOKS.read_text()
    parts = re.split(r"^## ", text, flags=re.MULTILINE)
    preamble = "".join(BLOCK.findall(parts[0]))
    out = {}
    for part in parts[1:]:
        title, _, body = part.partition("\n")
        if title.startswith("Runbook: "):
            out[title.removeprefix("Runbook: ")] = preamble + "".join(BLOCK.findall(body))
    return out


def test_every_runbook_has_commands() -> None:
    found = sections()
    assert len(found) >= 6, list(found)
    for title, script in found.items():
        assert "NS=edge\n" in script, title


@pytest.mark.parametrize("title", sorted(sections()))
def test_runbook(title: str, bpffs: str) -> None:
    name = f"sklt-rb{uuid.uuid4().hex[:8]}"
    MADE.add(name)
    script = sections()[title].replace("NS=edge\n", f"NS={name}\n")
    cleanup = (
        "trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; "
        'sklookupctl -n "${NS:-}" detach --all >/dev/null 2>&1; '
        'sklookupctl netns del "${NS:-}" >/dev/null 2>&1; true\' EXIT\n'
    )
    env = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        "SKLOOKUPCTL_BPFFS": bpffs,
    }
    out = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + cleanup + script],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, f"{title}:\n{out.stdout}\n{out.stderr}"
    assert not os.path.exists(f"/run/netns/{name}")
