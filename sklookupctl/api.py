"""The library facade: what the CLI does, usable without it.

Every function takes the target namespace (`netns`: a name, a path, or None for the caller's)
and the bpffs directory, and raises SklookupError subclasses with a hint.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import layout, sockets, state
from .bpfsys import BpfError, query_netns_programs
from .errors import (
    EnvironmentProblem,
    InvalidArgument,
    NotFound,
    NotLoaded,
    PermissionDenied,
    RuleConflict,
    SklookupError,
    SocketRejected,
)
from .netns import Netns, open_netns
from .rules import (
    ON_MISSING,
    IPAddress,
    Rule,
    RuleKey,
    RuleSet,
    check_name,
    format_endpoint,
    format_ports,
    make_rule,
    parse_endpoint,
    parse_ports,
    parse_prefix,
    parse_protocol,
)
from .state import Dispatcher, Target

if TYPE_CHECKING:
    from . import rulefile

DEFAULT_BPFFS = "/sys/fs/bpf"

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_SYS_PTRACE = 19
CAP_BPF = 39


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def require_privileges() -> None:
    caps = _effective_caps()
    needed = {"CAP_SYS_ADMIN": CAP_SYS_ADMIN, "CAP_NET_ADMIN": CAP_NET_ADMIN, "CAP_BPF": CAP_BPF}
    missing = [n for n, bit in needed.items() if not caps & (1 << bit)]
    if missing:
        raise PermissionDenied(
            f"sklookupctl needs root here (missing {', '.join(missing)})", "run it with sudo"
        )


@dataclass
class AttachResult:
    rule: Rule
    changed: bool
    loaded: bool  # this call loaded the dispatcher into the netns
    netns: str
    target: str | None = None
    socket: str = ""  # where the target's socket listens, and who holds it
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "netns": self.netns,
            "rule": _rule_json(self.rule, None),
            "changed": self.changed,
            "loaded_dispatcher": self.loaded,
            "target": self.target,
            "socket": self.socket,
            "notes": self.notes,
        }


def _rule_json(r: Rule, counters: dict[str, int] | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "protocol": r.key.proto,
        "prefix": str(r.key.prefix),
        "ports": format_ports(r.key.lo, r.key.hi),
        "action": r.action,
        "target": r.target,
        "on_missing": r.on_missing,
    }
    if counters is not None:
        out["counters"] = counters
    return out


def _open_existing(base: str, ns: Netns, writer: bool) -> Dispatcher | None:
    """The netns's dispatcher, None if there is none. A directory left by a dead namespace
    that had the same inode is removed (writers) or ignored (readers)."""
    path = state.netns_dir(base, ns)
    if not os.path.isdir(path):
        return None
    d = Dispatcher.open(path)
    if d.netns_cookie != ns.cookie():
        d.close()
        if writer:
            state.unpin_dir(path)
        return None
    if d.link_netns_inode() != ns.inode:
        d.close()
        raise EnvironmentProblem(
            f"the dispatcher in {ns.label} was detached by something other than sklookupctl",
            "run `sklookupctl detach --all`, then attach again",
        )
    return d


def _acquire(
    ns: Netns, proto: str, to: str | None, pid: int | None, fd: int | None
) -> tuple[sockets.SocketInfo, tuple[IPAddress, int]]:
    """The socket, and the address the target is known by (--to as given, else its own)."""
    if to is not None:
        addr, port = parse_endpoint(to)
        return sockets.acquire_by_address(ns, proto, addr, port), (addr, port)
    assert pid is not None and fd is not None
    info = sockets.acquire_by_fd(ns, pid, fd)
    if info.proto != proto:
        info.close()
        raise SocketRejected(
            f"fd {fd} of pid {pid} is a {info.proto} socket, the rule is {proto}",
            f"give a {proto} socket or change the rule's protocol",
        )
    return info, (info.addr, info.port)


def _check_family(rule: Rule, info: sockets.SocketInfo) -> None:
    v = rule.key.version
    if v == 6 and info.family == socket.AF_INET:
        raise SocketRejected(
            f"the socket at {info.endpoint} is IPv4 and cannot take IPv6 rule {rule.key}",
            "use an IPv6 socket for IPv6 prefixes",
        )
    if v == 4 and info.v6only:
        raise SocketRejected(
            f"the socket at {info.endpoint} is IPv6-only (IPV6_V6ONLY) and cannot take IPv4 "
            f"rule {rule.key}",
            "use an IPv4 socket, or a dual-stack IPv6 one bound to [::]",
        )


def _free_id(targets: dict[str, Target], taken: set[int] | None = None) -> int:
    used = {t.id for t in targets.values()} | (taken or set())
    for i in range(layout.MAX_TARGETS):
        if i not in used:
            return i
    raise RuleConflict(
        f"all {layout.MAX_TARGETS} target slots are in use",
        "detach rules whose targets are no longer needed",
    )


def attach(
    netns: str | None,
    proto: str,
    prefix: str,
    ports: str,
    *,
    to: str | None = None,
    pid: int | None = None,
    fd: int | None = None,
    drop: bool = False,
    name: str | None = None,
    on_missing: str = "drop",
    replace: bool = False,
    bpffs: str = DEFAULT_BPFFS,
) -> AttachResult:
    """Add (or with `replace`, change) one rule; load the dispatcher on first use."""
    modes = sum([to is not None, pid is not None or fd is not None, drop])
    if modes != 1:
        raise InvalidArgument("give exactly one of --to ADDR:PORT, --pid PID --fd FD, or --drop")
    if (pid is None) != (fd is None):
        raise InvalidArgument("--pid and --fd go together", "pass both, or use --to ADDR:PORT")
    if on_missing not in ON_MISSING:
        raise InvalidArgument(f"--on-missing {on_missing!r} is not valid", "use drop or pass")
    if drop and name:
        raise InvalidArgument("--name names a target; a --drop rule has none")
    if drop and on_missing != "drop":
        raise InvalidArgument("--on-missing applies to rules with a target, not to --drop")
    if name is not None:
        check_name(name)
    rule_proto = parse_protocol(proto)
    rule = make_rule(rule_proto, prefix, ports, target="?", drop=drop, on_missing=on_missing)
    require_privileges()

    with open_netns(netns) as ns:
        info: sockets.SocketInfo | None = None
        known_as: tuple[IPAddress, int] | None = None
        try:
            if not drop:
                info, known_as = _acquire(ns, rule_proto, to, pid, fd)
                _check_family(rule, info)
                target_name = name or f"{rule_proto}-{format_endpoint(*known_as)}"
                rule = Rule(rule.key, rule.action, target_name, on_missing)
            return _attach_locked(ns, bpffs, rule, info, replace, known_as)
        finally:
            if info is not None:
                info.close()


def _attach_locked(
    ns: Netns,
    bpffs: str,
    rule: Rule,
    info: sockets.SocketInfo | None,
    replace: bool,
    known_as: tuple[IPAddress, int] | None,
) -> AttachResult:
    result = AttachResult(
        rule,
        changed=False,
        loaded=False,
        netns=ns.label,
        target=rule.target,
        socket=f"{info.endpoint}, {info.holder}" if info else "",
    )
    with state.locked(bpffs, exclusive=True) as base:
        existing = _open_existing(base, ns, writer=True)
        result.loaded = existing is None
        with existing or state.staged(base, ns) as d:
            targets = d.read_targets()
            rs = d.read_rules(targets)
            rule_changed = rs.check_add(rule, replace)
            new_socket = False
            if info is not None and rule.target is not None:
                new_socket = _place_target(d, targets, rule, info, replace, known_as, result)
            if rule_changed:
                rs.add(rule, replace)
                d.commit(rs, targets)
                _gc_targets(d, rs, targets)
            result.changed = rule_changed or new_socket or result.loaded
    return result


def _place_target(
    d: Dispatcher,
    targets: dict[str, Target],
    rule: Rule,
    info: sockets.SocketInfo,
    replace: bool,
    known_as: tuple[IPAddress, int] | None,
    result: AttachResult,
) -> bool:
    """Register the rule's target socket (before any rule points at it). True if it changed."""
    name = rule.target or ""
    existing = targets.get(name)
    if existing is not None and existing.proto != info.proto:
        raise RuleConflict(
            f"target {name} is a {existing.proto} target, the socket is {info.proto}",
            "use another --name",
        )
    addr, port = known_as or (info.addr, info.port)
    if existing is not None and (existing.addr, existing.port) != (addr, port) and not replace:
        raise RuleConflict(
            f"target {name} points at {format_endpoint(existing.addr, existing.port)}",
            "pass --replace to point it elsewhere, or use another --name",
        )
    if (
        existing is not None
        and d.socket_cookie(existing.id) == info.cookie
        and (existing.addr, existing.port) == (addr, port)
    ):
        return False
    tid = existing.id if existing is not None else _free_id(targets)
    target = Target(tid, name, info.proto, info.family, addr, port, info.cookie)
    if existing is not None:
        result.notes.append(f"target {name}: socket registered again ({info.holder})")
    d.put_target(target, info.fd)
    targets[name] = target
    return True


def _gc_targets(d: Dispatcher, rs: RuleSet, targets: dict[str, Target]) -> None:
    used = rs.targets_in_use()
    d.gc_targets({t.id for name, t in targets.items() if name in used})


@dataclass
class DetachResult:
    netns: str
    removed: str
    dispatcher_removed: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "netns": self.netns,
            "removed": self.removed,
            "dispatcher_removed": self.dispatcher_removed,
        }


def detach(
    netns: str | None, proto: str, prefix: str, ports: str, *, bpffs: str = DEFAULT_BPFFS
) -> DetachResult:
    """Remove one rule (and its target when no other rule uses it)."""
    lo, hi = parse_ports(ports)
    key = RuleKey(parse_protocol(proto), parse_prefix(prefix), lo, hi)
    require_privileges()
    with open_netns(netns) as ns, state.locked(bpffs, exclusive=True) as base:
        d = _open_existing(base, ns, writer=True)
        if d is None:
            raise NotLoaded(
                f"no sklookupctl dispatcher in {ns.label}, so no rule {key}",
                "see `sklookupctl status`",
            )
        with d:
            targets = d.read_targets()
            rs = d.read_rules(targets)
            removed = rs.remove(key)
            d.commit(rs, targets)
            _gc_targets(d, rs, targets)
        return DetachResult(ns.label, f"{key} {removed.describe()}", False)


def detach_all(netns: str | None, *, bpffs: str = DEFAULT_BPFFS) -> DetachResult:
    """Detach our dispatcher from the netns and remove its pins. Other tools' links stay."""
    require_privileges()
    with open_netns(netns) as ns, state.locked(bpffs, exclusive=True) as base:
        path = state.netns_dir(base, ns)
        if not os.path.isdir(path):
            return DetachResult(ns.label, "nothing: no dispatcher was attached", False)
        try:
            d = Dispatcher.open(path)
        except EnvironmentProblem:
            # incomplete or foreign-layout state: detach its link now (unpinning alone releases
            # the link only later, from a kernel work queue), then remove the pins
            state.detach_pinned_link(path, ns)
            state.unpin_dir(path)
            return DetachResult(ns.label, "damaged state directory", True)
        with d:
            # a directory left by a dead namespace with this inode has a link that is already
            # detached; LINK_DETACH on it is harmless
            state.remove(d)
        return DetachResult(ns.label, "dispatcher and all rules", True)


def status(netns: str | None, *, bpffs: str = DEFAULT_BPFFS) -> dict[str, Any]:
    """What is loaded in the netns: program, link, rules, targets and their sockets."""
    require_privileges()
    with open_netns(netns) as ns, state.locked(bpffs, exclusive=False) as base:
        out: dict[str, Any] = {"netns": ns.label, "netns_inode": ns.inode, "bpffs": bpffs}
        try:
            attached = query_netns_programs(ns.fd)
        except BpfError as e:
            raise EnvironmentProblem(f"cannot query {ns.label}: {e.strerror}") from None
        d = _open_existing(base, ns, writer=False) if os.path.isdir(base) else None
        if d is None:
            out.update(loaded=False, other_programs=attached, rules=[], targets=[])
            return out
        with d:
            prog_id = int(d.program.info().id)
            link = d.link.info() if d.link else None
            targets = d.read_targets()
            rules = d.read_rule_list(targets)
            counts = d.gen.counters() if d.gen else []
            cookies = {t.name: d.socket_cookie(t.id) for t in targets.values()}
            holders = sockets.owners_by_cookie(ns, [c for c in cookies.values() if c])
            out.update(
                loaded=True,
                path=d.path,
                program_id=prog_id,
                link_id=int(link.id) if link else None,
                position=attached.index(prog_id) + 1 if prog_id in attached else None,
                other_programs=[p for p in attached if p != prog_id],
                generation=int(d.gen.meta().generation) if d.gen else 0,
                memlock=d.gen.memlock() + d.sockets.memlock() + d.targets.memlock() if d.gen else 0,
                rules=[
                    _rule_json(r, dict(zip(layout.COUNTER_NAMES, c, strict=True)))
                    for r, c in sorted(
                        zip(rules, counts, strict=True), key=lambda rc: RuleSet.order(rc[0])
                    )
                ],
                targets=[
                    _target_json(t, cookies[t.name], holders)
                    for t in sorted(targets.values(), key=lambda t: t.name)
                ],
            )
        return out


def _target_json(
    t: Target, cookie: int | None, holders: dict[int, list[sockets.Holder]]
) -> dict[str, Any]:
    hs = holders.get(cookie, []) if cookie else []
    return {
        "name": t.name,
        "protocol": t.proto,
        "address": format_endpoint(t.addr, t.port),
        "socket": "live" if cookie else "missing",
        "cookie": cookie,
        "holders": [{"pid": h.pid, "comm": h.comm, "fd": h.fd} for h in hs],
    }


# -- namespaces and addresses --------------------------------------------------------------


def netns_add(name: str) -> bool:
    """Create a named netns with lo up; False if it already existed."""
    from . import netns as nsmod

    require_privileges()
    return nsmod.create(name)


def netns_del(name: str, *, bpffs: str = DEFAULT_BPFFS) -> bool:
    """Delete a named netns, first detaching our dispatcher from it. True if one was there."""
    from . import netns as nsmod

    require_privileges()
    nsmod._check_name(name)
    had = False
    with contextlib.suppress(EnvironmentProblem):
        had = detach_all(name, bpffs=bpffs).dispatcher_removed
    nsmod.delete(name)
    return had


def netns_list() -> list[dict[str, object]]:
    from . import netns as nsmod

    return nsmod.list_named()


def addr_add(netns: str | None, prefix: str) -> bool:
    from . import netns as nsmod

    net = parse_prefix(prefix)
    require_privileges()
    with open_netns(netns) as ns:
        return nsmod.addr_add(ns, net)


def addr_del(netns: str | None, prefix: str) -> None:
    from . import netns as nsmod

    net = parse_prefix(prefix)
    require_privileges()
    with open_netns(netns) as ns:
        nsmod.addr_del(ns, net)


def addr_list(netns: str | None) -> list[str]:
    from . import netns as nsmod

    require_privileges()
    with open_netns(netns) as ns:
        return [str(n) for n in nsmod.addr_list(ns)]


# -- whole rule sets -----------------------------------------------------------------------


@dataclass
class ApplyResult:
    netns: str
    file: str
    dry_run: bool
    rules: int
    applied: bool = False  # a new rule set went live
    loaded: bool = False  # this call loaded the dispatcher into the netns
    generation: int = 0
    added: list[Rule] = field(default_factory=list)
    removed: list[Rule] = field(default_factory=list)
    changed: list[tuple[Rule, Rule]] = field(default_factory=list)  # (old, new)
    targets_added: list[str] = field(default_factory=list)
    targets_removed: list[str] = field(default_factory=list)
    targets_changed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def differs(self) -> bool:
        return bool(
            self.added
            or self.removed
            or self.changed
            or self.targets_added
            or self.targets_removed
            or self.targets_changed
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "netns": self.netns,
            "file": self.file,
            "dry_run": self.dry_run,
            "rules": self.rules,
            "applied": self.applied,
            "loaded_dispatcher": self.loaded,
            "generation": self.generation,
            "added": [_rule_json(r, None) for r in self.added],
            "removed": [_rule_json(r, None) for r in self.removed],
            "changed": [
                {"from": _rule_json(a, None), "to": _rule_json(b, None)} for a, b in self.changed
            ],
            "targets_added": self.targets_added,
            "targets_removed": self.targets_removed,
            "targets_changed": self.targets_changed,
            "notes": self.notes,
        }


Progress = Callable[[str, int, int], None]


def _read_file(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise NotFound(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{path} is a directory", "give a TOML rule file") from None
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except PermissionError:
        raise PermissionDenied(f"cannot read {path}", "check its permissions") from None


def _acquire_targets(ns: Netns, rf: rulefile.RuleFile, name: str) -> dict[str, sockets.SocketInfo]:
    """Borrow every target's socket and check it can serve its rules; close them on error."""
    from . import rulefile

    infos: dict[str, sockets.SocketInfo] = {}
    try:
        for tname, spec in rf.targets.items():
            where = f"{name}: targets.{tname}"
            try:
                if spec.to is not None:
                    info = sockets.acquire_by_address(ns, spec.proto, *spec.to)
                else:
                    assert spec.pid is not None and spec.fd is not None
                    info = sockets.acquire_by_fd(ns, spec.pid, spec.fd)
            except SklookupError as e:
                field_ = "to" if spec.to is not None else "pid"
                raise rulefile.FileError(f"{where}.{field_}", e.message, e.hint) from None
            infos[tname] = info
            if info.proto != spec.proto:
                raise rulefile.FileError(
                    where,
                    f"{spec.describe()} is a {info.proto} socket, its rules are {spec.proto}",
                    "point it at a socket of the rules' protocol",
                )
        # one check per (target, IP version): the first rule of each pair stands for the rest
        firsts: dict[tuple[str, int], Rule] = {}
        for rule in rf.rules.rules.values():
            if rule.target is not None:
                firsts.setdefault((rule.target, rule.key.version), rule)
        for rule in firsts.values():
            try:
                _check_family(rule, infos[rule.target or ""])
            except SklookupError as e:
                where = f"{name}: rules[{rf.index(rule.key)}].target"
                raise rulefile.FileError(where, e.message, e.hint) from None
    except BaseException:
        for info in infos.values():
            info.close()
        raise
    return infos


def _diff(
    res: ApplyResult,
    old_rules: dict[RuleKey, state.Effect],
    new_rules: RuleSet,
    old_targets: dict[str, Target],
    cookies: dict[str, int | None],
    new_targets: dict[str, tuple[IPAddress, int, int]],
) -> None:
    """Fill in what would change. `new_targets`: name -> (address, port, socket cookie)."""
    for key, rule in new_rules.rules.items():
        old = old_rules.get(key)
        if old is None:
            res.added.append(rule)
        elif old != (rule.action, rule.target, rule.on_missing):
            res.changed.append((Rule(key, *old), rule))
    # added and changed in the file's order, removed in the old set's
    res.removed = [Rule(k, *eff) for k, eff in old_rules.items() if k not in new_rules.rules]
    for name, (addr, port, cookie) in sorted(new_targets.items()):
        old_t = old_targets.get(name)
        where = format_endpoint(addr, port)
        if old_t is None:
            res.targets_added.append(f"{name} {where}")
        elif (old_t.addr, old_t.port) != (addr, port):
            res.targets_changed.append(
                f"{name} {format_endpoint(old_t.addr, old_t.port)} -> {where}"
            )
        elif cookies.get(name) != cookie:
            res.targets_changed.append(f"{name} {where}: another socket")
    res.targets_removed = sorted(
        f"{n} {format_endpoint(t.addr, t.port)}"
        for n, t in old_targets.items()
        if n not in new_targets
    )


def apply(
    netns: str | None,
    path: str,
    *,
    dry_run: bool = False,
    bpffs: str = DEFAULT_BPFFS,
    progress: Progress | None = None,
) -> ApplyResult:
    """Replace the netns's whole rule set with the one in the file at `path` ("-": stdin).

    All or nothing: the file is checked completely and every target's socket found before
    anything changes; new targets' sockets go in before the switch; the switch itself is one
    BPF_LINK_UPDATE, so each lookup sees the old rule set or the new one. With `dry_run`,
    only the difference is worked out.
    """

    def step(stage: str) -> Callable[[int, int], None]:
        return lambda done, total: progress(stage, done, total) if progress else None

    text = _read_file(path)
    with _no_gc():
        return _apply(netns, path, text, dry_run, bpffs, step)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Large rule sets make 100,000s of objects and no reference cycles: the cyclic garbage
    collector would only rescan them again and again (a third of the time of an apply)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _apply(
    netns: str | None,
    path: str,
    text: str,
    dry_run: bool,
    bpffs: str,
    step: Callable[[str], Callable[[int, int], None]],
) -> ApplyResult:
    from . import rulefile

    rf = rulefile.parse(text, path, step("checking"))
    require_privileges()
    with open_netns(netns) as ns:
        infos = _acquire_targets(ns, rf, path)
        try:
            with state.locked(bpffs, exclusive=not dry_run) as base:
                return _apply_locked(ns, base, path, rf, infos, dry_run, step)
        finally:
            for info in infos.values():
                info.close()


def _apply_locked(
    ns: Netns,
    base: str,
    path: str,
    rf: rulefile.RuleFile,
    infos: dict[str, sockets.SocketInfo],
    dry_run: bool,
    step: Callable[[str], Callable[[int, int], None]],
) -> ApplyResult:
    res = ApplyResult(ns.label, path, dry_run, len(rf.rules))
    res.notes += [f"target {n} is not used by any rule: not registered" for n in rf.unused_targets]
    d = _open_existing(base, ns, writer=not dry_run) if os.path.isdir(base) else None
    try:
        old_targets = d.read_targets() if d else {}
        old_rules = d.read_effects(old_targets) if d else {}
        cookies = {n: d.socket_cookie(t.id) for n, t in old_targets.items()} if d else {}
        wanted = {
            n: (*(spec.to or (infos[n].addr, infos[n].port)), infos[n].cookie)
            for n, spec in rf.targets.items()
        }
        _diff(res, old_rules, rf.rules, old_targets, cookies, wanted)
        res.generation = d.gen.meta().generation if d and d.gen else 0
        if dry_run or not res.differs:
            return res
        res.loaded = d is None
        step("loading")(0, 1)
        with contextlib.nullcontext(d) if d else state.staged(base, ns) as w:
            # every target whose address or socket changes gets a fresh SOCKMAP slot, so rules
            # of the old set keep reaching the old socket until the switch
            targets: dict[str, Target] = {}
            taken: set[int] = set()
            for n, (addr, port, cookie) in wanted.items():
                old_t = old_targets.get(n)
                if old_t is not None and (old_t.addr, old_t.port, cookies.get(n)) == (
                    addr,
                    port,
                    cookie,
                ):
                    targets[n] = old_t
                    continue
                info = infos[n]
                tid = _free_id(old_targets, taken)
                taken.add(tid)
                targets[n] = Target(tid, n, info.proto, info.family, addr, port, cookie)
                w.put_target(targets[n], info.fd)
            w.commit(rf.rules, targets)
            w.gc_targets({t.id for t in targets.values()})
            res.generation = w.gen.meta().generation if w.gen else 0
        res.applied = True
        step("loading")(1, 1)
        return res
    finally:
        if d is not None:
            d.close()


def export(netns: str | None, *, bpffs: str = DEFAULT_BPFFS) -> str:
    """The netns's rule set as a rule file; `apply` of it changes nothing."""
    from . import rulefile

    require_privileges()
    with open_netns(netns) as ns, state.locked(bpffs, exclusive=False) as base:
        d = _open_existing(base, ns, writer=False) if os.path.isdir(base) else None
        header = f"sklookupctl rule set of {ns.label}"
        if d is None:
            return rulefile.dumps(RuleSet(), {}, header + " (no dispatcher: empty)")
        with d:
            targets = d.read_targets()
            rs = d.read_rules(targets)
            used = rs.targets_in_use()
            return rulefile.dumps(
                rs,
                {n: (t.proto, t.addr, t.port) for n, t in targets.items() if n in used},
                f"{header}, generation {d.gen.meta().generation if d.gen else 0}",
            )
