"""Metrics in the Prometheus text format (`metrics`): printed once for node_exporter's textfile
collector, or served on /metrics (`metrics --listen`), read afresh at every scrape.

Every namespace sklookupctl has state for is covered (or the one given with --netns). Counters
are kept per target and per protocol's drop rules across every rule-set change (a group's
`tbase`: see image.groups), so they only grow while the target exists; per-rule counters
(--per-rule) follow each rule, which a change may remove. Labels: namespace (the name under
/run/netns when it has one, else what the writer was told), target, protocol.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from . import image, layout, store, validate
from .errors import InvalidArgument, SklookupError
from .netns import Netns
from .plan import Slotted
from .rules import Rule, format_ports

PREFIX = "sklookupctl_"
# layout.KERNEL_COUNTERS -> (metric name, help)
TARGET_COUNTERS = {
    "steered": ("target_steered", "Lookups handed to the target's socket."),
    "dropped": (
        "target_dropped",
        "Lookups for the target's rules that were refused: its socket was missing or refused "
        "them and on-missing is drop.",
    ),
    "passed": (
        "target_passed",
        "Lookups for the target's rules left to the normal socket lookup: its socket was "
        "missing or refused them and on-missing is pass.",
    ),
    "missing": (
        "target_missing_socket",
        "Lookups for the target's rules while it had no live socket (then dropped or passed).",
    ),
    "errors": (
        "target_assign_errors",
        "Lookups the target's socket refused (family or protocol mismatch).",
    ),
}
RULE_COUNTERS = {
    "steered": "Lookups this rule steered to its target's socket.",
    "dropped": "Lookups this rule refused (a drop rule, or its target's socket was missing).",
    "passed": "Lookups this rule left to the normal socket lookup (missing socket, on-missing "
    "pass).",
    "missing": "Lookups for this rule while its target had no live socket.",
    "errors": "Lookups this rule's target socket refused.",
}


@dataclass
class NsMetrics:
    """What one namespace's state says, read under the lock."""

    namespace: str
    state: str  # steering | detached
    generation: int
    rules: int
    memory: int
    tracing: bool
    targets: list[tuple[Slotted, tuple[int, ...], int]] = field(default_factory=list)
    drops: dict[str, tuple[int, ...]] = field(default_factory=dict)  # protocol -> counters
    per_rule: list[tuple[Rule, tuple[int, ...]]] = field(default_factory=list)


def _names_by_inode() -> dict[int, str]:
    from . import netns as nsmod

    out: dict[int, str] = {}
    for item in nsmod.list_named():
        inode = int(str(item["inode"]))
        out[inode] = min(out.get(inode, str(item["name"])), str(item["name"]))
    return out


def _label(meta: layout.Meta, names: dict[int, str]) -> str:
    """The namespace's name under /run/netns; for one that has none (any more), what the
    writer was told, a slash and its inode: no name holds a slash, so it can never take the
    label of a namespace named now (the name of a deleted namespace given to a new one), and
    two such labels differ by their inodes."""
    name = names.get(int(meta.netns_inode))
    if name:
        return name
    told = meta.label.decode(errors="replace")
    if not told or told == "the caller's netns":
        told = "netns"
    return f"{told}/{meta.netns_inode}"


def _read(d: store.Dispatcher, names: dict[int, str], per_rule: bool) -> NsMetrics:
    gen = d.gen
    assert gen is not None
    meta = gen.meta()
    targets = gen.targets()
    counted, columns = d.counts()
    totals = counted.group_stats(columns)[0]
    width = len(layout.KERNEL_COUNTERS)
    m = NsMetrics(
        namespace=_label(meta, names),
        state=d.state,
        generation=int(meta.generation),
        rules=int(meta.rules),
        memory=gen.memlock(),
        tracing=d.tracing is not None,
    )
    for t in targets:
        alive = sum(1 for slot in t.block() if d.socket_cookie(slot) is not None)
        m.targets.append((t, totals.get(("target", t.name), (0,) * width), alive))
    m.drops = {p: totals.get(("drop", p), (0,) * width) for p in image.DROP_GROUPS}
    if per_rule:
        rules = [Rule(k, *eff) for k, eff in gen.effects([t.name for t in targets]).items()]
        m.per_rule = list(zip(rules, zip(*columns, strict=True), strict=True))
    return m


def gather(
    bpffs: str, wait: float, only: Netns | None = None, per_rule: bool = False
) -> list[NsMetrics]:
    """Every namespace's metrics (or `only` this one's), read under the shared lock."""
    names = _names_by_inode()
    out = []
    cookie = only.cookie() if only is not None else None
    with store.Store.locked(bpffs, exclusive=False, wait=wait) as held:
        for e in held.entries():
            if e.state not in ("steering", "detached"):
                continue
            if cookie is not None and e.cookie != cookie:
                continue
            with (
                contextlib.suppress(OSError),
                store.Dispatcher.open(e.path, e.cookie, readonly=True) as d,
            ):
                if d.gen is not None:
                    out.append(_read(d, names, per_rule))
    return out


def families(namespaces: list[NsMetrics], per_rule: bool) -> Iterator[Metric]:
    """The metric families, in the Prometheus client's model."""
    ns_labels = ["namespace"]
    t_labels = ["namespace", "target", "protocol"]
    steering = GaugeMetricFamily(
        PREFIX + "steering",
        "1 while the dispatcher is attached to the namespace, 0 when its link was detached.",
        labels=ns_labels,
    )
    rules = GaugeMetricFamily(PREFIX + "rules", "Rules loaded.", labels=ns_labels)
    targets = GaugeMetricFamily(PREFIX + "targets", "Targets loaded.", labels=ns_labels)
    generation = GaugeMetricFamily(
        PREFIX + "generation", "Rule-set changes made to the namespace.", labels=ns_labels
    )
    memory = GaugeMetricFamily(
        PREFIX + "memory_bytes",
        "Kernel memory of the live generation's program maps.",
        labels=ns_labels,
    )
    tracing = GaugeMetricFamily(
        PREFIX + "tracing", "1 while `sklookupctl trace` runs on the namespace.", labels=ns_labels
    )
    lookups = CounterMetricFamily(
        PREFIX + "target_lookups",
        "Lookups the target's rules decided (steered + dropped + passed).",
        labels=t_labels,
    )
    per_field = {
        k: CounterMetricFamily(PREFIX + name, doc, labels=t_labels)
        for k, (name, doc) in TARGET_COUNTERS.items()
    }
    alive = GaugeMetricFamily(
        PREFIX + "target_socket_alive",
        "1 while the target has a live socket (0: its connections are dropped, or passed).",
        labels=t_labels,
    )
    sockets = GaugeMetricFamily(
        PREFIX + "target_sockets",
        "Live sockets of the target (the members of its reuseport group).",
        labels=t_labels,
    )
    drops = CounterMetricFamily(
        PREFIX + "drop_rule_drops",
        "Lookups refused by drop rules.",
        labels=["namespace", "protocol"],
    )
    r_labels = ["namespace", "protocol", "prefix", "ports", "action", "target"]
    rule_fams = {
        k: CounterMetricFamily(
            PREFIX + TARGET_COUNTERS[k][0].replace("target_", "rule_"), doc, labels=r_labels
        )
        for k, doc in RULE_COUNTERS.items()
    }
    for m in namespaces:
        n = [m.namespace]
        steering.add_metric(n, 1 if m.state == "steering" else 0)
        rules.add_metric(n, m.rules)
        targets.add_metric(n, len(m.targets))
        generation.add_metric(n, m.generation)
        memory.add_metric(n, m.memory)
        tracing.add_metric(n, 1 if m.tracing else 0)
        for t, counts, live in m.targets:
            labels = [m.namespace, t.name, t.proto]
            by = dict(zip(layout.KERNEL_COUNTERS, counts, strict=True))
            lookups.add_metric(labels, by["steered"] + by["dropped"] + by["passed"])
            for k, fam in per_field.items():
                fam.add_metric(labels, by[k])
            alive.add_metric(labels, 1 if live else 0)
            sockets.add_metric(labels, live)
        for proto, counts in m.drops.items():
            by = dict(zip(layout.KERNEL_COUNTERS, counts, strict=True))
            drops.add_metric([m.namespace, proto], by["dropped"])
        for r, counts in m.per_rule:
            key = r.key
            labels = [
                m.namespace,
                key.proto,
                str(key.prefix),
                format_ports(key.lo, key.hi),
                r.action,
                r.target or "",
            ]
            for name, v in zip(layout.KERNEL_COUNTERS, counts, strict=True):
                rule_fams[name].add_metric(labels, v)
    yield from (steering, rules, targets, generation, memory, tracing, lookups)
    yield from per_field.values()
    yield from (alive, sockets, drops)
    if per_rule:
        yield from rule_fams.values()


class SklookupctlCollector(Collector):
    """Reads the state at every collect (every scrape). A scrape that cannot read it (the
    lock busy longer than --wait, say) serves sklookupctl_up 0 and says why on stderr, once
    per reason, rather than failing the scrape with a traceback."""

    def __init__(
        self, bpffs: str, wait: float, only: Netns | None, per_rule: bool, serving: bool = False
    ) -> None:
        self.bpffs = bpffs
        self.wait = wait
        self.only = only
        self.per_rule = per_rule
        self.serving = serving
        self.last_error = ""

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            PREFIX + "up", "1 when the last read of sklookupctl's state succeeded."
        )
        try:
            got = list(
                families(gather(self.bpffs, self.wait, self.only, self.per_rule), self.per_rule)
            )
        except (SklookupError, OSError) as e:
            if not self.serving:
                raise
            text = str(e) if isinstance(e, SklookupError) else f"{e.strerror or e}"
            if text != self.last_error:
                from . import notices

                notices.emit(f"a scrape could not read the state: {text}")
                self.last_error = text
            up.add_metric([], 0)
            return [up]
        self.last_error = ""
        up.add_metric([], 1)
        return [up, *got]


def registry(
    bpffs: str, wait: float, only: Netns | None, per_rule: bool, serving: bool = False
) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SklookupctlCollector(bpffs, wait, only, per_rule, serving))
    return reg


def text(bpffs: str, wait: float, only: Netns | None = None, per_rule: bool = False) -> str:
    """The metrics once, in the Prometheus text format."""
    from prometheus_client import generate_latest

    return generate_latest(registry(bpffs, wait, only, per_rule)).decode()


def parse_listen(text: str) -> tuple[str, int]:
    """ADDR:PORT, [IPV6]:PORT or :PORT (every address) -> (address, port); port 0: one the
    kernel picks (the note says which)."""

    validate.path_text(text, "--listen")
    host, sep, port = text.rpartition(":")
    if not sep:
        raise InvalidArgument(
            f"--listen {validate.show(text)} has no port",
            "give ADDR:PORT, such as 127.0.0.1:9848 or [::1]:9848",
        )
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host:
        validate.address_text(host, "--listen", "give ADDR:PORT, such as 127.0.0.1:9848")
        import ipaddress

        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise InvalidArgument(
                f"--listen {validate.show(text)}: {validate.show(host)} is not an IP address",
                "give ADDR:PORT, such as 127.0.0.1:9848 or [::1]:9848",
            ) from None
    number = validate.digits(port, "--listen port", 5)
    if number > 65535:
        raise InvalidArgument(f"--listen port {number} is not a port", "ports are 0-65535")
    return host or "::", number


def serve(
    listen: str, bpffs: str, wait: float, only: Netns | None, per_rule: bool, ready: Any = None
) -> None:
    """Serve /metrics on `listen` until SIGINT or SIGTERM (which return normally)."""
    from prometheus_client import start_http_server

    host, port = parse_listen(listen)
    try:
        server, thread = start_http_server(
            port, host, registry(bpffs, wait, only, per_rule, serving=True)
        )
    except OSError as e:
        from .errors import EnvironmentProblem

        raise EnvironmentProblem(f"cannot listen on {listen}: {e.strerror}") from None
    if ready is not None:
        ready(server.server_address)
    stop = threading.Event()
    saved = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(3600):
            pass
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        server.shutdown()
        server.server_close()
        thread.join(5)


def write_file(path: str, content: str) -> None:
    """Replace `path` with `content` in one rename (a textfile collector never reads half a
    file); the temporary file is made beside it, 0644. Only a regular file is replaced: a
    symlink, a device or a directory there is refused."""
    import stat
    import tempfile

    from .errors import EnvironmentProblem

    validate.path_text(path, "--output")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(
                f"--output {validate.show(path)} is not a regular file",
                "give the path of a file to replace (a .prom file of the textfile collector)",
            )
    if not os.path.isdir(directory):
        raise EnvironmentProblem(
            f"--output: directory {validate.show(directory)} does not exist", "make it first"
        )
    fd, tmp = tempfile.mkstemp(prefix=".sklookupctl-", suffix=".prom.tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
            os.fchmod(f.fileno(), 0o644)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
