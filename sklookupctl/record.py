"""A generation's rule set in a layout-independent, versioned record, pinned beside it (the
`record` map), so that any later version, whatever its layout, can read what steers and
migrate it (`upgrade`) without knowing this version's structs.

The record is bytes: a first line `sklookupctl-ruleset VERSION`, then a zlib-compressed body.

Version 2 (written since issue 11; a million rules' text took seconds to format): the body is

    S<TAB>digest        only when the rules were read from a rule file (apply): the digest of
                        its text and of the code that read it (rulefile.source_digest)
    [targets]           one line of JSON: [[name, protocol, address, port, exact], ...], in
                        the order the rules' target numbers count
    then, to the end, one 32-byte record per rule, little-endian (RULE below):
        protocol number (6 tcp, 17 udp), address family (2, 10), prefix length,
        action (1 steer, 2 drop), on missing socket (0 drop, 1 pass), 3 bytes of zero,
        first port, last port, target number (0 for drop rules), address (16 bytes, network
        order; IPv4 in the first 4)

Version 1 (written before): the body is text, one line per target and per rule, fields
separated by tabs, maybe an S line first:

    T  name  protocol  address  port  exact(0|1)
    R  protocol  ip-version  network(int)  prefix-length  lo  hi  action  target|-  on_missing

A reader refuses a version it does not know.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import zlib

from .errors import EnvironmentProblem
from .rules import DROP, PROTO_NAMES, PROTOCOLS, STEER, IPAddress, Rule, RuleKey, RuleSet

MAGIC = b"sklookupctl-ruleset"
VERSION = 2
READS = (1, 2)
CHUNK = 4096  # bytes per map entry
LEN = struct.Struct("<Q")
RULE = struct.Struct("<BBBBB3xHHI16s")
STEER_CODE, DROP_CODE = 1, 2
MISSING = {0: "drop", 1: "pass"}

Targets = dict[str, tuple[str, IPAddress, int, bool]]  # name -> (protocol, address, port, exact)


def pack_rule(rule: Rule, number: dict[str, int]) -> bytes:
    """One rule's record (`number`: each target's number)."""
    k = rule.key
    v4 = k.version == 4
    return RULE.pack(
        PROTOCOLS[k.proto],
        socket.AF_INET if v4 else socket.AF_INET6,
        k.plen,
        DROP_CODE if rule.action == DROP else STEER_CODE,
        1 if rule.on_missing == "pass" else 0,
        k.lo,
        k.hi,
        number[rule.target] if rule.target is not None else 0,
        k.net.to_bytes(4, "big") + bytes(12) if v4 else k.net.to_bytes(16, "big"),
    )


def encode(records: bytes, targets: Targets, source: str = "") -> bytes:
    """The record of rules already packed as RULE records (`records`: one after another,
    target numbers counting `targets` in name order) and of `targets`."""
    head = f"S\t{source}\n" if source else ""
    listed = [[n, p, str(a), port, exact] for n, (p, a, port, exact) in sorted(targets.items())]
    head += json.dumps(listed, separators=(",", ":")) + "\n"
    z = zlib.compressobj(1)
    body = z.compress(head.encode()) + z.compress(records) + z.flush()
    return MAGIC + f" {VERSION}\n".encode() + body


def encode_rules(rules: RuleSet, targets: Targets, source: str = "") -> bytes:
    """encode, for rules given as a RuleSet."""
    number = {n: i for i, n in enumerate(sorted(targets))}
    return encode(b"".join(pack_rule(r, number) for r in rules.rules.values()), targets, source)


def _version(blob: bytes) -> tuple[int, bytes]:
    head, _, body = blob.partition(b"\n")
    name, _, version = head.partition(b" ")
    if name != MAGIC:
        raise EnvironmentProblem("not a sklookupctl rule-set record")
    if version not in [str(v).encode() for v in READS]:
        raise EnvironmentProblem(
            f"a rule-set record of version {version.decode(errors='replace')}, this sklookupctl "
            f"reads {' and '.join(map(str, READS))}",
            "use the sklookupctl that wrote it, or a newer one",
        )
    return int(version), body


def decode(blob: bytes) -> tuple[RuleSet, Targets]:
    version, body = _version(blob)
    data = zlib.decompress(body) if body else b""
    return _decode_v1(data) if version == 1 else _decode_v2(data)


def _decode_v2(data: bytes) -> tuple[RuleSet, Targets]:
    if data.startswith(b"S\t"):
        data = data.partition(b"\n")[2]
    listed, _, records = data.partition(b"\n")
    targets: Targets = {
        n: (p, ipaddress.ip_address(a), port, exact) for n, p, a, port, exact in json.loads(listed)
    }
    names = sorted(targets)
    rs = RuleSet()
    for proto, family, plen, action, miss, lo, hi, target, addr in RULE.iter_unpack(records):
        v4 = family == socket.AF_INET
        key = RuleKey.of(
            PROTO_NAMES[proto],
            4 if v4 else 6,
            int.from_bytes(addr[:4] if v4 else addr, "big"),
            plen,
            lo,
            hi,
        )
        if action == DROP_CODE:
            rs.rules[key] = Rule(key, DROP, None, "drop")
        else:
            rs.rules[key] = Rule(key, STEER, names[target], MISSING[miss])
    return rs, targets


def _decode_v1(data: bytes) -> tuple[RuleSet, Targets]:
    rs = RuleSet()
    targets: Targets = {}
    for line in data.decode().split("\n") if data else []:
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
    a record this version reads)."""
    (n,) = LEN.unpack_from(first_chunk)
    try:
        _v, body = _version(first_chunk[LEN.size : LEN.size + min(n, CHUNK - LEN.size)])
        start = zlib.decompressobj().decompress(body, 200)
    except (EnvironmentProblem, zlib.error):
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
