"""explain's pure parts: the kernel's combination of programs, and reading the private
counters a run moved."""

from __future__ import annotations

import struct
from unittest import mock

import pytest

from sklookupctl import explain, layout
from sklookupctl.errors import InvalidArgument
from sklookupctl.explain import Run, combine


def run(verdict: str, cookie: int = 0, i: int = 0) -> Run:
    return Run(i, f"p{i}", i == 0, verdict, cookie)


# the multi-program cases of the kernel's selftests (prog_tests/sk_lookup.c, run_multi_prog):
# programs in attach order -> what the kernel does
MULTI = [
    ([run("pass"), run("pass", i=1)], ("pass", None)),
    ([run("drop"), run("pass", i=1)], ("drop", None)),
    ([run("pass"), run("drop", i=1)], ("drop", None)),
    ([run("drop"), run("drop", i=1)], ("drop", None)),
    ([run("pass", 7), run("pass", i=1)], ("steer", 7)),
    ([run("pass"), run("pass", 8, i=1)], ("steer", 8)),
    ([run("drop"), run("pass", 8, i=1)], ("steer", 8)),
    ([run("pass", 7), run("drop", i=1)], ("steer", 7)),
    ([run("pass", 7), run("pass", 8, i=1)], ("steer", 8)),  # the last selection counts
    ([run("pass", 8, i=1), run("pass", 7)], ("steer", 7)),
    ([], ("pass", None)),
]


@pytest.mark.parametrize(("runs", "want"), MULTI)
def test_combination_is_the_kernels(runs: list[Run], want: tuple[str, int | None]) -> None:
    verdict, chosen = combine(runs)
    assert (verdict, chosen.cookie if chosen else None) == want


def counters(ncpu: int, rules: int, moved: dict[tuple[int, int], dict[str, int]]) -> bytes:
    """A per-CPU counters map's batch read: rule-major, then CPU, then the fields."""
    out = bytearray()
    for rule in range(rules + 1):
        for cpu in range(ncpu):
            vals = moved.get((rule, cpu), {})
            out += struct.pack("<5Q", *(vals.get(n, 0) for n in layout.KERNEL_COUNTERS))
    return bytes(out)


@pytest.mark.parametrize(
    ("fields", "want"),
    [
        ({"steered": 1}, "steered"),
        ({"dropped": 1}, "dropped"),
        ({"missing": 1, "dropped": 1}, "missing"),
        ({"missing": 1, "passed": 1}, "missing"),
        ({"errors": 1, "passed": 1}, "errors"),
    ],
)
def test_counted_names_the_rule_and_why(fields: dict[str, int], want: str) -> None:
    with mock.patch.object(explain, "possible_cpus", return_value=4):
        raw = counters(4, 9, {(7, 3): fields})
        assert explain._counted(raw, 9) == (7, want)
        assert explain._counted(counters(4, 9, {}), 9) is None


@pytest.mark.parametrize(
    "text", ["192.0.2.300", "", "::ffff:192.0.2.1", "fe80::1%lo", "192.0.2.1\0", "٠.٠.٠.٠"]
)
def test_bad_addresses_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument):
        explain.parse_address(text)


def test_describe_reads_as_a_sentence() -> None:
    e = {
        "rule": {
            "protocol": "tcp",
            "prefix": "192.0.2.0/24",
            "ports": "all",
            "target": "web",
            "on_missing": "pass",
        },
        "reason": "missing-socket",
        "verdict": "pass",
        "protocol": "tcp",
        "address": "192.0.2.1",
        "port": 80,
        "normal_lookup": None,
    }
    assert explain.describe(e) == (
        "rule tcp 192.0.2.0/24 all steers to target web, which has no live socket: on-missing "
        "pass; the kernel's normal socket lookup goes on, which finds no socket: refused"
    )
