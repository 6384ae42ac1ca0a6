"""A generation's rule set in a layout-independent, versioned record, pinned beside it (the
`record` map), so that any later version, whatever its layout, can read what steers and
migrate it (`upgrade`) without knowing this version's structs.

The record is bytes: a first line `sklookupctl-ruleset VERSION`, then the zlib-compressed text
of one line per target and per rule, fields separated by tabs:

    T  name  protocol  address  port  exact(0|1)
    R  protocol  ip-version  network(int)  prefix-length  lo  hi  action  target|-  on_missing

and, first when there is one, a line naming the rule file these rules were read from:

    S  digest of the file's text and of the code that read it (rulefile.source_digest)

Version 1 is this. A reader refuses a version it does not know, and skips lines of a type it
does not know (every version of version 1 has: the S line came later).
"""

from __future__ import annotations

import ipaddress
import struct
import zlib

from .errors import EnvironmentProblem
from .rules import DROP, IPAddress, Rule, RuleKey, RuleSet

MAGIC = b"sklookupctl-ruleset"
VERSION = 1
CHUNK = 4096  # bytes per map entry
LEN = struct.Struct("<Q")

Targets = dict[str, tuple[str, IPAddress, int, bool]]  # name -> (protocol, address, port, exact)


def encode(rules: RuleSet, targets: Targets, source: str = "") -> bytes:
    lines = [f"S\t{source}"] if source else []
    lines += [
        f"T\t{n}\t{p}\t{a}\t{port}\t{int(exact)}"
        for n, (p, a, port, exact) in sorted(targets.items())
    ]
    z = zlib.compressobj(1)
    out = [MAGIC + f" {VERSION}\n".encode(), z.compress("\n".join(lines).encode())]
    # the rules a slice at a time: a large set's text is never all in memory
    items = list(rules.rules.items())
    for at in range(0, len(items), 8192):
        text = "".join(
            f"\nR\t{k.proto}\t{k.version}\t{k.net}\t{k.plen}\t{k.lo}\t{k.hi}\t{r.action}\t"
            f"{r.target or '-'}\t{r.on_missing}"
            for k, r in items[at : at + 8192]
        )
        out.append(z.compress((text if lines or at else text[1:]).encode()))
    out.append(z.flush())
    return b"".join(out)


def decode(blob: bytes) -> tuple[RuleSet, Targets]:
    head, _, body = blob.partition(b"\n")
    name, _, version = head.partition(b" ")
    if name != MAGIC:
        raise EnvironmentProblem("not a sklookupctl rule-set record")
    if version != str(VERSION).encode():
        raise EnvironmentProblem(
            f"a rule-set record of version {version.decode(errors='replace')}, this sklookupctl "
            f"reads {VERSION}",
            "use the sklookupctl that wrote it, or a newer one",
        )
    rs = RuleSet()
    targets: Targets = {}
    for line in zlib.decompress(body).decode().split("\n") if body else []:
        f = line.split("\t")
        if f[0] == "T":
            targets[f[1]] = (f[2], ipaddress.ip_address(f[3]), int(f[4]), f[5] == "1")
        elif f[0] == "R":
            key = RuleKey.of(f[1], int(f[2]), int(f[3]), int(f[4]), int(f[5]), int(f[6]))
            target = None if f[8] == "-" else f[8]
            rs.rules[key] = Rule(key, f[7], target if f[7] != DROP else None, f[9])
    return rs, targets


def source(first_chunk: bytes) -> str:
    """The S line of a record, from its first map entry only ("" when it has none or is not
    a record of this version)."""
    (n,) = LEN.unpack_from(first_chunk)
    head, _, body = first_chunk[LEN.size : LEN.size + min(n, CHUNK - LEN.size)].partition(b"\n")
    if head != MAGIC + f" {VERSION}".encode():
        return ""
    try:
        start = zlib.decompressobj().decompress(body, 200)
    except zlib.error:
        return ""
    line = start.partition(b"\n")[0]
    return line[2:].decode(errors="replace") if line.startswith(b"S\t") else ""


def chunks(blob: bytes) -> tuple[int, bytes]:
    """(map entries, their contents): the length first, then the record, in CHUNK-byte values."""
    data = LEN.pack(len(blob)) + blob
    n = -(-len(data) // CHUNK)
    return n, data.ljust(n * CHUNK, b"\0")


def unchunk(data: bytes) -> bytes:
    (n,) = LEN.unpack_from(data)
    return data[LEN.size : LEN.size + n]
