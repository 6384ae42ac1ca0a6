"""The dispatcher's state in bpffs: a directory per network namespace, the lock, and the commit.

    <bpffs>/sklookupctl/
        ns-<netns cookie>/     the state of one network namespace (a netns cookie is never
                               reused; an inode is)
            link               the bpf_link attaching the live program to the namespace
            link-next          only while a detached link is replaced by a new one
            gen-<program id>/  a generation: everything one rule set needs, built whole
                program        the dispatcher, bound to the maps below
                sockets        SOCKMAP: slot -> socket (the same map in successive
                               generations, until it has to grow)
                nodes entries segments counters    what the program reads
                rules targets base meta            records for userspace (image.py)
            trace-<program id>/  only while `trace` runs on that generation: the traced
                program (same maps, plus `events` and `lost`), which the link runs instead;
                the tracer holds an flock on the directory for as long as it runs

The live generation is the one the link runs. A change builds a new generation beside it, fills
the new sockets' slots, swaps the link's program with one BPF_LINK_UPDATE (each lookup sees the
old rule set or the new one), then retires the old generation: counters carried over, its
slots emptied, its directory removed. A namespace's first generation goes live when its link is
made and pinned: a directory without a link is what a killed command left, and never steers.

`trace` swaps the link to a traced copy of the live generation's program and back. A writer
first puts the plain program back (the tracer then traces the new generation); any command puts
it back when the tracer that swapped it in is gone (killed), and writers remove what it left.

Writers hold an exclusive flock on <bpffs>/sklookupctl and readers a shared one, so whatever a
writer finds that is not live (a generation beside the live one, a directory without a link)
was left by a command that died: `repair` finishes or undoes it, `Store.gc` does it for every
namespace and removes the state of namespaces that are gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import faults, image, interrupts, layout, trust, validate
from .bpfsys import (
    BPF_F_MMAPABLE,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    BPF_MAP_TYPE_SOCKMAP,
    BpfError,
    Link,
    Map,
    Program,
    RingBuffer,
    give_back_memory,
    is_bpffs,
    possible_cpus,
)
from .errors import EnvironmentProblem, SklookupError, Untrusted
from .netns import Netns, find_alive, find_cookie
from .plan import NOTHING, LazyEffects, Live, Plan, Slotted

TOP = "sklookupctl"
NS_PREFIX = "ns-"
GEN_PREFIX = "gen-"
LINK_NEXT = "link-next"  # bpffs names have no dots
TRACE_PREFIX = "trace-"
OTHER_VERSION = (
    "another sklookupctl version made it: `sklookupctl upgrade` moves it to this version in "
    "place (rules, sockets and counters kept, no connection refused); `detach --all` removes it"
)
U32 = ctypes.c_uint32
U64 = ctypes.c_uint64
DEFAULT_WAIT = 10.0  # seconds a command waits for the lock before it gives up (--wait)

# (type, value type, flags) of every map of a generation but the SOCKMAP; sizes follow the
# rule set (image.encode)
GEN_MAPS: dict[str, tuple[int, type[Any], int]] = {
    "nodes": (BPF_MAP_TYPE_ARRAY, layout.Node, BPF_F_MMAPABLE),
    "entries": (BPF_MAP_TYPE_ARRAY, U64, BPF_F_MMAPABLE),
    "segments": (BPF_MAP_TYPE_ARRAY, layout.Segment, BPF_F_MMAPABLE),
    "counters": (BPF_MAP_TYPE_PERCPU_ARRAY, layout.Counters, 0),
    "rules": (BPF_MAP_TYPE_ARRAY, layout.RuleRecord, BPF_F_MMAPABLE),
    "base": (BPF_MAP_TYPE_ARRAY, layout.Counters, BPF_F_MMAPABLE),
    # per group of rules (a target's, a protocol's drop rules): what rules no longer in the
    # group counted, so that a group's total only grows (image.groups)
    "tbase": (BPF_MAP_TYPE_ARRAY, layout.Counters, BPF_F_MMAPABLE),
    "targets": (BPF_MAP_TYPE_ARRAY, layout.TargetRecord, BPF_F_MMAPABLE),
    "meta": (BPF_MAP_TYPE_ARRAY, layout.Meta, BPF_F_MMAPABLE),
    # the rule set in a layout-independent, versioned record (record.py), for later versions
    "record": (BPF_MAP_TYPE_ARRAY, layout.RecordChunk, BPF_F_MMAPABLE),
}
OPTIONAL_MAPS = {"record", "tbase"}  # generations written before them have none


def base_dir(bpffs: str) -> str:
    validate.path_text(bpffs, "--bpffs")
    try:
        ok = is_bpffs(bpffs)
    except FileNotFoundError:
        raise EnvironmentProblem(
            f"{bpffs} does not exist", f"mount bpffs there: mount -t bpf bpf {bpffs}"
        ) from None
    except OSError as e:
        raise EnvironmentProblem(f"{bpffs}: {e.strerror}", "pass --bpffs a bpffs mount") from None
    if not ok:
        raise EnvironmentProblem(
            f"{bpffs} is not a bpffs mount",
            f"mount one (mount -t bpf bpf {bpffs}) or pass --bpffs with a bpffs directory",
        )
    if not os.path.ismount(bpffs):
        # a directory inside a bpffs (its own state directory, say) would hold a second,
        # independent state for the same namespaces: two dispatchers
        raise EnvironmentProblem(
            f"{bpffs} is inside a bpffs mount, not the mount itself",
            "pass --bpffs the mount point, such as /sys/fs/bpf",
        )
    return os.path.join(bpffs, TOP)


def unpin_dir(path: str) -> None:
    """Remove a state directory and every pin under it (nothing if it is not there). Links go
    first: a removal cut short leaves a directory without a link, which any writer removes."""
    try:
        names = sorted(os.listdir(path), key=lambda n: n not in ("link", LINK_NEXT))
    except FileNotFoundError:
        return
    for i, name in enumerate(names):
        p = os.path.join(path, name)
        if os.path.isdir(p):
            unpin_dir(p)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        if i == 0:
            faults.point("unpin.partial")
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


def _incomplete(path: str, e: FileNotFoundError) -> EnvironmentProblem:
    return EnvironmentProblem(
        f"incomplete sklookupctl state in {path}: {e.filename} is missing",
        "`sklookupctl detach --all` clears it; then attach or apply again",
    )


def _read_array(m: Map[Any, Any], count: int, size: int) -> bytes:
    if m.readonly:  # the kernel maps only fds opened read-write: batch lookups instead
        return bytes(m.lookup_batch_raw(count, size))
    with m.mmap() as mm:
        return bytes(mm[: count * size])


def _write_array(m: Map[Any, Any], data: bytes) -> None:
    with m.mmap() as mm:
        mm[: len(data)] = data


def _empty_slot(sockets: Map[Any, Any], slot: int) -> None:
    """Empty a SOCKMAP slot. A slot whose socket was closed is already empty: the kernel then
    answers EINVAL (not ENOENT), which is no error here."""
    try:
        sockets.delete(U32(slot))
    except BpfError as e:
        if e.errno != errno.EINVAL:
            raise


# -- generations ------------------------------------------------------------------------------


@dataclass
class Generation:
    """The program and maps built for one rule set. Owns their fds."""

    program: Program
    maps: dict[str, Map[Any, Any]]  # GEN_MAPS and "sockets"
    path: str | None = None
    _meta: layout.Meta | None = field(default=None, repr=False)  # written once, when built
    _rules: bytes | None = field(default=None, repr=False)  # likewise

    @property
    def sockets(self) -> Map[ctypes.c_uint32, ctypes.c_uint64]:
        return self.maps["sockets"]

    def close(self) -> None:
        self.program.close()
        for m in self.maps.values():
            m.close()

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def open(cls, path: str, readonly: bool = False) -> Generation:
        """Open a pinned generation, checking every map is what this version expects (fds
        read-only for readers)."""
        maps: dict[str, Map[Any, Any]] = {}
        ro = readonly
        try:
            meta: Map[Any, Any] = Map.from_pin(os.path.join(path, "meta"), U32, layout.Meta, ro)
            maps["meta"] = meta
            found = image.decode_meta(_read_array(meta, 1, ctypes.sizeof(layout.Meta))).layout
            if found != layout.LAYOUT_VERSION:
                raise EnvironmentProblem(
                    f"state in {path} has layout {found}, this version uses "
                    f"{layout.LAYOUT_VERSION}",
                    OTHER_VERSION,
                )
            for name, (mtype, value, _flags) in GEN_MAPS.items():
                if name == "meta":
                    continue
                pin = os.path.join(path, name)
                if name in OPTIONAL_MAPS and not os.path.exists(pin):
                    continue
                m: Map[Any, Any] = Map.from_pin(pin, U32, value, ro)
                maps[name] = m
                info = m.info()
                if (info.type, info.value_size) != (mtype, ctypes.sizeof(value)):
                    raise EnvironmentProblem(
                        f"pinned map {path}/{name} is not what this version expects",
                        OTHER_VERSION,
                    )
            s: Map[Any, Any] = Map.from_pin(os.path.join(path, "sockets"), U32, U64, ro)
            maps["sockets"] = s
            info = s.info()
            if (info.type, info.key_size, info.value_size) != (BPF_MAP_TYPE_SOCKMAP, 4, 8):
                raise EnvironmentProblem(f"pinned map {path}/sockets is not a SOCKMAP")
            prog = Program.from_pin(os.path.join(path, "program"), ro)
        except BaseException as e:
            for m in maps.values():
                m.close()
            if isinstance(e, FileNotFoundError):
                raise _incomplete(path, e) from None
            raise
        return cls(prog, maps, path)

    def pin(self, path: str) -> None:
        os.mkdir(path, 0o700)
        for name, m in self.maps.items():
            m.pin(os.path.join(path, name))
        self.program.pin(os.path.join(path, "program"))
        self.path = path

    # -- reading

    def meta(self) -> layout.Meta:
        if self._meta is None:
            raw = _read_array(self.maps["meta"], 1, ctypes.sizeof(layout.Meta))
            self._meta = image.decode_meta(raw)
        return self._meta

    def targets(self) -> list[Slotted]:
        """The targets by index."""
        n = self.meta().targets
        return image.decode_targets(_read_array(self.maps["targets"], n, image.TARGET.size), n)

    def rule_records(self) -> bytes:
        """The rules map as bytes (image.RULE records; entry 0 is unused)."""
        return self._rule_bytes()

    def rule(self, number: int) -> tuple[Any, int, int, int]:
        """One rule's record, decoded: (key, action, on_missing, target index)."""
        raw = self.maps["rules"].lookup_batch_raw(number + 1, image.RULE.size)
        return next(image.records(bytes(raw[number * image.RULE.size :])))

    def _rule_bytes(self) -> bytes:
        if self._rules is None:
            n = self.meta().rules
            self._rules = _read_array(self.maps["rules"], n + 1, image.RULE.size)
        return self._rules

    def effects(self, names: list[str]) -> dict[Any, Any]:
        """The rules, key -> (action, target, on_missing), by rule number."""
        return image.decode_rules(self._rule_bytes(), self.meta().rules, names)

    def counted(self) -> image.Counted:
        """What the generation counted: its rules, `base`, per-CPU counters and `tbase`, each
        read once (bulk reads)."""
        n = self.meta().rules
        size = image.COUNTERS.size
        ncpu = possible_cpus()
        return image.Counted(
            self._rule_bytes(),
            n,
            _read_array(self.maps["base"], n + 1, size),
            self.maps["counters"].lookup_batch_raw(n + 1, size * ncpu),
            ncpu,
            self._tbase(),
            [t.name for t in self.targets()],
        )

    def _tbase(self) -> bytes:
        m = self.maps.get("tbase")
        if m is None:
            return b""
        return _read_array(m, self.meta().targets + len(image.DROP_GROUPS), image.COUNTERS.size)

    def counts(self) -> tuple[image.Counted, list[list[int]]]:
        """What the generation counted, and each rule's counters (layout.KERNEL_COUNTERS:
        every CPU's plus `base`) as one list per counter, by rule number from 1."""
        counted = self.counted()
        return counted, counted.columns()

    def raw_counters(self) -> list[tuple[int, ...]]:
        """Each rule's counters as the kernel keeps them (layout.KERNEL_COUNTERS): every CPU's,
        plus those carried over from earlier generations (entry 0 is rule number 1)."""
        return list(zip(*self.counts()[1], strict=True))

    def counters(self) -> list[tuple[int, ...]]:
        """Each rule's counters as layout.COUNTER_NAMES (entry 0 is rule number 1)."""
        return [image.counter_view(c) for c in self.raw_counters()]

    def memlock(self) -> int:
        return sum(m.memlock() for m in self.maps.values())

    def ruleset(self) -> tuple[Any, Any] | None:
        """The generation's record (record.decode: rules, targets); None when it has none."""
        from . import record

        m = self.maps.get("record")
        if m is None:
            return None
        size = ctypes.sizeof(layout.RecordChunk)
        first = _read_array(m, 1, size)
        total = record.LEN.unpack_from(first)[0] + record.LEN.size
        return record.decode(record.unchunk(_read_array(m, -(-total // size), size)))

    def source(self) -> str:
        """The digest of a rule file whose rules are the generation's ("": none known): the one
        an apply noted later (note_source), else the one kept in the record's first entry."""
        from . import record

        if self.path is not None:
            try:
                with Map.from_pin(
                    os.path.join(self.path, layout.SOURCE_NOTE), U32, layout.SourceNote, True
                ) as note:
                    size = ctypes.sizeof(layout.SourceNote)
                    if note.info().value_size != size:
                        return ""  # not a note this version wrote: nothing is known
                    raw = _read_array(note, 1, size)
                    if raw.strip(b"\0"):
                        return raw.rstrip(b"\0").decode("ascii", "replace")
            except FileNotFoundError:
                pass
            except (BpfError, OSError):
                return ""  # a note that cannot be read: nothing is known
        m = self.maps.get("record")
        if m is None:
            return ""
        return record.source(_read_array(m, 1, ctypes.sizeof(layout.RecordChunk)))

    def note_source(self, digest: str) -> None:
        """Note that the generation's rules are those of the rule file whose digest is
        `digest` (an apply of it changed nothing): pinned beside its maps, so it goes with the
        generation. Written to a pin of its own and renamed into place: a kill leaves the old
        note or the new one (and maybe a stray `source-next`, replaced next time)."""
        assert self.path is not None
        size = ctypes.sizeof(layout.SourceNote)
        nxt = os.path.join(self.path, layout.SOURCE_NOTE + "-next")  # bpffs refuses dots
        with Map.create(
            BPF_MAP_TYPE_ARRAY, U32, layout.SourceNote, 1, "skl_source", BPF_F_MMAPABLE
        ) as note:
            _write_array(note, digest.encode("ascii")[:size].ljust(size, b"\0"))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(nxt)
            note.pin(nxt)
            faults.point("note.pinned")
            os.rename(nxt, os.path.join(self.path, layout.SOURCE_NOTE))

    def add_counters(self, carried: dict[Any, tuple[int, ...]]) -> None:
        """Add counters carried from elsewhere (an upgrade) to the rules' base, by rule key."""
        n = self.meta().rules
        size = image.COUNTERS.size
        base = bytearray(_read_array(self.maps["base"], n + 1, size))
        targets = self.targets()
        for i, key in enumerate(self.effects([t.name for t in targets]), start=1):
            extra = carried.get(key)
            if extra is None:
                continue
            now = image.COUNTERS.unpack_from(base, i * size)
            image.COUNTERS.pack_into(
                base, i * size, *(a + b for a, b in zip(now, extra, strict=True))
            )
        _write_array(self.maps["base"], bytes(base))


def build(
    img: image.Image, sockets: Map[Any, Any], made: dict[str, Map[Any, Any]] | None = None
) -> Generation:
    """Create maps sized to `img`, fill them, and load a program bound to them and `sockets`
    (whose fd the generation then owns). `made`: maps already made, of the sizes `img` needs
    (the generation owns them too). Nothing is pinned."""
    maps: dict[str, Map[Any, Any]] = {"sockets": sockets, **(made or {})}

    def make(name: str, count: int, data: bytes) -> None:
        mtype, value, flags = GEN_MAPS[name]
        if name in maps:
            if maps[name].info().max_entries != count:
                raise AssertionError(f"map {name} made ahead for another size")
        else:
            maps[name] = _create_map(mtype, value, count, name, flags)
        if data:
            _write_array(maps[name], data)

    prog: Program | None = None
    try:
        later = []
        for name in GEN_MAPS:
            entry = img.maps[name]
            if isinstance(entry, image.Later):
                later.append((name, entry))  # made meanwhile by another thread
            else:
                make(name, *entry)
        from . import program  # loads the compiler only when a program must be built

        prog = program.load({name: maps[name].fd for name in layout.PROGRAM_MAPS})
        for name, entry in later:
            make(name, *entry.result())
    except BaseException:
        if prog is not None:
            prog.close()
        for m in maps.values():
            m.close()
        raise
    return Generation(prog, maps)


class _Ahead:
    """The `counters` map of a generation of `rules` rules, made by another thread (the
    syscall lets go of the GIL) while this one goes on."""

    def __init__(self, rules: int) -> None:
        self.rules = rules
        self.made: Map[Any, Any] | None = None
        self.thread = threading.Thread(target=self._make, args=(rules + 1,), daemon=True)
        self.thread.start()

    def _make(self, count: int) -> None:
        mtype, value, flags = GEN_MAPS["counters"]
        # a failure is left to build, which makes the map again and words the error
        with contextlib.suppress(Exception):
            self.made = _create_map(mtype, value, count, "counters", flags)

    def take(self) -> dict[str, Map[Any, Any]]:
        """The map, once made ({}: it could not be; build then tries again, and words why)."""
        self.thread.join()
        return {} if self.made is None else {"counters": self.made}

    def discard(self) -> None:
        self.thread.join()
        if self.made is not None:
            self.made.close()


def _create_map(mtype: int, value: type[Any], count: int, name: str, flags: int) -> Map[Any, Any]:
    try:
        return Map.create(mtype, U32, value, count, f"skl_{name}", flags)
    except BpfError as e:
        raise EnvironmentProblem(
            f"cannot create map {name} of {count} entries: {e.strerror}",
            "the kernel is short of memory for this rule set" if e.errno == errno.ENOMEM else "",
        ) from None


def _carried(old: Generation, new: Generation) -> tuple[bytes, bytes | None] | None:
    """What `new` continues of `old`'s counters: its `base` and, when it has one, its `tbase`
    (image.carry; vector.carry for large rule sets). None when `old` counted nothing (nothing
    to carry: `new`'s maps stay as built)."""
    counted = old.counted()
    if not counted.anything():
        return None
    n = new.meta().rules
    args = (new.rule_records(), n, [t.name for t in new.targets()], "tbase" in new.maps)
    if max(counted.count, n) >= image.VECTOR_MIN:
        from . import vector

        base, tbase = vector.carry(counted, *args)
    else:
        base, tbase = image.carry(counted, *args)
    return (base if base is not None else bytes(image.COUNTERS.size * (n + 1))), tbase


def _carry_counters(old: Generation, new: Generation) -> None:
    """Counters of rules present in both generations continue in the new one's `base`, and
    each group's total in its `tbase` (_carried).

    Assigned, not added to: carrying again (a repair after a killed command) gives the same
    result. Made after the switch, so the old program has stopped counting (bar lookups
    already in flight when the link changed). Readers that find the old generation still
    pinned (its writer was killed before this) make the same carry in memory
    (Dispatcher.counts)."""
    carried = _carried(old, new)
    if carried is None:
        return
    base, tbase = carried
    _write_array(new.maps["base"], base)
    if tbase is not None:
        _write_array(new.maps["tbase"], tbase)


# -- one namespace ----------------------------------------------------------------------------


@dataclass
class Dispatcher:
    """The pinned state of one network namespace: its link and live generation. Owns their
    fds. Made by Store.open / Store.create."""

    path: str
    cookie: int
    link: Link | None = None
    gen: Generation | None = None
    stale: list[str] = field(default_factory=list)  # generation directories that are not live
    tracing: str | None = None  # the trace directory whose program the link runs
    traced: Program | None = None  # that program
    ahead: _Ahead | None = None  # the next generation's counters, being made (expect)

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.discard()
            self.ahead = None
        if self.link is not None:
            self.link.close()
        if self.gen is not None:
            self.gen.close()
        if self.traced is not None:
            self.traced.close()

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def open(cls, path: str, cookie: int, readonly: bool = False) -> Dispatcher:
        """Open the state in `path` as it is (see `state`). A `link-next` that runs (a
        re-attach killed before renaming it into place) is the link. `readonly` (readers):
        maps and program read-only, and the link found by the programs it may run rather than
        by its pin (see Link.running)."""
        d = cls(path, cookie)
        if readonly:
            return d._open_readonly()
        d.link = _open_link(os.path.join(path, "link"))
        nxt = _open_link(os.path.join(path, LINK_NEXT))
        if nxt is not None:
            if d.link is None or nxt.info().netns_ino:
                if d.link is not None:
                    d.link.close()
                d.link = nxt
            else:
                nxt.close()
        try:
            running = int(d.link.info().prog_id) if d.link is not None else 0
            live = f"{GEN_PREFIX}{running}" if running else ""
            if live and not os.path.exists(os.path.join(path, live)):
                live = d._traced_generation(running, readonly=False) or live
            if live:
                d.gen = Generation.open(os.path.join(path, live))
            d.stale = sorted(
                os.path.join(path, n)
                for n in os.listdir(path)
                if n.startswith(GEN_PREFIX) and n != live
            )
        except BaseException:
            d.close()
            raise
        return d

    def _open_readonly(self) -> Dispatcher:
        try:
            gens = {
                int(n[len(GEN_PREFIX) :]): os.path.join(self.path, n)
                for n in os.listdir(self.path)
                if n.startswith(GEN_PREFIX) and n[len(GEN_PREFIX) :].isdigit()
            }
            pinned = os.path.exists(os.path.join(self.path, "link")) or os.path.exists(
                os.path.join(self.path, LINK_NEXT)
            )
            traced = self._traced_programs()
            ids = set(gens) | set(traced)
            self.link = Link.running(ids) if pinned and gens else None
            live = int(self.link.info().prog_id) if self.link is not None else 0
            if live in traced and live not in gens:
                tdir, gen_id = traced[live]
                live = gen_id
                try:
                    self.traced = Program.from_pin(os.path.join(tdir, "program"), True)
                    self.tracing = tdir
                except FileNotFoundError:
                    pass  # the trace ended just now: the link runs the plain program again
            if live in gens:
                self.gen = Generation.open(gens[live], readonly=True)
            # a trace that was killed left its traced copy running: any reader ends it too
            with contextlib.suppress(OSError):
                self.untrace(force=False)
            self.stale = sorted(p for i, p in gens.items() if i != live)
        except BaseException:
            self.close()
            raise
        return self

    def counts(self) -> tuple[image.Counted, list[list[int]]]:
        """The live generation's counters (Generation.counts) as the next writer will leave
        them: when a writer was killed after its switch and before it carried the counters of
        the generation it replaced over (that generation still pinned here), the carry is made
        in memory, as the next writer's repair will make it in the maps."""
        assert self.gen is not None
        counted = self.gen.counted()
        replaced = self._replaced()
        if replaced is not None:
            with replaced:
                carried = _carried(replaced, self.gen)
            n = counted.count
            base, tbase = carried or (bytes(image.COUNTERS.size * (n + 1)), None)
            if tbase is None and counted.tbase:
                tbase = bytes(len(counted.tbase))
            counted = dataclasses.replace(counted, base=base, tbase=tbase or b"")
        return counted, counted.columns()

    def _replaced(self) -> Generation | None:
        """The newest generation pinned beside the live one that the live one replaced (the
        one whose counters the repair carries over); None when there is none."""
        assert self.gen is not None
        live = self.gen.meta().generation
        best: Generation | None = None
        for p in self.stale:
            try:
                g = Generation.open(p, readonly=True)
            except (EnvironmentProblem, OSError):
                continue  # half removed: the repair sweeps it; nothing to carry from
            if g.meta().generation < live and (
                best is None or g.meta().generation > best.meta().generation
            ):
                if best is not None:
                    best.close()
                best = g
            else:
                g.close()
        return best

    # -- tracing

    def trace_dirs(self) -> dict[int, str]:
        """The trace directories here, by the id of the generation's program they trace."""
        out = {}
        with contextlib.suppress(FileNotFoundError):
            for n in os.listdir(self.path):
                if n.startswith(TRACE_PREFIX) and n[len(TRACE_PREFIX) :].isdigit():
                    out[int(n[len(TRACE_PREFIX) :])] = os.path.join(self.path, n)
        return out

    def _traced_programs(self) -> dict[int, tuple[str, int]]:
        """traced program id -> (its trace directory, the id of the program it copies)"""
        out = {}
        for gen_id, tdir in self.trace_dirs().items():
            try:
                with Program.from_pin(os.path.join(tdir, "program"), readonly=True) as p:
                    out[int(p.info().id)] = (tdir, gen_id)
            except OSError:
                continue  # half made or half removed: it runs nowhere
        return out

    def _traced_generation(self, running: int, readonly: bool) -> str:
        """The generation whose traced copy the link runs (`running`), or ""."""
        found = self._traced_programs().get(running)
        if found is None:
            return ""
        try:
            self.traced = Program.from_pin(os.path.join(found[0], "program"), readonly)
        except FileNotFoundError:
            # the trace ended just now (a tracer swaps back and unpins without the lock): the
            # link runs the plain program again
            return f"{GEN_PREFIX}{found[1]}"
        self.tracing = found[0]
        return f"{GEN_PREFIX}{found[1]}"

    def untrace(self, force: bool) -> bool:
        """Put the plain program back where the link runs a traced copy whose tracer is gone
        (killed), or with `force`, whatever the tracer (a writer about to change the rule set:
        the tracer then traces the new generation). True when it did."""
        if self.tracing is None or self.traced is None or self.link is None or self.gen is None:
            return False
        if not force and tracer_alive(self.tracing):
            return False
        with contextlib.suppress(BpfError):  # no longer runs it: someone else did this
            self.link.update(self.gen.program, self.traced)
        self.traced.close()
        self.tracing, self.traced = None, None
        return True

    def dead_traces(self) -> list[str]:
        """Trace directories whose tracer is gone and whose program no longer runs."""
        return [t for t in self.trace_dirs().values() if t != self.tracing and not tracer_alive(t)]

    def trace(self, size: int) -> Tracing:
        """Swap the link to a traced copy of the live generation's program (see Tracing)."""
        gen, link = self.gen, self.link
        assert gen is not None and link is not None and gen.path is not None
        gen_id = int(gen.program.info().id)
        tdir = os.path.join(self.path, f"{TRACE_PREFIX}{gen_id}")
        events = RingBuffer.create(size, "skl_events")
        lost: Map[Any, Any] | None = None
        prog: Program | None = None
        lock = -1
        try:
            lost = _create_map(BPF_MAP_TYPE_PERCPU_ARRAY, U64, 1, "lost", 0)
            from . import program

            fds = {name: gen.maps[name].fd for name in layout.PROGRAM_MAPS}
            prog = program.load({**fds, "events": events.fd, "lost": lost.fd}, traced=True)
            os.mkdir(tdir, 0o700)
            lock = os.open(tdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            prog.pin(os.path.join(tdir, "program"))
            events.pin(os.path.join(tdir, "events"))
            lost.pin(os.path.join(tdir, "lost"))
            faults.point("trace.pinned")
            link.update(prog, gen.program)
            faults.point("trace.swapped")
        except BaseException:
            if prog is not None:
                # a signal right after the swap: back to the plain program before the traced
                # copy's pins go (a link running a program of no trace directory would make
                # the state unreadable); refused when the swap never happened
                with contextlib.suppress(BpfError):
                    link.update(gen.program, prog)
            for fd in (events, lost, prog):
                if fd is not None:
                    fd.close()
            if lock >= 0:
                unpin_dir(tdir)
                os.close(lock)
            raise
        return Tracing(
            tdir,
            lock,
            prog,
            events,
            lost,
            Program(os.dup(gen.program.fd)),
            Link(os.dup(link.fd)),
            gen_id,
        )

    @property
    def state(self) -> str:
        """steering; detached (the link no longer runs in a namespace: the namespace is gone,
        or something else detached it); unfinished (no link: a first commit that was killed,
        or a `detach --all` that was)."""
        if self.link is None or self.gen is None:
            return "unfinished"
        return "steering" if self.link.info().netns_ino else "detached"

    @property
    def program(self) -> Program:
        assert self.gen is not None
        return self.gen.program

    def snapshot(self, rules: bool = True, lazy: bool = False) -> Live:
        """What is live, for make_plan (without `rules`: no rule decoded, for readers that
        read the rule records themselves; `lazy`: the rules decoded when first looked at,
        which must be while the generation is open)."""
        g = self.gen
        if g is None:
            raise EnvironmentProblem(f"no live generation in {self.path}")
        targets = g.targets()
        filled: dict[int, int] = {}
        for t in targets:
            for slot in t.block():
                c = self.socket_cookie(slot)
                if c is not None:
                    filled[slot] = c
        names = [t.name for t in targets]
        effects: Mapping[Any, Any] = {}
        if lazy:
            n = g.meta().rules

            def in_order() -> bytes | None:
                """The rules map, for single rules to be found in it (a large set's, which
                numpy checks is in rule-number order; a small set is decoded whole)."""
                if n < image.VECTOR_MIN:
                    return None
                from . import vector

                raw = g.rule_records()
                return raw if vector.in_rule_order(raw, n) else None

            effects = LazyEffects(lambda: g.effects(names), n, in_order, names)
        elif rules:
            effects = g.effects(names)
        return Live(
            effects,
            {t.name: t for t in targets},
            filled,
            int(g.sockets.info().max_entries),
            int(g.meta().generation),
            self.state == "steering",
            g.source(),
        )

    def socket_cookie(self, slot: int) -> int | None:
        """Cookie of the socket in a SOCKMAP slot, None when it is empty."""
        assert self.gen is not None
        v = self.gen.sockets.lookup(U32(slot))
        return None if v is None else int(v.value)

    # -- writing

    def commit(
        self,
        plan: Plan,
        meta: image.MetaInfo,
        ns: Netns,
        socket_fd: Callable[[int, str], int],
    ) -> list[str]:
        """Carry out `plan`: build and pin the new generation, fill its new slots, make it
        live, then retire the old one. `socket_fd(cookie, proto)` gives an fd of a socket the
        plan fills in. Returns notes for the operator.

        A failure before the switch leaves everything as it was. From the switch on, the
        change has happened: SIGINT and SIGTERM wait until the old generation is retired, and
        a failure to retire it is a note (the next writer finishes it), never an error."""
        old = self.gen
        if plan.targets and not len(plan.rules):
            raise AssertionError("a plan with targets but no rules")  # make_plan's rules=None
        # a trace running: the plain program back first (the switch replaces it; the tracer
        # then traces the new generation)
        self.untrace(force=True)
        ahead = self._ahead_for(len(plan.rules))
        try:
            img = image.encode(
                plan.rules, plan.targets, meta, source=plan.source, later=ahead is not None
            )
            if img.rules >= image.VECTOR_MIN:
                give_back_memory()  # what building the tables freed, before the maps are made
            if plan.new_map or old is None:
                sockets: Map[Any, Any] = _create_map(
                    BPF_MAP_TYPE_SOCKMAP, U64, plan.capacity, "sockets", 0
                )
            else:
                sockets = Map(os.dup(old.sockets.fd), U32, U64)
        except BaseException:
            if ahead is not None:
                ahead.discard()
            raise
        gen = build(img, sockets, ahead.take() if ahead is not None else {})
        faults.point("commit.built")
        path = os.path.join(self.path, f"{GEN_PREFIX}{gen.program.info().id}")
        owner = {t.slot + i: t for t in plan.targets.values() for i in range(t.slots)}
        filled: list[int] = []
        try:
            gen.pin(path)
            faults.point("commit.pinned")
            for slot, cookie in plan.fills.items():
                t = owner[slot]
                try:
                    fd = socket_fd(cookie, t.proto)
                    gen.sockets.update(U32(slot), U64(fd))
                except SklookupError as e:
                    e.message = f"target {t.name}: {e.message}"  # which socket it was
                    raise
                except BpfError as e:
                    raise EnvironmentProblem(
                        f"target {t.name}: the kernel refused its socket in the SOCKMAP: "
                        f"{e.strerror}",
                        "it must be a listening TCP or bound unconnected UDP socket",
                    ) from None
                filled.append(slot)
            faults.point("commit.filled")
            # no carry yet: a command killed between the switch and its carry leaves the old
            # generation pinned, from which readers make the carry themselves
            # (Dispatcher.counts) until the next writer's repair makes it
            interrupts.hold()  # a switch that happened is never undone, nor reported as failed
            self._switch(gen, old, plan.attach, ns)
        except BaseException:
            interrupts.release()
            if not plan.new_map:
                for slot in filled:
                    with contextlib.suppress(BpfError):
                        _empty_slot(gen.sockets, slot)
            gen.close()
            unpin_dir(path)
            raise
        self.gen = gen
        notes = []
        try:
            faults.point("commit.switched")
            if old is not None:
                self._retire(old, [] if plan.new_map else plan.frees)
        except Exception as e:
            notes.append(
                f"the change is live, but removing the previous generation failed ({e}); the "
                "next sklookupctl command finishes it"
            )
        caught = interrupts.done()
        if caught:
            notes.append(
                f"{' and '.join(caught)} arrived after the switch: the change was finished first"
            )
        return notes

    def expect(self, rules: int) -> None:
        """The command expects to commit a generation of `rules` rules: a large one's per-CPU
        counters, which take the kernel a while to allocate (0.08-0.15 s per 100,000 rules
        here), are
        made from now on by another thread, while this one plans (and imports numpy). A commit
        of another size discards them and makes its own."""
        if self.ahead is None and rules >= image.VECTOR_MIN:
            self.ahead = _Ahead(rules)

    def _ahead_for(self, rules: int) -> _Ahead | None:
        """The counters of a generation of `rules` rules being made by another thread (made
        ahead by `expect`, or started now, while this thread builds the tables); None for a
        small rule set."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead.rules != rules:
            ahead.discard()
            ahead = None
        if ahead is None and rules >= image.VECTOR_MIN:
            ahead = _Ahead(rules)
        return ahead

    def _switch(self, gen: Generation, old: Generation | None, attach: bool, ns: Netns) -> None:
        """Make `gen` live: one BPF_LINK_UPDATE, or (first generation, or a detached link) a
        new link, pinned."""
        if not attach:
            assert self.link is not None and old is not None
            try:
                self.link.update(gen.program, old.program)
            except BpfError as e:
                if e.errno == errno.ENOLINK:
                    raise EnvironmentProblem(
                        "the dispatcher's link was detached by something else while this "
                        "command ran; nothing changed",
                        "run the command again: it attaches the dispatcher again",
                    ) from None
                raise
            return
        try:
            link = Link.create_netns(gen.program, ns.fd)
        except BpfError as e:
            hint = (
                "a netns holds at most 64 sk_lookup links"
                if e.errno == errno.E2BIG
                else "the kernel needs sk_lookup support (5.9+)"
            )
            raise EnvironmentProblem(f"cannot attach to {ns.label}: {e.strerror}", hint) from None
        pin = os.path.join(self.path, "link")
        nxt = os.path.join(self.path, LINK_NEXT)
        try:
            faults.point("commit.linked")
            if self.link is None:
                link.pin(pin)
            else:
                # the old link no longer runs (something else detached it): the new one is
                # pinned beside it and renamed over it, so a kill in between leaves a link
                # that `open` finds and `repair` renames
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(nxt)
                link.pin(nxt)
                faults.point("commit.relinked")
                os.rename(nxt, pin)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(nxt)
            link.close()  # unpinned: closing it detaches it
            raise
        if self.link is not None:
            self.link.close()
        self.link = link

    def _retire(self, old: Generation, frees: list[int]) -> None:
        """After a switch: carry the old generation's counters over, empty its slots the new
        one does not use, remove it."""
        assert self.gen is not None
        _carry_counters(old, self.gen)
        faults.point("retire.carried")
        for slot in frees:
            _empty_slot(self.gen.sockets, slot)
        faults.point("retire.freed")
        old.close()
        if old.path:
            unpin_dir(old.path)
        faults.point("retire.unpinned")

    def repair(self) -> bool:
        """Finish what a killed writer left. False when nothing here was ever committed (no
        link): the directory is removed. Otherwise generations beside the live one are retired:
        the newest one the live generation replaced gives its counters, and the slots any of
        them filled in the live SOCKMAP that the live generation does not use are emptied."""
        if self.link is None or self.gen is None:
            self.close()
            unpin_dir(self.path)
            return False
        nxt = os.path.join(self.path, LINK_NEXT)
        if os.path.exists(nxt):
            if self.link.info().netns_ino:  # the new link of a killed re-attach: into place
                os.rename(nxt, os.path.join(self.path, "link"))
            else:
                os.unlink(nxt)
        self.untrace(force=False)
        for tdir in self.dead_traces():
            unpin_dir(tdir)
        if not self.stale:
            return True
        live = self.gen
        used = {s for t in live.targets() for s in t.block()}
        live_map = live.sockets.info().id
        frees: set[int] = set()
        sweep = False
        superseded: list[Generation] = []
        for p in self.stale:
            try:
                g = Generation.open(p)
            except (EnvironmentProblem, OSError):
                sweep = True  # half removed: which slots it filled is unknown
                unpin_dir(p)
                continue
            if g.sockets.info().id == live_map:
                frees |= {s for t in g.targets() for s in t.block()} - used
            if g.meta().generation < live.meta().generation:
                superseded.append(g)
            else:  # built, never live
                g.close()
                unpin_dir(p)
        superseded.sort(key=lambda g: g.meta().generation)
        if superseded:
            # the newest one holds the counters of those before it
            _carry_counters(superseded[-1], live)
        if sweep:
            capacity = live.sockets.info().max_entries
            frees |= set(range(capacity)) - used
        for slot in sorted(frees):
            _empty_slot(live.sockets, slot)
        for g in superseded:
            g.close()
            unpin_dir(g.path or "")
        self.stale = []
        return True

    def remove(self) -> None:
        """Detach our link (never anyone else's) and remove the directory. The link's pin goes
        first: if this command dies after it, nothing keeps the link and it detaches."""
        if self.traced is not None:
            self.traced.close()  # the link goes with whatever it runs
            self.tracing, self.traced = None, None
        if self.link is not None:
            for name in ("link", LINK_NEXT):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, name))
            faults.point("remove.unlinked")
            with contextlib.suppress(BpfError):
                self.link.detach()
            faults.point("remove.detached")
        self.close()
        unpin_dir(self.path)


# -- every namespace --------------------------------------------------------------------------


@dataclass
class Entry:
    """One namespace's state, as `status --all` and `gc` see it."""

    path: str
    cookie: int
    inode: int
    label: str
    state: str  # steering | detached | dead | unfinished | damaged | other-layout
    generation: int = 0
    rules: int = 0
    targets: int = 0
    stale: int = 0  # generation directories beside the live one
    problem: str = ""
    dead_traces: int = 0  # left by a `trace` that was killed


class Store:
    """<bpffs>/sklookupctl, locked: exclusive for writers, shared for readers."""

    def __init__(self, bpffs: str, base: str, exclusive: bool) -> None:
        self.bpffs = bpffs
        self.base = base
        self.exclusive = exclusive

    @classmethod
    @contextlib.contextmanager
    def locked(cls, bpffs: str, exclusive: bool, wait: float = DEFAULT_WAIT) -> Iterator[Store]:
        """Hold the lock for the block, waiting at most `wait` seconds for it (then Busy).
        The state directory is made (0700, root's) by writers, and refused when someone else
        could have made or changed it. Readers of a bpffs where nothing was ever made get a
        store with nothing in it (and make nothing)."""
        base = base_dir(bpffs)
        store = cls(bpffs, base, exclusive)
        fd = trust.open_state_dir(bpffs, base, create=exclusive)
        if fd is None:
            yield store
            return
        try:
            lock = trust.open_lock(fd, base)
            turn = trust.open_turn(lock, base) if lock != fd else None
            try:
                with trust.locked_fairly(lock, turn, base, exclusive, wait):
                    yield store
            finally:
                if turn is not None:
                    os.close(turn)
                if lock != fd:
                    os.close(lock)
        finally:
            os.close(fd)

    def path_of(self, ns: Netns) -> str:
        return os.path.join(self.base, f"{NS_PREFIX}{ns.cookie()}")

    def open(self, ns: Netns, legacy_ok: bool = False) -> Dispatcher | None:
        """The namespace's state as it is; None when there is none. State of another version
        is refused (unless `legacy_ok`: upgrade builds this version's beside it)."""
        if not legacy_ok:
            self._refuse_legacy(ns)
        path = self.path_of(ns)
        if not os.path.lexists(path):
            return None
        if not trust.check_entry(path):
            raise Untrusted(
                f"{path} is not a directory made by root",
                "check who made it; `sklookupctl detach --all` removes it",
            )
        return Dispatcher.open(path, ns.cookie(), readonly=not self.exclusive)

    def open_for_write(self, ns: Netns, legacy_ok: bool = False) -> Dispatcher | None:
        """The namespace's dispatcher, repaired; None when there is none (what a killed first
        commit left is removed). A traced copy the link runs whose tracer is gone is replaced
        by the plain program (a live trace goes on until this writer commits a change)."""
        assert self.exclusive
        d = self.open(ns, legacy_ok)
        if d is None:
            return None
        try:
            d.untrace(force=False)
            if not d.repair():
                return None
        except BaseException:
            d.close()
            raise
        return d

    def create(self, ns: Netns) -> Dispatcher:
        """An empty directory for a namespace's first commit."""
        path = self.path_of(ns)
        os.mkdir(path, 0o700)
        return Dispatcher(path, ns.cookie())

    def discard(self, d: Dispatcher) -> None:
        """Remove a directory whose first commit failed (nothing of it went live)."""
        d.close()
        unpin_dir(d.path)

    # -- state made by layout 3 (directories named by inode), still read for what it is

    def legacy_path(self, ns: Netns) -> str | None:
        path = os.path.join(self.base, str(ns.inode))
        return path if os.path.isdir(path) else None

    def _refuse_legacy(self, ns: Netns) -> None:
        path = self.legacy_path(ns)
        if path is not None and os.path.isdir(self.path_of(ns)):
            # an upgrade got as far as this version's state (it steers): the old one is what
            # is left of it, removed by the next writer
            if self.exclusive:
                self.remove_legacy(ns)
            return
        if path is not None and _legacy_cookie(path) in (ns.cookie(), None):
            raise EnvironmentProblem(
                f"state in {path} has another layout, this version uses {layout.LAYOUT_VERSION}",
                OTHER_VERSION,
            )

    def remove_legacy(self, ns: Netns) -> bool:
        """Detach and remove this namespace's state of layout 3, if any."""
        path = self.legacy_path(ns)
        if path is None:
            return False
        _detach_pinned(os.path.join(path, "link"), ns.inode)
        unpin_dir(path)
        return True

    # -- every namespace

    def entries(self) -> list[Entry]:
        """The state of every namespace sklookupctl has steered, whatever became of it."""
        if not os.path.isdir(self.base):
            return []
        out = []
        for name in sorted(os.listdir(self.base)):
            path = os.path.join(self.base, name)
            if name.startswith(NS_PREFIX) and name[len(NS_PREFIX) :].isdigit():
                out.append(self._entry(path, int(name[len(NS_PREFIX) :])))
            elif name.isdigit():
                out.append(_legacy_entry(path, int(name)))
        return out

    def _entry(self, path: str, cookie: int) -> Entry:
        e = Entry(path, cookie, 0, "", "unfinished")
        try:
            if not trust.check_entry(path):
                raise Untrusted(f"{path} is not a directory made by root")
            d = Dispatcher.open(path, cookie, readonly=not self.exclusive)
        except EnvironmentProblem as err:
            e.state, e.problem = "damaged", err.message
            if not _runs(os.path.join(path, "link")) and find_cookie(cookie) is None:
                e.state = "damaged-dead"  # and its namespace is gone: nothing to keep
            return e
        with d:
            e.state, e.stale = d.state, len(d.stale)
            e.dead_traces = len(d.dead_traces()) + (
                d.tracing is not None and not tracer_alive(d.tracing)
            )
            if d.gen is not None:
                meta = d.gen.meta()
                e.inode, e.label = int(meta.netns_inode), meta.label.decode(errors="replace")
                e.generation, e.rules, e.targets = int(meta.generation), meta.rules, meta.targets
            for p in d.stale if d.gen is None else []:
                # unfinished: which namespace it was for, from a generation it built
                with (
                    contextlib.suppress(EnvironmentProblem, OSError),
                    Generation.open(p, readonly=True) as g,
                ):
                    meta = g.meta()
                    e.inode, e.label = int(meta.netns_inode), meta.label.decode(errors="replace")
                    break
        if e.state == "detached" and find_alive(e.inode, cookie) is None:
            e.state = "dead"
        return e

    def gc(self) -> list[Entry]:
        """Remove the state of namespaces that are gone and what killed commands left; retire
        stale generations. Returns what was removed or repaired (state as found)."""
        assert self.exclusive
        done = []
        for e in self.entries():
            if e.state in ("dead", "unfinished", "other-layout-dead", "damaged-dead"):
                # nothing of it steers: a namespace that is gone, or a first commit or a
                # `detach --all` that was killed
                unpin_dir(e.path)
                done.append(e)
            elif e.state in ("steering", "detached") and (e.stale or e.dead_traces):
                with Dispatcher.open(e.path, e.cookie) as d:
                    d.repair()
                e.problem = ", ".join(
                    what
                    for n, what in (
                        (e.stale, "stale generations retired"),
                        (e.dead_traces, "a killed trace ended"),
                    )
                    if n
                )
                done.append(e)
        return done


class Session:
    """One command's hold on a namespace's state, under the lock: made by `session`. The
    namespace's first commit makes its directory (and removes it again if it fails), so callers
    never choose between opening and creating."""

    def __init__(self, store: Store, ns: Netns, dispatcher: Dispatcher | None) -> None:
        self.store = store
        self.ns = ns
        self.dispatcher = dispatcher
        self.damaged: EnvironmentProblem | None = None  # state that could not be opened

    @property
    def live(self) -> Live:
        """What steers (or steered: a detached link's rules); nothing for no dispatcher or
        what a killed first commit left."""
        d = self.dispatcher
        return d.snapshot() if d is not None and d.gen is not None else NOTHING

    def note_source(self, digest: str) -> None:
        """The live generation's rules are those of the rule file whose digest is `digest`
        (Generation.note_source); best effort: the note only saves the next apply of the same
        file a whole read."""
        d = self.dispatcher
        if d is None or d.gen is None:
            return
        with contextlib.suppress(BpfError, OSError):
            d.gen.note_source(digest)

    def live_lazily(self) -> Live:
        """`live`, its rules decoded only if they are looked at within the session (a plan
        that keeps them as they are never does)."""
        d = self.dispatcher
        return d.snapshot(lazy=True) if d is not None and d.gen is not None else NOTHING

    def expect(self, rules: int) -> None:
        """The command expects to commit a generation of `rules` rules (Dispatcher.expect);
        nothing for a first commit."""
        assert self.store.exclusive
        d = self.dispatcher
        if d is not None and d.gen is not None:
            d.expect(rules)

    def commit(self, plan: Plan, socket_fd: Callable[[int, str], int]) -> list[str]:
        """Make `plan` live (see Dispatcher.commit); returns notes for the operator."""
        assert self.store.exclusive
        d = self.dispatcher
        live = d.gen.meta().generation if d is not None and d.gen is not None else 0
        meta = image.MetaInfo(live + 1, self.ns.cookie(), self.ns.inode, self.ns.label)
        if d is not None:
            return d.commit(plan, meta, self.ns, socket_fd)
        d = self.store.create(self.ns)
        try:
            notes = d.commit(plan, meta, self.ns, socket_fd)
        except BaseException:
            self.store.discard(d)
            raise
        self.dispatcher = d
        return notes

    def remove(self) -> str:
        """Detach and remove everything sklookupctl keeps for the namespace (other tools'
        links stay); says what was there."""
        assert self.store.exclusive
        legacy = self.store.remove_legacy(self.ns)
        if self.damaged is not None:
            # incomplete or foreign state: detach its link now (unpinning alone releases the
            # link only later, from a kernel work queue), then remove the pins
            path = self.store.path_of(self.ns)
            _detach_pinned(os.path.join(path, "link"), self.ns.inode)
            unpin_dir(path)
            return "damaged state directory"
        if self.dispatcher is None:
            return "state of another layout" if legacy else ""
        self.dispatcher.remove()
        self.dispatcher = None
        return "dispatcher and all rules"


@contextlib.contextmanager
def session(
    bpffs: str,
    ns: Netns,
    write: bool,
    damaged_ok: bool = False,
    wait: float = DEFAULT_WAIT,
    legacy_ok: bool = False,
) -> Iterator[Session]:
    """Hold the namespace's state for one command: the lock (exclusive for writers, shared for
    readers), and its dispatcher if it has one. Writers first remove dead namespaces' state and
    repair what killed commands left; readers see the state as it is. State that cannot be
    opened (another layout, incomplete) is refused, unless `damaged_ok` (to remove it)."""
    with Store.locked(bpffs, exclusive=write, wait=wait) as store:
        if write:
            store.gc()
        try:
            d = store.open_for_write(ns, legacy_ok) if write else store.open(ns, legacy_ok)
        except EnvironmentProblem as e:
            if not damaged_ok:
                raise
            s = Session(store, ns, None)
            s.damaged = e
        else:
            s = Session(store, ns, d)
        try:
            yield s
        finally:
            if s.dispatcher is not None:
                s.dispatcher.close()


def tracer_alive(path: str) -> bool:
    """Whether the `trace` that made this trace directory still runs: it holds an flock on the
    directory for as long as it does (the kernel drops it when the process dies, however)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def tracer_pid(path: str) -> int | None:
    """The pid of the `trace` running on this trace directory, if it can be found."""
    try:
        pids = trust.lock_holders(os.stat(path))
    except OSError:
        return None
    return pids[0] if pids else None


@dataclass
class Tracing:
    """A traced copy of a generation's program, swapped in by Dispatcher.trace. `stop` swaps
    the plain program back (needing no lock: the swap is one BPF_LINK_UPDATE that only happens
    while the link still runs the traced copy) and removes the trace directory."""

    path: str  # the trace directory (flocked by `lock` until stop)
    lock: int
    program: Program
    events: RingBuffer
    lost: Map[Any, Any]
    plain: Program
    link: Link
    gen_id: int

    def running(self) -> bool:
        """Whether the link still runs the traced copy in its namespace (a writer puts the
        plain one back; `detach --all` detaches the link)."""
        try:
            info = self.link.info()
            return bool(info.netns_ino and info.prog_id == self.program.info().id)
        except OSError:
            return False

    def lost_count(self) -> int:
        raw = self.lost.lookup_batch_raw(1, 8 * possible_cpus())
        return sum(int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8))

    def stop(self) -> None:
        if self.lock < 0:
            return
        faults.point("trace.stopping")
        with contextlib.suppress(BpfError):  # it no longer runs the traced copy
            self.link.update(self.plain, self.program)
        unpin_dir(self.path)
        os.close(self.lock)
        self.lock = -1
        for fd in (self.program, self.events, self.lost, self.plain, self.link):
            fd.close()


def _open_link(pin: str) -> Link | None:
    try:
        return Link.from_pin(pin)
    except FileNotFoundError:
        return None


def _runs(pin: str) -> bool:
    """Whether the link pinned there runs in a namespace."""
    try:
        with Link.from_pin(pin) as link:
            return bool(link.info().netns_ino)
    except OSError:
        return False


def _detach_pinned(pin: str, inode: int) -> None:
    """Detach the link pinned at `pin` if it runs in the namespace with this inode (or in none
    any more). Best effort: its directory is going anyway."""
    try:
        link = Link.from_pin(pin)
    except OSError:
        return
    with link, contextlib.suppress(BpfError):
        if link.info().netns_ino in (inode, 0):
            link.detach()


def _legacy_cookie(path: str) -> int | None:
    """The netns cookie recorded by layout 3 state (its meta: layout, rules, cookie), or None
    when it cannot be read."""
    try:
        with Link.from_pin(os.path.join(path, "link")) as link:
            prog_id = link.info().prog_id
        meta: Map[Any, Any] = Map.from_pin(
            os.path.join(path, f"{GEN_PREFIX}{prog_id}", "meta"), U32, ctypes.c_uint8 * 24
        )
        with meta:
            v = meta.lookup(U32(0))
        return None if v is None else int.from_bytes(bytes(v)[8:16], "little")
    except (OSError, EnvironmentProblem):
        return None


def _legacy_entry(path: str, inode: int) -> Entry:
    e = Entry(path, _legacy_cookie(path) or 0, inode, "", "other-layout")
    e.problem = OTHER_VERSION
    try:
        with Link.from_pin(os.path.join(path, "link")) as link:
            attached = bool(link.info().netns_ino)
    except OSError:
        attached = False
    if not attached and (not e.cookie or find_alive(inode, e.cookie) is None):
        e.state = "other-layout-dead"
    return e
