"""The state of layout 3 (sklookupctl up to commit 0a5435a), read for `upgrade` and `export`.

    <bpffs>/sklookupctl/<netns inode>/
        link                the bpf_link attaching the live program
        sockets             SOCKMAP: target id -> socket
        targets             HASH: target id -> TargetInfo (name, protocol, family, port, address)
        gen-<program id>/   program, nodes, entries, segments, counters, rules, base, meta

Only read here, every map opened read-only. This module mirrors the records of that layout (a
frozen format: it never changes again).
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import struct
from array import array
from dataclasses import dataclass, field
from typing import Any

from . import image
from .bpfsys import BPF_MAP_TYPE_SOCKMAP, Link, Map, possible_cpus
from .errors import EnvironmentProblem
from .rules import DROP, PROTO_NAMES, STEER, IPAddress, Rule, RuleKey, RuleSet

LAYOUT = 3
ACTION_DROP = 2
MISSING_PASS = 1
_RULE = image.RULE  # layout 3's RuleRecord: the same as layout 4's
_META = struct.Struct("<IIQQ")  # layout, rules, netns cookie, generation
_COUNTERS = struct.Struct("<5Q")  # steered, dropped, passed, missing, errors
U32 = ctypes.c_uint32
U64 = ctypes.c_uint64


class TargetInfo(ctypes.Structure):
    """mirrors layout 3's TargetInfo (the `targets` map)"""

    _fields_ = [
        ("name", ctypes.c_char * 64),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("addr", ctypes.c_uint8 * 16),
        ("cookie", ctypes.c_uint64),
    ]


@dataclass
class OldTarget:
    name: str
    proto: str
    family: int
    addr: IPAddress
    port: int
    cookie: int | None  # of the socket in its SOCKMAP slot now; None: gone


@dataclass
class Legacy:
    """A namespace's state of layout 3, as read."""

    path: str
    inode: int
    cookie: int
    generation: int
    attached: bool  # its link runs in the namespace
    rules: RuleSet
    targets: dict[str, OldTarget]
    counters: dict[RuleKey, tuple[int, ...]] = field(default_factory=dict)  # kernel counters


def _read(m: Map[Any, Any], count: int, size: int) -> bytes:
    return bytes(m.lookup_batch_raw(count, size))


def read(path: str, inode: int) -> Legacy:
    """Read the state in `path` (a directory named by the namespace's inode)."""
    try:
        with Link.from_pin(os.path.join(path, "link")) as link:
            info = link.info()
        gen = os.path.join(path, f"gen-{info.prog_id}")
        with Map.from_pin(os.path.join(gen, "meta"), U32, U64, readonly=True) as meta:
            layout, n, cookie, generation = _META.unpack(_read(meta, 1, _META.size))
        if layout != LAYOUT:
            raise EnvironmentProblem(f"state in {path} has layout {layout}, not {LAYOUT}")
        targets_map: Map[Any, Any] = Map.from_pin(
            os.path.join(path, "targets"), U32, TargetInfo, readonly=True
        )
        sockets: Map[Any, Any] = Map.from_pin(
            os.path.join(path, "sockets"), U32, U64, readonly=True
        )
        with targets_map, sockets:
            if sockets.info().type != BPF_MAP_TYPE_SOCKMAP:
                raise EnvironmentProblem(f"{path}/sockets is not a SOCKMAP")
            by_id: dict[int, OldTarget] = {}
            for k, v in targets_map.items():
                addr = bytes(v.addr)
                a: IPAddress = (
                    ipaddress.IPv4Address(addr[:4])
                    if v.family == socket.AF_INET
                    else ipaddress.IPv6Address(addr)
                )
                c = sockets.lookup(U32(int(k.value)))
                by_id[int(k.value)] = OldTarget(
                    v.name.decode(),
                    PROTO_NAMES[v.proto],
                    v.family,
                    a,
                    v.port,
                    None if c is None else int(c.value),
                )
        with Map.from_pin(os.path.join(gen, "rules"), U32, U64, readonly=True) as rules_map:
            raw = _read(rules_map, n + 1, _RULE.size)[_RULE.size :]
        counts = _counters(gen, n)
    except FileNotFoundError as e:
        raise EnvironmentProblem(
            f"incomplete state of layout 3 in {path}: {e.filename} is missing",
            "`sklookupctl detach --all` removes it",
        ) from None
    rs = RuleSet()
    counters: dict[RuleKey, tuple[int, ...]] = {}
    used: dict[str, OldTarget] = {}
    for i, (key, action, miss, tid) in enumerate(image.records(raw)):
        if action == ACTION_DROP:
            rule = Rule(key, DROP, None, "drop")
        else:
            t = by_id[tid]
            used[t.name] = t
            rule = Rule(key, STEER, t.name, "pass" if miss == MISSING_PASS else "drop")
        rs.rules[key] = rule
        counters[key] = counts[i]
    return Legacy(path, inode, cookie, generation, bool(info.netns_ino), rs, used, counters)


def _counters(gen: str, n: int) -> list[tuple[int, ...]]:
    """Each rule's kernel counters: every CPU's plus those carried in `base`."""
    width = 5
    size = _COUNTERS.size
    ncpu = possible_cpus()
    with Map.from_pin(os.path.join(gen, "base"), U32, U64, readonly=True) as base_map:
        base = array("Q", _read(base_map, n + 1, size))
    with Map.from_pin(os.path.join(gen, "counters"), U32, U64, readonly=True) as per_map:
        raw = per_map.lookup_batch_raw(n + 1, size * ncpu)
    per = array("Q", raw.ljust(size * ncpu * (n + 1), b"\0"))
    out = []
    for i in range(1, n + 1):
        row = []
        for j in range(width):
            total = base[i * width + j]
            for c in range(ncpu):
                total += per[(i * ncpu + c) * width + j]
            row.append(total)
        out.append(tuple(row))
    return out
