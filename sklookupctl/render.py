"""Output: rich tables for people, JSON for programs. The only module that imports rich."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table


def console(stderr: bool = False) -> Console:
    # made per call, on the current sys.stdout, so click's CliRunner captures it; piped output
    # (grep, less, logs) gets wide lines rather than tables wrapped at 80 columns
    out = sys.stderr if stderr else sys.stdout
    width = None if out.isatty() else 200
    return Console(file=out, highlight=False, soft_wrap=True, width=width)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def say(text: str) -> None:
    console().print(text)


def status(st: dict[str, Any]) -> None:
    c = console()
    if not st["loaded"]:
        c.print(f"netns {st['netns']} (inode {st['netns_inode']}): no sklookupctl dispatcher")
        if st["other_programs"]:
            c.print(f"other sk_lookup programs attached: {_ids(st['other_programs'])}")
        return
    c.print(
        f"netns {st['netns']} (inode {st['netns_inode']}): program {st['program_id']}, "
        f"link {st['link_id']}, run position {st['position']} of "
        f"{len(st['other_programs']) + 1}"
    )
    if st["other_programs"]:
        c.print(f"other sk_lookup programs attached: {_ids(st['other_programs'])}")
    c.print(
        f"state: {st['path']} (generation {st['generation']}, "
        f"{st['memlock'] / 2**20:.1f} MiB of kernel memory)"
    )
    rules = Table(title="Rules (most specific first)", title_justify="left")
    for col in ("proto", "prefix", "ports", "action", "if socket missing"):
        rules.add_column(col)
    for col in ("lookups", "steered", "dropped", "missing", "errors"):
        rules.add_column(col, justify="right")
    for r in st["rules"]:
        action = "drop" if r["action"] == "drop" else f"steer -> {r['target']}"
        missing = "" if r["action"] == "drop" else r["on_missing"]
        n = r["counters"]
        rules.add_row(
            r["protocol"],
            r["prefix"],
            r["ports"],
            action,
            missing,
            *(str(n[k]) for k in ("lookups", "steered", "dropped", "missing", "errors")),
        )
    if st["rules"]:
        c.print(rules)
    else:
        c.print("no rules: every lookup goes on as if sklookupctl were not there")
    if st["targets"]:
        targets = Table(title="Targets", title_justify="left")
        for col in ("name", "proto", "address", "socket", "cookie", "held by"):
            targets.add_column(col)
        for t in st["targets"]:
            held = ", ".join(f"{h['pid']} ({h['comm']}) fd {h['fd']}" for h in t["holders"])
            sock = "live" if t["socket"] == "live" else "[bold red]MISSING[/]"
            targets.add_row(
                t["name"], t["protocol"], t["address"], sock, str(t["cookie"] or "-"), held or "-"
            )
        c.print(targets)
        if any(t["socket"] == "missing" for t in st["targets"]):
            c.print(
                "A missing socket was closed by its owner: its rules drop (or pass where "
                "on-missing is pass) until `attach` registers a new one."
            )


def _ids(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids)


def simple_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*row)
    console().print(t)
