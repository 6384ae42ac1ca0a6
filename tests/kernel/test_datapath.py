"""The live program against the rule model: BPF_PROG_TEST_RUN on random rule sets.

The reference is RuleSet.match (a scan over every rule, by the definition of precedence); the
program under test is the real one, loaded with the real maps built for the rule set.
"""

from __future__ import annotations

import contextlib
import ctypes
import random
import socket
from collections import Counter
from collections.abc import Iterator

import pytest

from sklookupctl import layout, state, testrun
from sklookupctl import netns as nsmod
from sklookupctl.bpfsys import BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_SOCKMAP, Map
from sklookupctl.rules import DROP, Rule, RuleSet
from sklookupctl.state import Dispatcher, Target

from ..rulegen import TARGETS, near, port_near, random_rules
from .conftest import NS

SO_COOKIE = 57


@contextlib.contextmanager
def dispatcher(ns: NS) -> Iterator[tuple[Dispatcher, dict[str, Target], dict[str, int]]]:
    """An unpinned, unattached dispatcher whose `*-live` targets have sockets (dual-stack,
    made in the test's netns) and whose `*-gone` targets have none."""
    socks: list[socket.socket] = []
    with nsmod.open_netns(ns.name) as n, nsmod.enter(n):
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            s = socket.socket(socket.AF_INET6, kind)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", 0))
            if kind == socket.SOCK_STREAM:
                s.listen()
            socks.append(s)
    sockmap: Map[ctypes.c_uint32, ctypes.c_uint64] = Map.create(
        BPF_MAP_TYPE_SOCKMAP, ctypes.c_uint32, ctypes.c_uint64, layout.MAX_TARGETS, "t_sockets"
    )
    infos: Map[ctypes.c_uint32, layout.TargetInfo] = Map.create(
        BPF_MAP_TYPE_HASH, ctypes.c_uint32, layout.TargetInfo, layout.MAX_TARGETS, "t_targets"
    )
    d = Dispatcher("", sockmap, infos, 0)
    targets: dict[str, Target] = {}
    cookies: dict[str, int] = {}
    for i, name in enumerate(TARGETS):
        proto, _, kind = name.partition("-")
        targets[name] = Target(i, name, proto, socket.AF_INET6, None, 0, 0)  # type: ignore[arg-type]
        if kind == "live":
            s = socks[0 if proto == "tcp" else 1]
            sockmap.update(ctypes.c_uint32(i), ctypes.c_uint64(s.fileno()))
            cookies[name] = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
    try:
        yield d, targets, cookies
    finally:
        d.close()
        for s in socks:
            s.close()


def expected(rule: Rule | None, cookies: dict[str, int]) -> tuple[int, int]:
    """(verdict, cookie) the definition asks for."""
    if rule is None:
        return testrun.SK_PASS, 0
    if rule.action == DROP:
        return testrun.SK_DROP, 0
    cookie = cookies.get(rule.target or "")
    if cookie:
        return testrun.SK_PASS, cookie
    return (testrun.SK_PASS if rule.on_missing == "pass" else testrun.SK_DROP), 0


@pytest.mark.parametrize("seed", range(6))
def test_program_matches_the_reference(ns: NS, seed: int) -> None:
    rng = random.Random(seed)
    with dispatcher(ns) as (d, targets, cookies):
        for _ in range(15):
            rs, anchors = random_rules(rng, rng.choice([1, 5, 30, 200]))
            gen = state.build_generation(d, rs, targets)
            d.gen, old = gen, d.gen
            if old is not None:
                old.close()
            tally: dict[Rule, Counter[str]] = {}
            for _ in range(250):
                proto = rng.choice(["tcp", "udp"])
                addr = near(rng, rng.choice(anchors))
                port = port_near(rng, rs)
                want_rule = rs.match(proto, addr, port)
                out = testrun.run(gen.program, testrun.lookup_ctx(proto, addr, port))
                assert (out.verdict, out.cookie) == expected(want_rule, cookies), (
                    proto,
                    str(addr),
                    port,
                    want_rule,
                )
                if want_rule is not None:
                    c = tally.setdefault(want_rule, Counter())
                    c["lookups"] += 1
                    if out.steered:
                        c["steered"] += 1
                    if out.verdict == testrun.SK_DROP:
                        c["dropped"] += 1
                    if want_rule.action != DROP and not out.steered:
                        c["missing"] += 1
            # every rule's counters say exactly what happened to the lookups it won
            for rule, counts in zip(d.read_rule_list(targets), gen.counters(), strict=True):
                got = dict(zip(layout.COUNTER_NAMES, counts, strict=True))
                want = tally.get(rule, Counter())
                assert got == {k: want[k] for k in layout.COUNTER_NAMES}, rule


def test_an_empty_rule_set_passes_everything(ns: NS) -> None:
    with dispatcher(ns) as (d, targets, _cookies):
        gen = state.build_generation(d, RuleSet(), targets)
        d.gen = gen
        for proto, addr in (("tcp", "192.0.2.1"), ("udp", "2001:db8::1")):
            import ipaddress

            out = testrun.run(
                gen.program, testrun.lookup_ctx(proto, ipaddress.ip_address(addr), 80)
            )
            assert (out.verdict, out.cookie) == (testrun.SK_PASS, 0)
