"""The live program against the rule model: BPF_PROG_TEST_RUN on random rule sets.

The reference is RuleSet.match (a scan over every rule, by the definition of precedence); the
program under test is the real one, loaded with the real maps built for the rule set.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import random
import socket
from collections import Counter
from collections.abc import Iterator

import pytest

from sklookupctl import image, layout, store, testrun
from sklookupctl import netns as nsmod
from sklookupctl.bpfsys import BPF_MAP_TYPE_SOCKMAP, Map
from sklookupctl.plan import Slotted
from sklookupctl.rules import DROP, IPAddress, Rule, RuleSet

from ..rulegen import TARGETS, near, port_near, random_rules
from .conftest import NS

SO_COOKIE = 57


# each target's block of slots: (first slot, slots, the member holding the socket if live).
# Live targets keep their socket in the last slot of a block of three: the program must try
# the members in order and skip the empty ones.
BLOCKS = {"tcp-live": (0, 3), "tcp-gone": (3, 2), "udp-live": (5, 3), "udp-gone": (8, 1)}


@contextlib.contextmanager
def sockmap(
    ns: NS,
) -> Iterator[tuple[Map[ctypes.c_uint32, ctypes.c_uint64], dict[str, Slotted], dict[str, int]]]:
    """An unpinned SOCKMAP whose `*-live` targets have a socket (dual-stack, made in the
    test's netns) in the last slot of their block, and whose `*-gone` targets have none."""
    socks: list[socket.socket] = []
    with nsmod.open_netns(ns.name) as n, nsmod.enter(n):
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            s = socket.socket(socket.AF_INET6, kind)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", 0))
            if kind == socket.SOCK_STREAM:
                s.listen()
            socks.append(s)
    sockets: Map[ctypes.c_uint32, ctypes.c_uint64] = Map.create(
        BPF_MAP_TYPE_SOCKMAP, ctypes.c_uint32, ctypes.c_uint64, 64, "t_sockets"
    )
    targets: dict[str, Slotted] = {}
    cookies: dict[str, int] = {}
    for name in TARGETS:
        proto, _, kind = name.partition("-")
        first, count = BLOCKS[name]
        targets[name] = Slotted(
            name, proto, socket.AF_INET6, ipaddress.ip_address("::"), 1, first, count
        )
        if kind == "live":
            s = socks[0 if proto == "tcp" else 1]
            sockets.update(ctypes.c_uint32(first + count - 1), ctypes.c_uint64(s.fileno()))
            cookies[name] = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
    try:
        yield sockets, targets, cookies
    finally:
        sockets.close()
        for s in socks:
            s.close()


def generation(
    sockets: Map[ctypes.c_uint32, ctypes.c_uint64],
    rs: RuleSet,
    targets: dict[str, Slotted],
    vectored: bool | None = None,
) -> store.Generation:
    img = image.encode(rs, targets, image.MetaInfo(1, 0, 0, "test"), vectored)
    shared: Map[ctypes.c_uint32, ctypes.c_uint64] = Map(
        os.dup(sockets.fd), ctypes.c_uint32, ctypes.c_uint64
    )
    return store.build(img, shared)


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
@pytest.mark.parametrize("vectored", [False, True], ids=["python", "numpy"])
def test_program_matches_the_reference(ns: NS, seed: int, vectored: bool) -> None:
    """The tables built both ways (image.encode's Python reference, and vector.py's numpy,
    which large rule sets take) against the rule model, in the kernel."""
    rng = random.Random(seed)
    with sockmap(ns) as (sockets, targets, cookies):
        for _ in range(15):
            rs, anchors = random_rules(rng, rng.choice([1, 5, 30, 200]))
            gen = generation(sockets, rs, targets, vectored)
            try:
                check(rng, gen, rs, anchors, targets, cookies)
            finally:
                gen.close()


def check(
    rng: random.Random,
    gen: store.Generation,
    rs: RuleSet,
    anchors: list[IPAddress],
    targets: dict[str, Slotted],
    cookies: dict[str, int],
) -> None:
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
            if out.verdict == testrun.SK_PASS and not out.steered:
                c["passed"] += 1  # missing socket, on-missing pass
            if want_rule.action != DROP and not out.steered:
                c["missing"] += 1
    # every rule's counters say exactly what happened to the lookups it won
    names = sorted(targets)
    rules = [Rule(k, *eff) for k, eff in gen.effects(names).items()]
    for rule, counts in zip(rules, gen.counters(), strict=True):
        got = dict(zip(layout.COUNTER_NAMES, counts, strict=True))
        want = tally.get(rule, Counter())
        assert got == {k: want[k] for k in layout.COUNTER_NAMES}, rule


def test_an_empty_rule_set_passes_everything(ns: NS) -> None:
    with sockmap(ns) as (sockets, targets, _cookies):
        gen = generation(sockets, RuleSet(), targets)
        with contextlib.closing(gen):
            for proto, addr in (("tcp", "192.0.2.1"), ("udp", "2001:db8::1")):
                out = testrun.run(
                    gen.program, testrun.lookup_ctx(proto, ipaddress.ip_address(addr), 80)
                )
                assert (out.verdict, out.cookie) == (testrun.SK_PASS, 0)


def test_batch_reads_of_large_arrays_give_every_entry(bpffs: str) -> None:
    """Map.lookup_batch_raw, which readers and the counters' carry read every array with: more
    entries than one batch, fewer, and more than the map has; through a read-only fd too."""
    from sklookupctl.bpfsys import BPF_F_MMAPABLE, BPF_MAP_TYPE_ARRAY

    entries = 65536 * 2 + 5  # three batches
    data = random.Random(11).randbytes(entries * 40)
    pin = os.path.join(bpffs, f"skl-batch-{os.getpid()}")
    with Map.create(
        BPF_MAP_TYPE_ARRAY, ctypes.c_uint32, layout.Counters, entries, "skl_t", BPF_F_MMAPABLE
    ) as m:
        store._write_array(m, data)
        m.pin(pin)
        try:
            with Map.from_pin(pin, ctypes.c_uint32, layout.Counters, True) as ro:
                for fd in (m, ro):
                    assert fd.lookup_batch_raw(entries, 40) == data
                    assert fd.lookup_batch_raw(70000, 40) == data[: 70000 * 40]
                    assert fd.lookup_batch_raw(3, 40) == data[:120]
                    assert fd.lookup_batch_raw(entries + 100, 40) == data  # no more than it has
                    assert fd.lookup_batch_raw(0, 40) == b""
        finally:
            os.unlink(pin)
