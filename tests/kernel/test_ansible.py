"""The Ansible example (docs/ansible/sklookupctl.yml), run with ansible-core against localhost
(-c local) into a throwaway namespace: `changed` the first time, `ok` the second, and the rules
are in the kernel."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .conftest import NS

PLAYBOOK = Path(__file__).resolve().parents[2] / "docs" / "ansible" / "sklookupctl.yml"
BIN = os.path.dirname(sys.executable)

RULES = """\
[[rules]]
protocol = "tcp"
prefix = "192.0.2.0/24"
ports = "all"
action = "drop"
"""


def play(ns: NS, tmp_path: Path, rules: Path) -> tuple[int, int]:
    """Run the playbook; (changed, failed) of its recap."""
    out = subprocess.run(
        [
            os.path.join(BIN, "ansible-playbook"),
            "-i",
            "localhost,",
            "-c",
            "local",
            str(PLAYBOOK),
            "-e",
            f"netns={ns.name} bpffs={ns.bpffs} rules_src={rules}",
            "-e",
            f"sklookupctl={os.path.join(BIN, 'sklookupctl')} rules_dir={tmp_path / 'etc'}",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp")},
    )
    m = re.search(r"localhost\s*:\s*ok=\d+\s+changed=(\d+).*?failed=(\d+)", out.stdout)
    assert m is not None, out.stdout + out.stderr
    return int(m.group(1)), int(m.group(2))


def test_the_playbook_reports_changed_then_ok(ns: NS, tmp_path: Path) -> None:
    rules = tmp_path / "edge.toml"
    rules.write_text(RULES)
    changed, failed = play(ns, tmp_path, rules)
    assert failed == 0 and changed >= 2  # the file, and the rules in the kernel
    assert ns.dial("tcp", "192.0.2.1", 80) == "refused"
    assert "192.0.2.0/24" in ns.ok("export").stdout
    assert play(ns, tmp_path, rules) == (0, 0)  # the second time: nothing to do
    rules.write_text(RULES.replace("192.0.2.0/24", "198.51.100.0/24"))
    assert play(ns, tmp_path, rules)[0] >= 2  # a change in the file: changed again
