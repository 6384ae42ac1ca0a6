"""The dispatcher's state in bpffs: one directory per network namespace, and its lock.

    <bpffs>/sklookupctl/<netns inode>/
        link            the bpf_link attaching the program to the netns
        sockets         SOCKMAP: target id -> socket          (kept across rule-set changes)
        targets         target id -> name, address, protocol  (kept across rule-set changes)
        gen-<prog id>/  one generation: the program and the maps built for one rule set
                        (nodes, entries, segments, counters, and for userspace: rules, base
                        counters carried over from earlier generations, meta)

The live generation is the one whose program the link runs. A change builds a new generation
next to it, swaps the link's program with one BPF_LINK_UPDATE (so lookups see the old rule set
or the new one, never a mix), then removes the old generation.

All state lives there; there is no daemon. A netns's first dispatcher is built under a staging
name (bpffs allows no dots in names), attached, then renamed into place, so a load either fully
happens or not at all. The `<bpffs>/sklookupctl` directory is flocked: exclusive for writers,
shared for readers.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import os
import socket
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import layout, trie
from .bpfsys import (
    BPF_F_MMAPABLE,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_HASH,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    BPF_MAP_TYPE_SOCKMAP,
    BpfError,
    Link,
    Map,
    Program,
    is_bpffs,
    possible_cpus,
)
from .errors import EnvironmentProblem, PermissionDenied, RuleConflict
from .layout import Counters, Meta, Node, RuleRecord, Segment, TargetInfo
from .netns import Netns
from .rules import (
    DROP,
    PROTO_NAMES,
    PROTOCOLS,
    STEER,
    IPAddress,
    Rule,
    RuleKey,
    RuleSet,
)

TOP = "sklookupctl"
OTHER_VERSION = (
    "another sklookupctl version made it: `sklookupctl detach --all` removes it (steering in "
    "that namespace stops until you attach or apply again)"
)
Effect = tuple[str, str | None, str]  # (action, target, on_missing) of a rule
U32 = ctypes.c_uint32
U64 = ctypes.c_uint64
_RULE = struct.Struct("<BBBBB3xHHI16s")
_COUNTERS = struct.Struct("<5Q")

# (type, key, value, flags) of every map of a generation; sizes follow the rule set
GEN_MAPS: dict[str, tuple[int, type[ctypes._SimpleCData[int]], type[Any], int]] = {
    "nodes": (BPF_MAP_TYPE_ARRAY, U32, Node, BPF_F_MMAPABLE),
    "entries": (BPF_MAP_TYPE_ARRAY, U32, U64, BPF_F_MMAPABLE),
    "segments": (BPF_MAP_TYPE_ARRAY, U32, Segment, BPF_F_MMAPABLE),
    "counters": (BPF_MAP_TYPE_PERCPU_ARRAY, U32, Counters, 0),
    "rules": (BPF_MAP_TYPE_ARRAY, U32, RuleRecord, BPF_F_MMAPABLE),
    "base": (BPF_MAP_TYPE_ARRAY, U32, Counters, BPF_F_MMAPABLE),
    "meta": (BPF_MAP_TYPE_ARRAY, U32, Meta, BPF_F_MMAPABLE),
}
# (key size, value size, max entries) of the maps kept across generations
KEPT_SHAPES = {
    "sockets": (4, 8, layout.MAX_TARGETS),
    "targets": (4, ctypes.sizeof(TargetInfo), layout.MAX_TARGETS),
}


@dataclass
class Target:
    """A named destination socket. `id` indexes the SOCKMAP."""

    id: int
    name: str
    proto: str
    family: int
    addr: IPAddress
    port: int
    cookie: int  # of the socket registered last


def base_dir(bpffs: str) -> str:
    try:
        ok = is_bpffs(bpffs)
    except FileNotFoundError:
        raise EnvironmentProblem(
            f"{bpffs} does not exist", f"mount bpffs there: mount -t bpf bpf {bpffs}"
        ) from None
    if not ok:
        raise EnvironmentProblem(
            f"{bpffs} is not a bpffs mount",
            f"mount one (mount -t bpf bpf {bpffs}) or pass --bpffs with a bpffs directory",
        )
    return os.path.join(bpffs, TOP)


@contextlib.contextmanager
def locked(bpffs: str, exclusive: bool) -> Iterator[str]:
    """Hold the sklookupctl lock; yields the base directory (created for writers)."""
    base = base_dir(bpffs)
    if exclusive:
        try:
            os.makedirs(base, exist_ok=True)
        except PermissionError:
            raise PermissionDenied(f"cannot create {base}", "run as root") from None
    elif not os.path.isdir(base):
        yield base
        return
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield base
    finally:
        os.close(fd)


def netns_dir(base: str, ns: Netns) -> str:
    return os.path.join(base, str(ns.inode))


def _addr_bytes(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    return addr.packed.ljust(16, b"\0")


def _addr_from(raw: bytes, family: int) -> IPAddress:
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(bytes(raw[:4]))
    return ipaddress.IPv6Address(bytes(raw[:16]))


def unpin_dir(path: str) -> None:
    """Remove a state directory and every pin under it."""
    for name in os.listdir(path):
        p = os.path.join(path, name)
        if os.path.isdir(p):
            unpin_dir(p)
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


def _rule_tuple(r: Rule) -> tuple[int, int, int, bytes, int, int]:
    k = r.key
    v4 = k.version == 4
    return (
        PROTOCOLS[k.proto],
        socket.AF_INET if v4 else socket.AF_INET6,
        k.plen,
        k.net.to_bytes(4, "big") + bytes(12) if v4 else k.net.to_bytes(16, "big"),
        k.lo,
        k.hi,
    )


def _incomplete(path: str, e: FileNotFoundError) -> EnvironmentProblem:
    return EnvironmentProblem(
        f"incomplete sklookupctl state in {path}: {e.filename} is missing",
        "`sklookupctl detach --all` clears it; then attach or apply again",
    )


def _read_array(m: Map[Any, Any], count: int, size: int) -> bytes:
    with m.mmap() as mm:
        return bytes(mm[: count * size])


def _write_array(m: Map[Any, Any], data: bytes) -> None:
    with m.mmap() as mm:
        mm[: len(data)] = data


@dataclass
class Generation:
    """The program and maps built for one rule set. Owns their fds."""

    program: Program
    maps: dict[str, Map[Any, Any]]
    path: str | None = None
    _meta: Meta | None = field(default=None, repr=False)  # written once, when built

    def close(self) -> None:
        self.program.close()
        for m in self.maps.values():
            m.close()

    @classmethod
    def open(cls, path: str) -> Generation:
        maps: dict[str, Map[Any, Any]] = {}
        try:
            for name, (mtype, key, value, _flags) in GEN_MAPS.items():
                m: Map[Any, Any] = Map.from_pin(os.path.join(path, name), key, value)
                maps[name] = m
                info = m.info()
                if (info.type, info.value_size) != (mtype, ctypes.sizeof(value)):
                    raise EnvironmentProblem(
                        f"pinned map {path}/{name} is not what this version expects",
                        OTHER_VERSION,
                    )
            prog = Program.from_pin(os.path.join(path, "program"))
        except BaseException as e:
            for m in maps.values():
                m.close()
            if isinstance(e, FileNotFoundError):
                raise _incomplete(path, e) from None
            raise
        g = cls(prog, maps, path)
        found = g.meta().layout
        if found != layout.LAYOUT_VERSION:
            g.close()
            raise EnvironmentProblem(
                f"state in {path} has layout {found}, this version uses {layout.LAYOUT_VERSION}",
                OTHER_VERSION,
            )
        return g

    def meta(self) -> Meta:
        if self._meta is None:
            raw = _read_array(self.maps["meta"], 1, ctypes.sizeof(Meta))
            self._meta = Meta.from_buffer_copy(raw)
        return self._meta

    def rule_records(self) -> list[tuple[int, int, int, int, int, int, int, int, bytes]]:
        """(proto, family, prefixlen, action, on_missing, lo, hi, target, addr) by rule number
        (entry 0 is rule number 1)."""
        n = self.meta().rules
        raw = _read_array(self.maps["rules"], n + 1, _RULE.size)
        return [
            (p, f, pl, a, om, lo, hi, t, addr)
            for p, f, pl, a, om, lo, hi, t, addr in _RULE.iter_unpack(raw[_RULE.size :])
        ]

    def counters(self) -> list[tuple[int, ...]]:
        """Each rule's counters as layout.COUNTER_NAMES (entry 0 is rule number 1)."""
        return [(st + dr + pa, st, dr, mi, er) for st, dr, pa, mi, er in self.raw_counters()]

    def counted(self) -> bool:
        """Whether any counter of any rule is non-zero (cheap: two bulk reads)."""
        n = self.meta().rules
        base = _read_array(self.maps["base"], n + 1, _COUNTERS.size)
        raw = self.maps["counters"].lookup_batch_raw(n + 1, _COUNTERS.size * possible_cpus())
        return base.count(0) != len(base) or raw.count(0) != len(raw)

    def raw_counters(self) -> list[tuple[int, ...]]:
        """Each rule's counters as the kernel keeps them (layout.KERNEL_COUNTERS): every CPU's,
        plus those carried over from earlier generations."""
        n = self.meta().rules
        width = len(layout.KERNEL_COUNTERS)
        base = array("Q", _read_array(self.maps["base"], n + 1, _COUNTERS.size))
        ncpu = possible_cpus()
        raw = self.maps["counters"].lookup_batch_raw(n + 1, _COUNTERS.size * ncpu)
        per = array("Q", raw.ljust(_COUNTERS.size * ncpu * (n + 1), b"\0"))
        # column j of rule i on cpu c is per[(i * ncpu + c) * width + j]: sum whole columns
        stride = ncpu * width
        columns = []
        for j in range(width):
            cpus = [per[c * width + j :: stride] for c in range(ncpu)]
            columns.append(list(map(sum, zip(base[j::width], *cpus, strict=True))))
        return list(zip(*columns, strict=True))[1:]

    def memlock(self) -> int:
        return sum(m.memlock() for m in self.maps.values())


@dataclass
class Dispatcher:
    """The pinned state of one netns: link, kept maps, live generation. Owns their fds."""

    path: str
    sockets: Map[ctypes.c_uint32, ctypes.c_uint64]
    targets: Map[ctypes.c_uint32, TargetInfo]
    netns_cookie: int
    link: Link | None = None
    gen: Generation | None = None
    stale: list[str] = field(default_factory=list)  # generation directories not live

    def close(self) -> None:
        self.sockets.close()
        self.targets.close()
        if self.link is not None:
            self.link.close()
        if self.gen is not None:
            self.gen.close()

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def program(self) -> Program:
        assert self.gen is not None
        return self.gen.program

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str) -> Dispatcher:
        """Open the pinned state in `path`, checking the maps are what this version expects."""
        opened: list[Any] = []
        try:
            kept: dict[str, Map[Any, Any]] = {}
            for name, want in KEPT_SHAPES.items():
                m: Map[Any, Any] = Map.from_pin(os.path.join(path, name), U32, object)
                opened.append(m)
                info = m.info()
                got = (info.key_size, info.value_size, info.max_entries)
                if got != want:
                    raise EnvironmentProblem(
                        f"pinned map {path}/{name} has shape {got}, this version expects {want}",
                        OTHER_VERSION,
                    )
                kept[name] = m
            link = Link.from_pin(os.path.join(path, "link"))
            opened.append(link)
            live = f"gen-{link.info().prog_id}"
            gen = Generation.open(os.path.join(path, live))
        except BaseException as e:
            for o in opened:
                o.close()
            if isinstance(e, FileNotFoundError):
                raise _incomplete(path, e) from None
            raise
        kept["sockets"].value_type = U64
        kept["targets"].value_type = TargetInfo
        stale = [
            os.path.join(path, n) for n in os.listdir(path) if n.startswith("gen-") and n != live
        ]
        return cls(
            path, kept["sockets"], kept["targets"], gen.meta().netns_cookie, link, gen, stale
        )

    def link_netns_inode(self) -> int:
        """Inode of the netns the link is attached to; 0 when detached."""
        if self.link is None:
            return 0
        return int(self.link.info().netns_ino)

    # -- reading ------------------------------------------------------------------------------

    def read_targets(self) -> dict[str, Target]:
        """Targets by name. While a target's socket is being replaced, two ids may carry its
        name for a moment; the one the live rules use is the target."""
        out: dict[str, Target] = {}
        live: set[int] | None = None
        for k, v in self.targets.items():
            name = v.name.decode()
            t = Target(
                int(k.value),
                name,
                PROTO_NAMES[v.proto],
                v.family,
                _addr_from(bytes(v.addr), v.family),
                v.port,
                v.cookie,
            )
            if name in out:
                if live is None:
                    live = {rec[7] for rec in self.gen.rule_records()} if self.gen else set()
                if out[name].id in live:
                    continue
            out[name] = t
        return out

    def gc_targets(self, keep: set[int]) -> None:
        """Remove every target id not in `keep` (after a commit that no longer uses them)."""
        for k in self.targets.keys():
            if int(k.value) not in keep:
                self.drop_target(int(k.value))

    def read_rules(self, targets: dict[str, Target]) -> RuleSet:
        return RuleSet({r.key: r for r in self.read_rule_list(targets)})

    def read_effects(self, targets: dict[str, Target]) -> dict[RuleKey, Effect]:
        """The live rules as key -> (action, target, on_missing), in rule-number order, without
        making Rule objects (comparing large rule sets)."""
        if self.gen is None:
            return {}
        by_id = {t.id: t.name for t in targets.values()}
        names = {layout.ACTION_DROP: DROP, layout.ACTION_STEER: STEER}
        missing = {layout.MISSING_PASS: "pass", layout.MISSING_DROP: "drop"}
        of = RuleKey.of
        out: dict[RuleKey, Effect] = {}
        for proto, family, plen, action, miss, lo, hi, target, addr in self.gen.rule_records():
            v4 = family == socket.AF_INET
            key = of(
                PROTO_NAMES[proto],
                4 if v4 else 6,
                int.from_bytes(addr[:4] if v4 else addr, "big"),
                plen,
                lo,
                hi,
            )
            if action == layout.ACTION_DROP:
                out[key] = (DROP, None, "drop")
            else:
                out[key] = (names[action], by_id.get(target, f"#{target}"), missing[miss])
        return out

    def read_rule_list(self, targets: dict[str, Target]) -> list[Rule]:
        """The live rules, by rule number (as counters are)."""
        return [Rule(key, *effect) for key, effect in self.read_effects(targets).items()]

    def socket_cookie(self, target_id: int) -> int | None:
        """Cookie of the socket in the SOCKMAP slot, None when it is gone."""
        v = self.sockets.lookup(U32(target_id))
        return None if v is None else int(v.value)

    # -- writing ------------------------------------------------------------------------------

    def put_target(self, target: Target, sock_fd: int | None) -> None:
        """Record a target and (re)place its socket. Call before any rule points at it."""
        if sock_fd is not None:
            try:
                self.sockets.update(U32(target.id), U64(sock_fd))
            except BpfError as e:
                raise EnvironmentProblem(
                    f"the kernel refused socket {target.name} in the SOCKMAP: {e.strerror}",
                    "it must be a listening TCP or bound unconnected UDP socket",
                ) from None
        info = TargetInfo(
            name=target.name.encode(),
            proto=PROTOCOLS[target.proto],
            family=target.family,
            port=target.port,
            cookie=target.cookie,
        )
        info.addr[:] = list(_addr_bytes(target.addr))
        self.targets.update(U32(target.id), info)

    def drop_target(self, target_id: int) -> None:
        self.sockets.delete(U32(target_id))
        self.targets.delete(U32(target_id))

    def commit(self, rs: RuleSet, targets: dict[str, Target]) -> None:
        """Make `rs` the rule set: build a new generation, swap the link to it, drop the old.

        A lookup sees the old set or the new one: the swap is one BPF_LINK_UPDATE. Every
        target the rules name must already be in `targets` (and its socket in place).
        """
        self.install(build_generation(self, rs, targets))

    def install(self, gen: Generation) -> None:
        """Pin `gen`, make it live, carry the counters over, remove the old generation."""
        path = os.path.join(self.path, f"gen-{gen.program.info().id}")
        os.mkdir(path, 0o700)
        try:
            for name, m in gen.maps.items():
                m.pin(os.path.join(path, name))
            gen.program.pin(os.path.join(path, "program"))
            if self.link is not None and self.gen is not None:
                self.link.update(gen.program, self.gen.program)
        except BaseException:
            unpin_dir(path)
            gen.close()
            raise
        gen.path = path
        old, self.gen = self.gen, gen
        if old is not None:
            _carry_counters(old, gen)
            if old.path:
                unpin_dir(old.path)
            old.close()
        for p in self.stale:
            unpin_dir(p)
        self.stale = []


def build_generation(d: Dispatcher, rs: RuleSet, targets: dict[str, Target]) -> Generation:
    """Compile `rs`, create and fill maps sized to it, and load a program bound to them."""
    compiled = rs.compile()
    tables = trie.build(compiled, {name: t.id for name, t in targets.items()})
    n = len(compiled.rules)
    if n >= 1 << 31 or len(tables.segments) >= 1 << 31:
        raise RuleConflict(f"{n} rules is more than this version holds", "use fewer rules")
    records = [bytes(_RULE.size)]
    for r in compiled.rules:
        proto, family, plen, addr, lo, hi = _rule_tuple(r)
        action = layout.ACTION_DROP if r.action == DROP else layout.ACTION_STEER
        missing = layout.MISSING_PASS if r.on_missing == "pass" else layout.MISSING_DROP
        tid = targets[r.target].id if r.target is not None else 0
        records.append(_RULE.pack(proto, family, plen, action, missing, lo, hi, tid, addr))
    meta = Meta(
        layout=layout.LAYOUT_VERSION,
        rules=n,
        netns_cookie=d.netns_cookie,
        generation=d.gen.meta().generation + 1 if d.gen is not None else 1,
    )
    contents = {
        "nodes": (len(tables.nodes), tables.pack_nodes()),
        "entries": (max(1, len(tables.entries)), tables.pack_entries()),
        "segments": (max(1, len(tables.segments)), tables.pack_segments()),
        "counters": (n + 1, b""),
        "rules": (n + 1, b"".join(records)),
        "base": (n + 1, b""),
        "meta": (1, bytes(meta)),
    }
    maps: dict[str, Map[Any, Any]] = {}
    try:
        for name, (mtype, key, value, flags) in GEN_MAPS.items():
            count, data = contents[name]
            try:
                m: Map[Any, Any] = Map.create(mtype, key, value, count, f"skl_{name}", flags)
            except BpfError as e:
                raise EnvironmentProblem(
                    f"cannot create map {name} of {count} entries: {e.strerror}",
                    "the kernel is short of memory for this rule set"
                    if e.errno == errno.ENOMEM
                    else "",
                ) from None
            maps[name] = m
            if data:
                _write_array(m, data)
        from . import program  # not imported by commands that only read

        fds = {name: maps[name].fd for name in layout.PROGRAM_MAPS if name in maps}
        fds["sockets"] = d.sockets.fd
        prog = program.load(fds)
    except BaseException:
        for m in maps.values():
            m.close()
        raise
    return Generation(prog, maps)


def _carry_counters(old: Generation, new: Generation) -> None:
    """Counters of rules present in both generations continue in the new one's `base`.

    Read after the swap, so the old program has stopped counting (bar lookups already in
    flight when the link changed)."""
    if not old.counted():
        return
    old_counts = old.raw_counters()
    by_key = {
        (p, f, pl, addr, lo, hi): i
        for i, (p, f, pl, _a, _m, lo, hi, _t, addr) in enumerate(old.rule_records())
    }
    out = bytearray(_COUNTERS.size * (new.meta().rules + 1))
    carried = False
    for j, (p, f, pl, _a, _m, lo, hi, _t, addr) in enumerate(new.rule_records(), 1):
        i = by_key.get((p, f, pl, addr, lo, hi))
        if i is not None and any(old_counts[i]):
            _COUNTERS.pack_into(out, j * _COUNTERS.size, *old_counts[i])
            carried = True
    if carried:
        _write_array(new.maps["base"], bytes(out))


def create(path: str, ns: Netns) -> Dispatcher:
    """A netns's first state, in `path` (a staging dir): kept maps only; commit() adds the
    first generation and attach_link() attaches it."""
    os.mkdir(path, 0o700)
    opened: list[Map[Any, Any]] = []
    try:
        sockets: Map[ctypes.c_uint32, ctypes.c_uint64] = Map.create(
            BPF_MAP_TYPE_SOCKMAP, U32, U64, layout.MAX_TARGETS, "skl_sockets"
        )
        opened.append(sockets)
        targets: Map[ctypes.c_uint32, TargetInfo] = Map.create(
            BPF_MAP_TYPE_HASH, U32, TargetInfo, layout.MAX_TARGETS, "skl_targets"
        )
        opened.append(targets)
        sockets.pin(os.path.join(path, "sockets"))
        targets.pin(os.path.join(path, "targets"))
        return Dispatcher(path, sockets, targets, ns.cookie())
    except BaseException:
        for m in opened:
            m.close()
        unpin_dir(path)
        raise


@contextlib.contextmanager
def staged(base: str, ns: Netns) -> Iterator[Dispatcher]:
    """A namespace's first dispatcher, built under a staging name: when the block succeeds it is
    attached and renamed into place, when it fails it is removed; closed either way. Staging
    directories of invocations that died are removed first."""
    clean_staging(base)
    path = os.path.join(base, f"staging-{ns.inode}-{os.getpid()}")
    d = create(path, ns)
    try:
        with d:
            yield d
            attach_link(d, ns)
            os.rename(path, netns_dir(base, ns))
    except BaseException:
        if os.path.isdir(path):
            unpin_dir(path)
        raise


def attach_link(d: Dispatcher, ns: Netns) -> None:
    """Attach the live generation's program to `ns` and pin the link next to it."""
    try:
        link = Link.create_netns(d.program, ns.fd)
    except BpfError as e:
        hint = (
            "a netns holds at most 64 sk_lookup links"
            if e.errno == errno.E2BIG
            else "the kernel needs sk_lookup support (5.9+)"
        )
        raise EnvironmentProblem(f"cannot attach to {ns.label}: {e.strerror}", hint) from None
    d.link = link
    link.pin(os.path.join(d.path, "link"))


def detach_pinned_link(path: str, ns: Netns) -> None:
    """Detach the link pinned in a state directory we cannot otherwise read, if it is attached
    to `ns` (or to nothing any more). Best effort: the directory is going anyway."""
    try:
        link = Link.from_pin(os.path.join(path, "link"))
    except OSError:
        return
    with link, contextlib.suppress(BpfError):
        if link.info().netns_ino in (ns.inode, 0):
            link.detach()


def remove(d: Dispatcher) -> None:
    """Detach our link (never anyone else's) and remove the directory."""
    if d.link is not None:
        with contextlib.suppress(BpfError):
            d.link.detach()
    unpin_dir(d.path)


def clean_staging(base: str) -> None:
    """Remove staging directories left by invocations that died (their pid is gone)."""
    for name in os.listdir(base):
        if not name.startswith("staging-"):
            continue
        pid = name.rsplit("-", 1)[-1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            unpin_dir(os.path.join(base, name))
