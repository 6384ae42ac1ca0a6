"""What a live host does to steering: proxies die and come back, namespaces are deleted,
thousands of targets move, reuseport groups gain and lose members. Nothing wedges."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from sklookupctl import api, sockets
from sklookupctl import netns as nsmod
from sklookupctl.bpfsys import Link

from .conftest import MADE, NS, assert_no_leaks, kernel_objects


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def wait_dead(ns: NS, label: str) -> list[dict[str, object]]:
    """The kernel tears a deleted namespace down from a work queue: wait until its link is."""
    deadline = time.monotonic() + 10
    while True:
        listed = json.loads(ns.ok("status", "--all", "--json").stdout)
        mine = [e for e in listed if e["label"] == label]
        if any(e["state"] == "dead" for e in mine) or time.monotonic() > deadline:
            return mine
        time.sleep(0.05)


def test_a_dead_proxy_never_wedges_the_namespace(ns: NS, tmp_path: Path) -> None:
    p = ns.proxy(tcp="127.0.0.1:0", tag="p")
    to = f"127.0.0.1:{p.port}"
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", to, "--name", "web")
    ns.ok("attach", "tcp", "198.51.100.0/24", "80", "--to", to, "--name", "solo")
    p.stop()
    # the proxy's socket is gone: every command still works; detaching the last rule of a
    # target empties its (already emptied) slot
    res = ns.ok("detach", "tcp", "198.51.100.0/24", "80")
    assert "removed tcp 198.51.100.0/24 80 -> solo" in res.output
    ns.ok("attach", "tcp", "203.0.113.0/24", "all", "--drop")
    res = ns.ok("attach", "tcp", "192.0.2.0/25", "443", "--to", to, "--name", "web")
    assert "stays registered without a socket" in res.output
    st = ns.status()
    assert [(t["name"], t["socket"]) for t in st["targets"]] == [("web", "missing")]  # type: ignore[index]
    assert "#" not in json.dumps(st) and "MISSING" in ns.ok("status").output
    exported = ns.ok("export").stdout
    assert "#1" not in exported and 'target = "web"' in exported
    f = write(tmp_path, "export.toml", exported)
    res = ns.ok("apply", f)  # an export applies while the proxy is down: nothing to change
    assert "nothing to change" in res.output and "stays registered" in res.output
    assert ns.dial("tcp", "192.0.2.1", 80) == "refused"  # on_missing drop
    # the proxy comes back: applying the export registers its socket
    p2 = ns.proxy(tcp=to, tag="p2")
    res = ns.ok("apply", f)
    assert "~ target web" in res.output
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 p2"
    assert ns.ok("export").stdout.split("\n", 1)[1] == exported.split("\n", 1)[1]
    (t,) = ns.status()["targets"]  # type: ignore[misc]
    assert t["socket"] == "live" and t["holders"][0]["pid"] == p2.pid
    assert ns.status()["sockmap"]["filled"] == 1  # type: ignore[index]
    ns.ok("detach", "tcp", "192.0.2.0/24", "all")
    ns.ok("detach", "tcp", "192.0.2.0/25", "443")
    assert ns.status()["targets"] == [] and ns.status()["sockmap"]["filled"] == 0  # type: ignore[index]


def test_a_deleted_namespace_is_collected_and_its_inode_not_confused(bpffs: str) -> None:
    base = kernel_objects()
    name = f"sklt-{uuid.uuid4().hex[:10]}"
    MADE.add(name)
    api.netns_add(name)
    dead = NS(name, bpffs)
    try:
        dead.proxy(tcp="127.0.0.1:0")
        dead.ok("attach", "tcp", "192.0.2.0/24", "all", "--drop")
        inode = os.stat(f"/run/netns/{name}").st_ino
    finally:
        for p in dead.procs:
            p.stop()
        subprocess.run(["ip", "netns", "del", name], check=True)  # not through sklookupctl
    mine = wait_dead(dead, name)
    assert [(e["state"], e["netns_inode"]) for e in mine] == [("dead", inode)], mine
    assert mine[0]["names"] == []
    # a new namespace with the same inode is not the dead one
    reused = None
    tried = []
    deadline = time.monotonic() + 20  # the kernel frees the inode when its cleanup work runs
    while reused is None and time.monotonic() < deadline and len(tried) < 200:
        n = f"sklt-{uuid.uuid4().hex[:10]}"
        MADE.add(n)
        api.netns_add(n)
        if os.stat(f"/run/netns/{n}").st_ino == inode:
            reused = n
            break
        tried.append(n)
        time.sleep(0.05)
    for n in tried:
        subprocess.run(["ip", "netns", "del", n], check=True)
    assert reused is not None, "the kernel did not reuse the inode"
    try:
        new = NS(reused, bpffs)
        st = new.status()
        assert st["loaded"] is False and st["netns_inode"] == inode
        assert "no sklookupctl dispatcher" in new.ok("status").output
        res = new.ok("gc", "--json")
        (gone,) = json.loads(res.stdout)["collected"]
        assert (gone["state"], gone["label"]) == ("dead", name)
        assert new.ok("gc").output == "nothing to remove\n"
        res = new.cli("detach", "tcp", "192.0.2.0/24", "all")
        assert res.exit_code == 1 and "no sklookupctl dispatcher" in res.output
        assert "nothing" in new.ok("detach", "--all").output
        assert new.files() == []
        assert_no_leaks(bpffs, base)
        # and steering in the new namespace works
        q = new.proxy(tcp="127.0.0.1:0", tag="q")
        api.addr_add(reused, "192.0.2.0/24")
        new.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{q.port}")
        assert new.dial("tcp", "192.0.2.9", 9) == "192.0.2.9 9 q"
        (entry,) = json.loads(new.ok("status", "--all", "--json").stdout)
        assert (entry["state"], entry["names"]) == ("steering", [reused])
    finally:
        for p in new.procs:
            p.stop()
        api.netns_del(reused, bpffs=bpffs)
    assert_no_leaks(bpffs, base)


def test_every_writer_collects_dead_namespaces(bpffs: str, ns: NS) -> None:
    name = f"sklt-{uuid.uuid4().hex[:10]}"
    MADE.add(name)
    api.netns_add(name)
    NS(name, bpffs).ok("attach", "tcp", "192.0.2.0/24", "all", "--drop")
    subprocess.run(["ip", "netns", "del", name], check=True)
    assert [e["state"] for e in wait_dead(ns, name)] == ["dead"]
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--drop")  # a writer elsewhere
    states = [e["state"] for e in json.loads(ns.ok("status", "--all", "--json").stdout)]
    assert states == ["steering"]


def test_a_detached_link_is_shown_and_the_next_change_reattaches(ns: NS, tmp_path: Path) -> None:
    p = ns.proxy(tcp="127.0.0.1:0", tag="p")
    args = ("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{p.port}")
    ns.ok(*args)
    f = write(tmp_path, "export.toml", ns.ok("export").stdout)

    def detach_link() -> None:
        with Link.from_pin(os.path.join(str(ns.status()["path"]), "link")) as link:
            link.detach()  # as `bpftool link detach` would

    detach_link()
    assert ns.dial("tcp", "192.0.2.1", 80) == "refused"
    st = ns.status()
    assert st["state"] == "detached" and st["position"] is None
    text = ns.ok("status").output
    assert "DETACHED" in text and "not attached" in text
    # said as it is: an unchanged file re-attaches, and says so; --dry-run and --exit-code
    # count it as a change (they said "nothing to change")
    dry = ns.ok("apply", "--dry-run", f).output
    assert "this would attach it again" in dry
    assert json.loads(ns.ok("apply", "--dry-run", "--json", f).stdout)["changed"] is True
    assert ns.cli("apply", "--dry-run", "--exit-code", f).exit_code == 5
    res = ns.ok("apply", f)
    assert "attached it again" in res.output and "no rule or target changed" in res.output
    assert ns.status()["state"] == "steering"
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 p"
    # attach of the rule that is there: unchanged, attached again
    detach_link()
    res = ns.ok(*args)
    assert (
        res.output.startswith("unchanged: tcp 192.0.2.0/24 all")
        and "attached it again" in res.output
    )
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 p"
    # and any other change does it too
    detach_link()
    ns.ok("attach", "tcp", "198.51.100.0/24", "80", "--drop")
    assert ns.status()["state"] == "steering"
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 p"


# -- many targets --------------------------------------------------------------------------------

MANY = 2100


def many_file(first_port: int) -> str:
    out = [f'[targets.t{i}]\nto = "127.0.0.1:{first_port + i}"\n' for i in range(MANY)]
    out += [
        f'[[rules]]\nprotocol = "tcp"\nprefix = "192.0.2.0/24"\nports = "{1000 + i}"\n'
        f'target = "t{i}"\n'
        for i in range(MANY)
    ]
    return "".join(out)


def test_thousands_of_targets_move_in_one_apply(
    ns: NS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns.proxy(extra=("--tcp-range", f"127.0.0.1:20000-{20000 + MANY - 1}"), tag="x")
    ns.proxy(extra=("--tcp-range", f"127.0.0.1:30000-{30000 + MANY - 1}"), tag="y")
    first = write(tmp_path, "first.toml", many_file(20000))
    second = write(tmp_path, "second.toml", many_file(30000))
    # one sock_diag dump per protocol and one /proc scan, however many targets
    dumps, scans = [], []
    real_dump, real_scan = sockets._diag_dump, sockets.scan_proc
    monkeypatch.setattr(sockets, "_diag_dump", lambda *a: dumps.append(a) or real_dump(*a))
    monkeypatch.setattr(sockets, "scan_proc", lambda: scans.append(1) or real_scan())
    res = api.apply(ns.name, first, bpffs=ns.bpffs)
    assert res.applied and len(res.targets_added) == MANY
    assert len(dumps) == 2 and len(scans) == 1  # tcp over both families; one scan
    st = ns.status()
    assert st["sockmap"] == {"capacity": 8192, "filled": MANY}
    # every target moves to another socket: old and new blocks are both needed until the switch
    dumps.clear(), scans.clear()
    res = api.apply(ns.name, second, bpffs=ns.bpffs)
    assert len(res.targets_changed) == MANY and len(dumps) == 2 and len(scans) == 1
    st = ns.status()
    assert st["sockmap"]["filled"] == MANY  # type: ignore[index]
    for i in (0, 777, MANY - 1):
        assert ns.dial("tcp", "192.0.2.5", 1000 + i) == f"192.0.2.5 {1000 + i} {30000 + i} y"
    # unchanged: no socket borrowed, no /proc scan at all
    dumps.clear(), scans.clear()
    res = api.apply(ns.name, second, bpffs=ns.bpffs)
    assert not res.applied and len(scans) == 0 and len(dumps) == 2
    # a file that fails on its last target changes nothing, not one slot
    files, st = ns.files(), ns.status()
    broken = many_file(20000).replace(f'"127.0.0.1:{20000 + MANY - 1}"', '"127.0.0.1:1"')
    res2 = ns.cli("apply", write(tmp_path, "broken.toml", broken))
    assert res2.exit_code == 1 and f"targets.t{MANY - 1}.to" in res2.output
    assert ns.files() == files and ns.status() == st


# -- reuseport groups ----------------------------------------------------------------------------


def tags(ns: NS, n: int = 40) -> list[str]:
    return [ns.dial("tcp", "192.0.2.7", 7000 + i).rsplit(" ", 1)[-1] for i in range(n)]


def test_a_reuseport_group_steers_while_any_member_lives(ns: NS) -> None:
    port = 18080
    members = [ns.proxy(tcp=f"127.0.0.1:{port}", tag=t, extra=("--reuseport",)) for t in "abc"]
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{port}", "--name", "web")
    (t,) = ns.status()["targets"]  # type: ignore[misc]
    assert (t["members"], t["alive"], t["reuseport"]) == (3, 3, "group")
    assert len(t["holders"]) == 3
    assert "3 of 3 alive" in ns.ok("status").output
    seen = tags(ns)
    assert set(seen) <= {"a", "b", "c"} and len(set(seen)) >= 2, seen  # the kernel spreads them
    members[0].stop()
    members[1].stop()
    (t,) = ns.status()["targets"]  # type: ignore[misc]
    assert (t["members"], t["alive"], t["socket"]) == (3, 1, "live")
    assert set(tags(ns, 10)) == {"c"}  # never refused while one member lives
    # a new member joins: re-running attach picks it up
    ns.proxy(tcp=f"127.0.0.1:{port}", tag="d", extra=("--reuseport",))
    res = ns.ok(
        "attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{port}", "--name", "web"
    )
    assert "registered again" in res.output
    (t,) = ns.status()["targets"]  # type: ignore[misc]
    assert (t["members"], t["alive"]) == (2, 2)
    assert set(tags(ns)) == {"c", "d"}
    members[2].stop()
    assert set(tags(ns, 10)) == {"d"}


def test_an_exact_target_is_that_socket_only(ns: NS, tmp_path: Path) -> None:
    port = 18081
    group = {t: ns.proxy(tcp=f"127.0.0.1:{port}", tag=t, extra=("--reuseport",)) for t in "xy"}
    res = ns.ok(
        "attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{port}", "--no-reuseport"
    )
    assert "2 sockets listen at 127.0.0.1:18081" in res.output  # says which one it took
    (t,) = ns.status()["targets"]  # type: ignore[misc]
    assert (t["members"], t["reuseport"]) == (1, "exact")
    (chosen,) = [tag for tag, p in group.items() if p.pid == t["holders"][0]["pid"]]
    assert set(tags(ns)) == {chosen}  # that socket, never its group's pick
    exported = ns.ok("export").stdout
    assert 'reuseport = "exact"' in exported
    assert "nothing to change" in ns.ok("apply", write(tmp_path, "e.toml", exported)).output
    # switching to the group needs --replace
    res = ns.cli("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{port}")
    assert res.exit_code == 1 and "--replace" in res.output
    group[chosen].stop()
    assert set(tags(ns, 5)) == {"refused"}  # its socket is gone: dropped, not the group's


def test_a_group_larger_than_a_target_holds(ns: NS) -> None:
    port = 18084
    for i in range(17):
        ns.proxy(tcp=f"127.0.0.1:{port}", tag=f"m{i}", extra=("--reuseport",))
    res = ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{port}")
    assert "17 sockets listen at 127.0.0.1:18084; 16 of its reuseport group are registered" in (
        res.output
    )
    (t,) = ns.status()["targets"]  # type: ignore[misc]
    assert (t["members"], t["alive"]) == (16, 16)


def test_a_socket_from_another_process_fd_joins_with_its_group(ns: NS) -> None:
    port = 18082
    a = ns.proxy(tcp=f"127.0.0.1:{port}", tag="a", extra=("--reuseport",))
    ns.proxy(tcp=f"127.0.0.1:{port}", tag="b", extra=("--reuseport",))
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--pid", str(a.pid), "--fd", str(a.tcp_fd))
    (t,) = ns.status()["targets"]  # type: ignore[misc]
    assert t["members"] == 2 and t["cookies"][0] == t["holders"][0]["cookie"]
    with nsmod.open_netns(ns.name) as n:
        found = sockets.Discovery(n)
        assert len(found.find("tcp", __import__("ipaddress").ip_address("127.0.0.1"), port)) == 2
        found.close()


@pytest.mark.parametrize("listen", ["[::]", "[::ffff:127.0.0.1]"])
def test_an_ipv4_target_served_by_a_dual_stack_socket(ns: NS, tmp_path: Path, listen: str) -> None:
    """The target keeps the address it was declared with (127.0.0.1), whatever the socket's
    family: re-running attach, a second rule, an apply of the same file and an export all
    agree with it, also while the proxy is down."""
    p = ns.proxy(tcp=f"{listen}:18083", tag="ds")
    args = ("attach", "tcp", "192.0.2.0/24", "80", "--to", "127.0.0.1:18083", "--name", "t")
    ns.ok(*args)
    assert "unchanged" in ns.ok(*args).output
    ns.ok("attach", "tcp", "192.0.2.0/24", "443", "--to", "127.0.0.1:18083", "--name", "t")
    assert ns.status()["targets"][0]["address"] == "127.0.0.1:18083"  # type: ignore[index]
    assert 'to = "127.0.0.1:18083"' in ns.ok("export").stdout
    f = write(
        tmp_path,
        "t.toml",
        '[targets.t]\nto = "127.0.0.1:18083"\n'
        + "".join(
            f'[[rules]]\nprotocol = "tcp"\nprefix = "192.0.2.0/24"\nports = "{port}"\n'
            'target = "t"\n'
            for port in (80, 443)
        ),
    )
    assert "nothing to change" in ns.ok("apply", f).output
    assert ns.dial("tcp", "192.0.2.1", 443) == "192.0.2.1 443 ds"
    p.stop()
    res = ns.ok("apply", f.replace("t.toml", "t.toml"))
    assert "nothing to change" in res.output and "stays registered" in res.output
