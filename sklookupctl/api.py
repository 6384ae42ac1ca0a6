"""The library facade: what the CLI does, usable without it.

Every function takes the target namespace (`netns`: a name, a path, or None for the caller's)
and the bpffs directory, and raises SklookupError subclasses with a hint.

Every change goes one way (`_change`): find the sockets the change names (sockets.Discovery:
one sock_diag dump and one /proc scan per command), take the lock, repair what killed commands
left, read what is live, let the command say what it wants, make a plan (plan.make_plan, pure),
and commit it (store.Dispatcher.commit). The commands differ only in what they want.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import os
import resource
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import __version__, image, layout, rulerows, sockets, store, trust, validate
from .bpfsys import BpfError, give_back_memory, keep_heap_small, query_netns_programs
from .errors import (
    EnvironmentProblem,
    InvalidArgument,
    NotFound,
    NotLoaded,
    PermissionDenied,
    RuleConflict,
    SklookupError,
    SocketRejected,
    TargetMismatch,
)
from .netns import Netns, open_netns
from .plan import NOTHING, Live, Member, Plan, Slotted, TargetChange, Want, live_rules, make_plan
from .rules import (
    ON_MISSING,
    IPAddress,
    IPNetwork,
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
from .store import Store

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


def _more_files() -> None:
    """Registering thousands of sockets holds an fd for each until the switch: lift the soft
    limit of open files to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


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


# -- the write pipeline ------------------------------------------------------------------------


@dataclass
class Outcome:
    """What `_change` did."""

    plan: Plan
    loaded: bool  # this change made the namespace's first generation
    committed: bool  # a new generation went live
    generation: int  # the live generation afterwards
    notes: list[str] = field(default_factory=list)


Desire = Callable[[Live], tuple[RuleSet | None, dict[str, Want]]]


class Report:
    """What every writing command's result has (netns, changed, generation, plan, notes, and
    maybe loaded, dry_run), in the one JSON shape (change_json)."""

    netns: str
    changed: bool
    generation: int
    plan: Plan | None
    notes: list[str]

    def report(self, command: str, **extra: Any) -> dict[str, Any]:
        return change_json(
            command,
            self.netns,
            dry_run=bool(getattr(self, "dry_run", False)),
            changed=self.changed,
            loaded=bool(getattr(self, "loaded", False)),
            generation=self.generation,
            plan=self.plan,
            notes=self.notes,
            **extra,
        )


def _target_change_json(c: TargetChange) -> dict[str, Any]:
    t = c.new or c.old
    assert t is not None
    out: dict[str, Any] = {"name": c.name, "protocol": t.proto, "address": t.endpoint}
    if c.old is not None and c.new is not None:
        out["why"] = c.why  # address | protocol | reuseport | socket | members
        if c.old.endpoint != c.new.endpoint:
            out["from"] = c.old.endpoint
    return out


def change_json(
    command: str,
    netns: str,
    *,
    dry_run: bool,
    changed: bool,
    loaded: bool,
    generation: int,
    plan: Plan | None,
    notes: list[str],
    rules: tuple[list[Rule], list[Rule], list[tuple[Rule, Rule]]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The one JSON shape of every writing command: `changed` (anything changed in the kernel,
    or with `dry_run` would), the rules and targets added, removed and changed, notes; then
    what is particular to the command. The rules come from `plan`, or `rules` (added, removed,
    changed) when given."""
    tc = plan.target_changes if plan is not None else []
    added, removed, changes = rules or (
        (plan.added, plan.removed, plan.changed) if plan is not None else ([], [], [])
    )
    doc: dict[str, Any] = {
        "command": command,
        "netns": netns,
        "dry_run": dry_run,
        "changed": changed,
        "loaded_dispatcher": loaded,
        "generation": generation,
        "rules": {
            "added": [_rule_json(r, None) for r in added],
            "removed": [_rule_json(r, None) for r in removed],
            "changed": [
                {"from": _rule_json(a, None), "to": _rule_json(b, None)} for a, b in changes
            ],
        },
        "targets": {
            "added": [_target_change_json(c) for c in tc if c.old is None],
            "removed": [_target_change_json(c) for c in tc if c.new is None],
            "changed": [_target_change_json(c) for c in tc if c.old and c.new],
        },
        "notes": notes,
    }
    doc.update(extra)
    return doc


def _syslog(line: str) -> None:
    import syslog

    syslog.openlog("sklookupctl", syslog.LOG_PID, syslog.LOG_DAEMON)
    syslog.syslog(syslog.LOG_NOTICE, line)


AUDIT: Callable[[str], None] = _syslog  # where the audit trail goes (tests replace it)


_changes = [0]


def changes_made() -> int:
    """How many changes this process made (each one audited): the CLI tells a change whose
    report could not be written from a command that failed."""
    return _changes[0]


def audit(command: str, netns: str, what: str) -> None:
    """One line per change to syslog (the journal): who, what, where. Never fails a change."""
    from .render import clean

    _changes[0] += 1

    who = f"uid {os.getuid()}"
    if os.environ.get("SUDO_USER"):
        who += f" (sudo from {os.environ['SUDO_USER']})"
    with contextlib.suppress(Exception):
        AUDIT(clean(f"{command} in {netns}: {what}; by {who}"))


def _summary(out: Outcome) -> str:
    p = out.plan
    tc = p.target_changes
    return (
        f"generation {out.generation}, rules +{len(p.added)} -{len(p.removed)} "
        f"~{len(p.changed)}, targets +{sum(c.old is None for c in tc)} "
        f"-{sum(c.new is None for c in tc)} ~{sum(bool(c.old and c.new) for c in tc)}"
    )


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


def _change(
    ns: Netns,
    bpffs: str,
    disc: sockets.Discovery,
    desire: Desire,
    dry_run: bool = False,
    wait: float = store.DEFAULT_WAIT,
    command: str = "change",
    legacy_ok: bool = False,
    force: bool = False,
    source: str = "",
    grows: int | None = None,
) -> Outcome:
    """The one way every change goes: lock, repair, read what is live, ask `desire` what is
    wanted, plan, commit. With `dry_run`, only the plan is made (under a shared lock).
    `source`: the digest of the rule file the wanted rules were read from (apply), kept with
    them. `desire` answers None for rules that stay the live ones. `grows`: by how many rules
    the change most likely grows the live set (attach +1, detach -1), for the new generation's
    counters to be made meanwhile (Session.expect); a guess that proves wrong costs nothing
    but a little kernel time."""
    with (
        _no_gc(),
        store.session(bpffs, ns, write=not dry_run, wait=wait, legacy_ok=legacy_ok) as s,
    ):
        live = s.live_lazily()
        if grows is not None and not dry_run and live.generation:
            s.expect(len(live.rules) + grows)
        rules, wants = desire(live)
        if rules is None and force:
            rules = live_rules(live)  # a forced commit of a plan that changes nothing
        plan = make_plan(live, rules, wants)
        if rules is not None:
            plan.source = source
        notes = []
        if plan.attach and live.generation:
            notes.append(
                "the dispatcher's link had been detached by something other than "
                + ("sklookupctl: this would attach it again" if dry_run else "sklookupctl")
                + ("" if dry_run else ": attached it again")
            )
        if dry_run or (plan.noop and not force):
            if not dry_run and rules is not None and source and live.source != source:
                # the file's rules, read whole, are the live ones: noted with the live
                # generation, the same file again reads only its head
                s.note_source(source)
            return Outcome(plan, False, False, live.generation, notes)
        notes += s.commit(plan, disc.socket_fd)
        out = Outcome(plan, not live.generation, True, live.generation + 1, notes)
        audit(command, ns.label, _summary(out))
        return out


def _keep(t: Slotted) -> Want:
    """A live target as it is: no socket looked for, its slots kept."""
    return Want(t.name, t.proto, t.addr, t.port, (), t.exact)


def _members(found: list[sockets.DiagEntry]) -> tuple[Member, ...]:
    return tuple(Member(e.cookie, e.family, e.v6only) for e in found)


def _want_at(
    disc: sockets.Discovery,
    live: Live,
    name: str,
    proto: str,
    addr: IPAddress,
    port: int,
    exact: bool,
    notes: list[str],
    allow_missing: bool = False,
) -> Want:
    """A target at addr:port, with the socket(s) found there now. When none can serve and the
    target is already live at that address, it stays as registered (its rules act as
    on_missing says) with a note; with `allow_missing` a new one waits for its socket the same
    way; otherwise the error says what is there."""
    old = live.targets.get(name)
    try:
        found = disc.find(proto, addr, port, exact, live.alive(old) if old else ())
    except (NotFound, SocketRejected) as e:
        same = old is not None and (old.proto, old.addr, old.port, old.exact) == (
            proto,
            addr,
            port,
            exact,
        )
        if same and old is not None and old.waiting:
            notes.append(f"target {name}: still waiting for its socket ({e.message})")
            return Want(name, proto, addr, port, (), exact, wait=True)
        if same:
            notes.append(
                f"target {name}: {e.message}; it stays registered without a socket, and its "
                "rules act as on_missing says until a socket is registered"
            )
            return Want(name, proto, addr, port, (), exact)
        if allow_missing:
            notes.append(
                f"target {name}: {e.message}; it waits for its socket, and its rules act as "
                "on_missing says until `register`, attach or apply finds one"
            )
            return Want(name, proto, addr, port, (), exact, wait=True)
        raise
    tier = sockets.choose(disc.at_port(proto, port), addr, port)
    if not exact and len(found) == layout.MAX_MEMBERS and len(tier) > layout.MAX_MEMBERS:
        notes.append(
            f"target {name}: {len(tier)} sockets listen at {format_endpoint(addr, port)}; "
            f"{layout.MAX_MEMBERS} of its reuseport group are registered (the most a target "
            "holds): the kernel still spreads connections over the whole group, but if those "
            f"{layout.MAX_MEMBERS} close, its rules act as on_missing says"
        )
    if exact and len(tier) > 1:
        notes.append(
            f"target {name}: {len(tier)} sockets listen at {format_endpoint(addr, port)} "
            f"(a reuseport group); steering to one of them only "
            f"({disc.describe(found[0].cookie, proto)}); pass --pid and --fd to choose"
        )
    return Want(name, proto, addr, port, _members(found), exact)


def _want_fd(
    disc: sockets.Discovery, name: str, proto: str, pid: int, fd: int, exact: bool
) -> tuple[Want, sockets.SocketInfo]:
    """A target given by a process's fd (and its group, unless exact)."""
    info = disc.borrow_fd(pid, fd)
    if info.proto != proto:
        raise SocketRejected(
            f"fd {fd} of pid {pid} is a {info.proto} socket, not {proto}",
            f"give a {proto} socket, or steer {info.proto} rules to it",
        )
    found = disc.group_around(info, exact)
    return Want(name, proto, info.addr, info.port, _members(found), exact), info


def _sockets_json(disc: sockets.Discovery, want: Want) -> list[dict[str, Any]]:
    """The target's sockets, each with its cookie and the processes holding it."""
    out = []
    for m in want.members:
        e = disc.by_cookie(m.cookie, want.proto)
        holders = [
            {"pid": h.pid, "comm": h.comm, "fd": h.fd}
            for h in (disc.holders(e.inode) if e is not None else [])
        ]
        address = format_endpoint(want.addr, want.port)
        out.append({"cookie": m.cookie, "address": address, "holders": holders})
    return out


def _socket_text(disc: sockets.Discovery, want: Want) -> str:
    if not want.members:
        return "no socket"
    text = disc.describe(want.members[0].cookie, want.proto)
    if len(want.members) > 1:
        text += f", and {len(want.members) - 1} more of its reuseport group"
    return text


# -- attach and detach -----------------------------------------------------------------------


@dataclass
class AttachResult(Report):
    rule: Rule
    changed: bool  # anything changed (the rule, its target's sockets, the link)
    loaded: bool  # this call loaded the dispatcher into the netns
    netns: str
    target: str | None = None
    socket: str = ""  # where the target's socket listens, and who holds it (for people)
    notes: list[str] = field(default_factory=list)
    rule_changed: bool = False  # the rule is new, or --replace changed it
    generation: int = 0
    plan: Plan | None = None
    sockets: list[dict[str, Any]] = field(default_factory=list)  # the target's, for programs

    def to_json(self) -> dict[str, Any]:
        return self.report(
            "attach",
            rule=_rule_json(self.rule, None),
            rule_changed=self.rule_changed,
            target=self.target,
            sockets=self.sockets,
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
    exact: bool = False,
    allow_missing: bool = False,
    bpffs: str = DEFAULT_BPFFS,
    wait: float = store.DEFAULT_WAIT,
) -> AttachResult:
    """Add (or with `replace`, change) one rule; load the dispatcher on first use. `exact`:
    steer to the one socket found, not to its SO_REUSEPORT group."""
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
    if drop and exact:
        raise InvalidArgument("--no-reuseport applies to rules with a target, not to --drop")
    if name is not None:
        check_name(name)
    if pid is not None:
        validate.pid(pid, "--pid")
    if fd is not None:
        validate.fd(fd, "--fd")
    rule_proto = parse_protocol(proto)
    rule = make_rule(rule_proto, prefix, ports, target="?", drop=drop, on_missing=on_missing)
    endpoint = parse_endpoint(to) if to is not None else None
    if endpoint is not None:
        tname = name or f"{rule_proto}-{format_endpoint(*endpoint)}"
        rule = Rule(rule.key, rule.action, tname, on_missing)
    require_privileges()
    _more_files()
    result = AttachResult(rule, changed=False, loaded=False, netns="", target=None)

    with open_netns(netns) as ns, sockets.Discovery(ns) as disc:
        result.netns = ns.label
        chosen: Rule = rule

        def desire(live: Live) -> tuple[RuleSet, dict[str, Want]]:
            nonlocal chosen
            wants = {n: _keep(t) for n, t in live.targets.items()}
            rs = live_rules(live)
            if not drop:
                if endpoint is not None:
                    tname = chosen.target or ""
                    want = _want_at(
                        disc, live, tname, rule_proto, *endpoint, exact, result.notes, allow_missing
                    )
                else:
                    assert pid is not None and fd is not None
                    want, info = _want_fd(disc, "", rule_proto, pid, fd, exact)
                    tname = name or f"{rule_proto}-{info.endpoint}"
                    want = Want(tname, want.proto, want.addr, want.port, want.members, exact)
                    chosen = Rule(rule.key, rule.action, tname, on_missing)
                _check_target(live, want, replace)
                wants[tname] = want
                result.target = tname
                result.socket = _socket_text(disc, want)
                result.sockets = _sockets_json(disc, want)
            result.rule_changed = rs.add(chosen, replace)
            return rs, wants

        out = _change(ns, bpffs, disc, desire, wait=wait, command="attach", grows=1)
        result.rule = chosen
        result.changed = out.committed
        result.loaded = out.loaded
        result.generation = out.generation
        result.plan = out.plan
        result.notes += out.notes
        for change in out.plan.target_changes:
            if change.why in ("socket", "members") and change.name == result.target:
                result.notes.append(f"target {change.name}: socket registered again")
    return result


def _check_target(live: Live, want: Want, replace: bool) -> None:
    """attach may add a rule to a live target, or (with --replace) re-point it."""
    old = live.targets.get(want.name)
    if old is None:
        return
    if old.proto != want.proto:
        raise RuleConflict(
            f"target {want.name} is a {old.proto} target, the socket is {want.proto}",
            "use another --name",
        )
    if (old.addr, old.port) != (want.addr, want.port) and not replace:
        raise RuleConflict(
            f"target {want.name} points at {old.endpoint}",
            "pass --replace to point it elsewhere, or use another --name",
        )
    if old.exact != want.exact and not replace:
        mode = "exact (--no-reuseport)" if old.exact else "its reuseport group"
        raise RuleConflict(
            f"target {want.name} steers to {mode}",
            "pass --replace to change that, or use another --name",
        )


@dataclass
class DetachResult(Report):
    netns: str
    removed: str  # what was removed, for people ("": nothing was there)
    dispatcher_removed: bool
    notes: list[str] = field(default_factory=list)
    changed: bool = False
    generation: int = 0
    plan: Plan | None = None
    state: str = ""  # detach --all: what was there (dispatcher, damaged, other-layout)

    def to_json(self) -> dict[str, Any]:
        return self.report(
            "detach",
            dispatcher_removed=self.dispatcher_removed,
            state_removed=self.state,
        )


def detach(
    netns: str | None,
    proto: str,
    prefix: str,
    ports: str,
    *,
    if_exists: bool = False,
    bpffs: str = DEFAULT_BPFFS,
    wait: float = store.DEFAULT_WAIT,
) -> DetachResult:
    """Remove one rule (and its target when no other rule uses it). With `if_exists`, a rule
    (or a dispatcher) that is not there is no error: nothing changes, and a note says so."""
    lo, hi = parse_ports(ports)
    key = RuleKey(parse_protocol(proto), parse_prefix(prefix), lo, hi)
    require_privileges()
    removed: list[Rule] = []
    absent: list[str] = []

    def desire(live: Live) -> tuple[RuleSet, dict[str, Want]]:
        rs = live_rules(live)
        wants = {n: _keep(t) for n, t in live.targets.items()}
        if not live.generation:
            if if_exists:
                absent.append(f"no rule {key}: no sklookupctl dispatcher in {ns.label}")
                return rs, wants
            raise NotLoaded(
                f"no sklookupctl dispatcher in {ns.label}, so no rule {key}",
                "see `sklookupctl status`; --if-exists makes this no error",
            )
        if if_exists and key not in rs:
            absent.append(f"no rule {key}: nothing to remove")
            return rs, wants
        removed.append(rs.remove(key))
        return rs, wants

    with open_netns(netns) as ns, sockets.Discovery(ns) as disc:
        out = _change(ns, bpffs, disc, desire, wait=wait, command="detach", grows=-1)
        what = f"{key} {removed[0].describe()}" if removed else ""
        return DetachResult(
            ns.label,
            what,
            False,
            absent + out.notes,
            changed=out.committed,
            generation=out.generation,
            plan=out.plan,
        )


def detach_all(
    netns: str | None, *, bpffs: str = DEFAULT_BPFFS, wait: float = store.DEFAULT_WAIT
) -> DetachResult:
    """Detach our dispatcher from the netns and remove its pins. Other tools' links stay."""
    require_privileges()
    with (
        open_netns(netns) as ns,
        store.session(bpffs, ns, write=True, damaged_ok=True, wait=wait) as s,
    ):
        what = s.remove()
        if what:
            audit("detach --all", ns.label, f"removed the {what}")
        state = {
            "dispatcher and all rules": "dispatcher",
            "damaged state directory": "damaged",
            "state of another layout": "other-layout",
        }.get(what, what)
        return DetachResult(
            ns.label,
            what,
            bool(what),
            [] if what else [f"nothing to remove: no sklookupctl dispatcher in {ns.label}"],
            changed=bool(what),
            state=state,
        )


# -- register: a declared target's socket ----------------------------------------------------


@dataclass
class RegisterResult(Report):
    netns: str
    target: str
    source: str  # where the socket came from: systemd | fd | address
    changed: bool = False
    generation: int = 0
    plan: Plan | None = None
    socket: str = ""
    sockets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return self.report("register", target=self.target, source=self.source, sockets=self.sockets)


def systemd_fds(environ: dict[str, str] | None = None) -> dict[str, list[int]]:
    """The sockets systemd passed this process (socket activation): fd 3 on, LISTEN_FDS of
    them, for this pid only (LISTEN_PID), by name (LISTEN_FDNAMES; one name may be several
    fds, as a .socket unit's Listen* lines share its name; unnamed: "unknown", as systemd)."""
    env = os.environ if environ is None else environ
    count, pid = env.get("LISTEN_FDS", ""), env.get("LISTEN_PID", "")
    if not count or pid != str(os.getpid()):
        return {}
    n = validate.digits(count, "LISTEN_FDS", 4)
    names = env["LISTEN_FDNAMES"].split(":") if env.get("LISTEN_FDNAMES") else ["unknown"] * n
    if len(names) != n:
        raise InvalidArgument(
            f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={n} sockets",
            "systemd sets both; check the service's environment",
        )
    out: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        out.setdefault(name, []).append(3 + i)
    return out


def register(
    netns: str | None,
    target: str,
    *,
    to: str | None = None,
    pid: int | None = None,
    fd: int | None = None,
    fd_name: str | None = None,
    bpffs: str = DEFAULT_BPFFS,
    wait: float = store.DEFAULT_WAIT,
) -> RegisterResult:
    """Give a declared target its socket: from systemd socket activation (LISTEN_FDS;
    `fd_name` picks one of several), from `to`, from `pid` and `fd`, or by default from the
    address the target was declared with. Its rules stay as they are."""
    check_name(target)
    if pid is not None:
        validate.pid(pid, "--pid")
    if fd is not None:
        validate.fd(fd, "--fd")
    if (pid is None) != (fd is None):
        raise InvalidArgument("--pid and --fd go together", "pass both")
    if sum([to is not None, pid is not None, fd_name is not None]) > 1:
        raise InvalidArgument("give one of --to, --pid/--fd or --fd-name")
    endpoint = parse_endpoint(to) if to is not None else None
    activated = systemd_fds()
    if fd_name is not None and fd_name not in activated:
        raise NotFound(
            f"systemd passed no socket named {fd_name!r}"
            + (f" (it passed {', '.join(sorted(activated))})" if activated else ""),
            "name it with FileDescriptorName= in the .socket unit, and run register from a "
            "service with Sockets= that unit",
        )
    require_privileges()
    _more_files()
    res = RegisterResult("", target, "address")
    with open_netns(netns) as ns, sockets.Discovery(ns) as disc:
        res.netns = ns.label

        def desire(live: Live) -> tuple[RuleSet, dict[str, Want]]:
            old = live.targets.get(target)
            if old is None:
                raise NotFound(
                    f"no target {target!r} in {ns.label}",
                    "declare it first: attach ... --name TARGET (--allow-missing), or apply",
                )
            wants = {n: _keep(t) for n, t in live.targets.items()}
            if pid is not None and fd is not None:
                want, _ = _want_fd(disc, target, old.proto, pid, fd, old.exact)
                res.source = "fd"
            elif endpoint is not None:
                want = _want_at(disc, live, target, old.proto, *endpoint, old.exact, res.notes)
            elif activated:
                mine = _activated_fd(activated, fd_name, old)
                want, _ = _want_fd(disc, target, old.proto, os.getpid(), mine, old.exact)
                res.source = "systemd"
            else:
                want = _want_at(
                    disc, live, target, old.proto, old.addr, old.port, old.exact, res.notes
                )
            if not want.members:
                raise NotFound(
                    f"no socket for target {target} at {format_endpoint(want.addr, want.port)}",
                    "start the proxy first",
                )
            wants[target] = want
            res.socket = _socket_text(disc, want)
            res.sockets = _sockets_json(disc, want)
            return live_rules(live), wants

        out = _change(ns, bpffs, disc, desire, wait=wait, command=f"register {target}")
        res.changed, res.generation, res.plan = out.committed, out.generation, out.plan
        res.notes += out.notes
    return res


def _activated_fd(activated: dict[str, list[int]], fd_name: str | None, old: Slotted) -> int:
    """Which of the sockets systemd passed is the target's: among those named (all of them
    without a name), the only one, else the one of the target's protocol bound at its declared
    address, else the only one on its port."""
    fds = activated[fd_name] if fd_name is not None else [f for v in activated.values() for f in v]
    if len(fds) == 1:
        return fds[0]
    kind = socket.SOCK_STREAM if old.proto == "tcp" else socket.SOCK_DGRAM
    exact, on_port = [], []
    for fd in fds:
        with contextlib.suppress(OSError):
            s = socket.socket(fileno=os.dup(fd))
            with s:
                if s.type != kind or s.getsockname()[1] != old.port:
                    continue
                on_port.append(fd)
                if ipaddress.ip_address(s.getsockname()[0]) == old.addr:
                    exact.append(fd)
    fits = exact if len(exact) == 1 else on_port
    if len(fits) != 1:
        names = ", ".join(sorted(activated))
        raise InvalidArgument(
            f"systemd passed {len(fds)} sockets{f' named {fd_name}' if fd_name else ''}, "
            f"{len(fits)} of them {old.proto} at {old.endpoint}",
            f"name each socket (FileDescriptorName=) and pick one with --fd-name ({names})",
        )
    return fits[0]


# -- upgrade: state of an earlier layout, moved to this version's in place ---------------------


@dataclass
class UpgradeResult(Report):
    netns: str
    changed: bool = False
    generation: int = 0
    plan: Plan | None = None
    from_layout: int = 0
    notes: list[str] = field(default_factory=list)
    moved: int = 0  # rules moved to this version's state (not added: they were there)

    def to_json(self) -> dict[str, Any]:
        # no plan is kept: the rules were there before and are after (moved, not added)
        return self.report(
            "upgrade",
            from_layout=self.from_layout,
            to_layout=layout.LAYOUT_VERSION,
            rules_moved=self.moved,
        )


def upgrade(
    netns: str | None, *, bpffs: str = DEFAULT_BPFFS, wait: float = store.DEFAULT_WAIT
) -> UpgradeResult:
    """Move the namespace's state of an earlier layout (3) to this version's, keeping its
    rules, targets, sockets and counters, without a moment in which nothing steers: this
    version's program is attached beside the old one (both pick the same sockets), then the old
    one is detached and its pins removed."""
    from . import legacy

    require_privileges()
    _more_files()
    with open_netns(netns) as ns, sockets.Discovery(ns) as disc:
        res = UpgradeResult(ns.label)
        with Store.locked(bpffs, exclusive=False, wait=wait) as held:
            path = held.legacy_path(ns)
            mine = os.path.isdir(held.path_of(ns))
            try:
                old = legacy.read(path, ns.inode) if path is not None else None
            except EnvironmentProblem:
                if not mine:
                    raise
                old = None  # what a killed upgrade left of the old state: removed below
        if old is None and path is not None and mine:
            return _finish_upgrade(ns, res, bpffs, wait)
        if old is None:
            return _reload(ns, disc, res, bpffs, wait)
        if old.cookie != ns.cookie():
            raise EnvironmentProblem(
                f"{old.path} was made for another namespace with the same inode, now gone",
                "`sklookupctl gc` removes it",
            )
        res.from_layout = legacy.LAYOUT

        finished: list[bool] = []

        def desire(live: Live) -> tuple[RuleSet, dict[str, Want]]:
            if live.generation:
                # an upgrade killed (or run at the same time) got this far: this version's
                # state steers beside the old one; only the old one's removal is left
                finished.append(True)
                return live_rules(live), {n: _keep(t) for n, t in live.targets.items()}
            wants = {}
            for name, t in old.targets.items():
                e = disc.by_cookie(t.cookie, t.proto) if t.cookie is not None else None
                members = _members([e]) if e is not None else ()
                wants[name] = Want(name, t.proto, t.addr, t.port, members, False, wait=True)
                if not members:
                    res.notes.append(f"target {name}: its socket is gone; it waits for one")
            return old.rules, wants

        out = _change(ns, bpffs, disc, desire, wait=wait, command="upgrade", legacy_ok=True)
        if finished:
            return _finish_upgrade(ns, res, bpffs, wait)
        res.changed, res.generation, res.moved = out.committed, out.generation, len(old.rules)
        res.notes += out.notes
        with store.session(bpffs, ns, write=True, wait=wait, legacy_ok=True) as s:
            if s.dispatcher is not None and s.dispatcher.gen is not None:
                s.dispatcher.gen.add_counters(old.counters)
            s.store.remove_legacy(ns)
        audit("upgrade", ns.label, f"layout {legacy.LAYOUT} -> {layout.LAYOUT_VERSION}")
        res.notes.append(
            f"upgraded {ns.label} from layout {legacy.LAYOUT} to {layout.LAYOUT_VERSION}: "
            f"{len(old.rules)} rules, {len(old.targets)} targets, counters kept"
        )
    return res


def _legacy(ns: Netns, bpffs: str, wait: float) -> Any:
    """The namespace's state of layout 3 (legacy.Legacy), or None."""
    from . import legacy

    if not os.path.isdir(os.path.join(store.base_dir(bpffs), str(ns.inode))):
        return None  # the common case, without taking the lock
    with Store.locked(bpffs, exclusive=False, wait=wait) as held:
        path = held.legacy_path(ns)
        if path is None:
            return None
        mine = os.path.isdir(held.path_of(ns))
        try:
            old = legacy.read(path, ns.inode)
        except EnvironmentProblem:
            if mine:
                return None  # what a killed upgrade left beside this version's state
            raise
    if mine:
        return None  # both: an upgrade got this far; this version's state is what steers
    return old if old.cookie == ns.cookie() else None


def _legacy_status(ns: Netns, old: Any, bpffs: str) -> dict[str, Any]:
    """`status` of state of layout 3: its rules with their counters, its targets' sockets."""
    from . import legacy

    try:
        attached = query_netns_programs(ns.fd)
    except BpfError:
        attached = []
    return {
        "netns": ns.label,
        "netns_inode": ns.inode,
        "bpffs": bpffs,
        "loaded": True,
        "state": "other-layout",
        "layout": legacy.LAYOUT,
        "path": old.path,
        "generation": old.generation,
        "attached": old.attached,
        "other_programs": attached,
        "rules": [
            _rule_json(
                r, dict(zip(layout.COUNTER_NAMES, image.counter_view(old.counters[k]), strict=True))
            )
            for k, r in sorted(old.rules.rules.items(), key=lambda kr: RuleSet.order(kr[1]))
        ],
        "targets": [
            {
                "name": t.name,
                "protocol": t.proto,
                "address": format_endpoint(t.addr, t.port),
                "socket": "live" if t.cookie is not None else "missing",
                "cookie": t.cookie,
            }
            for t in sorted(old.targets.values(), key=lambda t: t.name)
        ],
    }


def program_current(tag: str, compile_: bool = False) -> bool | None:
    """Whether a running program is this version's dispatcher (None: cannot tell without a
    compiled image, which only `compile_` makes)."""
    from . import program

    try:
        known = program.tags(compile_)
    except SklookupError:
        return None
    return None if known is None else tag in known


def _finish_upgrade(ns: Netns, res: UpgradeResult, bpffs: str, wait: float) -> UpgradeResult:
    """Remove what is left of the old state beside this version's (a killed or concurrent
    upgrade got as far as attaching this version's program)."""
    with store.session(bpffs, ns, write=True, wait=wait, legacy_ok=True) as s:
        # (the session's own collection may have removed an old directory left without a link)
        s.store.remove_legacy(ns)
        if s.dispatcher is not None and s.dispatcher.gen is not None:
            res.generation = int(s.dispatcher.gen.meta().generation)
        removed = s.store.legacy_path(ns) is None
    res.changed = removed
    res.notes.append(
        f"finished an upgrade of {ns.label}: removed the earlier version's state"
        if removed
        else f"nothing to upgrade in {ns.label}: it is of this version"
    )
    if removed:
        audit("upgrade", ns.label, "removed the earlier version's state (finished)")
    return res


def _reload(
    ns: Netns, disc: sockets.Discovery, res: UpgradeResult, bpffs: str, wait: float
) -> UpgradeResult:
    """State of this layout whose program is another version's: the same rules, in a new
    generation with this version's program (one BPF_LINK_UPDATE)."""
    with store.session(bpffs, ns, write=False, wait=wait) as s:
        d = s.dispatcher
        if d is None or d.gen is None:
            res.notes.append(f"nothing to upgrade in {ns.label}: no sklookupctl dispatcher")
            return res
        tag = bytes(d.program.info().tag).hex()
    if program_current(tag, compile_=True) is not False:
        res.notes.append(f"nothing to upgrade in {ns.label}: it runs this version's dispatcher")
        return res

    def desire(live: Live) -> tuple[RuleSet, dict[str, Want]]:
        return live_rules(live), {n: _keep(t) for n, t in live.targets.items()}

    out = _change(ns, bpffs, disc, desire, wait=wait, command="upgrade", force=True)
    res.changed, res.generation = out.committed, out.generation
    res.from_layout = layout.LAYOUT_VERSION
    res.notes += out.notes
    res.notes.append(
        f"loaded this version's dispatcher into {ns.label} (was program tag {tag}): the same "
        "rules and sockets, one switch"
    )
    return res


def upgrade_all(
    *, bpffs: str = DEFAULT_BPFFS, wait: float = store.DEFAULT_WAIT
) -> list[UpgradeResult]:
    """Upgrade every namespace that has state of an earlier layout and still exists (that of
    namespaces that are gone is `gc`'s)."""
    from . import netns as nsmod

    require_privileges()
    with Store.locked(bpffs, exclusive=False, wait=wait) as held:
        entries = [e for e in held.entries() if e.state == "other-layout"]
    out = []
    for e in entries:
        path = nsmod.find_alive(e.inode, e.cookie) if e.cookie else None
        if path is None:
            continue
        out.append(upgrade(path, bpffs=bpffs, wait=wait))
    return out


# -- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusFilter:
    """Which rules and targets `status` shows (None: all). The summary counts every rule."""

    protocol: str | None = None
    prefix: str | None = None  # rules whose prefix overlaps it
    target: str | None = None  # rules steering to it, and that target only

    def parsed(self) -> tuple[str | None, IPNetwork | None]:
        proto = parse_protocol(self.protocol) if self.protocol is not None else None
        prefix = parse_prefix(self.prefix) if self.prefix is not None else None
        if self.target is not None:
            validate.target_name(self.target)
        return proto, prefix


def status(
    netns: str | None,
    *,
    bpffs: str = DEFAULT_BPFFS,
    wait: float = store.DEFAULT_WAIT,
    only: StatusFilter | None = None,
    lazy: bool = False,
) -> dict[str, Any]:
    """What is loaded in the netns: program, link, a summary, rules, targets with their
    sockets and counters. `only` narrows the rules and targets shown. With `lazy`, "rules" is a
    rulerows.RuleRows (streamed by the CLI) rather than a list of dicts."""
    require_privileges()
    only = only or StatusFilter()
    proto, prefix = only.parsed()
    with open_netns(netns) as ns:
        old = _legacy(ns, bpffs, wait)
        if old is not None:
            return _legacy_status(ns, old, bpffs)
        # the lock is held while the pins are read, not while sockets are looked for
        with store.session(bpffs, ns, write=False, wait=wait) as s:
            out, live, (totals, sizes) = _status_of(ns, s, bpffs)
        if live is not None:
            rows = out["rules"]
            shown = rows.filtered(proto, prefix, only.target)
            counts = out.pop("counted")
            per_target = {g[1]: n for g, n in sizes.items() if g[0] == "target"}
            targets = sorted(live.targets.values(), key=_name)
            if only.target is not None:
                targets = [t for t in targets if t.name == only.target]
            if proto is not None:
                targets = [t for t in targets if t.proto == proto]
            if prefix is not None:  # the targets of the rules shown
                used = {r[8] for r in shown.rows}
                targets = [t for t in targets if t.name in used]
            with sockets.Discovery(ns) as disc:
                out["targets"] = [
                    _target_json(t, live, disc, totals.get(("target", t.name)), per_target[t.name])
                    for t in targets
                ]
            alive = sum(1 for t in live.targets.values() if live.alive(t))
            out["summary"] = {
                "rules": len(rows),
                "rules_shown": len(shown),
                "steer_rules": sum(per_target.values()),
                "drop_rules": len(rows) - sum(per_target.values()),
                "targets": len(live.targets),
                "targets_live": alive,
                "lookups": counts["steered"] + counts["dropped"] + counts["passed"],
                **{k: counts[k] for k in ("steered", "dropped", "passed", "missing", "errors")},
            }
            out["drop_rules"] = {
                p: _counters_json(totals.get(("drop", p))) for p in image.DROP_GROUPS
            }
            out["rules"] = shown if lazy else shown.dicts()
        return out


def _counters_json(kernel: tuple[int, ...] | None) -> dict[str, int]:
    c = kernel or (0,) * len(layout.KERNEL_COUNTERS)
    by = dict(zip(layout.KERNEL_COUNTERS, c, strict=True))
    return {"lookups": by["steered"] + by["dropped"] + by["passed"], **by}


def _status_of(
    ns: Netns, s: store.Session, bpffs: str
) -> tuple[dict[str, Any], Live | None, tuple[dict[Any, tuple[int, ...]], dict[Any, int]]]:
    """The status of the namespace's pins (no sockets yet), its live state (rules as
    rulerows.RuleRows, not decoded one by one) and the counters of each group of rules."""
    out: dict[str, Any] = {"netns": ns.label, "netns_inode": ns.inode, "bpffs": bpffs}
    try:
        attached = query_netns_programs(ns.fd)
    except BpfError as e:
        raise EnvironmentProblem(f"cannot query {ns.label}: {e.strerror}") from None
    d = s.dispatcher
    if d is None or d.gen is None:
        out.update(loaded=False, other_programs=attached, rules=[], targets=[])
        if d is not None:
            out.update(state="unfinished", path=d.path)
        return out, None, ({}, {})
    gen = d.gen
    prog_info = d.program.info()
    prog_id = int(prog_info.id)
    tag = bytes(prog_info.tag).hex()
    link = d.link.info() if d.link else None
    live = d.snapshot(rules=False)
    counted, columns = d.counts()
    names = counted.names
    rows = rulerows.RuleRows.from_records(
        gen.rule_records(), gen.meta().rules, names, list(zip(*columns, strict=True))
    )
    out.update(
        loaded=True,
        state=d.state,
        path=d.path,
        program_id=prog_id,
        program_tag=tag,
        program_current=program_current(tag),
        written_by=image.written_by(gen.meta()),
        version=__version__,
        link_id=int(link.id) if link else None,
        position=attached.index(prog_id) + 1 if prog_id in attached else None,
        other_programs=[p for p in attached if p != prog_id],
        generation=live.generation,
        tracing=_tracing_json(d),
        memlock=gen.memlock(),
        sockmap={"capacity": live.capacity, "filled": len(live.filled)},
        rules=rows,
        targets=[],
    )
    totals, sizes = counted.group_stats(columns)
    out["counted"] = dict(zip(layout.KERNEL_COUNTERS, map(sum, columns), strict=True))
    return out, live, (totals, sizes)


def _tracing_json(d: store.Dispatcher) -> dict[str, Any] | None:
    """The trace running on the namespace (the link runs its traced copy), or None."""
    if d.tracing is None:
        return None
    pid = store.tracer_pid(d.tracing)
    return {"pid": pid, "tracer": trust.describe_pid(pid) if pid else None, "path": d.tracing}


def _name(t: Slotted) -> str:
    return t.name


def _target_json(
    t: Slotted,
    live: Live,
    disc: sockets.Discovery,
    totals: tuple[int, ...] | None = None,
    rules: int = 0,
) -> dict[str, Any]:
    alive = live.alive(t)
    holders = []
    for c in alive:
        e = disc.by_cookie(c, t.proto)
        for h in disc.holders(e.inode) if e is not None else []:
            holders.append({"pid": h.pid, "comm": h.comm, "fd": h.fd, "cookie": c})
    return {
        "name": t.name,
        "protocol": t.proto,
        "address": t.endpoint,
        "reuseport": "exact" if t.exact else "group",
        "socket": "live" if alive else "waiting" if t.waiting else "missing",
        "cookie": alive[0] if alive else None,
        "cookies": alive,
        "members": t.slots,
        "alive": len(alive),
        "slots": [t.slot, t.slot + t.slots - 1],
        "holders": holders,
        "rules": rules,
        # what its rules decided since the target was made (kept across rule-set changes)
        "counters": _counters_json(totals),
    }


def status_all(
    *, bpffs: str = DEFAULT_BPFFS, wait: float = store.DEFAULT_WAIT
) -> list[dict[str, Any]]:
    """Every namespace sklookupctl steers, or steered and left state for: dead namespaces,
    what killed commands left, state of another layout."""
    require_privileges()
    from . import netns as nsmod

    names: dict[int, list[str]] = {}
    for item in nsmod.list_named():
        names.setdefault(int(str(item["inode"])), []).append(str(item["name"]))
    with Store.locked(bpffs, exclusive=False, wait=wait) as held:
        return [_entry_json(e, names) for e in held.entries()]


def _entry_json(e: Any, names: dict[int, list[str]]) -> dict[str, Any]:
    return {
        "path": e.path,
        "netns_cookie": e.cookie,
        "netns_inode": e.inode,
        "label": e.label,
        "names": names.get(e.inode, []) if "dead" not in e.state else [],
        "state": e.state,
        "generation": e.generation,
        "rules": e.rules,
        "targets": e.targets,
        "problem": e.problem,
    }


def gc_state(
    *, bpffs: str = DEFAULT_BPFFS, wait: float = store.DEFAULT_WAIT
) -> list[dict[str, Any]]:
    """Remove the state of namespaces that are gone and what killed commands left; return
    what was removed or repaired."""
    require_privileges()
    with Store.locked(bpffs, exclusive=True, wait=wait) as held:
        done = [_entry_json(e, {}) for e in held.gc()]
    for e in done:
        audit("gc", e["label"] or f"inode {e['netns_inode']}", f"{e['state']}: {e['path']}")
    return done


def gc_json(done: list[dict[str, Any]]) -> dict[str, Any]:
    """gc in the shape of every writing command (it spans namespaces: no rules or targets)."""
    return {
        "command": "gc",
        "changed": bool(done),
        "dry_run": False,
        "collected": done,
        "notes": [],
    }


# -- namespaces and addresses --------------------------------------------------------------


def netns_add(name: str) -> bool:
    """Create a named netns with lo up; False if it already existed."""
    from . import netns as nsmod

    require_privileges()
    made = nsmod.create(name)
    if made:
        audit("netns add", name, "created the network namespace")
    return made


def netns_del(
    name: str,
    *,
    if_exists: bool = False,
    bpffs: str = DEFAULT_BPFFS,
    wait: float = store.DEFAULT_WAIT,
) -> bool | None:
    """Delete a named netns, first detaching our dispatcher from it. True if one was there;
    None when the namespace was not there (an error unless `if_exists`)."""
    from . import netns as nsmod

    require_privileges()
    nsmod._check_name(name)
    if if_exists and not os.path.exists(nsmod.path_of(name)):
        return None
    had = False
    with contextlib.suppress(EnvironmentProblem):
        had = detach_all(name, bpffs=bpffs, wait=wait).dispatcher_removed
    nsmod.delete(name)
    audit("netns del", name, "deleted the network namespace")
    return had


def netns_list() -> list[dict[str, object]]:
    from . import netns as nsmod

    return nsmod.list_named()


def addr_add(netns: str | None, prefix: str) -> bool:
    from . import netns as nsmod

    net = parse_prefix(prefix)
    require_privileges()
    with open_netns(netns) as ns:
        added = nsmod.addr_add(ns, net)
        if added:
            audit("addr add", ns.label, f"AnyIP {net}")
        return added


def addr_del(netns: str | None, prefix: str, *, if_exists: bool = False) -> bool:
    """Remove an AnyIP prefix; False when it was not there (an error unless `if_exists`)."""
    from . import netns as nsmod

    net = parse_prefix(prefix)
    require_privileges()
    with open_netns(netns) as ns:
        if if_exists and net not in nsmod.addr_list(ns):
            return False
        nsmod.addr_del(ns, net)
        audit("addr del", ns.label, f"AnyIP {net} removed")
        return True


def simple_change_json(command: str, netns: str, changed: bool, notes: list[str]) -> dict[str, Any]:
    """netns and addr changes in the shape of every writing command (no rules or targets)."""
    return change_json(
        command,
        netns,
        dry_run=False,
        changed=changed,
        loaded=False,
        generation=0,
        plan=None,
        notes=notes,
    )


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
    plan: Plan | None = None
    addresses_added: list[str] = field(default_factory=list)  # [netns] addresses made local

    @property
    def differs(self) -> bool:
        return bool(
            self.addresses_added
            or self.added
            or self.removed
            or self.changed
            or self.targets_added
            or self.targets_removed
            or self.targets_changed
        )

    def to_json(self) -> dict[str, Any]:
        return change_json(
            "apply",
            self.netns,
            dry_run=self.dry_run,
            # a dry run: a detached link made again is a change too (--exit-code)
            changed=self.differs or bool(self.plan and self.plan.attach)
            if self.dry_run
            else self.applied or bool(self.addresses_added),
            loaded=self.loaded,
            generation=self.generation,
            plan=self.plan,
            notes=self.notes,
            rules=(self.added, self.removed, self.changed),
            file=self.file,
            rule_count=self.rules,
            addresses_added=self.addresses_added,
        )


Progress = Callable[[str, int, int], None]


def _read_file(path: str) -> str:
    return validate.read_text(path, sys.stdin)


def _file_wants(
    disc: sockets.Discovery,
    live: Live,
    rf: rulefile.RuleFile,
    name: str,
    notes: list[str],
    allow_missing: bool = False,
) -> dict[str, Want]:
    """Every target the file declares, with its sockets; errors located in the file."""
    from . import rulefile

    wants: dict[str, Want] = {}
    for tname, spec in rf.targets.items():
        where = f"{name}: targets.{tname}"
        try:
            if spec.to is not None:
                wants[tname] = _want_at(
                    disc, live, tname, spec.proto, *spec.to, spec.exact, notes, allow_missing
                )
            else:
                assert spec.pid is not None and spec.fd is not None
                wants[tname], _ = _want_fd(disc, tname, spec.proto, spec.pid, spec.fd, spec.exact)
        except SklookupError as e:
            field_ = "to" if spec.to is not None else "pid"
            raise rulefile.FileError(f"{where}.{field_}", e.message, e.hint) from None
    return wants


def _made_netns(netns: str | None, rf: rulefile.RuleFile, dry_run: bool) -> bool:
    """[netns] create = true: make the named namespace when it is missing (it would be, with
    `dry_run`). True when it was (would be) made."""
    from . import netns as nsmod

    if not rf.create_netns or not netns or "/" in netns:
        return False
    if os.path.exists(nsmod.path_of(netns)):
        return False
    if not dry_run:
        nsmod.create(netns)
    return True


def _add_addresses(ns: Netns, rf: rulefile.RuleFile, dry_run: bool, notes: list[str]) -> list[str]:
    """[netns] addresses: make those not local yet local (AnyIP); none is ever removed."""
    from . import netns as nsmod

    if not rf.addresses:
        return []
    have = set(nsmod.addr_list(ns))
    missing = [a for a in rf.addresses if a not in have]
    done: list[str] = []
    try:
        for a in missing:
            if not dry_run:
                nsmod.addr_add(ns, a)
            done.append(str(a))
            notes.append(
                f"{'would make' if dry_run else 'made'} {a} local (AnyIP, [netns] addresses)"
            )
    except BaseException:
        for a_text in [] if dry_run else done:
            with contextlib.suppress(SklookupError, OSError):
                nsmod.addr_del(ns, parse_prefix(a_text))
        raise
    return done


def _target_lines(res: ApplyResult, changes: list[TargetChange]) -> None:
    for c in changes:
        if c.new is None:
            assert c.old is not None
            res.targets_removed.append(f"{c.name} {c.old.endpoint}")
        elif c.old is None:
            res.targets_added.append(f"{c.name} {c.new.endpoint}")
        elif c.why == "address":
            res.targets_changed.append(f"{c.name} {c.old.endpoint} -> {c.new.endpoint}")
        elif c.why == "members":
            res.targets_changed.append(
                f"{c.name} {c.new.endpoint}: other sockets ({c.new.slots} in its group)"
            )
        else:
            res.targets_changed.append(f"{c.name} {c.new.endpoint}: another {c.why}")


def apply(
    netns: str | None,
    path: str,
    *,
    dry_run: bool = False,
    bpffs: str = DEFAULT_BPFFS,
    progress: Progress | None = None,
    wait: float = store.DEFAULT_WAIT,
    allow_missing: bool = False,
) -> ApplyResult:
    """Replace the netns's whole rule set with the one in the file at `path` ("-": stdin).

    All or nothing: the file is checked completely and every target's socket found before
    anything changes; new targets' sockets go in before the switch; the switch itself is one
    BPF_LINK_UPDATE, so each lookup sees the old rule set or the new one. With `dry_run`,
    only the difference is worked out.
    """

    def step(stage: str) -> Callable[[int, int], None]:
        return lambda done, total: progress(stage, done, total) if progress else None

    keep_heap_small()
    with _no_gc():
        # the text is not kept past its parse (_apply drops it): a large file's text is as
        # large as its rules
        return _apply(netns, path, [_read_file(path)], dry_run, bpffs, step, wait, allow_missing)


def _apply(
    netns: str | None,
    path: str,
    text: list[str],
    dry_run: bool,
    bpffs: str,
    step: Callable[[str], Callable[[int, int], None]],
    wait: float,
    allow_missing: bool = False,
) -> ApplyResult:
    from . import rulefile

    source = rulefile.source_digest(text[0])
    known = _live_from(netns, bpffs, source)
    rf = rulefile.parse(text.pop(), path, step("checking"), known)
    rf.source = source
    if len(rf.rules) >= image.VECTOR_MIN:
        give_back_memory()  # what reading the file freed
        keep_heap_small(len(rf.rules))
    require_privileges()
    _more_files()
    made = _made_netns(netns, rf, dry_run)
    if made and dry_run:
        return _apply_to_nothing(netns or "", path, rf, allow_missing)
    try:
        return _apply_in(netns, path, rf, dry_run, bpffs, step, wait, allow_missing, made)
    except BaseException:
        if made and not dry_run:
            # a refused apply changes nothing: not even the namespace it made for itself
            from . import netns as nsmod

            with contextlib.suppress(SklookupError, OSError):
                nsmod.delete(netns or "")
        raise


def _live_from(netns: str | None, bpffs: str, source: str) -> dict[str, str] | None:
    """When the namespace's live rules were read from the file whose digest is `source` (an
    earlier apply of it, and nothing changed them since): the targets they use, with their
    protocols. None otherwise, or when it cannot be told (not root, the lock busy, no such
    namespace...): the file is then read whole, as always."""
    if not source or _effective_caps() & (1 << 21) == 0:  # CAP_SYS_ADMIN: reading bpffs
        return None
    try:
        with open_netns(netns) as ns, store.session(bpffs, ns, write=False, wait=0) as s:
            d = s.dispatcher
            if d is None or d.gen is None or d.gen.source() != source:
                return None
            return {t.name: t.proto for t in d.gen.targets()}
    except (SklookupError, OSError):
        return None


def _apply_to_nothing(
    netns: str, path: str, rf: rulefile.RuleFile, allow_missing: bool
) -> ApplyResult:
    """A dry run of a file whose namespace does not exist yet ([netns] create): what the real
    apply would do there, where no socket can listen yet."""
    from . import rulefile

    wants = {}
    for name, spec in rf.targets.items():
        if spec.to is None:
            raise rulefile.FileError(
                f"{path}: targets.{name}.pid", f"the namespace {netns} does not exist yet"
            )
        if not allow_missing:
            raise rulefile.FileError(
                f"{path}: targets.{name}.to",
                f"no socket can listen at {format_endpoint(*spec.to)} in {netns}: it does not "
                "exist yet",
                "apply with --allow-missing: the targets wait for their sockets",
            )
        wants[name] = Want(name, spec.proto, *spec.to, (), spec.exact, wait=True)
    plan = make_plan(NOTHING, rf.rules, wants)
    res = ApplyResult(netns, path, True, len(rf.rules), loaded=bool(len(rf.rules)))
    res.addresses_added = [str(a) for a in rf.addresses]
    res.notes.append(f"would create network namespace {netns} ([netns] create = true)")
    res.notes += [f"would make {a} local (AnyIP, [netns] addresses)" for a in rf.addresses]
    res.plan = plan
    res.added, res.removed, res.changed = plan.added, plan.removed, plan.changed
    _target_lines(res, plan.target_changes)
    return res


def _apply_in(
    netns: str | None,
    path: str,
    rf: rulefile.RuleFile,
    dry_run: bool,
    bpffs: str,
    step: Callable[[str], Callable[[int, int], None]],
    wait: float,
    allow_missing: bool,
    made: bool,
) -> ApplyResult:
    from . import rulefile

    with open_netns(netns) as ns, sockets.Discovery(ns) as disc:
        res = ApplyResult(ns.label, path, dry_run, len(rf.rules))
        if made:
            res.notes.append(f"created network namespace {netns} ([netns] create = true)")
        res.notes += [
            f"target {n} is not used by any rule: not registered" for n in rf.unused_targets
        ]
        res.addresses_added = _add_addresses(ns, rf, dry_run, res.notes)

        def desire(live: Live) -> tuple[RuleSet | None, dict[str, Want]]:
            step("loading")(0, 1)
            nonlocal rf
            if rf.same_as_live and live.source != rf.source:
                # changed between the look before the lock and now: read the rules after all
                source = rf.source
                rf = rulefile.parse(rf.text, path, step("checking"))
                rf.source = source
            wants = _file_wants(disc, live, rf, path, res.notes, allow_missing)
            if rf.same_as_live:
                res.rules = len(live.rules)
                return None, wants  # the live rules, as they are
            res.rules = len(rf.rules)
            return rf.rules, wants

        try:
            out = _change(
                ns, bpffs, disc, desire, dry_run, wait, command=f"apply {path}", source=rf.source
            )
        except BaseException as e:
            if not dry_run:  # a refused apply changes nothing: not the addresses either
                from . import netns as nsmod

                for a in res.addresses_added:
                    with contextlib.suppress(SklookupError, OSError):
                        nsmod.addr_del(ns, parse_prefix(a))
            if isinstance(e, TargetMismatch):
                # the file's rules were not read (the same file again): read them to say which
                located = rulefile.parse(rf.text, path) if rf.same_as_live else rf
                where = f"{path}: rules[{located.index(e.rule)}].target"  # type: ignore[arg-type]
                raise rulefile.FileError(where, e.message, e.hint) from None
            raise
        if made:
            audit("apply", ns.label, "created the network namespace")
        if res.addresses_added and not dry_run:
            audit("apply", ns.label, "AnyIP " + ", ".join(res.addresses_added))
        plan = res.plan = out.plan
        res.added, res.removed, res.changed = plan.added, plan.removed, plan.changed
        _target_lines(res, plan.target_changes)
        res.applied = out.committed
        res.loaded = out.loaded
        res.generation = out.generation
        res.notes += out.notes
        step("loading")(1, 1)
        return res


def export(
    netns: str | None, *, bpffs: str = DEFAULT_BPFFS, wait: float = store.DEFAULT_WAIT
) -> str:
    """The netns's rule set as a rule file; `apply` of it changes nothing."""
    from . import rulefile

    require_privileges()
    from . import netns as nsmod

    with open_netns(netns) as ns:
        old = _legacy(ns, bpffs, wait)
        if old is not None:  # state of an earlier layout: read as it is
            return rulefile.dumps(
                old.rules,
                {n: (t.proto, t.addr, t.port, False) for n, t in old.targets.items()},
                f"sklookupctl rule set of {ns.label} (made by an earlier version: "
                "`sklookupctl upgrade` moves it to this one)",
                nsmod.addr_list(ns),
            )
        with store.session(bpffs, ns, write=False, wait=wait) as s:
            live = s.live
        # no generation in the header: a file kept in git changes only when the rules do
        header = f"sklookupctl rule set of {ns.label}"
        addresses = nsmod.addr_list(ns)
        if not live.generation:
            return rulefile.dumps(RuleSet(), {}, header + " (no dispatcher: empty)", addresses)
        return rulefile.dumps(
            live_rules(live),
            {n: (t.proto, t.addr, t.port, t.exact) for n, t in live.targets.items()},
            header,
            addresses,
        )
