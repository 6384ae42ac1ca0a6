"""netns and addr commands against the real kernel, in throwaway namespaces."""

from __future__ import annotations

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
