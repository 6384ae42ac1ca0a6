"""Metrics: parsed with prometheus_client's own parser, equal to real connection counts, and
growing across rule-set changes."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from sklookupctl import netns as nsmod
from sklookupctl.cli import cli

from .conftest import NS

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def scrape(ns: NS, *args: str) -> Samples:
    return parse(ns.ok("metrics", *args).stdout)


def target(s: Samples, ns: NS, name: str, metric: str, proto: str = "tcp") -> float:
    labels = frozenset({("namespace", ns.name), ("target", name), ("protocol", proto)})
    return s[(f"sklookupctl_target_{metric}_total", labels)]


def gauge(s: Samples, ns: NS, metric: str, **labels: str) -> float:
    return s[(f"sklookupctl_{metric}", frozenset({("namespace", ns.name), *labels.items()}))]


def syn_retransmits(ns: NS) -> int:
    """SYNs the namespace's TCP sent again (TcpExt TCPSynRetrans): each is looked up again,
    and counted again, so a counter may exceed the connections by that many."""
    out: list[int] = []

    def run() -> None:
        with (
            nsmod.open_netns(ns.name) as n,
            nsmod.enter(n),
            open("/proc/thread-self/net/netstat") as f,
        ):
            lines = [line.split() for line in f if line.startswith("TcpExt:")]
        out.append(int(dict(zip(lines[0], lines[1], strict=True))["TCPSynRetrans"]))

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    return out[0]


def about(got: list[float], want: list[int], slack: int) -> bool:
    """`got` is `want`, give or take lookups of retransmitted SYNs (`slack` in all)."""
    return all(w <= g <= w + slack for g, w in zip(got, want, strict=True))


def dial_n(ns: NS, host: str, port: int, n: int) -> list[str]:
    return [ns.dial("tcp", host, port) for _ in range(n)]


def test_metrics_match_real_connections(ns: NS, tmp_path: Path) -> None:
    web = ns.proxy(tcp="127.0.0.1:0", tag="web")
    gone = ns.proxy(tcp="127.0.0.1:0", tag="gone")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{web.port}", "--name", "web")
    ns.ok(
        "attach",
        "tcp",
        "198.51.100.0/24",
        "all",
        "--to",
        f"127.0.0.1:{gone.port}",
        "--name",
        "gone",
    )
    ns.ok("attach", "tcp", "203.0.113.0/24", "all", "--drop")
    gone.stop()
    retrans = syn_retransmits(ns)
    assert all(r.endswith("web") for r in dial_n(ns, "192.0.2.1", 80, 7))
    assert dial_n(ns, "198.51.100.1", 80, 3) == ["refused"] * 3
    assert dial_n(ns, "203.0.113.1", 80, 4) == ["refused"] * 4
    s = scrape(ns)
    slack = syn_retransmits(ns) - retrans
    web = [target(s, ns, "web", "steered"), target(s, ns, "web", "lookups")]
    assert about(web, [7, 7], slack) and web[0] == web[1]
    gone_ = [target(s, ns, "gone", "missing_socket"), target(s, ns, "gone", "dropped")]
    assert about(gone_, [3, 3], slack) and gone_[0] == gone_[1]
    assert target(s, ns, "gone", "steered") == 0
    drops = frozenset({("namespace", ns.name), ("protocol", "tcp")})
    assert about([s[("sklookupctl_drop_rule_drops_total", drops)]], [4], slack)
    assert gauge(s, ns, "target_socket_alive", target="web", protocol="tcp") == 1
    assert gauge(s, ns, "target_socket_alive", target="gone", protocol="tcp") == 0
    assert gauge(s, ns, "rules") == 3 and gauge(s, ns, "targets") == 2
    assert gauge(s, ns, "steering") == 1 and gauge(s, ns, "memory_bytes") > 0
    # per rule only when asked
    assert not any(k[0].startswith("sklookupctl_rule_") for k in s)
    r = scrape(ns, "--per-rule")
    labels = frozenset(
        {
            ("namespace", ns.name),
            ("protocol", "tcp"),
            ("prefix", "192.0.2.0/24"),
            ("ports", "all"),
            ("action", "steer"),
            ("target", "web"),
        }
    )
    assert r[("sklookupctl_rule_steered_total", labels)] == web[0]
    # --output: the same text, in one rename
    out = tmp_path / "sklookupctl.prom"
    ns.ok("metrics", "--output", str(out))
    assert parse(out.read_text()) == s and oct(out.stat().st_mode & 0o777) == "0o644"
    assert os.listdir(tmp_path) == ["sklookupctl.prom"]


def test_target_counters_keep_counting_across_rule_set_changes(ns: NS) -> None:
    a = ns.proxy(tcp="127.0.0.1:0", tag="a")
    b = ns.proxy(tcp="127.0.0.1:0", tag="b")
    to_a = ("--to", f"127.0.0.1:{a.port}", "--name", "a")
    to_b = ("--to", f"127.0.0.1:{b.port}", "--name", "b")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", *to_a)
    ns.ok("attach", "tcp", "198.51.100.0/24", "80", *to_a)
    ns.ok("attach", "tcp", "198.51.100.0/24", "81", *to_a)
    ns.ok("attach", "tcp", "203.0.113.0/24", "80", "--drop")
    retrans = syn_retransmits(ns)
    dial_n(ns, "192.0.2.1", 80, 3)
    dial_n(ns, "198.51.100.1", 80, 2)
    dial_n(ns, "198.51.100.1", 81, 1)
    dial_n(ns, "203.0.113.1", 80, 2)
    seen = [scrape(ns)]
    # a rule of a's removed, another moved from a to b, a drop rule removed, a new one added
    ns.ok("detach", "tcp", "192.0.2.0/24", "all")
    ns.ok("attach", "tcp", "198.51.100.0/24", "80", *to_b, "--replace")
    ns.ok("detach", "tcp", "203.0.113.0/24", "80")
    ns.ok("attach", "tcp", "203.0.113.0/24", "81", "--drop")
    seen.append(scrape(ns))
    assert all(r.endswith(" b") for r in dial_n(ns, "198.51.100.1", 80, 4))
    dial_n(ns, "198.51.100.1", 81, 1)
    dial_n(ns, "203.0.113.1", 81, 1)
    seen.append(scrape(ns))
    # a new rule for a
    ns.ok("attach", "tcp", "192.0.2.0/25", "all", *to_a)
    dial_n(ns, "192.0.2.1", 80, 1)
    seen.append(scrape(ns))
    a_total = [target(s, ns, "a", "steered") for s in seen]
    b_total = [target(s, ns, "b", "steered") for s in seen[1:]]
    drops = frozenset({("namespace", ns.name), ("protocol", "tcp")})
    drop_total = [s[("sklookupctl_drop_rule_drops_total", drops)] for s in seen]
    slack = syn_retransmits(ns) - retrans
    assert about(a_total, [6, 6, 7, 8], slack) and a_total == sorted(a_total)
    # what the moved rule counted for a stays a's
    assert about(b_total, [0, 4, 4], slack) and b_total == sorted(b_total) and b_total[0] == 0
    assert about(drop_total, [2, 2, 3, 3], slack) and drop_total == sorted(drop_total)
    assert a_total[-1] + b_total[-1] + drop_total[-1] <= 8 + 4 + 3 + slack
    assert [target(s, ns, "a", "lookups") for s in seen] == a_total


def _scrape_in(ns: NS, url: str) -> str:
    out: list[str] = []

    def run() -> None:
        with (
            nsmod.open_netns(ns.name) as n,
            nsmod.enter(n),
            urllib.request.urlopen(url, timeout=10) as r,
        ):
            out.append(r.read().decode())

    t = threading.Thread(target=run)
    t.start()
    t.join(20)
    return out[0]


def test_listen_serves_fresh_metrics_and_ends_on_sigterm(ns: NS) -> None:
    web = ns.proxy(tcp="127.0.0.1:0", tag="web")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{web.port}", "--name", "web")
    # the server's socket lives in the test's namespace, never in the host's
    argv = ["nsenter", f"--net={ns.path}", *ns.script_argv("metrics", "--listen", "127.0.0.1:0")]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "serving /metrics on 127.0.0.1 port" in line, line
        url = f"http://127.0.0.1:{line.split()[-1]}/metrics"
        first = parse(_scrape_in(ns, url))
        dial_n(ns, "192.0.2.1", 80, 2)
        second = parse(_scrape_in(ns, url))
        assert target(second, ns, "web", "steered") == target(first, ns, "web", "steered") + 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_metrics_of_nothing_and_of_one_namespace(ns: NS, ns2: NS) -> None:
    # no state at all: no series but sklookupctl_up, exit 0
    assert scrape(ns) == {("sklookupctl_up", frozenset()): 1.0}
    web = ns.proxy(tcp="127.0.0.1:0", tag="web")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{web.port}", "--name", "web")
    ns2.ok("attach", "tcp", "192.0.2.0/24", "all", "--drop")
    every = CliRunner().invoke(cli, ["--bpffs", ns.bpffs, "metrics"])  # no --netns: all
    assert every.exit_code == 0, every.output
    both = {dict(k[1]).get("namespace") for k in parse(every.stdout)} - {None}
    assert {ns.name, ns2.name} <= both
    # the global --netns narrows it to one
    only = {dict(k[1]).get("namespace") for k in scrape(ns)} - {None}
    assert only == {ns.name}
    for bad in ("127.0.0.1", "localhost:80", "[::1]", "1.2.3.4:99999"):
        res = ns.cli("metrics", "--listen", bad)
        assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output


def test_a_writer_killed_after_the_switch_does_not_zero_the_counters(ns: NS) -> None:
    web = ns.proxy(tcp="127.0.0.1:0", tag="web")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{web.port}", "--name", "web")
    dial_n(ns, "192.0.2.1", 80, 10)
    assert target(scrape(ns), ns, "web", "steered") == 10
    res = subprocess.run(
        ns.script_argv("attach", "tcp", "198.51.100.0/24", "all", "--drop"),
        capture_output=True,
        env={**os.environ, "SKLOOKUPCTL_FAULT": "commit.switched"},
    )
    assert res.returncode == -signal.SIGKILL
    # the change is live, its carry after the switch never ran: a reader still sees 10
    s = scrape(ns)
    assert gauge(s, ns, "rules") == 2
    assert target(s, ns, "web", "steered") == 10
    assert ns.status()["targets"][0]["counters"]["steered"] == 10  # type: ignore[index]
    dial_n(ns, "192.0.2.1", 80, 1)
    ns.ok("gc")
    assert target(scrape(ns), ns, "web", "steered") == 11


def test_output_replaces_only_a_regular_file(ns: NS, tmp_path: Path) -> None:
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--drop")
    (tmp_path / "real").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real")
    res = ns.cli("metrics", "--output", str(link))
    assert res.exit_code == 1 and "not a regular file" in res.output
    assert link.is_symlink() and (tmp_path / "real").read_text() == "x"
    res = ns.cli("metrics", "--output", str(tmp_path / "nowhere" / "x.prom"))
    assert res.exit_code == 4 and "does not exist" in res.output and ".tmp" not in res.output
    assert parse(ns.ok("metrics", "--output", "-").stdout)  # "-": stdout


def test_a_busy_lock_is_up_0_not_a_failed_scrape(ns: NS) -> None:
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--drop")
    lock = os.path.join(ns.bpffs, "sklookupctl", "lock")
    argv = [
        "nsenter",
        f"--net={ns.path}",
        *ns.script_argv("--wait", "0.2", "metrics", "--listen", "127.0.0.1:0"),
    ]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    holder = subprocess.Popen(["flock", "--no-fork", "-x", lock, "sleep", "30"])
    try:
        assert proc.stderr is not None
        url = f"http://127.0.0.1:{proc.stderr.readline().split()[-1]}/metrics"
        time.sleep(0.5)  # the holder has the lock now
        for _ in range(3):
            s = parse(_scrape_in(ns, url))
            assert s == {("sklookupctl_up", frozenset()): 0.0}
        holder.kill()
        holder.wait()
        s = parse(_scrape_in(ns, url))
        assert s[("sklookupctl_up", frozenset())] == 1.0 and gauge(s, ns, "rules") == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and err.count("could not read the state") == 1, err
    finally:
        for p in (holder, proc):
            if p.poll() is None:
                p.kill()
                p.wait()
