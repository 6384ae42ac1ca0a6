"""The sender and the receiver of scripts/bench's UDP delivery runs (the standard library only,
so that it starts fast; sendmmsg and recvmmsg through ctypes, so that Python's own cost per
datagram is a small part of the kernel's).

Both take a common clock (CLOCK_MONOTONIC): they wait until START, work until END and count
what they sent or received, and their CPU time, between W0 and W1, the measured window; then
they print one line of JSON and exit. Every run is bounded in time: nothing runs past END.

  bench_udp.py send DEST START W0 W1 END [--cpu N] [--batch B] [--size BYTES]
      DEST is ADDR:PORT or PREFIX:LO-HI (each datagram to a random address and port of it).
      From a raw socket, each datagram with a source address (198.51.100.2-254) and port of
      its own: a new flow every time (conntrack, where present, makes an entry for each).
  bench_udp.py recv FD START W0 W1 END [--cpu N]
      FD is an unconnected UDP socket the parent passes down.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import os
import random
import socket
import struct
import time

MSG_WAITFORONE = 0x10000
RECV_BATCH = 256
RECV_BUF = 256  # bytes kept of each datagram


class IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", MsgHdr), ("msg_len", ctypes.c_uint)]


_libc = ctypes.CDLL(None, use_errno=True)
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_sendmmsg.restype = ctypes.c_int
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
_recvmmsg.restype = ctypes.c_int


DOCUMENTATION = [
    ipaddress.IPv4Network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
]


def destinations(spec: str, count: int, rng: random.Random) -> list[tuple[str, int]]:
    where, ports = spec.rsplit(":", 1)
    net = ipaddress.IPv4Network(where)
    if not any(net.subnet_of(d) for d in DOCUMENTATION):
        raise SystemExit(f"bench_udp.py: {net} is not in a documentation range")
    lo, _, hi = ports.partition("-")
    first, last = int(lo), int(hi or lo)
    if net.num_addresses == 1 and first == last:
        return [(str(net.network_address), first)] * count
    return [
        (str(net.network_address + rng.randrange(net.num_addresses)), rng.randint(first, last))
        for _ in range(count)
    ]


class Window:
    """The count and this process's CPU time at W0 and at W1, taken by whoever passes them
    first."""

    def __init__(self, w0: float, w1: float) -> None:
        self.w0, self.w1 = w0, w1
        self.at0 = self.at1 = -1
        self.cpu0 = self.cpu1 = 0.0

    def tick(self, now: float, count: int) -> None:
        if self.at0 < 0 and now >= self.w0:
            self.at0, self.cpu0 = count, time.process_time()
        if self.at1 < 0 and now >= self.w1:
            self.at1, self.cpu1 = count, time.process_time()

    @property
    def count(self) -> int:
        return self.at1 - self.at0 if self.at0 >= 0 and self.at1 >= 0 else -1

    @property
    def cpu_share(self) -> float:
        """CPU time (user and system, the softirq work done in this process's context among
        it) over the window's wall time."""
        return (self.cpu1 - self.cpu0) / (self.w1 - self.w0)


def wait_until(t: float) -> None:
    while (left := t - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))


SOURCES = 253  # source addresses, a prime: 198.51.100.2 to .254
FIRST_PORT = 1024  # source ports FIRST_PORT to 65535, one per datagram of a cycle


def send(args: argparse.Namespace) -> dict[str, object]:
    """Datagrams from a raw socket (IP_HDRINCL), each with a source address and port of its
    own: a cycle of 64,512 datagrams has one per source port, from addresses that turn by one
    each cycle, so a (source address, port) pair comes back after 253 cycles (16M datagrams).
    Message i of a cycle carries IP header i % 253 (its source and destination address), UDP
    header i (its ports) and the payload, three iovecs."""
    rng = random.Random(os.getpid())
    count = 65536 - FIRST_PORT
    batch = args.batch
    count -= count % batch
    dests = destinations(args.dest, count, rng)
    ip_hdrs = (ctypes.c_char * (20 * SOURCES))()
    names = (ctypes.c_char * (16 * SOURCES))()
    for j in range(SOURCES):
        daddr = socket.inet_aton(dests[j][0])
        struct.pack_into("=HH4s8x", names, 16 * j, socket.AF_INET, 0, daddr)
    udp_hdrs = (ctypes.c_char * (8 * count))()
    for i in range(count):
        struct.pack_into("!HHHH", udp_hdrs, 8 * i, FIRST_PORT + i, dests[i][1], 8 + args.size, 0)
    payload = ctypes.create_string_buffer(b"x" * args.size, args.size)
    iovs = (IoVec * (3 * count))()
    msgs = (MMsgHdr * count)()
    for i in range(count):
        j = i % SOURCES
        iovs[3 * i] = IoVec(ctypes.addressof(ip_hdrs) + 20 * j, 20)
        iovs[3 * i + 1] = IoVec(ctypes.addressof(udp_hdrs) + 8 * i, 8)
        iovs[3 * i + 2] = IoVec(ctypes.addressof(payload), args.size)
        h = msgs[i].msg_hdr
        h.msg_name, h.msg_namelen = ctypes.addressof(names) + 16 * j, 16
        h.msg_iov, h.msg_iovlen = ctypes.addressof(iovs) + 3 * ctypes.sizeof(IoVec) * i, 3

    def turn(generation: int) -> None:
        for j in range(SOURCES):
            saddr = bytes((198, 51, 100, 2 + (generation + j) % SOURCES))
            daddr = socket.inet_aton(dests[j][0])
            # the kernel fills in the total length and the checksum; an id of 1 spares it
            # choosing one
            hdr = (0x45, 0, 0, 1, 0x4000, 64, socket.IPPROTO_UDP, 0, saddr, daddr)
            struct.pack_into("!BBHHHBBH4s4s", ip_hdrs, 20 * j, *hdr)

    size = ctypes.sizeof(MMsgHdr)
    vecs = [ctypes.addressof(msgs) + size * b for b in range(0, count, batch)]
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    fd = sock.fileno()
    generation = 0
    turn(generation)
    wait_until(args.start)
    window = Window(args.w0, args.w1)
    sent = errors = 0
    started = now = time.monotonic()
    while now < args.end:
        for vec in vecs:
            n = _sendmmsg(fd, vec, batch, 0)
            if n > 0:
                sent += n
            else:
                errors += 1
            now = time.monotonic()
            window.tick(now, sent)
            if now >= args.end:
                break
        generation += 1
        turn(generation)
    sock.close()
    return {
        "sent": sent,
        "sent_in_window": window.count,
        "cpu_share": window.cpu_share,
        "started_late_s": max(0.0, started - args.start),
        "errors": errors,
    }


def recv(args: argparse.Namespace) -> dict[str, object]:
    s = socket.socket(fileno=args.fd)
    s.settimeout(None)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 100_000))
    bufs = (ctypes.c_char * (RECV_BUF * RECV_BATCH))()
    iovs = (IoVec * RECV_BATCH)()
    msgs = (MMsgHdr * RECV_BATCH)()
    for i in range(RECV_BATCH):
        iovs[i].iov_base, iovs[i].iov_len = ctypes.addressof(bufs) + RECV_BUF * i, RECV_BUF
        msgs[i].msg_hdr.msg_iov, msgs[i].msg_hdr.msg_iovlen = ctypes.addressof(iovs[i]), 1
    fd, vec = s.fileno(), ctypes.addressof(msgs)
    wait_until(args.start)
    window = Window(args.w0, args.w1)
    got = batches = 0
    now = time.monotonic()
    while now < args.end:
        n = _recvmmsg(fd, vec, RECV_BATCH, MSG_WAITFORONE, None)
        if n > 0:
            got += n
            batches += 1
        now = time.monotonic()
        window.tick(now, got)
    s.detach()  # the parent's socket: leave it open
    return {
        "received": got,
        "received_in_window": window.count,
        "cpu_share": window.cpu_share,
        "batches": batches,
    }


def in_named_netns() -> bool:
    """Whether this process is in a namespace under /run/netns (never the host's own, where
    the bench must not send from)."""
    own = os.stat("/proc/self/ns/net").st_ino
    names = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    return any(os.stat(os.path.join("/run/netns", n)).st_ino == own for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    for name in ("send", "recv"):
        p = sub.add_parser(name)
        if name == "send":
            p.add_argument("dest")
        else:
            p.add_argument("fd", type=int)
        for t in ("start", "w0", "w1", "end"):
            p.add_argument(t, type=float)
        p.add_argument("--cpu", type=int, default=-1)
        if name == "send":
            p.add_argument("--batch", type=int, default=64)
            p.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    if args.what == "send" and not in_named_netns():
        raise SystemExit("bench_udp.py: the sender runs only in a named network namespace")
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    out = send(args) if args.what == "send" else recv(args)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
