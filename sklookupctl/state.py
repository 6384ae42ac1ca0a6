"""The dispatcher's state in bpffs: one directory per network namespace, and its lock.

    <bpffs>/sklookupctl/<netns inode>/   program, link, and one pin per map

All state lives there; there is no daemon. A new directory is built under a staging name
(bpffs allows no dots in names), attached, then renamed into place, so a load either fully
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
from collections.abc import Iterator
from dataclasses import dataclass

from . import layout
from .bpfsys import BpfError, Link, Map, Program, is_bpffs
from .errors import EnvironmentProblem, PermissionDenied, RuleConflict
from .layout import (
    Config,
    LpmKey,
    LpmValue,
    RuleKey,
    RuleValue,
    Segment,
    TargetInfo,
)
from .netns import Netns
from .rules import (
    DROP,
    PROTO_NAMES,
    PROTOCOLS,
    STEER,
    IPAddress,
    Rule,
    RuleSet,
)
from .rules import RuleKey as ModelKey

PIN_NAMES = ("link", "program", *layout.MAP_NAMES)
TOP = "sklookupctl"


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
    for name in os.listdir(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, name))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


class Dispatcher:
    """The pinned program, link and maps of one netns. Owns their fds."""

    def __init__(self, path: str, program: Program, link: Link | None, maps: dict[str, int]):
        self.path = path
        self.program = program
        self.link = link
        self.sockets: Map[ctypes.c_uint32, ctypes.c_uint64] = Map(
            maps["sockets"], ctypes.c_uint32, ctypes.c_uint64
        )
        self.prefixes: Map[LpmKey, LpmValue] = Map(maps["prefixes"], LpmKey, LpmValue)
        self.segments: Map[ctypes.c_uint32, Segment] = Map(
            maps["segments"], ctypes.c_uint32, Segment
        )
        self.config: Map[ctypes.c_uint32, Config] = Map(maps["config"], ctypes.c_uint32, Config)
        self.rules: Map[RuleKey, RuleValue] = Map(maps["rules"], RuleKey, RuleValue)
        self.targets: Map[ctypes.c_uint32, TargetInfo] = Map(
            maps["targets"], ctypes.c_uint32, TargetInfo
        )

    def _maps(self) -> list[Map[object, object]]:
        return [self.sockets, self.prefixes, self.segments, self.config, self.rules, self.targets]  # type: ignore[list-item]

    def close(self) -> None:
        self.program.close()
        if self.link is not None:
            self.link.close()
        for m in self._maps():
            m.close()

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str) -> Dispatcher:
        """Open the pinned state in `path`, checking every map has the shape we expect."""
        fds: dict[str, int] = {}
        prog = link = None
        try:
            for name in layout.MAP_NAMES:
                m: Map[object, object] = Map.from_pin(os.path.join(path, name), object, object)
                info = m.info()
                want = layout.MAP_SHAPES[name]
                got = (info.key_size, info.value_size, info.max_entries)
                if got != want:
                    m.close()
                    raise EnvironmentProblem(
                        f"pinned map {path}/{name} has shape {got}, this version expects {want}",
                        "it was made by another sklookupctl version: run `sklookupctl detach "
                        "--all` with that version, then attach again",
                    )
                fds[name] = m.fd
                m.fd = -1
            prog = Program.from_pin(os.path.join(path, "program"))
            with contextlib.suppress(FileNotFoundError):
                link = Link.from_pin(os.path.join(path, "link"))
        except BaseException as e:
            for fd in fds.values():
                os.close(fd)
            if prog is not None:
                prog.close()
            if isinstance(e, FileNotFoundError):
                raise EnvironmentProblem(
                    f"incomplete sklookupctl state in {path}: {e.filename} is missing",
                    "run `sklookupctl detach --all` to clear it, then attach again",
                ) from None
            raise
        d = cls(path, prog, link, fds)
        cfg = d.read_config()
        if cfg.layout != layout.LAYOUT_VERSION:
            d.close()
            raise EnvironmentProblem(
                f"state in {path} has layout {cfg.layout}, this version uses "
                f"{layout.LAYOUT_VERSION}",
                "run `sklookupctl detach --all` with the version that made it, then attach again",
            )
        return d

    def read_config(self) -> Config:
        cfg = self.config.lookup(ctypes.c_uint32(0))
        assert cfg is not None  # an array of one always has its element
        return cfg

    def link_netns_inode(self) -> int:
        """Inode of the netns the link is attached to; 0 when detached."""
        if self.link is None:
            return 0
        return int(self.link.info().netns_ino)

    # -- reading ------------------------------------------------------------------------------

    def read_targets(self) -> dict[str, Target]:
        out: dict[str, Target] = {}
        for k, v in self.targets.items():
            name = v.name.decode()
            out[name] = Target(
                int(k.value),
                name,
                PROTO_NAMES[v.proto],
                v.family,
                _addr_from(bytes(v.addr), v.family),
                v.port,
                v.cookie,
            )
        return out

    def read_rules(self, targets: dict[str, Target]) -> tuple[RuleSet, dict[ModelKey, int]]:
        """The rule set, and each rule's id (for counters and segments)."""
        by_id = {t.id: t.name for t in targets.values()}
        rs = RuleSet()
        ids: dict[ModelKey, int] = {}
        for k, v in self.rules.items():
            addr = _addr_from(bytes(k.addr), k.family)
            net = ipaddress.ip_network(f"{addr}/{k.prefixlen}")
            key = ModelKey(PROTO_NAMES[k.proto], net, k.port_lo, k.port_hi)
            on_missing = "pass" if v.on_missing == layout.MISSING_PASS else "drop"
            if v.action == layout.ACTION_DROP:
                rule = Rule(key, DROP, None, on_missing)
            else:
                rule = Rule(key, STEER, by_id.get(v.target, f"#{v.target}"), on_missing)
            rs.rules[key] = rule
            ids[key] = int(v.id)
        return rs, ids

    def socket_cookie(self, target_id: int) -> int | None:
        """Cookie of the socket in the SOCKMAP slot, None when it is gone."""
        v = self.sockets.lookup(ctypes.c_uint32(target_id))
        return None if v is None else int(v.value)

    # -- writing ------------------------------------------------------------------------------

    def put_target(self, target: Target, sock_fd: int | None) -> None:
        """Record a target and (re)place its socket. Call before any rule points at it."""
        if sock_fd is not None:
            try:
                self.sockets.update(ctypes.c_uint32(target.id), ctypes.c_uint64(sock_fd))
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
        self.targets.update(ctypes.c_uint32(target.id), info)

    def drop_target(self, target_id: int) -> None:
        self.sockets.delete(ctypes.c_uint32(target_id))
        self.targets.delete(ctypes.c_uint32(target_id))

    def commit(self, rs: RuleSet, ids: dict[ModelKey, int], targets: dict[str, Target]) -> None:
        """Make `rs` the rule set: build the other generation, switch to it, clean up.

        A lookup sees the old set or the new one: the switch is one update of config.gen.
        """
        compiled = rs.compile()
        if compiled.segment_count() > layout.SEGMENTS_PER_GEN:
            raise RuleConflict(
                f"the rule set needs {compiled.segment_count()} segments, more than the "
                f"{layout.SEGMENTS_PER_GEN} this version holds",
                "use fewer rules",
            )
        if len(compiled.prefixes) * 2 > layout.MAX_PREFIXES:
            raise RuleConflict(f"too many prefixes ({len(compiled.prefixes)})", "use fewer rules")
        next_id = max(ids.values(), default=0) + 1
        for key in rs.rules:
            if key not in ids:
                ids[key] = next_id
                next_id += 1
        target_ids = {name: t.id for name, t in targets.items()}

        cfg = self.read_config()
        old_gen, new_gen = cfg.gen, 1 - cfg.gen
        self._clear_gen(new_gen)
        base = new_gen * layout.SEGMENTS_PER_GEN
        pos = base
        for (proto, net), segs in compiled.prefixes.items():
            start = pos
            for s in segs:
                rec = Segment(lo=s.lo)
                if s.rule is None:
                    rec.action = layout.ACTION_NONE
                else:
                    rec.rule = ids[s.rule.key]
                    rec.on_missing = (
                        layout.MISSING_PASS if s.rule.on_missing == "pass" else layout.MISSING_DROP
                    )
                    if s.rule.action == DROP:
                        rec.action = layout.ACTION_DROP
                    else:
                        rec.action = layout.ACTION_STEER
                        rec.target = target_ids[s.rule.target or ""]
                self.segments.update(ctypes.c_uint32(pos), rec)
                pos += 1
            self.prefixes.update(
                self._lpm_key(new_gen, proto, net), LpmValue(start=start, count=len(segs))
            )
        cfg.gen = new_gen
        self.config.update(ctypes.c_uint32(0), cfg)
        self._clear_gen(old_gen)

        # the rule set itself, written after the switch: re-running a command that died before
        # this point finds the rule missing and does the work again
        wanted = {bytes(self._rule_key(k)): k for k in rs.rules}
        for rk in self.rules.keys():
            if bytes(rk) not in wanted:
                self.rules.delete(rk)
        for mk in wanted.values():
            r = rs.rules[mk]
            rk = self._rule_key(mk)
            val = RuleValue(
                id=ids[mk],
                on_missing=layout.MISSING_PASS if r.on_missing == "pass" else layout.MISSING_DROP,
            )
            if r.action == DROP:
                val.action = layout.ACTION_DROP
            else:
                val.action = layout.ACTION_STEER
                val.target = target_ids[r.target or ""]
            self.rules.update(rk, val)

    @staticmethod
    def _lpm_key(
        gen: int, proto: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network
    ) -> LpmKey:
        k = LpmKey(
            prefixlen=32 + net.prefixlen,
            gen=gen,
            proto=PROTOCOLS[proto],
            family=socket.AF_INET if net.version == 4 else socket.AF_INET6,
        )
        k.addr[:] = list(_addr_bytes(net.network_address))
        return k

    @staticmethod
    def _rule_key(k: ModelKey) -> RuleKey:
        rk = RuleKey(
            proto=PROTOCOLS[k.proto],
            family=k.family,
            prefixlen=k.prefix.prefixlen,
            port_lo=k.lo,
            port_hi=k.hi,
        )
        rk.addr[:] = list(_addr_bytes(k.prefix.network_address))
        return rk

    def _clear_gen(self, gen: int) -> None:
        for k in self.prefixes.keys():
            if k.gen == gen:
                self.prefixes.delete(k)


def create(path: str, ns: Netns) -> Dispatcher:
    """Compile, load and pin a fresh dispatcher into `path` (a staging dir), not yet attached."""
    from . import compiler

    loaded = compiler.load()
    os.mkdir(path, 0o700)
    try:
        for name, fd in loaded.maps.items():
            Map(os.dup(fd), object, object).pin(os.path.join(path, name))
        loaded.program.pin(os.path.join(path, "program"))
        d = Dispatcher(
            path,
            Program(os.dup(loaded.program.fd)),
            None,
            {n: os.dup(fd) for n, fd in loaded.maps.items()},
        )
        d.config.update(
            ctypes.c_uint32(0),
            Config(gen=0, layout=layout.LAYOUT_VERSION, netns_cookie=ns.cookie()),
        )
        return d
    except BaseException:
        unpin_dir(path)
        raise
    finally:
        loaded.close()


def attach_link(d: Dispatcher, ns: Netns) -> None:
    """Attach the program to `ns` and pin the link next to it."""
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
