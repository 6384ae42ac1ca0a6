"""docs/monitoring.md and docs/prometheus/alerts.yml name only metrics sklookupctl exports,
and every metric it exports is documented."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import yaml

from sklookupctl import metrics
from sklookupctl.plan import Slotted
from sklookupctl.rules import make_rule

DOCS = Path(__file__).resolve().parents[2] / "docs"
NAME = re.compile(r"\bsklookupctl_[a-z_]+")


def exported() -> set[str]:
    t = Slotted("web", "tcp", 2, ipaddress.ip_address("127.0.0.1"), 80, 0, 1)
    m = metrics.NsMetrics("edge", "steering", 1, 1, 100, False, [(t, (1, 2, 3, 4, 5), 1)])
    m.drops = {"tcp": (0, 6, 0, 0, 0), "udp": (0, 0, 0, 0, 0)}
    m.per_rule = [(make_rule("tcp", "192.0.2.0/24", "all", target="web"), (1, 2, 3, 4, 5))]
    names = set()
    collector = metrics.SklookupctlCollector("/", 1, None, per_rule=True)
    real = metrics.gather
    metrics.gather = lambda *a, **k: [m]  # type: ignore[assignment]
    try:
        for fam in collector.collect():
            names |= {s.name for s in fam.samples}
    finally:
        metrics.gather = real  # type: ignore[assignment]
    assert "sklookupctl_up" in names
    return names


def test_alerts_name_exported_metrics() -> None:
    rules = yaml.safe_load((DOCS / "prometheus" / "alerts.yml").read_text())
    names = exported()
    used = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            used |= set(NAME.findall(rule["expr"]))
    assert used and used <= names, used - names


def test_every_metric_is_documented() -> None:
    doc = (DOCS / "monitoring.md").read_text()
    documented = set(NAME.findall(doc))
    names = exported()
    per_rule = {n for n in names if n.startswith("sklookupctl_rule_")}
    assert names - per_rule <= documented, (names - per_rule) - documented
    assert "sklookupctl_rule_*_total" in doc
    assert {n for n in documented if not n.startswith("sklookupctl_rule_")} <= names


def test_a_namespace_without_a_name_never_takes_anothers_label() -> None:
    from sklookupctl import layout

    def meta(label: bytes, inode: int) -> layout.Meta:
        m = layout.Meta(netns_inode=inode)
        m.label = label
        return m

    names = {7: "edge"}
    assert metrics._label(meta(b"edge", 7), names) == "edge"
    # "edge" was deleted and given to a new namespace: the old one keeps its inode apart
    assert metrics._label(meta(b"edge", 5), names) == "edge/5"
    assert metrics._label(meta(b"/proc/9/ns/net", 6), names) == "/proc/9/ns/net/6"
    assert metrics._label(meta(b"the caller's netns", 8), names) == "netns/8"
    # a name may hold "@" but never "/": no name can be another namespace's label
    names[9] = "edge@5"
    assert metrics._label(meta(b"edge", 5), names) != metrics._label(meta(b"x", 9), names)


def test_overridden_says_where_the_deciding_program_runs() -> None:
    from sklookupctl import explain

    base = {
        "rule": None,
        "reason": "overridden",
        "verdict": "steer",
        "normal_lookup": None,
        "protocol": "tcp",
        "address": "192.0.2.1",
        "port": 80,
    }
    after = explain.describe({**base, "decided_by": {"id": 9, "runs": "after ours"}})
    before = explain.describe({**base, "decided_by": {"id": 9, "runs": "before ours"}})
    assert "running after ours" in after and "last selection counts" in after
    assert "running before ours" in before and "ours selected none" in before
