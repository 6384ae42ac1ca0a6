"""netns and addr commands against the real kernel, in throwaway namespaces."""

from __future__ import annotations

import ctypes
import json
import os
import uuid

from .conftest import NS, PREFIXES


def test_addr_add_list_del(ns: NS) -> None:
    assert json.loads(ns.ok("addr", "list", "--json").stdout) == sorted(
        PREFIXES, key=lambda p: (":" in p, p)
    )
    assert "unchanged" in ns.ok("addr", "add", "192.0.2.0/24").output
    ns.ok("addr", "del", "203.0.113.0/24")
    assert "203.0.113.0/24" not in json.loads(ns.ok("addr", "list", "--json").stdout)
    res = ns.cli("addr", "del", "203.0.113.0/24")
    assert res.exit_code == 1 and "is not an AnyIP prefix" in res.output
    # a listener can bind an AnyIP address, and only while the prefix is there
    ns.proxy(tcp="192.0.2.77:80")
    assert ns.dial("tcp", "192.0.2.77", 80) == "192.0.2.77 80"


def test_a_whole_family_as_anyip_is_listed_and_exported(ns: NS) -> None:
    """0.0.0.0/0 and ::/0 (every address local: the kernel's route has no destination)."""
    for prefix in ("0.0.0.0/0", "::/0"):
        ns.ok("addr", "add", prefix)
        assert prefix in json.loads(ns.ok("addr", "list", "--json").stdout)
        assert f'"{prefix}"' in ns.ok("export").stdout
        ns.ok("addr", "del", prefix)
        assert prefix not in json.loads(ns.ok("addr", "list", "--json").stdout)


def test_netns_add_list_del(ns: NS) -> None:
    name = f"sklt-{uuid.uuid4().hex[:10]}"
    try:
        assert "created" in ns.ok("netns", "add", name).output
        assert "unchanged" in ns.ok("netns", "add", name).output
        names = [n["name"] for n in json.loads(ns.ok("netns", "list", "--json").stdout)]
        assert name in names
        # a dispatcher in it goes with it
        other = NS(name, ns.bpffs)
        other.ok("attach", "tcp", "192.0.2.0/24", "all", "--drop")
        inode = os.stat(f"/run/netns/{name}").st_ino
        assert "and its dispatcher" in ns.ok("netns", "del", name).output
        assert not os.path.exists(f"{ns.bpffs}/sklookupctl/{inode}")
        assert not os.path.exists(f"/run/netns/{name}")
        res = ns.cli("netns", "del", name)
        assert res.exit_code == 1 and "does not exist" in res.output
    finally:
        if os.path.exists(f"/run/netns/{name}"):
            ns.ok("netns", "del", name)


def _live_gen(ns: NS) -> str:
    """The live generation's directory of the dispatcher in `ns`."""
    st = ns.status()
    return os.path.join(str(st["path"]), f"gen-{st['program_id']}")


def _overwrite_meta_layout(gen: str, version: int) -> None:
    from sklookupctl import layout
    from sklookupctl.bpfsys import Map

    with Map.from_pin(os.path.join(gen, "meta"), ctypes.c_uint32, layout.Meta) as m:
        meta = m.lookup(ctypes.c_uint32(0))
        assert meta is not None
        meta.layout = version
        m.update(ctypes.c_uint32(0), meta)


def test_state_of_another_version_is_refused_then_cleared(ns: NS) -> None:
    ns.proxy(tcp="127.0.0.1:9000", tag="web")
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", "127.0.0.1:9000")
    _overwrite_meta_layout(_live_gen(ns), 99)
    for args in (["status"], ["attach", "tcp", "198.51.100.0/24", "80", "--drop"], ["export"]):
        res = ns.cli(*args)
        assert res.exit_code == 4, res.output
        assert res.output.startswith("error: state in ") and "has layout 99" in res.output
        assert "`detach --all` removes it" in res.output
        assert "Traceback" not in res.output and res.output.count("\n") == 1
    # the old state still steers until the operator clears it
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 web"
    assert "damaged state directory" in ns.ok("detach", "--all").output
    assert ns.files() == [] and ns.dial("tcp", "192.0.2.1", 80) == "refused"
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--to", "127.0.0.1:9000")
    assert ns.dial("tcp", "192.0.2.1", 80) == "192.0.2.1 80 web"


def test_incomplete_state_is_refused_then_cleared(ns: NS) -> None:
    ns.ok("attach", "tcp", "192.0.2.0/24", "all", "--drop")
    os.unlink(os.path.join(_live_gen(ns), "segments"))
    res = ns.cli("status")
    assert res.exit_code == 4
    assert "incomplete sklookupctl state" in res.output and "segments is missing" in res.output
    assert "damaged state directory" in ns.ok("detach", "--all").output
    assert ns.files() == [] and ns.dial("tcp", "192.0.2.1", 80) == "refused"
