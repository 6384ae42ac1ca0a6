"""`sklookupctl demo`: everything end to end, in a namespace of its own."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import signal
import subprocess
import sys
from typing import Any

from . import api, echo, render
from . import netns as nsmod
from .errors import InvalidArgument

V4 = "192.0.2.0/24"
V6 = "2001:db8::/64"
PROXY = "[::]:8080"


def run(
    keep: bool,
    samples: int,
    as_json: bool,
    bpffs: str = api.DEFAULT_BPFFS,
    name: str | None = None,
) -> None:
    """`name`: the namespace the demo makes (it must not exist: the demo never touches one it
    did not make); default sklookupctl-demo-PID."""
    api.require_privileges()
    if name is not None:
        nsmod._check_name(name)
        if os.path.exists(nsmod.path_of(name)):
            raise InvalidArgument(
                f"network namespace {name} exists: the demo makes a namespace of its own",
                "give a name that is not taken, or none",
            )
    name = name or f"sklookupctl-demo-{os.getpid()}"
    proc: subprocess.Popen[str] | None = None
    api.netns_add(name)
    try:
        api.addr_add(name, V4)
        api.addr_add(name, V6)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sklookupctl.echo",
                "--netns",
                nsmod.path_of(name),
                "--tcp",
                PROXY,
                "--udp",
                PROXY,
                "--lifetime",
                "0" if keep else "300",
            ],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline() or "{}")
        if "pid" not in ready:
            raise RuntimeError("the demo's echo proxy did not start")
        for proto in ("tcp", "udp"):
            for prefix in (V4, V6):
                api.attach(name, proto, prefix, "all", to=PROXY, name=f"proxy-{proto}", bpffs=bpffs)
        rows = _dial(name, samples)
        st = api.status(name, bpffs=bpffs)
        if as_json:
            render.emit_json({"netns": name, "proxy_pid": proc.pid, "dials": rows, "status": st})
        else:
            render.say(
                f"netns {name}: {V4} and {V6} are AnyIP; one echo proxy (pid "
                f"{proc.pid}) listens on {PROXY} for tcp and udp; every port of both "
                "prefixes is steered to it."
            )
            render.simple_table(
                "Where each dial landed (the destination the proxy saw)",
                ["proto", "dialled", "proxy saw", ""],
                [
                    [r["protocol"], r["dialled"], r["landed"], "ok" if r["ok"] else "WRONG"]
                    for r in rows
                ],
            )
            render.status(st)
        if not all(r["ok"] for r in rows):
            raise SystemExit(1)
        if keep:
            render.say(
                "\nLeft running. To clean up:\n"
                f"  kill {proc.pid}\n"
                f"  sklookupctl --bpffs {bpffs} netns del {name}"
            )
    finally:
        if not keep:
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout=10)
            api.netns_del(name, bpffs=bpffs)


def _dial(name: str, samples: int) -> list[dict[str, Any]]:
    rng = random.Random()
    rows = []
    v4 = ipaddress.ip_network(V4)
    v6 = ipaddress.ip_network(V6)
    with nsmod.open_netns(name) as ns, nsmod.enter(ns):
        for i in range(samples):
            proto = ("tcp", "udp")[i % 2]
            if (i // 2) % 2 == 0:
                addr: ipaddress.IPv4Address | ipaddress.IPv6Address = v4[rng.randrange(1, 255)]
            else:
                addr = v6[rng.randrange(1, 2**64 - 1)]
            port = rng.randrange(1, 65536)
            dial = echo.dial_tcp if proto == "tcp" else echo.dial_udp
            landed = dial(str(addr), port)
            rows.append(
                {
                    "protocol": proto,
                    "dialled": f"{addr} {port}",
                    "landed": landed,
                    "ok": landed == f"{addr} {port}",
                }
            )
    return rows
