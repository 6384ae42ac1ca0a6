"""Which socket serves an address, without a kernel: the tiers of the kernel's own lookup,
reuseport groups, and sock_diag messages as they are parsed."""

from __future__ import annotations

import ipaddress
import random
import socket
import struct

from sklookupctl.sockets import (
    INET_DIAG_SKV6ONLY,
    TCP_CLOSE,
    TCP_ESTABLISHED,
    TCP_LISTEN,
    DiagEntry,
    _diag_entry,
    choose,
    exact_pick,
    group_of,
    tiers,
)

V4, V6 = socket.AF_INET, socket.AF_INET6
_inode = iter(range(100, 100000))


def entry(addr: str, port: int = 80, proto: str = "tcp", **kw: object) -> DiagEntry:
    a = ipaddress.ip_address(addr)
    fields: dict[str, object] = dict(
        family=V4 if a.version == 4 else V6,
        proto=proto,
        state=TCP_LISTEN if proto == "tcp" else TCP_CLOSE,
        addr=a,
        port=port,
        peer_port=0,
        inode=next(_inode),
        cookie=next(_inode),
    )
    fields.update(kw)
    return DiagEntry(**fields)  # type: ignore[arg-type]


A = ipaddress.ip_address("192.0.2.1")


def test_tiers_rank_as_the_kernel_does() -> None:
    exact = entry("192.0.2.1")
    mapped = entry("::ffff:192.0.2.1")
    wild = entry("0.0.0.0")
    dual = entry("::")
    six_only = entry("::", v6only=True)
    other_port = entry("192.0.2.1", port=81)
    other_addr = entry("192.0.2.2")
    everything = [six_only, dual, wild, mapped, exact, other_port, other_addr]
    for _ in range(10):
        random.shuffle(everything)
        assert tiers(everything, A, 80) == [[exact], [mapped], [wild], [dual]]
        assert choose(everything, A, 80) == [exact]
    assert choose([wild, dual], A, 80) == [wild]  # the family's own wildcard first
    assert choose([dual, six_only], A, 80) == [dual]
    assert choose([six_only], A, 80) == []  # an IPv6-only socket takes no IPv4
    assert choose([other_port, other_addr], A, 80) == []


def test_ipv6_addresses_take_ipv6_sockets_only() -> None:
    six = ipaddress.ip_address("2001:db8::1")
    exact, wild, four = entry("2001:db8::1"), entry("::"), entry("0.0.0.0")
    assert tiers([four, wild, exact], six, 80) == [[exact], [wild]]
    assert choose([four], six, 80) == []


def test_only_sockets_that_receive() -> None:
    connecting = entry("192.0.2.1", state=TCP_ESTABLISHED, peer_port=5000)
    connected_udp = entry("192.0.2.1", proto="udp", state=TCP_ESTABLISHED, peer_port=53)
    bound_udp = entry("192.0.2.1", proto="udp")
    assert choose([connecting], A, 80) == []
    assert choose([connected_udp, bound_udp], A, 80) == [bound_udp]


def test_a_tier_is_ordered_oldest_first() -> None:
    members = [entry("0.0.0.0", inode=i) for i in (30, 10, 20)]
    assert [e.inode for e in choose(members, A, 80)] == [10, 20, 30]


def test_group_of() -> None:
    a, b, c = (entry("0.0.0.0", uid=1000) for _ in range(3))
    other_user = entry("0.0.0.0", uid=0)
    tier = [a, b, other_user, c]
    # the first socket has SO_REUSEPORT: every member of its user that has it joins
    flags = {a.cookie: True, b.cookie: True, other_user.cookie: True, c.cookie: False}
    assert group_of(tier, flags) == [a, b]
    # without SO_REUSEPORT on the first, it stands alone
    assert group_of(tier, {**flags, a.cookie: False}) == [a]
    assert group_of([], flags) == []
    many = [entry("0.0.0.0") for _ in range(20)]
    assert group_of(many, {e.cookie: True for e in many}) == many[:16]
    assert group_of(many, {e.cookie: True for e in many}, limit=3) == many[:3]


def _message(fam: int, state: int, addr: bytes, port: int, v6only: int | None) -> bytes:
    """An inet_diag_msg as the kernel sends it, with an INET_DIAG_SKV6ONLY attribute."""
    body = struct.pack("=BBBB", fam, state, 0, 0)
    body += struct.pack("!HH", port, 0) + addr.ljust(16, b"\0") + bytes(16)
    body += struct.pack("=I", 0) + struct.pack("=II", 0xDEADBEEF, 0x1)  # if, cookie
    body += struct.pack("=IIIII", 0, 0, 0, 1000, 4242)  # expires, queues, uid, inode
    if v6only is not None:
        body += struct.pack("=HHB3x", 5, INET_DIAG_SKV6ONLY, v6only)
    return body


def test_diag_messages_are_parsed() -> None:
    raw = _message(V6, TCP_LISTEN, ipaddress.ip_address("::").packed, 8080, 1)
    e = _diag_entry(raw, 0, len(raw), socket.IPPROTO_TCP)
    assert (e.family, e.proto, e.state, str(e.addr), e.port) == (V6, "tcp", TCP_LISTEN, "::", 8080)
    assert (e.uid, e.inode, e.cookie, e.v6only) == (1000, 4242, 0x1DEADBEEF, True)
    raw = _message(V4, TCP_CLOSE, ipaddress.ip_address("192.0.2.9").packed, 53, None)
    e = _diag_entry(raw, 0, len(raw), socket.IPPROTO_UDP)
    assert (e.proto, str(e.addr), e.port, e.v6only) == ("udp", "192.0.2.9", 53, False)


def test_an_exact_target_keeps_its_socket_while_it_is_there() -> None:
    tier = [entry("0.0.0.0") for _ in range(3)]
    assert exact_pick(tier, set()) == tier[0]
    assert exact_pick(tier, {tier[2].cookie}) == tier[2]
    assert exact_pick(tier, {12345}) == tier[0]  # gone: the first
