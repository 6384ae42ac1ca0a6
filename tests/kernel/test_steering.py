"""Delivery and refusal, proven with real connections in a netns per test."""

from __future__ import annotations

import json
import random
import socket
import subprocess
from dataclasses import dataclass

import pytest

from sklookupctl import netns as nsmod

from .conftest import NS

LANDS = "lands"  # on the steered proxy, which saw the original destination
REFUSED = "refused"


@dataclass(frozen=True)
class Redirect:
    desc: str
    proto: str
    proxy: str  # where the proxy listens (port 0: any)
    v6only: bool
    prefix: str
    ports: str
    dial_host: str
    dial_ports: tuple[int, ...]


REDIRECTS = [
    Redirect(
        "tcp v4 range",
        "tcp",
        "127.0.0.1:0",
        False,
        "192.0.2.0/24",
        "1000-2000",
        "192.0.2.7",
        (1000, 1500, 2000),
    ),
    Redirect(
        "tcp v4 all ports",
        "tcp",
        "127.0.0.1:0",
        False,
        "192.0.2.0/24",
        "all",
        "192.0.2.254",
        (1, 80, 443, 65535),
    ),
    Redirect(
        "tcp v4 single address",
        "tcp",
        "127.0.0.1:0",
        False,
        "198.51.100.9",
        "443",
        "198.51.100.9",
        (443,),
    ),
    Redirect(
        "tcp v6 range",
        "tcp",
        "[::1]:0",
        True,
        "2001:db8::/64",
        "8000-9000",
        "2001:db8::42",
        (8000, 8443, 9000),
    ),
    Redirect(
        "tcp v4 to dual-stack v6",
        "tcp",
        "[::]:0",
        False,
        "192.0.2.0/24",
        "all",
        "192.0.2.3",
        (22, 4242),
    ),
    Redirect(
        "udp v4 range",
        "udp",
        "127.0.0.1:0",
        False,
        "192.0.2.0/24",
        "53-60",
        "192.0.2.53",
        (53, 57, 60),
    ),
    Redirect(
        "udp v6 all",
        "udp",
        "[::1]:0",
        True,
        "2001:db8::/64",
        "all",
        "2001:db8::53",
        (53, 5353, 65535),
    ),
    Redirect(
        "udp v4 to dual-stack v6",
        "udp",
        "[::]:0",
        False,
        "198.51.100.0/24",
        "all",
        "198.51.100.200",
        (7, 123),
    ),
]


@pytest.mark.parametrize("case", REDIRECTS, ids=lambda c: c.desc)
def test_redirect(ns: NS, case: Redirect) -> None:
    p = ns.proxy(**{case.proto: case.proxy}, v6only=case.v6only)
    host = case.proxy.rsplit(":", 1)[0]
    ns.ok("attach", case.proto, case.prefix, case.ports, "--to", f"{host}:{p.port}")
    for port in case.dial_ports:
        assert ns.dial(case.proto, case.dial_host, port) == f"{case.dial_host} {port}"


def test_random_ports_across_range_land_with_original_destination(ns: NS) -> None:
    p = ns.proxy(tcp="127.0.0.1:0", udp="127.0.0.1:0")
    ns.ok("attach", "tcp", "192.0.2.0/24", "1-65535", "--to", f"127.0.0.1:{p.port}")
    ns.ok("attach", "udp", "192.0.2.0/24", "1-65535", "--to", f"127.0.0.1:{p.port}")
    rng = random.Random(7)
    for _ in range(25):
        host, port = f"192.0.2.{rng.randrange(1, 255)}", rng.randrange(1, 65536)
        assert ns.dial("tcp", host, port) == f"{host} {port}"
        assert ns.dial("udp", host, port) == f"{host} {port}"


def test_outside_the_rule_goes_to_normal_listeners_or_is_refused(ns: NS) -> None:
    p = ns.proxy(tcp="127.0.0.1:0", udp="127.0.0.1:0")
    normal = ns.proxy(tcp="192.0.2.200:2001", udp="192.0.2.200:2001")
    ns.ok("attach", "tcp", "192.0.2.0/25", "1000-2000", "--to", f"127.0.0.1:{p.port}")
    ns.ok("attach", "udp", "192.0.2.0/25", "1000-2000", "--to", f"127.0.0.1:{p.port}")
    for proto in ("tcp", "udp"):
        assert ns.dial(proto, "192.0.2.1", 1000) == "192.0.2.1 1000"  # steered
        # port outside the range, address inside: nothing listens there
        assert ns.dial(proto, "192.0.2.1", 2001) == "refused"
        # address outside the prefix: its own listener answers, not the proxy
        assert ns.dial(proto, "192.0.2.200", 2001) == "192.0.2.200 2001"
        assert ns.dial(proto, "192.0.2.200", 1500) == "refused"
        assert normal.proc.poll() is None


def test_drop_rule_refuses_although_a_listener_exists(ns: NS) -> None:
    ns.proxy(tcp="192.0.2.10:80", udp="192.0.2.10:80")
    assert ns.dial("tcp", "192.0.2.10", 80) == "192.0.2.10 80"
    ns.ok("attach", "tcp", "192.0.2.10", "80", "--drop")
    ns.ok("attach", "udp", "192.0.2.0/24", "all", "--drop")
    assert ns.dial("tcp", "192.0.2.10", 80) == "refused"
    assert ns.dial("udp", "192.0.2.10", 80) in ("refused", "timeout")
    assert ns.dial("udp", "192.0.2.10", 80) != "192.0.2.10 80"


@dataclass(frozen=True)
class Lookup:
    proto: str
    host: str
    port: int
    expect: str  # a target name, "refused" or "normal"


PRECEDENCE_RULES = [
    # proto, prefix, ports, target or "drop"
    ("tcp", "192.0.2.0/24", "all", "a"),
    ("tcp", "192.0.2.0/24", "80-90", "b"),
    ("tcp", "192.0.2.0/24", "85", "c"),
    ("tcp", "192.0.2.128/25", "1000-2000", "d"),
    ("tcp", "192.0.2.129", "1500", "drop"),
    ("tcp", "198.51.100.0/24", "all", "drop"),
    ("tcp", "198.51.100.0/25", "80", "a"),
    ("udp", "192.0.2.0/24", "53", "b"),
    ("tcp", "2001:db8::/64", "all", "a"),
    ("tcp", "2001:db8::/120", "443", "b"),
]
PRECEDENCE_LOOKUPS = [
    Lookup("tcp", "192.0.2.1", 22, "a"),  # only the /24 all
    Lookup("tcp", "192.0.2.1", 80, "b"),  # narrower range of the same prefix
    Lookup("tcp", "192.0.2.1", 85, "c"),  # narrowest
    Lookup("tcp", "192.0.2.1", 91, "a"),
    Lookup("tcp", "192.0.2.130", 1000, "d"),  # longer prefix
    Lookup("tcp", "192.0.2.130", 80, "b"),  # /25 has no rule for 80: the /24's apply
    Lookup("tcp", "192.0.2.129", 1500, "refused"),  # /32 drop
    Lookup("tcp", "192.0.2.129", 1501, "d"),
    Lookup("tcp", "198.51.100.1", 80, "a"),  # longer prefix beats the drop
    Lookup("tcp", "198.51.100.1", 81, "refused"),  # the /25 has no rule for 81: /24 drops
    Lookup("tcp", "198.51.100.200", 80, "refused"),  # outside the /25
    Lookup("udp", "192.0.2.1", 53, "b"),
    Lookup("udp", "192.0.2.1", 54, "normal"),  # no udp rule: normal lookup (listener)
    Lookup("tcp", "2001:db8::5", 443, "b"),
    Lookup("tcp", "2001:db8::1:5", 443, "a"),  # outside the /120
    Lookup("tcp", "203.0.113.1", 80, "normal"),  # no rule at all
]


def test_precedence(ns: NS) -> None:
    ns.proxy(tcp="203.0.113.1:80", udp="192.0.2.1:54", tag="normal")
    ports: dict[str, int] = {}
    for name in ("a", "b", "c", "d"):
        ports[name] = ns.proxy(tcp="[::]:0", udp="[::]:0", tag=name).port
    for proto, prefix, prange, target in PRECEDENCE_RULES:
        if target == "drop":
            ns.ok("attach", proto, prefix, prange, "--drop")
        else:
            ns.ok(
                "attach",
                proto,
                prefix,
                prange,
                "--to",
                f"[::]:{ports[target]}",
                "--name",
                f"{proto}-{target}",
            )
    assert len(ns.status()["targets"]) == 5  # type: ignore[arg-type]
    for lk in PRECEDENCE_LOOKUPS:
        got = ns.dial(lk.proto, lk.host, lk.port)
        if lk.expect == "refused":
            assert got in ("refused", "timeout"), lk
        else:
            assert got == f"{lk.host} {lk.port} {lk.expect}", lk


def test_steering_persists_after_the_cli_exits(ns: NS) -> None:
    p = ns.proxy(tcp="127.0.0.1:0")
    out = ns.script("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{p.port}", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["loaded_dispatcher"] is True
    assert ns.dial("tcp", "192.0.2.77", 31337) == "192.0.2.77 31337"
    st = ns.script("status", "--json")
    assert json.loads(st.stdout)["rules"][0]["prefix"] == "192.0.2.0/24"


def test_established_connections_untouched_by_attach_and_detach(ns: NS) -> None:
    ns.proxy(tcp="192.0.2.9:5000")  # normal listener
    p = ns.proxy(tcp="127.0.0.1:0")
    with nsmod.open_netns(ns.name) as n, nsmod.enter(n):
        before = socket.create_connection(("192.0.2.9", 5000), timeout=2)
    assert before.recv(100) == b"192.0.2.9 5000\n"
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{p.port}")
    with nsmod.open_netns(ns.name) as n, nsmod.enter(n):
        steered = socket.create_connection(("192.0.2.9", 5000), timeout=2)
    assert steered.recv(100) == b"192.0.2.9 5000\n"
    ns.ok("detach", "tcp", "192.0.2.0/24", "all")
    for conn in (before, steered):  # both still echo through their own server
        conn.sendall(b"still here\n")
        assert conn.recv(100) == b"still here\n"
        conn.close()


def test_detach_restores_normal_behaviour(ns: NS) -> None:
    ns.proxy(tcp="192.0.2.5:80")
    p = ns.proxy(tcp="127.0.0.1:0")
    ns.ok("attach", "tcp", "192.0.2.0/24", "80", "--to", f"127.0.0.1:{p.port}")
    ns.ok("attach", "tcp", "192.0.2.0/24", "81", "--drop")
    assert ns.dial("tcp", "192.0.2.6", 80) == "192.0.2.6 80"  # only the proxy has .6
    ns.ok("detach", "tcp", "192.0.2.0/24", "80")
    assert ns.dial("tcp", "192.0.2.6", 80) == "refused"
    assert ns.dial("tcp", "192.0.2.5", 80) == "192.0.2.5 80"
    ns.ok("detach", "--all")
    assert ns.files() == []
    with nsmod.open_netns(ns.name) as n:
        from sklookupctl.bpfsys import query_netns_programs

        assert query_netns_programs(n.fd) == []


def test_proxy_closing_its_socket_makes_rules_drop(ns: NS) -> None:
    ns.proxy(tcp="192.0.2.20:443")  # would take the traffic if the rule let it fall through
    p = ns.proxy(tcp="127.0.0.1:0")
    ns.ok("attach", "tcp", "192.0.2.20", "443", "--to", f"127.0.0.1:{p.port}")
    ns.ok(
        "attach", "tcp", "192.0.2.21", "443", "--to", f"127.0.0.1:{p.port}", "--on-missing", "pass"
    )
    ns.proxy(tcp="192.0.2.21:443")
    assert ns.dial("tcp", "192.0.2.20", 443) == "192.0.2.20 443"
    (t,) = ns.status()["targets"]  # type: ignore[misc]
    assert t["socket"] == "live" and t["holders"][0]["pid"] == p.pid
    p.stop()
    st = ns.status()
    (t,) = st["targets"]  # type: ignore[misc]
    assert t["socket"] == "missing" and t["cookie"] is None
    assert ns.dial("tcp", "192.0.2.20", 443) == "refused"  # default: drop
    assert ns.dial("tcp", "192.0.2.21", 443) == "192.0.2.21 443"  # on-missing pass
    assert "MISSING" in ns.ok("status").output
    # the proxy comes back: the same attach registers its new socket
    p2 = ns.proxy(tcp=f"127.0.0.1:{p.port}")
    res = ns.ok("attach", "tcp", "192.0.2.20", "443", "--to", f"127.0.0.1:{p.port}")
    assert "registered again" in res.output
    assert ns.dial("tcp", "192.0.2.20", 443) == "192.0.2.20 443"
    assert ns.status()["targets"][0]["holders"][0]["pid"] == p2.pid  # type: ignore[index]


def test_rerun_is_idempotent_and_conflicts_need_replace(ns: NS) -> None:
    a = ns.proxy(tcp="127.0.0.1:0")
    b = ns.proxy(tcp="127.0.0.1:0")
    args = ("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{a.port}")
    ns.ok(*args)
    before = ns.status()
    res = ns.ok(*args)
    assert "unchanged" in res.output
    assert ns.status() == before
    res = ns.cli("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{b.port}")
    assert res.exit_code == 1 and "--replace" in res.output
    assert ns.status() == before
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{b.port}", "--replace")
    assert ns.dial("tcp", "192.0.2.1", 1) == "192.0.2.1 1"
    (t,) = ns.status()["targets"]  # type: ignore[misc]
    assert t["address"] == f"127.0.0.1:{b.port}"  # a's target was unused and removed
    res = ns.cli("attach", "tcp", "192.0.2.0/24", "100-200", "--drop")
    assert res.exit_code == 0
    res = ns.cli("attach", "tcp", "192.0.2.0/24", "150-300", "--drop")
    assert res.exit_code == 1 and "partly overlap" in res.output


def test_pid_and_fd(ns: NS) -> None:
    p = ns.proxy(tcp="127.0.0.1:0", udp="[::]:0")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--pid", str(p.pid), "--fd", str(p.tcp_fd))
    ns.ok("attach", "udp", "2001:db8::/64", "all", "--pid", str(p.pid), "--fd", str(p.udp_fd))
    assert ns.dial("tcp", "192.0.2.8", 8) == "192.0.2.8 8"
    assert ns.dial("udp", "2001:db8::8", 8) == "2001:db8::8 8"


def test_concurrent_invocations_load_one_dispatcher(ns: NS) -> None:
    """Eight CLI processes race on a namespace with no dispatcher: the lock and the staging
    directory give exactly one dispatcher holding all eight rules."""
    p = ns.proxy(tcp="127.0.0.1:0")
    procs = [
        subprocess.Popen(
            ns.script_argv("attach", "tcp", f"192.0.2.{i}", "all", "--to", f"127.0.0.1:{p.port}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(1, 9)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    st = ns.status()
    assert len(st["rules"]) == 8  # type: ignore[arg-type]
    assert st["other_programs"] == []
    assert [f for f in ns.files() if "staging" in f] == []
    for i in range(1, 9):
        assert ns.dial("tcp", f"192.0.2.{i}", 1000 + i) == f"192.0.2.{i} {1000 + i}"
