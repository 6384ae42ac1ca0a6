"""Why a lookup goes where it goes (`explain`): the kernel's own answer, not a model's.

The dispatcher is run on a made-up lookup with BPF_PROG_TEST_RUN: the live generation's program
(the same instructions: its tag is compared), bound to the live maps, except that it counts into
a private, zeroed counters map rather than the live one, so explaining changes no counter and
the counter it moved says which rule decided and why (steered, dropped, passed, missing
socket, assign error). The socket the kernel selected comes back as its cookie.

Every other sk_lookup program attached to the namespace is run on the same lookup too, and the
verdicts are combined as the kernel combines them (BPF_PROG_SK_LOOKUP_RUN_ARRAY): programs run
in attach order; the last one that passes with a socket selected decides; otherwise any drop
drops; otherwise the normal socket lookup goes on. Each program is run on its own, so one that
acts on an earlier program's selection (ctx->sk) may do otherwise in the real run; and a
foreign program's own maps (counters, say) see the made-up lookup.
"""

from __future__ import annotations

import errno
import ipaddress
from array import array
from dataclasses import dataclass
from typing import Any

from . import api, image, layout, store, testrun, validate
from .bpfsys import (
    BPF_MAP_TYPE_PERCPU_ARRAY,
    BpfError,
    Program,
    possible_cpus,
    query_netns_programs,
)
from .errors import EnvironmentProblem, InvalidArgument
from .netns import Netns
from .plan import Slotted
from .rules import IPAddress, Rule, parse_port, parse_protocol
from .sockets import Discovery, choose

# the counter the decision moved -> its reason (layout.WHY)
REASONS = {
    "steered": "steered",
    "errors": "assign-error",
    "missing": "missing-socket",
    "dropped": "drop-rule",
    "passed": "passed",  # only with missing or errors
}


@dataclass
class Run:
    """One program's verdict on the lookup."""

    prog_id: int
    name: str
    ours: bool
    verdict: str  # pass | drop
    cookie: int  # the socket it selected; 0: none (or a reuseport group's: see `group`)
    # it selected a socket of a SO_REUSEPORT group and left the pick within the group to the
    # kernel, which a test run cannot make (EOPNOTSUPP): which member is not known
    group: bool = False

    @property
    def selected(self) -> bool:
        return self.verdict == "pass" and (self.cookie != 0 or self.group)

    @property
    def shown(self) -> str:
        return "steer" if self.selected else self.verdict


def _test_run(prog: Program, ctx: testrun.LookupCtx) -> tuple[str, int, bool]:
    """(pass | drop, the selected socket's cookie, whether it is a reuseport group's)."""
    try:
        out = testrun.run(prog, ctx)
    except BpfError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
        # the program ran and selected a socket of a reuseport group without
        # BPF_SK_LOOKUP_F_NO_REUSEPORT: the kernel would pick a member by the flow's hash,
        # which a test run refuses to do
        return "pass", 0, True
    return ("pass" if out.verdict == testrun.SK_PASS else "drop"), out.cookie, False


def parse_address(text: str) -> IPAddress:
    validate.address_text(text, "address", "give an address such as 192.0.2.1 or 2001:db8::1")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise InvalidArgument(
            f"{validate.show(text)} is not an IP address",
            "give an address such as 192.0.2.1 or 2001:db8::1",
        ) from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        raise InvalidArgument(
            f"{addr} is an IPv4-mapped address",
            f"a lookup for it is one for {addr.ipv4_mapped}",
        )
    return addr


def _counted(raw: bytes | bytearray, rules: int) -> tuple[int, str] | None:
    """The rule whose counters moved in a private counters map, and what moved most tellingly
    (missing or errors before the dropped or passed it ended in). One lookup moves one rule's
    counters: the first byte that is not zero finds it (in C, whatever the number of rules)."""
    width = len(layout.KERNEL_COUNTERS)
    ncpu = possible_cpus()
    per_rule = 8 * width * ncpu
    first = len(raw) - len(raw.lstrip(b"\0"))
    if first == len(raw):
        return None
    rule = first // per_rule
    if not 1 <= rule <= rules:
        return None
    per = array("Q", raw[rule * per_rule : (rule + 1) * per_rule])
    sums = [sum(per[c * width + j] for c in range(ncpu)) for j in range(width)]
    moved = dict(zip(layout.KERNEL_COUNTERS, sums, strict=True))
    for name in ("steered", "errors", "missing", "dropped"):
        if moved[name]:
            return rule, name
    return rule, "passed"


def _run_ours(d: store.Dispatcher, ctx: testrun.LookupCtx) -> tuple[Run, Any, bool]:
    """Our program on the lookup: (its run, (rule number, counter moved) or None, whether the
    copy run is the live program's instructions)."""
    from . import program

    gen = d.gen
    assert gen is not None
    rules = int(gen.meta().rules)
    live_tag = bytes(d.program.info().tag)
    scratch = store._create_map(BPF_MAP_TYPE_PERCPU_ARRAY, layout.Counters, rules + 1, "scratch", 0)
    with scratch:
        fds = {name: gen.maps[name].fd for name in layout.PROGRAM_MAPS}
        fds["counters"] = scratch.fd
        with program.load(fds) as copy:
            same = bytes(copy.info().tag) == live_tag
            if same:
                verdict, cookie, group = _test_run(copy, ctx)
                raw = scratch.lookup_batch_raw(rules + 1, image.COUNTERS.size * possible_cpus())
                moved = _counted(raw, rules)
                prog_id = int(d.program.info().id)
                return Run(prog_id, "skl_dispatch", True, verdict, cookie, group), moved, True
    # another version's instructions run live (an upgrade is due): run the live program itself
    # (its counters count this lookup); which rule decided comes from the rule set
    verdict, cookie, group = _test_run(d.program, ctx)
    prog_id = int(d.program.info().id)
    return Run(prog_id, "skl_dispatch", True, verdict, cookie, group), None, False


def _rule(gen: store.Generation, number: int, names: list[str]) -> Rule:
    """Rule `number` of the generation, decoded alone (not the whole rule set)."""
    key, action, miss, t = gen.rule(number)
    if action == layout.ACTION_DROP:
        return Rule(key, "drop")
    return Rule(key, "steer", names[t], "pass" if miss == layout.MISSING_PASS else "drop")


def _run_other(prog_id: int, ctx: testrun.LookupCtx, our_map: int) -> Run | str:
    """Another program of the namespace on the lookup; "ours" when it is ours after all (a
    traced copy of our program, which uses our maps: a trace started or ended meanwhile),
    "gone" when it went away while we looked."""
    try:
        with Program.from_id(prog_id) as p:
            if our_map and our_map in p.map_ids():
                return "ours"
            name = bytes(p.info().name).rstrip(b"\0").decode(errors="replace")
            verdict, cookie, group = _test_run(p, ctx)
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return "gone"
        raise EnvironmentProblem(
            f"cannot run sk_lookup program {prog_id} of the namespace: {e.strerror}"
        ) from None
    return Run(prog_id, name, False, verdict, cookie, group)


def combine(runs: list[Run]) -> tuple[str, Run | None]:
    """The kernel's combination of the programs' verdicts, in run order: (steer | drop | pass,
    the run whose selection counts)."""
    selected: Run | None = None
    dropped = False
    for r in runs:
        if r.selected:
            selected = r
        elif r.verdict == "drop":
            dropped = True
    if selected is not None:
        return "steer", selected
    return ("drop" if dropped else "pass"), None


def _socket_json(disc: Discovery, cookie: int, proto: str) -> dict[str, Any]:
    e = disc.by_cookie(cookie, proto)
    holders = (
        [{"pid": h.pid, "comm": h.comm, "fd": h.fd} for h in disc.holders(e.inode)]
        if e is not None
        else []
    )
    return {
        "cookie": cookie,
        "address": e.endpoint if e is not None else None,
        "holders": holders,
    }


def explain(
    ns: Netns,
    proto: str,
    address: str,
    port: str | int,
    *,
    bpffs: str,
    wait: float,
    source: str | None = None,
    source_port: int = 40000,
) -> dict[str, Any]:
    """What the kernel does with a new connection (TCP) or datagram (UDP) to address:port in
    the namespace, and why. See the module's docstring."""
    proto = parse_protocol(proto)
    addr = parse_address(address)
    dport = parse_port(str(port))
    remote = parse_address(source) if source else None
    if remote is not None and remote.version != addr.version:
        raise InvalidArgument(
            f"source {remote} and destination {addr} are of different families",
            "give a source of the same IP version",
        )
    ctx = testrun.lookup_ctx(proto, addr, dport, str(remote or ""), source_port)
    out: dict[str, Any] = {
        "netns": ns.label,
        "protocol": proto,
        "address": str(addr),
        "port": dport,
        "source": str(remote) if remote else None,
    }
    notes: list[str] = []
    if addr.is_multicast or addr == ipaddress.IPv4Address("255.255.255.255"):
        return _not_looked_up(out, proto)
    ours: Run | None = None
    moved: tuple[int, str] | None = None
    rule: Rule | None = None
    target: Slotted | None = None
    running = 0
    live_alive: dict[str, list[int]] = {}
    with store.session(bpffs, ns, write=False, wait=wait) as s:
        d = s.dispatcher
        loaded = d is not None and d.gen is not None and d.state == "steering"
        attached = query_netns_programs(ns.fd)
        if loaded:
            assert d is not None and d.gen is not None
            gen = d.gen
            targets = gen.targets()
            names = [t.name for t in targets]
            live = d.snapshot(rules=False)
            ours, moved, exact = _run_ours(d, ctx)
            if not exact:
                notes.append(
                    "the live program is another version's (`sklookupctl upgrade` reloads it):"
                    " it was run itself, and its counters count this lookup"
                )
                from .rules import RuleSet

                rs = RuleSet()
                for k, eff in gen.effects(names).items():
                    rs.add(Rule(k, *eff))
                rule = rs.match(proto, addr, dport)
            elif moved is not None:
                rule = _rule(gen, moved[0], names)
            if rule is not None and rule.target is not None:
                target = next((t for t in targets if t.name == rule.target), None)
                if target is not None:
                    live_alive[target.name] = live.alive(target)
            if d.link is not None:
                running = int(d.link.info().prog_id)  # the traced copy while a trace runs
            out["generation"] = int(gen.meta().generation)
            out["program_tag"] = bytes(d.program.info().tag).hex()
        # ours: the live program, or its traced copy while a trace runs (a trace may start or
        # end while we look: a program that uses our nodes map is ours whatever its id)
        our_map = int(d.gen.maps["nodes"].info().id) if loaded and d is not None and d.gen else 0
        runs: list[Run] = []
        for pid in attached:
            if ours is not None and (pid == running or pid == ours.prog_id):
                runs.append(ours)
                continue
            other = _run_other(pid, ctx, our_map)
            if other == "ours":
                if ours is not None and ours not in runs:
                    runs.append(ours)
            elif other == "gone":
                notes.append(f"sk_lookup program {pid} was detached while explain ran")
            elif isinstance(other, Run):
                runs.append(other)
    verdict, chosen = combine(runs)
    reason = _reason(ours, moved, rule, loaded)
    out["decided_by"] = None
    if ours is not None and chosen is not None and chosen is not ours:
        reason = "overridden"
        after = ours not in runs or runs.index(chosen) > runs.index(ours)
        out["decided_by"] = {"id": chosen.prog_id, "runs": "after ours" if after else "before ours"}
    elif ours is not None and verdict == "drop" and ours.verdict == "pass":
        reason = "dropped-by-other-program"
    with Discovery(ns) as disc:
        if chosen is None:
            socket = None
        elif chosen.group:
            # the pick within a reuseport group is the kernel's, by the flow's hash: the group
            alive = live_alive.get(target.name, []) if chosen.ours and target else []
            socket = {
                "cookie": None,
                "address": target.endpoint if chosen.ours and target else None,
                "group": [_socket_json(disc, c, proto) for c in alive],
                "holders": [],
            }
        else:
            socket = _socket_json(disc, chosen.cookie, proto)
        normal = None
        if verdict == "pass":
            found = choose(disc.entries(proto), addr, dport)
            normal = _socket_json(disc, found[0].cookie, proto) if found else None
    out.update(
        verdict=verdict,
        target=target.name if target is not None else None,
        rule=api._rule_json(rule, None) if rule is not None else None,
        socket=socket,
        reason=reason,
        dispatcher=None if ours is None else {"verdict": ours.shown},
        programs=[
            {
                "id": r.prog_id,
                "name": r.name,
                "position": i,
                "ours": r.ours,
                "verdict": r.shown,
                "socket": r.cookie or None,
                "reuseport_group": r.group,
            }
            for i, r in enumerate(runs, 1)
        ],
        normal_lookup=normal,
        notes=notes,
    )
    out["explanation"] = describe(out)
    return out


def _not_looked_up(out: dict[str, Any], proto: str) -> dict[str, Any]:
    """Multicast and broadcast: the kernel runs no sk_lookup program for them."""
    tcp = proto == "tcp"
    out.update(
        verdict="drop" if tcp else "pass",
        target=None,
        rule=None,
        socket=None,
        reason="not-looked-up",
        dispatcher=None,
        programs=[],
        decided_by=None,
        normal_lookup=None,
        notes=[],
    )
    out["explanation"] = (
        "TCP to a multicast or broadcast address is discarded before any socket lookup"
        if tcp
        else "the kernel delivers multicast and broadcast datagrams to every socket joined "
        "or bound there, without running any sk_lookup program: no rule applies"
    )
    return out


def _reason(
    ours: Run | None, moved: tuple[int, str] | None, rule: Rule | None, loaded: bool
) -> str:
    if not loaded or ours is None:
        return "no-dispatcher"
    if moved is not None:
        return REASONS[moved[1]]
    if rule is None:
        return "no-rule"
    # the live program of another version: what the rule says, with the verdict it gave
    if rule.action == "drop":
        return "drop-rule"
    return "steered" if ours.selected else "missing-socket"


def _overridden(e: dict[str, Any], rule: str) -> str:
    by = e.get("decided_by") or {}
    ours = f"{rule} decided otherwise" if rule else "sklookupctl selected no socket"
    if by.get("runs") == "before ours":
        return (
            f"{ours}; another sk_lookup program (id {by.get('id')}), running before ours, "
            "selected a socket and ours selected none"
        )
    return (
        f"{ours}, but another sk_lookup program (id {by.get('id')}) running after ours "
        "selected a socket, and the last selection counts"
    )


def describe(e: dict[str, Any]) -> str:
    """The explanation in one sentence (text output)."""
    r = e["rule"]
    rule = f"rule {r['protocol']} {r['prefix']} {r['ports']}" if r else ""
    what = {
        "no-dispatcher": "sklookupctl steers nothing in this namespace",
        "no-rule": f"no rule covers {e['protocol']} {e['address']} port {e['port']}",
        "steered": f"{rule} steers it to target {r['target'] if r else '?'}",
        "drop-rule": f"{rule} drops it",
        "missing-socket": f"{rule} steers to target {r['target'] if r else '?'}, which has no "
        f"live socket: on-missing {r['on_missing'] if r else '?'}",
        "assign-error": f"{rule} steers to target {r['target'] if r else '?'}, whose socket "
        f"refused it (family or protocol): on-missing {r['on_missing'] if r else '?'}",
        "passed": f"{rule} passes it",
        "overridden": _overridden(e, rule),
        "dropped-by-other-program": "another sk_lookup program of the namespace drops it "
        "(and no program selected a socket)",
    }.get(e["reason"], e["reason"])
    end = {
        "steer": "it goes to the socket selected",
        "drop": "no socket gets it (TCP answers with a reset, UDP with an ICMP port unreachable)",
        "pass": "the kernel's normal socket lookup goes on",
    }[e["verdict"]]
    if e["verdict"] == "pass":
        n = e["normal_lookup"]
        end += f", which finds {n['address']}" if n else ", which finds no socket: refused"
    return f"{what}; {end}"
