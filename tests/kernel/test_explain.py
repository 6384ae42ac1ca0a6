"""`explain` says what the kernel does: against the definition of precedence on random rule
sets, against real connections, and with another tool's program in the namespace."""

from __future__ import annotations

import ipaddress
import json
import random
from pathlib import Path
from typing import Any

import pytest

from sklookupctl import explain as explain_mod
from sklookupctl import netns as nsmod
from sklookupctl import rulefile
from sklookupctl.rules import IPAddress, RuleSet, format_ports

from ..rulegen import random_rules
from .conftest import NS
from .test_coexistence import (
    FOREIGN_DROP_PORT,
    FOREIGN_REDIRECT_PORT,
    _foreign_socket,
    _serve_once_tagged,
    foreign_program,
)

# the AnyIP ranges of every test namespace (conftest.PREFIXES): lookups and connections stay
# inside them
V4 = [ipaddress.ip_network(p) for p in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]
V6 = [ipaddress.ip_network("2001:db8::/64")]
GONE_PORT = 9  # nothing listens there: the *-gone targets wait for their socket
SEEDS = range(3)


def _address(rng: random.Random, anchors: list[IPAddress]) -> IPAddress:
    a = rng.choice(anchors)
    if rng.random() < 0.5:
        return a
    width = a.max_prefixlen
    low = rng.randrange(1, 9 if width == 32 else 65)
    n = (int(a) >> low << low) | rng.getrandbits(low)
    return ipaddress.ip_address(n)


def random_setup(rng: random.Random, count: int) -> tuple[RuleSet, list[IPAddress]]:
    """rulegen's rules (targets `PROTO-live` and `PROTO-gone`, both on-missing values, drop
    rules) nested around a few anchors inside the test prefixes."""
    anchors: list[IPAddress] = []
    for _ in range(3):
        net = rng.choice(V4)
        anchors.append(net[rng.randrange(1, 255)])
        anchors.append(V6[0][rng.getrandbits(64)])
    return random_rules(rng, count, anchors, {4: 24, 6: 64})


def load(ns: NS, rs: RuleSet, tmp: Path) -> tuple[int, dict[str, int]]:
    """Apply the rule set: `*-live` targets on a dual-stack echo server, `*-gone` ones waiting.
    Returns the server's port and each live target's socket cookie."""
    live = ns.proxy(tcp="[::]:0", udp="[::]:0", tag="live")
    any6 = ipaddress.ip_address("::")
    targets = {
        "tcp-live": ("tcp", any6, live.port, False),
        "udp-live": ("udp", any6, live.port, False),
        "tcp-gone": ("tcp", any6, GONE_PORT, False),
        "udp-gone": ("udp", any6, GONE_PORT, False),
    }
    f = tmp / "rules.toml"
    f.write_text(rulefile.dumps(rs, targets))
    ns.ok("apply", "--allow-missing", str(f))
    cookies = {t["name"]: t["cookie"] for t in ns.status()["targets"] if t["cookie"]}  # type: ignore[union-attr, index]
    return live.port, cookies


def expected(rs: RuleSet, proto: str, addr: IPAddress, port: int) -> dict[str, Any]:
    """What the definition of precedence says explain must say."""
    rule = rs.match(proto, addr, port)
    if rule is None:
        return {"verdict": "pass", "reason": "no-rule", "rule": None, "target": None}
    r = {"protocol": proto, "prefix": str(rule.key.prefix), "action": rule.action}
    if rule.action == "drop":
        return {"verdict": "drop", "reason": "drop-rule", "rule": r, "target": None}
    if rule.target and rule.target.endswith("-live"):
        return {"verdict": "steer", "reason": "steered", "rule": r, "target": rule.target}
    verdict = "pass" if rule.on_missing == "pass" else "drop"
    return {"verdict": verdict, "reason": "missing-socket", "rule": r, "target": rule.target}


def lookups(
    rng: random.Random, rs: RuleSet, anchors: list[IPAddress], n: int
) -> list[tuple[str, IPAddress, int]]:
    out = []
    edges = [p for k in rs.rules for p in (k.lo, k.hi, k.lo - 1, k.hi + 1) if 0 < p < 65536]
    for _ in range(n):
        port = rng.choice(edges) if edges and rng.random() < 0.6 else rng.randrange(1, 65536)
        out.append((rng.choice(["tcp", "udp"]), _address(rng, anchors), port))
    return out


def run_explain(ns: NS, proto: str, addr: IPAddress, port: int) -> dict[str, Any]:
    with nsmod.open_netns(ns.name) as n:
        return explain_mod.explain(n, proto, str(addr), port, bpffs=ns.bpffs, wait=10)


@pytest.mark.parametrize("seed", SEEDS)
def test_explain_agrees_with_the_definition_of_precedence(
    ns: NS, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    rs, anchors = random_setup(rng, 60)
    _, cookies = load(ns, rs, tmp_path)
    before = [r["counters"] for r in ns.status()["rules"]]  # type: ignore[union-attr, index]
    for proto, addr, port in lookups(rng, rs, anchors, 300):
        got = run_explain(ns, proto, addr, port)
        want = expected(rs, proto, addr, port)
        case = f"seed {seed}: {proto} {addr} {port}"
        assert got["verdict"] == want["verdict"], case
        assert got["reason"] == want["reason"], case
        assert got["target"] == want["target"], case
        if want["rule"] is None:
            assert got["rule"] is None, case
        else:
            assert {k: got["rule"][k] for k in want["rule"]} == want["rule"], case
            rule = rs.match(proto, addr, port)
            assert rule is not None
            assert got["rule"]["ports"] == format_ports(rule.key.lo, rule.key.hi), case
        if want["verdict"] == "steer":
            assert got["socket"]["cookie"] == cookies[want["target"]], case
        else:
            assert got["socket"] is None, case
        assert [p["ours"] for p in got["programs"]] == [True], case
    # explaining moved no counter
    assert [r["counters"] for r in ns.status()["rules"]] == before  # type: ignore[union-attr, index]


@pytest.mark.parametrize("seed", SEEDS)
def test_explain_agrees_with_real_connections(ns: NS, tmp_path: Path, seed: int) -> None:
    rng = random.Random(100 + seed)
    rs, anchors = random_setup(rng, 40)
    port, _ = load(ns, rs, tmp_path)
    cases = lookups(rng, rs, anchors, 40)
    # lookups for the echo server's own port: the normal lookup finds it when nothing steers
    cases += [(rng.choice(["tcp", "udp"]), _address(rng, anchors), port) for _ in range(6)]
    # no socket takes it: TCP answers with a reset; UDP with an ICMP port unreachable, which
    # the kernel rate-limits per peer (the client may see a refusal or nothing)
    refused = {"tcp": {"refused"}, "udp": {"refused", "timeout"}}
    nothing = 0
    for proto, addr, dport in cases:
        got = run_explain(ns, proto, addr, dport)
        lands = f"{addr} {dport} live"
        if proto == "udp" and got["verdict"] != "steer" and got["normal_lookup"] is None:
            nothing += 1
            if nothing > 5:  # each may cost the dial's timeout
                continue
        seen = ns.dial(proto, str(addr), dport)
        case = f"seed {seed}: {proto} {addr} {dport}: explain {got['verdict']}, dial {seen!r}"
        if got["verdict"] == "steer":
            assert seen == lands, case
        elif got["verdict"] == "drop":
            assert seen in refused[proto], case
        elif got["normal_lookup"] is not None:
            assert got["normal_lookup"]["address"] == f"[::]:{port}", case
            assert seen == lands, case
        else:
            assert seen in refused[proto], case


def test_explain_with_another_tools_program(ns: NS) -> None:
    """The kernel's combination: the last selection wins, else a drop drops."""
    ours = ns.proxy(tcp="127.0.0.1:0", tag="ours")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{ours.port}")
    fd = _foreign_socket(ns)
    _serve_once_tagged(ns)
    with foreign_program(ns, fd) as foreign_id:  # attached after ours: it runs second
        # the foreign program drops, ours selected a socket: the selection wins
        e = json.loads(
            ns.ok("explain", "--json", "tcp", "192.0.2.1", str(FOREIGN_DROP_PORT)).stdout
        )
        assert (e["verdict"], e["reason"]) == ("steer", "steered")
        assert [(p["id"] == foreign_id, p["ours"], p["verdict"]) for p in e["programs"]] == [
            (False, True, "steer"),
            (True, False, "drop"),
        ]
        assert ns.dial("tcp", "192.0.2.1", FOREIGN_DROP_PORT).endswith("ours")
        # no rule of ours, the foreign program drops: dropped
        e = json.loads(
            ns.ok("explain", "--json", "tcp", "203.0.113.1", str(FOREIGN_DROP_PORT)).stdout
        )
        assert (e["verdict"], e["reason"], e["rule"]) == ("drop", "dropped-by-other-program", None)
        assert ns.dial("tcp", "203.0.113.1", FOREIGN_DROP_PORT) == "refused"
        # both select: the foreign one runs last, so its socket gets the connection
        e = json.loads(
            ns.ok("explain", "--json", "tcp", "192.0.2.1", str(FOREIGN_REDIRECT_PORT)).stdout
        )
        assert (e["verdict"], e["reason"]) == ("steer", "overridden")
        assert e["socket"]["address"].startswith("127.0.0.2:")
        assert e["rule"]["prefix"] == "192.0.2.0/24" and e["dispatcher"]["verdict"] == "steer"
        assert ns.dial("tcp", "192.0.2.1", FOREIGN_REDIRECT_PORT).endswith("foreign")
        text = ns.ok("explain", "tcp", "192.0.2.1", str(FOREIGN_REDIRECT_PORT)).stdout
        assert "another tool's" in text and "last selection counts" in text


def test_explain_nothing_loaded_and_bad_input(ns: NS) -> None:
    e = json.loads(ns.ok("explain", "--json", "tcp", "192.0.2.1", "80").stdout)
    assert (e["verdict"], e["reason"], e["programs"]) == ("pass", "no-dispatcher", [])
    for args in (
        ("tcp", "192.0.2.300", "80"),
        ("sctp", "192.0.2.1", "80"),
        ("tcp", "192.0.2.1", "0"),
        ("tcp", "192.0.2.1", "70000"),
        ("tcp", "::ffff:192.0.2.1", "80"),
        ("tcp", "fe80::1%lo", "80"),
    ):
        res = ns.cli("explain", *args)
        assert res.exit_code == 1, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_explain_while_tracing(ns: NS) -> None:
    """The traced copy the link runs while a trace runs is ours too."""
    from .test_trace import start_trace, steered_ns

    steered_ns(ns)
    proc = start_trace(ns)
    try:
        e = json.loads(ns.ok("explain", "--json", "tcp", "192.0.2.1", "80").stdout)
        assert e["verdict"] == "steer" and [p["ours"] for p in e["programs"]] == [True]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_explain_a_reuseport_group(ns: NS) -> None:
    """A test run cannot make the kernel's pick within a reuseport group (EOPNOTSUPP): explain
    says the group, and the connection lands on one of its members."""
    m1 = ns.proxy(tcp="127.0.0.1:7300", tag="m1", extra=("--reuseport",))
    ns.proxy(tcp="127.0.0.1:7300", tag="m2", extra=("--reuseport",))
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{m1.port}", "--name", "g")
    e = json.loads(ns.ok("explain", "--json", "tcp", "192.0.2.1", "80").stdout)
    assert (e["verdict"], e["reason"], e["target"]) == ("steer", "steered", "g")
    assert e["socket"]["cookie"] is None and len(e["socket"]["group"]) == 2
    assert e["programs"][0]["reuseport_group"] is True
    assert ns.dial("tcp", "192.0.2.1", 80).rsplit(" ", 1)[1] in ("m1", "m2")
    assert "reuseport group of 2" in ns.ok("explain", "tcp", "192.0.2.1", "80").stdout
    # exact: that socket, and a test run can say which
    ns.ok(
        "attach",
        "tcp",
        "192.0.2.0/24",
        "all",
        "--to",
        "127.0.0.1:7300",
        "--name",
        "g",
        "--no-reuseport",
        "--replace",
    )
    e = json.loads(ns.ok("explain", "--json", "tcp", "192.0.2.1", "80").stdout)
    assert e["socket"]["cookie"] and "group" not in e["socket"]


def test_explain_racing_a_trace_that_ends(ns: NS, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trace ends between explain's query of the namespace's programs and its runs: the
    traced copy it listed is ours all the same (never run as another tool's program, which
    would count the made-up lookup in the live counters)."""
    from .test_trace import start_trace, steered_ns

    steered_ns(ns)
    proc = start_trace(ns)
    real = explain_mod.query_netns_programs

    def query_then_end_the_trace(fd: int) -> list[int]:
        ids = real(fd)
        proc.terminate()
        proc.wait(timeout=30)
        return ids

    before = [r["counters"] for r in ns.status()["rules"]]  # type: ignore[union-attr, index]
    monkeypatch.setattr(explain_mod, "query_netns_programs", query_then_end_the_trace)
    e = run_explain(ns, "tcp", ipaddress.ip_address("192.0.2.1"), 80)
    assert (e["verdict"], e["reason"]) == ("steer", "steered")
    assert [p["ours"] for p in e["programs"]] == [True]
    assert [r["counters"] for r in ns.status()["rules"]] == before  # type: ignore[union-attr, index]


def test_multicast_and_broadcast_are_not_looked_up(ns: NS) -> None:
    web = ns.proxy(udp="127.0.0.1:0", tag="web")
    ns.ok("attach", "udp", "224.0.0.0/4", "all", "--to", f"127.0.0.1:{web.port}")
    e = json.loads(ns.ok("explain", "--json", "udp", "224.0.0.251", "5353").stdout)
    assert (e["verdict"], e["reason"], e["rule"]) == ("pass", "not-looked-up", None)
    e = json.loads(ns.ok("explain", "--json", "tcp", "255.255.255.255", "80").stdout)
    assert (e["verdict"], e["reason"]) == ("drop", "not-looked-up")
