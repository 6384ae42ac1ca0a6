"""Random rule sets for differential tests: prefixes of every length around a few anchors (so
they nest), nested and disjoint port ranges, v4 and v6, tcp and udp, drop rules, two targets
per protocol (`PROTO-live` and `PROTO-gone`), both on_missing values."""

from __future__ import annotations

import contextlib
import ipaddress
import random

from sklookupctl.errors import RuleConflict
from sklookupctl.rules import IPAddress, RuleSet, make_rule

TARGETS = ("tcp-live", "tcp-gone", "udp-live", "udp-gone")


def random_rules(
    rng: random.Random,
    count: int,
    anchors: list[IPAddress] | None = None,
    shortest: dict[int, int] | None = None,
) -> tuple[RuleSet, list[IPAddress]]:
    """`count` rules (fewer where one would conflict) nested around the `anchors` (default: a
    few random addresses of each family), with prefixes no shorter than `shortest[version]`."""
    if anchors is None:
        anchors = []
        for _ in range(rng.randrange(1, 6)):
            anchors.append(ipaddress.IPv4Address(rng.getrandbits(32)))
            anchors.append(ipaddress.IPv6Address(rng.getrandbits(128)))
    rs = RuleSet()
    for _ in range(count):
        a = rng.choice(anchors)
        plen = rng.randrange((shortest or {}).get(a.version, 0), a.max_prefixlen + 1)
        net = ipaddress.ip_network(f"{a}/{plen}", strict=False)
        lo = rng.randrange(1, 65536)
        hi = min(65535, lo + rng.choice([0, 1, 10, 1000, 65535]))
        proto = rng.choice(["tcp", "udp"])
        target = rng.choice([None, f"{proto}-live", f"{proto}-gone"])
        rule = make_rule(
            proto,
            str(net),
            f"{lo}-{hi}",
            target=target,
            drop=target is None,
            on_missing=rng.choice(["drop", "pass"]) if target else "drop",
        )
        with contextlib.suppress(RuleConflict):
            rs.add(rule)
    return rs, anchors


def near(rng: random.Random, a: IPAddress) -> IPAddress:
    """The anchor itself, or it with one bit flipped, or with its low bits randomised."""
    width = a.max_prefixlen
    n = int(a)
    choice = rng.random()
    if choice < 0.3:
        pass
    elif choice < 0.7:
        n ^= 1 << rng.randrange(width)
    else:
        low = rng.randrange(width + 1)
        n = (n >> low << low) | rng.getrandbits(low) if low else n
    return ipaddress.IPv4Address(n) if width == 32 else ipaddress.IPv6Address(n)


def port_near(rng: random.Random, rs: RuleSet) -> int:
    """A random port, or one at or next to a rule's range edge."""
    if rng.random() < 0.02:
        return 0  # never a rule's: the program must pass it
    if rs.rules and rng.random() < 0.6:
        k = rng.choice(list(rs.rules))
        return max(1, min(65535, rng.choice([k.lo, k.hi, k.lo - 1, k.hi + 1])))
    return rng.randrange(1, 65536)
