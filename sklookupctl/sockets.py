"""Sockets: find them by their listening address (sock_diag), find who holds them (/proc),
borrow them (pidfd_getfd), and check that they can serve a rule.

A command learns about a namespace's sockets once: `Discovery` makes one sock_diag dump per
protocol and one scan of /proc, both on first use, and indexes them; however many targets a
command has, it asks these indexes. Which socket serves an address is a pure decision
(`choose`, `group_of`), tested without a kernel.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import os
import resource
import socket
import stat
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from . import netns as netns_mod
from .errors import NotFound, SocketRejected, denied
from .layout import MAX_MEMBERS
from .netns import Netns
from .rules import PROTO_NAMES, PROTOCOLS, IPAddress, format_endpoint

SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
INET_DIAG_SKV6ONLY = 11
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
    uid: int = 0
    v6only: bool = False

    @property
    def endpoint(self) -> str:
        return format_endpoint(self.addr, self.port)

    def receives(self) -> bool:
        """A socket that new connections (TCP: listening) or flows (UDP: bound, unconnected)
        can be steered to."""
        if self.proto == "tcp":
            return self.state == TCP_LISTEN
        return self.state == TCP_CLOSE and self.peer_port == 0


def _diag_dump(family: int, proto: int) -> list[DiagEntry]:
    # mirrors struct nlmsghdr + struct inet_diag_req_v2 (sockid zeroed: dump everything)
    req = struct.pack("=BBBBI48x", family, proto, 0, 0, 0xFFFFFFFF)
    hdr = struct.pack(
        "=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
    )
    out: list[DiagEntry] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4) as nl:  # NETLINK_SOCK_DIAG
        nl.sendto(hdr + req, (0, 0))
        while True:
            data = nl.recv(1 << 20)
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
                out.append(_diag_entry(data, off + 16, off + length, proto))
                off += (length + 3) & ~3
            if not data:
                return out


def _diag_entry(data: bytes, body: int, end: int, proto: int) -> DiagEntry:
    # mirrors struct inet_diag_msg (72 bytes), then its attributes
    fam, state = struct.unpack_from("=BB", data, body)
    sport, dport = struct.unpack_from("!HH", data, body + 4)
    src = data[body + 8 : body + 24]
    c0, c1 = struct.unpack_from("=II", data, body + 44)
    uid, inode = struct.unpack_from("=II", data, body + 64)
    v6only = False
    at = body + 72
    while at + 4 <= end:
        alen, atype = struct.unpack_from("=HH", data, at)
        if alen < 4:
            break
        if atype == INET_DIAG_SKV6ONLY:
            v6only = bool(data[at + 4])
        at += (alen + 3) & ~3
    addr: IPAddress = (
        ipaddress.IPv4Address(src[:4]) if fam == socket.AF_INET else ipaddress.IPv6Address(src)
    )
    return DiagEntry(
        fam, PROTO_NAMES[proto], state, addr, sport, dport, inode, c0 | (c1 << 32), uid, v6only
    )


# -- which socket serves an address: pure decisions ------------------------------------------


def tiers(entries: Iterable[DiagEntry], addr: IPAddress, port: int) -> list[list[DiagEntry]]:
    """The receiving sockets that would take traffic for addr:port, in tiers, best first, as
    the kernel's own lookup ranks them: bound to the address itself; (IPv4) bound to its
    v4-mapped IPv6 address; bound to the wildcard of the same family; (IPv4) bound to the IPv6
    wildcard of a dual-stack socket. Each tier holds the sockets bound to one address (more
    than one: a SO_REUSEPORT group), lowest inode first. Empty tiers are left out."""
    exact: list[DiagEntry] = []
    mapped: list[DiagEntry] = []
    wild: list[DiagEntry] = []
    dual: list[DiagEntry] = []
    v4_mapped = ipaddress.IPv6Address(f"::ffff:{addr}") if addr.version == 4 else None
    for e in entries:
        if e.port != port or not e.receives():
            continue
        if e.addr == addr:
            exact.append(e)
        elif v4_mapped is not None and e.addr == v4_mapped:
            mapped.append(e)
        elif e.addr.version == addr.version and e.addr.is_unspecified:
            wild.append(e)
        elif (
            v4_mapped is not None
            and e.addr.version == 6
            and e.addr.is_unspecified
            and not e.v6only  # an IPv6-only socket takes no IPv4 traffic
        ):
            dual.append(e)
    key = _by_inode
    return [sorted(t, key=key) for t in (exact, mapped, wild, dual) if t]


def _by_inode(e: DiagEntry) -> int:
    return e.inode


def choose(entries: Iterable[DiagEntry], addr: IPAddress, port: int) -> list[DiagEntry]:
    """The sockets bound where traffic for addr:port lands: the best tier (see `tiers`);
    empty when none receives there."""
    found = tiers(entries, addr, port)
    return found[0] if found else []


def exact_pick(tier: Sequence[DiagEntry], known: Iterable[int]) -> DiagEntry:
    """The one socket of a tier for an exact target: the one registered before while it is
    still there (re-running a command does not hop between members), else the first."""
    known = set(known)
    return next((e for e in tier if e.cookie in known), tier[0])


def group_of(
    tier: Sequence[DiagEntry], reuseport: dict[int, bool], limit: int = MAX_MEMBERS
) -> list[DiagEntry]:
    """The members to register from a tier, given which sockets have SO_REUSEPORT (by cookie):
    its first socket, and with it, when it has SO_REUSEPORT, every other socket of the tier
    that has it and belongs to the same user (the kernel's condition for one group), up to
    `limit`."""
    if not tier:
        return []
    first = tier[0]
    if not reuseport.get(first.cookie):
        return [first]
    group = [e for e in tier if reuseport.get(e.cookie) and e.uid == first.uid]
    return group[:limit]


# -- holders and borrowing ---------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    pid: int
    fd: int
    comm: str

    def describe(self) -> str:
        return f"pid {self.pid} ({self.comm}) fd {self.fd}"


def scan_proc() -> dict[int, list[tuple[int, int]]]:
    """Every socket inode held by a process: inode -> [(pid, fd)] (one pass over /proc/*/fd)."""
    out: dict[int, list[tuple[int, int]]] = {}
    readlink = os.readlink
    for pid_text in os.listdir("/proc"):
        if not pid_text.isdigit():
            continue
        fd_dir = f"/proc/{pid_text}/fd/"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        pid = int(pid_text)
        for fd_text in fds:
            try:
                link = readlink(fd_dir + fd_text)
            except OSError:
                continue
            if link.startswith("socket:["):
                out.setdefault(int(link[8:-1]), []).append((pid, int(fd_text)))
    for hs in out.values():
        hs.sort()
    return out


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


PID_MAX = 1 << 22  # the kernel's PID_MAX_LIMIT


def borrow(pid: int, fd: int) -> int:
    """Duplicate fd `fd` of process `pid` into this process (pidfd_getfd)."""
    if not 0 < pid <= PID_MAX:
        raise NotFound(f"no process with pid {pid}", "pids are 1 to 4194304: check with `ps`")
    if not 0 <= fd < 1 << 31:
        raise NotFound(f"process {pid} has no fd {fd}", f"see ls -l /proc/{pid}/fd")
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise NotFound(f"no process with pid {pid}", "check the pid with `ps`") from None
    except PermissionError:
        raise denied(f"cannot open process {pid}") from None
    except OSError as e:
        if e.errno == errno.EMFILE:
            raise _too_many_files() from None
        raise NotFound(f"cannot open process {pid}: {e.strerror}") from None
    try:
        ret = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if ret < 0:
            err = ctypes.get_errno()
            if err == errno.EBADF:
                raise NotFound(f"process {pid} has no fd {fd}", f"see ls -l /proc/{pid}/fd")
            if err in (errno.EPERM, errno.EACCES):
                raise denied(
                    f"cannot take fd {fd} of process {pid}: {os.strerror(err)}",
                    "needs CAP_SYS_PTRACE over the process",
                )
            if err == errno.ESRCH:
                raise NotFound(f"process {pid} has exited")
            if err == errno.EMFILE:
                raise _too_many_files()
            raise OSError(err, f"pidfd_getfd({pid}, {fd}): {os.strerror(err)}")
        return int(ret)
    finally:
        os.close(pidfd)


def _too_many_files() -> SocketRejected:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = f"{soft}" if hard == soft else f"{soft} (up to {hard} allowed)"
    return SocketRejected(
        f"too many open files to take another socket: the limit of open files is {limit}",
        "raise the hard limit of open files (ulimit -Hn, LimitNOFILE= in a unit): registering "
        "a target holds one file per socket until the switch",
    )


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
    reuseport: bool = False
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
            if e.errno == errno.EMFILE:
                raise _too_many_files() from None
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
        reuseport = bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
        cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
    finally:
        s.close()
    return SocketInfo(fd, proto, family, addr, port, cookie, v6only, reuseport)


# -- one command's view of a namespace's sockets ----------------------------------------------


class Discovery:
    """What one command learns about the sockets of a namespace: a sock_diag dump per protocol
    and a scan of /proc, each made once, on first use, and indexed. Borrowed sockets are kept
    (by cookie) until close()."""

    def __init__(self, ns: Netns) -> None:
        self.ns = ns
        self._entries: dict[str, list[DiagEntry]] = {}
        self._by_port: dict[tuple[str, int], list[DiagEntry]] = {}
        self._by_cookie: dict[int, DiagEntry] = {}
        self._held: dict[int, list[tuple[int, int]]] | None = None
        self._borrowed: dict[int, SocketInfo] = {}
        self.dumps = 0  # sock_diag dumps made (one per protocol at most)
        self.scans = 0  # /proc scans made (one at most)

    def close(self) -> None:
        for info in self._borrowed.values():
            info.close()
        self._borrowed.clear()

    def __enter__(self) -> Discovery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- indexes

    def entries(self, proto: str) -> list[DiagEntry]:
        """Every TCP or UDP socket of the namespace, both families."""
        found = self._entries.get(proto)
        if found is None:
            with netns_mod.enter(self.ns):
                found = [
                    e
                    for fam in (socket.AF_INET, socket.AF_INET6)
                    for e in _diag_dump(fam, PROTOCOLS[proto])
                ]
            self.dumps += 1
            self._entries[proto] = found
            for e in found:
                self._by_port.setdefault((proto, e.port), []).append(e)
                self._by_cookie[e.cookie] = e
        return found

    def at_port(self, proto: str, port: int) -> list[DiagEntry]:
        self.entries(proto)
        return self._by_port.get((proto, port), [])

    def by_cookie(self, cookie: int, proto: str) -> DiagEntry | None:
        self.entries(proto)
        return self._by_cookie.get(cookie)

    def holders(self, inode: int) -> list[Holder]:
        """The processes holding a socket (the first call scans /proc)."""
        if self._held is None:
            self._held = scan_proc()
            self.scans += 1
        return [Holder(pid, fd, comm(pid)) for pid, fd in self._held.get(inode, [])]

    # -- finding

    def find(
        self,
        proto: str,
        addr: IPAddress,
        port: int,
        exact: bool = False,
        known: Iterable[int] = (),
    ) -> list[DiagEntry]:
        """The socket(s) to register for a target at addr:port: the best candidate, and with it
        the rest of its SO_REUSEPORT group unless `exact`. Sockets in `known` (cookies already
        registered together) are not borrowed again to check their group. Raises NotFound or
        SocketRejected, explained."""
        tier = choose(self.at_port(proto, port), addr, port)
        if not tier:
            raise self._why_none(proto, addr, port)
        known = set(known)
        if exact:
            return [exact_pick(tier, known)]
        if len(tier) == 1:
            return tier
        if {e.cookie for e in tier} <= known:
            return tier[:MAX_MEMBERS]
        flags = {e.cookie: self.borrow(e).reuseport for e in tier}
        return group_of(tier, flags)

    def group_around(self, info: SocketInfo, exact: bool) -> list[DiagEntry]:
        """For a socket given by pid and fd: it, and unless `exact`, the rest of its group."""
        mine = self.by_cookie(info.cookie, info.proto)
        if mine is None:  # closed since: the caller's later checks say so
            raise NotFound(f"the {info.proto} socket at {info.endpoint} is gone")
        if exact or not info.reuseport:
            return [mine]
        tier = [
            e for e in self.at_port(info.proto, info.port) if e.addr == mine.addr and e.receives()
        ]
        tier.sort(key=_by_inode)
        tier.remove(mine)
        tier.insert(0, mine)
        flags = {e.cookie: self.borrow(e).reuseport for e in tier}
        return group_of(tier, flags)

    def _why_none(self, proto: str, addr: IPAddress, port: int) -> Exception:
        where = format_endpoint(addr, port)
        here = [e for e in self.at_port(proto, port) if e.addr == addr]
        if here and proto == "tcp":
            return SocketRejected(
                f"the tcp socket at {where} in {self.ns.label} is not listening",
                "point --to at a socket that has called listen()",
            )
        if here:
            return SocketRejected(
                f"the udp socket at {where} in {self.ns.label} is connected",
                "a connected UDP socket cannot receive new flows; use an unconnected bound socket",
            )
        six_only = [
            e
            for e in self.at_port(proto, port)
            if e.receives() and addr.version == 4 and e.addr.version == 6 and e.v6only
        ]
        if six_only:
            return SocketRejected(
                f"the socket at {six_only[0].endpoint} in {self.ns.label} is IPv6-only "
                f"(IPV6_V6ONLY) and cannot take {where}",
                "use an IPv4 socket, or a dual-stack IPv6 one bound to [::]",
            )
        verb = "listens" if proto == "tcp" else "is bound"
        return NotFound(
            f"no {proto} socket {verb} at {where} in {self.ns.label}",
            "start the proxy first, check the address with `ss -ltnu`, or pass --pid and --fd",
        )

    # -- borrowing

    def borrow(self, e: DiagEntry) -> SocketInfo:
        """A duplicate of the socket (kept until close), checked, with the same cookie."""
        info = self._borrowed.get(e.cookie)
        if info is not None:
            return info
        where = f"{e.proto} socket at {e.endpoint}"
        hs = self.holders(e.inode)
        if not hs:
            raise NotFound(f"no process holds the {where}", "is it being closed?")
        h = hs[0]
        info = inspect(borrow(h.pid, h.fd), self.ns, where)
        if info.cookie != e.cookie:
            info.close()
            raise NotFound(f"the {where} changed while it was being registered", "run it again")
        info.holder = h.describe()
        self._borrowed[e.cookie] = info
        return info

    def borrow_fd(self, pid: int, fd: int) -> SocketInfo:
        """fd `fd` of process `pid`, checked (kept until close)."""
        info = inspect(borrow(pid, fd), self.ns, f"fd {fd} of pid {pid}")
        info.holder = f"pid {pid} ({comm(pid)}) fd {fd}"
        if info.cookie in self._borrowed:
            info.close()
            return self._borrowed[info.cookie]
        self._borrowed[info.cookie] = info
        return info

    def socket_fd(self, cookie: int, proto: str) -> int:
        """An fd of the socket with this cookie, for the SOCKMAP (borrowed on first use)."""
        info = self._borrowed.get(cookie)
        if info is None:
            e = self.by_cookie(cookie, proto)
            if e is None:
                raise NotFound(f"a {proto} socket (cookie {cookie}) closed while registering")
            info = self.borrow(e)
        return info.fd

    def describe(self, cookie: int, proto: str) -> str:
        """Where a socket listens and who holds it, for messages."""
        e = self.by_cookie(cookie, proto)
        if e is None:
            return f"cookie {cookie}"
        hs = self.holders(e.inode)
        return f"{e.endpoint}, " + (hs[0].describe() if hs else "no holder")
