"""Another tool's sk_lookup program in the same netns: the kernel's combination rules hold, and
`detach --all` leaves the foreign link alone."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from sklookupctl import compiler
from sklookupctl import netns as nsmod
from sklookupctl.bpfsys import Link, Program, query_netns_programs

from .conftest import NS

FOREIGN_REDIRECT_PORT = 7001
FOREIGN_DROP_PORT = 7002

FOREIGN = r"""
BPF_TABLE("sockmap", u32, u64, fsock, 1);
int foreign(struct bpf_sk_lookup *ctx) {
    u32 port = ctx->local_port;
    if (port == REDIRECT_PORT) {
        u32 k = 0;
        struct bpf_sock *sk = (struct bpf_sock *)fsock.lookup(&k);
        if (!sk)
            return SK_PASS;
        bpf_sk_assign(ctx, sk, BPF_SK_LOOKUP_F_REPLACE);
        bpf_sk_release(sk);
        return SK_PASS;
    }
    if (port == DROP_PORT)
        return SK_DROP;
    return SK_PASS;
}
""".replace("REDIRECT_PORT", str(FOREIGN_REDIRECT_PORT)).replace(
    "DROP_PORT", str(FOREIGN_DROP_PORT)
)


@contextmanager
def foreign_program(n: NS, sock_fd: int) -> Iterator[int]:
    """Attach another tool's program (unpinned link held here); yields its program id."""
    import bcc

    with compiler.kernel_source() as ksrc:
        if ksrc:
            os.environ["BCC_KERNEL_SOURCE"] = ksrc
        b = bcc.BPF(text=FOREIGN.encode(), cflags=["-w"])
    fn = b.load_func(b"foreign", 30, attach_type=36)
    sockmap_fd = bcc.libbcc.lib.bpf_table_fd(b.module, b"fsock")
    from sklookupctl.bpfsys import Map

    m: Map[ctypes.c_uint32, ctypes.c_uint64] = Map(
        os.dup(sockmap_fd), ctypes.c_uint32, ctypes.c_uint64
    )
    m.update(ctypes.c_uint32(0), ctypes.c_uint64(sock_fd))
    prog = Program(os.dup(fn.fd))
    b.cleanup()
    with nsmod.open_netns(n.name) as ns_:
        link = Link.create_netns(prog, ns_.fd)
    try:
        yield int(prog.info().id)
    finally:
        link.close()
        prog.close()
        m.close()


def _foreign_socket(n: NS) -> int:
    """A listener the foreign program steers to; this test process holds it."""
    import socket

    with nsmod.open_netns(n.name) as ns_, nsmod.enter(ns_):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.2", 0))
    s.listen(16)
    n._foreign = s  # type: ignore[attr-defined]  # keep it open for the test
    return s.fileno()


def _serve_once_tagged(n: NS) -> None:
    import threading

    s = n._foreign  # type: ignore[attr-defined]

    def run() -> None:
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            host, port = c.getsockname()[:2]
            c.sendall(f"{host} {port} foreign\n".encode())
            c.close()

    threading.Thread(target=run, daemon=True).start()


@pytest.mark.parametrize("foreign_first", [True, False], ids=["foreign-before", "foreign-after"])
def test_foreign_program_combines_and_survives_detach_all(ns: NS, foreign_first: bool) -> None:
    p = ns.proxy(tcp="127.0.0.1:0", tag="ours")
    fd = _foreign_socket(ns)
    _serve_once_tagged(ns)
    attach = ("attach", "tcp", "192.0.2.0/24", "all", "--to", f"127.0.0.1:{p.port}")
    if not foreign_first:
        ns.ok(*attach)
    with foreign_program(ns, fd) as foreign_id:
        if foreign_first:
            ns.ok(*attach)
        st = ns.status()
        assert st["other_programs"] == [foreign_id]
        assert st["position"] == (2 if foreign_first else 1)

        # both select a socket: the program that runs last wins (both use F_REPLACE)
        last = "ours" if foreign_first else "foreign"
        assert ns.dial("tcp", "192.0.2.1", FOREIGN_REDIRECT_PORT).endswith(last)
        # one drops, the other redirects: redirected, whatever the order
        assert (
            ns.dial("tcp", "192.0.2.1", FOREIGN_DROP_PORT) == f"192.0.2.1 {FOREIGN_DROP_PORT} ours"
        )
        # we have no rule, the foreign program drops: refused
        assert ns.dial("tcp", "198.51.100.1", FOREIGN_DROP_PORT) == "refused"
        # we have no rule, the foreign program redirects: its socket
        assert ns.dial("tcp", "198.51.100.1", FOREIGN_REDIRECT_PORT).endswith("foreign")

        ns.ok("detach", "--all")
        with nsmod.open_netns(ns.name) as n_:
            assert query_netns_programs(n_.fd) == [foreign_id]
        assert ns.dial("tcp", "192.0.2.1", FOREIGN_REDIRECT_PORT).endswith("foreign")
        assert ns.dial("tcp", "192.0.2.1", FOREIGN_DROP_PORT) == "refused"
        assert ns.dial("tcp", "192.0.2.1", 80) == "refused"  # nothing listens, nothing steers
    ns._foreign.close()  # type: ignore[attr-defined]
