"""Output: rich tables for people, JSON for programs. The only module that imports rich, and
only when a table or a progress bar is drawn (importing rich costs a warm command a third of
its time)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from . import faults
from .errors import OutputFailed

if TYPE_CHECKING:
    from rich.console import Console

    from .api import ApplyResult


class _Stdout:
    """sys.stdout (the current one: click's CliRunner swaps it), where a reader that went away
    (`| head -1`) ends the output, not the command: what the command did stands."""

    def write(self, text: str) -> int:
        if sys.stdout is None:  # closed when the command started: nobody reads
            return len(text)
        try:
            return sys.stdout.write(text)
        except BrokenPipeError:
            _stop_output()
            return len(text)
        except OSError as e:
            raise _failed(e) from None

    def flush(self) -> None:
        if sys.stdout is None:
            return
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _stop_output()
        except OSError as e:
            raise _failed(e) from None

    def isatty(self) -> bool:
        return sys.stdout is not None and sys.stdout.isatty()

    @property
    def encoding(self) -> str:
        return (sys.stdout.encoding if sys.stdout is not None else None) or "utf-8"


def _failed(e: OSError) -> OutputFailed:
    return OutputFailed(f"cannot write the output: {e.strerror or e}")


_stopped = [False]


def output_stopped() -> bool:
    """Whether the reader of stdout went away (a command that streams, such as trace, ends)."""
    return _stopped[0]


def _stop_output() -> None:
    """Send what is left of the output (and the interpreter's last flush) to /dev/null."""
    _stopped[0] = True
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


STDOUT = _Stdout()


def clean(text: object) -> str:
    """Text from outside (names, process names, paths, file contents) made safe to show: every
    character that is not printable (escape sequences, newlines, bidi controls, bytes that were
    not UTF-8) shown escaped, as `\\x1b`. Nothing is printed without passing here: say(),
    line(), cell(), and the CLI's error lines. Rich never interprets markup in it (the console
    is made with markup off, and tables get Text, not markup)."""
    s = str(text)
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if ch.isprintable():
            out.append(ch)
        else:
            o = ord(ch)
            out.append(
                f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"
            )
    return "".join(out)


def console(stderr: bool = False) -> Console:
    from rich.console import Console

    # made per call, on the current sys.stdout, so click's CliRunner captures it; piped output
    # (grep, less, logs) gets wide lines rather than tables wrapped at 80 columns. No markup,
    # no emoji codes, no highlighting: what is printed is what the text says (see clean)
    out: Any = sys.stderr if stderr else STDOUT
    width = None if out.isatty() else 200
    return Console(
        file=out, highlight=False, markup=False, emoji=False, soft_wrap=True, width=width
    )


def cell(text: object, style: str = "") -> Any:
    """A table cell or a line for rich: the text cleaned, never read as markup."""
    from rich.text import Text

    return Text(clean(text), style=style)


def line(c: Console, *parts: object) -> None:
    """Print one line made of parts: strings (cleaned) and cells (already Text)."""
    from rich.text import Text

    c.print(Text.assemble(*(p if isinstance(p, Text) else clean(p) for p in parts)))


def write(text: str) -> None:
    faults.point("report.write")
    STDOUT.write(text)
    STDOUT.flush()


def emit_json(data: Any) -> None:
    write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def json_line(data: Any) -> None:
    """One JSON object on one line (streams: trace)."""
    write(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str) + "\n")


def trace_line(d: dict[str, Any]) -> None:
    """A decision of `trace` (Decision.to_json) as one line of text."""
    import time as _time

    t = d["time"]
    stamp = _time.strftime("%H:%M:%S", _time.localtime(t)) + f".{int(t % 1 * 1e6):06d}"

    def ep(addr: str, port: int) -> str:
        return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"

    r = d["rule"]
    rule = f"rule {r['protocol']} {r['prefix']} {r['ports']}" if r else "no rule"
    what = d["verdict"] + (f" -> {d['target']}" if d["target"] else "")
    reason = "" if d["reason"] in ("steered", "drop-rule", "no-rule") else f" ({d['reason']})"
    say(
        f"{stamp} {d['protocol']} {ep(d['source'], d['source_port'])} -> "
        f"{ep(d['destination'], d['destination_port'])}  {what}{reason}  {rule}"
    )


def explanation(e: dict[str, Any]) -> None:
    """`explain` as text: the verdict and why, then the details."""

    def sock(x: dict[str, Any] | None) -> str:
        if x is None:
            return "none"
        if "group" in x:
            return (
                f"{x['address'] or '?'}: a reuseport group of {len(x['group'])} live sockets; "
                "the kernel picks one by the flow's hash"
            )
        held = ", ".join(f"pid {h['pid']} ({h['comm']}) fd {h['fd']}" for h in x["holders"])
        where = f"{x['address'] or '?'} (cookie {x['cookie']})"
        return where + (f", held by {held}" if held else "")

    say(f"{e['protocol']} {e['address']} port {e['port']} in {e['netns']}: {e['verdict']}")
    say(f"  why:      {e['explanation']}")
    r = e["rule"]
    if r:
        miss = f"(on missing: {r['on_missing']})"
        act = "drop" if r["action"] == "drop" else f"-> {r['target']} {miss}"
        say(f"  rule:     {r['protocol']} {r['prefix']} {r['ports']} {act}")
    if e["socket"] is not None:
        say(f"  socket:   {sock(e['socket'])}")
    if e["verdict"] == "pass":
        say(f"  normally: {sock(e['normal_lookup'])}")
    progs = e["programs"]
    for p in progs:
        who = "sklookupctl" if p["ours"] else "another tool's"
        at = f"{p['position']}/{len(progs)}"
        say(f"  program {at}: id {p['id']} {p['name']} ({who}): {p['verdict']}")
    for n in e["notes"]:
        say(f"  note:     {n}")


def say(text: str) -> None:
    """One plain line (no markup: addresses such as [::1] stay as they are; cleaned)."""
    write(clean(text) + "\n")


RULES_SHOWN = 100  # rules in status's table; a table of 100,000 rows helps nobody


def status_json(st: dict[str, Any]) -> None:
    """`status --json`: the rules are streamed, one object per line, in chunks (a RuleRows
    makes each line with string formatting: no dict or json.dumps per rule)."""
    rules = st["rules"]
    head = json.dumps(
        {k: v for k, v in st.items() if k != "rules"}, indent=2, sort_keys=True, default=str
    )
    import itertools

    lines = rules.json_lines() if hasattr(rules, "json_lines") else map(_compact, rules)
    write(head[: -len("\n}")] + ',\n  "rules": [')
    sep = "\n    "
    while chunk := list(itertools.islice(lines, 8192)):
        write(sep + ",\n    ".join(chunk))
        sep = ",\n    "
    write("\n  ]\n}\n" if sep != "\n    " else "]\n}\n")


def _compact(d: Any) -> str:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)


def status(st: dict[str, Any]) -> None:
    c = console()
    if st.get("state") == "other-layout":
        line(
            c,
            f"netns {st['netns']}: state of an earlier sklookupctl (layout {st['layout']}) in "
            f"{st['path']}, {'steering' if st['attached'] else 'DETACHED'} as before; "
            "`sklookupctl upgrade` moves it to this version (writing commands refuse it until "
            "then)",
        )
        for r in st["rules"]:
            action = "drop" if r["action"] == "drop" else f"steer -> {r['target']}"
            line(
                c,
                f"  {r['protocol']} {r['prefix']} {r['ports']} {action}  "
                f"(steered {r['counters']['steered']}, dropped {r['counters']['dropped']})",
            )
        for t in st["targets"]:
            line(c, f"  target {t['name']} {t['address']}: socket {t['socket']}")
        return
    if not st["loaded"]:
        line(c, f"netns {st['netns']} (inode {st['netns_inode']}): no sklookupctl dispatcher")
        if st.get("state") == "unfinished":
            line(
                c,
                f"{st['path']} was left by a command that was killed before it went live: "
                "it steers nothing; the next change or `sklookupctl gc` removes it",
            )
        if st["other_programs"]:
            line(c, f"other sk_lookup programs attached: {_ids(st['other_programs'])}")
        return
    position = (
        f"run position {st['position']} of {len(st['other_programs']) + 1}"
        if st["position"]
        else "not attached"
    )
    line(
        c,
        f"netns {st['netns']} (inode {st['netns_inode']}): program {st['program_id']}, "
        f"link {st['link_id']}, {position}",
    )
    if st["other_programs"]:
        line(c, f"other sk_lookup programs attached: {_ids(st['other_programs'])}")
    if st.get("state") == "detached":
        line(
            c,
            cell("DETACHED", "bold red"),
            ": the link no longer runs in this namespace (something other "
            "than sklookupctl detached it), so nothing below steers; the next change attaches "
            "it again, `detach --all` removes it",
        )
    written = st.get("written_by") or "an earlier version"
    line(
        c,
        f"dispatcher: program tag {st.get('program_tag')}, generation written by {written}; "
        f"this is sklookupctl v{st.get('version')}"
        + (
            " (its dispatcher differs: `sklookupctl upgrade` loads it, rules and sockets kept)"
            if st.get("program_current") is False
            else ""
        ),
    )
    sockmap = st.get("sockmap", {})
    line(
        c,
        f"state: {st['path']} (generation {st['generation']}, "
        f"{st['memlock'] / 2**20:.1f} MiB of kernel memory, "
        f"{sockmap.get('filled', 0)} of {sockmap.get('capacity', 0)} socket slots filled)",
    )
    from rich.table import Table

    rules = Table(title="Rules (most specific first)", title_justify="left")
    for col in ("proto", "prefix", "ports", "action", "if socket missing"):
        rules.add_column(col)
    for col in ("lookups", "steered", "dropped", "passed", "missing", "errors"):
        rules.add_column(col, justify="right")
    all_rules = st["rules"]
    first = all_rules.dicts(RULES_SHOWN) if hasattr(all_rules, "dicts") else all_rules[:RULES_SHOWN]
    for r in first:
        action = "drop" if r["action"] == "drop" else f"steer -> {r['target']}"
        missing = "" if r["action"] == "drop" else r["on_missing"]
        n = r["counters"]
        rules.add_row(
            *map(cell, (r["protocol"], r["prefix"], r["ports"], action, missing)),
            *(cell(n[k]) for k in ("lookups", "steered", "dropped", "passed", "missing", "errors")),
        )
    sm = st.get("summary")
    if sm:
        shown = "" if sm["rules_shown"] == sm["rules"] else f" ({sm['rules_shown']} shown)"
        line(
            c,
            f"summary: {sm['rules']} rules{shown}: {sm['steer_rules']} steer, "
            f"{sm['drop_rules']} drop; {sm['targets']} targets, {sm['targets_live']} with a "
            f"live socket; lookups {sm['lookups']}: steered {sm['steered']}, dropped "
            f"{sm['dropped']}, passed {sm['passed']}, missing socket {sm['missing']}",
        )
    if st["rules"]:
        c.print(rules)
        if len(st["rules"]) > RULES_SHOWN:
            line(
                c,
                f"... and {len(st['rules']) - RULES_SHOWN} more rules, {len(st['rules'])} in all "
                "(`status --json` lists them with their counters, `export` as a rule file)",
            )
    elif sm and sm["rules"]:
        line(c, "no rule matches the filters")
    else:
        line(c, "no rules: every lookup goes on as if sklookupctl were not there")
    if st["targets"]:
        targets = Table(title="Targets", title_justify="left")
        for col in ("name", "proto", "address", "socket", "members", "cookie", "held by"):
            targets.add_column(col)
        for col in ("rules", "lookups", "steered", "missing"):
            targets.add_column(col, justify="right")
        for t in st["targets"]:
            tc = t.get("counters") or {}
            held = ", ".join(f"{h['pid']} ({h['comm']}) fd {h['fd']}" for h in t["holders"])
            sock = {
                "live": cell("live"),
                "waiting": cell("waiting", "yellow"),
            }.get(t["socket"], cell("MISSING", "bold red"))
            if t["reuseport"] == "exact":
                members = "exact"
            elif t["members"] > 1:
                members = f"{t['alive']} of {t['members']} alive (reuseport group)"
            else:
                members = "1"
            targets.add_row(
                cell(t["name"]),
                cell(t["protocol"]),
                cell(t["address"]),
                sock,
                cell(members),
                cell(t["cookie"] or "-"),
                cell(held or "-"),
                cell(t.get("rules", "")),
                *(cell(tc.get(k, "")) for k in ("lookups", "steered", "missing")),
            )
        c.print(targets)
        if any(t["socket"] == "missing" for t in st["targets"]):
            line(
                c,
                "A missing socket was closed by its owner: its rules drop (or pass where "
                "on-missing is pass) until `attach` or `apply` registers a new one.",
            )


STATES = {
    "steering": "steering",
    "detached": "DETACHED (something else detached its link; the next change re-attaches it)",
    "dead": "DEAD (the namespace is gone; `sklookupctl gc` removes this)",
    "unfinished": "unfinished (left by a killed command; never steered; `gc` removes it)",
    "damaged": "DAMAGED (`detach --all` in that namespace removes it)",
    "damaged-dead": "damaged, namespace gone (`gc` removes it)",
    "other-layout": "made by an earlier sklookupctl (`sklookupctl upgrade` there moves it to "
    "this version)",
    "other-layout-dead": "made by another version, namespace gone (`gc` removes it)",
}


def status_all(entries: list[dict[str, Any]]) -> None:
    if not entries:
        say("sklookupctl has no state in this bpffs")
        return
    from rich.table import Table

    t = Table(title="Namespaces with sklookupctl state", title_justify="left")
    for col in ("namespace", "inode", "cookie", "state", "generation", "rules", "targets"):
        t.add_column(col)
    for e in entries:
        name = ", ".join(e["names"]) or e["label"] or "?"
        t.add_row(
            *map(
                cell,
                (
                    name,
                    e["netns_inode"] or "?",
                    e["netns_cookie"] or "?",
                    STATES.get(e["state"], e["state"]),
                    e["generation"],
                    e["rules"],
                    e["targets"],
                ),
            )
        )
    console().print(t)


def gc_line(e: dict[str, Any]) -> str:
    what = {
        "dead": "removed the state of a namespace that is gone",
        "unfinished": "removed what a killed command left",
        "other-layout-dead": "removed another version's state of a namespace that is gone",
        "damaged-dead": "removed damaged state of a namespace that is gone",
    }.get(e["state"], "retired stale generations of")
    who = e["label"] or f"inode {e['netns_inode']}"
    return f"{what}: {who} ({e['path']})"


def _ids(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids)


def simple_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*map(cell, row))
    console().print(t)


# files above this size get a progress bar on a terminal (about 4,000 rules)
PROGRESS_BYTES = 256 * 1024


@contextlib.contextmanager
def progress_for(path: str, quiet: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A progress callback drawing a bar on stderr for large files on a terminal, else None."""
    try:
        big = path != "-" and os.path.getsize(path) > PROGRESS_BYTES
    except OSError:
        big = False
    if quiet or not big or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    bar = Progress(
        TextColumn("{task.description:<9}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=Console(file=sys.stderr),
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total or 1)
        bar.update(tasks[stage], completed=done, total=total or 1)

    with bar:
        yield update


def _rule_line(r: Any) -> str:
    return f"{r.key} {r.describe()}"


SHOWN = 200  # lines of a difference printed; --json has them all


def apply_result(res: ApplyResult) -> None:
    c = console()
    groups: list[tuple[list[Any], Callable[[Any], str]]] = [
        (res.targets_added, lambda t: f"  + target {t}"),
        (res.targets_changed, lambda t: f"  ~ target {t}"),
        (res.targets_removed, lambda t: f"  - target {t}"),
        (res.added, lambda r: f"  + {_rule_line(r)}"),
        (res.changed, lambda ab: f"  ~ {_rule_line(ab[1])} (was {ab[0].describe()})"),
        (res.removed, lambda r: f"  - {_rule_line(r)}"),
    ]
    for note in res.notes:
        line(c, f"note: {note}")
    if not res.differs:
        if res.applied:
            line(
                c,
                f"applied {res.file} to {res.netns} (generation {res.generation}): "
                "no rule or target changed",
            )
        else:
            line(c, f"{res.file}: {res.rules} rules, nothing to change in {res.netns}")
        return
    summary = (
        f"{len(res.added)} added, {len(res.changed)} changed, {len(res.removed)} removed rules; "
        f"{len(res.targets_added)} added, {len(res.targets_changed)} changed, "
        f"{len(res.targets_removed)} removed targets"
    )
    left = SHOWN
    for items, fmt in groups:
        for item in items[:left]:
            line(c, fmt(item))
        left -= min(left, len(items))
    total = sum(len(items) for items, _ in groups)
    if total > SHOWN:
        line(c, f"  ... and {total - SHOWN} more (--json lists them all)")
    if res.dry_run:
        line(c, f"dry run: would apply {res.file} to {res.netns}: {summary}")
    else:
        loaded = ", loaded the dispatcher" if res.loaded else ""
        line(
            c, f"applied {res.file} to {res.netns} (generation {res.generation}{loaded}): {summary}"
        )
