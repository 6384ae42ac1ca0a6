"""Sockets: find one by its listening address (sock_diag), find who holds it (/proc), borrow it
(pidfd_getfd), and check that it can serve a rule.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import os
import socket
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import netns as netns_mod
from .errors import NotFound, PermissionDenied, SocketRejected
from .netns import Netns
from .rules import PROTO_NAMES, PROTOCOLS, IPAddress, format_endpoint

SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_ESTABLISHED = 1
TCP_CLOSE = 7
TCP_LISTEN = 10
SO_COOKIE = 57
SIOCGSKNS = 0x894C
SYS_PIDFD_GETFD = 438

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class DiagEntry:
    """One socket as sock_diag reports it."""

    family: int
    proto: str
    state: int
    addr: IPAddress
    port: int
    peer_port: int
    inode: int
    cookie: int


def _diag_dump(family: int, proto: int, states: int) -> list[DiagEntry]:
    # mirrors struct nlmsghdr + struct inet_diag_req_v2 (sockid zeroed: dump everything)
    req = struct.pack("=BBBBI48x", family, proto, 0, 0, states)
    hdr = struct.pack(
        "=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
    )
    out: list[DiagEntry] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4) as nl:  # NETLINK_SOCK_DIAG
        nl.sendto(hdr + req, (0, 0))
        while True:
            data = nl.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, mtype, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, off)
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + 16)
                    if err == 0:
                        return out
                    raise OSError(-err, f"sock_diag: {os.strerror(-err)}")
                body = off + 16
                # mirrors struct inet_diag_msg
                fam, state = struct.unpack_from("=BB", data, body)
                sport, dport = struct.unpack_from("!HH", data, body + 4)
                src = data[body + 8 : body + 24]
                c0, c1 = struct.unpack_from("=II", data, body + 44)
                inode = struct.unpack_from("=I", data, body + 68)[0]
                addr: IPAddress = (
                    ipaddress.IPv4Address(src[:4])
                    if fam == socket.AF_INET
                    else ipaddress.IPv6Address(src)
                )
                out.append(
                    DiagEntry(
                        fam, PROTO_NAMES[proto], state, addr, sport, dport, inode, c0 | (c1 << 32)
                    )
                )
                off += (length + 3) & ~3
            if not data:
                return out


def diag(ns: Netns, proto: str, states: int = 0xFFFFFFFF) -> list[DiagEntry]:
    """Every TCP or UDP socket of `ns` (both families) in the given states."""
    with netns_mod.enter(ns):
        return [
            e
            for fam in (socket.AF_INET, socket.AF_INET6)
            for e in _diag_dump(fam, PROTOCOLS[proto], states)
        ]


def _candidates(entries: Iterable[DiagEntry], addr: IPAddress, port: int) -> list[DiagEntry]:
    """Sockets that would receive traffic for addr:port, best first: exact address, wildcard of
    the same family, then (for IPv4) an IPv6 wildcard or v4-mapped socket."""
    exact, wild, dual = [], [], []
    mapped = ipaddress.IPv6Address(f"::ffff:{addr}") if addr.version == 4 else None
    for e in entries:
        if e.port != port:
            continue
        if e.addr == addr:
            exact.append(e)
        elif e.addr.version == addr.version and e.addr.is_unspecified:
            wild.append(e)
        elif (
            mapped is not None
            and e.addr.version == 6
            and (e.addr.is_unspecified or e.addr == mapped)
        ):
            dual.append(e)
    return (
        sorted(exact, key=lambda e: e.inode)
        + sorted(wild, key=lambda e: e.inode)
        + sorted(dual, key=lambda e: e.inode)
    )


def find_by_address(ns: Netns, proto: str, addr: IPAddress, port: int) -> DiagEntry:
    """The socket listening (TCP) or bound unconnected (UDP) at addr:port in `ns`."""
    where = format_endpoint(addr, port)
    everything = diag(ns, proto)
    wanted = TCP_LISTEN if proto == "tcp" else TCP_CLOSE
    found = _candidates([e for e in everything if e.state == wanted], addr, port)
    if found:
        return found[0]
    others = [e for e in everything if e.port == port and e.addr == addr]
    if others and proto == "tcp":
        raise SocketRejected(
            f"the tcp socket at {where} in {ns.label} is not listening",
            "point --to at a socket that has called listen()",
        )
    if others:
        raise SocketRejected(
            f"the udp socket at {where} in {ns.label} is connected",
            "a connected UDP socket cannot receive new flows; use an unconnected bound socket",
        )
    raise NotFound(
        f"no {proto} socket {'listens' if proto == 'tcp' else 'is bound'} at {where} in {ns.label}",
        "start the proxy first, check the address with `ss -ltnu`, or pass --pid and --fd",
    )


@dataclass(frozen=True)
class Holder:
    pid: int
    fd: int
    comm: str


def holders(inodes: Iterable[int]) -> dict[int, list[Holder]]:
    """Which processes hold which socket inodes (a scan of /proc/*/fd)."""
    wanted = {f"socket:[{i}]": i for i in inodes}
    out: dict[int, list[Holder]] = {i: [] for i in wanted.values()}
    if not wanted:
        return out
    for pid_text in os.listdir("/proc"):
        if not pid_text.isdigit():
            continue
        fd_dir = f"/proc/{pid_text}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd_text in fds:
            try:
                link = os.readlink(f"{fd_dir}/{fd_text}")
            except OSError:
                continue
            inode = wanted.get(link)
            if inode is not None:
                out[inode].append(Holder(int(pid_text), int(fd_text), _comm(int(pid_text))))
    for hs in out.values():
        hs.sort(key=lambda h: (h.pid, h.fd))
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def borrow(pid: int, fd: int) -> int:
    """Duplicate fd `fd` of process `pid` into this process (pidfd_getfd)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise NotFound(f"no process with pid {pid}", "check the pid with `ps`") from None
    except PermissionError:
        raise PermissionDenied(f"cannot open process {pid}", "run as root") from None
    try:
        ret = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if ret < 0:
            err = ctypes.get_errno()
            if err == errno.EBADF:
                raise NotFound(f"process {pid} has no fd {fd}", f"see ls -l /proc/{pid}/fd")
            if err in (errno.EPERM, errno.EACCES):
                raise PermissionDenied(
                    f"cannot take fd {fd} of process {pid}: {os.strerror(err)}",
                    "run as root (needs CAP_SYS_PTRACE over the process)",
                )
            if err == errno.ESRCH:
                raise NotFound(f"process {pid} has exited")
            raise OSError(err, f"pidfd_getfd({pid}, {fd}): {os.strerror(err)}")
        return int(ret)
    finally:
        os.close(pidfd)


@dataclass
class SocketInfo:
    """A socket this process holds a duplicate of (owns `fd`), with what was checked."""

    fd: int
    proto: str
    family: int
    addr: IPAddress
    port: int
    cookie: int
    v6only: bool
    holder: str = field(default="")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def endpoint(self) -> str:
        return format_endpoint(self.addr, self.port)


def inspect(fd: int, ns: Netns, where: str) -> SocketInfo:
    """Check fd is a TCP listener or an unconnected bound UDP socket living in `ns`.

    Takes ownership of `fd` (closed on failure).
    """
    try:
        return _inspect(fd, ns, where)
    except BaseException:
        os.close(fd)
        raise


def _inspect(fd: int, ns: Netns, where: str) -> SocketInfo:
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise SocketRejected(f"{where} is not a socket", "pass the fd of a listening socket")
    s = socket.socket(fileno=os.dup(fd))
    try:
        family = s.family
        if family not in (socket.AF_INET, socket.AF_INET6):
            raise SocketRejected(f"{where} is not an IPv4 or IPv6 socket")
        proto_num = s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
        proto = PROTO_NAMES.get(proto_num)
        if proto is None:
            raise SocketRejected(f"{where} is neither TCP nor UDP")
        try:
            sns = fcntl.ioctl(fd, SIOCGSKNS)
        except OSError as e:
            raise SocketRejected(f"cannot tell which netns {where} lives in: {e}") from None
        try:
            sns_ino = os.fstat(sns).st_ino
        finally:
            os.close(sns)
        if sns_ino != ns.inode:
            raise SocketRejected(
                f"{where} lives in another network namespace (inode {sns_ino}) than the "
                f"target {ns.label} (inode {ns.inode})",
                "the kernel would accept it and connections would hang; use a socket opened "
                "inside the target netns, or pass the matching --netns",
            )
        host, port = s.getsockname()[:2]
        addr = ipaddress.ip_address(host.split("%")[0])
        if proto == "tcp":
            if not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise SocketRejected(
                    f"{where} is a TCP socket that is not listening",
                    "give the listening socket, not an accepted or connecting one",
                )
        else:
            if port == 0:
                raise SocketRejected(f"{where} is a UDP socket that is not bound", "bind it first")
            try:
                s.getpeername()
            except OSError:
                pass
            else:
                raise SocketRejected(
                    f"{where} is a connected UDP socket",
                    "a connected UDP socket cannot receive new flows; use an unconnected one",
                )
        v6only = bool(
            family == socket.AF_INET6 and s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        )
        cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
    finally:
        s.close()
    return SocketInfo(fd, proto, family, addr, port, cookie, v6only)


def acquire_by_address(ns: Netns, proto: str, addr: IPAddress, port: int) -> SocketInfo:
    """Find the socket at addr:port in `ns`, borrow it from its holder and check it."""
    entry = find_by_address(ns, proto, addr, port)
    hs = holders([entry.inode]).get(entry.inode, [])
    where = f"{proto} socket at {format_endpoint(entry.addr, entry.port)}"
    if not hs:
        raise NotFound(f"no process holds the {where}", "is it being closed?")
    h = hs[0]
    info = inspect(borrow(h.pid, h.fd), ns, where)
    info.holder = f"pid {h.pid} ({h.comm}) fd {h.fd}"
    return info


def acquire_by_fd(ns: Netns, pid: int, fd: int) -> SocketInfo:
    info = inspect(borrow(pid, fd), ns, f"fd {fd} of pid {pid}")
    info.holder = f"pid {pid} ({_comm(pid)}) fd {fd}"
    return info


def owners_by_cookie(ns: Netns, cookies: Iterable[int]) -> dict[int, list[Holder]]:
    """For each socket cookie in `ns`: the processes holding that socket."""
    want = set(cookies)
    inode_of: dict[int, int] = {}
    if want:
        for proto in ("tcp", "udp"):
            for e in diag(ns, proto):
                if e.cookie in want:
                    inode_of[e.cookie] = e.inode
    by_inode = holders(inode_of.values())
    return {c: by_inode.get(inode_of[c], []) if c in inode_of else [] for c in want}
