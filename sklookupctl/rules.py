"""The rule model: parsing, validation, precedence, and compilation into lookup segments.

Pure Python, no kernel: everything here is unit tested without root.

A rule matches the protocol, the destination address within its prefix and the destination port
within its range. Precedence: the longest prefix wins; among rules of that prefix, the narrowest
port range wins. Port ranges of one protocol and prefix must nest or be disjoint.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from . import validate
from .errors import InvalidArgument, NotFound, RuleConflict
from .validate import target_name as check_name

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
PROTO_NAMES = {v: k for k, v in PROTOCOLS.items()}

STEER = "steer"
DROP = "drop"
ON_MISSING = ("drop", "pass")

__all__ = ["check_name"]  # re-exported: the rule model's names are validate.target_name


def parse_protocol(text: str) -> str:
    proto = text.strip().lower()
    if proto not in PROTOCOLS:
        raise InvalidArgument(f"unknown protocol {validate.show(text, 40)}", "use tcp or udp")
    return proto


_LEADING_ZERO = re.compile(r"(?:^|\.)0\d")


def quick_prefix(text: str) -> tuple[int, int, int] | None:
    """The common case, fast (ipaddress parses IPv6 text slowly): a plain address, maybe with
    /LEN, no host bits, not IPv4-mapped, as (IP version, network as an int, length). None for
    anything else; parse_prefix then decides and explains."""
    addr, slash, length = text.partition("/")
    v6 = ":" in addr
    if not v6 and _LEADING_ZERO.search(addr):
        return None
    try:
        n = int.from_bytes(socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, addr), "big")
    except (OSError, ValueError):  # ValueError: a NUL in the text
        return None
    width = 128 if v6 else 32
    if slash:
        if not length.isascii() or not length.isdigit() or len(length) > 3:
            return None
        plen = int(length)
        if plen > width or (length[0] == "0" and len(length) > 1):
            return None
    else:
        plen = width
    if n & ((1 << (width - plen)) - 1):
        return None
    if v6 and plen >= 96 and n >> 32 == 0xFFFF:
        return None  # IPv4-mapped: parse_prefix refuses it, and says why
    return (6 if v6 else 4), n, plen


def network(version: int, net: int, plen: int) -> IPNetwork:
    return (
        ipaddress.IPv6Network((net, plen)) if version == 6 else ipaddress.IPv4Network((net, plen))
    )


PREFIX_HINT = "write an address such as 192.0.2.1 or 2001:db8::1, or a CIDR such as 192.0.2.0/24"


def parse_prefix(text: str) -> IPNetwork:
    """An IPv4/IPv6 CIDR or a single address (a /32 or /128)."""
    quick = quick_prefix(text.strip())
    if quick is not None:
        net = network(*quick)
        validate.not_mapped(net, text.strip())
        return net
    t = validate.address_text(text, "address or prefix", PREFIX_HINT)
    addr, slash, length = t.partition("/")
    if slash and not (length.isascii() and length.isdigit()):
        # ipaddress would take a netmask or a hostmask (192.0.2.0/0.0.0.255) here
        raise InvalidArgument(
            f"prefix {validate.show(text)}: the length after / must be a number",
            f"such as {addr}/24",
        )
    try:
        net = ipaddress.ip_network(t, strict=True)
    except ValueError:
        pass
    else:
        validate.not_mapped(net, t)
        return net
    try:
        loose = ipaddress.ip_network(t, strict=False)
    except ValueError:
        raise InvalidArgument(
            f"{validate.show(text)} is not an IP address or prefix", PREFIX_HINT
        ) from None
    raise InvalidArgument(f"prefix {t} has host bits set", f"did you mean {loose}?")


def parse_port(text: str, what: str = "port") -> int:
    t = text.strip()
    if not t.isascii() or not t.isdigit() or len(t) > 5:
        raise InvalidArgument(
            f"{what} {validate.show(text, 40)} is not a number", "ports are 1-65535"
        )
    port = int(t)
    if port == 0:
        raise InvalidArgument(f"{what} 0 is not a port", "ports are 1-65535")
    if port > 65535:
        raise InvalidArgument(f"{what} {port} is too large", "ports are 1-65535")
    return port


def parse_ports(text: str) -> tuple[int, int]:
    """`N`, `LO-HI` or `all` (1-65535)."""
    t = text.strip().lower()
    if t == "all":
        return 1, 65535
    if "-" in t:
        lo_text, _, hi_text = t.partition("-")
        lo, hi = parse_port(lo_text, "range start"), parse_port(hi_text, "range end")
        if lo > hi:
            raise InvalidArgument(f"port range {text} is reversed", f"write {hi}-{lo}")
        return lo, hi
    port = parse_port(t)
    return port, port


def parse_endpoint(text: str) -> tuple[IPAddress, int]:
    """`ADDR:PORT`, IPv6 as `[ADDR]:PORT`."""
    hint = "write ADDR:PORT, such as 127.0.0.1:8080 or [::1]:8080"
    t = validate.address_text(text, "address and port", hint)
    shown = validate.show(text)
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise InvalidArgument(f"{shown} has no port", hint)
        port_text = rest[1:]
    else:
        if t.count(":") > 1:
            raise InvalidArgument(f"{shown}: put an IPv6 address in brackets", hint)
        host, sep, port_text = t.rpartition(":")
        if not sep:
            raise InvalidArgument(f"{shown} has no port", hint)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidArgument(f"{validate.show(host)} is not an IP address", hint) from None
    return addr, parse_port(port_text)


def format_endpoint(addr: IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def format_ports(lo: int, hi: int) -> str:
    if (lo, hi) == (1, 65535):
        return "all"
    return str(lo) if lo == hi else f"{lo}-{hi}"


class _KeyFields(NamedTuple):
    proto: str
    version: int  # 4 or 6
    net: int  # the network address as an int
    plen: int  # the prefix length
    lo: int
    hi: int


class RuleKey(_KeyFields):
    """What a rule covers: protocol, prefix and port range. Unique within a rule set.

    A tuple of integers (hashing and comparing them is done in C: rule sets hold 100,000s of
    keys); the ipaddress object is made on demand. Make one with RuleKey(proto, prefix, lo, hi)
    or RuleKey.of(proto, version, net, plen, lo, hi)."""

    __slots__ = ()

    def __new__(cls, proto: str, prefix: IPNetwork, lo: int, hi: int) -> RuleKey:
        fields = (proto, prefix.version, int(prefix.network_address), prefix.prefixlen, lo, hi)
        return tuple.__new__(cls, fields)

    @classmethod
    def of(cls, proto: str, version: int, net: int, plen: int, lo: int, hi: int) -> RuleKey:
        """A key from integers, without making the ipaddress object (much faster)."""
        return tuple.__new__(cls, (proto, version, net, plen, lo, hi))

    @property
    def prefix(self) -> IPNetwork:
        return network(self.version, self.net, self.plen)

    def __repr__(self) -> str:
        return f"RuleKey({self.proto!r}, {self.prefix!r}, {self.lo}, {self.hi})"

    @property
    def family(self) -> int:
        return socket.AF_INET if self.version == 4 else socket.AF_INET6

    def covers(self, proto: str, addr: IPAddress, port: int) -> bool:
        return (
            proto == self.proto
            and addr.version == self.prefix.version
            and addr in self.prefix
            and self.lo <= port <= self.hi
        )

    def __str__(self) -> str:
        return f"{self.proto} {self.prefix} {format_ports(self.lo, self.hi)}"


class _RuleFields(NamedTuple):
    key: RuleKey
    action: str  # STEER or DROP
    target: str | None = None
    on_missing: str = "drop"


class Rule(_RuleFields):
    """A rule: its key, and either a target name (steer) or drop. A tuple, like its key."""

    __slots__ = ()

    def __new__(
        cls, key: RuleKey, action: str, target: str | None = None, on_missing: str = "drop"
    ) -> Rule:
        if action == STEER and not target:
            raise InvalidArgument(f"rule {key} steers but has no target")
        if action == DROP and target:
            raise InvalidArgument(f"rule {key} drops and cannot have a target")
        if on_missing not in ON_MISSING:
            raise InvalidArgument(f"on-missing {on_missing!r} is not valid", "use drop or pass")
        return tuple.__new__(cls, (key, action, target, on_missing))

    def same_effect(self, other: Rule) -> bool:
        return (self.action, self.target, self.on_missing) == (
            other.action,
            other.target,
            other.on_missing,
        )

    def describe(self) -> str:
        if self.action == DROP:
            return "drop"
        extra = ", on missing socket: pass" if self.on_missing == "pass" else ""
        return f"-> {self.target}{extra}"

    def precedence(self) -> tuple[int, int]:
        """Larger wins: longer prefix, then narrower range."""
        return self.key.prefix.prefixlen, -(self.key.hi - self.key.lo)


def make_rule(
    proto: str,
    prefix: str,
    ports: str,
    *,
    target: str | None = None,
    drop: bool = False,
    on_missing: str = "drop",
) -> Rule:
    """Parse a rule from its textual parts (as the CLI gives them)."""
    lo, hi = parse_ports(ports)
    key = RuleKey(parse_protocol(proto), parse_prefix(prefix), lo, hi)
    if drop:
        return Rule(key, DROP, None, on_missing)
    return Rule(key, STEER, target, on_missing)


@dataclass
class RuleSet:
    """A netns's rules, keyed by (protocol, prefix, ports)."""

    rules: dict[RuleKey, Rule] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rules)

    @staticmethod
    def order(r: Rule) -> tuple[str, int, int, int, int, int]:
        """Sort key: protocol, family, then precedence (most specific first)."""
        return (
            r.key.proto,
            r.key.version,
            -r.key.plen,
            r.key.net,
            r.key.hi - r.key.lo,
            r.key.lo,
        )

    def sorted(self) -> list[Rule]:
        """Rules by protocol, family, then precedence (most specific first)."""
        return sorted(self.rules.values(), key=self.order)

    def check_add(self, rule: Rule, replace: bool = False) -> bool:
        """Validate adding `rule`. Returns False when an identical rule is already there.

        Raises RuleConflict for a partial port overlap with a rule of the same protocol and
        prefix, or for the same key with another effect (unless `replace`).
        """
        existing = self.get(rule.key)
        if existing is not None:
            if existing.same_effect(rule):
                return False
            if not replace:
                raise RuleConflict(
                    f"rule {rule.key} already exists ({existing.describe()})",
                    "pass --replace to change it, or detach it first",
                )
            return True
        k = rule.key
        for o in self.same_prefix(k):
            disjoint = k.hi < o.lo or o.hi < k.lo
            nested = (k.lo <= o.lo and o.hi <= k.hi) or (o.lo <= k.lo and k.hi <= o.hi)
            if not disjoint and not nested:
                raise RuleConflict(
                    f"ports {format_ports(k.lo, k.hi)} partly overlap rule {o}: ambiguous",
                    "port ranges of one protocol and prefix must nest or be disjoint",
                )
        return True

    def get(self, key: RuleKey) -> Rule | None:
        return self.rules.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self.rules

    def same_prefix(self, key: RuleKey) -> Iterator[RuleKey]:
        """The keys of the rules of `key`'s protocol and prefix."""
        k = key
        for o in self.rules:
            if (o.proto, o.version, o.net, o.plen) == (k.proto, k.version, k.net, k.plen):
                yield o

    def add(self, rule: Rule, replace: bool = False) -> bool:
        """Add `rule`; False when it was already there unchanged."""
        if not self.check_add(rule, replace):
            return False
        self.rules[rule.key] = rule
        return True

    def remove(self, key: RuleKey) -> Rule:
        try:
            return self.rules.pop(key)
        except KeyError:
            raise no_rule(key) from None

    def targets_in_use(self) -> set[str]:
        return {r.target for r in self.rules.values() if r.target is not None}

    def match(self, proto: str, addr: IPAddress, port: int) -> Rule | None:
        """The rule that wins for a lookup, by the definition (a scan: the reference)."""
        best: Rule | None = None
        for rule in self.rules.values():
            if rule.key.covers(proto, addr, port) and (
                best is None or rule.precedence() > best.precedence()
            ):
                best = rule
        return best

    def compile(self) -> Compiled:
        return compile_rules(self.rules.values())


def no_rule(key: RuleKey) -> NotFound:
    return NotFound(f"no rule {key}", "see `sklookupctl status` for the rules in place")


# A segment list: (first port, rule number) pairs sorted by port, starting at port 0; rule number
# 0 means no rule. Each piece runs up to the next one's first port - 1.
Segments = tuple[tuple[int, int], ...]
NO_RULE: Segments = ((0, 0),)


@dataclass
class Compiled:
    """A rule set resolved for the data path.

    `rules[i - 1]` is rule number i. `groups[(proto, ip version)]` maps every prefix that has
    rules, as (network as an int, prefix length), to its segments, with the rules of the
    shorter prefixes that contain it folded in.
    """

    rules: list[Rule]
    groups: dict[tuple[str, int], dict[tuple[int, int], Segments]]

    def lookup(self, proto: str, addr: IPAddress, port: int) -> Rule | None:
        """What the BPF program does: longest matching prefix, then the segment for the port."""
        if not port:
            return None
        prefixes = self.groups.get((proto, addr.version), {})
        width = addr.max_prefixlen
        a = int(addr)
        for plen in range(width, -1, -1):
            net = (a >> (width - plen) << (width - plen)) if plen else 0
            segs = prefixes.get((net, plen))
            if segs is not None:
                number = segs[0][1]
                for lo, n in segs:
                    if lo <= port:
                        number = n
                return self.rules[number - 1] if number else None
        return None


def _own_segments(ranges: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """Segments of one prefix's own rules, (lo, hi, number) with nested or disjoint ranges:
    the narrowest range covering a port wins."""
    if len(ranges) == 1:
        lo, hi, n = ranges[0]
        return [(0, 0), (lo, n), (hi + 1, 0)] if hi < 65535 else [(0, 0), (lo, n)]
    ranges.sort(key=lambda r: (r[0], -r[1]))
    bounds = sorted({b for lo, hi, _ in ranges for b in (lo, hi + 1)} | {0})
    out: list[tuple[int, int]] = []
    stack: list[tuple[int, int, int]] = []
    i = 0
    for b in bounds:
        if b > 65535:
            break
        while stack and stack[-1][1] < b:
            stack.pop()
        while i < len(ranges) and ranges[i][0] == b:
            stack.append(ranges[i])
            i += 1
        n = stack[-1][2] if stack else 0
        if not out or out[-1][1] != n:
            out.append((b, n))
    return out


def _overlay(own: list[tuple[int, int]], parent: Segments) -> Segments:
    """`own` where it names a rule, `parent` elsewhere."""
    if len(parent) == 1 and parent[0][1] == 0:
        return tuple(own)
    bounds = sorted({lo for lo, _ in own} | {lo for lo, _ in parent})
    out: list[tuple[int, int]] = []
    i = j = 0
    for b in bounds:
        while i + 1 < len(own) and own[i + 1][0] <= b:
            i += 1
        while j + 1 < len(parent) and parent[j + 1][0] <= b:
            j += 1
        n = own[i][1] or parent[j][1]
        if not out or out[-1][1] != n:
            out.append((b, n))
    return tuple(out)


def _overlay_one(lo: int, hi: int, n: int, parent: Segments) -> Segments:
    """_overlay for a prefix with one rule (most of them): ports lo..hi to rule `n`, `parent`
    elsewhere."""
    if parent is NO_RULE:
        return ((0, 0), (lo, n), (hi + 1, 0)) if hi < 65535 else ((0, 0), (lo, n))
    out: list[tuple[int, int]] = []
    at_end = 0  # the parent's rule at port hi + 1
    for a, m in parent:
        if a < lo and (not out or out[-1][1] != m):
            out.append((a, m))
        if a <= hi + 1:
            at_end = m
    if not out or out[-1][1] != n:
        out.append((lo, n))
    if hi < 65535:
        if at_end != n:
            out.append((hi + 1, at_end))
        for a, m in parent:
            if a > hi + 1 and out[-1][1] != m:
                out.append((a, m))
    return tuple(out)


def compile_rules(rules: Iterable[Rule]) -> Compiled:
    """Number the rules and give every prefix that has rules its segments.

    Prefixes are visited in address order, shorter first, so the prefixes that contain the one
    at hand are exactly those on a stack: the nearest one's segments are the inherited ones.
    Cost: sorting the prefixes, plus the size of the segments produced.
    """
    by_prefix: dict[tuple[str, int], dict[tuple[int, int], list[Rule]]] = {}
    for r in rules:
        k = r.key
        by_prefix.setdefault((k.proto, k.version), {}).setdefault((k.net, k.plen), []).append(r)
    ordered: list[Rule] = []
    groups: dict[tuple[str, int], dict[tuple[int, int], Segments]] = {}
    for proto, version in sorted(by_prefix):
        prefixes = by_prefix[(proto, version)]
        width = 32 if version == 4 else 128
        out: dict[tuple[int, int], Segments] = {}
        # (network, last address, segments) of the prefixes containing the current one
        stack: list[tuple[int, int, Segments]] = []
        for (net, plen), own in sorted(prefixes.items()):
            while stack and not (stack[-1][0] <= net <= stack[-1][1]):
                stack.pop()
            if len(own) == 1:  # the common case
                ordered.append(own[0])
                k = own[0].key
                lo, hi, n = k.lo, k.hi, len(ordered)
                if stack:
                    segs = _overlay_one(lo, hi, n, stack[-1][2])
                elif lo == 1:  # nothing above, from port 1 (see below)
                    segs = ((0, n), (hi + 1, 0)) if hi < 65535 else ((0, n),)
                else:
                    segs = ((0, 0), (lo, n), (hi + 1, 0)) if hi < 65535 else ((0, 0), (lo, n))
            else:
                own.sort(key=lambda r: (r.key.lo, -r.key.hi))
                ranges = []
                for r in own:
                    ordered.append(r)
                    ranges.append((r.key.lo, r.key.hi, len(ordered)))
                segs = _overlay(_own_segments(ranges), stack[-1][2] if stack else NO_RULE)
            if len(segs) > 1 and segs[1][0] == 1:
                # port 0 is never a rule's (the program passes it before looking): let the
                # piece from port 1 start the run, one segment fewer to search
                segs = ((0, segs[1][1]), *segs[2:])
            out[(net, plen)] = segs
            stack.append((net, net | ((1 << (width - plen)) - 1), segs))
        groups[(proto, version)] = out
    return Compiled(ordered, groups)
