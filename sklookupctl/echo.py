"""A small echo proxy used by the demo and the tests: `python -m sklookupctl.echo`.

It enters a network namespace, opens one TCP listener and/or one UDP socket, prints one JSON
line (pid, fds, addresses) and serves until killed or until --lifetime seconds have passed.
Each TCP connection first receives the original destination ("ADDR PORT[ TAG]\\n", from
getsockname()), then its own bytes back. Each UDP datagram is answered with the original
destination (from IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR) followed by the datagram.
Client helpers for the same protocol live here too.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import socket
import struct
import sys
import threading
import time

IP_RECVORIGDSTADDR = 20
IP_ORIGDSTADDR = 20
IPV6_RECVORIGDSTADDR = 74
IPV6_ORIGDSTADDR = 74
CLONE_NEWNET = 0x40000000
IP_FREEBIND = 15
IP_PKTINFO = 8


def parse(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def _family(host: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def open_tcp(endpoint: str, v6only: bool = False, reuseport: bool = False) -> socket.socket:
    host, port = parse(endpoint)
    s = socket.socket(_family(host), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if s.family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    s.bind((host, port))
    s.listen(128)
    return s


def open_udp(endpoint: str, v6only: bool = False, reuseport: bool = False) -> socket.socket:
    host, port = parse(endpoint)
    s = socket.socket(_family(host), socket.SOCK_DGRAM)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if s.family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
    s.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)
    s.bind((host, port))
    return s


def orig_dst(ancdata: list[tuple[int, int, bytes]]) -> str:
    """The original destination of a datagram, as 'ADDR PORT'."""
    for level, ctype, data in ancdata:
        if level == socket.IPPROTO_IP and ctype == IP_ORIGDSTADDR:
            port = struct.unpack_from("!H", data, 2)[0]
            return f"{ipaddress.IPv4Address(data[4:8])} {port}"
        if level == socket.IPPROTO_IPV6 and ctype == IPV6_ORIGDSTADDR:
            port = struct.unpack_from("!H", data, 2)[0]
            addr = ipaddress.IPv6Address(data[8:24])
            mapped = addr.ipv4_mapped
            return f"{mapped or addr} {port}"
    return "? ?"


TAG = ""  # --tag: appended to each first line, so tests can tell servers apart


def _serve_conn(conn: socket.socket) -> None:
    with conn:
        host, port = conn.getsockname()[:2]
        addr = ipaddress.ip_address(host.split("%")[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        try:
            conn.sendall(f"{addr} {port}{TAG}\n".encode())
            while data := conn.recv(4096):
                conn.sendall(data)
        except OSError:
            pass


def serve_many(listeners: list[socket.socket]) -> None:
    """Many TCP listeners in one thread: each connection gets its first line and is closed."""
    import selectors

    sel = selectors.DefaultSelector()
    for s in listeners:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            try:
                conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
            except OSError:
                continue
            with conn:
                conn.setblocking(True)
                host, port = conn.getsockname()[:2]
                own = key.fileobj.getsockname()[1]  # type: ignore[union-attr]
                with contextlib.suppress(OSError):
                    conn.sendall(f"{host} {port} {own}{TAG}\n".encode())


def serve_tcp(s: socket.socket) -> None:
    while True:
        try:
            conn, _ = s.accept()
        except OSError:
            return
        threading.Thread(target=_serve_conn, args=(conn,), daemon=True).start()


def _reply_from(dst: str, peer: tuple[str, int], payload: bytes, fallback: socket.socket) -> None:
    """Reply from the original destination, so a client connected to it accepts the answer."""
    host, _, port = dst.partition(" ")
    peer_addr = ipaddress.ip_address(peer[0].split("%")[0])
    if isinstance(peer_addr, ipaddress.IPv6Address) and peer_addr.ipv4_mapped:
        peer_addr = peer_addr.ipv4_mapped
    try:
        if int(port) == fallback.getsockname()[1]:
            # addressed to the port this socket is bound to (a wildcard, say): it answers
            # itself, from that address (a second socket could not bind there)
            _reply_as(fallback, host, peer, payload)
            return
        with socket.socket(_family(host), socket.SOCK_DGRAM) as r:
            r.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            r.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            r.bind((host, int(port)))
            r.sendto(payload, (str(peer_addr), peer[1]))
    except (OSError, ValueError):
        fallback.sendto(payload, peer)


def _reply_as(s: socket.socket, host: str, peer: tuple[str, int], payload: bytes) -> None:
    """Send from `s` with `host` as the source address (IP_PKTINFO / IPV6_PKTINFO; an IPv4
    source of a dual-stack socket as its v4-mapped form)."""
    src = ipaddress.ip_address(host)
    # an AnyIP address is no interface's: IPv6 takes it as a source only from a free-bind
    # socket
    s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
    if s.family == socket.AF_INET6:
        a6 = src if src.version == 6 else ipaddress.IPv6Address(f"::ffff:{src}")
        info = (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, a6.packed + struct.pack("=I", 0))
    else:
        info = (socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=I", 0) + src.packed + bytes(4))
    s.sendmsg([payload], [info], 0, peer)


def serve_udp(s: socket.socket) -> None:
    while True:
        try:
            data, anc, _flags, peer = s.recvmsg(4096, 1024)
        except OSError:
            return
        dst = orig_dst(anc)
        _reply_from(dst, peer, f"{dst}{TAG}\n".encode() + data, s)


# -- clients: what tests and the demo dial with ----------------------------------------------


def _client(host: str, kind: int) -> socket.socket:
    """A client socket bound to the loopback address when `host` is not loopback.

    Dialling a local address on a port no socket is bound to (just what steering is for) from
    that same address, the kernel may pick the destination port as the ephemeral source port:
    the socket then connects to itself (TCP simultaneous open) or receives its own datagram,
    and the hook never runs. A different source address rules that out.
    """
    s = socket.socket(_family(host), kind)
    addr = ipaddress.ip_address(host)
    if not addr.is_loopback:
        s.bind(("127.0.0.1" if addr.version == 4 else "::1", 0))
    return s


def dial_tcp(host: str, port: int, timeout: float = 2.0, payload: bytes = b"") -> str:
    """Connect and return the first line the server sends ('ADDR PORT'), or 'refused' or
    'timeout'. The calling thread must already be in the namespace to dial from."""
    s = _client(host, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        if payload:
            s.sendall(payload)
        return _readline(s)
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except ConnectionResetError:
        return "reset"
    finally:
        s.close()


def _readline(s: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode().strip() or "closed"


def dial_udp(host: str, port: int, timeout: float = 1.0) -> str:
    """Send one datagram and return the first reply line, or 'refused' or 'timeout'."""
    s = _client(host, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))  # so an ICMP port unreachable comes back as ECONNREFUSED
        s.send(b"ping")
        return s.recv(4096).split(b"\n", 1)[0].decode()
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    finally:
        s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--netns", help="path of the network namespace to serve in")
    ap.add_argument("--tcp", metavar="ADDR:PORT")
    ap.add_argument("--udp", metavar="ADDR:PORT")
    ap.add_argument("--v6only", action="store_true")
    ap.add_argument("--reuseport", action="store_true", help="set SO_REUSEPORT before bind")
    ap.add_argument(
        "--tcp-range",
        metavar="ADDR:LO-HI",
        help="a TCP listener on every port LO..HI (each connection is answered 'ADDR PORT "
        "LISTENING-PORT[ TAG]' and closed)",
    )
    ap.add_argument("--tcp-bound", metavar="ADDR:PORT", help="a TCP socket that never listens")
    ap.add_argument("--udp-connected", metavar="ADDR:PORT", help="a connected UDP socket")
    ap.add_argument("--tag", default="", help="word appended to each reply's first line")
    ap.add_argument(
        "--lifetime", type=float, default=600.0, help="exit after this many seconds (0: never)"
    )
    ap.add_argument(
        "--comm", help="process name to take once serving (as any process may: PR_SET_NAME)"
    )
    ap.add_argument("--uid", type=int, help="drop to this uid (and gid) once the sockets are made")
    args = ap.parse_args()
    global TAG
    TAG = f" {args.tag}" if args.tag else ""
    if args.netns:
        import ctypes

        fd = os.open(args.netns, os.O_RDONLY)
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            sys.exit(f"setns {args.netns}: {os.strerror(ctypes.get_errno())}")
        os.close(fd)
    ready: dict[str, object] = {"pid": os.getpid()}
    socks = []
    if args.tcp_range:
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        host, _, span = args.tcp_range.rpartition(":")
        lo, _, hi = span.partition("-")
        many = [open_tcp(f"{host}:{p}") for p in range(int(lo), int(hi) + 1)]
        socks += many
        ready.update(tcp_range=[int(lo), int(hi)])
        threading.Thread(target=serve_many, args=(many,), daemon=True).start()
    if args.tcp:
        t = open_tcp(args.tcp, args.v6only, args.reuseport)
        socks.append(t)
        ready.update(tcp_fd=t.fileno(), tcp_port=t.getsockname()[1])
        threading.Thread(target=serve_tcp, args=(t,), daemon=True).start()
    if args.udp:
        udp = args.udp
        if args.tcp and udp.endswith(":0"):  # same port number as the TCP socket
            udp = f"{udp[:-2]}:{ready['tcp_port']}"
        u = open_udp(udp, args.v6only, args.reuseport)
        socks.append(u)
        ready.update(udp_fd=u.fileno(), udp_port=u.getsockname()[1])
        threading.Thread(target=serve_udp, args=(u,), daemon=True).start()
    if args.tcp_bound:  # bound, never listening: for tests of what attach refuses
        b = socket.socket(_family(parse(args.tcp_bound)[0]), socket.SOCK_STREAM)
        b.bind(parse(args.tcp_bound))
        socks.append(b)
        ready.update(tcp_bound_fd=b.fileno(), tcp_bound_port=b.getsockname()[1])
    if args.udp_connected:  # bound and connected: for tests of what attach refuses
        c = socket.socket(_family(parse(args.udp_connected)[0]), socket.SOCK_DGRAM)
        c.bind(parse(args.udp_connected))
        c.connect((c.getsockname()[0], 9))
        socks.append(c)
        ready.update(udp_connected_fd=c.fileno(), udp_connected_port=c.getsockname()[1])
    if args.uid is not None:
        os.setgroups([])
        os.setresgid(args.uid, args.uid, args.uid)
        os.setresuid(args.uid, args.uid, args.uid)
    if args.comm is not None:
        import ctypes

        name = ctypes.create_string_buffer(args.comm.encode("utf-8", "surrogateescape")[:15])
        ctypes.CDLL(None, use_errno=True).prctl(15, name, 0, 0, 0)  # PR_SET_NAME
    print(json.dumps(ready), flush=True)
    if args.lifetime > 0:
        time.sleep(args.lifetime)
    else:
        threading.Event().wait()


if __name__ == "__main__":
    main()
