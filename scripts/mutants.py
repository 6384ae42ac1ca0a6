"""scripts/mutants: break each pure decision on purpose and check that a unit test fails.

Each mutant changes one line of a copy of the package (the plan, the slots, the choice among
sockets, the cache check, the validation layer, the output cleaner) and runs tests/unit against
it. A mutant that no unit test kills means a decision that is not really tested: the script
lists survivors and exits 1. No root needed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (file, what it breaks, the exact text, what replaces it)
MUTANTS = [
    (
        "explain.py",
        "the first program to select a socket wins, not the last",
        "        if r.selected:\n            selected = r",
        "        if r.selected and selected is None:\n            selected = r",
    ),
    (
        "explain.py",
        "a missing socket is explained as a drop rule",
        'for name in ("steered", "errors", "missing", "dropped"):',
        'for name in ("dropped", "steered", "errors", "missing"):',
    ),
    (
        "rulerows.py",
        "status --prefix shows only rules inside the prefix, not those holding it",
        "shift = width - min(-r[2], plen)",
        "shift = width - plen",
    ),
    (
        "rulerows.py",
        "streamed rules never say all ports",
        '"all" if n == 65534 else',
        '"all" if n == -1 else',
    ),
    (
        "image.py",
        "every rule counts for the first group",
        "        members[g].append(i)",
        "        members[0].append(i)",
    ),
    (
        "plan.py",
        "the diff never reports a changed rule",
        "elif effect != (rule.action, rule.target, rule.on_missing):",
        "elif False:",
    ),
    (
        "plan.py",
        "the diff never reports a removed rule",
        "plan.removed = [Rule(k, *eff) for k, eff in old.items() if k not in new.rules]",
        "plan.removed = []",
    ),
    (
        "plan.py",
        "a target whose socket changed keeps its slots",
        'return "members" if len(want.members) > 1 or old.slots > 1 else "socket"',
        "return None",
    ),
    (
        "plan.py",
        "a target moved to another address keeps its slots",
        'if (old.addr, old.port) != (want.addr, want.port):\n        return "address"',
        "if False:\n        return None",
    ),
    (
        "plan.py",
        "old slots are never emptied",
        "s for n, t in live.targets.items() if keep.get(n) != t for s in t.block()",
        "s for n, t in live.targets.items() if False for s in t.block()",
    ),
    (
        "plan.py",
        "fresh blocks may overlap live ones",
        "taken = slotsmod.Slots(live.capacity, [(t.slot, t.slots) for t in live.targets.values()])",
        "taken = slotsmod.Slots(live.capacity, [])",
    ),
    (
        "plan.py",
        "kept sockets are not copied into a grown SOCKMAP",
        "fills[at + i] = live.filled[s]",
        "pass",
    ),
    (
        "plan.py",
        "an IPv6-only socket takes IPv4 rules",
        "elif v6only:",
        "elif False:",
    ),
    (
        "plan.py",
        "a detached link is not made again",
        "attach = not live.attached",
        "attach = False",
    ),
    (
        "slots.py",
        "first fit ignores taken blocks",
        "while i < len(blocks) and blocks[i][0] - at < count:",
        "while False:",
    ),
    (
        "slots.py",
        "no room for growth",
        "want = max(minimum, 2 * slots_needed, 1)",
        "want = max(minimum, slots_needed, 1)",
    ),
    (
        "sockets.py",
        "--to picks the worst candidate",
        "for t in (exact, mapped, wild, dual) if t]",
        "for t in (dual, wild, mapped, exact) if t]",
    ),
    (
        "sockets.py",
        "a connected or non-listening socket is a candidate",
        "return self.state == TCP_LISTEN",
        "return True",
    ),
    (
        "sockets.py",
        "an IPv6-only wildcard serves IPv4",
        "and not e.v6only  # an IPv6-only socket takes no IPv4 traffic",
        "and True",
    ),
    (
        "sockets.py",
        "a socket without SO_REUSEPORT brings a group",
        "if not reuseport.get(first.cookie):",
        "if False:",
    ),
    (
        "sockets.py",
        "group members of another user join",
        "if reuseport.get(e.cookie) and e.uid == first.uid]",
        "if reuseport.get(e.cookie)]",
    ),
    (
        "sockets.py",
        "an exact target hops to the first socket",
        "return next((e for e in tier if e.cookie in known), tier[0])",
        "return tier[0]",
    ),
    (
        "program.py",
        "the cache checksum is not checked",
        "if hashlib.sha256(insns).digest() != digest or not _valid(insns, maps):",
        "if not _valid(insns, maps):",
    ),
    (
        "program.py",
        "the cache accepts unknown map references",
        "if src != compiler.BPF_PSEUDO_MAP_FD or not 0 <= imm < len(maps):",
        "if False:",
    ),
    (
        "program.py",
        "the cache accepts any header",
        "if not data.startswith(MAGIC):",
        "if False:",
    ),
    (
        "render.py",
        "control characters reach the terminal",
        "    if s.isprintable():\n        return s",
        "    if True:\n        return s",
    ),
    (
        "rules.py",
        "a port in other digits than ASCII is taken",
        "if not t.isascii() or not t.isdigit() or len(t) > 5:",
        "if not t.isdigit():",
    ),
    (
        "validate.py",
        "a name with a final newline is taken",
        "if not isinstance(name, str) or not TARGET_NAME.fullmatch(name):",
        "if not isinstance(name, str) or not re.match(TARGET_NAME.pattern + '$', name):",
    ),
    (
        "validate.py",
        "IPv4-mapped prefixes are taken",
        "if net.version == 6 and net.prefixlen >= 96 and net.subnet_of(MAPPED):",
        "if False:",
    ),
    (
        "validate.py",
        "pids are not bounded",
        "not 1 <= value <= PID_MAX",
        "False",
    ),
    (
        "rulefile.py",
        "an unused target is not checked",
        "spec = _target(tname, t, where, used or set())  # checked whole, used or not",
        "spec = _target(tname, t, where, used) if used else None  # type: ignore",
    ),
    (
        "plan.py",
        "an edit of the live rules never reports a removed rule",
        "                removed.append(was)",
        "                pass",
    ),
    (
        "plan.py",
        "a live rule is found by its prefix and low port alone",
        "_record_order(raw, at + 1) == want else 0",
        "_record_order(raw, at + 1)[:5] == want[:5] else 0",
    ),
    (
        "vector.py",
        "live rules keep their old target index when the targets change",
        "remap = np.array([index.get(n, len(index)) for n in names] + [len(index)], np.int64)",
        "remap = np.array([*range(len(names)), len(index)], np.int64)",
    ),
    (
        "plan.py",
        "an edit's family check skips the live rules of a target that gets other sockets",
        "        and not any(rules.base.uses(name) for name in fresh)",
        "        and True",
    ),
    (
        "vector.py",
        "rules added to the live ones are put in place in the order they came",
        "        mine = sorted(range(len(add)), key=lambda j: _order_of(more, j))",
        "        mine = list(range(len(add)))",
    ),
    (
        "vector.py",
        "an edited rule's counters stay in its old group's total too",
        "np.subtract.at(adjust, _group_ids(new_recs[mid_n], len(old.names)), totals[mid_o + 1])",
        "pass",
    ),
    (
        "image.py",
        "readers leave out the counters of a CPU that counted when another one did too",
        "            parts = [p for p in parts if p.count(0) != len(p)]",
        "            parts = [p for p in parts if p.count(0) != len(p)][:1]",
    ),
    (
        "image.py",
        "group totals skip the counters that counted",
        "            sum(map(col.__getitem__, idx)) if c else 0",
        "            sum(map(col.__getitem__, idx)) if not c else 0",
    ),
    (
        "image.py",
        "a drop rule counts in a target's group",
        "        drop[p] if a == ad else t\n",
        "        t\n",
    ),
    (
        "rulerows.py",
        "status --json writes an IPv6 prefix with an IPv4 tail as glibc does, not as Python",
        "            elif addr.startswith(zeros):",
        "            elif False:",
    ),
]


def main() -> int:
    survivors = []
    with tempfile.TemporaryDirectory(prefix="skl-mutants-") as tmp:
        for name in ("sklookupctl", "tests", "bpf"):
            shutil.copytree(os.path.join(ROOT, name), os.path.join(tmp, name))
        shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp)
        os.symlink(os.path.join(tmp, "bpf"), os.path.join(tmp, "sklookupctl", "bpf"))
        env = {**os.environ, "PYTHONPATH": tmp, "HYPOTHESIS_STORAGE_DIRECTORY": tmp}
        for i, (file, what, old, new) in enumerate(MUTANTS, 1):
            path = os.path.join(tmp, "sklookupctl", file)
            with open(path) as f:
                text = f.read()
            if text.count(old) != 1:
                print(f"{i:2}. {file}: {what}: the text to change is not there once: update it")
                survivors.append(what)
                continue
            with open(path, "w") as f:
                f.write(text.replace(old, new))
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-x",
                    "-p",
                    "no:cacheprovider",
                    "tests/unit",
                ],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
            )
            with open(path, "w") as f:
                f.write(text)
            killed = r.returncode != 0
            print(f"{i:2}. {'killed  ' if killed else 'SURVIVED'} {file}: {what}")
            if not killed:
                survivors.append(what)
    if survivors:
        print(f"{len(survivors)} of {len(MUTANTS)} mutants survived: a unit test should fail")
        return 1
    print(f"all {len(MUTANTS)} mutants were killed by tests/unit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
