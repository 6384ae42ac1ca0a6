"""scripts/bench: measure sklookupctl on this machine. A benchmark, not a test: it prints and
writes what it measured and judges nothing but the issue's targets, which it reports.

Everything happens in network namespaces and a bpffs mount of its own, removed at the end
(also on failure or Ctrl-C). Traffic stays inside those namespaces, on documentation prefixes.

1. Data path, with BPF_PROG_TEST_RUN, in one run: an empty program, the floor (one SOCKMAP
   lookup + bpf_sk_assign), and the dispatcher holding rule sets of 1, 1k, 100k and 1M rules
   (v4 and v6, tcp and udp, mixed and nested port ranges, drop rules), in two shapes: few
   prefix lengths (v4 /24 and /32, v6 /64 and /128) and every prefix length. For each: the
   median ns per run of steered lookups, of lookups no prefix covers, and of lookups whose
   prefix has no rule for the port; the time of `sklookupctl apply` (first load, and a
   replace of 1% of the rules); the kernel memory (memlock) of the maps.
2. The CLI as whole processes: cold attach (a netns with no dispatcher yet; compiled program
   cached, and once with an empty cache) and warm rule add.
3. Many targets: `apply` of 2,000 and 10,000 targets, each with its own listening socket
   and one rule, as whole CLI processes: the first load, every target moved to another
   socket in one apply, and the same file again.
4. TCP connections per second with wrk (a new connection per request: Connection: close),
   client in its own netns over a veth, to one listener: direct to its port, steered by
   sklookupctl (with the 100k-rule set loaded next to the benchmark's rule), by nftables
   redirect (NAT) and by nftables tproxy. Each round runs every mode once, in random order,
   with only that mode's machinery present; a mode's figure is its median over the rounds of
   (its rate / the direct rate of the same round).
5. UDP datagrams per second delivered to one socket (unconnected, bound to port 9000 of the
   wildcard address: every datagram is looked up), client in its own netns over a veth:
   direct to its port (on random addresses of the server's AnyIP prefix), steered by
   sklookupctl (with the 100k-rule set loaded next to the benchmark's rule), by the floor
   program alone (FLOOR_C attached to the namespace with BPF_LINK_CREATE), by nftables
   redirect and by nftables tproxy (these to random addresses and ports). A sender process
   (scripts/bench_udp.py: a raw socket, sendmmsg through ctypes) sends 64-byte datagrams as
   fast as it can for a fixed time, each from a source address and port of its own: every
   datagram is a new flow, also to conntrack. A receiver (recvmmsg) on a CPU of its own
   counts what it reads in the measured window. The veth runs the server's receive path,
   the lookup among it, in the sender's softirq: the sender's CPU is the bottleneck and its
   rate falls with what each datagram costs the server, while the receiver keeps up (the
   table shows the datagrams its socket had no room for, and both CPU shares). Rounds and
   ratios as in 4, and the same ratio per second of the sender's CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from sklookupctl import api, compiler, store, testrun
from sklookupctl import netns as nsmod
from sklookupctl.bpfsys import Link, Map, Program

HERE = os.path.dirname(os.path.abspath(__file__))
CLI = os.path.join(os.path.dirname(sys.executable), "sklookupctl")
RESERVED = (ipaddress.ip_network("240.0.0.0/4"), ipaddress.ip_network("fc00::/7"))
FEW_LENGTHS = {4: (24, 32), 6: (64, 128)}

EMPTY_C = "int bench(struct bpf_sk_lookup *ctx) { return SK_PASS; }\n"
FLOOR_C = """
BPF_TABLE("sockmap", u32, u64, sock, 1);
int bench(struct bpf_sk_lookup *ctx) {
    u32 k = 0;
    struct bpf_sock *sk = (struct bpf_sock *)sock.lookup(&k);
    if (!sk)
        return SK_DROP;
    long err = bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    return err ? SK_DROP : SK_PASS;
}
"""
# The reference (issue 11): the floor plus what a trie walk of this depth cannot do without:
# four ARRAY lookups, each index depending on the one before (as a walk's nodes do), inlined by
# the verifier like the dispatcher's, and a per-CPU counter. The dispatcher measured against it
# says how much of its cost is its own, whatever the machine's test-run overhead.
REFERENCE_C = """
BPF_TABLE("sockmap", u32, u64, sock, 1);
BPF_ARRAY(a1, u64, 256);
BPF_ARRAY(a2, u64, 256);
BPF_ARRAY(a3, u64, 256);
BPF_ARRAY(a4, u64, 256);
BPF_PERCPU_ARRAY(hits, u64, 1);
int bench(struct bpf_sk_lookup *ctx) {
    u32 ip = ctx->local_ip4 ^ ctx->local_ip6[3];
    u32 i = ip & 255;
    u64 *v = a1.lookup(&i);
    if (!v)
        return SK_PASS;
    i = (u32)(*v + (ip >> 8)) & 255;
    v = a2.lookup(&i);
    if (!v)
        return SK_PASS;
    i = (u32)(*v + (ip >> 16)) & 255;
    v = a3.lookup(&i);
    if (!v)
        return SK_PASS;
    i = (u32)(*v + (ip >> 24)) & 255;
    v = a4.lookup(&i);
    if (!v)
        return SK_PASS;
    u32 z = 0;
    u64 *c = hits.lookup(&z);
    if (c)
        (*c)++;
    u32 k = 0;
    struct bpf_sock *sk = (struct bpf_sock *)sock.lookup(&k);
    if (!sk)
        return SK_DROP;
    long err = bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    return err ? SK_DROP : SK_PASS;
}
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the sandbox -------------------------------------------------------------------------------


class Sandbox:
    """Namespaces, processes and a bpffs mount of this run; all removed by close()."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.tmp = tempfile.mkdtemp(prefix="sklb-")
        self.bpffs = os.path.join(self.tmp, "bpffs")
        os.mkdir(self.bpffs)
        subprocess.run(["mount", "-t", "bpf", "bpf", self.bpffs], check=True)
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []

    def netns(self, role: str, prefixes: tuple[str, ...] = ()) -> str:
        name = f"sklb-{self.tag}-{role}"
        api.netns_add(name)
        self.namespaces.append(name)
        for p in prefixes:
            api.addr_add(name, p)
        return name

    def drop_netns(self, name: str) -> None:
        api.netns_del(name, bpffs=self.bpffs)
        self.namespaces.remove(name)

    def start(self, argv: list[str], netns: str | None = None) -> tuple[subprocess.Popen[str], str]:
        """Start a process (in a netns) and return it with its first line of output."""
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(p)
        assert p.stdout is not None
        return p, p.stdout.readline()

    def echo(self, netns: str, tcp: str | None, udp: str | None) -> dict[str, int]:
        argv = [sys.executable, "-m", "sklookupctl.echo", "--netns", nsmod.path_of(netns)]
        argv += ["--lifetime", "3600"]
        if tcp:
            argv += ["--tcp", tcp]
        if udp:
            argv += ["--udp", udp]
        _p, line = self.start(argv)
        return json.loads(line)  # type: ignore[no-any-return]

    def cli(self, netns: str, *args: str, env: dict[str, str] | None = None) -> float:
        """Run the console script; its wall time in seconds. Fails loudly."""
        t = time.perf_counter()
        r = subprocess.run(
            [CLI, "--netns", netns, "--bpffs", self.bpffs, *args],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
        )
        elapsed = time.perf_counter() - t
        if r.returncode != 0:
            raise RuntimeError(f"sklookupctl {' '.join(args)}: {r.stderr.strip()}")
        return elapsed

    def peak_rss(self, netns: str, *args: str) -> float:
        """Run the console script and return its peak resident memory in MB. It is started by
        a small Python of its own: a process's peak counts the memory of the process it was
        forked from until its exec, and this one holds BCC and the bench's maps."""
        wrap = (
            "import resource, subprocess, sys\n"
            "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL)\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
            "sys.exit(r.returncode)\n"
        )
        r = subprocess.run(
            [sys.executable, "-c", wrap, CLI, "--netns", netns, "--bpffs", self.bpffs, *args],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise RuntimeError(f"sklookupctl {' '.join(args)}: exit {r.returncode}")
        return int(r.stdout.strip()) / 1024  # KiB on Linux

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.wait(timeout=10)
        for name in list(self.namespaces):
            with contextlib.suppress(Exception):
                self.drop_netns(name)
        subprocess.run(["umount", self.bpffs], check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- rule sets ---------------------------------------------------------------------------------


def make_rules(n: int, shape: str, rng: random.Random) -> list[tuple[str, Any, int, int, str]]:
    """`n` rules: (protocol, network, lo, hi, target or "drop")."""
    out: list[tuple[str, Any, int, int, str]] = []
    seen: set[Any] = set()
    while len(out) < n:
        v = 4 if rng.random() < 0.5 else 6
        width = 32 if v == 4 else 128
        plen = rng.choice(FEW_LENGTHS[v]) if shape == "few" else rng.randint(1, width)
        bits = rng.getrandbits(width) >> (width - plen) << (width - plen)
        net = ipaddress.ip_network((bits, plen))
        if net in seen or any(net.version == r.version and net.overlaps(r) for r in RESERVED):
            continue
        seen.add(net)
        proto = "tcp" if rng.random() < 0.8 else "udp"
        p = rng.random()
        if p < 0.3:
            ranges = [(1, 65535)]
        elif p < 0.6:
            port = rng.randrange(1, 65536)
            ranges = [(port, port)]
        elif p < 0.8:
            lo = rng.randrange(1, 60000)
            ranges = [(lo, lo + rng.randrange(1, 5000))]
        else:  # nested: all, a range inside, a port inside that
            lo = rng.randrange(2, 60000)
            hi = lo + rng.randrange(2, 5000)
            port = rng.randrange(lo, hi + 1)
            ranges = [(1, 65535), (lo, hi), (port, port)]
        for lo, hi in ranges[: n - len(out)]:
            r = rng.random()
            target = "drop" if r < 0.1 else f"{proto}-{'a' if r < 0.55 else 'b'}"
            out.append((proto, net, lo, hi, target))
    return out


def toml_of(rules: list[tuple[str, Any, int, int, str]], ports: dict[str, int]) -> str:
    parts = [f'[targets.{t}]\nto = "[::]:{port}"\n\n' for t, port in ports.items()]
    for proto, net, lo, hi, target in rules:
        ports_text = str(lo) if lo == hi else f"{lo}-{hi}"
        what = 'action = "drop"' if target == "drop" else f'target = "{target}"'
        parts.append(
            f'[[rules]]\nprotocol = "{proto}"\nprefix = "{net}"\nports = "{ports_text}"\n{what}\n\n'
        )
    return "".join(parts)


# -- BPF_PROG_TEST_RUN -------------------------------------------------------------------------


_BCC_MODULES: list[Any] = []


def bcc_program(source: str, sock_fd: int | None) -> Program:
    import bcc

    with compiler.kernel_source() as ksrc:
        if ksrc:
            os.environ["BCC_KERNEL_SOURCE"] = ksrc
        mod = bcc.BPF(text=source.encode(), cflags=["-w"])
    fn = mod.load_func(b"bench", 30, attach_type=36)
    if sock_fd is not None:
        fd = bcc.libbcc.lib.bpf_table_fd(mod.module, b"sock")
        Map(os.dup(fd), ctypes.c_uint32, ctypes.c_uint64).update(
            ctypes.c_uint32(0), ctypes.c_uint64(sock_fd)
        )
    prog = Program(os.dup(fn.fd))
    _BCC_MODULES.append(mod)  # the program's maps live as long as the module
    return prog


def sample_ctxs(
    prog: Program, rules: list[tuple[str, Any, int, int, str]], rng: random.Random, want: int
) -> dict[str, list[testrun.LookupCtx]]:
    """Lookups the live dispatcher steers, leaves alone for lack of a prefix, and leaves alone
    for lack of a rule for the port; classified by running them once."""
    out: dict[str, list[testrun.LookupCtx]] = {"steered": [], "no prefix": [], "port miss": []}
    tries = 0
    while min(len(v) for v in out.values()) < want and tries < 200 * want:
        tries += 1
        proto, net, lo, hi, _target = rng.choice(rules)
        host = net.network_address + rng.getrandbits(net.max_prefixlen - net.prefixlen)
        kind = rng.random()
        if kind < 0.4:
            ctx = testrun.lookup_ctx(proto, host, rng.randint(lo, hi))
        elif kind < 0.7:
            ctx = testrun.lookup_ctx(proto, host, rng.randrange(1, 65536))
        else:
            r = RESERVED[0] if rng.random() < 0.5 else RESERVED[1]
            addr = r.network_address + rng.getrandbits(r.max_prefixlen - r.prefixlen)
            ctx = testrun.lookup_ctx(proto, addr, rng.randrange(1, 65536))
            res = testrun.run(prog, ctx)
            if res.verdict == testrun.SK_PASS and not res.cookie:
                out["no prefix"].append(ctx)
            continue
        res = testrun.run(prog, ctx)
        if res.steered:
            out["steered"].append(ctx)
        elif res.verdict == testrun.SK_PASS:
            out["port miss"].append(ctx)
    return {k: v[:want] for k, v in out.items()}


def paired_runs(
    prog: Program,
    empty: Program,
    floor: Program,
    ref: Program,
    fctx: testrun.LookupCtx,
    ctxs: dict[str, list[testrun.LookupCtx]],
    rounds: int,
    rng: random.Random,
) -> tuple[dict[str, list[int]], dict[str, list[float]], dict[str, list[float]]]:
    """ns per run of each lookup, each paired with a floor run and a reference run just before
    it on the same CPU (the machine drifts between a fast and a slow state: compare like with
    like). Returns the ns, the ratios to the floor and the ratios to the reference."""
    per: dict[str, list[int]] = {"empty": [], "floor": [], "reference": []}
    per.update({k: [] for k in ctxs})
    ratios: dict[str, list[float]] = {k: [] for k in ctxs}
    to_ref: dict[str, list[float]] = {k: [] for k in ctxs}
    jobs = [(k, c) for k, cs in ctxs.items() for c in cs]
    for _ in range(rounds):
        rng.shuffle(jobs)
        for kind, ctx in jobs:
            f = testrun.run(floor, fctx, REPEAT).ns
            r = testrun.run(ref, fctx, REPEAT).ns
            d = testrun.run(prog, ctx, REPEAT).ns
            per["floor"].append(f)
            per["reference"].append(r)
            per[kind].append(d)
            ratios[kind].append(d / f)
            to_ref[kind].append(d / r)
        per["empty"] += [testrun.run(empty, fctx, REPEAT).ns for _ in range(8)]
    return per, ratios, to_ref


REPEAT = 5000  # runs per BPF_PROG_TEST_RUN call


# -- connection rates --------------------------------------------------------------------------

NFT_REDIRECT = """table ip sklb_redirect {
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr 203.0.113.64/26 tcp dport 80 redirect to :8080
  }
}
"""
NFT_TPROXY = """table ip sklb_tproxy {
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
    ip daddr 203.0.113.128/26 tcp dport 80 tproxy to :8080 meta mark set 1 accept
  }
}
"""


def sh(netns: str, *argv: str, stdin: str | None = None) -> str:
    r = subprocess.run(
        ["ip", "netns", "exec", netns, *argv], input=stdin, capture_output=True, text=True
    )
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {netns}: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def wrk(client: str, url: str, seconds: float, conns: int) -> tuple[float, int]:
    out = sh(
        client,
        "wrk",
        "-t2",
        f"-c{conns}",
        f"-d{max(1, round(seconds))}s",
        "-H",
        "Connection: close",
        url,
    )
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk printed no rate:\n{out}")
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    m2 = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return float(m.group(1)), errors + (int(m2.group(1)) if m2 else 0)


def server_client(sb: Sandbox, proto: str) -> tuple[str, str]:
    """A server netns (198.51.100.1 on a veth, 203.0.113.0/26 as AnyIP) and a client netns
    (198.51.100.2) that routes 203.0.113.0/24 to it."""
    label = "" if proto == "tcp" else f"{proto}-"
    srv = sb.netns(f"{label}srv", ("203.0.113.0/26",))
    cli = sb.netns(f"{label}cli")
    letter = "b" if proto == "tcp" else proto[0]
    veth_s, veth_c = f"skl{letter}s{sb.tag}", f"skl{letter}c{sb.tag}"
    sh(cli, "ip", "link", "add", veth_c, "type", "veth", "peer", "name", veth_s)
    sh(cli, "ip", "link", "set", veth_s, "netns", srv)
    sh(srv, "ip", "addr", "add", "198.51.100.1/24", "dev", veth_s)
    sh(srv, "ip", "link", "set", veth_s, "up")
    sh(cli, "ip", "addr", "add", "198.51.100.2/24", "dev", veth_c)
    sh(cli, "ip", "link", "set", veth_c, "up")
    sh(cli, "ip", "route", "add", "203.0.113.0/24", "via", "198.51.100.1")
    return srv, cli


def steering_file(
    sb: Sandbox, extra_rules: int, proto: str, target: str, to: str
) -> tuple[str, int]:
    """The benchmark's rule (`proto`, 203.0.113.0/26, every port, to `target` at `to`) among
    `extra_rules` others: the `proto`/v4 ones steer to the same target, the rest drop; none
    touches the benchmark's prefixes. Returns the rule file and its number of rules."""
    ours = [ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("198.51.100.0/24")]
    rules = [
        (p, net, lo, hi, target if p == proto and net.version == 4 and t != "drop" else "drop")
        for p, net, lo, hi, t in make_rules(extra_rules, "few", random.Random(3))
        if not any(net.version == 4 and net.overlaps(o) for o in ours)
    ]
    rules.append((proto, ipaddress.ip_network("203.0.113.0/26"), 1, 65535, target))
    path = os.path.join(sb.tmp, f"steer-{proto}.toml")
    with open(path, "w") as f:
        f.write(
            toml_of(rules, {}).replace(
                "[[rules]]", f'[targets.{target}]\nto = "{to}"\n\n[[rules]]', 1
            )
        )
    return path, len(rules)


def nft_on(srv: str, text: str, tproxy: bool) -> Callable[[], None]:
    """Load an nftables ruleset in `srv` (tproxy: with the policy route it needs)."""

    def on() -> None:
        sh(srv, "nft", "-f", "-", stdin=text)
        if tproxy:
            sh(srv, "ip", "rule", "add", "fwmark", "1", "lookup", "100")
            sh(srv, "ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")

    return on


def nft_off(srv: str, table: str, tproxy: bool) -> Callable[[], None]:
    def off() -> None:
        sh(srv, "nft", "delete", "table", "ip", table)
        if tproxy:
            sh(srv, "ip", "rule", "del", "fwmark", "1", "lookup", "100")
            sh(srv, "ip", "route", "flush", "table", "100")

    return off


def connection_rates(sb: Sandbox, rounds: int, seconds: float, extra_rules: int) -> dict[str, Any]:
    srv, cli = server_client(sb, "tcp")
    sh(cli, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000")
    sh(cli, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")
    binary = os.path.join(sb.tmp, "bench-http")
    subprocess.run(["cc", "-O2", "-o", binary, os.path.join(HERE, "bench-http.c")], check=True)
    lifetime = int(rounds * 4 * (seconds + 8) + 600)
    sb.start([binary, "8080", "16", str(lifetime)], netns=srv)
    rules_file, n_rules = steering_file(sb, extra_rules, "tcp", "http", "0.0.0.0:8080")

    def sklookupctl_on() -> None:
        sb.cli(srv, "apply", rules_file)

    def sklookupctl_off() -> None:
        sb.cli(srv, "detach", "--all")

    modes: dict[str, tuple[str, Callable[[], None], Callable[[], None]]] = {
        "direct": ("http://198.51.100.1:8080/", lambda: None, lambda: None),
        "sklookupctl": ("http://203.0.113.10/", sklookupctl_on, sklookupctl_off),
        "nft redirect": (
            "http://203.0.113.70/",
            nft_on(srv, NFT_REDIRECT, False),
            nft_off(srv, "sklb_redirect", False),
        ),
        "nft tproxy": (
            "http://203.0.113.130/",
            nft_on(srv, NFT_TPROXY, True),
            nft_off(srv, "sklb_tproxy", True),
        ),
    }
    # warm up, and prove every mode reaches the listener
    for name, (url, on, off) in modes.items():
        on()
        try:
            rate, errors = wrk(cli, url, 1, 16)
        finally:
            off()
        if errors or rate <= 0:
            raise RuntimeError(f"{name}: {errors} errors in the warm-up")
    rng = random.Random(7)
    rates: dict[str, list[float]] = {m: [] for m in modes}
    ratios: dict[str, list[float]] = {m: [] for m in modes if m != "direct"}
    errors_total = dict.fromkeys(modes, 0)
    for r in range(rounds):
        order = list(modes)
        rng.shuffle(order)
        got: dict[str, float] = {}
        for name in order:
            url, on, off = modes[name]
            on()
            time.sleep(0.5)  # let the set-up's own work (an apply of many rules) settle
            try:
                got[name], errs = wrk(cli, url, seconds, 64)
            finally:
                off()
            errors_total[name] += errs
            rates[name].append(got[name])
        for name in ratios:
            ratios[name].append(got[name] / got["direct"])
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{m} {got[m]:.0f}/s" for m in modes))
    return {
        "rounds": rounds,
        "seconds_per_run": seconds,
        "connections": 64,
        "rules_loaded_for_sklookupctl": n_rules,
        "rate_median": {m: statistics.median(v) for m, v in rates.items()},
        "ratio_to_direct_median": {m: statistics.median(v) for m, v in ratios.items()},
        "ratio_to_direct_min_max": {m: (min(v), max(v)) for m, v in ratios.items()},
        "errors": errors_total,
    }


# -- UDP delivery ------------------------------------------------------------------------------

UDP_PORT = 9000
UDP_BYTES = 64  # payload of each datagram
UDP_MODES = ("direct", "sklookupctl", "floor", "nft redirect", "nft tproxy")
NFT_UDP_REDIRECT = f"""table ip sklb_udp_redirect {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr 203.0.113.64/26 udp dport 1-65535 redirect to :{UDP_PORT}
  }}
}}
"""
NFT_UDP_TPROXY = f"""table ip sklb_udp_tproxy {{
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    ip daddr 203.0.113.128/26 udp dport 1-65535 tproxy to :{UDP_PORT} meta mark set 1 accept
  }}
}}
"""
SO_RCVBUFFORCE = 33
IP_TRANSPARENT = 19


def udp_counters(fd: int) -> dict[str, int]:
    """The Udp line of /proc/net/snmp, read again from `fd` (opened inside a namespace, it
    keeps showing that namespace's counters)."""
    text = os.pread(fd, 1 << 16, 0).decode()
    head, values = [line.split() for line in text.splitlines() if line.startswith("Udp:")][:2]
    return dict(zip(head[1:], map(int, values[1:]), strict=True))


class UdpRun:
    """One measured run: a receiver reading the server's socket and senders in the client
    netns, all started now and stopping by themselves `seconds` + about 1.5 s later."""

    LEAD, WARM, TAIL = 1.0, 0.3, 0.2  # s: start-up, before the window, after it

    def __init__(self, sb: Sandbox, sock: socket.socket, srv: str, cli: str, senders: int) -> None:
        self.sb, self.sock, self.srv, self.cli, self.senders = sb, sock, srv, cli, senders
        cpus = sorted(os.sched_getaffinity(0))
        # the receiver on a CPU of its own when there are two or more: the senders' CPUs also
        # run the server's receive path (a veth hands each datagram to the receiving stack in
        # the sender's softirq), the lookup among it
        self.recv_cpu = cpus[-1] if len(cpus) > 1 else -1
        self.send_cpus = cpus[:-1] if len(cpus) > 1 else [-1]
        with nsmod.open_netns(srv) as ns, nsmod.enter(ns):
            self.snmp = os.open("/proc/self/net/snmp", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.snmp)

    def __call__(self, dest: str, seconds: float) -> dict[str, float]:
        helper = os.path.join(HERE, "bench_udp.py")
        start = time.monotonic() + self.LEAD
        w0 = start + self.WARM
        w1 = w0 + seconds
        times = [str(t) for t in (start, w0, w1, w1 + self.TAIL)]
        fd = self.sock.fileno()
        argvs = [[self.srv, "recv", str(fd), *times, "--cpu", str(self.recv_cpu)]]
        for i in range(self.senders):
            cpu = self.send_cpus[i % len(self.send_cpus)]
            argvs.append([self.cli, "send", dest, *times, "--cpu", str(cpu)])
            argvs[-1] += ["--size", str(UDP_BYTES)]
        procs = [
            subprocess.Popen(
                ["ip", "netns", "exec", netns, sys.executable, helper, *argv],
                stdout=subprocess.PIPE,
                text=True,
                pass_fds=[fd] if argv[0] == "recv" else [],
                start_new_session=True,
            )
            for netns, *argv in argvs
        ]
        self.sb.procs += procs
        try:
            time.sleep(max(0.0, w0 - time.monotonic()))
            c0 = udp_counters(self.snmp)
            time.sleep(max(0.0, w1 - time.monotonic()))
            c1 = udp_counters(self.snmp)
            outs = []
            for p in procs:
                out, _ = p.communicate(timeout=self.LEAD + self.WARM + seconds + 30)
                if p.returncode != 0:
                    raise RuntimeError(f"bench_udp.py exited with {p.returncode}")
                outs.append(json.loads(out))
                if min(v for k, v in outs[-1].items() if k.endswith("_in_window")) < 0:
                    raise RuntimeError(f"bench_udp.py missed its window: {out.strip()}")
        finally:
            for p in procs:
                if p.poll() is not None:  # reaped: its pid may be anyone's now
                    self.sb.procs.remove(p)
        got, sent = outs[0], outs[1:]
        late = max(o["started_late_s"] for o in sent)
        if late > self.WARM / 2:
            log(f"  a sender started {late:.2f} s late (window at {self.WARM} s)")
        return {
            "received": got["received_in_window"],
            "sent": sum(o["sent_in_window"] for o in sent),
            "send_errors": sum(o["errors"] for o in sent),
            # CPU time over the window: the senders' (their share of the server's receive
            # path among it) and the receiver's; a receiver with time to spare and no drops
            # says the senders' side is the bottleneck
            "sender_cpu": sum(o["cpu_share"] for o in sent),  # in CPUs
            "receiver_cpu": got["cpu_share"],
            "receiver_batches": got["batches"],
            # counted by the server netns's kernel over the same window
            "kernel_received": c1["InDatagrams"] - c0["InDatagrams"],
            "socket_drops": c1["RcvbufErrors"] - c0["RcvbufErrors"],
            "no_socket": c1["NoPorts"] - c0["NoPorts"],
            "in_errors": c1["InErrors"] - c0["InErrors"],
        }


def udp_floor(sock: socket.socket) -> tuple[Program, Map[Any, Any]]:
    """FLOOR_C, its SOCKMAP left empty: a socket in a SOCKMAP gets the sockmap's own receive
    functions, so it is put there only while the floor mode runs."""
    import bcc

    prog = bcc_program(FLOOR_C, None)
    fd = bcc.libbcc.lib.bpf_table_fd(_BCC_MODULES[-1].module, b"sock")
    return prog, Map(os.dup(fd), ctypes.c_uint32, ctypes.c_uint64)


def udp_delivery(
    sb: Sandbox, rounds: int, seconds: float, extra_rules: int, senders: int
) -> dict[str, Any]:
    srv, cli = server_client(sb, "udp")
    with nsmod.open_netns(srv) as ns, nsmod.enter(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)  # nftables tproxy hands it only to these
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
    sock.bind(("0.0.0.0", UDP_PORT))
    rules_file, n_rules = steering_file(sb, extra_rules, "udp", "dns", f"0.0.0.0:{UDP_PORT}")
    floor, floor_map = udp_floor(sock)
    srv_ns = nsmod.open_netns(srv)
    links: list[Link] = []

    def sklookupctl_on() -> None:
        sb.cli(srv, "apply", rules_file)

    def sklookupctl_off() -> None:
        sb.cli(srv, "detach", "--all")

    def floor_on() -> None:
        floor_map.update(ctypes.c_uint32(0), ctypes.c_uint64(sock.fileno()))
        links.append(Link.create_netns(floor, srv_ns.fd))

    def floor_off() -> None:
        link = links.pop()
        link.detach()
        link.close()
        floor_map.delete(ctypes.c_uint32(0))

    every_port = "1-65535"
    # direct: the socket's own port on the server's AnyIP addresses (it is bound to the
    # wildcard), so every mode's datagrams leave the client by the same route, through the
    # gateway 198.51.100.1: the raw socket's route to a destination without a gateway is not
    # cached (FLOWI_FLAG_KNOWN_NH), which costs the sender about a tenth more per datagram
    modes: dict[str, tuple[str, Callable[[], None], Callable[[], None]]] = {
        "direct": (f"203.0.113.0/26:{UDP_PORT}", lambda: None, lambda: None),
        "sklookupctl": (f"203.0.113.0/26:{every_port}", sklookupctl_on, sklookupctl_off),
        "floor": (f"203.0.113.0/26:{every_port}", floor_on, floor_off),
        "nft redirect": (
            f"203.0.113.64/26:{every_port}",
            nft_on(srv, NFT_UDP_REDIRECT, False),
            nft_off(srv, "sklb_udp_redirect", False),
        ),
        "nft tproxy": (
            f"203.0.113.128/26:{every_port}",
            nft_on(srv, NFT_UDP_TPROXY, True),
            nft_off(srv, "sklb_udp_tproxy", True),
        ),
    }
    assert tuple(modes) == UDP_MODES
    run = UdpRun(sb, sock, srv, cli, senders)
    try:
        # warm up, and prove every mode delivers to the socket (and nothing to no socket)
        for name, (dest, on, off) in modes.items():
            on()
            try:
                got = run(dest, 0.5)
            finally:
                off()
            if not got["sent"] or got["received"] < 0.5 * got["sent"] or got["no_socket"]:
                raise RuntimeError(f"{name}: the warm-up delivered {got}")
        rng = random.Random(11)
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        ratios: dict[str, list[float]] = {m: [] for m in modes if m != "direct"}
        per_cpu: dict[str, list[float]] = {m: [] for m in ratios}
        for r in range(rounds):
            order = list(modes)
            rng.shuffle(order)
            rate: dict[str, float] = {}
            # delivered per second of the senders' CPU: what each datagram costs the sender's
            # side, whatever share of its CPU other work on the machine took
            cost: dict[str, float] = {}
            for name in order:
                dest, on, off = modes[name]
                on()
                time.sleep(0.5)  # let the set-up's own work (an apply of many rules) settle
                try:
                    got = run(dest, seconds)
                finally:
                    off()
                if got["no_socket"]:
                    raise RuntimeError(f"{name}: {got['no_socket']} datagrams found no socket")
                runs[name].append(got)
                rate[name] = got["received"] / seconds
                cost[name] = got["received"] / (got["sender_cpu"] * seconds)
            for name in ratios:
                ratios[name].append(rate[name] / rate["direct"])
                per_cpu[name].append(cost[name] / cost["direct"])
            log(
                f"round {r + 1}/{rounds}: "
                + ", ".join(
                    f"{m} {rate[m]:.0f}/s ({runs[m][-1]['sent'] / seconds:.0f} sent)" for m in modes
                )
            )
    finally:
        run.close()
        srv_ns.close()
        sock.close()
        floor.close()
        floor_map.close()
    sb.drop_netns(srv)
    sb.drop_netns(cli)
    counts = ("received", "sent", "kernel_received", "socket_drops", "no_socket", "in_errors")
    totals = {m: {k: int(sum(g[k] for g in v)) for k in counts} for m, v in runs.items()}
    return {
        "rounds": rounds,
        "seconds_per_run": seconds,
        "senders": senders,
        "datagram_bytes": UDP_BYTES,
        "rules_loaded_for_sklookupctl": n_rules,
        # delivered: what the receiver read in the window
        "rate_median": {
            m: statistics.median(g["received"] / seconds for g in v) for m, v in runs.items()
        },
        "sent_rate_median": {
            m: statistics.median(g["sent"] / seconds for g in v) for m, v in runs.items()
        },
        "ratio_to_direct_median": {m: statistics.median(v) for m, v in ratios.items()},
        "ratio_to_direct_min_max": {m: (min(v), max(v)) for m, v in ratios.items()},
        "ratio_to_direct_rounds": ratios,
        # the same per second of the senders' CPU time
        "ratio_per_sender_cpu_median": {m: statistics.median(v) for m, v in per_cpu.items()},
        "cpu_share_median": {
            m: {k: statistics.median(g[f"{k}_cpu"] for g in v) for k in ("sender", "receiver")}
            for m, v in runs.items()
        },
        # over all rounds, in the windows
        "totals": totals,
        "runs": runs,  # every run, in the order of the rounds
        # the receiver is the bottleneck when the socket's queue overflows
        "bottleneck": {
            m: "receiver" if t["socket_drops"] > 0.01 * t["received"] else "sender side"
            for m, t in totals.items()
        },
    }


# -- the CLI as whole processes ------------------------------------------------------------


def cli_times(sb: Sandbox, runs: int) -> dict[str, Any]:
    name = sb.netns("cli-times", ("192.0.2.0/24",))
    port = sb.echo(name, "127.0.0.1:0", None)["tcp_port"]
    to = f"127.0.0.1:{port}"
    cold: list[float] = []
    warm: list[float] = []
    empty_cache = tempfile.mkdtemp(dir=sb.tmp)
    first = sb.cli(
        name,
        "attach",
        "tcp",
        "192.0.2.0/24",
        "all",
        "--to",
        to,
        env={"SKLOOKUPCTL_CACHE_DIR": empty_cache},
    )
    sb.cli(name, "detach", "--all")
    for _ in range(runs):
        cold.append(sb.cli(name, "attach", "tcp", "192.0.2.0/24", "all", "--to", to))
        for i in range(3):
            warm.append(
                sb.cli(name, "attach", "tcp", "192.0.2.0/24", str(1000 + len(warm) + i), "--to", to)
            )
        sb.cli(name, "detach", "--all")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import sklookupctl.cli"], check=True)
    startup = time.perf_counter() - t
    sb.drop_netns(name)
    return {
        "cold_attach_empty_cache_s": first,
        "cold_attach_s": {"median": statistics.median(cold), "max": max(cold)},
        "warm_add_s": {"median": statistics.median(warm), "max": max(warm)},
        "python_start_and_import_s": startup,
        "runs": runs,
    }


# -- data path per rule set ----------------------------------------------------------------


def one_rule_changes(
    sb: Sandbox, name: str, one: tuple[str, str, str], runs: int
) -> tuple[list[float], list[float]]:
    """`runs` pairs of whole CLI processes: one drop rule attached beside the rule set, then
    detached; each process's wall time (a single 0.3 s process varies by 10%: medians)."""
    attach, detach = [], []
    for _ in range(runs):
        attach.append(sb.cli(name, "attach", *one, "--drop"))
        detach.append(sb.cli(name, "detach", *one))
    return attach, detach


def datapath(
    sb: Sandbox,
    sizes: list[int],
    shapes: list[str],
    rounds: int,
    samples: int,
    change_runs: int = 5,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    name = sb.netns("datapath")
    a = sb.echo(name, "[::]:0", "[::]:0")
    b = sb.echo(name, "[::]:0", "[::]:0")
    ports = {
        "tcp-a": a["tcp_port"],
        "udp-a": a["udp_port"],
        "tcp-b": b["tcp_port"],
        "udp-b": b["udp_port"],
    }
    with nsmod.open_netns(name) as ns, nsmod.enter(ns):
        floor_sock = socket.socket()
        floor_sock.bind(("127.0.0.1", 0))
        floor_sock.listen()
    empty = bcc_program(EMPTY_C, None)
    floor = bcc_program(FLOOR_C, floor_sock.fileno())
    ref = bcc_program(REFERENCE_C, floor_sock.fileno())
    fctx = testrun.lookup_ctx("tcp", ipaddress.ip_address("192.0.2.1"), 80)
    assert testrun.run(floor, fctx).steered and testrun.run(ref, fctx).steered
    rng = random.Random(1)
    results: list[dict[str, Any]] = []
    base_samples: dict[str, list[int]] = {"empty": [], "floor": [], "reference": []}
    for shape in shapes:
        for size in sizes:
            log(f"{shape} prefix lengths, {size} rules: generating")
            rules = make_rules(size, shape, rng)
            path = os.path.join(sb.tmp, f"{shape}-{size}.toml")
            with open(path, "w") as f:
                f.write(toml_of(rules, ports))
            log(f"  applying ({os.path.getsize(path) / 1e6:.1f} MB)")
            t_first = sb.cli(name, "apply", path)
            # replace: 1% of the rules (at least one) change target
            changed = list(rules)
            for i in rng.sample(range(len(changed)), max(1, len(changed) // 100)):
                p, net, lo, hi, t = changed[i]
                if t != "drop":
                    changed[i] = (p, net, lo, hi, t[:-1] + ("b" if t.endswith("a") else "a"))
            path2 = path.replace(".toml", "-2.toml")
            with open(path2, "w") as f:
                f.write(toml_of(changed, ports))
            t_replace = sb.cli(name, "apply", path2)
            t_same = sb.cli(name, "apply", path2)
            # one rule added and removed beside the whole set, a status --json of it all, and
            # the first apply's peak memory (a process of its own)
            one = ("tcp", "240.0.0.0/24", "80")  # RESERVED: no generated rule is there
            t_attach, t_detach = one_rule_changes(sb, name, one, change_runs)
            t_status = [sb.cli(name, "status", "--json") for _ in range(change_runs)]
            sb.cli(name, "detach", "--all")
            rss = sb.peak_rss(name, "apply", path)
            with (
                nsmod.open_netns(name) as ns,
                store.session(sb.bpffs, ns, write=False) as held,
            ):
                d = held.dispatcher
                assert d is not None and d.gen is not None
                memlock = d.gen.memlock()
                prog = d.program
                ctxs = sample_ctxs(prog, changed, rng, samples)
                with one_cpu():
                    per, ratios, to_ref = paired_runs(
                        prog, empty, floor, ref, fctx, ctxs, rounds, rng
                    )
            # the same one-rule change once the rules have counted (the data path's runs
            # above count in the live maps): every counter is then carried to the new
            # generation, as on a host with traffic
            t_attach_counted, t_detach_counted = one_rule_changes(sb, name, one, change_runs)
            med = {k: statistics.median(v) for k, v in per.items() if v}
            for k in base_samples:
                base_samples[k] += per[k]
            results.append(
                {
                    "shape": shape,
                    "rules": size,
                    "apply_first_s": t_first,
                    "apply_replace_1pct_s": t_replace,
                    "apply_unchanged_s": t_same,
                    # medians of change_runs runs (each run's time in the *_all_s lists)
                    "attach_one_s": statistics.median(t_attach),
                    "detach_one_s": statistics.median(t_detach),
                    "attach_one_counted_s": statistics.median(t_attach_counted),
                    "detach_one_counted_s": statistics.median(t_detach_counted),
                    "status_json_s": statistics.median(t_status),
                    "attach_one_all_s": t_attach,
                    "detach_one_all_s": t_detach,
                    "attach_one_counted_all_s": t_attach_counted,
                    "detach_one_counted_all_s": t_detach_counted,
                    "status_json_all_s": t_status,
                    "apply_peak_rss_mb": rss,
                    "memlock_bytes": memlock,
                    "ns": med,
                    "samples": {k: len(v) for k, v in ctxs.items()},
                    # median over lookups of (dispatcher ns / floor ns measured just before)
                    "ratio_to_floor": {k: statistics.median(v) for k, v in ratios.items() if v},
                    # the same against the reference (floor + 4 ARRAY lookups + a counter)
                    "ratio_to_reference": {k: statistics.median(v) for k, v in to_ref.items() if v},
                    # absolute ns above the floor, median over lookups
                    "ns_above_floor": {
                        k: statistics.median(v) - med["floor"]
                        for k, v in per.items()
                        if k in ctxs and v
                    },
                }
            )
            log(
                f"  apply {t_first:.2f} s, replace {t_replace:.2f} s, "
                f"{memlock / 2**20:.1f} MiB; floor {med['floor']:.0f} ns, "
                + ", ".join(f"{k} {med[k]:.0f} ns" for k in ctxs if k in med)
            )
            for p in (path, path2):
                os.unlink(p)
            sb.cli(name, "detach", "--all")
    floor_sock.close()
    sb.drop_netns(name)
    base = {k: statistics.median(v) for k, v in base_samples.items()}
    return results, base


# -- report ------------------------------------------------------------------------------------


# -- many targets, each with its own socket --------------------------------------------------


def targets_file(n: int, first_port: int) -> str:
    out = [f'[targets.t{i}]\nto = "127.0.0.1:{first_port + i}"\n' for i in range(n)]
    out += [
        f'[[rules]]\nprotocol = "tcp"\nprefix = "192.0.2.0/24"\nports = "{1000 + i}"\n'
        f'target = "t{i}"\n'
        for i in range(n)
    ]
    return "".join(out)


def many_targets(sb: Sandbox, counts: list[int], runs: int) -> list[dict[str, Any]]:
    """apply of N targets as whole CLI processes: the first load, every target moved to another
    socket in one apply, and the same file again (nothing to change)."""
    out = []
    for n in counts:
        name = sb.netns(f"targets-{n}", ("192.0.2.0/24",))
        for first in (20000, 40000):
            argv = [sys.executable, "-m", "sklookupctl.echo", "--netns", nsmod.path_of(name)]
            argv += ["--tcp-range", f"127.0.0.1:{first}-{first + n - 1}", "--lifetime", "3600"]
            sb.start(argv)
        files = []
        for first in (20000, 40000):
            path = os.path.join(sb.tmp, f"targets-{n}-{first}.toml")
            with open(path, "w") as f:
                f.write(targets_file(n, first))
            files.append(path)
        times: dict[str, list[float]] = {"first": [], "move_all": [], "unchanged": []}
        for _ in range(runs):
            times["first"].append(sb.cli(name, "apply", files[0]))
            times["move_all"].append(sb.cli(name, "apply", files[1]))
            times["unchanged"].append(sb.cli(name, "apply", files[1]))
            sb.cli(name, "detach", "--all")
        med = {k: statistics.median(v) for k, v in times.items()}
        log(f"  {n} targets: " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items()))
        out.append(
            {
                "targets": n,
                "runs": runs,
                "median_s": med,
                "max_s": {k: max(v) for k, v in times.items()},
            }
        )
        sb.drop_netns(name)
    return out


def machine() -> dict[str, str]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def size_label(n: int) -> str:
    return {1: "1", 1000: "1k", 100_000: "100k", 1_000_000: "1M"}.get(n, str(n))


def runs_text(res: dict[str, Any], what: str) -> str:
    """What the one-rule changes' and statuses' figures are: one run each (results written
    before they were repeated), or medians of several."""
    rows = res.get("datapath") or [{}]
    n = len(rows[0].get("attach_one_all_s", [0]))
    return "one run each" if n == 1 else f"medians of {n} {what}"


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    out = [
        f"Measured {m['date']} on {m['cpu']} ({m['cpus']} vCPUs), kernel {m['kernel']}, "
        f"with `scripts/bench`.",
        "",
    ]
    base = res.get("baseline_ns")
    if base:
        out += [
            f"BPF_PROG_TEST_RUN on one CPU, median ns per run: empty program "
            f"{base['empty']:.0f} ns, floor (one SOCKMAP lookup + bpf_sk_assign) "
            f"{base['floor']:.0f} ns, reference (the floor + four dependent ARRAY lookups + a "
            f"per-CPU counter) {base.get('reference', 0):.0f} ns. × floor and × ref: the "
            "median, over lookups, of the dispatcher's time divided by the floor's (the "
            "reference's) measured just before it; + ns: the dispatcher's median above the "
            "floor's.",
            "",
            "| prefix lengths | rules | steered | × floor | × ref | + ns | no prefix | × floor "
            "| port miss | × floor |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["datapath"]:
            ns, ratio = r["ns"], r["ratio_to_floor"]
            to_ref, above = r.get("ratio_to_reference", {}), r.get("ns_above_floor", {})
            cells = []
            for k in ("steered", "no prefix", "port miss"):
                cells += [f"{ns[k]:.0f} ns", f"{ratio[k]:.2f}"] if k in ns else ["-", "-"]
                if k == "steered":
                    cells += [f"{to_ref[k]:.2f}", f"{above[k]:.0f}"] if k in to_ref else ["-", "-"]
            shape = "v4 /24 /32, v6 /64 /128" if r["shape"] == "few" else "every length"
            out.append(f"| {shape} | {size_label(r['rules'])} | " + " | ".join(cells) + " |")
        out += [
            "",
            "Control plane, whole CLI processes on the same rule sets: the first apply, a 1% "
            "change, the same file again, one rule attached and detached beside the whole set "
            "(before any rule counted, and again after the data path's runs, when every "
            f"counter is carried over; {runs_text(res, 'pairs')}), `status --json` of it all "
            f"({runs_text(res, 'runs')}), the first apply's peak memory, and the maps' memory:",
            "",
            "| prefix lengths | rules | apply (first) | apply (1% changed) | apply (unchanged) "
            "| attach one | detach one | attach / detach, counted | status --json | peak RSS "
            "| map memory |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["datapath"]:
            shape = "v4 /24 /32, v6 /64 /128" if r["shape"] == "few" else "every length"
            extra = [f"{r[k]:.2f} s" if k in r else "-" for k in ("attach_one_s", "detach_one_s")]
            counted = ("attach_one_counted_s", "detach_one_counted_s")
            extra.append(
                " / ".join(f"{r[k]:.2f}" for k in counted) + " s"
                if all(k in r for k in counted)
                else "-"
            )
            extra.append(f"{r['status_json_s']:.2f} s" if "status_json_s" in r else "-")
            rss = f"{r['apply_peak_rss_mb']:.0f} MB" if "apply_peak_rss_mb" in r else "-"
            out.append(
                f"| {shape} | {size_label(r['rules'])} | {r['apply_first_s']:.2f} s | "
                f"{r['apply_replace_1pct_s']:.2f} s | {r['apply_unchanged_s']:.2f} s | "
                + " | ".join(extra)
                + f" | {rss} | {r['memlock_bytes'] / 2**20:.1f} MiB |"
            )
        out.append("")
    c = res.get("cli")
    if c:
        out += [
            "Whole CLI processes (median of "
            f"{c['runs']} cold, {3 * c['runs']} warm): cold attach "
            f"{c['cold_attach_s']['median']:.2f} s (max {c['cold_attach_s']['max']:.2f} s; "
            f"{c['cold_attach_empty_cache_s']:.2f} s the first time, when BCC compiles the "
            f"program), warm rule add {c['warm_add_s']['median']:.3f} s (max "
            f"{c['warm_add_s']['max']:.3f} s); Python start-up and imports alone: "
            f"{c['python_start_and_import_s']:.3f} s.",
            "",
        ]
    t = res.get("tcp")
    if t:
        out += [
            f"TCP connections per second, wrk, a new connection per request, {t['connections']} "
            f"connections, {t['rounds']} rounds of {t['seconds_per_run']:.0f} s per mode "
            f"(sklookupctl with {t['rules_loaded_for_sklookupctl']} rules loaded, the "
            "benchmark's among them):",
            "",
            "| mode | median rate | × direct (paired median) | × direct (min–max) | errors |",
            "|---|---:|---:|---:|---:|",
            f"| direct | {t['rate_median']['direct']:.0f}/s | 1 | | {t['errors']['direct']} |",
        ]
        for mode, ratio in t["ratio_to_direct_median"].items():
            lo, hi = t["ratio_to_direct_min_max"][mode]
            out.append(
                f"| {mode} | {t['rate_median'][mode]:.0f}/s | {ratio:.3f} | "
                f"{lo:.2f}–{hi:.2f} | {t['errors'][mode]} |"
            )
        out.append("")
    u = res.get("udp")
    if u:
        out += [
            f"UDP datagrams per second delivered to one socket ({u['datagram_bytes']}-byte "
            f"datagrams, {u['senders']} raw-socket sender process(es) with sendmmsg, every "
            f"datagram a new flow), {u['rounds']} rounds of {u['seconds_per_run']:.0f} s per mode "
            f"(sklookupctl with {u['rules_loaded_for_sklookupctl']} rules loaded, the "
            "benchmark's among them; floor: the one-socket floor program attached alone). "
            "Delivered is what the receiver read; sent is what the sender sent in the same "
            "window; dropped: datagrams the socket's queue had no room for (the receiver was "
            "behind), over all rounds; CPU: busy share of the window (median); per sender "
            "CPU-s: the paired ratio of datagrams delivered per second of the sender's CPU "
            "time, which other work on the machine does not move:",
            "",
            "| mode | delivered/s (median) | sent/s (median) | × direct (paired median) "
            "| × direct (min–max) | × direct per sender CPU-s | dropped | sender CPU "
            "| receiver CPU |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for mode in sorted(u["rate_median"], key=UDP_MODES.index):
            rate = u["rate_median"][mode]
            total, cpu = u["totals"][mode], u["cpu_share_median"][mode]
            if mode == "direct":
                ratio_cells = "1 | | 1"
            else:
                lo, hi = u["ratio_to_direct_min_max"][mode]
                ratio_cells = (
                    f"{u['ratio_to_direct_median'][mode]:.3f} | {lo:.2f}–{hi:.2f} | "
                    f"{u['ratio_per_sender_cpu_median'][mode]:.3f}"
                )
            out.append(
                f"| {mode} | {rate:.0f}/s | {u['sent_rate_median'][mode]:.0f}/s | "
                f"{ratio_cells} | {total['socket_drops']} of {total['sent']} | "
                f"{cpu['sender']:.0%} | {cpu['receiver']:.0%} |"
            )
        out += [
            "",
            "Bottleneck (the receiver when its socket's queue overflowed, else the sender's "
            "side: the sender's CPU, which also runs the server's receive path): "
            + ", ".join(
                f"{m} {u['bottleneck'][m]}" for m in sorted(u["bottleneck"], key=UDP_MODES.index)
            )
            + ".",
            "",
        ]
    mt = res.get("many_targets")
    if mt:
        out += [
            "apply of N targets, each with its own listening socket and one rule (whole CLI "
            f"processes, median of {mt[0]['runs']}):",
            "",
            "| targets | first apply | every target moved to another socket | unchanged |",
            "|---:|---:|---:|---:|",
        ]
        for r in mt:
            m = r["median_s"]
            out.append(
                f"| {r['targets']} | {m['first']:.2f} s | {m['move_all']:.2f} s | "
                f"{m['unchanged']:.2f} s |"
            )
        out.append("")
    return "\n".join(out)


@contextlib.contextmanager
def one_cpu() -> Iterator[None]:
    """Run on the last CPU only: test runs execute on the caller's CPU, and moving between
    CPUs mid-measurement mixes their speeds."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(cpus)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)


SECTIONS = ("datapath", "cli", "targets", "tcp", "udp")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,1000,100000,1000000")
    ap.add_argument("--shapes", default="few,every")
    ap.add_argument("--rounds", type=int, default=7, help="data path rounds")
    ap.add_argument("--samples", type=int, default=64, help="lookups of each kind")
    ap.add_argument("--tcp-rounds", type=int, default=21)
    ap.add_argument("--tcp-seconds", type=float, default=3.0)
    ap.add_argument("--tcp-rules", type=int, default=100_000, help="rules loaded beside ours")
    ap.add_argument("--cli-runs", type=int, default=7)
    ap.add_argument(
        "--change-runs", type=int, default=5, help="one-rule attach/detach pairs and statuses"
    )
    ap.add_argument("--targets", default="2000,10000", help="target counts to apply")
    ap.add_argument("--targets-runs", type=int, default=5)
    ap.add_argument("--udp-rounds", type=int, default=11)
    ap.add_argument("--udp-seconds", type=float, default=2.0)
    ap.add_argument("--udp-rules", type=int, default=100_000, help="rules loaded beside ours")
    ap.add_argument(
        "--udp-senders", type=int, default=1, help="sender processes (on the CPUs but one)"
    )
    ap.add_argument("--skip", default="", help="comma list of: " + ",".join(SECTIONS))
    ap.add_argument("--only", default="", help="comma list of the sections to run (no --skip)")
    ap.add_argument("--out", default="bench-results.json")
    ap.add_argument("--markdown", default="", help="also write the README tables here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("scripts/bench: run as root (it makes namespaces and loads BPF programs)")
    skip = set(filter(None, args.skip.split(",")))
    if args.only:
        skip = set(SECTIONS) - set(args.only.split(","))
    if unknown := (skip | set(filter(None, args.only.split(",")))) - set(SECTIONS):
        sys.exit(f"scripts/bench: no section {', '.join(sorted(unknown))}")
    res: dict[str, Any] = {"machine": machine()}
    sb = Sandbox()
    try:
        if "datapath" not in skip:
            sizes = [int(s) for s in args.sizes.split(",")]
            res["datapath"], res["baseline_ns"] = datapath(
                sb, sizes, args.shapes.split(","), args.rounds, args.samples, args.change_runs
            )
        if "cli" not in skip:
            log("CLI timings")
            res["cli"] = cli_times(sb, args.cli_runs)
        if "targets" not in skip:
            log("many targets")
            counts = [int(c) for c in args.targets.split(",")]
            res["many_targets"] = many_targets(sb, counts, args.targets_runs)
        if "tcp" not in skip:
            log("TCP connection rates")
            res["tcp"] = connection_rates(sb, args.tcp_rounds, args.tcp_seconds, args.tcp_rules)
        if "udp" not in skip:
            log("UDP delivery rates")
            res["udp"] = udp_delivery(
                sb, args.udp_rounds, args.udp_seconds, args.udp_rules, args.udp_senders
            )
    finally:
        sb.close()
    res["targets"] = judge(res)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2, sort_keys=True)
    text = markdown(res)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    print(text)
    print("Targets (issue 11):")
    for line in res["targets"]:
        print(f"  {line}")
    print(f"JSON: {args.out}")


def judge(res: dict[str, Any]) -> list[str]:
    """The targets of issue 11 against what was measured."""
    out = []

    def check(ok: bool, text: str) -> None:
        out.append(f"{'met ' if ok else 'MISSED'}  {text}")

    for r in res.get("datapath", []):
        ratio, to_ref = r["ratio_to_floor"], r.get("ratio_to_reference", {})
        label = f"{r['shape']} lengths, {size_label(r['rules'])} rules"
        if "steered" in ratio:
            limit = 1.5 if r["shape"] == "few" else 2.0
            check(
                ratio["steered"] <= limit,
                f"{label}: steered {ratio['steered']:.2f}× floor (≤ {limit})",
            )
        if r["shape"] == "few" and "steered" in to_ref:
            check(
                to_ref["steered"] <= 1.1,
                f"{label}: steered {to_ref['steered']:.2f}× reference (≤ 1.1)",
            )
        if "no prefix" in ratio:
            check(
                ratio["no prefix"] <= 1.0,
                f"{label}: unmatched {ratio['no prefix']:.2f}× floor (≤ 1.0)",
            )
        if r["rules"] == 100_000 and r["shape"] == "few":
            check(r["apply_first_s"] <= 1.0, f"{label}: apply {r['apply_first_s']:.2f} s (≤ 1.0)")
            for key, what in (
                ("attach_one_s", "one-rule attach"),
                ("detach_one_s", "detach"),
                ("attach_one_counted_s", "one-rule attach, counted"),
                ("detach_one_counted_s", "detach, counted"),
            ):
                if key in r:
                    check(r[key] <= 0.3, f"{label}: {what} {r[key]:.2f} s (≤ 0.3)")
            for key, what in (
                ("status_json_s", "status --json"),
                ("apply_unchanged_s", "unchanged re-apply"),
            ):
                if key in r:
                    check(r[key] <= 0.5, f"{label}: {what} {r[key]:.2f} s (≤ 0.5)")
            if "apply_peak_rss_mb" in r:
                rss = r["apply_peak_rss_mb"]
                check(rss <= 150, f"{label}: apply peak RSS {rss:.0f} MB (≤ 150)")
        if r["rules"] == 1_000_000 and r["shape"] == "few":
            check(r["apply_first_s"] <= 10, f"{label}: apply {r['apply_first_s']:.2f} s (≤ 10)")
    t = res.get("tcp")
    if t:
        r = t["ratio_to_direct_median"]
        check(r["sklookupctl"] >= 0.97, f"steered rate {r['sklookupctl']:.3f}× direct (≥ 0.97)")
        check(
            r["sklookupctl"] > max(r["nft redirect"], r["nft tproxy"]),
            f"ahead of nft redirect ({r['nft redirect']:.3f}) and tproxy ({r['nft tproxy']:.3f})",
        )
    u = res.get("udp")
    if u:
        r, c = u["ratio_to_direct_median"], u.get("ratio_per_sender_cpu_median", {})
        per_cpu = {m: f"; {c[m]:.3f} per sender CPU-s" if m in c else "" for m in r}
        check(
            r["sklookupctl"] >= 0.97,
            f"UDP delivered {r['sklookupctl']:.3f}× direct (≥ 0.97{per_cpu['sklookupctl']})",
        )
        check(
            r["sklookupctl"] >= r["floor"],
            f"UDP delivered at least the floor program's ({r['floor']:.3f}× direct"
            f"{per_cpu['floor']})",
        )
    return out


if __name__ == "__main__":
    main()
